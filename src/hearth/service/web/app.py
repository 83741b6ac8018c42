"""The web app: public pages and the capabilities' own routes, next to the operator API.

The operator API (:func:`hearth.service.api.create_app`) answers only operator tokens, with
a small body limit and JSON errors. The web app serves people without accounts (security
researchers, product pages, later consumers), so it is its own FastAPI app with its own
guards, and :func:`compose` puts the two behind one listener by path::

    /api/v1/disclosure/...  ─┐
    everything not /api/v1/ ─┴──▶ web app   (CSP + security headers, HTML errors)
    /api/v1/..., /healthz  ──────▶ operator API

Every web route declares who may call it with :func:`declare` (``public``, ``reporter``,
``disclosure:triage``, ...); :func:`create_web_app` refuses a route that declares nothing,
and :func:`route_declaration` lets a test walk them.

Example::

    web = create_web_app(disclosure_router, hsts=True)
    asgi = compose(api_app, web)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from hearth import __version__
from hearth.service.web.permissions import declare, route_declaration
from hearth.service.web.security import SecurityHeadersMiddleware
from hearth.service.web.static import static_router

__all__ = [
    "WEB_API_PREFIXES",
    "SecretPathFilter",
    "compose",
    "create_web_app",
    "declare",
    "iter_web_routes",
    "route_declaration",
]

log = logging.getLogger(__name__)

WEB_API_PREFIXES = ("/api/v1/disclosure/", "/api/v1/account/")
"""JSON paths under ``/api/v1`` that belong to the web app (no operator-API middleware)."""


def iter_web_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[
    tuple[str, BaseRoute, str | None]
]:
    """Every endpoint as ``(path, route, declared permission)``, into included routers."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            context = getattr(route, "include_context", None)
            yield from iter_web_routes(original.routes,
                                       prefix + (getattr(context, "prefix", "") or ""))
            continue
        sub = getattr(route, "routes", None)
        if sub is not None and not isinstance(route, APIRoute):
            yield from iter_web_routes(sub, prefix + getattr(route, "path", ""))
            continue
        yield prefix + getattr(route, "path", ""), route, route_declaration(route)


_UNDECLARED_OK = frozenset({"/api/v1/disclosure/openapi.json"})


def create_web_app(*routers: APIRouter, hsts: bool = True) -> FastAPI:
    """The web app with ``routers`` (and ``/static``). Raises ``RuntimeError`` for a route
    that declares no permission (a programming error)."""
    app = FastAPI(title="Hearth web app", version=__version__,
                  openapi_url="/api/v1/disclosure/openapi.json", docs_url=None, redoc_url=None)
    app.include_router(static_router())
    for router in routers:
        app.include_router(router)

    async def http_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        text = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
        return PlainTextResponse(f"{text}\n", status_code=exc.status_code)

    async def crash(_r: Request, exc: Exception) -> Response:
        log.error("web: unhandled %s", type(exc).__name__)
        return PlainTextResponse("Internal error\n", status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, crash)
    app.add_middleware(SecurityHeadersMiddleware, hsts=hsts)
    for path, route, permission in iter_web_routes(app.routes):
        if isinstance(route, APIRoute) and permission is None and path not in _UNDECLARED_OK:
            raise RuntimeError(f"web route {path!r} declares no permission (use declare())")
    return app


def compose(api: ASGIApp, web: ASGIApp, *, web_api_prefixes: Sequence[str] = WEB_API_PREFIXES
            ) -> ASGIApp:
    """One ASGI app: ``/api/v1/...`` and ``/healthz`` go to ``api`` except the web app's
    own JSON prefixes; everything else goes to ``web``."""
    prefixes = tuple(web_api_prefixes)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        to_api = (path.startswith("/api/v1/") or path in ("/api/v1", "/healthz")) and (
            not path.startswith(prefixes))
        if scope["type"] == "lifespan":
            await api(scope, receive, send)  # the web app holds no resources of its own
            return
        await (api if to_api else web)(scope, receive, send)

    return app


class SecretPathFilter(logging.Filter):
    """Redacts secret URL parts (reporters' status tokens) from access-log records.

    Install on uvicorn's access logger:
    ``logging.getLogger("uvicorn.access").addFilter(SecretPathFilter())``.
    """

    _SECRET = re.compile(r"(/security/status/)[A-Za-z0-9_-]{20,}")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._SECRET.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self._SECRET.sub(r"\1[redacted]", record.msg)
        return True
