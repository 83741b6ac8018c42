"""Database tables of the updates capability, on the service's declarative ``Base``.

The schema is created by the Alembic revision ``versions/0301_updates.py``. The update
repository itself (TUF metadata and bundles) lives on disk (``DATA/updates``); these tables
hold what the service decides and learns about it: the releases it knows, rollouts and each
unit's part in them, each unit's update state and preference, support periods per model and
integrity alerts. No secret is stored here (update tokens are never stored at all).
"""

from __future__ import annotations

import datetime as dt
import enum

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from hearth.service.db import JSONType
from hearth.service.models import DEVICE_ID_LEN, Base, BigId, sql_in

__all__ = [
    "EventCursor",
    "IntegrityAlert",
    "ReleaseRow",
    "Rollout",
    "RolloutStatus",
    "RolloutUnit",
    "RolloutUnitStatus",
    "SupportPeriodRow",
    "UnitUpdateState",
]


class RolloutStatus(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    HALTED = "halted"
    """Stopped by itself: a stage's failure rate crossed the threshold."""
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class RolloutUnitStatus(enum.StrEnum):
    OFFERED = "offered"
    INSTALLED = "installed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class ReleaseRow(Base):
    """A release published in the update repository (mirrored from its signed targets)."""

    __tablename__ = "update_releases"

    target_name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(32), index=True)
    version: Mapped[str] = mapped_column(sa.String(20))
    min_from_version: Mapped[str] = mapped_column(sa.String(20))
    length: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    published_at: Mapped[dt.datetime]
    """When this service first saw it (the signed metadata carries no publication time)."""


class Rollout(Base):
    """A release going out to a model's units in cohorts (percent stages)."""

    __tablename__ = "update_rollouts"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    target_name: Mapped[str] = mapped_column(
        sa.String(128), sa.ForeignKey("update_releases.target_name", ondelete="RESTRICT"),
        index=True)
    model: Mapped[str] = mapped_column(sa.String(32))
    version: Mapped[str] = mapped_column(sa.String(20))
    stages: Mapped[list[int]] = mapped_column(JSONType)
    """Cumulative percentages of the model's units, e.g. ``[1, 10, 50, 100]``."""
    stage: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    failure_threshold: Mapped[float] = mapped_column(sa.Double())
    min_sample: Mapped[int]
    auto_advance: Mapped[bool]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    created_by: Mapped[str] = mapped_column(sa.String(64))
    status_reason: Mapped[str] = mapped_column(sa.String(256))

    __table_args__ = (sa.CheckConstraint(f"status IN ({sql_in(RolloutStatus)})", name="status"),)


class RolloutUnit(Base):
    """One unit's part in a rollout: offered at which stage, and how it went."""

    __tablename__ = "update_rollout_units"

    rollout_id: Mapped[str] = mapped_column(
        sa.String(16), sa.ForeignKey("update_rollouts.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE"),
        primary_key=True, index=True)
    stage: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int]
    detail: Mapped[str] = mapped_column(sa.String(256))
    offered_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]

    __table_args__ = (
        sa.CheckConstraint(f"status IN ({sql_in(RolloutUnitStatus)})", name="status"),
        sa.Index(None, "rollout_id", "stage", "status"),
    )


class UnitUpdateState(Base):
    """What the service knows of a unit's software, and its owner's update preference."""

    __tablename__ = "update_unit_state"

    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE"),
        primary_key=True)
    version: Mapped[str | None] = mapped_column(sa.String(20))
    """The committed version the unit last reported."""
    running: Mapped[str | None] = mapped_column(sa.String(20))
    mode: Mapped[str | None] = mapped_column(sa.String(16))
    last_check_at: Mapped[dt.datetime | None]
    last_event: Mapped[str | None] = mapped_column(sa.String(32))
    last_event_detail: Mapped[str | None] = mapped_column(sa.String(256))
    last_event_at: Mapped[dt.datetime | None]
    automatic: Mapped[bool] = mapped_column(default=True)
    """Automatic updates (the default). Off: only inside the maintenance window."""
    window_start: Mapped[int | None]
    """Maintenance window start, minutes after local midnight (0..1439)."""
    window_end: Mapped[int | None]
    window_tz: Mapped[str] = mapped_column(sa.String(64), default="UTC")


class SupportPeriodRow(Base):
    """A model's published support period (``hearth.updates.support.SupportPeriod``)."""

    __tablename__ = "update_support_periods"

    model: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    end_date: Mapped[dt.date] = mapped_column(sa.Date)
    published_at: Mapped[dt.datetime]


class IntegrityAlert(Base):
    """A unit reported that its software failed verification (``integrity_alert``)."""

    __tablename__ = "update_integrity_alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE"),
        index=True)
    detail: Mapped[str] = mapped_column(sa.String(256))
    first_seen_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    count: Mapped[int]
    acknowledged_at: Mapped[dt.datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(sa.String(64))


class EventCursor(Base):
    """How far the update monitor has read the ``events`` table (by id)."""

    __tablename__ = "update_event_cursor"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    position: Mapped[int] = mapped_column(sa.BigInteger)
