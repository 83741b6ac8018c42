"""Security headers for every web response: a strict CSP and friends.

The Content-Security-Policy allows scripts, styles, images and fonts from our own origin
only, and no inline script or style at all (no ``'unsafe-inline'``, no nonces): an HTML
injection that slips past autoescaping still cannot run script or restyle the page.
``frame-ancestors 'none'`` stops click-jacking, ``form-action 'self'`` stops a form being
pointed elsewhere, ``base-uri 'none'`` stops ``<base>`` hijacking of relative links.

Two ways to apply them, both setting a header only when the response has not set it:

* :class:`SecureRoute` - an ``APIRoute`` class; every route of a router built with
  ``APIRouter(route_class=SecureRoute)`` gets the headers, wherever the router is mounted;
* :class:`SecurityHeadersMiddleware` - for the whole app (``app.add_middleware(...)``),
  covering error pages and routes of other capabilities too.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "SecureRoute",
    "SecurityHeadersMiddleware",
    "apply_security_headers",
]

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
        "require-trusted-types-for 'script'",
    ]
)

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
"""Sent on every response. ``Referrer-Policy: no-referrer`` also keeps secret links
(e.g. a reporter's status link) out of other sites' logs."""

HSTS = "max-age=31536000; includeSubDomains"
R = TypeVar("R", bound=Response)


def apply_security_headers(response: R, *, hsts: bool = False) -> R:
    """Add the security headers that ``response`` does not set itself."""
    for name, value in SECURITY_HEADERS.items():
        if name not in response.headers:
            response.headers[name] = value
    if hsts and "Strict-Transport-Security" not in response.headers:
        response.headers["Strict-Transport-Security"] = HSTS
    return response


class SecureRoute(APIRoute):
    """An ``APIRoute`` whose responses always carry :data:`SECURITY_HEADERS`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def secured(request: Request) -> Response:
            return apply_security_headers(await handler(request))

        return secured


class SecurityHeadersMiddleware:
    """Pure-ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self._hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = dict(SECURITY_HEADERS)
                if self._hsts:
                    extra["Strict-Transport-Security"] = HSTS
                for name, value in extra.items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
