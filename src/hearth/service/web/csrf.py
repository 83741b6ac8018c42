"""CSRF protection for every POST form: a signed double-submit token plus origin checks.

* The browser holds a random value in a cookie (``__Host-hearth-csrf``: HttpOnly, Secure,
  SameSite=Strict, path ``/``, no domain - so a sibling sub-domain cannot plant one).
* Each form carries ``csrf_token = HMAC(key, "csrf" | cookie)`` in a hidden field. A
  cross-site attacker can neither read the cookie nor compute the MAC without the server
  key, so it cannot produce a matching pair - even if it manages to set a cookie.
* Defence in depth: a request whose ``Origin`` is present and not ours, or whose
  ``Sec-Fetch-Site`` says ``cross-site``, is refused before the token is looked at.
  (``Origin: null`` is what browsers send for our own forms under
  ``Referrer-Policy: no-referrer``, so it is left to the token.)

Usage in a route::

    token, new_cookie = csrf.issue(request)   # when rendering a form
    csrf.verify(request, form.get("csrf_token"))   # first thing in a POST handler
"""

from __future__ import annotations

import secrets

from starlette.requests import Request
from starlette.responses import Response

from hearth.errors import ValidationError
from hearth.service.web.signing import Signer

__all__ = ["CSRF_FIELD", "CsrfError", "CsrfProtection"]

CSRF_FIELD = "csrf_token"
_PURPOSE = "csrf"


class CsrfError(ValidationError):
    """A state-changing request failed the CSRF check (reason ``csrf_failed``)."""

    def __init__(self, detail: str) -> None:
        super().__init__("csrf_failed", detail)


class CsrfProtection:
    """Issue and verify double-submit tokens. ``secure`` is False only in local http tests."""

    def __init__(self, signer: Signer, *, allowed_origins: set[str], secure: bool = True) -> None:
        self._signer = signer
        self._origins = frozenset(o.rstrip("/") for o in allowed_origins)
        self.secure = secure
        self.cookie_name = "__Host-hearth-csrf" if secure else "hearth-csrf"

    def issue(self, request: Request) -> tuple[str, str | None]:
        """``(form_token, new_cookie_value_or_None)`` for a page that renders a form."""
        cookie = request.cookies.get(self.cookie_name)
        new: str | None = None
        if not cookie or len(cookie) != 43:
            cookie = new = secrets.token_urlsafe(32)
        return self._signer.mac(_PURPOSE, cookie), new

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(
            self.cookie_name, value, httponly=True, secure=self.secure, samesite="strict",
            path="/",
        )

    def verify(self, request: Request, form_token: object) -> None:
        """Raise :class:`CsrfError` unless the request is same-origin and the token matches."""
        origin = request.headers.get("origin")
        # Browsers send "Origin: null" for same-origin form posts under our
        # Referrer-Policy: no-referrer; the token and Sec-Fetch-Site still decide then.
        if origin not in (None, "null") and origin.rstrip("/") not in self._origins:
            raise CsrfError("cross-origin form submission refused")
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise CsrfError("cross-site form submission refused")
        cookie = request.cookies.get(self.cookie_name)
        if not cookie or not isinstance(form_token, str):
            raise CsrfError("the form has expired; reload the page and try again")
        if not self._signer.verify_mac(_PURPOSE, cookie, form_token):
            raise CsrfError("the form has expired; reload the page and try again")
