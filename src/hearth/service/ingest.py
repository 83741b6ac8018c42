"""Ingest: from the broker's shared subscription to the database, losing nothing accepted.

Two parts, split the way python-tuf splits verification from fetching:

* :class:`IngestCore` holds every rule. :meth:`IngestCore.handle` takes one message
  (topic, raw bytes, time of receipt), classifies it and adds it to the current batch; it
  never raises, whatever the input. :meth:`IngestCore.flush` writes the batch in **one**
  transaction and returns the acknowledgement tokens of the messages it made durable.
* :class:`IngestWorker` is the MQTT side: a persistent session (client id per worker,
  ``clean_start=False``) on the ``$share/hearth-ingest/...`` subscriptions at QoS 1, with
  **manual acknowledgement**: a message is PUBACKed only after the transaction that stored
  (or quarantined and counted) it committed. If the worker dies before that, the broker
  still holds the message for the session and delivers it again - to this worker after a
  restart, or to a sibling in the share group. paho's default (ack when ``on_message``
  returns) would lose every message of an uncommitted batch.

Classification of one message, in order::

    topic is a Hearth device topic?           else unknown_topic   (device unknown)
    unit registered?                          else unknown_device  (counted under '')
    unit active?                              else revoked
    topic kind is unit -> cloud?              else unknown_topic
    size, JSON, schema, device id, time, readings (hearth.protocol.parse_*)
                                              else the protocol's Reason
    ------------------------------------------ accepted (provisionally) -----------------
    at flush: telemetry/event (device_id, seq) new            -> stored, 'accepted'
              same seq, same canonical digest (QoS 1 redelivery) -> 'duplicate', dropped
              same seq, different content                     -> replayed_sequence
              command result for a command of *this* unit     -> command row updated
              result for another unit's / no command          -> unknown_command

Every message - good or bad - increments ``ingest_counters[(unit, outcome)]``; refused ones
also leave a quarantine row (topic, reason, detail, a bounded base64 excerpt), at most
``quarantine_rows_per_key`` rows per (unit, reason) per batch so a flooding unit cannot fill
the disk; the counters stay exact.

The unit status is checked again inside the write transaction, so a revocation is honoured
at once even though ``handle`` uses a short-lived cache. A batch the database refuses for
a *data* reason (not a connection or lock problem) is written message by message, and a
message that still cannot be written is quarantined as ``internal_error`` - a poison
message never stalls the stream.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import ValidationError
from hearth.protocol import MAX_PAYLOAD_BYTES, Reason
from hearth.service.db import StorageError, begin_write, is_transient, utcnow
from hearth.service.models import (
    DETAIL_MAX,
    TOPIC_MAX,
    CommandRow,
    CommandStatus,
    EventRow,
    IngestCounter,
    QuarantineRow,
    TelemetryRow,
    Unit,
    UnitStatus,
)

if TYPE_CHECKING:
    from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from hearth.service.mqtt import MqttIdentity

__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "INTERNAL_ERROR",
    "SHARE_GROUP",
    "SUBSCRIPTIONS",
    "IngestCore",
    "IngestWorker",
    "Outcome",
]

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
INTERNAL_ERROR = "internal_error"
"""A message Hearth itself failed on (a bug or a value the database refused)."""
UNKNOWN = ""
"""Counter key for messages not tied to a registered unit."""

SHARE_GROUP = "hearth-ingest"
INGEST_KINDS = ("telemetry", "event", "cmd/result")
SUBSCRIPTIONS = tuple(
    f"$share/{SHARE_GROUP}/{protocol.TOPIC_PREFIX}/+/{kind}" for kind in INGEST_KINDS
)

DEFAULT_BATCH_SIZE = 500
DEFAULT_FLUSH_INTERVAL = 0.05
DEFAULT_EXCERPT_BYTES = 512
DEFAULT_QUARANTINE_ROWS_PER_KEY = 20
UNIT_CACHE_TTL = 30.0
UNKNOWN_CACHE_TTL = 5.0
UNIT_CACHE_MAX = 100_000
_INSERT_CHUNK = 500

_Kind = Literal["telemetry", "event", "cmd/result", ""]


@dataclass(frozen=True)
class Outcome:
    """What :meth:`IngestCore.handle` decided. ``accepted`` is provisional until flush
    (it may still turn out a duplicate or a replay)."""

    reason: str
    device_id: str | None
    detail: str = ""


@dataclass(frozen=True)
class _UnitInfo:
    model: protocol.ModelSpec
    active: bool


@dataclass
class _Entry:
    topic: str
    received_at: dt.datetime
    ack: object
    size: int
    excerpt: bytes
    device_id: str | None = None
    kind: _Kind = ""
    reason: str = ACCEPTED
    detail: str = ""
    msg: protocol.Telemetry | protocol.Event | protocol.CommandResult | None = None
    digest: str = ""
    raw: bytes | None = None  # kept only while the entry still has to be classified
    deferred: bool = False

    def refuse(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        self.msg, self.raw, self.deferred = None, None, False


def _clean(text: str, limit: int) -> str:
    """Printable, encodable and bounded: safe for any database text column and for logs."""
    text = text[:limit * 4]
    if text.isprintable() and text.isascii():
        return text[:limit]
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _digest(msg: protocol.Telemetry | protocol.Event | protocol.CommandResult) -> str:
    """SHA-256 of the canonical form: equal for a redelivery however it was re-encoded."""
    data = msg.model_dump(mode="python")
    data["ts"] = msg.ts.astimezone(dt.UTC).isoformat()
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _has_nul(msg: protocol.Event | protocol.CommandResult) -> bool:
    texts: Iterable[str]
    if isinstance(msg, protocol.Event):
        texts = (msg.detail,)
    else:
        texts = (msg.reason, msg.detail)
    return any("\x00" in t for t in texts)


class _UnitCache:
    """device id -> (model, active), refreshed on a miss, entries expire after a TTL."""

    def __init__(self, session_factory: sessionmaker[Session],
                 clock: Callable[[], float]) -> None:
        self._sf = session_factory
        self._clock = clock
        self._items: collections.OrderedDict[str, tuple[float, _UnitInfo | None]] = (
            collections.OrderedDict()
        )

    def get(self, device_id: str) -> _UnitInfo | None:
        """Raises SQLAlchemyError when it has to ask the database and cannot."""
        now = self._clock()
        hit = self._items.get(device_id)
        if hit is not None and hit[0] > now:
            self._items.move_to_end(device_id)
            return hit[1]
        with self._sf() as session:
            row = session.execute(
                sa.select(Unit.model, Unit.status).where(Unit.device_id == device_id)
            ).first()
        info = _unit_info(row.model, row.status) if row is not None else None
        self.put(device_id, info, now)
        return info

    def put(self, device_id: str, info: _UnitInfo | None, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        ttl = UNIT_CACHE_TTL if info is not None else UNKNOWN_CACHE_TTL
        self._items[device_id] = (now + ttl, info)
        self._items.move_to_end(device_id)
        while len(self._items) > UNIT_CACHE_MAX:
            self._items.popitem(last=False)

    def invalidate(self, device_id: str | None = None) -> None:
        if device_id is None:
            self._items.clear()
        else:
            self._items.pop(device_id, None)


def _unit_info(model: str, status: str) -> _UnitInfo | None:
    spec = protocol.MODELS.get(model)
    if spec is None:  # a model this release does not know: treat as not registered
        return None
    return _UnitInfo(spec, status == UnitStatus.ACTIVE)


@dataclass
class _Stats:
    received: int = 0
    flushes: int = 0
    flush_failures: int = 0
    poison_splits: int = 0
    dropped: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)


class IngestCore:
    """Classifies messages and writes them in batches. Not thread-safe: one per worker.

    ``handle`` never raises. ``flush`` raises :class:`StorageError` (``transient=True``)
    when the database is unavailable; the batch is then kept and the next ``flush``
    retries it.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        excerpt_bytes: int = DEFAULT_EXCERPT_BYTES,
        quarantine_rows_per_key: int = DEFAULT_QUARANTINE_ROWS_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or excerpt_bytes < 0:
            raise ValueError("batch_size >= 1, flush_interval > 0, excerpt_bytes >= 0")
        if quarantine_rows_per_key < 1:
            raise ValueError("quarantine_rows_per_key must be at least 1")
        self._sf = session_factory
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._excerpt_bytes = excerpt_bytes
        self._rows_per_key = quarantine_rows_per_key
        self._clock = clock
        self._units = _UnitCache(session_factory, clock)
        self._batch: list[_Entry] = []
        self._first_pending_at = 0.0
        self._stats = _Stats()

    # -- intake ---------------------------------------------------------------------------

    def handle(
        self,
        topic: str,
        payload: bytes,
        received_at: dt.datetime | None = None,
        *,
        ack: object = None,
    ) -> Outcome:
        """Classify one message and add it to the batch. Never raises.

        ``ack`` is returned by :meth:`flush` once the message is durable.
        """
        try:
            entry = self._intake(topic, payload, received_at, ack)
        except Exception:  # the one place that must survive anything
            log.exception("ingest: unexpected error classifying a message")
            entry = _Entry(topic="?", received_at=utcnow(), ack=ack, size=0, excerpt=b"",
                           reason=INTERNAL_ERROR, detail="internal error while classifying")
        if not self._batch:
            self._first_pending_at = self._clock()
        self._batch.append(entry)
        self._stats.received += 1
        return Outcome(entry.reason, entry.device_id, entry.detail)

    def _intake(
        self, topic: object, payload: object, received_at: object, ack: object
    ) -> _Entry:
        if isinstance(received_at, dt.datetime):
            if received_at.tzinfo is None or received_at.utcoffset() is None:
                received_at = received_at.replace(tzinfo=dt.UTC)
            received_at = received_at.astimezone(dt.UTC)
        else:
            received_at = utcnow()
        if isinstance(topic, bytes | bytearray):
            topic = bytes(topic).decode("utf-8", "replace")
        topic_text = topic if isinstance(topic, str) else ""
        if isinstance(payload, bytearray | memoryview):
            payload = bytes(payload)
        raw = payload if isinstance(payload, bytes) else b""
        entry = _Entry(
            topic=_clean(topic_text, TOPIC_MAX),
            received_at=received_at,
            ack=ack,
            size=len(raw),
            excerpt=raw[: self._excerpt_bytes],
        )
        if not isinstance(payload, bytes):
            entry.refuse(Reason.MALFORMED_JSON, "payload is not bytes")
            return entry
        try:
            device_id, _ = protocol.parse_topic(topic_text)
        except ValidationError as e:
            entry.refuse(e.reason, e.detail)
            return entry
        entry.device_id = device_id
        try:
            unit = self._units.get(device_id)
        except sa.exc.SQLAlchemyError:
            # The database is away: keep the message and classify it when writing the batch.
            log.warning("ingest: unit lookup failed; message deferred to the next flush")
            entry.raw = raw[: MAX_PAYLOAD_BYTES + 1]
            entry.deferred = True
            return entry
        self._classify(entry, topic_text, raw, unit)
        return entry

    def _classify(self, entry: _Entry, topic: str, raw: bytes, unit: _UnitInfo | None) -> None:
        """Fill in ``entry`` from a topic that parsed and the unit it names (or None)."""
        try:
            device_id, kind = protocol.parse_topic(topic)
        except ValidationError as e:  # pragma: no cover - checked by the caller
            entry.refuse(e.reason, e.detail)
            return
        entry.deferred, entry.raw = False, None
        if unit is None:
            entry.device_id = None
            entry.refuse(Reason.UNKNOWN_DEVICE, "no registered unit has this device id")
            return
        entry.device_id = device_id
        if not unit.active:
            entry.refuse(Reason.REVOKED, "unit is revoked")
            return
        if kind not in INGEST_KINDS:
            entry.refuse(Reason.UNKNOWN_TOPIC, "units do not publish on this topic")
            return
        now = entry.received_at
        msg: protocol.Telemetry | protocol.Event | protocol.CommandResult
        try:
            if kind == "telemetry":
                msg = protocol.parse_telemetry(raw, topic_device_id=device_id,
                                               model=unit.model, now=now)
            elif kind == "event":
                msg = protocol.parse_event(raw, topic_device_id=device_id, now=now)
            else:
                msg = protocol.parse_command_result(raw, topic_device_id=device_id,
                                                    model=unit.model, now=now)
        except ValidationError as e:
            entry.refuse(e.reason, e.detail)
            return
        if not isinstance(msg, protocol.Telemetry) and _has_nul(msg):
            entry.refuse(Reason.INVALID_SCHEMA, "text must not contain NUL characters")
            return
        entry.kind = cast(_Kind, kind)
        entry.msg = msg
        entry.digest = _digest(msg)
        entry.reason = ACCEPTED

    # -- batching -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._batch)

    def flush_due(self) -> bool:
        """True when the batch is full or its oldest message waited ``flush_interval``."""
        if not self._batch:
            return False
        return (len(self._batch) >= self.batch_size
                or self._clock() - self._first_pending_at >= self.flush_interval)

    def seconds_until_due(self) -> float | None:
        if not self._batch:
            return None
        return max(0.0, self.flush_interval - (self._clock() - self._first_pending_at))

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget cached unit facts (all, or one unit's)."""
        self._units.invalidate(device_id)

    def flush(self) -> list[object]:
        """Write the batch in one transaction; return the ack tokens now durable, in order.

        Raises :class:`StorageError` (``transient=True``) if the database is unavailable;
        the batch is kept for the next call. Never loses a message: a batch refused for a
        data reason is split and the offending message quarantined as ``internal_error``.
        """
        if not self._batch:
            return []
        batch = self._batch
        try:
            outcomes = self._write(batch)
        except sa.exc.SQLAlchemyError as e:
            self._stats.flush_failures += 1
            if is_transient(e):
                raise StorageError("database unavailable; batch kept for retry",
                                   transient=True) from e
            log.error("ingest: batch refused by the database (%s); writing one by one",
                      type(e).__name__)
            self._stats.poison_splits += 1
            return self._flush_one_by_one()
        self._commit_done(batch, outcomes)
        return [e.ack for e in batch]

    def _commit_done(self, entries: Sequence[_Entry], outcomes: Sequence[_Entry]) -> None:
        done = {id(e) for e in entries}
        self._batch = [e for e in self._batch if id(e) not in done]
        if self._batch:
            self._first_pending_at = self._clock()
        self._stats.flushes += 1
        for e in outcomes:
            self._stats.outcomes[e.reason] += 1

    def _flush_one_by_one(self) -> list[object]:
        acks: list[object] = []
        for entry in list(self._batch):
            try:
                outcomes = self._write([entry])
            except sa.exc.SQLAlchemyError as e:
                if is_transient(e):
                    raise StorageError("database unavailable; batch kept for retry",
                                       transient=True) from e
                log.error("ingest: message refused by the database (%s); quarantined",
                          type(e).__name__)
                poisoned = replace(entry, msg=None, raw=None, deferred=False,
                                   reason=INTERNAL_ERROR, detail="the database refused it")
                try:
                    outcomes = self._write([poisoned])
                except sa.exc.SQLAlchemyError as e2:
                    if is_transient(e2):
                        raise StorageError("database unavailable; batch kept for retry",
                                           transient=True) from e2
                    log.error("ingest: could not even quarantine a message; dropped")
                    self._stats.dropped += 1
                    outcomes = []
            self._commit_done([entry], outcomes)
            acks.append(entry.ack)
        return acks

    # -- the write transaction ------------------------------------------------------------

    def _write(self, batch: Sequence[_Entry]) -> list[_Entry]:
        """One transaction for ``batch``; returns the final entries (copies), unchanged
        input on failure."""
        entries = [replace(e) for e in batch]
        with self._sf() as session, session.begin():
            begin_write(session)
            units = self._lock_units(session, entries)
            for e in entries:
                if e.deferred and e.raw is not None:
                    row = units.get(e.device_id) if e.device_id else None
                    info = _unit_info(row.model, row.status) if row is not None else None
                    self._classify(e, e.topic, e.raw, info)
                elif e.reason == ACCEPTED and e.device_id is not None:
                    # authoritative re-check inside the transaction (revoked since cached?)
                    row = units.get(e.device_id)
                    if row is None:
                        e.device_id = None
                        e.refuse(Reason.UNKNOWN_DEVICE, "no registered unit has this device id")
                    elif row.status != UnitStatus.ACTIVE:
                        e.refuse(Reason.REVOKED, "unit is revoked")
            for did, row in units.items():
                self._units.put(did, _unit_info(row.model, row.status))
            accepted_tel = self._store_series(session, entries, "telemetry", TelemetryRow)
            self._store_series(session, entries, "event", EventRow)
            self._store_results(session, entries)
            self._update_units(session, units, entries, accepted_tel)
            self._store_quarantine(session, entries)
            self._count(session, entries)
        return entries

    @staticmethod
    def _lock_units(session: Session, entries: Sequence[_Entry]) -> dict[str, Unit]:
        ids = sorted({e.device_id for e in entries if e.device_id is not None})
        units: dict[str, Unit] = {}
        for start in range(0, len(ids), _INSERT_CHUNK):
            chunk = ids[start:start + _INSERT_CHUNK]
            stmt = (sa.select(Unit).where(Unit.device_id.in_(chunk))
                    .order_by(Unit.device_id).with_for_update())
            for unit in session.scalars(stmt):
                units[unit.device_id] = unit
        return units

    @staticmethod
    def _insert(session: Session, table: sa.Table) -> Any:
        if session.get_bind().dialect.name == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    def _store_series(
        self,
        session: Session,
        entries: Sequence[_Entry],
        kind: str,
        model: type[TelemetryRow] | type[EventRow],
    ) -> list[_Entry]:
        """Insert accepted telemetry or events idempotently; returns those newly stored."""
        first: dict[tuple[str, int], _Entry] = {}
        for e in entries:
            if e.kind != kind or e.reason != ACCEPTED or e.msg is None or e.device_id is None:
                continue
            key = (e.device_id, e.msg.seq)
            seen = first.get(key)
            if seen is None:
                first[key] = e
            elif seen.digest == e.digest:
                e.reason = DUPLICATE
            else:
                e.refuse(Reason.REPLAYED_SEQUENCE,
                         f"seq {key[1]} was already used for different content")
        if not first:
            return []
        table = model.__table__
        assert isinstance(table, sa.Table)
        ordered = sorted(first.items())
        inserted: set[tuple[str, int]] = set()
        # One cached statement run as "executemany": SQLAlchemy batches it into multi-row
        # INSERT ... ON CONFLICT DO NOTHING RETURNING (insertmanyvalues). Rows that hit the
        # unique (device_id, seq) constraint return nothing; they are resolved below.
        stmt = (self._insert(session, table)
                .on_conflict_do_nothing(index_elements=["device_id", "seq"])
                .returning(table.c.device_id, table.c.seq))
        result = session.execute(stmt, [self._series_row(e) for _, e in ordered])
        inserted.update((r[0], r[1]) for r in result)
        conflicted = [k for k, _ in ordered if k not in inserted]
        stored: dict[tuple[str, int], str] = {}
        for start in range(0, len(conflicted), _INSERT_CHUNK):
            chunk_keys = conflicted[start:start + _INSERT_CHUNK]
            stmt2 = sa.select(table.c.device_id, table.c.seq, table.c.digest).where(
                sa.tuple_(table.c.device_id, table.c.seq).in_(chunk_keys)
            )
            stored.update(((r[0], r[1]), r[2]) for r in session.execute(stmt2))
        for key in conflicted:
            e = first[key]
            if stored.get(key) == e.digest:
                e.reason = DUPLICATE
            else:
                e.refuse(Reason.REPLAYED_SEQUENCE,
                         f"seq {key[1]} was already used for different content")
        return [e for k, e in ordered if k in inserted]

    @staticmethod
    def _series_row(e: _Entry) -> dict[str, Any]:
        msg = e.msg
        assert msg is not None and not isinstance(msg, protocol.CommandResult)
        row: dict[str, Any] = {
            "device_id": e.device_id,
            "seq": msg.seq,
            "ts": msg.ts.astimezone(dt.UTC),
            "received_at": e.received_at,
            "digest": e.digest,
        }
        if isinstance(msg, protocol.Telemetry):
            row["readings"] = dict(msg.readings)
        else:
            row["kind"] = msg.kind
            row["detail"] = msg.detail
        return row

    @staticmethod
    def _store_results(session: Session, entries: Sequence[_Entry]) -> None:
        results = [e for e in entries
                   if e.kind == "cmd/result" and e.reason == ACCEPTED and e.msg is not None]
        results.sort(key=lambda e: e.msg.command_id)  # type: ignore[union-attr]  # lock order
        for e in results:
            msg = e.msg
            assert isinstance(msg, protocol.CommandResult)
            row = session.get(CommandRow, msg.command_id, with_for_update=True)
            if row is None or row.device_id != e.device_id:
                e.refuse(Reason.UNKNOWN_COMMAND, "no such command for this unit")
                continue
            previous = row.result or {}
            if previous.get("source") == "unit":
                if previous.get("digest") == e.digest:
                    e.reason = DUPLICATE
                else:
                    e.refuse(Reason.REPLAYED_SEQUENCE, "command already has a different result")
                continue
            row.status = CommandStatus(msg.status).value
            row.result = {
                "source": "unit",
                "status": msg.status,
                "reason": msg.reason,
                "detail": msg.detail,
                "state": dict(msg.state),
                "seq": msg.seq,
                "ts": msg.ts.astimezone(dt.UTC).isoformat(),
                "digest": e.digest,
            }
            row.completed_at = e.received_at
        session.flush()

    @staticmethod
    def _update_units(
        session: Session,
        units: dict[str, Unit],
        entries: Sequence[_Entry],
        stored_telemetry: Sequence[_Entry],
    ) -> None:
        for e in entries:
            if e.device_id is None:
                continue
            unit = units.get(e.device_id)
            if unit is not None and (unit.last_seen_at is None
                                     or e.received_at > unit.last_seen_at):
                unit.last_seen_at = e.received_at
        by_seq = sorted(stored_telemetry, key=lambda e: e.msg.seq)  # type: ignore[union-attr]
        new_state: dict[str, dict[str, Any]] = {}
        for e in by_seq:
            msg = e.msg
            assert isinstance(msg, protocol.Telemetry) and e.device_id is not None
            unit = units[e.device_id]
            if unit.latest_seq is not None and msg.seq <= unit.latest_seq:
                continue  # an older message arriving late: stored, but not the current state
            state = new_state.setdefault(e.device_id, dict(unit.latest_state or {}))
            state.update(msg.readings)
            unit.latest_seq = msg.seq
            unit.latest_ts = msg.ts.astimezone(dt.UTC)
        for device_id, state in new_state.items():
            units[device_id].latest_state = state
        session.flush()

    def _store_quarantine(self, session: Session, entries: Sequence[_Entry]) -> None:
        per_key: collections.Counter[tuple[str | None, str]] = collections.Counter()
        rows: list[dict[str, Any]] = []
        for e in entries:
            if e.reason in (ACCEPTED, DUPLICATE):
                continue
            key = (e.device_id, e.reason)
            per_key[key] += 1
            if per_key[key] > self._rows_per_key:
                continue
            rows.append({
                "device_id": e.device_id,
                "topic": _clean(e.topic, TOPIC_MAX),
                "reason": e.reason,
                "detail": _clean(e.detail, DETAIL_MAX),
                "payload_size": e.size,
                "payload_excerpt": base64.b64encode(e.excerpt).decode(),
                "received_at": e.received_at,
            })
        if rows:
            session.execute(sa.insert(QuarantineRow), rows)

    def _count(self, session: Session, entries: Sequence[_Entry]) -> None:
        counts: collections.Counter[tuple[str, str]] = collections.Counter(
            (e.device_id or UNKNOWN, e.reason) for e in entries
        )
        if not counts:
            return
        table = IngestCounter.__table__
        assert isinstance(table, sa.Table)
        rows = [{"device_id": d, "reason": r, "count": n} for (d, r), n in sorted(counts.items())]
        for start in range(0, len(rows), _INSERT_CHUNK):
            stmt = self._insert(session, table).values(rows[start:start + _INSERT_CHUNK])
            stmt = stmt.on_conflict_do_update(
                index_elements=["device_id", "reason"],
                set_={"count": table.c["count"] + stmt.excluded["count"]},
            )
            session.execute(stmt)

    # -- observability --------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters since this core started (the database holds the lasting ones)."""
        s = self._stats
        out = {
            "received": s.received,
            "pending": len(self._batch),
            "flushes": s.flushes,
            "flush_failures": s.flush_failures,
            "poison_splits": s.poison_splits,
            "dropped": s.dropped,
            "accepted": s.outcomes[ACCEPTED],
            "duplicate": s.outcomes[DUPLICATE],
            "quarantined": sum(n for r, n in s.outcomes.items()
                               if r not in (ACCEPTED, DUPLICATE)),
        }
        for reason, n in sorted(s.outcomes.items()):
            if reason not in (ACCEPTED, DUPLICATE):
                out[f"quarantined.{reason}"] = n
        return out


class IngestWorker:
    """Runs an :class:`IngestCore` on the broker's shared ingest subscriptions.

    Threads: paho's network loop puts messages on a queue; one worker thread classifies,
    flushes and then acknowledges (``manual_ack``) what was committed. When the database
    is unavailable the worker keeps the batch, backs off and retries; unacknowledged
    messages stay with the broker (MQTT v5 Receive Maximum bounds how many are in flight).
    Acks of messages received on an earlier connection are not sent - the broker
    redelivers those on the resumed session, and the copy is counted as a duplicate.
    """

    def __init__(
        self,
        identity: MqttIdentity,
        core: IngestCore,
        *,
        client_id: str | None = None,
        session_expiry: int = 3600,
        max_backoff: float = 5.0,
    ) -> None:
        self._identity = identity
        self._core = core
        self._client_id = client_id or identity.client_id
        self._session_expiry = session_expiry
        self._max_backoff = max_backoff
        self._queue: queue.SimpleQueue[tuple[int, MQTTMessage, dt.datetime]] = (
            queue.SimpleQueue()
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._generation = 0
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._acked = 0
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def start(self) -> None:
        """Connect (in the background, retrying) and start consuming."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from hearth.service.mqtt import make_client

        if self._thread is not None:
            raise RuntimeError("worker already started")
        client = make_client(self._identity, client_id=self._client_id, clean_start=False,
                             session_expiry=self._session_expiry)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = min(65535, max(self._core.batch_size * 2, 20))
        client.connect_async(self._identity.host, self._identity.port,
                             clean_start=False, properties=props)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client = client
        self._thread = threading.Thread(target=self._run, name="hearth-ingest", daemon=True)
        self._thread.start()
        client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what can be flushed, acknowledge it, disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()
        self._subscribed.clear()

    def stats(self) -> dict[str, int]:
        out = self._core.stats()
        out["queued"] = self._queue.qsize()
        out["acked"] = self._acked
        out["connected"] = int(self.connected)
        return out

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, client: Client, _userdata: object, _flags: ConnectFlags,
                    reason: ReasonCode, _props: Properties | None) -> None:
        if reason.is_failure:
            log.warning("ingest: broker refused the connection: %s", reason)
            return
        with self._lock:
            self._generation += 1
        self._connected.set()
        client.subscribe([(t, 1) for t in SUBSCRIPTIONS])

    def _on_subscribe(self, _client: Client, _userdata: object, _mid: int,
                      reasons: list[ReasonCode], _props: Properties | None) -> None:
        if any(r.is_failure for r in reasons):
            log.error("ingest: the broker refused a subscription: %s", reasons)
            return
        self._subscribed.set()

    def _on_disconnect(self, _client: Client, _userdata: object, _flags: DisconnectFlags,
                       reason: ReasonCode, _props: Properties | None) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("ingest: disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, _client: Client, _userdata: object, message: MQTTMessage) -> None:
        self._queue.put((self._generation, message, utcnow()))

    # -- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            wait = self._core.seconds_until_due()
            try:
                item = self._queue.get(timeout=0.2 if wait is None else max(wait, 0.001))
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item)
                if self._core.pending >= self._core.batch_size:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if self._core.flush_due():
                if self._flush():
                    backoff = 0.1
                else:
                    log.warning("ingest: retrying the batch in %.1fs", backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
        # Stopping: one last attempt for what is already classified. Anything still queued
        # or not committed is unacknowledged, so the broker keeps it for the next start.
        if self._core.pending:
            self._flush()

    def _flush(self) -> bool:
        try:
            acks = self._core.flush()
        except StorageError as e:
            log.warning("ingest: %s", e)
            return False
        except Exception:  # the worker must not die
            log.exception("ingest: unexpected error while flushing")
            return False
        self._ack(acks)
        return True

    def _take(self, item: tuple[int, MQTTMessage, dt.datetime]) -> None:
        generation, message, received_at = item
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<undecodable topic>"
        self._core.handle(topic, bytes(message.payload), received_at,
                          ack=(generation, message.mid, message.qos))

    def _ack(self, acks: Iterable[object]) -> None:
        client = self._client
        if client is None:
            return
        with self._lock:
            generation = self._generation
        for token in acks:
            if not isinstance(token, tuple):
                continue
            gen, mid, qos = token
            if gen != generation or qos == 0:
                continue
            try:
                client.ack(mid, qos)
                self._acked += 1
            except Exception:  # noqa: BLE001 - a lost ack means a redelivery, not a loss
                log.warning("ingest: could not acknowledge a message; it will be redelivered")
