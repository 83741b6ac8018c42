"""Operator API routes of the updates capability (included under ``/api/v1``).

Every route declares its permission (:func:`hearth.service.api.require`); the one public
route is the machine-readable support-period document, listed in
:data:`hearth.service.api.PUBLIC_PATHS`::

    GET  /support-periods                      public: every model's support period (JSON)
    PUT  /support-periods/{model}              support:manage   {"end_date": "YYYY-MM-DD"}
    GET  /releases                             rollouts:read
    GET  /updates/repository                   rollouts:read    role expiries, root version
    GET  /rollouts, /rollouts/{id}             rollouts:read    progress and failures
    POST /rollouts                             rollouts:manage  start one
    POST /rollouts/{id}/{pause,resume,advance,cancel}           rollouts:manage
    GET  /units/{id}/update                    rollouts:read    version, preference, notices
    PUT  /units/{id}/update-preference         rollouts:manage  automatic or a window
    GET  /integrity-alerts                     rollouts:read    open alerts
    POST /units/{id}/integrity/acknowledge     alerts:acknowledge  lifts the quarantine
"""

# No `from __future__ import annotations`: FastAPI must resolve the local aliases below.

import dataclasses
import datetime as dt
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth.errors import NotFoundError, ValidationError
from hearth.service import fleet
from hearth.service.api import require
from hearth.service.auth import Permission, Principal
from hearth.service.db import begin_write
from hearth.service.updates import rollouts
from hearth.service.updates.models import ReleaseRow, UnitUpdateState
from hearth.service.updates.service import UpdateService
from hearth.updates.bundle import parse_version
from hearth.updates.support import support_document

__all__ = ["create_api_router"]

DeviceIdPath = Annotated[str, Path(max_length=64)]
RolloutIdPath = Annotated[str, Path(max_length=16)]


class RolloutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    model: Annotated[str, Field(max_length=32)] | None = None
    version: Annotated[str, Field(max_length=20)] | None = None
    stages: Annotated[list[int], Field(min_length=1, max_length=10)] = Field(
        default_factory=lambda: list(rollouts.DEFAULT_STAGES))
    failure_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    min_sample: Annotated[int, Field(ge=1, le=100_000)] = 5
    auto_advance: bool = False


class SupportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    end_date: dt.date


class PreferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    automatic: bool
    window_start: Annotated[str, Field(max_length=5)] | None = None
    window_end: Annotated[str, Field(max_length=5)] | None = None
    tz: Annotated[str, Field(max_length=64)] = "UTC"


def _principal(request: Request) -> str:
    p = request.scope.get("state", {}).get("principal")
    return p.name if isinstance(p, Principal) else "operator"


def create_api_router(service: UpdateService) -> APIRouter:
    """The updates routes for :func:`hearth.service.api.create_app` (``routers=``)."""
    router = APIRouter()
    sessions = service.sessions
    read = [require(Permission.ROLLOUTS_READ)]
    manage = [require(Permission.ROLLOUTS_MANAGE)]

    @router.get("/support-periods", tags=["updates"])
    def support_periods() -> JSONResponse:
        """Public: every model's defined support period (UK PSTI), machine-readable."""
        with sessions() as s:
            periods = rollouts.support_periods(s)
        return JSONResponse(support_document(periods, now=service.now()),
                            headers={"Cache-Control": "public, max-age=300"})

    @router.put("/support-periods/{model}", tags=["updates"],
                dependencies=[require(Permission.SUPPORT_MANAGE)])
    def set_support_period(model: Annotated[str, Path(max_length=32)],
                           body: SupportIn) -> dict[str, Any]:
        with sessions.begin() as s:
            begin_write(s)
            period = rollouts.define_support_period(s, model, body.end_date, now=service.now())
        return period.to_json(service.now())

    @router.get("/releases", tags=["updates"], dependencies=read)
    def releases() -> dict[str, Any]:
        with sessions() as s:
            rows = list(s.scalars(sa.select(ReleaseRow)))
        rows.sort(key=lambda r: (r.model, parse_version(r.version)))
        return {"releases": [{
            "target_name": r.target_name, "model": r.model, "version": r.version,
            "min_from_version": r.min_from_version, "length": r.length, "sha256": r.sha256,
            "published_at": r.published_at} for r in rows]}

    @router.get("/updates/repository", tags=["updates"], dependencies=read)
    def repository() -> dict[str, Any]:
        repo = service.repository
        if repo is None:
            raise NotFoundError("no update repository yet (hearth release init)")
        return {"root_version": repo.root_version(), "expires": repo.expiry(),
                "next_refresh": repo.next_refresh()}

    @router.get("/rollouts", tags=["updates"], dependencies=read)
    def list_all(request: Request) -> dict[str, Any]:
        with sessions() as s:
            return {"rollouts": [rollouts.rollout_progress(s, r)
                                 for r in rollouts.list_rollouts(s)]}

    @router.post("/rollouts", tags=["updates"], status_code=201, dependencies=manage)
    def create(request: Request, body: RolloutIn) -> dict[str, Any]:
        target = body.target_name
        if target is None:
            if body.model is None or body.version is None:
                raise ValidationError("invalid_schema", "give target_name, or model and version")
            target = f"{body.model}/{body.model}-{body.version}.tar"
        service.tick()  # pick up a release published a moment ago
        with sessions.begin() as s:
            begin_write(s)
            rollout = rollouts.create_rollout(
                s, target_name=target, stages=body.stages,
                failure_threshold=body.failure_threshold, min_sample=body.min_sample,
                auto_advance=body.auto_advance, created_by=_principal(request),
                now=service.now())
            return rollouts.rollout_progress(s, rollout)

    @router.get("/rollouts/{rollout_id}", tags=["updates"], dependencies=read)
    def get_one(rollout_id: RolloutIdPath) -> dict[str, Any]:
        with sessions() as s:
            return rollouts.rollout_progress(s, rollouts.get_rollout(s, rollout_id))

    @router.post("/rollouts/{rollout_id}/{action}", tags=["updates"], dependencies=manage)
    def act(request: Request, rollout_id: RolloutIdPath,
            action: Literal["pause", "resume", "advance", "cancel"]) -> dict[str, Any]:
        with sessions.begin() as s:
            begin_write(s)
            by, now = _principal(request), service.now()
            rollout = (rollouts.advance_rollout(s, rollout_id, by=by, now=now)
                       if action == "advance"
                       else rollouts.set_rollout_status(s, rollout_id, action, by=by, now=now))
            return rollouts.rollout_progress(s, rollout)

    @router.get("/units/{device_id}/update", tags=["updates"], dependencies=read)
    def unit_update(device_id: DeviceIdPath) -> dict[str, Any]:
        with sessions() as s:
            view = rollouts.unit_update_view(s, device_id, now=service.now())
            state = s.get(UnitUpdateState, device_id)
            extra = {"running": state.running, "mode": state.mode,
                     "last_check_at": state.last_check_at} if state is not None else {}
        return {**dataclasses.asdict(view), **extra}

    @router.put("/units/{device_id}/update-preference", tags=["updates"], dependencies=manage)
    def set_preference(device_id: DeviceIdPath, body: PreferenceIn) -> dict[str, Any]:
        with sessions.begin() as s:
            begin_write(s)
            st = rollouts.set_preference(s, device_id, automatic=body.automatic,
                                         window_start=body.window_start,
                                         window_end=body.window_end, tz=body.tz)
            return {"device_id": device_id, "automatic": st.automatic,
                    "window": rollouts.window_text(st)}

    @router.get("/integrity-alerts", tags=["updates"], dependencies=read)
    def alerts() -> dict[str, Any]:
        with sessions() as s:
            return {"alerts": [{
                "id": a.id, "device_id": a.device_id, "detail": a.detail,
                "first_seen_at": a.first_seen_at, "last_seen_at": a.last_seen_at,
                "count": a.count} for a in rollouts.open_alerts(s)]}

    @router.post("/units/{device_id}/integrity/acknowledge", tags=["updates"],
                 dependencies=[require(Permission.ALERTS_ACKNOWLEDGE)])
    def acknowledge(request: Request, device_id: DeviceIdPath) -> dict[str, Any]:
        """Record that an operator acted, and tell the unit (``acknowledge_alert``): it leaves
        its quarantine. A unit in safe mode answers ``failed`` (it needs a repair)."""
        with sessions() as s:
            fleet.get_unit(s, device_id)
        commands = request.app.state.commands
        command_id = commands.send(request.app.state.session_factory, device_id,
                                   "acknowledge_alert", {}, system=True)
        with sessions.begin() as s:
            begin_write(s)
            n = rollouts.acknowledge_alerts(s, device_id, by=_principal(request),
                                            now=service.now())
        return {"device_id": device_id, "acknowledged": n, "command_id": command_id}

    return router
