"""Database tables of the disclosure capability, on the service's declarative ``Base``.

The schema is created by the Alembic revision ``versions/0101_disclosure.py``. Nothing
secret is stored in clear: a reporter's status link is kept only as the SHA-256 of its
256-bit token. :class:`ReportEvent` rows are an append-only audit trail: the ORM refuses to
update or delete them (and the migration adds triggers doing the same in the database).
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapped, Mapper, mapped_column

from hearth.service.db import JSONType
from hearth.service.models import Base, BigId, sql_in

__all__ = [
    "Advisory",
    "AdvisoryProduct",
    "Report",
    "ReportAttachment",
    "ReportEvent",
    "ReportState",
]


class ReportState(enum.StrEnum):
    RECEIVED = "received"
    ACKNOWLEDGED = "acknowledged"
    TRIAGED = "triaged"
    FIXING = "fixing"
    FIXED = "fixed"
    DISCLOSED = "disclosed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class Report(Base):
    """A vulnerability report and its triage state."""

    __tablename__ = "disclosure_reports"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tracking_id: Mapped[str] = mapped_column(sa.String(32), unique=True)
    status_token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    title: Mapped[str] = mapped_column(sa.String(1000))
    description: Mapped[str] = mapped_column(sa.Text)
    model: Mapped[str | None] = mapped_column(sa.String(64))
    version: Mapped[str] = mapped_column(sa.String(1000))
    reporter_name: Mapped[str] = mapped_column(sa.String(1000))
    reporter_email: Mapped[str] = mapped_column(sa.String(254))
    wants_credit: Mapped[bool]
    received_at: Mapped[dt.datetime] = mapped_column(index=True)
    acknowledge_by: Mapped[dt.datetime]
    fix_target: Mapped[dt.datetime]
    acknowledged_at: Mapped[dt.datetime | None]
    last_public_update_at: Mapped[dt.datetime]
    closed_at: Mapped[dt.datetime | None]
    cvss_vector: Mapped[str | None] = mapped_column(sa.String(300))
    cvss_version: Mapped[str | None] = mapped_column(sa.String(8))
    cvss_score: Mapped[float | None] = mapped_column(sa.Double())
    severity: Mapped[str | None] = mapped_column(sa.String(16))
    affected: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    """``[{"model": ..., "introduced": "1.0.0" | None, "fixed": "1.2.0" | None}, ...]``"""
    fixing_release: Mapped[str | None] = mapped_column(sa.String(64))
    duplicate_of: Mapped[str | None] = mapped_column(sa.String(32))
    advisory_id: Mapped[str | None] = mapped_column(sa.String(32))

    __table_args__ = (sa.CheckConstraint(f"state IN ({sql_in(ReportState)})", name="state"),)


class ReportEvent(Base):
    """One entry of a report's audit trail (append-only). ``public`` = shown to the reporter."""

    __tablename__ = "disclosure_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    report_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("disclosure_reports.id", ondelete="RESTRICT"), index=True
    )
    at: Mapped[dt.datetime]
    actor: Mapped[str] = mapped_column(sa.String(80))
    """``reporter``, ``system``, or ``team:<token name>``."""
    kind: Mapped[str] = mapped_column(sa.String(24))
    public: Mapped[bool]
    from_state: Mapped[str | None] = mapped_column(sa.String(16))
    to_state: Mapped[str | None] = mapped_column(sa.String(16))
    body: Mapped[str | None] = mapped_column(sa.Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ReportAttachment(Base):
    """A file a reporter sent. Served only as a download, with the sniffed type."""

    __tablename__ = "disclosure_attachments"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    report_id: Mapped[int] = mapped_column(
        BigId, sa.ForeignKey("disclosure_reports.id", ondelete="RESTRICT"), index=True
    )
    filename: Mapped[str] = mapped_column(sa.String(80))
    content_type: Mapped[str] = mapped_column(sa.String(40))
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(sa.String(64))
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[dt.datetime]


class Advisory(Base):
    """A published security advisory; ``document`` is the exact CSAF JSON served."""

    __tablename__ = "disclosure_advisories"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    report_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("disclosure_reports.id", ondelete="RESTRICT")
    )
    title: Mapped[str] = mapped_column(sa.String(1000))
    summary: Mapped[str] = mapped_column(sa.Text)
    severity: Mapped[str] = mapped_column(sa.String(16))
    cvss_vector: Mapped[str] = mapped_column(sa.String(300))
    cvss_version: Mapped[str] = mapped_column(sa.String(8))
    cvss_score: Mapped[float] = mapped_column(sa.Double())
    cve: Mapped[str | None] = mapped_column(sa.String(32))
    fixing_release: Mapped[str | None] = mapped_column(sa.String(64))
    initial_release_date: Mapped[dt.datetime] = mapped_column(index=True)
    current_release_date: Mapped[dt.datetime]
    version: Mapped[int]
    document: Mapped[str] = mapped_column(sa.Text)


class AdvisoryProduct(Base):
    """Which model and firmware versions an advisory affects (indexed by model)."""

    __tablename__ = "disclosure_advisory_products"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    advisory_id: Mapped[str] = mapped_column(
        sa.String(32),
        sa.ForeignKey(
            "disclosure_advisories.id", ondelete="CASCADE", name="fk_disclosure_products_advisory"
        ),
        index=True,
    )
    model: Mapped[str] = mapped_column(sa.String(64), index=True)
    introduced: Mapped[str | None] = mapped_column(sa.String(64))
    fixed: Mapped[str | None] = mapped_column(sa.String(64))


class AuditTrailError(RuntimeError):
    """Raised when code tries to change or delete an audit-trail entry."""


@event.listens_for(ReportEvent, "before_update")
def _refuse_update(_mapper: Mapper[Any], _conn: sa.Connection, target: ReportEvent) -> None:
    raise AuditTrailError("the disclosure audit trail is append-only")


@event.listens_for(ReportEvent, "before_delete")
def _refuse_delete(_mapper: Mapper[Any], _conn: sa.Connection, target: ReportEvent) -> None:
    raise AuditTrailError("the disclosure audit trail is append-only")
