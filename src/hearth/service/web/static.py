"""The web app's static files (CSS, images), served from the package by an explicit list.

Only files present in ``hearth/service/web/static`` at import time are served (no path
from the request ever reaches the file system), with a content type from a fixed table,
``nosniff``, and a long cache lifetime: :func:`static_url` adds a content hash to the URL
so a changed file gets a new URL.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from hearth.errors import NotFoundError
from hearth.service.web.permissions import declare
from hearth.service.web.security import SecureRoute

__all__ = ["STATIC_PREFIX", "static_router", "static_url"]

STATIC_PREFIX = "/static"
_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}


def _load() -> dict[str, tuple[bytes, str, str]]:
    files: dict[str, tuple[bytes, str, str]] = {}
    root = resources.files("hearth.service.web") / "static"
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            data = entry.read_bytes()
            files[entry.name] = (data, _TYPES[suffix], hashlib.sha256(data).hexdigest()[:12])
    return files


_FILES = _load()


def static_url(name: str) -> str:
    """URL of a static file, with a version query so caches refresh when it changes."""
    entry = _FILES.get(name)
    if entry is None:
        raise NotFoundError(f"no static file {name!r}")
    return f"{STATIC_PREFIX}/{name}?v={entry[2]}"


def static_router() -> APIRouter:
    """Routes serving the static files (public: they hold nothing secret)."""
    router = APIRouter(route_class=SecureRoute, include_in_schema=False)

    @router.get(STATIC_PREFIX + "/{name}", dependencies=[declare("public")])
    def static_file(name: str) -> Response:
        entry = _FILES.get(name)
        if entry is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        data, ctype, _ = entry
        return Response(
            data, media_type=ctype,
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )

    return router
