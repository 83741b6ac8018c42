"""Database-backed throttling with exponential backoff (claims, sign-in, TOTP).

Counters live in the ``throttles`` table, so a limit holds across service processes and
restarts. :meth:`Throttle.attempt` *charges* an attempt before the secret is checked, in
one write transaction with the rows locked: two concurrent guesses cannot both slip
through the same free slot. A successful sign-in resets the keys the caller chooses
(:meth:`Throttle.reset`); nothing ever locks a key for longer than its policy's ``cap``.

Keys are short and carry no secret: ``claim:unit:<8 hex>``, ``login:acct-addr:<hash>`` ...
(:func:`key_hash` shortens e-mail addresses and IP addresses into a SHA-256 prefix).

The clock is injectable (tests measure the attempts per hour without sleeping).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from hearth.errors import ValidationError
from hearth.service.accounts.config import ThrottlePolicy
from hearth.service.accounts.models import Throttle as ThrottleRow
from hearth.service.db import begin_write

__all__ = ["Throttle", "Throttled", "address_key", "key_hash"]


class Throttled(ValidationError):
    """Too many attempts: try again in ``retry_after`` seconds (reason ``rate_limited``)."""

    def __init__(self, retry_after: float) -> None:
        wait = max(1, int(retry_after + 0.999))
        super().__init__("rate_limited", f"too many attempts; try again in {_human(wait)}")
        self.retry_after = wait


def _human(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} seconds"
    if seconds < 5400:
        return f"{(seconds + 59) // 60} minutes"
    return f"{(seconds + 3599) // 3600} hours"


def key_hash(value: str) -> str:
    """A short, stable, non-reversible key part for a value that should not sit in clear
    in the throttle table (an e-mail address, an IP address)."""
    return hashlib.sha256(value.encode()).hexdigest()[:24]


def address_key(host: str | None) -> str:
    """The throttling unit of a client address: the IPv4 address, or the IPv6 /64."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return key_hash(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return key_hash(str(ipaddress.IPv6Network(f"{ip}/64", strict=False)))
    return key_hash(str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address)
                    else str(ip))


@dataclass(frozen=True)
class Key:
    name: str
    policy: ThrottlePolicy


class Throttle:
    """Charges, checks and resets attempts per key (stateless; state is in the DB)."""

    @staticmethod
    def _insert(session: Session) -> Any:
        table = ThrottleRow.__table__
        assert isinstance(table, sa.Table)
        if session.get_bind().dialect.name == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    def wait(self, session: Session, keys: Sequence[Key], *, now: dt.datetime) -> float:
        """Seconds until every key allows another attempt (0: allowed now). Read-only."""
        names = [k.name for k in keys]
        rows = session.scalars(sa.select(ThrottleRow).where(ThrottleRow.key.in_(names)))
        policy = {k.name: k.policy for k in keys}
        wait = 0.0
        for row in rows:
            if now - row.updated_at >= policy[row.key].forget_after:
                continue
            if row.blocked_until is not None and row.blocked_until > now:
                wait = max(wait, (row.blocked_until - now).total_seconds())
        return wait

    def attempt(self, session: Session, keys: Sequence[Key], *, now: dt.datetime) -> None:
        """Charge one attempt to every key, or raise :class:`Throttled` (charging nothing)
        if any key is still waiting. Runs in the caller's transaction, which it makes a
        write transaction; the caller commits before checking the secret."""
        begin_write(session)
        ordered = sorted(keys, key=lambda k: k.name)  # one lock order for every caller
        stmt = self._insert(session).values(
            [{"key": k.name, "failures": 0, "window_start": now, "blocked_until": None,
              "updated_at": now} for k in ordered]
        ).on_conflict_do_nothing(index_elements=["key"])
        session.execute(stmt)
        rows = {
            r.key: r for r in session.scalars(
                sa.select(ThrottleRow).where(ThrottleRow.key.in_([k.name for k in ordered]))
                .order_by(ThrottleRow.key).with_for_update())
        }
        wait = 0.0
        for k in ordered:
            row = rows[k.name]
            if now - row.updated_at >= k.policy.forget_after:
                row.failures, row.window_start, row.blocked_until = 0, now, None
            if row.blocked_until is not None and row.blocked_until > now:
                wait = max(wait, (row.blocked_until - now).total_seconds())
        if wait > 0:
            raise Throttled(wait)
        for k in ordered:
            row = rows[k.name]
            row.failures += 1
            row.updated_at = now
            delay = k.policy.delay(row.failures)
            row.blocked_until = now + delay if delay else None
        session.flush()

    @staticmethod
    def reset(session: Session, keys: Sequence[Key]) -> None:
        """Forget the attempts of ``keys`` (after a success on a path that earns it)."""
        if keys:
            session.execute(sa.delete(ThrottleRow).where(
                ThrottleRow.key.in_([k.name for k in keys])))

    @staticmethod
    def purge(session: Session, *, older_than: dt.datetime) -> int:
        """Delete keys untouched since ``older_than`` (housekeeping)."""
        result = session.execute(sa.delete(ThrottleRow).where(
            ThrottleRow.updated_at < older_than))
        return int(getattr(result, "rowcount", 0) or 0)
