"""The repository routes: TUF metadata and bundles, for units holding an update token.

::

    GET /updates/metadata/{name}          N.root.json, root.json, timestamp.json,
                                          N.snapshot.json, N.targets.json
    GET /updates/targets/{model}/{sha256}.{model}-{version}.tar   a bundle (consistent name)

Every request needs ``Authorization: Bearer hut_...`` (:mod:`.tokens`) of a unit that is
still active; a unit may fetch only its own model's bundles. Names are matched against
strict patterns (no ``..``, no other files of the data directory can be named) and the
resolved path must stay inside the repository. ``timestamp.json`` and ``root.json`` are
``Cache-Control: no-store`` (they change in place); the versioned files never change.
Single byte ranges (``Range: bytes=N-`` or ``bytes=N-M``) are honoured, so an interrupted
download resumes; anything else in ``Range`` is refused with 416. The responses carry the
web app's security headers.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from hearth.service.updates.service import UpdateService
from hearth.service.web.permissions import declare

__all__ = ["PERMISSION_UPDATE_TOKEN", "create_files_router"]

PERMISSION_UPDATE_TOKEN = "updates:read (unit update token)"  # noqa: S105 - a name
_METADATA_RE = re.compile(
    r"^(?:(?:[1-9][0-9]{0,8})\.(?:root|snapshot|targets)|root|timestamp)\.json\Z")
_TARGET_RE = re.compile(
    r"^([a-z][a-z0-9_]{0,31})/[0-9a-f]{64}\.\1-(?:0|[1-9][0-9]{0,5})(?:\.(?:0|[1-9][0-9]{0,5})){2}"
    r"\.tar\Z")
_RANGE_RE = re.compile(r"^bytes=[0-9]{1,15}-(?:[0-9]{1,15})?\Z")


def _json_error(status: int, error: str, detail: str,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def create_files_router(service: UpdateService) -> APIRouter:
    """The ``/updates/...`` routes for the web app."""
    router = APIRouter()
    unit_only = [declare(PERMISSION_UPDATE_TOKEN)]

    async def authorise(request: Request) -> str | Response:
        """The token's model, or the refusal to send."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        claims = (service.tokens.verify(token.strip(), now=service.now())
                  if scheme.lower() == "bearer" else None)
        if claims is None:
            service.stats.refuse()
            return _json_error(401, "unauthorized", "an update token is required",
                               {"WWW-Authenticate": 'Bearer realm="hearth-updates"'})
        model = await run_in_threadpool(service.unit_model, claims.device_id)
        if model is None or model != claims.model:
            service.stats.refuse()
            return _json_error(403, "forbidden", "this unit may not download updates")
        return claims.model

    def serve(request: Request, path: Path, root: Path, *, kind: str, media_type: str,
              cache: str) -> Response:
        rng = request.headers.get("range")
        if rng is not None and not _RANGE_RE.match(rng.strip()):
            service.stats.refuse()
            return _json_error(416, "range_not_satisfiable", "one byte range only")
        try:
            resolved = path.resolve(strict=True)
            if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
                raise FileNotFoundError(path.name)
            size = resolved.stat().st_size
        except OSError:
            service.stats.missing()
            return _json_error(404, "not_found", "no such file")
        sent = size
        if rng is not None:
            start = int(rng.strip()[6:].split("-", 1)[0])
            sent = max(0, size - start)
        service.stats.count(kind, sent)
        return FileResponse(resolved, media_type=media_type, headers={"Cache-Control": cache})

    @router.get("/updates/metadata/{name}", dependencies=unit_only, include_in_schema=False)
    async def metadata(request: Request, name: str) -> Response:
        allowed = await authorise(request)
        if isinstance(allowed, Response):
            return allowed
        repo = service.repository
        if repo is None or not _METADATA_RE.match(name):
            service.stats.missing()
            return _json_error(404, "not_found", "no such metadata")
        cache = "no-store" if name in ("timestamp.json", "root.json") else "private, max-age=300"
        return serve(request, repo.metadata_dir / name, repo.metadata_dir, kind="metadata",
                     media_type="application/json", cache=cache)

    @router.get("/updates/targets/{path:path}", dependencies=unit_only, include_in_schema=False)
    async def target(request: Request, path: str) -> Response:
        allowed = await authorise(request)
        if isinstance(allowed, Response):
            return allowed
        repo = service.repository
        m = _TARGET_RE.match(path)
        if repo is None or m is None:
            service.stats.missing()
            return _json_error(404, "not_found", "no such target")
        if m.group(1) != allowed:
            service.stats.refuse()
            return _json_error(403, "forbidden", "another model's software")
        return serve(request, repo.targets_dir / path, repo.targets_dir, kind="targets",
                     media_type="application/x-tar", cache="private, max-age=86400, immutable")

    return router
