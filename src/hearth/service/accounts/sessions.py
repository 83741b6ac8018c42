"""Server-side sessions: random ids, stored only as SHA-256, with idle and absolute expiry.

A session id is 256 bits from the OS CSPRNG, handed to the browser in a cookie
(``__Host-hearth-session``: Secure, HttpOnly, SameSite=Lax, path ``/``) or to an API
client as a bearer token; the database keeps ``SHA-256(id)`` only, so a copy of the
database opens no session. Ids are never reused or taken from the request: every sign-in
(and the TOTP step after it) creates a *new* id and deletes the one the browser had
(no session fixation).

Lifetimes (per role, :class:`~.config.AccountsConfig`): consumers 24 h idle / 30 days
absolute; operators and the security team 30 min idle / 12 h absolute (SP 800-63B AAL2).
A session waiting for its TOTP code is valid for ``pending_ttl`` and for nothing else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.service.accounts.config import AccountsConfig
from hearth.service.accounts.models import (
    PRIVILEGED_ROLES,
    Account,
    AccountSession,
    Role,
    SessionKind,
    SessionState,
)

__all__ = ["SessionInfo", "create_session", "end_all_sessions", "end_session", "hash_id",
           "load_session", "purge_expired"]

_ID_CHARS = 43
_TOUCH_EVERY = dt.timedelta(seconds=60)


def hash_id(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class SessionInfo:
    """A valid session and its account, as a request sees them."""

    account_id: str
    email: str
    role: Role
    state: SessionState
    kind: SessionKind
    id_hash: str
    totp_enrolled: bool

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE

    @property
    def privileged(self) -> bool:
        return self.role in PRIVILEGED_ROLES


def _lifetimes(config: AccountsConfig, role: str) -> tuple[dt.timedelta, dt.timedelta]:
    if role in PRIVILEGED_ROLES:
        return config.privileged_idle, config.privileged_absolute
    return config.consumer_idle, config.consumer_absolute


def create_session(session: Session, account: Account, *, kind: SessionKind,
                   state: SessionState, config: AccountsConfig, now: dt.datetime,
                   replaces: str | None = None) -> str:
    """A new session id (returned once; only its hash is stored). ``replaces`` is the raw
    id the client presented before, which is deleted (rotation). The caller commits."""
    if replaces:
        end_session(session, replaces)
    raw = secrets.token_urlsafe(32)
    _idle, absolute = _lifetimes(config, account.role)
    expires = now + (absolute if state is SessionState.ACTIVE else config.pending_ttl)
    session.add(AccountSession(
        id_hash=hash_id(raw), account_id=account.id, kind=kind.value, state=state.value,
        created_at=now, last_seen_at=now, expires_at=expires))
    session.flush()
    return raw


def load_session(session: Session, raw: str | None, *, kind: SessionKind,
                 config: AccountsConfig, now: dt.datetime) -> SessionInfo | None:
    """The session for ``raw`` if it exists, is of ``kind``, has not expired (idle or
    absolute) and its account is enabled; else ``None`` (an expired one is deleted).
    Refreshes ``last_seen_at`` at most once a minute. The caller commits."""
    if not isinstance(raw, str) or len(raw) != _ID_CHARS:
        return None
    row = session.get(AccountSession, hash_id(raw))
    if row is None or row.kind != kind.value:
        return None
    account = session.get(Account, row.account_id)
    idle, _absolute = _lifetimes(config, account.role if account else Role.CONSUMER)
    if (account is None or account.disabled_at is not None or now >= row.expires_at
            or now - row.last_seen_at >= idle):
        session.delete(row)
        session.flush()
        return None
    if now - row.last_seen_at >= _TOUCH_EVERY:
        row.last_seen_at = now
        session.flush()
    return SessionInfo(account_id=account.id, email=account.email, role=Role(account.role),
                       state=SessionState(row.state), kind=SessionKind(row.kind),
                       id_hash=row.id_hash, totp_enrolled=account.totp_enrolled_at is not None)


def end_session(session: Session, raw: str | None) -> None:
    if isinstance(raw, str) and len(raw) == _ID_CHARS:
        session.execute(sa.delete(AccountSession).where(AccountSession.id_hash == hash_id(raw)))


def end_all_sessions(session: Session, account_id: str) -> None:
    session.execute(sa.delete(AccountSession).where(AccountSession.account_id == account_id))


def purge_expired(session: Session, *, now: dt.datetime) -> int:
    result = session.execute(sa.delete(AccountSession).where(AccountSession.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)
