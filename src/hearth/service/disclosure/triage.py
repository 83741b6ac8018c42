"""Triage: the report workflow, its deadlines, and the audit trail.

States and the only transitions allowed (:data:`TRANSITIONS`)::

    received ──▶ acknowledged ──▶ triaged ──▶ fixing ──▶ fixed ──▶ disclosed
        │             │  ▲           │          │  ▲        │
        │             │  │           │          ▼  │        ▼
        └──────┬──────┴──┼───────────┘       triaged    fixing   (re-opened)
               ▼         │
       rejected / duplicate ──▶ acknowledged (re-opened)

Preconditions: ``triaged`` needs a CVSS assessment, ``fixed`` a fixing release,
``duplicate`` the tracking id of another report, and ``disclosed`` is reached only by
publishing an advisory (:mod:`hearth.service.disclosure.advisories`).

Deadlines (:class:`ReportFlags`): acknowledgement is due ``acknowledge_within_working_days``
working days after receipt; the reporter is owed a public update every
``status_update_every_days``; the fix target is ``fix_target_days`` after receipt. A report
past any of these is flagged overdue. Every change appends a :class:`ReportEvent`; state
changes and public messages are shown to the reporter, internal notes and assessments not.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError, ValidationError
from hearth.service.disclosure.models import Report, ReportEvent, ReportState
from hearth.service.disclosure.scoring import score_vector

__all__ = [
    "OPEN_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "AffectedRange",
    "ReportFlags",
    "TriageError",
    "assess",
    "compute_flags",
    "list_reports",
    "parse_version",
    "record_event",
    "team_message",
    "transition",
    "validate_affected",
]

S = ReportState
TRANSITIONS: Mapping[ReportState, frozenset[ReportState]] = {
    S.RECEIVED: frozenset({S.ACKNOWLEDGED, S.REJECTED, S.DUPLICATE}),
    S.ACKNOWLEDGED: frozenset({S.TRIAGED, S.REJECTED, S.DUPLICATE}),
    S.TRIAGED: frozenset({S.FIXING, S.REJECTED, S.DUPLICATE}),
    S.FIXING: frozenset({S.FIXED, S.TRIAGED}),
    S.FIXED: frozenset({S.DISCLOSED, S.FIXING}),
    S.DISCLOSED: frozenset(),
    S.REJECTED: frozenset({S.ACKNOWLEDGED}),
    S.DUPLICATE: frozenset({S.ACKNOWLEDGED}),
}
"""The allowed-transition table: ``TRANSITIONS[from]`` is the set of states it may go to."""

TERMINAL_STATES = frozenset({S.DISCLOSED, S.REJECTED, S.DUPLICATE})
OPEN_STATES = frozenset(ReportState) - TERMINAL_STATES
_BEFORE_FIX = frozenset({S.RECEIVED, S.ACKNOWLEDGED, S.TRIAGED, S.FIXING})

STATE_LABELS: Mapping[str, str] = {
    "received": "Received - waiting for acknowledgement",
    "acknowledged": "Acknowledged - we are investigating",
    "triaged": "Triaged - confirmed and assessed",
    "fixing": "Fixing - a fix is being prepared",
    "fixed": "Fixed - a fixed release is available",
    "disclosed": "Disclosed - an advisory is published",
    "rejected": "Closed - not a vulnerability in our products",
    "duplicate": "Closed - duplicate of an earlier report",
}


class TriageError(ValidationError):
    """A triage action was refused; ``reason`` is a stable code."""


# --- versions and affected ranges -------------------------------------------------------
_VERSION = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}\Z")


def parse_version(value: str) -> tuple[int, ...]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; raises :class:`TriageError` (``invalid_version``)."""
    if not isinstance(value, str) or not _VERSION.match(value):
        raise TriageError("invalid_version", "versions look like 1.2 or 1.2.3 (digits and dots)")
    parts = [int(p) for p in value.split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 1.2 == 1.2.0
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class AffectedRange:
    """Firmware versions of ``model`` from ``introduced`` (inclusive) up to ``fixed``
    (exclusive); ``None`` means "since the first release" / "no fix yet"."""

    model: str
    introduced: str | None = None
    fixed: str | None = None

    def contains(self, version: str) -> bool:
        v = parse_version(version)
        if self.introduced is not None and v < parse_version(self.introduced):
            return False
        return not (self.fixed is not None and v >= parse_version(self.fixed))

    def vers(self) -> str:
        """The range as a ``vers`` string (used by CSAF ``product_version_range``)."""
        parts = []
        if self.introduced:
            parts.append(f">={self.introduced}")
        if self.fixed:
            parts.append(f"<{self.fixed}")
        return "vers:generic/" + ("|".join(parts) if parts else "*")

    def describe(self) -> str:
        if self.introduced and self.fixed:
            return f"{self.introduced} up to (not including) {self.fixed}"
        if self.fixed:
            return f"all versions before {self.fixed}"
        if self.introduced:
            return f"{self.introduced} and later (no fix yet)"
        return "all versions (no fix yet)"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "introduced": self.introduced, "fixed": self.fixed}


def validate_affected(items: Iterable[Mapping[str, Any]], models: Iterable[str]) -> list[
    AffectedRange
]:
    """Check ``[{"model", "introduced", "fixed"}]``; raises :class:`TriageError`."""
    known = set(models)
    out: list[AffectedRange] = []
    for item in items:
        if not isinstance(item, Mapping) or set(item) - {"model", "introduced", "fixed"}:
            raise TriageError("invalid_affected", "each affected entry: model, introduced, fixed")
        model = item.get("model")
        if model not in known:
            raise TriageError("unknown_model", f"unknown model {str(model)[:40]!r}")
        introduced = item.get("introduced") or None
        fixed = item.get("fixed") or None
        for v in (introduced, fixed):
            if v is not None:
                parse_version(v)
        if introduced and fixed and parse_version(introduced) >= parse_version(fixed):
            raise TriageError("invalid_range", "introduced must be before fixed")
        out.append(AffectedRange(str(model), introduced, fixed))
    if len(out) > 50:
        raise TriageError("invalid_affected", "at most 50 affected ranges")
    return out


# --- deadlines ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportFlags:
    acknowledge_overdue: bool
    update_overdue: bool
    fix_overdue: bool
    next_update_due: dt.datetime | None

    @property
    def overdue(self) -> bool:
        return self.acknowledge_overdue or self.update_overdue or self.fix_overdue

    def labels(self) -> list[str]:
        out = []
        if self.acknowledge_overdue:
            out.append("acknowledgement overdue")
        if self.update_overdue:
            out.append("status update overdue")
        if self.fix_overdue:
            out.append("fix target missed")
        return out


def compute_flags(report: Report, *, now: dt.datetime, update_every_days: int) -> ReportFlags:
    state = ReportState(report.state)
    is_open = state in OPEN_STATES
    next_update = (
        report.last_public_update_at + dt.timedelta(days=update_every_days) if is_open else None
    )
    return ReportFlags(
        acknowledge_overdue=state is S.RECEIVED and now > report.acknowledge_by,
        update_overdue=next_update is not None and now > next_update,
        fix_overdue=state in _BEFORE_FIX and now > report.fix_target,
        next_update_due=next_update,
    )


# --- audit trail and actions ------------------------------------------------------------
def record_event(
    session: Session,
    report: Report,
    *,
    kind: str,
    actor: str,
    now: dt.datetime,
    public: bool,
    body: str | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> ReportEvent:
    """Append one entry to the audit trail (and count it as an update if public)."""
    ev = ReportEvent(
        report_id=report.id, at=now, actor=actor[:80], kind=kind, public=public,
        from_state=from_state, to_state=to_state, body=body, data=dict(data or {}),
    )
    session.add(ev)
    if public and actor != "reporter":
        report.last_public_update_at = now
    return ev


def transition(
    session: Session,
    report: Report,
    to: ReportState | str,
    *,
    actor: str,
    now: dt.datetime,
    duplicate_of: str | None = None,
    comment: str | None = None,
    _via_advisory: bool = False,
) -> ReportEvent:
    """Move ``report`` to state ``to``; raises :class:`TriageError` when not allowed.

    ``comment`` is shown to the reporter with the state change.
    """
    try:
        target = ReportState(to)
    except ValueError:
        raise TriageError("unknown_state", f"unknown state {str(to)[:20]!r}") from None
    current = ReportState(report.state)
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final state)"
        raise TriageError(
            "invalid_transition",
            f"a report cannot go from {current} to {target}; allowed: {allowed}",
        )
    if target is S.TRIAGED and not report.cvss_vector:
        raise TriageError("assessment_required", "assess the severity (CVSS vector) first")
    if target is S.FIXED and not report.fixing_release:
        raise TriageError("fixing_release_required", "record the fixing release first")
    if target is S.DISCLOSED and not _via_advisory:
        raise TriageError("advisory_required", "a report is disclosed by publishing an advisory")
    if target is S.DUPLICATE:
        if not duplicate_of or duplicate_of == report.tracking_id:
            raise TriageError("duplicate_of_required", "name the report this one duplicates")
        exists = session.scalar(sa.select(Report.id).where(Report.tracking_id == duplicate_of))
        if exists is None:
            raise TriageError("unknown_report", "no report with that tracking id")
        report.duplicate_of = duplicate_of
    report.state = target.value
    if target is S.ACKNOWLEDGED and report.acknowledged_at is None:
        report.acknowledged_at = now
    report.closed_at = now if target in TERMINAL_STATES else None
    return record_event(
        session, report, kind="state_changed", actor=actor, now=now, public=True,
        from_state=current.value, to_state=target.value, body=comment or None,
        data={"duplicate_of": duplicate_of} if target is S.DUPLICATE else None,
    )


def assess(
    session: Session,
    report: Report,
    *,
    actor: str,
    now: dt.datetime,
    models: Iterable[str],
    cvss_vector: str | None = None,
    affected: Sequence[Mapping[str, Any]] | None = None,
    fixing_release: str | None = None,
) -> ReportEvent:
    """Record severity, affected ranges and/or the fixing release (internal event).

    Raises :class:`ValidationError` (``invalid_cvss_vector``) or :class:`TriageError`.
    """
    changes: dict[str, Any] = {}
    if cvss_vector is not None:
        score = score_vector(cvss_vector)
        report.cvss_vector = score.vector
        report.cvss_version = score.version
        report.cvss_score = score.base_score
        report.severity = score.severity
        changes.update(cvss_vector=score.vector, score=score.base_score, severity=score.severity)
    if affected is not None:
        ranges = validate_affected(affected, models)
        report.affected = [r.as_dict() for r in ranges]
        changes["affected"] = report.affected
    if fixing_release is not None:
        if fixing_release:
            parse_version(fixing_release)
        report.fixing_release = fixing_release or None
        changes["fixing_release"] = report.fixing_release
    if not changes:
        raise TriageError("nothing_to_change", "give a CVSS vector, affected ranges or a release")
    return record_event(session, report, kind="assessment", actor=actor, now=now, public=False,
                        data=changes)


def team_message(
    session: Session, report: Report, body: str, *, public: bool, actor: str, now: dt.datetime
) -> ReportEvent:
    """A message to the reporter (``public``) or an internal note."""
    return record_event(session, report, kind="message" if public else "note", actor=actor,
                        now=now, public=public, body=body)


def get_report(session: Session, tracking_id: str) -> Report:
    """The report with ``tracking_id`` (for the team). Raises :class:`NotFoundError`."""
    if not isinstance(tracking_id, str) or len(tracking_id) > 32:
        raise NotFoundError("no such report")
    report = session.scalar(sa.select(Report).where(Report.tracking_id == tracking_id))
    if report is None:
        raise NotFoundError("no such report")
    return report


def list_reports(
    session: Session, *, now: dt.datetime, update_every_days: int, include_closed: bool = True,
    limit: int = 500,
) -> list[tuple[Report, ReportFlags]]:
    """Reports newest first, each with its deadline flags; overdue ones first."""
    q = sa.select(Report).order_by(Report.received_at.desc()).limit(limit)
    if not include_closed:
        q = q.where(Report.state.in_([s.value for s in OPEN_STATES]))
    rows = [(r, compute_flags(r, now=now, update_every_days=update_every_days))
            for r in session.scalars(q)]
    rows.sort(key=lambda rf: not rf[1].overdue)
    return rows


def events_of(session: Session, report: Report, *, public_only: bool) -> list[ReportEvent]:
    q = sa.select(ReportEvent).where(ReportEvent.report_id == report.id)
    if public_only:
        q = q.where(ReportEvent.public.is_(True))
    return list(session.scalars(q.order_by(ReportEvent.id)))
