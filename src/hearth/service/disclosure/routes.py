"""HTTP routes of the disclosure capability: public pages, intake, triage, CSAF.

Build with :func:`create_router` and include it in the app. Every route declares who may
call it (``public``, ``reporter`` - holder of a status link - or ``disclosure:triage``)
with :func:`hearth.service.web.declare`; triage routes authenticate with the operator
token, either as a Bearer token (JSON API) or through the sign-in page's session cookie.

Public routes::

    GET  /.well-known/security.txt          RFC 9116, generated at serve time
    GET  /security.txt                      redirect to the above (legacy location)
    GET  /security/policy                   disclosure policy (plain English)
    GET  /security/report                   report form;  POST: file a report
    GET  /security/status/{token}           the reporter's status page (secret link)
    POST /security/status/{token}/messages  reporter message
    GET  /security/status/{token}/attachments/{id}
    GET  /security/advisories[/{id}]        human-readable advisories
    GET  /products[/{model}]                product pages (policy + advisories)
    GET  /.well-known/csaf/provider-metadata.json, /.well-known/csaf/white/...
    POST /api/v1/disclosure/challenge       proof-of-work challenge for the JSON intake
    POST /api/v1/disclosure/reports         file a report (JSON)
    GET  /api/v1/disclosure/status          (Bearer <status token>) status as JSON
    POST /api/v1/disclosure/status/messages (Bearer <status token>) reporter message

Security team (operator token)::

    GET/POST /security/triage/login, POST /security/triage/logout
    GET  /security/triage, /security/triage/reports/{tracking_id}[/attachments/{id}]
    POST /security/triage/reports/{tracking_id}/{transition,assess,messages,advisory}
    GET  /api/v1/disclosure/triage/reports[/{tracking_id}], .../metrics
    POST /api/v1/disclosure/triage/reports/{tracking_id}/{transition,assessment,messages,advisory}
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from hearth.errors import NotFoundError, ValidationError
from hearth.service import auth
from hearth.service.db import begin_write
from hearth.service.disclosure import advisories as adv_mod
from hearth.service.disclosure import csaf
from hearth.service.disclosure import reports as rep
from hearth.service.disclosure import triage as tri
from hearth.service.disclosure.antiabuse import RateLimiter, address_key
from hearth.service.disclosure.intake import (
    REPORT_FIELDS,
    IntakeError,
    IntakeReason,
    RawAttachment,
    validate_message,
    validate_report,
)
from hearth.service.disclosure.models import Advisory, Report, ReportState
from hearth.service.disclosure.security_txt import render_security_txt
from hearth.service.disclosure.service import DisclosureService
from hearth.service.web import CSRF_FIELD, CsrfError, FormRefused, SecureRoute, declare
from hearth.service.web import forms as web_forms

__all__ = ["PERMISSION_PUBLIC", "PERMISSION_REPORTER", "PERMISSION_TRIAGE", "create_router"]

PERMISSION_PUBLIC = "public"
PERMISSION_REPORTER = "reporter"
PERMISSION_TRIAGE = "disclosure:triage"
HONEYPOT_FIELD = "website"
STAMP_FIELD = "form_stamp"
TRIAGE_SESSION_HOURS = 8
_JSON_FIELD_LIMIT = 64
T = TypeVar("T")


class _Refused(Exception):
    """Internal: an HTTP refusal (status, reason, detail) raised inside a handler."""

    def __init__(self, status: int, reason: str, detail: str, *, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.field = field
        self.retry_after = retry_after


_STATUS_FOR_REASON = {
    IntakeReason.REQUEST_TOO_LARGE: 413,
    IntakeReason.RATE_LIMITED: 429,
}


def _status_for(err: ValidationError) -> int:
    if err.reason in ("invalid_transition", "advisory_required"):
        return 409
    return _STATUS_FOR_REASON.get(IntakeReason(err.reason), 400) if (
        err.reason in IntakeReason._value2member_map_) else 400


def create_router(service: DisclosureService) -> APIRouter:
    """All disclosure routes for ``service`` (include it in the FastAPI app)."""
    svc = service
    cfg = service.config
    router = APIRouter(route_class=SecureRoute)
    public = [declare(PERMISSION_PUBLIC)]
    reporter = [declare(PERMISSION_REPORTER)]
    team = [declare(PERMISSION_TRIAGE)]
    triage_cookie = "__Host-hearth-triage" if cfg.secure_cookies else "hearth-triage"

    # --- helpers -------------------------------------------------------------------------
    def refuse(err: IntakeError | ValidationError) -> _Refused:
        svc.rejections.count(err.reason)
        return _Refused(_status_for(err), err.reason, err.detail,
                        field=getattr(err, "field", None))

    def limit(limiter: RateLimiter, request: Request, what: str) -> None:
        key = address_key(request.client.host if request.client else None)
        wait = limiter.take(f"{what}:{key}")
        if wait > 0:
            svc.rejections.count(IntakeReason.RATE_LIMITED)
            raise _Refused(429, IntakeReason.RATE_LIMITED,
                           f"too many requests; try again in {int(wait) + 1} seconds",
                           retry_after=wait)

    def form_refusal(e: FormRefused) -> _Refused:
        if e.reason == web_forms.CLIENT_DISCONNECTED:
            return _Refused(e.status, e.reason, e.detail)
        return refuse(IntakeError(IntakeReason(e.reason), e.detail))

    async def read_body(request: Request) -> bytes:
        try:
            return await web_forms.read_body(request, cfg.limits.max_request_bytes)
        except FormRefused as e:
            raise form_refusal(e) from e

    async def parse_form(request: Request, body: bytes) -> FormData:
        try:
            return await web_forms.parse_form(
                request, body,
                max_files=cfg.limits.max_attachments + 1, max_fields=_JSON_FIELD_LIMIT,
                max_part_size=cfg.limits.max_text_chars * 4 + 1024,
                unreadable="the form could not be read (too many or too large parts)",
            )
        except FormRefused as e:
            raise form_refusal(e) from e

    def check_csrf(request: Request, form: FormData) -> None:
        try:
            svc.csrf.verify(request, form.get(CSRF_FIELD))
        except CsrfError as e:
            raise refuse(IntakeError(IntakeReason.CSRF_FAILED, e.detail)) from e

    def text_fields(form: FormData, names: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in (CSRF_FIELD, HONEYPOT_FIELD, STAMP_FIELD, "attachments"):
                continue
            if isinstance(value, UploadFile):
                raise refuse(IntakeError(IntakeReason.WRONG_TYPE, f"{key} must be text",
                                         field=key))
            if key in out:
                raise refuse(IntakeError(IntakeReason.MALFORMED_FORM, f"{key} sent twice",
                                         field=key))
            out[key] = value
        unknown = set(out) - names
        if unknown:
            name = sorted(unknown)[0]
            raise refuse(IntakeError(IntakeReason.UNKNOWN_FIELD, f"unknown field {name!r}",
                                     field=name))
        return out

    async def uploads(form: FormData) -> list[RawAttachment]:
        out = []
        for value in form.getlist("attachments"):
            if isinstance(value, UploadFile):
                data = await value.read(cfg.limits.max_attachment_bytes + 1)
                if not data and not value.filename:
                    continue  # an empty file input
                out.append(RawAttachment(value.filename or "attachment", data))
            elif value:
                raise refuse(IntakeError(IntakeReason.WRONG_TYPE, "attachments must be files",
                                         field="attachments"))
        return out

    def json_error(e: _Refused) -> JSONResponse:
        headers = {"Retry-After": str(int(e.retry_after) + 1)} if e.retry_after else None
        return JSONResponse({"error": e.reason, "field": e.field, "detail": e.detail},
                            status_code=e.status, headers=headers)

    def html_error(request: Request, e: _Refused, *, title: str = "Request refused",
                   back: str | None = None) -> Response:
        resp = svc.templates.render(request, "message.html", {
            "title": title, "error": e.detail, "reason": e.reason, "back": back,
        }, status_code=e.status, no_store=True)
        if e.retry_after:
            resp.headers["Retry-After"] = str(int(e.retry_after) + 1)
        return resp

    def not_found_html(request: Request, what: str = "page") -> Response:
        return svc.templates.render(request, "message.html", {
            "title": "Not found", "error": f"There is no such {what}.", "reason": "not_found",
            "back": None}, status_code=404, no_store=True)

    def read(fn: Callable[[Any], T]) -> T:
        with svc.sessions() as session:
            return fn(session)

    def write(fn: Callable[[Any], T]) -> T:
        with svc.sessions.begin() as session:
            begin_write(session)
            return fn(session)

    def public_view(report: Report, events: list[Any]) -> dict[str, Any]:
        flags = tri.compute_flags(report, now=svc.now(),
                                  update_every_days=cfg.status_update_every_days)
        return {
            "tracking_id": report.tracking_id,
            "title": report.title,
            "state": report.state,
            "state_label": tri.STATE_LABELS[report.state],
            "received_at": report.received_at.isoformat(),
            "acknowledge_by": report.acknowledge_by.isoformat(),
            "acknowledged_at": report.acknowledged_at.isoformat() if report.acknowledged_at
            else None,
            "fix_target": report.fix_target.isoformat(),
            "next_update_due": flags.next_update_due.isoformat() if flags.next_update_due
            else None,
            "advisory_id": report.advisory_id,
            "events": [
                {"at": e.at.isoformat(), "kind": e.kind,
                 "from": "reporter" if e.actor == "reporter" else "security team"
                 if e.actor.startswith("team:") else "system",
                 "from_state": e.from_state, "to_state": e.to_state, "body": e.body}
                for e in events
            ],
        }

    def team_view(report: Report, events: list[Any], attachments: list[Any]) -> dict[str, Any]:
        flags = tri.compute_flags(report, now=svc.now(),
                                  update_every_days=cfg.status_update_every_days)
        return {
            "tracking_id": report.tracking_id, "state": report.state, "title": report.title,
            "description": report.description, "model": report.model,
            "version": report.version, "reporter_name": report.reporter_name,
            "reporter_email": report.reporter_email, "wants_credit": report.wants_credit,
            "received_at": report.received_at.isoformat(),
            "acknowledge_by": report.acknowledge_by.isoformat(),
            "fix_target": report.fix_target.isoformat(),
            "cvss_vector": report.cvss_vector, "cvss_score": report.cvss_score,
            "severity": report.severity, "affected": report.affected,
            "fixing_release": report.fixing_release, "duplicate_of": report.duplicate_of,
            "advisory_id": report.advisory_id,
            "allowed_transitions": sorted(tri.TRANSITIONS[ReportState(report.state)]),
            "overdue": flags.labels(),
            "next_update_due": flags.next_update_due.isoformat() if flags.next_update_due
            else None,
            "attachments": [{"id": a.id, "filename": a.filename, "content_type": a.content_type,
                             "size": a.size, "sha256": a.sha256} for a in attachments],
            "events": [{"at": e.at.isoformat(), "actor": e.actor, "kind": e.kind,
                        "public": e.public, "from_state": e.from_state,
                        "to_state": e.to_state, "body": e.body, "data": e.data}
                       for e in events],
        }

    def download(att: Any) -> Response:
        return Response(att.data, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{att.filename}"',
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "no-store",
        })

    # --- security.txt and the policy ----------------------------------------------------
    @router.get("/.well-known/security.txt", dependencies=public, include_in_schema=False)
    def security_txt() -> Response:
        return PlainTextResponse(
            render_security_txt(cfg, now=svc.now()), media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "public, max-age=3600"})

    @router.get("/security.txt", dependencies=public, include_in_schema=False)
    def security_txt_legacy() -> Response:
        return RedirectResponse("/.well-known/security.txt", status_code=301)

    @router.get("/security/policy", dependencies=public, include_in_schema=False)
    def policy(request: Request) -> Response:
        return svc.templates.render(request, "policy.html", {"cfg": cfg})

    # --- intake: web form ---------------------------------------------------------------
    def render_form(request: Request, *, values: Mapping[str, Any] | None = None,
                    error: _Refused | None = None) -> Response:
        resp = svc.templates.render(request, "report_form.html", {
            "cfg": cfg, "models": svc.models, "values": dict(values or {}),
            "error": error.detail if error else None,
            "error_field": error.field if error else None,
            "error_reason": error.reason if error else None,
            "stamp": svc.form_stamp.issue(svc.now()),
            "honeypot": HONEYPOT_FIELD, "stamp_field": STAMP_FIELD,
        }, status_code=error.status if error else 200, no_store=True)
        if error and error.retry_after:
            resp.headers["Retry-After"] = str(int(error.retry_after) + 1)
        return resp

    @router.get("/security/report", dependencies=public, include_in_schema=False)
    def report_form(request: Request) -> Response:
        return render_form(request)

    @router.post("/security/report", dependencies=public, include_in_schema=False)
    async def report_submit(request: Request) -> Response:
        values: dict[str, Any] = {}
        try:
            limit(svc.message_limiter, request, "attempt")
            form = await parse_form(request, await read_body(request))
            check_csrf(request, form)
            values = text_fields(form, set(REPORT_FIELDS))
            if form.get(HONEYPOT_FIELD):
                raise refuse(IntakeError(IntakeReason.SPAM_SUSPECTED,
                                         "the form was filled in automatically; if you are a "
                                         "person, leave the field named 'website' empty"))
            try:
                svc.form_stamp.check(form.get(STAMP_FIELD), svc.now())
            except IntakeError as e:
                raise refuse(e) from e
            try:
                submission = validate_report(values, await uploads(form), limits=cfg.limits,
                                             models=svc.models)
            except IntakeError as e:
                raise refuse(e) from e
            limit(svc.report_limiter, request, "report")
        except _Refused as e:
            return render_form(request, values=values, error=e)

        def store(session: Any) -> str:
            _, token = rep.submit_report(
                session, submission, now=svc.now(), calendar=svc.calendar,
                acknowledge_within_working_days=cfg.acknowledge_within_working_days,
                fix_target_days=cfg.fix_target_days)
            return token

        token = await run_in_threadpool(write, store)
        return RedirectResponse(f"/security/status/{token}?new=1", status_code=303)

    # --- the reporter's status page -------------------------------------------------------
    @router.get("/security/status/{token}", dependencies=reporter, include_in_schema=False)
    def status_page(request: Request, token: str, new: int = 0) -> Response:
        try:
            limit(svc.message_limiter, request, "status")
        except _Refused as e:
            return html_error(request, e)

        def load(session: Any) -> tuple[Report, list[Any], list[Any]]:
            report = rep.report_for_token(session, token)
            return (report, tri.events_of(session, report, public_only=True),
                    rep.attachments_of(session, report))

        try:
            report, events, attachments = read(load)
        except NotFoundError:
            return not_found_html(request, "report at this link")
        flags = tri.compute_flags(report, now=svc.now(),
                                  update_every_days=cfg.status_update_every_days)
        resp = svc.templates.render(request, "status.html", {
            "cfg": cfg, "report": report, "events": events, "attachments": attachments,
            "flags": flags, "state_label": tri.STATE_LABELS[report.state], "new": bool(new),
            "status_url": cfg.url(f"/security/status/{token}"), "token": token,
            "model_name": svc.models.get(report.model or "", ""),
        }, no_store=True)
        resp.headers["X-Robots-Tag"] = "noindex, nofollow"
        return resp

    @router.post("/security/status/{token}/messages", dependencies=reporter,
                 include_in_schema=False)
    async def status_message(request: Request, token: str) -> Response:
        try:
            limit(svc.message_limiter, request, "status")
            form = await parse_form(request, await read_body(request))
            check_csrf(request, form)
            try:
                body = validate_message(text_fields(form, {"body"}), limits=cfg.limits)
            except IntakeError as e:
                raise refuse(e) from e
        except _Refused as e:
            return html_error(request, e, back=f"/security/status/{token}")

        def store(session: Any) -> None:
            report = rep.report_for_token(session, token)
            rep.reporter_message(session, report, body, now=svc.now())

        try:
            await run_in_threadpool(write, store)
        except NotFoundError:
            return not_found_html(request, "report at this link")
        return RedirectResponse(f"/security/status/{token}#messages", status_code=303)

    @router.get("/security/status/{token}/attachments/{attachment_id}", dependencies=reporter,
                include_in_schema=False)
    def status_attachment(request: Request, token: str, attachment_id: str) -> Response:
        def load(session: Any) -> Any:
            return rep.attachment_for_report(session, rep.report_for_token(session, token),
                                             attachment_id)
        try:
            return download(read(load))
        except NotFoundError:
            return not_found_html(request, "attachment")

    # --- intake and status: JSON API ----------------------------------------------------
    @router.post("/api/v1/disclosure/challenge", dependencies=public, tags=["disclosure"])
    def api_challenge(request: Request) -> Response:
        """A proof-of-work challenge: find ``nonce`` with sha256(challenge:nonce) having
        ``difficulty`` leading zero bits, then send both with the report."""
        try:
            limit(svc.message_limiter, request, "attempt")
        except _Refused as e:
            return json_error(e)
        ch = svc.pow.issue(svc.now())
        return JSONResponse({"challenge": ch.challenge, "difficulty": ch.difficulty,
                             "expires_at": ch.expires_at.isoformat()})

    async def json_body(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise refuse(IntakeError(IntakeReason.MALFORMED_JSON,
                                     "send Content-Type: application/json"))
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise refuse(IntakeError(IntakeReason.MALFORMED_JSON, "the body is not JSON")) from e
        if not isinstance(data, dict):
            raise refuse(IntakeError(IntakeReason.MALFORMED_JSON, "send a JSON object"))
        return data

    def json_attachments(value: object) -> list[RawAttachment]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise refuse(IntakeError(IntakeReason.WRONG_TYPE, "attachments must be a list",
                                     field="attachments"))
        if len(value) > cfg.limits.max_attachments:
            raise refuse(IntakeError(IntakeReason.TOO_MANY_ATTACHMENTS,
                                     f"at most {cfg.limits.max_attachments} attachments",
                                     field="attachments"))
        out = []
        for item in value:
            if (not isinstance(item, dict) or set(item) != {"filename", "content_base64"}
                    or not isinstance(item["filename"], str)
                    or not isinstance(item["content_base64"], str)):
                raise refuse(IntakeError(
                    IntakeReason.WRONG_TYPE,
                    "each attachment is {\"filename\": str, \"content_base64\": str}",
                    field="attachments"))
            try:
                data = base64.b64decode(item["content_base64"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise refuse(IntakeError(IntakeReason.WRONG_TYPE,
                                         "content_base64 is not base64",
                                         field="attachments")) from e
            out.append(RawAttachment(item["filename"][:200], data))
        return out

    @router.post("/api/v1/disclosure/reports", dependencies=public, tags=["disclosure"],
                 status_code=201)
    async def api_report(request: Request) -> Response:
        """File a report (no account). Body: the report fields, ``attachments``
        (``[{filename, content_base64}]``) and ``pow`` (``{challenge, nonce}``).
        Returns the tracking id and the secret status token (shown once)."""
        try:
            limit(svc.message_limiter, request, "attempt")
            data = await json_body(request)
            pow_ = data.pop("pow", None)
            atts = json_attachments(data.pop("attachments", None))
            try:
                if pow_ is not None and not isinstance(pow_, dict):
                    raise IntakeError(IntakeReason.POW_INVALID, "pow is an object", field="pow")
                svc.pow.check((pow_ or {}).get("challenge"), (pow_ or {}).get("nonce"),
                              svc.now())
                submission = validate_report(data, atts, limits=cfg.limits, models=svc.models)
            except IntakeError as e:
                raise refuse(e) from e
            limit(svc.report_limiter, request, "report")
        except _Refused as e:
            return json_error(e)

        def store(session: Any) -> dict[str, Any]:
            report, token = rep.submit_report(
                session, submission, now=svc.now(), calendar=svc.calendar,
                acknowledge_within_working_days=cfg.acknowledge_within_working_days,
                fix_target_days=cfg.fix_target_days)
            return {
                "tracking_id": report.tracking_id, "status_token": token,
                "status_url": cfg.url(f"/security/status/{token}"),
                "state": report.state, "acknowledge_by": report.acknowledge_by.isoformat(),
                "fix_target": report.fix_target.isoformat(),
            }

        result = await run_in_threadpool(write, store)
        return JSONResponse(result, status_code=201, headers={"Cache-Control": "no-store"})

    def bearer(request: Request) -> str | None:
        value = request.headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def not_found_json() -> JSONResponse:
        return JSONResponse({"error": "not_found", "field": None, "detail": "no such report"},
                            status_code=404)

    @router.get("/api/v1/disclosure/status", dependencies=reporter, tags=["disclosure"])
    def api_status(request: Request) -> Response:
        """The report a status token opens (``Authorization: Bearer <status token>``)."""
        try:
            limit(svc.message_limiter, request, "status")
        except _Refused as e:
            return json_error(e)

        def load(session: Any) -> dict[str, Any]:
            report = rep.report_for_token(session, bearer(request))
            return public_view(report, tri.events_of(session, report, public_only=True))

        try:
            return JSONResponse(read(load), headers={"Cache-Control": "no-store"})
        except NotFoundError:
            return not_found_json()

    @router.post("/api/v1/disclosure/status/messages", dependencies=reporter,
                 tags=["disclosure"], status_code=201)
    async def api_status_message(request: Request) -> Response:
        """Send the security team a message (``Authorization: Bearer <status token>``)."""
        try:
            limit(svc.message_limiter, request, "status")
            data = await json_body(request)
            try:
                body = validate_message(data, limits=cfg.limits)
            except IntakeError as e:
                raise refuse(e) from e
        except _Refused as e:
            return json_error(e)
        token = bearer(request)

        def store(session: Any) -> None:
            report = rep.report_for_token(session, token)
            rep.reporter_message(session, report, body, now=svc.now())

        try:
            await run_in_threadpool(write, store)
        except NotFoundError:
            return not_found_json()
        return JSONResponse({"ok": True}, status_code=201)

    # --- triage: authentication ---------------------------------------------------------
    def team_from_cookie(request: Request) -> str | None:
        if svc.team_session is not None:  # security-team accounts replace pasted tokens
            return svc.team_session(request)
        raw = request.cookies.get(triage_cookie)
        payload = svc.signer.unsign("triage-session", raw) if raw else None
        if payload is None or payload.count("~") != 1:
            return None
        token_id, expires = payload.split("~")
        if not expires.isdigit() or int(expires) < svc.now().timestamp():
            return None
        name = read(lambda s: svc.token_may_triage(s, token_id))
        return f"team:{name}" if name is not None else None

    def team_from_bearer(request: Request) -> str | None:
        token = bearer(request)
        if token is None:
            return None

        def check(session: Any) -> str | None:
            principal = auth.verify_token(session, token)
            if principal is None:
                return None
            return svc.token_may_triage(session, principal.token_id)

        name = read(check)
        return f"team:{name}" if name is not None else None

    def api_team(request: Request) -> str:
        actor = team_from_bearer(request)
        if actor is None:
            raise _Refused(401, "unauthorized", "a valid operator token with the "
                           "disclosure:triage permission is required (Authorization: Bearer)")
        return actor

    @router.get("/security/triage/login", dependencies=public, include_in_schema=False)
    def login_form(request: Request) -> Response:
        if svc.team_session is not None:
            return RedirectResponse("/account/sign-in?next=/security/triage", status_code=303)
        return svc.templates.render(request, "triage_login.html", {}, no_store=True)

    @router.post("/security/triage/login", dependencies=public, include_in_schema=False)
    async def login(request: Request) -> Response:
        if svc.team_session is not None:
            return RedirectResponse("/account/sign-in?next=/security/triage", status_code=303)
        try:
            limit(svc.login_limiter, request, "login")
            form = await parse_form(request, await read_body(request))
            check_csrf(request, form)
            token = form.get("token")
        except _Refused as e:
            return html_error(request, e, back="/security/triage/login")

        def check(session: Any) -> str | None:
            if not isinstance(token, str):
                return None
            principal = auth.verify_token(session, token.strip())
            if principal is None or svc.token_may_triage(session, principal.token_id) is None:
                return None
            return principal.token_id

        token_id = await run_in_threadpool(read, check)
        if token_id is None:
            svc.rejections.count("bad_token")
            return svc.templates.render(request, "triage_login.html", {
                "error": "That token is not valid for the security team."},
                status_code=401, no_store=True)
        expires = int(svc.now().timestamp()) + TRIAGE_SESSION_HOURS * 3600
        resp = RedirectResponse("/security/triage", status_code=303)
        resp.set_cookie(triage_cookie, svc.signer.sign("triage-session", f"{token_id}~{expires}"),
                        max_age=TRIAGE_SESSION_HOURS * 3600, httponly=True,
                        secure=cfg.secure_cookies, samesite="strict", path="/")
        return resp

    @router.post("/security/triage/logout", dependencies=team, include_in_schema=False)
    async def logout(request: Request) -> Response:
        try:
            check_csrf(request, await parse_form(request, await read_body(request)))
        except _Refused as e:
            return html_error(request, e)
        resp = RedirectResponse("/security/triage/login", status_code=303)
        resp.delete_cookie(triage_cookie, path="/", secure=cfg.secure_cookies, httponly=True,
                           samesite="strict")
        return resp

    def to_login() -> Response:
        if svc.team_session is not None:
            return RedirectResponse("/account/sign-in?next=/security/triage", status_code=303)
        return RedirectResponse("/security/triage/login", status_code=303)

    # --- triage: HTML -------------------------------------------------------------------
    @router.get("/security/triage", dependencies=team, include_in_schema=False)
    def triage_list(request: Request) -> Response:
        actor = team_from_cookie(request)
        if actor is None:
            return to_login()
        now = svc.now()
        rows = read(lambda s: tri.list_reports(
            s, now=now, update_every_days=cfg.status_update_every_days))
        return svc.templates.render(request, "triage_list.html", {
            "rows": rows, "actor": actor, "rejections": svc.rejections.snapshot(),
            "models": svc.models, "labels": tri.STATE_LABELS}, no_store=True)

    def render_triage_report(request: Request, tracking_id: str, actor: str, *,
                             error: str | None = None, notice: str | None = None,
                             status_code: int = 200) -> Response:
        def load(session: Any) -> Any:
            report = tri.get_report(session, tracking_id)
            return (report, tri.events_of(session, report, public_only=False),
                    rep.attachments_of(session, report))
        try:
            report, events, attachments = read(load)
        except NotFoundError:
            return not_found_html(request, "report")
        flags = tri.compute_flags(report, now=svc.now(),
                                  update_every_days=cfg.status_update_every_days)
        affected_text = "\n".join(
            f"{a['model']} {a.get('introduced') or '-'} {a.get('fixed') or '-'}"
            for a in report.affected)
        return svc.templates.render(request, "triage_report.html", {
            "report": report, "events": events, "attachments": attachments, "flags": flags,
            "actor": actor, "allowed": sorted(tri.TRANSITIONS[ReportState(report.state)]),
            "labels": tri.STATE_LABELS, "models": svc.models, "affected_text": affected_text,
            "error": error, "notice": notice,
        }, status_code=status_code, no_store=True)

    @router.get("/security/triage/reports/{tracking_id}", dependencies=team,
                include_in_schema=False)
    def triage_report(request: Request, tracking_id: str) -> Response:
        actor = team_from_cookie(request)
        if actor is None:
            return to_login()
        return render_triage_report(request, tracking_id, actor)

    @router.get("/security/triage/reports/{tracking_id}/attachments/{attachment_id}",
                dependencies=team, include_in_schema=False)
    def triage_attachment(request: Request, tracking_id: str, attachment_id: str) -> Response:
        if team_from_cookie(request) is None:
            return to_login()
        try:
            return download(read(lambda s: rep.attachment_for_report(
                s, tri.get_report(s, tracking_id), attachment_id)))
        except NotFoundError:
            return not_found_html(request, "attachment")

    def parse_affected_text(text: str) -> list[dict[str, Any]]:
        out = []
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 3:
                raise tri.TriageError("invalid_affected",
                                      "one range per line: model introduced fixed")
            parts += ["-"] * (3 - len(parts))
            out.append({"model": parts[0],
                        "introduced": None if parts[1] == "-" else parts[1],
                        "fixed": None if parts[2] == "-" else parts[2]})
        return out

    async def triage_action(request: Request, tracking_id: str,
                            action: Callable[[Any, Report, str, FormData], str]) -> Response:
        actor = team_from_cookie(request)
        if actor is None:
            return to_login()
        try:
            form = await parse_form(request, await read_body(request))
            check_csrf(request, form)
        except _Refused as e:
            return html_error(request, e, back=f"/security/triage/reports/{tracking_id}")

        def run(session: Any) -> str:
            return action(session, tri.get_report(session, tracking_id), actor, form)

        try:
            notice = await run_in_threadpool(write, run)
        except NotFoundError:
            return not_found_html(request, "report")
        except ValidationError as e:
            svc.rejections.count(e.reason)
            return render_triage_report(request, tracking_id, actor, error=e.detail,
                                        status_code=_status_for(e))
        return render_triage_report(request, tracking_id, actor, notice=notice)

    def form_text(form: FormData, name: str, max_chars: int = 20_000) -> str:
        value = form.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise tri.TriageError("wrong_type", f"{name} must be text")
        if len(value) > max_chars:
            raise tri.TriageError("field_too_long", f"{name} is too long")
        return value.strip()

    @router.post("/security/triage/reports/{tracking_id}/transition", dependencies=team,
                 include_in_schema=False)
    async def triage_transition(request: Request, tracking_id: str) -> Response:
        def act(session: Any, report: Report, actor: str, form: FormData) -> str:
            comment = form_text(form, "comment")
            if comment:
                validate_message({"body": comment}, limits=cfg.limits)
            tri.transition(session, report, form_text(form, "state", 20), actor=actor,
                           now=svc.now(), duplicate_of=form_text(form, "duplicate_of", 32)
                           or None, comment=comment or None)
            return f"State changed to {report.state}."
        return await triage_action(request, tracking_id, act)

    @router.post("/security/triage/reports/{tracking_id}/assess", dependencies=team,
                 include_in_schema=False)
    async def triage_assess(request: Request, tracking_id: str) -> Response:
        def act(session: Any, report: Report, actor: str, form: FormData) -> str:
            vector = form_text(form, "cvss_vector", 300)
            tri.assess(session, report, actor=actor, now=svc.now(), models=svc.models,
                       cvss_vector=vector or None,
                       affected=parse_affected_text(form_text(form, "affected", 5000)),
                       fixing_release=form_text(form, "fixing_release", 64))
            return "Assessment saved."
        return await triage_action(request, tracking_id, act)

    @router.post("/security/triage/reports/{tracking_id}/messages", dependencies=team,
                 include_in_schema=False)
    async def triage_message(request: Request, tracking_id: str) -> Response:
        def act(session: Any, report: Report, actor: str, form: FormData) -> str:
            body = validate_message({"body": form_text(form, "body", 10**6)},
                                    limits=cfg.limits)
            public = form.get("visibility") == "public"
            tri.team_message(session, report, body, public=public, actor=actor, now=svc.now())
            return "Message sent to the reporter." if public else "Internal note added."
        return await triage_action(request, tracking_id, act)

    @router.post("/security/triage/reports/{tracking_id}/advisory", dependencies=team,
                 include_in_schema=False)
    async def triage_advisory(request: Request, tracking_id: str) -> Response:
        def act(session: Any, report: Report, actor: str, form: FormData) -> str:
            adv = adv_mod.publish_advisory(
                session, report, config=cfg, models=svc.models, now=svc.now(), actor=actor,
                title=form_text(form, "title", 1000), summary=form_text(form, "summary"),
                cve=form_text(form, "cve", 32) or None)
            return f"Advisory {adv.id} published."
        return await triage_action(request, tracking_id, act)

    # --- triage: JSON API ---------------------------------------------------------------
    @router.get("/api/v1/disclosure/triage/reports", dependencies=team, tags=["disclosure"])
    def api_triage_list(request: Request) -> Response:
        """Reports, overdue first, with their deadline flags."""
        try:
            api_team(request)
        except _Refused as e:
            return json_error(e)
        now = svc.now()
        rows = read(lambda s: tri.list_reports(
            s, now=now, update_every_days=cfg.status_update_every_days))
        return JSONResponse({"reports": [
            {"tracking_id": r.tracking_id, "title": r.title, "state": r.state,
             "severity": r.severity, "received_at": r.received_at.isoformat(),
             "acknowledge_by": r.acknowledge_by.isoformat(),
             "fix_target": r.fix_target.isoformat(), "overdue": f.labels()}
            for r, f in rows]}, headers={"Cache-Control": "no-store"})

    @router.get("/api/v1/disclosure/triage/metrics", dependencies=team, tags=["disclosure"])
    def api_triage_metrics(request: Request) -> Response:
        """Refused intake requests per reason code (since this process started)."""
        try:
            api_team(request)
        except _Refused as e:
            return json_error(e)
        return JSONResponse({"rejections": svc.rejections.snapshot()})

    @router.get("/api/v1/disclosure/triage/reports/{tracking_id}", dependencies=team,
                tags=["disclosure"])
    def api_triage_report(request: Request, tracking_id: str) -> Response:
        """One report with its whole audit trail (internal entries included)."""
        try:
            api_team(request)
        except _Refused as e:
            return json_error(e)

        def load(session: Any) -> dict[str, Any]:
            report = tri.get_report(session, tracking_id)
            return team_view(report, tri.events_of(session, report, public_only=False),
                             rep.attachments_of(session, report))
        try:
            return JSONResponse(read(load), headers={"Cache-Control": "no-store"})
        except NotFoundError:
            return not_found_json()

    async def api_action(request: Request, tracking_id: str,
                         action: Callable[[Any, Report, str, dict[str, Any]], Any]) -> Response:
        try:
            actor = api_team(request)
            data = await json_body(request)
        except _Refused as e:
            return json_error(e)

        def run(session: Any) -> dict[str, Any]:
            report = tri.get_report(session, tracking_id)
            extra = action(session, report, actor, data)
            events = tri.events_of(session, report, public_only=False)
            view = team_view(report, events, rep.attachments_of(session, report))
            if isinstance(extra, dict):
                view.update(extra)
            return view

        try:
            return JSONResponse(await run_in_threadpool(write, run))
        except NotFoundError:
            return not_found_json()
        except ValidationError as e:
            svc.rejections.count(e.reason)
            return JSONResponse({"error": e.reason, "field": getattr(e, "field", None),
                                 "detail": e.detail}, status_code=_status_for(e))

    def want_str(data: Mapping[str, Any], name: str, *, required: bool = False,
                 max_chars: int = 20_000) -> str | None:
        value = data.get(name)
        if value is None:
            if required:
                raise tri.TriageError("missing_field", f"{name} is required")
            return None
        if not isinstance(value, str) or len(value) > max_chars:
            raise tri.TriageError("wrong_type", f"{name} must be text of at most "
                                  f"{max_chars} characters")
        return value

    def only(data: Mapping[str, Any], names: set[str]) -> None:
        unknown = set(data) - names
        if unknown:
            raise tri.TriageError("unknown_field", f"unknown field {sorted(unknown)[0]!r}")

    @router.post("/api/v1/disclosure/triage/reports/{tracking_id}/transition",
                 dependencies=team, tags=["disclosure"])
    async def api_transition(request: Request, tracking_id: str) -> Response:
        """Body: ``{"state": ..., "comment"?: ..., "duplicate_of"?: ...}``."""
        def act(session: Any, report: Report, actor: str, data: dict[str, Any]) -> None:
            only(data, {"state", "comment", "duplicate_of"})
            comment = want_str(data, "comment")
            if comment:
                validate_message({"body": comment}, limits=cfg.limits)
            tri.transition(session, report, want_str(data, "state", required=True) or "",
                           actor=actor, now=svc.now(),
                           duplicate_of=want_str(data, "duplicate_of", max_chars=32),
                           comment=comment)
        return await api_action(request, tracking_id, act)

    @router.post("/api/v1/disclosure/triage/reports/{tracking_id}/assessment",
                 dependencies=team, tags=["disclosure"])
    async def api_assess(request: Request, tracking_id: str) -> Response:
        """Body: any of ``cvss_vector`` (CVSS:3.1/... or CVSS:4.0/...), ``affected``
        (``[{model, introduced, fixed}]``), ``fixing_release``."""
        def act(session: Any, report: Report, actor: str, data: dict[str, Any]) -> None:
            only(data, {"cvss_vector", "affected", "fixing_release"})
            affected = data.get("affected")
            if affected is not None and not isinstance(affected, list):
                raise tri.TriageError("wrong_type", "affected must be a list")
            tri.assess(session, report, actor=actor, now=svc.now(), models=svc.models,
                       cvss_vector=want_str(data, "cvss_vector", max_chars=300),
                       affected=affected,
                       fixing_release=want_str(data, "fixing_release", max_chars=64))
        return await api_action(request, tracking_id, act)

    @router.post("/api/v1/disclosure/triage/reports/{tracking_id}/messages",
                 dependencies=team, tags=["disclosure"])
    async def api_message(request: Request, tracking_id: str) -> Response:
        """Body: ``{"body": ..., "visibility": "public" | "internal"}``."""
        def act(session: Any, report: Report, actor: str, data: dict[str, Any]) -> None:
            visibility = data.get("visibility", "internal")
            if visibility not in ("public", "internal"):
                raise tri.TriageError("wrong_type", "visibility is public or internal")
            body = validate_message(data, limits=cfg.limits)
            tri.team_message(session, report, body, public=visibility == "public",
                             actor=actor, now=svc.now())
        return await api_action(request, tracking_id, act)

    @router.post("/api/v1/disclosure/triage/reports/{tracking_id}/advisory",
                 dependencies=team, tags=["disclosure"])
    async def api_advisory(request: Request, tracking_id: str) -> Response:
        """Publish the advisory of a fixed report. Body: ``{"title", "summary", "cve"?}``."""
        def act(session: Any, report: Report, actor: str, data: dict[str, Any]) -> Any:
            only(data, {"title", "summary", "cve"})
            adv = adv_mod.publish_advisory(
                session, report, config=cfg, models=svc.models, now=svc.now(), actor=actor,
                title=want_str(data, "title", required=True, max_chars=1000) or "",
                summary=want_str(data, "summary", required=True) or "",
                cve=want_str(data, "cve", max_chars=32))
            return {"advisory": {"id": adv.id, "url": cfg.url(adv_mod.advisory_json_path(
                adv.id, adv.initial_release_date)), "page": cfg.url(
                adv_mod.advisory_html_path(adv.id))}}
        return await api_action(request, tracking_id, act)

    # --- advisories: HTML ---------------------------------------------------------------
    @router.get("/security/advisories", dependencies=public, include_in_schema=False)
    def advisories_index(request: Request) -> Response:
        items = read(adv_mod.list_advisories)
        return svc.templates.render(request, "advisories.html", {
            "items": items, "models": svc.models})

    @router.get("/security/advisories/{advisory_id}", dependencies=public,
                include_in_schema=False)
    def advisory_page(request: Request, advisory_id: str) -> Response:
        def load(session: Any) -> Any:
            adv = adv_mod.get_advisory(session, advisory_id)
            return adv, adv_mod.document_of(adv)
        try:
            adv, doc = read(load)
        except NotFoundError:
            return not_found_html(request, "advisory")
        vuln = doc["vulnerabilities"][0]
        summaries = [s for s in read(adv_mod.list_advisories) if s.id == adv.id]
        return svc.templates.render(request, "advisory.html", {
            "adv": adv, "summary": summaries[0] if summaries else None, "doc": doc,
            "vuln": vuln, "models": svc.models,
            "json_path": adv_mod.advisory_json_path(adv.id, adv.initial_release_date),
        })

    # --- products -----------------------------------------------------------------------
    @router.get("/products", dependencies=public, include_in_schema=False)
    def products(request: Request) -> Response:
        return svc.templates.render(request, "products.html", {
            "models": svc.models, "descriptions": svc.model_descriptions})

    @router.get("/products/{model}", dependencies=public, include_in_schema=False)
    def product_page(request: Request, model: str) -> Response:
        if model not in svc.models:
            return not_found_html(request, "product")
        items = read(lambda s: adv_mod.advisories_for_model(s, model))
        return svc.templates.render(request, "product.html", {
            "model": model, "name": svc.models[model],
            "description": svc.model_descriptions.get(model, ""), "advisories": items,
            "cfg": cfg,
            "support_period": svc.support_period(model) if svc.support_period else None,
        })

    # --- CSAF distribution ----------------------------------------------------------------
    def all_advisories(session: Any) -> list[tuple[str, str, dt.datetime, str]]:
        rows = session.execute(sa.select(
            Advisory.id, Advisory.initial_release_date, Advisory.current_release_date,
            Advisory.document)).all()
        return [(csaf.advisory_path(i, init), i, cur, doc) for i, init, cur, doc in rows]

    @router.get("/.well-known/csaf/provider-metadata.json", dependencies=public,
                tags=["disclosure"])
    def provider_metadata() -> Response:
        """CSAF provider metadata (role csaf_provider, directory distribution)."""
        latest = read(lambda s: s.scalar(sa.select(sa.func.max(Advisory.current_release_date))))
        doc = csaf.provider_metadata(
            publisher=adv_mod.publisher_of(cfg), canonical_url=cfg.provider_metadata_url,
            directory_url=cfg.url("/.well-known/csaf/white/"),
            last_updated=latest or dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
            list_on_aggregators=cfg.csaf_list_on_aggregators,
            mirror_on_aggregators=cfg.csaf_mirror_on_aggregators)
        return Response(csaf.serialize(doc), media_type="application/json")

    @router.get("/.well-known/csaf/white/", dependencies=public, include_in_schema=False)
    def csaf_root(request: Request) -> Response:
        years = sorted({p.split("/")[0] for p, *_ in read(all_advisories)}, reverse=True)
        entries = [("index.txt", "index.txt"), ("changes.csv", "changes.csv")]
        entries += [(f"{y}/", f"{y}/") for y in years]
        return svc.templates.render(request, "csaf_listing.html", {
            "title": "/.well-known/csaf/white/", "entries": entries})

    @router.get("/.well-known/csaf/white/index.txt", dependencies=public,
                include_in_schema=False)
    def csaf_index() -> Response:
        return PlainTextResponse(csaf.index_txt([p for p, *_ in read(all_advisories)]),
                                 media_type="text/plain; charset=utf-8")

    @router.get("/.well-known/csaf/white/changes.csv", dependencies=public,
                include_in_schema=False)
    def csaf_changes() -> Response:
        return PlainTextResponse(
            csaf.changes_csv([(p, cur) for p, _, cur, _ in read(all_advisories)]),
            media_type="text/csv; charset=utf-8")

    @router.get("/.well-known/csaf/white/{year}/", dependencies=public,
                include_in_schema=False)
    def csaf_year(request: Request, year: str) -> Response:
        names = sorted(p.split("/", 1)[1] for p, *_ in read(all_advisories)
                       if p.startswith(f"{year}/"))
        if not names:
            return not_found_html(request, "directory")
        entries = []
        for n in names:
            entries += [(n, n), (n + ".sha256", n + ".sha256"), (n + ".sha512", n + ".sha512")]
        return svc.templates.render(request, "csaf_listing.html", {
            "title": f"/.well-known/csaf/white/{year}/", "entries": entries})

    @router.get("/.well-known/csaf/white/{year}/{filename}", dependencies=public,
                include_in_schema=False)
    def csaf_file(year: str, filename: str) -> Response:
        base, _, ext = filename.partition(".json")
        for path, _, _, doc in read(all_advisories):
            if path == f"{year}/{base}.json":
                data = doc.encode("utf-8")
                if ext == "":
                    return Response(data, media_type="application/json")
                if ext in (".sha256", ".sha512"):
                    h = hashlib.new(ext[1:], data).hexdigest()
                    return PlainTextResponse(f"{h}  {base}.json\n",
                                             media_type="text/plain; charset=utf-8")
        return PlainTextResponse("not found\n", status_code=404)

    return router
