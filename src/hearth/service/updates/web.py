"""Web pages of the updates capability, and the pieces other pages include.

Operator page (server-rendered, strict CSP, no script)::

    GET  /operator/updates          rollouts with their progress per stage and failures, open
                                    integrity alerts, repository expiry (rollouts:read)
    GET/POST /operator/login, POST /operator/logout
                                    sign in with an operator token (checked, not kept in the
                                    browser): an 8-hour signed session cookie

Pieces for other pages (autoescaped templates rendered to :class:`markupsafe.Markup`):

* :func:`support_period_html` - a model's support period for the public product page
  (``/products/{model}``, the ``support_period`` slot of the disclosure templates);
* :func:`unit_updates_html` - the consumer's view of one unit: version, update available /
  applied / failed, support period with its end date (near or past says so), integrity
  alert, automatic updates or maintenance window. Build the view with
  :func:`hearth.service.updates.rollouts.unit_update_view`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from hearth.service import auth
from hearth.service.models import ApiToken
from hearth.service.updates import rollouts
from hearth.service.updates.rollouts import UnitUpdateView
from hearth.service.updates.service import UpdateService
from hearth.service.web import (
    CSRF_FIELD,
    CsrfError,
    CsrfProtection,
    SecureRoute,
    Signer,
    Templates,
    declare,
)
from hearth.updates.support import PSTI_DEFINITION, SupportPeriod

__all__ = [
    "SESSION_HOURS",
    "create_web_router",
    "support_period_html",
    "support_period_provider",
    "unit_updates_html",
]

SESSION_HOURS = 8
_MAX_FORM = 4096
_env = jinja2.Environment(
    loader=jinja2.PackageLoader("hearth.service.updates", "templates"),
    autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)
_env.filters.pop("safe", None)


def support_period_html(model: str, period: SupportPeriod | None, *,
                        now: dt.datetime) -> Markup:
    """The support-period section of ``model``'s public product page."""
    return Markup(_env.get_template("_support_period.html").render(  # noqa: S704 - autoescaped
        model=model, period=period.to_json(now) if period else None,
        definition=PSTI_DEFINITION))


def support_period_provider(service: UpdateService) -> Callable[[str], Markup]:
    """``model -> Markup`` for the product page (reads the published period)."""

    def provide(model: str) -> Markup:
        with service.sessions() as s:
            period = rollouts.support_period(s, model)
        return support_period_html(model, period, now=service.now())

    return provide


def unit_updates_html(view: UnitUpdateView) -> Markup:
    """The consumer's view of one unit's software, support period and alerts."""
    return Markup(_env.get_template("_unit_updates.html").render(  # noqa: S704 - autoescaped
        view=view))


def create_web_router(
    service: UpdateService, *, secret_key: bytes, base_url: str, secure_cookies: bool,
    site_name: str = "Hearth",
    operator_session: Callable[[Request], str | None] | None = None,
) -> APIRouter:
    """The operator page and its sign-in. ``operator_session`` is another way to recognise
    an operator (e.g. a signed-in operator account): it returns a name, or ``None``."""
    signer = Signer(secret_key)
    csrf = CsrfProtection(signer, allowed_origins={base_url}, secure=secure_cookies)
    templates = Templates("hearth.service.updates", csrf=csrf, site_name=site_name,
                          hsts=secure_cookies, globals={"nav_links": (
                              ("/operator/updates", "Updates"), ("/products", "Products"))})
    cookie = "__Host-hearth-operator" if secure_cookies else "hearth-operator"
    router = APIRouter(route_class=SecureRoute)
    public = [declare("public")]
    operator = [declare(auth.Permission.ROLLOUTS_READ.value)]

    def may_read(token_id: str) -> str | None:
        with service.sessions() as s:
            row = s.get(ApiToken, token_id)
            if (row is None or row.revoked_at is not None
                    or auth.Permission.ROLLOUTS_READ.value not in row.permissions):
                return None
            return row.name

    def signed_in(request: Request) -> str | None:
        if operator_session is not None:
            name = operator_session(request)
            if name is not None:
                return name
        raw = request.cookies.get(cookie)
        payload = signer.unsign("operator-session", raw) if raw else None
        if payload is None or payload.count("~") != 1:
            return None
        token_id, expires = payload.split("~")
        if not expires.isdigit() or int(expires) < service.now().timestamp():
            return None
        return may_read(token_id)

    async def form(request: Request) -> dict[str, str]:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > _MAX_FORM:
            raise CsrfError("form too large")
        data = await request.form()
        csrf.verify(request, data.get(CSRF_FIELD))
        return {k: v for k, v in data.items() if isinstance(v, str)}

    @router.get("/operator/login", dependencies=public, include_in_schema=False)
    def login_form(request: Request) -> Response:
        return templates.render(request, "operator_login.html", {}, no_store=True)

    @router.post("/operator/login", dependencies=public, include_in_schema=False)
    async def login(request: Request) -> Response:
        try:
            fields = await form(request)
        except CsrfError:
            return templates.render(request, "operator_login.html", {
                "error": "The form expired; try again."}, status_code=400, no_store=True)
        token = fields.get("token", "").strip()

        def check() -> str | None:
            with service.sessions() as s:
                principal = auth.verify_token(s, token)
            if principal is None or not principal.may(auth.Permission.ROLLOUTS_READ):
                return None
            return principal.token_id

        token_id = await run_in_threadpool(check)
        if token_id is None:
            return templates.render(request, "operator_login.html", {
                "error": "That token may not see rollouts."}, status_code=401, no_store=True)
        expires = int(service.now().timestamp()) + SESSION_HOURS * 3600
        resp = RedirectResponse("/operator/updates", status_code=303)
        resp.set_cookie(cookie, signer.sign("operator-session", f"{token_id}~{expires}"),
                        max_age=SESSION_HOURS * 3600, httponly=True, secure=secure_cookies,
                        samesite="strict", path="/")
        return resp

    @router.post("/operator/logout", dependencies=operator, include_in_schema=False)
    async def logout(request: Request) -> Response:
        try:
            await form(request)
        except CsrfError:
            return RedirectResponse("/operator/updates", status_code=303)
        resp = RedirectResponse("/operator/login", status_code=303)
        resp.delete_cookie(cookie, path="/", secure=secure_cookies, httponly=True,
                           samesite="strict")
        return resp

    @router.get("/operator/updates", dependencies=operator, include_in_schema=False)
    def updates_page(request: Request) -> Response:
        actor = signed_in(request)
        if actor is None:
            return RedirectResponse("/operator/login", status_code=303)

        def load() -> dict[str, Any]:
            with service.sessions() as s:
                return {
                    "rollouts": [rollouts.rollout_progress(s, r)
                                 for r in rollouts.list_rollouts(s, limit=20)],
                    "alerts": rollouts.open_alerts(s, limit=100),
                    "periods": [p.to_json(service.now()) for p in rollouts.support_periods(s)],
                }

        ctx = load()
        repo = service.repository
        ctx["expiry"] = repo.expiry() if repo is not None else None
        ctx["actor"] = actor
        ctx["served"] = service.stats
        return templates.render(request, "operator_updates.html", ctx, no_store=True)

    return router
