"""The operator HTTP API (FastAPI) under ``/api/v1``.

Security model, outermost layer first::

    security headers   every response: HSTS, nosniff, no-referrer, DENY framing; API and
                       health responses also ``Cache-Control: no-store`` and a CSP of 'none'.
                       Also the last-resort error handler (a JSON 500, nothing leaked).
    authentication     every path except :data:`PUBLIC_PATHS` needs ``Authorization: Bearer
                       hth_...`` (an operator token, :mod:`hearth.service.auth`); checked
                       before the body is read, so an anonymous client cannot make the
                       service parse anything. Missing, unknown or revoked token -> 401.
    body limit         request bodies above ``settings.api_max_body_bytes`` -> 413.
    routes             each declares its :class:`Permission` with ``require(...)``; a token
                       without it gets 403. :func:`create_app` refuses to build an app
                       with a route that declares none.

Errors are always JSON ``{"error": <stable reason code>, "detail": "..."}``; 401 responses
carry ``WWW-Authenticate: Bearer``. Unknown (or malformed) unit and command ids are 404.
The app is served over HTTPS by uvicorn (the caller passes the certificate and key).

Example::

    app = create_app(settings, session_factory=Session,
                     command_publisher=publisher, revoker=broker)
"""

# No `from __future__ import annotations`: FastAPI must resolve the local aliases below.

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Protocol

import anyio
import sqlalchemy as sa
from cryptography import x509
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hearth import __version__, protocol
from hearth.errors import BrokerError, HearthError, NotFoundError, PKIError, ValidationError
from hearth.protocol import Reason
from hearth.service import fleet, ingest
from hearth.service.auth import Permission, Principal, verify_token
from hearth.service.broker_log import REASONS as BROKER_REFUSAL_REASONS
from hearth.service.commands import CommandPublisher, CommandService
from hearth.service.config import Settings
from hearth.service.db import StorageError, begin_write
from hearth.service.models import (
    BrokerRefusal,
    CommandRow,
    EventRow,
    IngestCounter,
    QuarantineRow,
    TelemetryRow,
    Unit,
    UnitStatus,
)
from hearth.service.web.permissions import find_marker

__all__ = [
    "API_PREFIX",
    "PUBLIC_PATHS",
    "Revoker",
    "create_app",
    "iter_routes",
    "require",
    "route_permission",
]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
PUBLIC_PATHS = frozenset({"/healthz", f"{API_PREFIX}/healthz", f"{API_PREFIX}/openapi.json",
                          f"{API_PREFIX}/support-periods"})
"""The only paths answered without a token."""

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Revoker(Protocol):
    """Cuts a unit off at the broker (implemented by ``hearth.service.broker.Broker``).

    Raises :class:`HearthError` (``BrokerError``, ``PKIError``) if it could not.
    """

    def revoke(self, device_id: str, cert: x509.Certificate) -> None: ...


# --- errors ---------------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status_code: int, error: str, detail: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.headers = headers


def _error(status_code: int, error: str, detail: str = "",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code,
                        headers=headers)


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
}
_VALIDATION_STATUS = {Reason.REVOKED.value: status.HTTP_409_CONFLICT}


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_r: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _ApiError)
        return _error(exc.status_code, exc.error, exc.detail, exc.headers)

    async def validation(_r: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError)
        code = _VALIDATION_STATUS.get(exc.reason, status.HTTP_422_UNPROCESSABLE_CONTENT)
        return _error(code, exc.reason, exc.detail)

    async def not_found(_r: Request, exc: Exception) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    async def broker(_r: Request, exc: Exception) -> JSONResponse:
        log.warning("api: broker unavailable: %s", exc)
        return _error(503, "broker_unavailable", "the message broker did not take the request")

    async def storage(_r: Request, exc: Exception) -> JSONResponse:
        log.warning("api: database error: %s", type(exc).__name__)
        return _error(503, "database_unavailable", "the database is unavailable; retry")

    async def hearth_error(_r: Request, exc: Exception) -> JSONResponse:
        log.error("api: unhandled %s", type(exc).__name__)
        return _error(500, "internal_error", "")

    async def request_validation(_r: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        msg = str(first.get("msg", "invalid request"))[:200]
        return _error(422, "invalid_request", f"{loc}: {msg}")

    async def http_error(_r: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else ""
        return _error(exc.status_code, code, detail, dict(exc.headers or {}) or None)

    app.add_exception_handler(_ApiError, api_error)
    app.add_exception_handler(ValidationError, validation)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(BrokerError, broker)
    app.add_exception_handler(PKIError, broker)
    app.add_exception_handler(StorageError, storage)
    app.add_exception_handler(sa.exc.SQLAlchemyError, storage)
    app.add_exception_handler(HearthError, hearth_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_error)


# --- middleware (pure ASGI) -----------------------------------------------------------------


async def _send_json(send: Send, status_code: int, body: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status_code, "headers": raw})
    await send({"type": "http.response.body", "body": data})


_SECURITY_HEADERS = (
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_API_HEADERS = (
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)


class _SecurityHeaders:
    """Adds security headers to every response; turns any escaped exception into a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        is_api = path.startswith(API_PREFIX) or path == "/healthz"
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = _SECURITY_HEADERS + (_API_HEADERS if is_api else ())
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("api: unhandled error")
            if not started:
                await _send_json(send_with_headers, 500, {"error": "internal_error",
                                                          "detail": ""})


class _Authenticate:
    """Resolves the bearer token to a :class:`Principal` (``scope['state']['principal']``)
    before anything else runs; answers 401 itself for every non-public path without one."""

    def __init__(self, app: ASGIApp, session_factory: sessionmaker[Session]) -> None:
        self.app = app
        self._sf = session_factory

    def _verify(self, token: str) -> Principal | None:
        with self._sf() as session:
            return verify_token(session, token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        token = None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
                break
        principal = None
        if token is not None:
            try:
                principal = await anyio.to_thread.run_sync(self._verify, token)
            except sa.exc.SQLAlchemyError:
                log.warning("api: token check failed: database unavailable")
                await _send_json(send, 503, {"error": "database_unavailable",
                                             "detail": "retry later"})
                return
        if principal is None:
            await _send_json(send, 401, {"error": "unauthorized",
                                         "detail": "a valid bearer token is required"},
                             {"WWW-Authenticate": "Bearer"})
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class _BodyLimit:
    """Buffers request bodies up to ``limit`` bytes; anything larger gets 413 unread."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"error": "payload_too_large",
                     "detail": f"request bodies are limited to {self.limit} bytes"}
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"error": "bad_request",
                                                 "detail": "invalid Content-Length"})
                    return
                if declared > self.limit:
                    await _send_json(send, 413, too_large)
                    return
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_json(send, 413, too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: Message | None = {
            "type": "http.request", "body": b"".join(chunks), "more_body": False,
        }

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)


# --- permissions ----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="Operator API token (hth_...)")


class _Require:
    """Dependency that admits a request only if its token has ``permission``."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(
        self,
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = request.scope.get("state", {}).get("principal")
        if not isinstance(principal, Principal):
            raise _ApiError(401, "unauthorized", "a valid bearer token is required",
                            {"WWW-Authenticate": "Bearer"})
        if not principal.may(self.permission):
            raise _ApiError(403, "forbidden", f"this token lacks {self.permission.value}")
        return principal


def require(permission: Permission) -> Any:
    """``Depends`` marker for a route: the caller's token must have ``permission``."""
    return Depends(_Require(permission))


def route_permission(route: BaseRoute) -> Permission | None:
    """The permission a route declares itself (via :func:`require`), or ``None``."""
    marker = find_marker(route, _Require)
    return marker.permission if marker is not None else None


def iter_routes(
    routes: Iterable[BaseRoute], *, prefix: str = "", inherited: Permission | None = None
) -> Iterator[tuple[str, BaseRoute, Permission | None]]:
    """Every endpoint as ``(path, route, permission)``, descending into included routers
    (newer FastAPI keeps them as lazy ``_IncludedRouter`` objects; a permission given to
    ``include_router(dependencies=[require(...)])`` is inherited)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            context = getattr(route, "include_context", None)
            perm = inherited
            for dep in getattr(context, "dependencies", None) or ():
                if isinstance(getattr(dep, "dependency", None), _Require):
                    perm = dep.dependency.permission
            yield from iter_routes(original.routes, inherited=perm,
                                   prefix=prefix + (getattr(context, "prefix", "") or ""))
            continue
        sub = getattr(route, "routes", None)
        if sub is not None and not isinstance(route, APIRoute):  # a Mount
            yield from iter_routes(sub, inherited=inherited,
                                   prefix=prefix + getattr(route, "path", ""))
            continue
        yield prefix + getattr(route, "path", ""), route, route_permission(route) or inherited


def _check_routes(app: FastAPI) -> None:
    for path, _route, permission in iter_routes(app.routes):
        if path not in PUBLIC_PATHS and permission is None:
            raise RuntimeError(f"route {path!r} declares no permission (use require(...))")


# --- schemas --------------------------------------------------------------------------------

DeviceIdPath = Annotated[str, Path(max_length=64, description="32 hex digits")]


class ErrorOut(BaseModel):
    error: str
    detail: str = ""


class UnitOut(BaseModel):
    device_id: str
    model: str
    status: str
    cert_serial: str
    imported_at: dt.datetime
    revoked_at: dt.datetime | None
    last_seen_at: dt.datetime | None


class UnitDetailOut(UnitOut):
    certificate_pem: str
    latest_seq: int | None


class UnitPage(BaseModel):
    units: list[UnitOut]
    next: str | None = Field(description="pass as ?after= for the next page")


class StateOut(BaseModel):
    device_id: str
    model: str
    status: str
    seq: int | None
    ts: dt.datetime | None
    last_seen_at: dt.datetime | None
    state: dict[str, bool | float | str]


class TelemetryOut(BaseModel):
    seq: int
    ts: dt.datetime
    received_at: dt.datetime
    readings: dict[str, bool | float | str]


class TelemetryPage(BaseModel):
    items: list[TelemetryOut]
    next_before_seq: int | None


class EventOut(BaseModel):
    seq: int
    ts: dt.datetime
    received_at: dt.datetime
    kind: str
    detail: str


class EventPage(BaseModel):
    items: list[EventOut]
    next_before_seq: int | None


class QuarantineOut(BaseModel):
    id: int
    device_id: str | None
    topic: str
    reason: str
    detail: str
    payload_size: int
    payload_excerpt_b64: str
    received_at: dt.datetime


class QuarantinePage(BaseModel):
    items: list[QuarantineOut]
    next_before_id: int | None


class UnitCount(BaseModel):
    device_id: str = Field(description="'' for messages not tied to a registered unit")
    reason: str
    count: int


class CountsOut(BaseModel):
    by_reason: dict[str, int]
    by_unit: list[UnitCount]


class RefusalCount(BaseModel):
    reason: str
    meaning: str
    count: int
    last_at: dt.datetime | None


class BrokerRefusalsOut(BaseModel):
    """Connections the broker refused since the service first ran, per reason."""

    total: int
    by_reason: list[RefusalCount]


Param = StrictBool | StrictInt | StrictFloat | Annotated[StrictStr, Field(max_length=32)]


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=32)]
    params: Annotated[
        dict[Annotated[str, Field(max_length=32)], Param], Field(max_length=protocol.MAX_READINGS)
    ] = Field(default_factory=dict)
    ttl_seconds: Annotated[int, Field(ge=1)] | None = None


class CommandAccepted(BaseModel):
    command_id: str
    status: str


class CommandOut(BaseModel):
    command_id: str
    device_id: str
    name: str
    params: dict[str, Any]
    issued_at: dt.datetime
    expires_at: dt.datetime
    status: str
    result: dict[str, Any] | None
    completed_at: dt.datetime | None


class RevokeOut(BaseModel):
    device_id: str
    status: str
    broker_revoked: bool


class HealthOut(BaseModel):
    status: str
    version: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 422: {"model": ErrorOut},
    503: {"model": ErrorOut},
}
_ERRORS_404 = {**_ERRORS, 404: {"model": ErrorOut}}


def _unit_out(unit: Unit) -> UnitOut:
    return UnitOut(device_id=unit.device_id, model=unit.model, status=unit.status,
                   cert_serial=unit.cert_serial, imported_at=unit.imported_at,
                   revoked_at=unit.revoked_at, last_seen_at=unit.last_seen_at)


# --- the app --------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    command_publisher: CommandPublisher,
    revoker: Revoker | None,
    routers: Iterable[APIRouter] = (),
) -> FastAPI:
    """Build the API app. ``revoker=None`` revokes in the database only (ingest then
    quarantines the unit's messages) and says so in the response (``broker_revoked``).

    Raises ``RuntimeError`` if a route lacks a permission (a programming error).
    """
    commands = CommandService(
        command_publisher, max_ttl=dt.timedelta(seconds=settings.command_max_ttl_seconds)
    )
    max_page = settings.api_max_page
    app = FastAPI(
        title="Hearth API",
        version=__version__,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.commands = commands

    def db() -> Iterator[Session]:
        with session_factory() as session:
            yield session

    Db = Annotated[Session, Depends(db)]
    Limit = Annotated[int, Query(ge=1, le=max_page)]

    def route(method: str, path: str, permission: Permission, *,
              responses: dict[int | str, dict[str, Any]] | None = None,
              **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register ``API_PREFIX + path``; a permission is required by construction."""
        return app.api_route(API_PREFIX + path, methods=[method],
                             dependencies=[require(permission)],
                             responses={**_ERRORS, **(responses or {})}, **kwargs)

    @route("GET", "/units", Permission.FLEET_READ, response_model=UnitPage)
    def list_units(
        session: Db,
        limit: Limit = 100,
        after: Annotated[str | None, Query(max_length=32)] = None,
        unit_status: Annotated[UnitStatus | None, Query(alias="status")] = None,
        model: Annotated[str | None, Query(max_length=32)] = None,
    ) -> UnitPage:
        units = fleet.list_units(session, limit=limit, after=after, status=unit_status,
                                 model=model)
        nxt = units[-1].device_id if len(units) == limit else None
        return UnitPage(units=[_unit_out(u) for u in units], next=nxt)

    @route("GET", "/units/{device_id}", Permission.FLEET_READ, response_model=UnitDetailOut,
           responses=_ERRORS_404)
    def get_unit(session: Db, device_id: DeviceIdPath) -> UnitDetailOut:
        unit = fleet.get_unit(session, device_id)
        return UnitDetailOut(**_unit_out(unit).model_dump(),
                             certificate_pem=unit.certificate_pem, latest_seq=unit.latest_seq)

    @route("GET", "/units/{device_id}/state", Permission.TELEMETRY_READ,
           response_model=StateOut, responses=_ERRORS_404)
    def get_state(session: Db, device_id: DeviceIdPath) -> StateOut:
        unit = fleet.get_unit(session, device_id)
        return StateOut(device_id=unit.device_id, model=unit.model, status=unit.status,
                        seq=unit.latest_seq, ts=unit.latest_ts, last_seen_at=unit.last_seen_at,
                        state=unit.latest_state or {})

    @route("GET", "/units/{device_id}/telemetry", Permission.TELEMETRY_READ,
           response_model=TelemetryPage, responses=_ERRORS_404)
    def get_telemetry(
        session: Db,
        device_id: DeviceIdPath,
        limit: Limit = 100,
        since: Annotated[AwareDatetime | None, Query(description="oldest ts to include")] = None,
        before_seq: Annotated[int | None, Query(ge=0, description="paging cursor")] = None,
    ) -> TelemetryPage:
        fleet.get_unit(session, device_id)
        stmt = (sa.select(TelemetryRow).where(TelemetryRow.device_id == device_id)
                .order_by(TelemetryRow.seq.desc()).limit(limit))
        if since is not None:
            stmt = stmt.where(TelemetryRow.ts >= since)
        if before_seq is not None:
            stmt = stmt.where(TelemetryRow.seq < before_seq)
        rows = list(session.scalars(stmt))
        return TelemetryPage(
            items=[TelemetryOut(seq=r.seq, ts=r.ts, received_at=r.received_at,
                                readings=r.readings) for r in rows],
            next_before_seq=rows[-1].seq if len(rows) == limit else None,
        )

    @route("GET", "/units/{device_id}/events", Permission.TELEMETRY_READ,
           response_model=EventPage, responses=_ERRORS_404)
    def get_events(
        session: Db,
        device_id: DeviceIdPath,
        limit: Limit = 100,
        since: Annotated[AwareDatetime | None, Query()] = None,
        before_seq: Annotated[int | None, Query(ge=0)] = None,
    ) -> EventPage:
        fleet.get_unit(session, device_id)
        stmt = (sa.select(EventRow).where(EventRow.device_id == device_id)
                .order_by(EventRow.seq.desc()).limit(limit))
        if since is not None:
            stmt = stmt.where(EventRow.ts >= since)
        if before_seq is not None:
            stmt = stmt.where(EventRow.seq < before_seq)
        rows = list(session.scalars(stmt))
        return EventPage(
            items=[EventOut(seq=r.seq, ts=r.ts, received_at=r.received_at, kind=r.kind,
                            detail=r.detail) for r in rows],
            next_before_seq=rows[-1].seq if len(rows) == limit else None,
        )

    @route("GET", "/quarantine", Permission.QUARANTINE_READ, response_model=QuarantinePage)
    def list_quarantine(
        session: Db,
        limit: Limit = 100,
        device_id: Annotated[str | None, Query(max_length=32)] = None,
        reason: Annotated[str | None, Query(max_length=32)] = None,
        before_id: Annotated[int | None, Query(ge=0)] = None,
    ) -> QuarantinePage:
        stmt = sa.select(QuarantineRow).order_by(QuarantineRow.id.desc()).limit(limit)
        if device_id is not None:
            stmt = stmt.where(QuarantineRow.device_id == device_id)
        if reason is not None:
            stmt = stmt.where(QuarantineRow.reason == reason)
        if before_id is not None:
            stmt = stmt.where(QuarantineRow.id < before_id)
        rows = list(session.scalars(stmt))
        return QuarantinePage(
            items=[QuarantineOut(id=r.id, device_id=r.device_id, topic=r.topic,
                                 reason=r.reason, detail=r.detail,
                                 payload_size=r.payload_size,
                                 payload_excerpt_b64=r.payload_excerpt,
                                 received_at=r.received_at) for r in rows],
            next_before_id=rows[-1].id if len(rows) == limit else None,
        )

    @route("GET", "/quarantine/counts", Permission.QUARANTINE_READ, response_model=CountsOut)
    def quarantine_counts(session: Db, limit: Limit = 100) -> CountsOut:
        by_reason = ingest.totals(session)
        refused = sa.not_(IngestCounter.reason.in_((ingest.ACCEPTED, ingest.DUPLICATE)))
        by_unit = [
            UnitCount(device_id=c.device_id, reason=c.reason, count=c.count)
            for c in session.scalars(
                sa.select(IngestCounter).where(refused)
                .order_by(IngestCounter.count.desc(), IngestCounter.device_id,
                          IngestCounter.reason).limit(limit)
            )
        ]
        return CountsOut(by_reason=by_reason, by_unit=by_unit)

    @route("GET", "/security/broker-refusals", Permission.QUARANTINE_READ,
           response_model=BrokerRefusalsOut)
    def broker_refusals(session: Db) -> BrokerRefusalsOut:
        """Every reason is listed, with 0 where nothing was refused for it."""
        rows = {r.reason: (r.count, r.last_at)
                for r in session.scalars(sa.select(BrokerRefusal))}
        items = [
            RefusalCount(reason=reason, meaning=meaning, count=count, last_at=last_at)
            for reason, meaning in BROKER_REFUSAL_REASONS.items()
            for count, last_at in [rows.get(reason, (0, None))]
        ]
        return BrokerRefusalsOut(total=sum(i.count for i in items), by_reason=items)

    @route("POST", "/units/{device_id}/commands", Permission.COMMANDS_SEND, status_code=202,
           response_model=CommandAccepted,
           responses={**_ERRORS_404, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}})
    def send_command(device_id: DeviceIdPath, body: CommandIn) -> CommandAccepted:
        ttl = dt.timedelta(seconds=body.ttl_seconds) if body.ttl_seconds is not None else None
        command_id = commands.send(session_factory, device_id, body.name, body.params, ttl)
        return CommandAccepted(command_id=command_id, status="sent")

    @route("GET", "/commands/{command_id}", Permission.COMMANDS_READ, response_model=CommandOut,
           responses=_ERRORS_404)
    def get_command(
        session: Db, command_id: Annotated[str, Path(max_length=64)]
    ) -> CommandOut:
        row: CommandRow = commands.get(session, command_id)
        return CommandOut(**CommandService.as_json(row))

    @route("POST", "/units/{device_id}/revoke", Permission.FLEET_REVOKE, response_model=RevokeOut,
           responses=_ERRORS_404)
    def revoke_unit(device_id: DeviceIdPath) -> RevokeOut:
        with session_factory() as session:
            unit = fleet.get_unit(session, device_id)
            cert_pem = unit.certificate_pem
        if revoker is not None:
            # Broker first: if it fails the unit stays active in the database and the
            # operator retries; both steps are idempotent.
            revoker.revoke(device_id, x509.load_pem_x509_certificate(cert_pem.encode()))
        with session_factory.begin() as session:
            begin_write(session)
            fleet.mark_revoked(session, device_id)
        return RevokeOut(device_id=device_id, status=UnitStatus.REVOKED.value,
                         broker_revoked=revoker is not None)

    def health() -> JSONResponse:
        try:
            with session_factory() as session:
                session.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError:
            return JSONResponse({"status": "unavailable", "version": __version__},
                                status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    for path in ("/healthz", f"{API_PREFIX}/healthz"):
        app.add_api_route(path, health, methods=["GET"], response_model=HealthOut,
                          tags=["health"], include_in_schema=path != "/healthz")

    for router in routers:  # capabilities' own routes (updates), same rules: a permission each
        app.include_router(router, prefix=API_PREFIX)
    _install_error_handlers(app)
    # add_middleware wraps: the last added runs first.
    app.add_middleware(_BodyLimit, limit=settings.api_max_body_bytes)
    app.add_middleware(_Authenticate, session_factory=session_factory)
    app.add_middleware(_SecurityHeaders)
    _check_routes(app)
    return app
