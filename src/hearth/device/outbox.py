"""A persistent, bounded store-and-forward queue for everything a unit sends (guideline 9).

Every telemetry report, event and command result goes into the outbox first and leaves it
only when the broker has acknowledged it (MQTT PUBACK). While the unit is offline the
outbox fills; when it reconnects, the link drains it oldest first. Nothing the outbox has
accepted is lost to a crash, a ``kill -9`` or a power cut: each :meth:`Outbox.put` and
:meth:`Outbox.ack` is one SQLite transaction (WAL journal, ``synchronous=FULL`` by default).

Sequence numbers
    The outbox assigns the unit's sequence number when a message is enqueued: one counter
    per unit for all kinds, strictly increasing in enqueue order, stored in the same
    transaction as the message, so it survives restarts and is never reused (a number given
    to a message that is then dropped is not given again). The number is also the message's
    id in the queue, so "oldest first" is "lowest seq first". ``build(seq)`` makes the
    payload inside the transaction, so the number in the payload and the row always agree.

Bound and drop policy
    At most ``max_messages`` are kept. When a new message arrives at a full outbox, the
    oldest message of the least important kind is dropped - telemetry first, then events,
    command results last - unless everything queued is more important than the new
    message, in which case the new message is the one dropped. A command result is
    therefore only dropped when the whole outbox holds command results. Every drop is
    counted persistently (:attr:`Outbox.dropped`, per kind in :attr:`Outbox.dropped_by_kind`);
    :meth:`Outbox.put_drop_report` enqueues an event with the count not yet reported, so the
    cloud learns about the gap in sequence numbers.

Command dedupe
    The ids of the last ``max_commands`` executed commands are kept in the same database;
    recording one happens in the same transaction as enqueueing its result, so a command
    redelivered by the broker (QoS 1 is at-least-once) after a crash is recognised.

Example::

    box = Outbox.for_unit(unit_dir)
    seq = box.put("telemetry", topic, lambda seq: encode(Telemetry(..., seq=seq, ...)))
    for msg in box.peek(32):
        ...                     # publish, then on PUBACK:
    box.ack([msg.seq])
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from hearth.errors import DeviceError
from hearth.protocol import MAX_PAYLOAD_BYTES

__all__ = [
    "DEFAULT_MAX_COMMANDS",
    "DEFAULT_MAX_MESSAGES",
    "KINDS",
    "Kind",
    "Message",
    "Outbox",
]

Kind = Literal["telemetry", "event", "cmd/result"]
KINDS: Final[tuple[Kind, ...]] = ("telemetry", "event", "cmd/result")
_PRIORITY: Final[dict[str, int]] = {"telemetry": 0, "event": 1, "cmd/result": 2}
DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_COMMANDS = 1_024
_SCHEMA_VERSION = 1
_FIRST_SEQ = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq      INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    priority INTEGER NOT NULL,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    created  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_priority ON messages (priority, seq);
CREATE TABLE IF NOT EXISTS commands (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL UNIQUE
);
"""
_META_KEYS = ("next_seq", "dropped_reported", *(f"dropped:{k}" for k in KINDS))


@contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise DeviceError(f"outbox {path.name}: {e}") from e


@dataclass(frozen=True)
class Message:
    """One queued message. ``seq`` is its sequence number and its id in the outbox."""

    seq: int
    kind: Kind
    topic: str
    payload: bytes


class Outbox:
    """The unit's outbox in one SQLite database (thread-safe: one connection, one lock).

    Raises :class:`DeviceError` if the database cannot be opened or is not an outbox.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_commands: int = DEFAULT_MAX_COMMANDS,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if max_commands < 1:
            raise ValueError("max_commands must be at least 1")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self.max_messages = max_messages
        self.max_commands = max_commands
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = not path.exists()
        try:
            if fresh:  # create it private: queued telemetry can be personal data
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DeviceError(f"outbox {path.name}: WAL journal mode is not available")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _SCHEMA_VERSION):
                    raise DeviceError(f"outbox {path.name} has unknown schema version {version}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                for key in _META_KEYS:
                    start = _FIRST_SEQ if key == "next_seq" else 0
                    self._db.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, start)
                    )
                self._trim_to(self.max_messages)
        except sqlite3.Error as e:
            raise DeviceError(f"cannot open the outbox {path}: {e}") from e

    @classmethod
    def for_unit(
        cls,
        unit_dir: Path,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_commands: int = DEFAULT_MAX_COMMANDS,
    ) -> Outbox:
        """The outbox of the unit in ``unit_dir``: ``unit_dir/state/outbox.db``."""
        return cls(
            unit_dir / "state" / "outbox.db", max_messages=max_messages, max_commands=max_commands
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({self.path!s}, max_messages={self.max_messages})"

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. Call with the lock held.

        SQLite errors (disk full, I/O error) become :class:`DeviceError`.
        """
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise DeviceError(f"outbox {self.path.name}: {e}") from e

    def _meta(self, key: str) -> int:
        value: int = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
        return value

    def _bump(self, key: str, by: int = 1) -> None:
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (by, key))

    def _count(self) -> int:
        n: int = self._db.execute("SELECT count(*) FROM messages").fetchone()[0]
        return n

    def _trim_to(self, limit: int) -> None:
        """Drop lowest-priority oldest messages until at most ``limit`` remain (counted)."""
        excess = self._count() - limit
        if excess <= 0:
            return
        victims = self._db.execute(
            "SELECT seq, kind FROM messages ORDER BY priority, seq LIMIT ?", (excess,)
        ).fetchall()
        for seq, kind in victims:
            self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            self._bump(f"dropped:{kind}")

    # -- queue -------------------------------------------------------------------------

    def put(
        self,
        kind: Kind,
        topic: str,
        build: Callable[[int], bytes],
        *,
        command_id: str | None = None,
    ) -> int | None:
        """Assign the next sequence number, build the payload with it, and enqueue it.

        Returns the sequence number, or ``None`` if the outbox was full of more important
        messages and this one was dropped (and counted) instead. With ``command_id`` the
        command is recorded as executed in the same transaction. Nothing is stored if
        ``build`` raises. Raises :class:`DeviceError` for an unknown kind or an oversize
        payload.
        """
        if kind not in _PRIORITY:
            raise DeviceError(f"unknown outbox message kind {kind!r}")
        with self._lock, self._transaction():
            return self._put_locked(kind, topic, build, command_id)

    def _put_locked(
        self, kind: Kind, topic: str, build: Callable[[int], bytes], command_id: str | None
    ) -> int | None:
        seq = self._meta("next_seq")
        payload = build(seq)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise DeviceError(f"{kind} message of {len(payload)} bytes is over the limit")
        self._bump("next_seq")
        if command_id is not None:
            self._record_command(command_id)
        priority = _PRIORITY[kind]
        if self._count() >= self.max_messages:
            victim = self._db.execute(
                "SELECT seq, kind, priority FROM messages ORDER BY priority, seq LIMIT 1"
            ).fetchone()
            if victim[2] > priority:  # everything queued matters more: drop the new one
                self._bump(f"dropped:{kind}")
                return None
            self._db.execute("DELETE FROM messages WHERE seq = ?", (victim[0],))
            self._bump(f"dropped:{victim[1]}")
        self._db.execute(
            "INSERT INTO messages (seq, kind, priority, topic, payload, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (seq, kind, priority, topic, payload, time.time()),
        )
        return seq

    def put_drop_report(self, topic: str, build: Callable[[int, int], bytes]) -> int | None:
        """Enqueue an event reporting drops not yet reported; ``build(seq, count)``.

        Returns the event's sequence number, or ``None`` when there is nothing to report.
        The count covers drops up to this call; a drop this event itself causes is reported
        next time.
        """
        with self._lock, self._transaction():
            total = self._dropped_locked()
            count = total - self._meta("dropped_reported")
            if count <= 0:
                return None
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'dropped_reported'", (total,)
            )
            return self._put_locked("event", topic, lambda seq: build(seq, count), None)

    def peek(self, n: int, *, after: int = 0) -> list[Message]:
        """Up to ``n`` queued messages with ``seq > after``, oldest first."""
        if n <= 0:
            return []
        with self._lock, _db_errors(self.path):
            rows = self._db.execute(
                "SELECT seq, kind, topic, payload FROM messages WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, n),
            ).fetchall()
        return [Message(seq, kind, topic, bytes(payload)) for seq, kind, topic, payload in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Remove delivered messages; returns how many were still queued."""
        ids = [(s,) for s in seqs]
        if not ids:
            return 0
        with self._lock, self._transaction():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM messages WHERE seq = ?", ids)
            return self._db.total_changes - before

    def purge(self) -> int:
        """Erase every queued message (factory reset); returns how many. Not counted as
        drops; the sequence counter and the executed-command ids are kept (numbers are
        never reused). The freed pages are overwritten (``secure_delete``) and the WAL is
        checkpointed, so the erased data does not linger in the file."""
        with self._lock:
            with _db_errors(self.path):
                self._db.execute("PRAGMA secure_delete=ON")
            with self._transaction():
                before = self._db.total_changes
                self._db.execute("DELETE FROM messages")
                erased = self._db.total_changes - before
            with _db_errors(self.path):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return erased

    def __len__(self) -> int:
        with self._lock, _db_errors(self.path):
            return self._count()

    @property
    def next_seq(self) -> int:
        """The sequence number the next message will get."""
        with self._lock, _db_errors(self.path):
            return self._meta("next_seq")

    # -- drops -------------------------------------------------------------------------

    def _dropped_locked(self) -> int:
        return sum(self._meta(f"dropped:{k}") for k in KINDS)

    @property
    def dropped(self) -> int:
        """Messages dropped by the bound since the outbox was created (persistent)."""
        with self._lock, _db_errors(self.path):
            return self._dropped_locked()

    @property
    def dropped_by_kind(self) -> dict[str, int]:
        with self._lock, _db_errors(self.path):
            return {k: self._meta(f"dropped:{k}") for k in KINDS}

    @property
    def unreported_drops(self) -> int:
        with self._lock, _db_errors(self.path):
            return self._dropped_locked() - self._meta("dropped_reported")

    # -- executed commands -------------------------------------------------------------

    def _record_command(self, command_id: str) -> None:
        cur = self._db.execute(
            "INSERT OR IGNORE INTO commands (command_id) VALUES (?)", (command_id,)
        )
        if cur.lastrowid is not None and cur.rowcount:
            self._db.execute(
                "DELETE FROM commands WHERE n <= ?", (cur.lastrowid - self.max_commands,)
            )

    def record_command(self, command_id: str) -> None:
        """Remember ``command_id`` as executed (without enqueueing anything)."""
        with self._lock, self._transaction():
            self._record_command(command_id)

    def command_seen(self, command_id: str) -> bool:
        """Whether ``command_id`` is among the last ``max_commands`` executed commands."""
        with self._lock, _db_errors(self.path):
            row = self._db.execute(
                "SELECT 1 FROM commands WHERE command_id = ?", (command_id,)
            ).fetchone()
        return row is not None
