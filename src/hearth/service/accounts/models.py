"""Database tables of the accounts capability, on the service's declarative ``Base``.

The schema is created by the Alembic revision ``versions/0201_accounts.py`` (which also adds
``units.setup_code_hash``). Nothing secret is stored in clear:

* ``accounts.password_hash`` - argon2id (:mod:`.passwords`);
* ``accounts.totp_secret_enc`` - AES-256-GCM under a key derived from the service secret,
  which lives outside the database (:mod:`.totp`);
* ``account_sessions.id_hash`` - SHA-256 of a 256-bit session id (:mod:`.sessions`);
* ``unit_owners.verifier`` - a hash of the owner's local-access credential
  (:func:`hearth.protocol.owner_verifier`); the credential is shown to the owner once.
"""

from __future__ import annotations

import datetime as dt
import enum

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from hearth.service.models import DEVICE_ID_LEN, Base, BigId, sql_in

__all__ = [
    "Account",
    "AccountSession",
    "ResetKind",
    "ResetState",
    "Role",
    "SessionKind",
    "SessionState",
    "Throttle",
    "UnitOwner",
    "UnitReset",
]


class Role(enum.StrEnum):
    CONSUMER = "consumer"
    OPERATOR = "operator"
    SECURITY = "security"


PRIVILEGED_ROLES = frozenset({Role.OPERATOR, Role.SECURITY})
"""Roles that must use a TOTP second factor at every sign-in."""


class SessionState(enum.StrEnum):
    TOTP = "totp"
    """Password verified; the TOTP code is still to come (nothing else is allowed)."""
    ENROL = "enrol"
    """Password verified for a privileged account without TOTP: it must enrol first."""
    ACTIVE = "active"


class SessionKind(enum.StrEnum):
    COOKIE = "cookie"
    """A browser session (cookie; every POST also needs a CSRF token)."""
    BEARER = "bearer"
    """An API session (``Authorization: Bearer``), never accepted from a cookie."""


class ResetKind(enum.StrEnum):
    RESET = "reset"
    UNBIND = "unbind"


class ResetState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    REFUSED = "refused"


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(254), unique=True)
    """Normalised (trimmed, lower-case); the unique sign-in name."""
    password_hash: Mapped[str] = mapped_column(sa.String(256))
    role: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[dt.datetime]
    totp_secret_enc: Mapped[str | None] = mapped_column(sa.Text)
    totp_enrolled_at: Mapped[dt.datetime | None]
    totp_last_step: Mapped[int | None] = mapped_column(sa.BigInteger)
    """The last TOTP time step used: a code is accepted once (no replay)."""
    disabled_at: Mapped[dt.datetime | None]

    __table_args__ = (sa.CheckConstraint(f"role IN ({sql_in(Role)})", name="role"),)


class AccountSession(Base):
    __tablename__ = "account_sessions"

    id_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(sa.String(8))
    state: Mapped[str] = mapped_column(sa.String(8))
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
    """Absolute expiry; the idle timeout is checked against ``last_seen_at``."""

    __table_args__ = (
        sa.CheckConstraint(f"state IN ({sql_in(SessionState)})", name="state"),
        sa.CheckConstraint(f"kind IN ({sql_in(SessionKind)})", name="kind"),
    )


class Throttle(Base):
    """Failed attempts for one key (``claim:unit:…``, ``login:acct-addr:…``), shared by
    every service process through the database."""

    __tablename__ = "throttles"

    key: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    failures: Mapped[int]
    window_start: Mapped[dt.datetime]
    blocked_until: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(index=True)


class UnitOwner(Base):
    """A claimed unit and its owner. A unit has at most one owner (the primary key)."""

    __tablename__ = "unit_owners"

    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE"),
        primary_key=True,
    )
    account_id: Mapped[str] = mapped_column(
        sa.String(32), sa.ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    owner_ref: Mapped[str] = mapped_column(sa.String(32))
    """Opaque random reference the unit stores as its owner (no personal data)."""
    verifier: Mapped[str] = mapped_column(sa.String(32))
    claimed_at: Mapped[dt.datetime]
    bound_at: Mapped[dt.datetime | None]
    """When the unit confirmed the ``bind_owner`` command."""
    command_id: Mapped[str | None] = mapped_column(sa.String(32))
    """The last ``bind_owner`` command sent."""


class UnitReset(Base):
    """An erasure (factory reset or unbind) the unit still has to carry out or confirm."""

    __tablename__ = "unit_resets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(
        sa.String(DEVICE_ID_LEN), sa.ForeignKey("units.device_id", ondelete="CASCADE"),
        index=True,
    )
    owner_ref: Mapped[str] = mapped_column(sa.String(32))
    kind: Mapped[str] = mapped_column(sa.String(8))
    state: Mapped[str] = mapped_column(sa.String(8))
    requested_at: Mapped[dt.datetime]
    command_id: Mapped[str | None] = mapped_column(sa.String(32))
    done_at: Mapped[dt.datetime | None]

    __table_args__ = (
        sa.CheckConstraint(f"kind IN ({sql_in(ResetKind)})", name="kind"),
        sa.CheckConstraint(f"state IN ({sql_in(ResetState)})", name="state"),
    )
