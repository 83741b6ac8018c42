"""Operator API tokens and permissions.

A token is ``hth_<id>.<secret>``: a 64-bit public id to find the row and a 256-bit secret
from the OS CSPRNG. Only ``SHA-256(secret)`` is stored; the plaintext is returned once, at
creation. Verification looks the row up by id and compares hashes with
:func:`hmac.compare_digest` (constant time).

Why SHA-256 and not argon2: argon2 exists to make guessing *low-entropy* passwords
expensive. A 256-bit random secret cannot be guessed whatever the hash, so a slow hash would
only add latency (and a CPU-exhaustion lever) to every API request.

There are no default credentials. On the very first start :func:`ensure_first_token` mints
one operator token (all permissions) for the operator to see once; after that it returns
``None``. Each token carries a set of :class:`Permission` values; every API route declares
the one it needs.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError, ValidationError
from hearth.service.db import utcnow
from hearth.service.models import ApiToken

__all__ = [
    "ALL_PERMISSIONS",
    "Permission",
    "Principal",
    "create_token",
    "ensure_first_token",
    "list_tokens",
    "revoke_token",
    "verify_token",
]

TOKEN_PREFIX = "hth_"  # noqa: S105 - a prefix, not a secret
_TOKEN_RE = re.compile(r"^hth_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}\Z")
MAX_TOKEN_CHARS = 128


class Permission(enum.StrEnum):
    """What a token may do. Every API route declares exactly one."""

    FLEET_READ = "fleet:read"
    FLEET_REVOKE = "fleet:revoke"
    TELEMETRY_READ = "telemetry:read"
    QUARANTINE_READ = "quarantine:read"
    COMMANDS_SEND = "commands:send"
    COMMANDS_READ = "commands:read"
    ROLLOUTS_READ = "rollouts:read"
    """See releases, rollouts and their failures, units' update state and integrity alerts."""
    ROLLOUTS_MANAGE = "rollouts:manage"
    """Start, pause, resume, advance and cancel rollouts; set a unit's update preference."""
    SUPPORT_MANAGE = "support:manage"
    """Publish or extend a model's support period."""
    ALERTS_ACKNOWLEDGE = "alerts:acknowledge"
    """Acknowledge a unit's integrity alert (lifts its quarantine)."""


ALL_PERMISSIONS: frozenset[Permission] = frozenset(Permission)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    token_id: str
    name: str
    permissions: frozenset[Permission]

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session,
    name: str,
    *,
    permissions: Iterable[Permission] = ALL_PERMISSIONS,
    now: dt.datetime | None = None,
) -> str:
    """Create a token and return its plaintext (shown once; only its hash is stored).

    Raises :class:`ValidationError` for a bad name or an empty permission set. The caller
    commits.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError("invalid_name", "token name: 1-64 letters, digits, space ._@-")
    perms = sorted({Permission(p) for p in permissions})
    if not perms:
        raise ValidationError("invalid_schema", "a token needs at least one permission")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    session.add(
        ApiToken(
            id=token_id,
            name=name,
            token_hash=_hash(secret),
            permissions=[p.value for p in perms],
            created_at=now or utcnow(),
            revoked_at=None,
        )
    )
    session.flush()
    return f"{TOKEN_PREFIX}{token_id}.{secret}"


def verify_token(session: Session, token: str) -> Principal | None:
    """The principal for ``token``, or ``None`` if it is malformed, unknown or revoked."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        return None
    m = _TOKEN_RE.match(token)
    if not m:
        return None
    token_id, secret = m.group(1), m.group(2)
    row = session.get(ApiToken, token_id)
    presented = _hash(secret)
    if row is None:
        hmac.compare_digest(presented, presented)  # same work either way
        return None
    if not hmac.compare_digest(row.token_hash, presented) or row.revoked_at is not None:
        return None
    perms = frozenset(Permission(p) for p in row.permissions if p in Permission._value2member_map_)
    return Principal(token_id=row.id, name=row.name, permissions=perms)


def revoke_token(session: Session, token_id: str, *, now: dt.datetime | None = None) -> None:
    """Revoke a token by id (idempotent). Raises :class:`NotFoundError`. The caller commits."""
    row = session.get(ApiToken, token_id) if isinstance(token_id, str) else None
    if row is None:
        raise NotFoundError("no such token")
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
    session.flush()


def list_tokens(session: Session) -> list[ApiToken]:
    """All tokens (ids, names, permissions, dates; never a secret)."""
    return list(session.scalars(sa.select(ApiToken).order_by(ApiToken.created_at)))


def ensure_first_token(session: Session) -> str | None:
    """On first start (no token has ever existed) create an all-permissions operator token.

    Returns its plaintext - the caller shows it to the operator once and must never log it -
    or ``None`` when a token exists already (revoked ones count: revoking every token must
    not make the service mint a new one on restart). The caller commits.
    """
    exists = session.scalar(sa.select(ApiToken.id).limit(1))
    if exists is not None:
        return None
    return create_token(session, "operator")
