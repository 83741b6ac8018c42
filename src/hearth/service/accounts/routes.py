"""HTTP routes of the accounts capability: the consumer web app and its JSON API.

Every route declares who may call it (:func:`hearth.service.web.declare`): ``public``,
``account`` (a signed-in person), ``unit:owner`` (the signed-in owner of the unit in the
path - everyone else gets the same 404 as for a unit that does not exist) or
``operator``. Web pages authenticate with the session cookie and every POST checks the
CSRF token first; the JSON API authenticates only with ``Authorization: Bearer <session>``
(a session made by ``POST /api/v1/account/sessions``), never with a cookie, so it needs no
CSRF token.

Web pages::

    GET/POST /account/sign-up, /account/sign-in     GET/POST /account/sign-in/totp
    GET/POST /account/totp/enrol (+ GET /account/totp/enrol.svg, the QR code)
    POST     /account/sign-out
    GET      /units                      my devices, live (static/units.js refreshes)
    GET      /units/state.json           the same, as JSON (for the page's script)
    GET/POST /units/claim                typed device ID + setup code
    POST     /units/claim/qr             an uploaded photo of the label
    GET      /units/{device_id}          one device: state, commands, release, reset
    POST     /units/{device_id}/commands, /release, /reset, /local-key
    GET      /operator                   operators: the fleet at a glance (TOTP required)

JSON API (``/api/v1/account``)::

    POST   /accounts                     sign up          POST   /sessions    sign in
    DELETE /sessions/current             sign out         GET    /units       my devices
    POST   /units                        claim {device_id, setup_code} | {setup_uri}
    GET    /units/{device_id}            POST   /units/{device_id}/commands
    GET    /units/{device_id}/commands/{command_id}
    POST   /units/{device_id}/release    POST   /units/{device_id}/reset
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from hearth import protocol
from hearth.errors import BrokerError, HearthError, NotFoundError, ValidationError
from hearth.service.accounts.claims import (
    MAX_QR_IMAGE_BYTES,
    ClaimResult,
    decode_qr_image,
    fingerprint,
)
from hearth.service.accounts.models import Role, SessionKind, SessionState, UnitOwner
from hearth.service.accounts.service import AccountsService, SignInResult
from hearth.service.accounts.sessions import SessionInfo
from hearth.service.accounts.throttle import Throttled
from hearth.service.commands import CommandService
from hearth.service.models import Unit, UnitStatus
from hearth.service.web import CSRF_FIELD, CsrfError, FormRefused, SecureRoute, declare
from hearth.service.web import forms as web_forms

__all__ = ["PERMISSIONS", "create_router"]

PUBLIC = "public"
ACCOUNT = "account"
OWNER = "unit:owner"
OPERATOR = "operator"
PERMISSIONS = (PUBLIC, ACCOUNT, OWNER, OPERATOR)
API = "/api/v1/account"
MAX_FORM_BYTES = 16 * 1024
MAX_UPLOAD_BYTES = MAX_QR_IMAGE_BYTES + 64 * 1024
MAX_JSON_BYTES = 16 * 1024
ONLINE_WITHIN = dt.timedelta(minutes=2)
_NEXT_DEFAULT = "/units"
T = TypeVar("T")


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str, *,
                 retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


_STATUS = {
    "not_found": 404, "rate_limited": 429, "csrf_failed": 403, "sign_in_failed": 401,
    "totp_required": 401, "totp_enrolment_required": 403, "unauthorized": 401,
    "forbidden": 403, "already_claimed": 409, "already_yours": 409, "email_taken": 409,
    "request_too_large": 413, "revoked": 409, "broker_unavailable": 503,
}


def _refusal(e: Exception) -> _Refused:
    if isinstance(e, _Refused):
        return e
    if isinstance(e, Throttled):
        return _Refused(429, e.reason, e.detail, retry_after=e.retry_after)
    if isinstance(e, NotFoundError):
        return _Refused(404, "not_found", "there is no such device in your account")
    if isinstance(e, BrokerError):
        return _Refused(503, "broker_unavailable", "the device service is busy; try again")
    if isinstance(e, ValidationError):
        return _Refused(_STATUS.get(e.reason, 400), e.reason, e.detail)
    raise e


def _safe_next(value: object) -> str:
    if (isinstance(value, str) and value.startswith("/") and not value.startswith("//")
            and "\\" not in value and len(value) < 200 and not value.startswith("/api/")):
        return value
    return _NEXT_DEFAULT


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def unit_view(unit: Unit, owner: UnitOwner, now: dt.datetime) -> dict[str, Any]:
    """What the owner sees of a unit (page and JSON)."""
    spec = protocol.MODELS.get(unit.model)
    readings = []
    for name, value in sorted((unit.latest_state or {}).items()):
        rs = spec.readings.get(name) if spec else None
        readings.append({"name": name, "value": value, "text": _fmt(value),
                         "unit": rs.unit if rs else "",
                         "label": (rs.description or name) if rs else name})
    online = unit.last_seen_at is not None and now - unit.last_seen_at <= ONLINE_WITHIN
    return {
        "device_id": unit.device_id,
        "short_id": unit.device_id[:8],
        "model": unit.model,
        "model_label": unit.model.capitalize(),
        "status": unit.status,
        "online": online,
        "last_seen_at": unit.last_seen_at,
        "state_at": unit.latest_ts,
        "readings": readings,
        "state": dict(unit.latest_state or {}),
        "claimed_at": owner.claimed_at,
        "bound": owner.bound_at is not None,
        "certificate_pem": unit.certificate_pem,
        "fingerprint": fingerprint(unit.certificate_pem),
    }


def _json_unit(view: Mapping[str, Any]) -> dict[str, Any]:
    def iso(v: object) -> str | None:
        return v.isoformat() if isinstance(v, dt.datetime) else None

    return {
        "device_id": view["device_id"], "model": view["model"], "status": view["status"],
        "online": view["online"], "last_seen_at": iso(view["last_seen_at"]),
        "state_at": iso(view["state_at"]), "state": view["state"],
        "claimed_at": iso(view["claimed_at"]), "bound": view["bound"],
    }


def create_router(service: AccountsService) -> APIRouter:
    """All account routes for ``service`` (include it in the web app)."""
    svc = service
    cfg = service.config
    own = service.ownership
    router = APIRouter(route_class=SecureRoute)
    public = [declare(PUBLIC)]
    account = [declare(ACCOUNT)]
    owner = [declare(OWNER)]
    operator = [declare(OPERATOR)]

    # --- plumbing ------------------------------------------------------------------------
    def address(request: Request) -> str | None:
        return request.client.host if request.client else None

    async def read_body(request: Request, limit: int) -> bytes:
        try:
            return await web_forms.read_body(request, limit)
        except FormRefused as e:
            raise _Refused(e.status, e.reason, e.detail) from e

    async def read_form(request: Request, *, limit: int = MAX_FORM_BYTES,
                        files: int = 0) -> FormData:
        body = await read_body(request, limit)
        try:
            form = await web_forms.parse_form(request, body, max_files=files, max_fields=16,
                                              max_part_size=limit)
        except FormRefused as e:
            raise _Refused(e.status, e.reason, e.detail) from e
        try:
            svc.csrf.verify(request, form.get(CSRF_FIELD))
        except CsrfError as e:
            raise _Refused(403, e.reason, e.detail) from e
        return form

    def text(form: FormData, name: str, limit: int = 2048) -> str:
        value = form.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise _Refused(400, "wrong_type", f"{name} must be text")
        if len(value) > limit:
            raise _Refused(400, "too_long", f"{name} is too long")
        return value

    def read(fn: Callable[[Any], T]) -> T:
        with svc.sessions() as session:
            return fn(session)

    def page(request: Request, name: str, context: Mapping[str, Any] | None = None, *,
             status_code: int = 200, info: SessionInfo | None = None,
             retry_after: int | None = None) -> Response:
        ctx = {"me": info, "error": None, "notice": None, **(context or {})}
        resp = svc.templates.render(request, name, ctx, status_code=status_code,
                                    no_store=True)
        if retry_after:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    def message(request: Request, e: _Refused, *, info: SessionInfo | None = None,
                back: str | None = None) -> Response:
        return page(request, "account_message.html", {
            "title": "Not possible" if e.status != 404 else "Not found",
            "error": e.detail, "reason": e.reason, "back": back}, status_code=e.status,
            info=info, retry_after=e.retry_after)

    def set_session_cookie(resp: Response, result: SignInResult) -> None:
        resp.set_cookie(svc.session_cookie, result.session_id, httponly=True,
                        secure=cfg.secure_cookies, samesite="lax", path="/")
        if result.known_device:
            resp.set_cookie(svc.device_cookie, result.known_device, httponly=True,
                            secure=cfg.secure_cookies, samesite="strict", path="/",
                            max_age=180 * 86400)

    def clear_session_cookie(resp: Response) -> None:
        resp.delete_cookie(svc.session_cookie, path="/", secure=cfg.secure_cookies,
                           httponly=True, samesite="lax")

    def raw_session(request: Request) -> str | None:
        return request.cookies.get(svc.session_cookie)

    def session_of(request: Request) -> SessionInfo | None:
        return svc.session(raw_session(request))

    class _Redirect(Exception):
        def __init__(self, to: str) -> None:
            super().__init__(to)
            self.to = to

    def signed_in(request: Request, *, role: Role | None = None) -> SessionInfo:
        """The active session, or a redirect to where the person must go first."""
        info = session_of(request)
        if info is None:
            raise _Redirect(f"/account/sign-in?next={request.url.path}")
        if info.state is SessionState.TOTP:
            raise _Redirect("/account/sign-in/totp")
        if info.state is SessionState.ENROL:
            raise _Redirect("/account/totp/enrol")
        if role is not None and info.role is not role:
            raise _Refused(403, "forbidden", "this page is for operators")
        return info

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Map redirects and refusals of a page handler to responses."""
        import functools
        import inspect

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(request: Request, *args: Any, **kwargs: Any) -> Response:
                try:
                    result: Response = await fn(request, *args, **kwargs)
                    return result
                except _Redirect as r:
                    return RedirectResponse(r.to, status_code=303)
                except (_Refused, HearthError) as e:
                    return message(request, _refusal(e))
            return run_async

        @functools.wraps(fn)
        def run_sync(request: Request, *args: Any, **kwargs: Any) -> Response:
            try:
                result: Response = fn(request, *args, **kwargs)
                return result
            except _Redirect as r:
                return RedirectResponse(r.to, status_code=303)
            except (_Refused, HearthError) as e:
                return message(request, _refusal(e))
        return run_sync

    # --- sign-up / sign-in ---------------------------------------------------------------
    @router.get("/account/sign-up", dependencies=public, include_in_schema=False)
    def sign_up_form(request: Request) -> Response:
        return page(request, "account_sign_up.html", {"email": ""})

    @router.post("/account/sign-up", dependencies=public, include_in_schema=False)
    async def sign_up(request: Request) -> Response:
        email = ""
        try:
            form = await read_form(request)
        except _Refused as e:
            return message(request, e, back="/account/sign-up")
        try:
            email = text(form, "email", 254)
            password = text(form, "password", cfg.password_max_chars * 4)
            await run_in_threadpool(svc.sign_up, email, password, address=address(request))
            result = await run_in_threadpool(
                svc.sign_in, email, password, address=address(request),
                old_session=raw_session(request))
        except (_Refused, ValidationError) as e:
            r = _refusal(e)
            return page(request, "account_sign_up.html", {
                "email": email, "error": r.detail, "reason": r.reason},
                status_code=r.status, retry_after=r.retry_after)
        resp = RedirectResponse("/units/claim?welcome=1", status_code=303)
        set_session_cookie(resp, result)
        return resp

    @router.get("/account/sign-in", dependencies=public, include_in_schema=False)
    def sign_in_form(request: Request, next: str = _NEXT_DEFAULT) -> Response:
        return page(request, "account_sign_in.html", {"email": "", "next": _safe_next(next)})

    @router.post("/account/sign-in", dependencies=public, include_in_schema=False)
    async def sign_in(request: Request) -> Response:
        email, nxt = "", _NEXT_DEFAULT
        try:
            form = await read_form(request)
        except _Refused as e:
            return message(request, e, back="/account/sign-in")
        try:
            email = text(form, "email", 254)
            nxt = _safe_next(text(form, "next", 200))
            result = await run_in_threadpool(
                svc.sign_in, email, text(form, "password", cfg.password_max_chars * 4),
                address=address(request), old_session=raw_session(request),
                known_device=request.cookies.get(svc.device_cookie))
        except (_Refused, ValidationError) as e:
            r = _refusal(e)
            return page(request, "account_sign_in.html", {
                "email": email, "next": nxt, "error": r.detail, "reason": r.reason},
                status_code=r.status, retry_after=r.retry_after)
        after = f"?next={nxt}" if nxt != _NEXT_DEFAULT else ""
        to = {SessionState.ACTIVE: nxt, SessionState.TOTP: "/account/sign-in/totp" + after,
              SessionState.ENROL: "/account/totp/enrol" + after}[result.state]
        resp = RedirectResponse(to, status_code=303)
        set_session_cookie(resp, result)
        return resp

    @router.get("/account/sign-in/totp", dependencies=public, include_in_schema=False)
    def totp_form(request: Request, next: str = "") -> Response:
        info = session_of(request)
        if info is None or info.state is not SessionState.TOTP:
            return RedirectResponse("/account/sign-in", status_code=303)
        return page(request, "account_totp.html", {"next": _safe_next(next) if next else ""})

    @router.post("/account/sign-in/totp", dependencies=public, include_in_schema=False)
    async def totp_submit(request: Request) -> Response:
        try:
            form = await read_form(request)
        except _Refused as e:
            return message(request, e, back="/account/sign-in")
        try:
            result = await run_in_threadpool(svc.complete_totp, raw_session(request) or "",
                                             text(form, "code", 20))
        except (_Refused, ValidationError) as e:
            r = _refusal(e)
            info = session_of(request)
            if info is None or info.state is not SessionState.TOTP:
                return RedirectResponse("/account/sign-in", status_code=303)
            return page(request, "account_totp.html", {
                "error": r.detail, "reason": r.reason, "next": text(form, "next", 200)},
                status_code=r.status, retry_after=r.retry_after)
        resp = RedirectResponse(landing(result, text(form, "next", 200)), status_code=303)
        set_session_cookie(resp, result)
        return resp

    def landing(result: SignInResult, nxt: str) -> str:
        """Where a complete sign-in goes: ``next`` if given, else the role's home page."""
        if nxt:
            return _safe_next(nxt)
        info = svc.session(result.session_id)
        role = info.role if info is not None else Role.CONSUMER
        return {Role.OPERATOR: "/operator", Role.SECURITY: "/security/triage"}.get(
            role, _NEXT_DEFAULT)

    def enrol_page(request: Request, *, error: str | None = None, status_code: int = 200,
                   retry_after: int | None = None, nxt: str = "") -> Response:
        raw = raw_session(request)
        info = svc.session(raw)
        if raw is None or info is None or info.state is not SessionState.ENROL:
            return RedirectResponse("/account/sign-in", status_code=303)
        secret, uri = svc.enrolment(raw)
        grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
        return page(request, "account_enrol.html", {"secret": grouped, "uri": uri,
                                                    "error": error, "next": nxt}, info=info,
                    status_code=status_code, retry_after=retry_after)

    @router.get("/account/totp/enrol", dependencies=public, include_in_schema=False)
    def enrol_form(request: Request, next: str = "") -> Response:
        return enrol_page(request, nxt=_safe_next(next) if next else "")

    @router.get("/account/totp/enrol.svg", dependencies=public, include_in_schema=False)
    def enrol_qr(request: Request) -> Response:
        import segno

        raw = raw_session(request)
        info = svc.session(raw)
        if raw is None or info is None or info.state is not SessionState.ENROL:
            return Response("not found\n", status_code=404, media_type="text/plain")
        _secret, uri = svc.enrolment(raw)
        buf = io.BytesIO()
        segno.make(uri, error="m").save(buf, kind="svg", scale=5, border=2, xmldecl=False)
        return Response(buf.getvalue(), media_type="image/svg+xml",
                        headers={"Cache-Control": "no-store"})

    @router.post("/account/totp/enrol", dependencies=public, include_in_schema=False)
    async def enrol_submit(request: Request) -> Response:
        try:
            form = await read_form(request)
        except _Refused as e:
            return message(request, e, back="/account/totp/enrol")
        try:
            result = await run_in_threadpool(svc.confirm_enrolment,
                                             raw_session(request) or "", text(form, "code", 20))
        except (_Refused, ValidationError) as e:
            r = _refusal(e)
            return enrol_page(request, error=r.detail, status_code=r.status,
                              retry_after=r.retry_after, nxt=text(form, "next", 200))
        resp = RedirectResponse(landing(result, text(form, "next", 200)), status_code=303)
        set_session_cookie(resp, result)
        return resp

    @router.post("/account/sign-out", dependencies=public, include_in_schema=False)
    async def sign_out(request: Request) -> Response:
        try:
            form = await read_form(request)
        except _Refused as e:
            return message(request, e)
        await run_in_threadpool(svc.sign_out, raw_session(request),
                                everywhere=text(form, "everywhere", 8) == "1")
        resp = RedirectResponse("/account/sign-in", status_code=303)
        clear_session_cookie(resp)
        return resp

    @router.get("/account", dependencies=account, include_in_schema=False)
    @guarded
    def account_page(request: Request) -> Response:
        info = signed_in(request)
        return page(request, "account_home.html", {}, info=info)

    # --- my units --------------------------------------------------------------------------
    def my_units(info: SessionInfo) -> list[dict[str, Any]]:
        from hearth.service.disclosure import advisories_for_model

        def load(session: Any) -> list[dict[str, Any]]:
            now = svc.now()
            views = [unit_view(u, o, now) for u, o in own.units_of(session, info.account_id)]
            advisories: dict[str, Any] = {}
            for v in views:
                if v["model"] not in advisories:
                    advisories[v["model"]] = advisories_for_model(session, v["model"])
                v["advisories"] = advisories[v["model"]]
            return views
        return read(load)

    @router.get("/units", dependencies=account, include_in_schema=False)
    @guarded
    def units_page(request: Request) -> Response:
        info = signed_in(request)
        return page(request, "units.html", {"units": my_units(info)}, info=info)

    @router.get("/units/state.json", dependencies=account, include_in_schema=False)
    def units_state(request: Request) -> Response:
        info = session_of(request)
        if info is None or not info.active:
            return JSONResponse({"error": "unauthorized"}, status_code=401,
                                headers={"Cache-Control": "no-store"})
        units = [_json_unit(v) | {"readings": [
            {"name": r["name"], "text": r["text"], "unit": r["unit"]} for r in v["readings"]]}
            for v in my_units(info)]
        return JSONResponse({"units": units}, headers={"Cache-Control": "no-store"})

    @router.get("/units/claim", dependencies=account, include_in_schema=False)
    @guarded
    def claim_form(request: Request, welcome: str = "") -> Response:
        info = signed_in(request)
        return page(request, "claim.html", {"device_ref": "", "welcome": welcome == "1"},
                    info=info)

    def claimed_page(request: Request, info: SessionInfo, result: ClaimResult) -> Response:
        return page(request, "claimed.html", {"result": result}, info=info, status_code=201)

    @router.post("/units/claim", dependencies=account, include_in_schema=False)
    @guarded
    async def claim(request: Request) -> Response:
        info = signed_in(request)
        form = await read_form(request)
        device_ref = text(form, "device_id", 80)
        try:
            result = await run_in_threadpool(own.claim, info.account_id, device_ref,
                                             text(form, "setup_code", 64),
                                             address=address(request))
        except (ValidationError, _Refused) as e:
            r = _refusal(e)
            return page(request, "claim.html", {"device_ref": device_ref, "error": r.detail,
                                                "reason": r.reason, "welcome": False},
                        info=info, status_code=r.status, retry_after=r.retry_after)
        return claimed_page(request, info, result)

    @router.post("/units/claim/qr", dependencies=account, include_in_schema=False)
    @guarded
    async def claim_qr(request: Request) -> Response:
        info = signed_in(request)
        try:
            form = await read_form(request, limit=MAX_UPLOAD_BYTES, files=1)
            upload = form.get("label")
            if not isinstance(upload, UploadFile):
                raise _Refused(400, "invalid_image", "choose a photo of the label")
            data = await upload.read(MAX_QR_IMAGE_BYTES + 1)
            uri = await run_in_threadpool(decode_qr_image, data)
            result = await run_in_threadpool(own.claim_uri, info.account_id, uri,
                                             address=address(request))
        except (ValidationError, _Refused) as e:
            r = _refusal(e)
            if r.status == 403:
                raise r from None
            return page(request, "claim.html", {"device_ref": "", "error": r.detail,
                                                "reason": r.reason, "welcome": False},
                        info=info, status_code=r.status, retry_after=r.retry_after)
        return claimed_page(request, info, result)

    def unit_page(request: Request, info: SessionInfo, device_id: str, *,
                  notice: str | None = None, error: str | None = None,
                  credential: str | None = None, status_code: int = 200) -> Response:
        from hearth.service.disclosure import advisories_for_model

        def load(session: Any) -> dict[str, Any]:
            unit, owner_row = own.owned(session, info.account_id, device_id)
            view = unit_view(unit, owner_row, svc.now())
            view["advisories"] = advisories_for_model(session, unit.model)
            view["commands"] = sorted(protocol.MODELS[unit.model].commands)
            return view
        view = read(load)
        return page(request, "unit.html", {"unit": view, "notice": notice, "error": error,
                                           "credential": credential}, info=info,
                    status_code=status_code)

    @router.get("/units/{device_id}", dependencies=owner, include_in_schema=False)
    @guarded
    def unit_detail(request: Request, device_id: str) -> Response:
        info = signed_in(request)
        return unit_page(request, info, device_id)

    def command_params(model: str, name: str, form: FormData) -> dict[str, object]:
        spec = protocol.MODELS[model].commands.get(name)
        if spec is None:
            raise ValidationError(protocol.Reason.UNKNOWN_COMMAND, "unknown command")
        params: dict[str, object] = {}
        for pname, ps in spec.params.items():
            raw = text(form, pname, 64).strip()
            if ps.kind == "number":
                try:
                    params[pname] = float(raw)
                except ValueError:
                    raise ValidationError(protocol.Reason.WRONG_TYPE,
                                          f"{pname} must be a number") from None
            elif ps.kind == "bool":
                params[pname] = raw in ("1", "true", "on")
            else:
                params[pname] = raw
        return params

    @router.post("/units/{device_id}/commands", dependencies=owner, include_in_schema=False)
    @guarded
    async def unit_command(request: Request, device_id: str) -> Response:
        info = signed_in(request)
        form = await read_form(request)
        unit_model = read(lambda s: own.owned(s, info.account_id, device_id)[0].model)
        try:
            name = text(form, "name", 32)
            params = command_params(unit_model, name, form)
            await run_in_threadpool(own.send_command, info.account_id, device_id, name, params)
        except ValidationError as e:
            r = _refusal(e)
            return unit_page(request, info, device_id, error=r.detail, status_code=r.status)
        return unit_page(request, info, device_id, notice="Sent. The device will confirm in "
                         "a moment; its state below updates when it does.")

    @router.post("/units/{device_id}/release", dependencies=owner, include_in_schema=False)
    @guarded
    async def unit_release(request: Request, device_id: str) -> Response:
        info = signed_in(request)
        await read_form(request)
        await run_in_threadpool(own.release, info.account_id, device_id, reset=False)
        return page(request, "account_message.html", {
            "title": "Device released", "notice": "The device is no longer in your account. "
            "Whoever has it can now add it with its setup code.", "back": "/units"}, info=info)

    @router.post("/units/{device_id}/reset", dependencies=owner, include_in_schema=False)
    @guarded
    async def unit_reset(request: Request, device_id: str) -> Response:
        info = signed_in(request)
        form = await read_form(request)
        if text(form, "confirm", 8) != "1":
            return unit_page(request, info, device_id, status_code=400,
                             error="Tick the box to confirm the factory reset.")
        await run_in_threadpool(own.release, info.account_id, device_id, reset=True)
        return page(request, "account_message.html", {
            "title": "Factory reset sent", "notice": "The device is no longer in your account; "
            "it erases your settings and queued data as soon as it is online. It can be added "
            "again only with its own setup code.", "back": "/units"}, info=info)

    @router.post("/units/{device_id}/local-key", dependencies=owner, include_in_schema=False)
    @guarded
    async def unit_local_key(request: Request, device_id: str) -> Response:
        info = signed_in(request)
        await read_form(request)
        credential = await run_in_threadpool(own.new_credential, info.account_id, device_id)
        return unit_page(request, info, device_id, credential=credential,
                         notice="New local access key made; the old one stops working as "
                         "soon as the device has the new one.")

    # --- operators -------------------------------------------------------------------------
    @router.get("/operator", dependencies=operator, include_in_schema=False)
    @guarded
    def operator_page(request: Request) -> Response:
        info = signed_in(request, role=Role.OPERATOR)

        def load(session: Any) -> dict[str, Any]:
            total = session.scalar(sa.select(sa.func.count()).select_from(Unit)) or 0
            active = session.scalar(sa.select(sa.func.count()).select_from(Unit).where(
                Unit.status == UnitStatus.ACTIVE.value)) or 0
            claimed = session.scalar(sa.select(sa.func.count()).select_from(UnitOwner)) or 0
            unbound = session.scalar(sa.select(sa.func.count()).select_from(UnitOwner).where(
                UnitOwner.bound_at.is_(None))) or 0
            return {"total": total, "active": active, "claimed": claimed, "unbound": unbound}
        return page(request, "operator.html", {"fleet": read(load)}, info=info)

    # --- JSON API --------------------------------------------------------------------------
    def api_error(e: Exception) -> JSONResponse:
        r = _refusal(e)
        headers = {"Cache-Control": "no-store"}
        if r.retry_after:
            headers["Retry-After"] = str(r.retry_after)
        if r.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": r.reason, "detail": r.detail}, status_code=r.status,
                            headers=headers)

    def api_ok(body: Mapping[str, Any], status_code: int = 200) -> JSONResponse:
        return JSONResponse(dict(body), status_code=status_code,
                            headers={"Cache-Control": "no-store"})

    async def api_json(request: Request) -> dict[str, Any]:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise _Refused(415, "unsupported_media_type", "send application/json")
        body = await read_body(request, MAX_JSON_BYTES)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(400, "malformed_json", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _Refused(400, "invalid_schema", "the body must be a JSON object")
        return data

    def bearer(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def api_session(request: Request) -> SessionInfo:
        info = svc.session(bearer(request), kind=SessionKind.BEARER)
        if info is None or not info.active:
            raise _Refused(401, "unauthorized", "sign in first (Authorization: Bearer "
                           "<session token from POST /api/v1/account/sessions>)")
        return info

    def api_route(method: str, path: str, perm: list[Any], status_code: int = 200
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            import functools

            @functools.wraps(fn)
            async def handler(request: Request, **kwargs: Any) -> Response:
                try:
                    return api_ok(await fn(request, **kwargs), status_code)
                except (_Refused, HearthError) as e:
                    return api_error(e)
            router.add_api_route(API + path, handler, methods=[method], dependencies=perm,
                                 tags=["account"], status_code=status_code)
            return handler
        return wrap

    @api_route("POST", "/accounts", public, 201)
    async def api_sign_up(request: Request) -> dict[str, Any]:
        data = await api_json(request)
        account_id = await run_in_threadpool(svc.sign_up, data.get("email"),
                                             data.get("password"), address=address(request))
        return {"account_id": account_id}

    @api_route("POST", "/sessions", public, 201)
    async def api_sign_in(request: Request) -> dict[str, Any]:
        data = await api_json(request)
        totp = data.get("totp")
        result = await run_in_threadpool(
            svc.sign_in, data.get("email"), data.get("password"), address=address(request),
            kind=SessionKind.BEARER, totp_code=totp if isinstance(totp, str) else None)
        return {"token": result.session_id, "token_type": "Bearer"}

    @api_route("DELETE", "/sessions/current", account)
    async def api_sign_out(request: Request) -> dict[str, Any]:
        api_session(request)
        await run_in_threadpool(_end_bearer, bearer(request))
        return {"ok": True}

    def _end_bearer(raw: str | None) -> None:
        from hearth.service.accounts.sessions import end_session
        from hearth.service.db import begin_write

        with svc.sessions.begin() as session:
            begin_write(session)
            end_session(session, raw)

    @api_route("GET", "/units", account)
    async def api_units(request: Request) -> dict[str, Any]:
        info = api_session(request)
        views = await run_in_threadpool(my_units, info)
        return {"units": [_json_unit(v) | {"advisories": [a.id for a in v["advisories"]]}
                          for v in views]}

    def claim_json(result: ClaimResult) -> dict[str, Any]:
        return {"device_id": result.device_id, "model": result.model,
                "local_credential": result.credential,
                "certificate_pem": result.certificate_pem,
                "certificate_sha256": result.fingerprint}

    @api_route("POST", "/units", account, 201)
    async def api_claim(request: Request) -> dict[str, Any]:
        info = api_session(request)
        data = await api_json(request)
        if "setup_uri" in data:
            result = await run_in_threadpool(own.claim_uri, info.account_id,
                                             data.get("setup_uri"), address=address(request))
        else:
            result = await run_in_threadpool(own.claim, info.account_id, data.get("device_id"),
                                             data.get("setup_code"), address=address(request))
        return claim_json(result)

    @api_route("GET", "/units/{device_id}", owner)
    async def api_unit(request: Request, device_id: str) -> dict[str, Any]:
        info = api_session(request)

        def load(session: Any) -> dict[str, Any]:
            unit, owner_row = own.owned(session, info.account_id, device_id)
            view = unit_view(unit, owner_row, svc.now())
            return _json_unit(view) | {"certificate_pem": unit.certificate_pem,
                                       "certificate_sha256": view["fingerprint"]}
        return await run_in_threadpool(read, load)

    @api_route("POST", "/units/{device_id}/commands", owner, 202)
    async def api_command(request: Request, device_id: str) -> dict[str, Any]:
        info = api_session(request)
        data = await api_json(request)
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise ValidationError(protocol.Reason.WRONG_TYPE, "params must be an object")
        command_id = await run_in_threadpool(own.send_command, info.account_id, device_id,
                                             data.get("name"), params)
        return {"command_id": command_id}

    @api_route("GET", "/units/{device_id}/commands/{command_id}", owner)
    async def api_command_status(request: Request, device_id: str,
                                 command_id: str) -> dict[str, Any]:
        info = api_session(request)

        def load(session: Any) -> dict[str, Any]:
            row = own.command(session, info.account_id, device_id, command_id)
            out = CommandService.as_json(row, now=svc.now())
            return {k: (v.isoformat() if isinstance(v, dt.datetime) else v)
                    for k, v in out.items()}
        return await run_in_threadpool(read, load)

    @api_route("POST", "/units/{device_id}/release", owner)
    async def api_release(request: Request, device_id: str) -> dict[str, Any]:
        info = api_session(request)
        await run_in_threadpool(own.release, info.account_id, device_id, reset=False)
        return {"released": True}

    @api_route("POST", "/units/{device_id}/reset", owner)
    async def api_reset(request: Request, device_id: str) -> dict[str, Any]:
        info = api_session(request)
        await run_in_threadpool(own.release, info.account_id, device_id, reset=True)
        return {"released": True, "reset": "sent"}

    return router
