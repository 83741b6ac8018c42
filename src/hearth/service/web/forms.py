"""Bounded request bodies and form parsing shared by the capabilities' routes.

:func:`read_body` reads at most ``limit`` bytes of a request; :func:`parse_form` parses an
already-read body as a form with explicit Starlette limits. Both raise :class:`FormRefused`
(``status``, ``reason``, ``detail``), which each capability maps onto its own refusal type.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

__all__ = [
    "CLIENT_DISCONNECTED",
    "MALFORMED_FORM",
    "REQUEST_TOO_LARGE",
    "FormRefused",
    "parse_form",
    "read_body",
]

REQUEST_TOO_LARGE = "request_too_large"
CLIENT_DISCONNECTED = "client_disconnected"
MALFORMED_FORM = "malformed_form"

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class FormRefused(Exception):
    """A request body or form that cannot be accepted: HTTP ``status``, ``reason``, ``detail``."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413 ``request_too_large``) once it exceeds ``limit`` bytes.

    A client that goes away mid-upload is refused with 400 ``client_disconnected``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise FormRefused(413, REQUEST_TOO_LARGE, f"the request is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise FormRefused(413, REQUEST_TOO_LARGE,
                                  f"the request is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise FormRefused(400, CLIENT_DISCONNECTED, "the upload was interrupted") from e
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes, *, max_files: int, max_fields: int,
                     max_part_size: int,
                     unreadable: str = "the form could not be read") -> FormData:
    """``body`` (already read from ``request``) parsed as a form within the given limits.

    Anything but a multipart or urlencoded form, or a form Starlette cannot parse within
    the limits, is refused with 400 ``malformed_form`` (``unreadable`` is the detail of
    the latter).
    """
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(_FORM_TYPES):
        raise FormRefused(400, MALFORMED_FORM, "send the form as a form")
    try:
        return await Request(request.scope, replay).form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
    except (StarletteHTTPException, ValueError, KeyError) as e:
        raise FormRefused(400, MALFORMED_FORM, unreadable) from e
