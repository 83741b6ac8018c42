"""Database tables of the fleet, ingest, commands and API tokens (SQLAlchemy 2, typed).

The schema itself is owned by the Alembic migrations in ``migrations/versions``; a test
compares these models with the migrated database on SQLite and PostgreSQL so the two
cannot drift apart.

Nothing secret is stored in clear: ``units.mqtt_password_hash`` is the broker's PBKDF2 hash
from the factory manifest, ``units.setup_code_hash`` the factory's argon2id hash of the
setup code, and ``api_tokens.token_hash`` the SHA-256 of a 256-bit token.
"""

from __future__ import annotations

import datetime as dt
import enum
import importlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hearth.service.db import JSONType, UTCDateTime

__all__ = [
    "ApiToken",
    "Base",
    "BrokerRefusal",
    "CommandRow",
    "CommandStatus",
    "EventRow",
    "IngestCounter",
    "QuarantineRow",
    "TelemetryRow",
    "Unit",
    "UnitStatus",
    "all_metadata",
    "sql_in",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEVICE_ID_LEN = 32
TOPIC_MAX = 128
REASON_MAX = 32
DETAIL_MAX = 256

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
"""A 64-bit surrogate key (SQLite only auto-increments ``INTEGER PRIMARY KEY``)."""


class UnitStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class CommandStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"


OPEN_COMMAND_STATUSES = (CommandStatus.PENDING.value, CommandStatus.SENT.value)


def sql_in(values: type[enum.StrEnum]) -> str:
    """The SQL list of an enum's values, for ``CHECK (column IN (...))`` constraints."""
    return ", ".join(f"'{v.value}'" for v in values)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's declared class attribute
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[str]: JSONType,
    }


class Unit(Base):
    """One device unit, imported from a factory manifest."""

    __tablename__ = "units"

    device_id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(32))
    certificate_pem: Mapped[str] = mapped_column(sa.Text)
    cert_serial: Mapped[str] = mapped_column(sa.String(64), index=True)
    """Decimal serial number (up to 160 bits does not fit an integer column)."""
    mqtt_password_hash: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default=UnitStatus.ACTIVE.value)
    imported_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    last_seen_at: Mapped[dt.datetime | None]
    latest_seq: Mapped[int | None] = mapped_column(sa.BigInteger)
    latest_ts: Mapped[dt.datetime | None]
    latest_state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    accepted_count: Mapped[int] = mapped_column(sa.BigInteger, default=0,
                                                server_default=sa.text("0"))
    """Messages the ingest accepted from this unit (revision 0406; its other outcomes are
    in ``ingest_counters``): counted in the update the ingest makes to the unit anyway."""
    setup_code_hash: Mapped[str | None] = mapped_column(sa.String(256))
    """argon2id hash of the unit's setup code (factory manifest); NULL for units imported
    from a manifest without one (they cannot be claimed by code). Revision 0201."""

    __table_args__ = (sa.CheckConstraint(f"status IN ({sql_in(UnitStatus)})", name="status"),)


class TelemetryRow(Base):
    """One stored telemetry message, keyed by what identifies it (revision 0402)."""

    __tablename__ = "telemetry"

    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN).with_variant(
            sa.String(DEVICE_ID_LEN, collation="C"), "postgresql"), primary_key=True)
    """A registered unit's id. Not a foreign key (revision 0405): the ingest, the only
    writer, stores telemetry only for units it has locked and found active in the same
    transaction, and units are never deleted. Byte order (``COLLATE "C"``) on PostgreSQL
    (revision 0408): both indexes of the largest table compare it, and a device id is
    lowercase hex, whose byte order is its natural order."""
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[dt.datetime]
    received_at: Mapped[dt.datetime]
    readings: Mapped[dict[str, Any]] = mapped_column(sa.JSON())
    """No digest column (revision 0404): a redelivery is told from a replay by comparing
    ``ts`` and ``readings``, the whole of the message besides its key. ``json``, not
    ``jsonb``, on PostgreSQL (revision 0407): nothing queries inside it, and ``json``
    input is cheaper."""

    __table_args__ = (sa.Index(None, "device_id", "ts"),)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(sa.BigInteger)
    ts: Mapped[dt.datetime]
    received_at: Mapped[dt.datetime]
    kind: Mapped[str] = mapped_column(sa.String(32))
    detail: Mapped[str] = mapped_column(sa.String(DETAIL_MAX))
    digest: Mapped[str] = mapped_column(sa.String(64))

    __table_args__ = (
        sa.UniqueConstraint("device_id", "seq"),
        sa.Index(None, "device_id", "ts"),
    )


class QuarantineRow(Base):
    """A refused message: why, from whom, and a bounded excerpt (base64) for analysis."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str | None] = mapped_column(sa.String(DEVICE_ID_LEN), index=True)
    """The unit the broker authenticated (from the topic); NULL when unknown."""
    topic: Mapped[str] = mapped_column(sa.String(TOPIC_MAX))
    reason: Mapped[str] = mapped_column(sa.String(REASON_MAX))
    detail: Mapped[str] = mapped_column(sa.String(DETAIL_MAX))
    payload_size: Mapped[int]
    payload_excerpt: Mapped[str] = mapped_column(sa.Text)
    received_at: Mapped[dt.datetime] = mapped_column(index=True)


class IngestCounter(Base):
    """How many messages each unit sent, per outcome ('accepted', 'duplicate', reasons)."""

    __tablename__ = "ingest_counters"

    device_id: Mapped[str] = mapped_column(sa.String(DEVICE_ID_LEN), primary_key=True)
    """'' for messages that could not be tied to a known unit."""
    reason: Mapped[str] = mapped_column(sa.String(REASON_MAX), primary_key=True)
    count: Mapped[int] = mapped_column(sa.BigInteger)


class BrokerRefusal(Base):
    """Connections the broker refused, per reason (``hearth.service.broker_log``)."""

    __tablename__ = "broker_refusals"

    reason: Mapped[str] = mapped_column(sa.String(REASON_MAX), primary_key=True)
    count: Mapped[int] = mapped_column(sa.BigInteger)
    last_at: Mapped[dt.datetime]


class CommandRow(Base):
    __tablename__ = "commands"

    command_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(sa.String(32))
    params: Mapped[dict[str, Any]]
    issued_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(sa.String(16))
    result: Mapped[dict[str, Any] | None]
    completed_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.CheckConstraint(f"status IN ({sql_in(CommandStatus)})", name="status"),
        sa.Index(None, "device_id", "issued_at"),
        sa.Index(None, "status", "expires_at"),
    )


class ApiToken(Base):
    """An operator API token. Only the SHA-256 of the secret part is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    token_hash: Mapped[str] = mapped_column(sa.String(64))
    permissions: Mapped[list[str]]
    created_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]


def all_metadata() -> sa.MetaData:
    """``Base.metadata`` with the tables of every capability registered.

    Capabilities keep their tables in their own ``hearth/service/<capability>/models.py``
    on this ``Base``; this imports each of them so Alembic (and the models/migrations
    agreement test) sees the whole schema.
    """
    root = Path(__file__).parent
    for path in sorted(root.glob("*/models.py")):
        importlib.import_module(f"hearth.service.{path.parent.name}.models")
    return Base.metadata
