"""The companion web app's foundation: server-rendered pages, safe by construction.

Capabilities (disclosure, and later accounts, updates, privacy) render their pages with
:class:`Templates`, which

* autoescapes every template and removes the ``|safe`` filter;
* extends ``base.html`` - a phone-friendly, accessible layout (skip link, landmarks,
  visible focus, dark-mode aware) styled by ``static/hearth.css``;
* puts a CSRF token in every page (:class:`CsrfProtection`, signed double-submit); every
  POST handler calls ``csrf.verify(request, form["csrf_token"])`` first.

Every response carries a strict Content-Security-Policy and related headers
(:mod:`hearth.service.web.security`): build routers with ``route_class=SecureRoute`` and/or
add :class:`SecurityHeadersMiddleware` to the app. No inline script or style is allowed,
so pages use only ``/static`` files (:func:`static_router`, :func:`static_url`).
"""

from hearth.service.web.app import (
    SecretPathFilter,
    compose,
    create_web_app,
    iter_web_routes,
)
from hearth.service.web.csrf import CSRF_FIELD, CsrfError, CsrfProtection
from hearth.service.web.forms import FormRefused, parse_form, read_body
from hearth.service.web.permissions import declare, route_declaration
from hearth.service.web.security import (
    CONTENT_SECURITY_POLICY,
    SECURITY_HEADERS,
    SecureRoute,
    SecurityHeadersMiddleware,
    apply_security_headers,
)
from hearth.service.web.signing import Signer
from hearth.service.web.static import static_router, static_url
from hearth.service.web.templates import Templates

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "CSRF_FIELD",
    "SECURITY_HEADERS",
    "CsrfError",
    "CsrfProtection",
    "FormRefused",
    "SecretPathFilter",
    "SecureRoute",
    "SecurityHeadersMiddleware",
    "Signer",
    "Templates",
    "apply_security_headers",
    "compose",
    "create_web_app",
    "declare",
    "iter_web_routes",
    "parse_form",
    "read_body",
    "route_declaration",
    "static_router",
    "static_url",
]
