"""The reporter's side: filing a report and following it through its secret status link.

A report gets two identifiers, both from the OS CSPRNG:

* a **tracking id** (``HR-`` + 80 random bits in base32) to quote in correspondence - it
  is a reference, not a credential: knowing it gives no access;
* a **status token** (256 bits, base64url) - the credential. Only its SHA-256 is stored;
  the plaintext is shown once, in the status link ``/security/status/<token>``. A lost link
  cannot be recovered from the database, only replaced by the team.

:func:`report_for_token` answers "no such report" identically for a malformed token, an
unknown token, or a tracking id used as a token, so guessing reveals nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError
from hearth.service.disclosure.deadlines import Deadlines, WorkCalendar
from hearth.service.disclosure.intake import ReportSubmission
from hearth.service.disclosure.models import Report, ReportAttachment, ReportEvent, ReportState
from hearth.service.disclosure.triage import record_event

__all__ = [
    "attachment_for_report",
    "hash_status_token",
    "new_status_token",
    "new_tracking_id",
    "report_for_token",
    "reporter_message",
    "submit_report",
]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


def new_tracking_id() -> str:
    return "HR-" + base64.b32encode(secrets.token_bytes(10)).decode("ascii")


def new_status_token() -> str:
    return secrets.token_urlsafe(32)


def hash_status_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def submit_report(
    session: Session,
    submission: ReportSubmission,
    *,
    now: dt.datetime,
    calendar: WorkCalendar,
    acknowledge_within_working_days: int,
    fix_target_days: int,
) -> tuple[Report, str]:
    """Store a validated report; returns ``(report, status_token)``. The caller commits."""
    token = new_status_token()
    deadlines = Deadlines.for_report(
        now, calendar=calendar, acknowledge_within_working_days=acknowledge_within_working_days,
        fix_target_days=fix_target_days,
    )
    report = Report(
        tracking_id=new_tracking_id(),
        status_token_hash=hash_status_token(token),
        state=ReportState.RECEIVED.value,
        title=submission.title,
        description=submission.description,
        model=submission.model,
        version=submission.version,
        reporter_name=submission.reporter_name,
        reporter_email=submission.reporter_email,
        wants_credit=submission.wants_credit,
        received_at=now,
        acknowledge_by=deadlines.acknowledge_by,
        fix_target=deadlines.fix_target,
        acknowledged_at=None,
        last_public_update_at=now,
        closed_at=None,
        affected=[],
    )
    session.add(report)
    session.flush()
    for att in submission.attachments:
        session.add(
            ReportAttachment(
                id=secrets.token_urlsafe(16), report_id=report.id, filename=att.filename,
                content_type=att.content_type, size=len(att.data), sha256=att.sha256,
                data=att.data, created_at=now,
            )
        )
    record_event(
        session, report, kind="submitted", actor="reporter", now=now, public=True,
        to_state=ReportState.RECEIVED.value,
        data={"attachments": len(submission.attachments)},
    )
    session.flush()
    return report, token


def report_for_token(session: Session, token: object) -> Report:
    """The report a status token opens. Raises :class:`NotFoundError` (always the same)."""
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise NotFoundError("no such report")
    report = session.scalar(
        sa.select(Report).where(Report.status_token_hash == hash_status_token(token))
    )
    if report is None:
        raise NotFoundError("no such report")
    return report


def reporter_message(
    session: Session, report: Report, body: str, *, now: dt.datetime
) -> ReportEvent:
    return record_event(session, report, kind="message", actor="reporter", now=now, public=True,
                        body=body)


def attachments_of(session: Session, report: Report) -> list[ReportAttachment]:
    return list(
        session.scalars(
            sa.select(ReportAttachment)
            .where(ReportAttachment.report_id == report.id)
            .order_by(ReportAttachment.created_at, ReportAttachment.id)
        )
    )


def attachment_for_report(session: Session, report: Report, attachment_id: str) -> ReportAttachment:
    """An attachment of ``report`` (never another report's). Raises :class:`NotFoundError`."""
    if not isinstance(attachment_id, str) or len(attachment_id) > 32:
        raise NotFoundError("no such attachment")
    att = session.get(ReportAttachment, attachment_id)
    if att is None or att.report_id != report.id:
        raise NotFoundError("no such attachment")
    return att
