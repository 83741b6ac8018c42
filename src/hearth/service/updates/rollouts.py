"""Releases, rollouts in cohorts, outcomes, preferences, support periods and alerts.

This module holds the update decisions of the service; it does no network I/O. Every
function takes a :class:`~sqlalchemy.orm.Session` (the caller commits) and an explicit
``now``.

Cohorts
    A unit's cohort position is a stable hash of its device id (:func:`cohort_bucket`,
    0..9999). A rollout with stages ``[1, 10, 50, 100]`` at stage ``i`` includes the units
    whose bucket is below ``stages[i] * 100``: the same units stay in as the rollout widens,
    and every rollout uses the same order (the first 1 % are a stable canary group).

Halting
    Each outcome a unit reports (``update_installed``, ``update_failed``,
    ``update_rolled_back``) is recorded against the stage at which the unit was offered the
    release. When a stage has at least ``min_sample`` outcomes and the share of failures
    (failed or rolled back) is above ``failure_threshold``, the rollout halts by itself:
    no unit is offered the release any more until an operator resumes or cancels it.

Offline units
    Nothing is pushed: a unit asks on every connect (and periodically), so a unit that was
    offline while its cohort was reached gets the release when it comes back.

Preferences
    Automatic updates are on by default. An owner may instead choose a maintenance window
    (local start and end time, an IANA time zone): the unit is then offered its release only
    inside the window. The unit still learns that an update is *available* at any time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError, ValidationError
from hearth.protocol import MODELS
from hearth.service.models import EventRow, Unit, UnitStatus
from hearth.service.updates.models import (
    EventCursor,
    IntegrityAlert,
    ReleaseRow,
    Rollout,
    RolloutStatus,
    RolloutUnit,
    RolloutUnitStatus,
    SupportPeriodRow,
    UnitUpdateState,
)
from hearth.updates.bundle import parse_version
from hearth.updates.errors import UpdateError
from hearth.updates.support import SupportPeriod, SupportStatus

__all__ = [
    "DEFAULT_STAGES",
    "MAX_ATTEMPTS",
    "UPDATE_EVENTS",
    "Assignment",
    "UnitUpdateView",
    "acknowledge_alerts",
    "advance_rollout",
    "assignment_for",
    "check_is_routine",
    "cohort_bucket",
    "create_rollout",
    "define_support_period",
    "events_pending",
    "get_rollout",
    "in_window",
    "list_rollouts",
    "note_version",
    "open_alerts",
    "process_events",
    "record_check",
    "rollout_progress",
    "set_preference",
    "set_rollout_status",
    "support_period",
    "support_periods",
    "sync_releases",
    "unit_state",
    "unit_update_view",
    "window_text",
]

DEFAULT_STAGES = (1, 10, 50, 100)
MAX_ATTEMPTS = 3
"""A unit whose download or install failed is offered the release again this many times."""
UPDATE_EVENTS = ("update_installed", "update_failed", "update_rolled_back",
                 "update_available", "integrity_alert")
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){2}\Z")
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])\Z")
_OPEN = (RolloutStatus.ACTIVE.value, RolloutStatus.PAUSED.value, RolloutStatus.HALTED.value)
_FAILED = (RolloutUnitStatus.FAILED.value, RolloutUnitStatus.ROLLED_BACK.value)


def cohort_bucket(device_id: str) -> int:
    """The unit's stable position (0..9999) in every rollout's order."""
    digest = hashlib.sha256(b"hearth-rollout-cohort\x00" + device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def _in_stage(device_id: str, percent: int) -> bool:
    return cohort_bucket(device_id) < percent * 100


# --- releases ---------------------------------------------------------------------------------
def sync_releases(session: Session, releases: Iterable[Any], *, now: dt.datetime) -> int:
    """Mirror the repository's releases (``Repository.releases()``) into the table; returns
    how many were new."""
    known = set(session.scalars(sa.select(ReleaseRow.target_name)))
    added = 0
    for r in releases:
        if r.target_name in known:
            continue
        session.add(ReleaseRow(
            target_name=r.target_name, model=r.info.model, version=r.info.version,
            min_from_version=r.info.min_from_version, length=r.length, sha256=r.sha256,
            published_at=now))
        added += 1
    session.flush()
    return added


def _releases(session: Session, model: str) -> list[ReleaseRow]:
    rows = list(session.scalars(sa.select(ReleaseRow).where(ReleaseRow.model == model)))
    return sorted(rows, key=lambda r: parse_version(r.version))


# --- rollouts ---------------------------------------------------------------------------------
def _check_stages(stages: Sequence[int]) -> list[int]:
    if not isinstance(stages, Sequence) or not 1 <= len(stages) <= 10:
        raise ValidationError("invalid_schema", "stages: 1 to 10 percentages")
    out: list[int] = []
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100:
            raise ValidationError("out_of_range", "each stage is a percentage 1..100")
        if out and s <= out[-1]:
            raise ValidationError("out_of_range", "stages must increase")
        out.append(s)
    return out


def create_rollout(
    session: Session,
    *,
    target_name: str,
    stages: Sequence[int] = DEFAULT_STAGES,
    failure_threshold: float = 0.2,
    min_sample: int = 5,
    auto_advance: bool = False,
    created_by: str,
    now: dt.datetime,
) -> Rollout:
    """Start rolling out a published release. One open (active, paused or halted) rollout
    per model at a time. Raises :class:`NotFoundError`, :class:`ValidationError`."""
    release = session.get(ReleaseRow, target_name)
    if release is None:
        raise NotFoundError(f"release {target_name!r} is not published")
    stages = _check_stages(stages)
    if not 0.0 <= failure_threshold < 1.0:
        raise ValidationError("out_of_range", "failure_threshold must be in [0, 1)")
    if not 1 <= min_sample <= 100_000:
        raise ValidationError("out_of_range", "min_sample must be 1..100000")
    open_one = session.scalar(sa.select(Rollout.id).where(
        Rollout.model == release.model, Rollout.status.in_(_OPEN)))
    if open_one is not None:
        raise ValidationError("conflict", f"rollout {open_one} of {release.model} is still open;"
                              " cancel it first")
    rollout = Rollout(
        id=secrets.token_hex(8), target_name=target_name, model=release.model,
        version=release.version, stages=stages, stage=0, status=RolloutStatus.ACTIVE.value,
        failure_threshold=float(failure_threshold), min_sample=min_sample,
        auto_advance=auto_advance, created_at=now, updated_at=now,
        created_by=created_by[:64], status_reason="created")
    session.add(rollout)
    session.flush()
    return rollout


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    row = session.get(Rollout, rollout_id) if isinstance(rollout_id, str) else None
    if row is None:
        raise NotFoundError("no such rollout")
    return row


def list_rollouts(session: Session, *, limit: int = 100) -> list[Rollout]:
    return list(session.scalars(
        sa.select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id).limit(limit)))


_TRANSITIONS = {
    "pause": ({RolloutStatus.ACTIVE}, RolloutStatus.PAUSED),
    "resume": ({RolloutStatus.PAUSED, RolloutStatus.HALTED}, RolloutStatus.ACTIVE),
    "cancel": ({RolloutStatus.ACTIVE, RolloutStatus.PAUSED, RolloutStatus.HALTED},
               RolloutStatus.CANCELLED),
}


def set_rollout_status(
    session: Session, rollout_id: str, action: str, *, by: str, now: dt.datetime
) -> Rollout:
    """``pause``, ``resume`` (also a halted rollout) or ``cancel``. Raises
    :class:`ValidationError` (``invalid_transition``) from a state that does not allow it."""
    rollout = get_rollout(session, rollout_id)
    if action not in _TRANSITIONS:
        raise ValidationError("invalid_schema", "action is pause, resume or cancel")
    allowed, target = _TRANSITIONS[action]
    if RolloutStatus(rollout.status) not in allowed:
        raise ValidationError("invalid_transition", f"cannot {action} a {rollout.status} rollout")
    rollout.status = target.value
    rollout.status_reason = f"{action} by {by}"[:256]
    rollout.updated_at = now
    session.flush()
    return rollout


def advance_rollout(session: Session, rollout_id: str, *, by: str, now: dt.datetime) -> Rollout:
    """Widen an active rollout to its next stage."""
    rollout = get_rollout(session, rollout_id)
    if rollout.status != RolloutStatus.ACTIVE.value:
        raise ValidationError("invalid_transition", f"cannot advance a {rollout.status} rollout")
    if rollout.stage >= len(rollout.stages) - 1:
        raise ValidationError("invalid_transition", "the rollout is at its last stage")
    rollout.stage += 1
    rollout.status_reason = f"advanced to {rollout.stages[rollout.stage]} % by {by}"[:256]
    rollout.updated_at = now
    session.flush()
    return rollout


def _stage_counts(session: Session, rollout_id: str) -> dict[int, dict[str, int]]:
    rows = session.execute(
        sa.select(RolloutUnit.stage, RolloutUnit.status, sa.func.count())
        .where(RolloutUnit.rollout_id == rollout_id)
        .group_by(RolloutUnit.stage, RolloutUnit.status))
    out: dict[int, dict[str, int]] = {}
    for stage, status, n in rows:
        out.setdefault(int(stage), {s.value: 0 for s in RolloutUnitStatus})[status] = int(n)
    return out


def _evaluate(session: Session, rollout: Rollout, stage: int, now: dt.datetime) -> None:
    """Halt the rollout if ``stage``'s failure rate crossed the threshold; advance it (when
    ``auto_advance``) if its current stage proved healthy; complete it when every unit of
    the model runs the release."""
    counts = _stage_counts(session, rollout.id).get(stage, {})
    failures = sum(counts.get(s, 0) for s in _FAILED)
    done = failures + counts.get(RolloutUnitStatus.INSTALLED.value, 0)
    if rollout.status == RolloutStatus.ACTIVE.value and done >= rollout.min_sample:
        rate = failures / done
        if rate > rollout.failure_threshold:
            rollout.status = RolloutStatus.HALTED.value
            rollout.status_reason = (f"halted: {failures} of {done} units at "
                                     f"{rollout.stages[stage]} % failed ({rate:.0%} > "
                                     f"{rollout.failure_threshold:.0%})")
            rollout.updated_at = now
            return
        if (rollout.auto_advance and stage == rollout.stage
                and rollout.stage < len(rollout.stages) - 1):
            rollout.stage += 1
            rollout.status_reason = (f"advanced to {rollout.stages[rollout.stage]} %: "
                                     f"{done - failures} of {done} succeeded")
            rollout.updated_at = now
    if (rollout.status == RolloutStatus.ACTIVE.value and rollout.stages[rollout.stage] == 100
            and rollout.stage == len(rollout.stages) - 1):
        behind = session.scalar(
            sa.select(sa.func.count()).select_from(Unit)
            .outerjoin(UnitUpdateState, UnitUpdateState.device_id == Unit.device_id)
            .where(Unit.model == rollout.model, Unit.status == UnitStatus.ACTIVE.value,
                   sa.or_(UnitUpdateState.version.is_(None),
                          UnitUpdateState.version != rollout.version)))
        if not behind:
            rollout.status = RolloutStatus.COMPLETED.value
            rollout.status_reason = "every unit runs the release"
            rollout.updated_at = now


def rollout_progress(session: Session, rollout: Rollout) -> dict[str, Any]:
    """Per stage: offered, installed, failed, rolled back; overall: the model's units and
    how many run the release."""
    counts = _stage_counts(session, rollout.id)
    stages = []
    for i, pct in enumerate(rollout.stages):
        c = counts.get(i, {s.value: 0 for s in RolloutUnitStatus})
        failures = sum(c.get(s, 0) for s in _FAILED)
        done = failures + c.get(RolloutUnitStatus.INSTALLED.value, 0)
        stages.append({"index": i, "percent": pct, "reached": i <= rollout.stage,
                       **c, "assigned": sum(c.values()),
                       "failure_rate": round(failures / done, 4) if done else None})
    units = int(session.scalar(sa.select(sa.func.count()).select_from(Unit).where(
        Unit.model == rollout.model, Unit.status == UnitStatus.ACTIVE.value)) or 0)
    updated = int(session.scalar(
        sa.select(sa.func.count()).select_from(UnitUpdateState).join(
            Unit, Unit.device_id == UnitUpdateState.device_id)
        .where(Unit.model == rollout.model, UnitUpdateState.version == rollout.version)) or 0)
    recent = list(session.execute(
        sa.select(RolloutUnit.device_id, RolloutUnit.status, RolloutUnit.detail,
                  RolloutUnit.updated_at)
        .where(RolloutUnit.rollout_id == rollout.id, RolloutUnit.status.in_(_FAILED))
        .order_by(RolloutUnit.updated_at.desc()).limit(50)))
    return {
        "id": rollout.id, "target_name": rollout.target_name, "model": rollout.model,
        "version": rollout.version, "status": rollout.status,
        "status_reason": rollout.status_reason, "stage": rollout.stage,
        "stages": stages, "failure_threshold": rollout.failure_threshold,
        "min_sample": rollout.min_sample, "auto_advance": rollout.auto_advance,
        "created_at": rollout.created_at, "updated_at": rollout.updated_at,
        "created_by": rollout.created_by, "units": units, "units_updated": updated,
        "recent_failures": [{"device_id": d, "status": s, "detail": det, "at": at}
                            for d, s, det, at in recent],
    }


# --- unit state and preferences --------------------------------------------------------------
def unit_state(session: Session, device_id: str) -> UnitUpdateState:
    """The unit's update state row (created with the defaults on first use)."""
    row = session.get(UnitUpdateState, device_id)
    if row is None:
        row = UnitUpdateState(device_id=device_id, automatic=True, window_tz="UTC")
        session.add(row)
        session.flush()
    return row


def record_check(
    session: Session, device_id: str, *, version: str, running: str | None, mode: str,
    now: dt.datetime,
) -> UnitUpdateState:
    state = unit_state(session, device_id)
    state.version, state.running, state.mode, state.last_check_at = version, running, mode, now
    session.flush()
    return state


def note_version(session: Session, device_id: str, version: str, *, now: dt.datetime) -> None:
    """A unit reported (in its update check) that it runs ``version``: if a rollout offered
    it that version, that is a success even if its ``update_installed`` event is late."""
    member = session.scalar(
        sa.select(RolloutUnit).join(Rollout, Rollout.id == RolloutUnit.rollout_id)
        .where(RolloutUnit.device_id == device_id, Rollout.version == version,
               RolloutUnit.status != RolloutUnitStatus.INSTALLED.value)
        .order_by(Rollout.created_at.desc()).limit(1))
    if member is None:
        return
    member.status, member.detail, member.updated_at = (
        RolloutUnitStatus.INSTALLED.value, f"{version} reported by the unit", now)
    session.flush()
    rollout = session.get(Rollout, member.rollout_id)
    if rollout is not None:
        _evaluate(session, rollout, member.stage, now)


ROUTINE_CHECK = dt.timedelta(minutes=10)
"""A check that changes nothing is recorded at most this often."""


def check_is_routine(
    session: Session, unit: Unit, *, version: str, running: str | None, now: dt.datetime
) -> bool:
    """True when a unit's check needs no write: nothing changed since its last check (less
    than :data:`ROUTINE_CHECK` ago) and no rollout of its model is open."""
    state = session.get(UnitUpdateState, unit.device_id)
    if (state is None or state.last_check_at is None or now - state.last_check_at > ROUTINE_CHECK
            or (state.version, state.running, state.mode) != (version, running, "normal")):
        return False
    open_rollout = session.scalar(sa.select(Rollout.id).where(
        Rollout.model == unit.model, Rollout.status.in_(_OPEN)).limit(1))
    return open_rollout is None


def _minutes(value: str) -> int:
    m = _TIME_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValidationError("invalid_schema", "times are HH:MM (24-hour)")
    return int(m.group(1)) * 60 + int(m.group(2))


def set_preference(
    session: Session,
    device_id: str,
    *,
    automatic: bool,
    window_start: str | None = None,
    window_end: str | None = None,
    tz: str = "UTC",
) -> UnitUpdateState:
    """Automatic updates (``automatic=True``) or a maintenance window (``HH:MM`` to
    ``HH:MM`` local time in ``tz``, which may wrap past midnight). Raises
    :class:`ValidationError`; :class:`NotFoundError` for an unknown unit."""
    if session.get(Unit, device_id) is None:
        raise NotFoundError("no such unit")
    if not isinstance(tz, str) or len(tz) > 64:
        raise ValidationError("invalid_schema", "tz is an IANA time zone name")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError("invalid_schema", f"unknown time zone {tz[:64]!r}") from None
    state = unit_state(session, device_id)
    if automatic:
        state.automatic, state.window_start, state.window_end = True, None, None
    else:
        if window_start is None or window_end is None:
            raise ValidationError("invalid_schema", "a maintenance window needs start and end")
        start, end = _minutes(window_start), _minutes(window_end)
        if start == end:
            raise ValidationError("out_of_range", "the window must not be empty")
        state.automatic, state.window_start, state.window_end = False, start, end
    state.window_tz = tz
    session.flush()
    return state


def in_window(now: dt.datetime, start: int, end: int, tz: str) -> bool:
    """Whether ``now`` falls in the local window [start, end) (minutes; may wrap midnight)."""
    local = now.astimezone(ZoneInfo(tz))
    m = local.hour * 60 + local.minute
    return start <= m < end if start < end else (m >= start or m < end)


def _allowed_now(state: UnitUpdateState, now: dt.datetime) -> bool:
    if state.automatic or state.window_start is None or state.window_end is None:
        return True
    return in_window(now, state.window_start, state.window_end, state.window_tz)


# --- assignment -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Assignment:
    """What to tell a unit: the release to install now, and what is available to it."""

    target: str | None
    available: str | None
    rollout_id: str | None = None
    reason: str = ""


def _newer(a: str, b: str | None) -> bool:
    if b is None:
        return True
    try:
        return parse_version(a) > parse_version(b)
    except UpdateError:
        return False


def assignment_for(
    session: Session, unit: Unit, state: UnitUpdateState, *, now: dt.datetime
) -> Assignment:
    """The release ``unit`` should install now (recording the offer), if any."""
    rollout = session.scalar(sa.select(Rollout).where(
        Rollout.model == unit.model, Rollout.status == RolloutStatus.ACTIVE.value))
    if rollout is None:
        return Assignment(None, None, reason="no active rollout")
    if not _newer(rollout.version, state.version):
        return Assignment(None, None, rollout.id, "up to date")
    percent = rollout.stages[rollout.stage]
    if not _in_stage(unit.device_id, percent):
        return Assignment(None, None, rollout.id, f"not in the first {percent} %")
    release = session.get(ReleaseRow, rollout.target_name)
    if release is not None and state.version is not None and _newer(
            release.min_from_version, state.version):
        return Assignment(None, None, rollout.id, f"needs {release.min_from_version} first")
    member = session.get(RolloutUnit, (rollout.id, unit.device_id))
    if member is not None and (
        member.status in (RolloutUnitStatus.ROLLED_BACK.value, RolloutUnitStatus.INSTALLED.value)
        or (member.status == RolloutUnitStatus.FAILED.value and member.attempts >= MAX_ATTEMPTS)
    ):
        return Assignment(None, None, rollout.id, f"{member.status} here before")
    if not _allowed_now(state, now):
        return Assignment(None, rollout.version, rollout.id, "outside the maintenance window")
    if member is None:
        member = RolloutUnit(rollout_id=rollout.id, device_id=unit.device_id,
                             stage=rollout.stage, status=RolloutUnitStatus.OFFERED.value,
                             attempts=0, detail="", offered_at=now, updated_at=now)
        session.add(member)
    if member.status != RolloutUnitStatus.OFFERED.value or member.attempts == 0:
        member.attempts += 1
    member.status = RolloutUnitStatus.OFFERED.value
    member.updated_at = now
    session.flush()
    return Assignment(rollout.target_name, rollout.version, rollout.id, "offered")


# --- events from units (the monitor) ------------------------------------------------------------
def _record_outcome(
    session: Session, device_id: str, kind: str, detail: str, at: dt.datetime
) -> None:
    version = detail.split(" ", 1)[0]
    state = unit_state(session, device_id)
    state.last_event, state.last_event_detail, state.last_event_at = kind, detail[:256], at
    if kind == "update_available":
        return
    if kind == "update_installed" and _VERSION_RE.match(version):
        state.version = state.running = version
    if not _VERSION_RE.match(version):
        return
    member = session.scalar(
        sa.select(RolloutUnit).join(Rollout, Rollout.id == RolloutUnit.rollout_id)
        .where(RolloutUnit.device_id == device_id, Rollout.version == version)
        .order_by(Rollout.created_at.desc()).limit(1))
    if member is None:
        return
    member.status = {
        "update_installed": RolloutUnitStatus.INSTALLED,
        "update_failed": RolloutUnitStatus.FAILED,
        "update_rolled_back": RolloutUnitStatus.ROLLED_BACK,
    }[kind].value
    member.detail = detail[:256]
    member.updated_at = at
    session.flush()
    rollout = session.get(Rollout, member.rollout_id)
    if rollout is not None:
        _evaluate(session, rollout, member.stage, at)


def _record_alert(session: Session, device_id: str, detail: str, at: dt.datetime) -> None:
    alert = session.scalar(sa.select(IntegrityAlert).where(
        IntegrityAlert.device_id == device_id, IntegrityAlert.acknowledged_at.is_(None)))
    if alert is None:
        session.add(IntegrityAlert(device_id=device_id, detail=detail[:256], first_seen_at=at,
                                   last_seen_at=at, count=1, acknowledged_at=None,
                                   acknowledged_by=None))
    else:
        alert.detail, alert.last_seen_at, alert.count = detail[:256], at, alert.count + 1
    session.flush()


def events_pending(session: Session) -> bool:
    """Whether units sent events the monitor has not read yet (a cheap read)."""
    cursor = session.get(EventCursor, "updates")
    newest = session.scalar(sa.select(sa.func.max(EventRow.id)))
    return newest is not None and (cursor is None or newest > cursor.position)


def process_events(session: Session, *, batch: int = 500) -> int:
    """Read the update events units sent since the last call (through ingest's ``events``
    table) and apply them: rollout outcomes, unit state, integrity alerts. Returns how many
    events were read (0: nothing new). Each event is applied once (a cursor row records the
    last event id read, in the same transaction)."""
    cursor = session.get(EventCursor, "updates")
    if cursor is None:
        cursor = EventCursor(name="updates", position=0)
        session.add(cursor)
        session.flush()
    rows = list(session.execute(
        sa.select(EventRow.id, EventRow.device_id, EventRow.kind, EventRow.detail,
                  EventRow.received_at)
        .where(EventRow.id > cursor.position).order_by(EventRow.id).limit(batch)))
    applied = 0
    for event_id, device_id, kind, detail, received_at in rows:
        cursor.position = event_id
        if kind not in UPDATE_EVENTS:
            continue
        if kind == "integrity_alert":
            _record_alert(session, device_id, detail, received_at)
        else:
            _record_outcome(session, device_id, kind, detail, received_at)
        applied += 1
    session.flush()
    return len(rows)


def open_alerts(session: Session, *, device_id: str | None = None,
                limit: int = 200) -> list[IntegrityAlert]:
    stmt = (sa.select(IntegrityAlert).where(IntegrityAlert.acknowledged_at.is_(None))
            .order_by(IntegrityAlert.last_seen_at.desc()).limit(limit))
    if device_id is not None:
        stmt = stmt.where(IntegrityAlert.device_id == device_id)
    return list(session.scalars(stmt))


def acknowledge_alerts(session: Session, device_id: str, *, by: str, now: dt.datetime) -> int:
    """Mark the unit's open alerts acknowledged; returns how many were open."""
    alerts = open_alerts(session, device_id=device_id)
    for alert in alerts:
        alert.acknowledged_at, alert.acknowledged_by = now, by[:64]
    session.flush()
    return len(alerts)


# --- support periods --------------------------------------------------------------------------
def support_period(session: Session, model: str) -> SupportPeriod | None:
    row = session.get(SupportPeriodRow, model)
    if row is None:
        return None
    return SupportPeriod(model=row.model, end_date=row.end_date, published_at=row.published_at)


def support_periods(session: Session) -> list[SupportPeriod]:
    return [SupportPeriod(model=r.model, end_date=r.end_date, published_at=r.published_at)
            for r in session.scalars(sa.select(SupportPeriodRow).order_by(SupportPeriodRow.model))
            if r.model in MODELS]


def define_support_period(
    session: Session, model: str, end_date: dt.date, *, now: dt.datetime
) -> SupportPeriod:
    """Publish (or extend) ``model``'s support period. A published period is never
    shortened. Raises :class:`ValidationError` (``unknown_model``, ``out_of_range``)."""
    if model not in MODELS:
        raise ValidationError("unknown_model", f"unknown model {model!r}")
    current = support_period(session, model)
    period = (current.extend(end_date, now=now) if current is not None
              else SupportPeriod.define(model, end_date, now=now))
    row = session.get(SupportPeriodRow, model)
    if row is None:
        session.add(SupportPeriodRow(model=model, end_date=period.end_date,
                                     published_at=period.published_at))
    else:
        row.end_date, row.published_at = period.end_date, period.published_at
    session.flush()
    return period


# --- the consumer's view of a unit ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UnitUpdateView:
    """Everything a unit's owner is told about its software (see ``web.py`` for the page)."""

    device_id: str
    model: str
    version: str | None
    available: str | None
    last_event: str | None
    last_event_detail: str | None
    last_event_at: dt.datetime | None
    automatic: bool
    window: str | None
    support: dict[str, Any] | None
    alert: str | None
    alert_at: dt.datetime | None
    notices: tuple[tuple[str, str], ...]
    """``(level, text)``: ``info``, ``warning`` or ``alert``, in the order to show them."""


def window_text(state: UnitUpdateState) -> str | None:
    if state.automatic or state.window_start is None or state.window_end is None:
        return None
    s, e = state.window_start, state.window_end
    return f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d} {state.window_tz}"


def unit_update_view(session: Session, device_id: str, *, now: dt.datetime) -> UnitUpdateView:
    """What the owner of ``device_id`` sees about updates, support and integrity."""
    unit = session.get(Unit, device_id)
    if unit is None:
        raise NotFoundError("no such unit")
    state = session.get(UnitUpdateState, device_id) or UnitUpdateState(
        device_id=device_id, automatic=True, window_tz="UTC")
    rollout = session.scalar(sa.select(Rollout).where(
        Rollout.model == unit.model, Rollout.status.in_(_OPEN)))
    available = None
    if (rollout is not None and _newer(rollout.version, state.version)
            and _in_stage(device_id, rollout.stages[rollout.stage])):
        available = rollout.version
    period = support_period(session, unit.model)
    alerts = open_alerts(session, device_id=device_id, limit=1)
    notices: list[tuple[str, str]] = []
    if alerts:
        notices.append(("alert", "This unit found that its software had been changed. It "
                                 "switched to its verified software and told the service; "
                                 "support is looking into it."))
    if period is None:
        notices.append(("warning", f"The maker has not published a support period for the "
                                   f"{unit.model}."))
    else:
        status = period.status(now)
        if status is SupportStatus.ENDED:
            notices.append(("alert", f"Security updates for the {unit.model} ended on "
                                     f"{period.end_date.isoformat()}. This unit no longer "
                                     "gets security updates."))
        elif status is SupportStatus.ENDING_SOON:
            notices.append(("warning", f"Security updates for the {unit.model} end on "
                                       f"{period.end_date.isoformat()} "
                                       f"({period.days_remaining(now)} days left)."))
    kind = state.last_event
    if kind == "update_failed":
        notices.append(("warning", f"An update to {state.last_event_detail.split(' ')[0]} "
                                   "could not be installed; the unit keeps its current "
                                   "software and will try again." if state.last_event_detail
                                   else "An update could not be installed."))
    elif kind == "update_rolled_back":
        notices.append(("warning", "An update did not start correctly, so the unit went back "
                                   "to its previous software by itself."))
    elif kind == "update_installed":
        notices.append(("info", f"Software {state.version} was installed "
                                f"{state.last_event_at:%Y-%m-%d %H:%M} UTC."
                        if state.last_event_at else f"Software {state.version} was installed."))
    if available is not None:
        window = window_text(state)
        notices.append(("info", f"Update {available} is available"
                                + (f" and will be installed in your window ({window})."
                                   if window else " and is being installed automatically.")))
    return UnitUpdateView(
        device_id=device_id, model=unit.model, version=state.version, available=available,
        last_event=state.last_event, last_event_detail=state.last_event_detail,
        last_event_at=state.last_event_at, automatic=state.automatic,
        window=window_text(state),
        support=period.to_json(now) if period is not None else None,
        alert=alerts[0].detail if alerts else None,
        alert_at=alerts[0].last_seen_at if alerts else None,
        notices=tuple(notices))
