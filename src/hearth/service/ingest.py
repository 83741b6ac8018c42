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
  restart, or to a sibling in the share group. (An MQTT client that acknowledges when
  the message callback returns - paho's default - would lose every message of an
  uncommitted batch.) The MQTT client is :mod:`hearth.service.subscriber`.

Classification of one message, in order::

    topic is a Hearth device topic?           else unknown_topic   (device unknown)
    unit registered?                          else unknown_device  (counted under '')
    unit active?                              else revoked
    topic kind is unit -> cloud?              else unknown_topic
    size, JSON, schema, device id, time, readings (hearth.protocol.parse_*)
                                              else the protocol's Reason
    ------------------------------------------ accepted (provisionally) -----------------
    at flush: telemetry/event (device_id, seq) new            -> stored, 'accepted'
              same seq, same content (QoS 1 redelivery)        -> 'duplicate', dropped
              same seq, different content                     -> replayed_sequence
              command result for a command of *this* unit     -> command row updated
              result for another unit's / no command          -> unknown_command

Every message - good or bad - is counted per (unit, outcome), in the batch's transaction:
accepted ones in ``units.accepted_count`` (in the unit's one update per batch), the others
in ``ingest_counters`` (:func:`counts` reads both). Refused ones also leave a quarantine
row (topic, reason, detail, a bounded base64 excerpt), at most ``quarantine_rows_per_key``
rows per (unit, reason) per batch so a flooding unit cannot fill the disk; the counters
stay exact.

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
import functools
import gc
import hashlib
import json
import logging
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import psycopg
import pydantic_core
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import ValidationError
from hearth.protocol import MAX_PAYLOAD_BYTES, Reason
from hearth.service.config import INGEST_BATCH_SIZE, INGEST_FLUSH_MS
from hearth.service.db import StorageError, is_transient, utcnow, write_transaction
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
from hearth.service.subscriber import Message, Subscriber

if TYPE_CHECKING:
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
    "counts",
    "totals",
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

DEFAULT_BATCH_SIZE = INGEST_BATCH_SIZE
DEFAULT_FLUSH_INTERVAL = INGEST_FLUSH_MS / 1000
DEFAULT_EXCERPT_BYTES = 512
DEFAULT_QUARANTINE_ROWS_PER_KEY = 20
DEFAULT_WRITE_TIMEOUT = 20.0
"""Seconds a batch's transaction may take on PostgreSQL before it is cancelled and retried.

The worker reads, flushes and acknowledges on one thread, so a write that hangs (a lock
held elsewhere, a stalled server) also stops its keepalive; past 1.5 x keepalive (90 s)
the broker would drop the session. 20 s keeps the thread's longest stall well inside
that; the batch is kept and retried with backoff. (SQLite's bound is its busy timeout.)"""
UNIT_CACHE_TTL = 30.0
UNKNOWN_CACHE_TTL = 5.0
UNIT_CACHE_MAX = 100_000
_INSERT_CHUNK = 500
_GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two collections of the youngest generation in a process that
runs ingest workers (see IngestWorker.start)."""
_TOPIC_CACHE_MAX = 65_536
"""Device topics whose parse is remembered (a dict lookup instead of a regex match per
message); emptied when full, then filled again by the topics in use."""

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


@dataclass(slots=True)
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
    digest: str = ""  # events and command results (see _digest); telemetry has none
    raw: bytes | None = None  # kept only while the entry still has to be classified
    deferred: bool = False
    ts: dt.datetime | None = None  # msg.ts in UTC
    readings_json: str = ""  # accepted telemetry: its readings' JSON (set by _classify)

    def refuse(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        self.msg, self.raw, self.deferred = None, None, False

    def copy(self) -> _Entry:
        return _Entry(self.topic, self.received_at, self.ack, self.size, self.excerpt,
                      self.device_id, self.kind, self.reason, self.detail, self.msg,
                      self.digest, self.raw, self.deferred, self.ts, self.readings_json)


def _clean(text: str, limit: int) -> str:
    """Printable, encodable and bounded: safe for any database text column and for logs."""
    text = text[:limit * 4]
    if text.isprintable() and text.isascii():
        return text[:limit]
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _make_canonical() -> Callable[[object], str]:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)``, about
    twice as fast: the C encoder ``JSONEncoder.encode`` builds on every call is built
    once here (without the circular-reference check: messages are flat). A test pins
    equality."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode
    encode = make(None, str, json.encoder.encode_basestring_ascii, None, ":", ",",
                  True, False, True)

    def dumps(obj: object) -> str:
        return "".join(encode(obj, 0))

    return dumps


_canonical = _make_canonical()
"""The canonical JSON (sorted keys): what event and command-result digests hash."""


def _readings_json(readings: Mapping[str, object]) -> str:
    """Stored telemetry readings (and a unit's latest-state delta): compact JSON in the
    message's key order (compared as values, never as text). pydantic-core's encoder,
    about three times as fast as ``json.dumps``: the values are ones the schema parsed
    (finite floats, bools, strings), and their shortest round-trip form comes back equal
    (a test pins it for every kind of value)."""
    return pydantic_core.to_json(readings).decode()


_sha256 = hashlib.sha256


def _digest(msg: protocol.Telemetry | protocol.Event | protocol.CommandResult) -> str:
    """SHA-256 of the canonical form: equal for a redelivery however it was re-encoded.

    The canonical form is the JSON (sorted keys, no spaces) of the message's fields with
    ``ts`` in UTC ISO 8601. It is stored with the row, so it must never change: the
    messages are flat pydantic models (no aliases, no nested models), so their field
    dict is what ``model_dump(mode="python")`` would give (a test pins the equality).
    Telemetry has no digest: it is compared by content (:func:`_same_telemetry`).
    """
    data = dict(msg.__dict__)
    data["ts"] = _utc(msg.ts).isoformat()
    return _sha256(_canonical(data).encode()).hexdigest()


def _same_telemetry(ts: dt.datetime, readings: object,
                    msg: protocol.Telemetry, msg_ts: dt.datetime) -> bool:
    """Whether stored telemetry (its ``ts`` and ``readings`` as read back from the
    database) is the same message as ``msg`` (with ``msg_ts`` = ``msg.ts`` in UTC).

    The rest of a telemetry message is its key (device id, seq) and the version, so this
    is exact: no hash stands in for the content. The schema parses every number as a
    float; a JSON column may give a whole number back as an int (PostgreSQL's ``jsonb``
    stores numerics), so ints are compared as floats - but never a bool as a number.
    """
    if _utc(ts) != msg_ts or not isinstance(readings, dict):
        return False
    new = msg.readings
    if readings.keys() != new.keys():
        return False
    for name, value in new.items():
        old = readings[name]
        if type(old) is int:
            old = float(old)
        if type(old) is not type(value) or old != value:
            return False
    return True


def _stored_form(e: _Entry) -> tuple[Any, ...]:
    """What :meth:`IngestCore._stored_rows` reads back for a stored message like ``e``:
    telemetry ``(ts, readings)``, events ``(digest,)``."""
    if e.kind == "telemetry":
        return e.ts, e.msg.readings  # type: ignore[union-attr]
    return (e.digest,)


def _settle_reused_key(e: _Entry, stored: tuple[Any, ...] | None) -> None:
    """``e`` reuses a (unit, seq) key held by ``stored`` (its stored form, None if gone):
    the same message again is a duplicate, anything else a replay."""
    same = stored is not None and (
        _same_telemetry(stored[0], stored[1], e.msg, e.ts)  # type: ignore[arg-type]
        if e.kind == "telemetry" else stored[0] == e.digest)
    if same:
        e.reason = DUPLICATE
    else:
        e.refuse(Reason.REPLAYED_SEQUENCE,
                 f"seq {e.msg.seq} was already used for different content")  # type: ignore[union-attr]


def _has_nul(msg: protocol.Event | protocol.CommandResult) -> bool:
    texts: Iterable[str]
    if isinstance(msg, protocol.Event):
        texts = (msg.detail,)
    else:
        texts = (msg.reason, msg.detail)
    return any("\x00" in t for t in texts)

def _raise_if_transient(error: sa.exc.SQLAlchemyError) -> None:
    """A connection or lock problem is not the batch's fault: keep it and retry later."""
    if is_transient(error):
        raise StorageError("database unavailable; batch kept for retry",
                           transient=True) from error


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo is dt.UTC else ts.astimezone(dt.UTC)


class _LockedUnit:
    """The columns of a unit row locked by a write transaction, and what it changes.

    ``delta`` is what newly stored telemetry adds to the unit's latest state (readings
    merged in sequence order); the database merges it into the stored state itself
    (``||`` on PostgreSQL, ``json_patch`` on SQLite), so the state is never read here.
    ``delta_json`` is its JSON when already known (one message: its readings JSON).
    ``accepted`` is how many of the batch's messages were accepted for it.
    """

    __slots__ = ("accepted", "delta", "delta_json", "last_seen_at", "latest_seq", "latest_ts",
                 "model", "seen_moved", "status", "whole")

    def __init__(self, model: str, status: str, last_seen_at: dt.datetime | None,
                 latest_seq: int | None) -> None:
        self.model, self.status = model, status
        self.last_seen_at, self.latest_seq = last_seen_at, latest_seq
        self.latest_ts: dt.datetime | None = None
        self.delta: dict[str, Any] | None = None
        self.delta_json: str | None = None
        self.whole = False  # the delta has every reading of the unit's model
        self.accepted = 0
        self.seen_moved = False  # last_seen_at was moved on

    def set_state(self, delta: dict[str, Any], delta_json: str | None, newest: _Entry) -> None:
        """The delta that newly stored telemetry makes, up to its ``newest`` message."""
        names = _READING_NAMES.get(self.model)
        self.delta = delta
        self.delta_json = _readings_json(delta) if delta_json is None else delta_json
        self.whole = names is not None and delta.keys() >= names
        self.latest_seq = cast(protocol.Telemetry, newest.msg).seq
        self.latest_ts = newest.ts


def _table(model: type[Any]) -> sa.Table:
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table


_UNITS = _table(Unit)
_TELEMETRY = _table(TelemetryRow)
_EVENTS = _table(EventRow)
_COUNTERS = _table(IngestCounter)
if (_UNITS.name, _TELEMETRY.name, _EVENTS.name, _COUNTERS.name) != (
        "units", "telemetry", "events", "ingest_counters"):  # pragma: no cover
    raise RuntimeError("ingest's PostgreSQL statements name tables that were renamed")

# PostgreSQL: one array parameter per column; the statements are short and fixed, so
# psycopg parses each once and prepares it on the server.
_PG_INSERT_TELEMETRY = """\
WITH v AS (
  SELECT * FROM unnest(%b::text[], %b::bigint[], %b::timestamptz[], %b::timestamptz[],
                       %b::json[])
    AS v(device_id, seq, ts, received_at, readings)
), ins AS (
  INSERT INTO telemetry (device_id, seq, ts, received_at, readings)
  SELECT * FROM v
  ON CONFLICT (device_id, seq) DO NOTHING
  RETURNING device_id, seq
)
SELECT v.device_id, v.seq FROM v LEFT JOIN ins USING (device_id, seq) WHERE ins.seq IS NULL"""
_PG_COPY_TELEMETRY = ("COPY telemetry (device_id, seq, ts, received_at, readings) "
                      "FROM STDIN (FORMAT BINARY)")
"""Rows past their unit's latest stored seq (see _insert_telemetry_pg). The readings go
as text: in binary COPY the server reads a ``json`` field with ``json_recv``, which takes
the JSON text and checks it as ``json_in`` does."""
_PG_COPY_TYPES = ("text", "int8", "timestamptz", "timestamptz", "text")
_PG_INSERT_EVENTS = """\
WITH v AS (
  SELECT * FROM unnest(%b::text[], %b::bigint[], %b::timestamptz[], %b::timestamptz[],
                       %b::text[], %b::text[], %b::text[])
    AS v(device_id, seq, ts, received_at, digest, kind, detail)
), ins AS (
  INSERT INTO events (device_id, seq, ts, received_at, digest, kind, detail)
  SELECT * FROM v
  ON CONFLICT (device_id, seq) DO NOTHING
  RETURNING device_id, seq
)
SELECT v.device_id, v.seq FROM v LEFT JOIN ins USING (device_id, seq) WHERE ins.seq IS NULL"""
# NO KEY UPDATE: the lock a revocation's UPDATE of the unit row needs too, so the two are
# serialised; a plain FOR UPDATE would also hold up every row inserted meanwhile that
# references the unit (a command from the API: its foreign-key check), for no reason.
_PG_LOCK_UNITS = """\
SELECT device_id, model, status, last_seen_at, latest_seq FROM units
WHERE device_id = ANY(%b::text[]) ORDER BY device_id FOR NO KEY UPDATE"""
# (both return the keys that were *not* inserted: usually none, so nothing to fetch)
_PG_SELECT_STORED = {
    "telemetry": """\
SELECT t.device_id, t.seq, t.ts, t.readings
FROM telemetry AS t JOIN unnest(%b::text[], %b::bigint[]) AS k(device_id, seq)
  ON t.device_id = k.device_id AND t.seq = k.seq""",
    "events": """\
SELECT t.device_id, t.seq, t.digest
FROM events AS t JOIN unnest(%b::text[], %b::bigint[]) AS k(device_id, seq)
  ON t.device_id = k.device_id AND t.seq = k.seq""",
}
_PG_UPDATE_UNITS = """\
UPDATE units AS u SET
  last_seen_at = v.seen,
  accepted_count = u.accepted_count + v.accepted,
  latest_seq = CASE WHEN v.state IS NULL THEN u.latest_seq ELSE v.seq END,
  latest_ts = CASE WHEN v.state IS NULL THEN u.latest_ts ELSE v.ts END,
  latest_state = CASE WHEN v.state IS NULL THEN u.latest_state
                      WHEN v.whole THEN v.state
                      ELSE COALESCE(u.latest_state, '{}'::jsonb) || v.state END
FROM unnest(%b::text[], %b::timestamptz[], %b::bigint[], %b::timestamptz[], %b::jsonb[],
            %b::bigint[], %b::boolean[])
  AS v(device_id, seen, seq, ts, state, accepted, whole)
WHERE u.device_id = v.device_id"""
_PG_UPSERT_COUNTERS = """\
INSERT INTO ingest_counters (device_id, reason, "count")
SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])
ON CONFLICT (device_id, reason) DO UPDATE
SET "count" = ingest_counters."count" + excluded."count\""""


_SQLITE_SERIES_COLUMNS = {
    "telemetry": ("device_id", "seq", "ts", "received_at", "readings"),
    "events": ("device_id", "seq", "ts", "received_at", "digest", "kind", "detail"),
}


@functools.lru_cache(maxsize=64)
def _sqlite_insert_sql(table: str, rows: int) -> str:
    cols = _SQLITE_SERIES_COLUMNS[table]  # KeyError for any other name: fixed SQL only
    one = "(" + ",".join("?" * len(cols)) + ")"
    return (f"INSERT INTO {table} ({', '.join(cols)}) "  # noqa: S608 - names are constants
            f"VALUES {','.join([one] * rows)} "
            "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")


def _sqlite_ts(ts: dt.datetime | None) -> str | None:
    """An aware datetime as SQLAlchemy stores ``UTCDateTime`` in SQLite: UTC wall time,
    always with microseconds (``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    if ts is None:
        return None
    return _utc(ts).isoformat(" ", "microseconds")[:26]  # without the "+00:00"


# SQLite: plain statements run as executemany with values already in storage form (one
# writer at a time; no array types). The same SQL SQLAlchemy compiles for these tables.
_SQLITE_UPSERT_COUNTERS = (
    "INSERT INTO ingest_counters (device_id, reason, count) VALUES (?, ?, ?) "
    "ON CONFLICT (device_id, reason) DO UPDATE SET count = ingest_counters.count + excluded.count")
_SQLITE_LOCK_UNITS = (  # SQLite's write lock is taken by BEGIN IMMEDIATE; no row locks
    sa.select(_UNITS.c.device_id, _UNITS.c.model, _UNITS.c.status, _UNITS.c.last_seen_at,
              _UNITS.c.latest_seq)
    .where(_UNITS.c.device_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(_UNITS.c.device_id))
_SQLITE_UPDATE_SEEN = (
    "UPDATE units SET last_seen_at = ?, accepted_count = accepted_count + ? "
    "WHERE device_id = ?")
_SQLITE_UPDATE_STATE = (
    "UPDATE units SET last_seen_at = ?, accepted_count = accepted_count + ?, latest_seq = ?, "
    "latest_ts = ?, latest_state = CASE WHEN ? THEN json(?) "
    "ELSE json_patch(coalesce(latest_state, '{}'), ?) END WHERE device_id = ?")
_READING_NAMES = {name: frozenset(spec.readings) for name, spec in protocol.MODELS.items()}
"""A model's readings: a delta that has them all replaces a unit's state (see
_update_units)."""

_reason_of = operator.attrgetter("reason")


class _StoredPastLatestSeq(Exception):
    """A telemetry key past its unit's ``latest_seq`` was already stored (see
    :meth:`IngestCore._write`)."""


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

    def preload(self) -> int:
        """Cache up to ``UNIT_CACHE_MAX`` units in one query (instead of one lookup per
        unit as each is first heard from); returns how many."""
        now = self._clock()
        with self._sf() as session:
            rows = session.execute(
                sa.select(Unit.device_id, Unit.model, Unit.status).limit(UNIT_CACHE_MAX)
            ).all()
        for row in rows:
            self.put(row.device_id, _unit_info(row.model, row.status), now)
        return len(rows)

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


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Messages per (device id, outcome) as the ingest counted them: accepted ones from
    ``units.accepted_count``, every other outcome from ``ingest_counters`` (device id
    ``""``: messages not tied to a registered unit)."""
    out = {(c.device_id, c.reason): c.count for c in session.scalars(sa.select(IngestCounter))}
    for device_id, n in session.execute(
            sa.select(Unit.device_id, Unit.accepted_count).where(Unit.accepted_count > 0)):
        out[(device_id, ACCEPTED)] = n
    return out


def totals(session: Session) -> dict[str, int]:
    """Messages per outcome over all units (what :func:`counts` sums to), by reason."""
    out = {reason: int(n) for reason, n in session.execute(
        sa.select(IngestCounter.reason, sa.func.sum(IngestCounter.count))
        .group_by(IngestCounter.reason))}
    accepted = session.scalar(sa.select(sa.func.sum(Unit.accepted_count)))
    if accepted:
        out[ACCEPTED] = int(accepted)
    return dict(sorted(out.items()))


def _series_params(kind: str, rows: Sequence[tuple[tuple[str, int], _Entry]]
                   ) -> tuple[list[Any], ...]:
    """The array parameters of a PostgreSQL telemetry or events insert."""
    columns: tuple[list[Any], ...] = (
        [k[0] for k, _ in rows], [k[1] for k, _ in rows],
        [e.ts for _, e in rows], [e.received_at for _, e in rows])
    if kind == "telemetry":
        return (*columns, [e.readings_json for _, e in rows])
    return (*columns, [e.digest for _, e in rows],
            [e.msg.kind for _, e in rows],  # type: ignore[union-attr]
            [e.msg.detail for _, e in rows])  # type: ignore[union-attr]


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
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or excerpt_bytes < 0:
            raise ValueError("batch_size >= 1, flush_interval > 0, excerpt_bytes >= 0")
        if quarantine_rows_per_key < 1:
            raise ValueError("quarantine_rows_per_key must be at least 1")
        if not 0 < write_timeout <= 3600:
            raise ValueError("write_timeout must be in (0, 3600] seconds")
        # set_config takes text; the value is our own number, in milliseconds
        self._pg_timeout_sql = (
            f"SELECT set_config('statement_timeout', '{max(1, round(write_timeout * 1000))}', "
            "true)")
        self._engine = session_factory.kw["bind"]
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._excerpt_bytes = excerpt_bytes
        self._rows_per_key = quarantine_rows_per_key
        self._clock = clock
        self._units = _UnitCache(session_factory, clock)
        self._batch: list[_Entry] = []
        self._first_pending_at = 0.0
        self._stats = _Stats()
        self._accepted_outcomes: dict[str, Outcome] = {}
        self._topics: dict[str, tuple[str, str]] = {}  # device topics already parsed

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
        batch = self._batch
        if not batch:
            self._first_pending_at = self._clock()
        batch.append(entry)
        self._stats.received += 1
        if entry.reason == ACCEPTED and entry.device_id is not None:
            outcome = self._accepted_outcomes.get(entry.device_id)
            if outcome is None:  # immutable: one per unit, reused
                if len(self._accepted_outcomes) >= UNIT_CACHE_MAX:
                    self._accepted_outcomes.clear()
                outcome = Outcome(ACCEPTED, entry.device_id)
                self._accepted_outcomes[entry.device_id] = outcome
            return outcome
        return Outcome(entry.reason, entry.device_id, entry.detail)

    def _intake(
        self, topic: object, payload: object, received_at: object, ack: object
    ) -> _Entry:
        if isinstance(received_at, dt.datetime):
            if received_at.tzinfo is not dt.UTC:
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
        parsed = self._topics.get(topic_text)
        if parsed is None:
            try:
                parsed = protocol.parse_topic(topic_text)
            except ValidationError as e:
                entry = _Entry(_clean(topic_text, TOPIC_MAX), received_at, ack, len(raw),
                               raw[: self._excerpt_bytes])
                entry.refuse(e.reason, e.detail)
                return entry
            if len(self._topics) >= _TOPIC_CACHE_MAX:
                self._topics.clear()
            self._topics[topic_text] = parsed
        device_id, kind = parsed
        # a device topic is short printable ASCII: nothing to clean
        entry = _Entry(topic_text, received_at, ack, len(raw), raw[: self._excerpt_bytes])
        if not isinstance(payload, bytes):
            entry.refuse(Reason.MALFORMED_JSON, "payload is not bytes")
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
        self._classify(entry, device_id, kind, raw, unit)
        return entry

    def _classify(self, entry: _Entry, device_id: str, kind: str, raw: bytes,
                  unit: _UnitInfo | None) -> None:
        """Fill in ``entry`` from a topic that parsed and the unit it names (or None)."""
        entry.deferred, entry.raw = False, None
        if unit is None:
            entry.device_id = None
            entry.refuse(Reason.UNKNOWN_DEVICE, "no registered unit has this device id")
            return
        entry.device_id = device_id
        if not unit.active:
            entry.refuse(Reason.REVOKED, "unit is revoked")
            return
        try:
            msg, entry.ts = protocol.parse_uplink(kind, raw, topic_device_id=device_id,
                                                  model=unit.model, now=entry.received_at)
        except ValidationError as e:
            entry.refuse(e.reason, e.detail)
            return
        if isinstance(msg, protocol.Telemetry):
            entry.readings_json = _readings_json(msg.readings)
        elif _has_nul(msg):
            entry.refuse(Reason.INVALID_SCHEMA, "text must not contain NUL characters")
            return
        else:
            entry.digest = _digest(msg)
        entry.kind = cast(_Kind, kind)
        entry.msg = msg
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

    def preload_units(self) -> int:
        """Fill the unit cache in one query; returns how many units it holds.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database cannot be read.
        """
        return self._units.preload()

    def invalidate(self, device_id: str | None = None) -> None:
        """Forget cached unit facts (all, or one unit's)."""
        self._units.invalidate(device_id)

    def flush(self) -> list[object]:
        """Write the batch in one transaction; return the ack tokens now durable, in order.

        Raises :class:`StorageError` (``transient=True``) if the database is unavailable
        or (PostgreSQL) the transaction outlasts ``write_timeout``;
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
            _raise_if_transient(e)
            log.error("ingest: batch refused by the database (%s); writing one by one",
                      type(e).__name__)
            self._stats.poison_splits += 1
            return self._flush_one_by_one()
        self._commit_done(batch, outcomes)
        return [e.ack for e in batch]

    def _commit_done(self, entries: Sequence[_Entry], outcomes: Sequence[_Entry]) -> None:
        if entries is self._batch:
            self._batch = []
        else:
            done = {id(e) for e in entries}
            self._batch = [e for e in self._batch if id(e) not in done]
            if self._batch:
                self._first_pending_at = self._clock()
        self._stats.flushes += 1
        self._stats.outcomes.update(map(_reason_of, outcomes))

    def _flush_one_by_one(self) -> list[object]:
        acks: list[object] = []
        for entry in list(self._batch):
            try:
                outcomes = self._write([entry])
            except sa.exc.SQLAlchemyError as e:
                _raise_if_transient(e)
                log.error("ingest: message refused by the database (%s); quarantined",
                          type(e).__name__)
                poisoned = replace(entry, msg=None, raw=None, deferred=False,
                                   reason=INTERNAL_ERROR, detail="the database refused it")
                try:
                    outcomes = self._write([poisoned])
                except sa.exc.SQLAlchemyError as e2:
                    _raise_if_transient(e2)
                    log.error("ingest: could not even quarantine a message; dropped")
                    self._stats.dropped += 1
                    outcomes = []
            self._commit_done([entry], outcomes)
            acks.append(entry.ack)
        return acks

    # -- the write transaction ------------------------------------------------------------
    #
    # Core statements only (no ORM units of work on the hot path). On PostgreSQL the bulk
    # statements take one array parameter per column (``unnest``): one short statement per
    # table and batch, whatever the batch size, so psycopg parses it once and the server
    # runs it as a prepared statement. On SQLite (one writer at a time, no arrays) plain
    # multi-row / executemany statements take values already in storage form.

    def _write(self, batch: Sequence[_Entry]) -> list[_Entry]:
        """One transaction for ``batch``; returns the final entries (copies), unchanged
        input on failure.

        On PostgreSQL, telemetry past its unit's ``latest_seq`` is copied in without a
        conflict check (:meth:`_insert_telemetry_pg`); should such a row be stored after
        all, the transaction is rolled back and written again with every row checked. (A
        savepoint around the copy would cost every batch two more statements.)"""
        try:
            return self._transaction(batch, copy_new=True)
        except _StoredPastLatestSeq:
            log.warning("ingest: telemetry is stored past a unit's latest seq; the batch is "
                        "written again with a conflict check on every row")
            return self._transaction(batch, copy_new=False)

    def _transaction(self, batch: Sequence[_Entry], *, copy_new: bool) -> list[_Entry]:
        entries = [e.copy() for e in batch]
        with write_transaction(self._engine) as conn:
            pg = conn.dialect.name == "postgresql"
            if pg:  # every statement of this transaction (SET LOCAL): see write_timeout
                conn.exec_driver_sql(self._pg_timeout_sql)
            units = self._lock_units(conn, pg, entries)
            accepted: dict[str, list[_Entry]] = {"telemetry": [], "event": [], "cmd/result": []}
            for e in entries:
                if e.deferred and e.raw is not None:
                    row = units.get(e.device_id) if e.device_id else None
                    info = _unit_info(row.model, row.status) if row is not None else None
                    try:
                        device_id, kind = protocol.parse_topic(e.topic)
                    except ValidationError as err:  # pragma: no cover - parsed at intake
                        e.refuse(err.reason, err.detail)
                        continue
                    self._classify(e, device_id, kind, e.raw, info)
                elif e.reason == ACCEPTED and e.device_id is not None:
                    # authoritative re-check inside the transaction (revoked since cached?)
                    row = units.get(e.device_id)
                    if row is None:
                        e.device_id = None
                        e.refuse(Reason.UNKNOWN_DEVICE, "no registered unit has this device id")
                    elif row.status != UnitStatus.ACTIVE:
                        e.refuse(Reason.REVOKED, "unit is revoked")
                if e.reason == ACCEPTED and e.msg is not None and e.device_id is not None:
                    accepted[e.kind].append(e)
            for did, row in units.items():
                self._units.put(did, _unit_info(row.model, row.status))
            stored_tel = self._store_series(conn, pg, accepted["telemetry"], TelemetryRow,
                                            units, copy_new=copy_new)
            if accepted["event"]:
                self._store_series(conn, pg, accepted["event"], EventRow, units)
            if accepted["cmd/result"]:
                self._store_results(conn, accepted["cmd/result"])
            self._update_units(conn, pg, units, entries, stored_tel)
            others = [e for e in entries if e.reason != ACCEPTED]  # usually none
            if others:
                self._store_quarantine(conn, others)
                self._count(conn, pg, others)
        return entries

    @staticmethod
    def _lock_units(conn: sa.Connection, pg: bool,
                    entries: Sequence[_Entry]) -> dict[str, _LockedUnit]:
        ids = sorted({e.device_id for e in entries if e.device_id is not None})
        units: dict[str, _LockedUnit] = {}
        if not ids:
            return units
        if pg:  # one array parameter: the same short statement for any number of units
            # .all(): one fetch (iterating a result fetches row by row, in Python)
            for r in conn.exec_driver_sql(_PG_LOCK_UNITS, (ids,)).all():
                units[r[0]] = _LockedUnit(r[1], r[2], r[3], r[4])
            return units
        for start in range(0, len(ids), _INSERT_CHUNK):
            chunk = ids[start:start + _INSERT_CHUNK]
            for r in conn.execute(_SQLITE_LOCK_UNITS, {"ids": chunk}).all():
                units[r[0]] = _LockedUnit(r[1], r[2], r[3], r[4])
        return units

    def _store_series(
        self,
        conn: sa.Connection,
        pg: bool,
        accepted: Sequence[_Entry],
        model: type[TelemetryRow] | type[EventRow],
        units: dict[str, _LockedUnit],
        *,
        copy_new: bool = False,
    ) -> list[_Entry]:
        """Insert accepted telemetry or events (``accepted``: of one kind, with a message
        and a unit locked in ``units``) idempotently; returns those newly stored, in
        (device_id, seq) order."""
        first: dict[tuple[str, int], _Entry] = {}
        for e in accepted:
            key = (cast(str, e.device_id), e.msg.seq)  # type: ignore[union-attr]
            seen = first.get(key)
            if seen is None:
                first[key] = e
            else:
                _settle_reused_key(e, _stored_form(seen))
        if not first:
            return []
        table = model.__table__
        assert isinstance(table, sa.Table)
        # each unit's rows in seq order (see _update_units); sorting the keys alone
        # compares half as many tuples as sorting the items
        ordered = [(key, first[key]) for key in sorted(first)]
        if pg and table.name == "telemetry":
            conflicted = self._insert_telemetry_pg(conn, ordered, units, copy_new=copy_new)
        elif pg:
            conflicted = self._insert_series_pg(conn, _PG_INSERT_EVENTS, "event", ordered)
        else:
            inserted = self._insert_series_sqlite(conn, table, ordered)
            conflicted = {k for k, _ in ordered if k not in inserted}
        if not conflicted:
            return [e for _, e in ordered]
        stored = self._stored_rows(conn, pg, table, [k for k, _ in ordered if k in conflicted])
        for key in conflicted:
            _settle_reused_key(first[key], stored.get(key))
        return [e for k, e in ordered if k not in conflicted]

    @classmethod
    def _insert_telemetry_pg(cls, conn: sa.Connection,
                             ordered: Sequence[tuple[tuple[str, int], _Entry]],
                             units: dict[str, _LockedUnit], *, copy_new: bool
                             ) -> set[tuple[str, int]]:
        """Insert telemetry; returns the keys that were already stored.

        A row whose seq is past its unit's ``latest_seq`` (read under the unit's row lock,
        which every telemetry write holds) cannot be stored yet: ``latest_seq`` only ever
        moves up to the highest stored seq. With ``copy_new``, those rows go in with
        ``COPY``, without the conflict check of ``ON CONFLICT``'s speculative insertion
        (about 1.3 µs of server CPU per row) and without the array parameters'
        formatting in Python (ADR 0004); the others (late, redelivered, replayed) go
        through ``ON CONFLICT``. Correctness does not rest on that: if the ``COPY`` does
        hit a stored key, :class:`_StoredPastLatestSeq` is raised and the caller writes
        the batch again without ``copy_new``."""
        if not copy_new:
            return cls._insert_series_pg(conn, _PG_INSERT_TELEMETRY, "telemetry", ordered)
        new: list[tuple[tuple[str, int], _Entry]] = []
        old: list[tuple[tuple[str, int], _Entry]] = []
        for item in ordered:
            device_id, seq = item[0]
            latest = units[device_id].latest_seq
            (new if latest is None or seq > latest else old).append(item)
        conflicted = (cls._insert_series_pg(conn, _PG_INSERT_TELEMETRY, "telemetry", old)
                      if old else set())
        if new:
            try:
                cls._copy_telemetry_pg(conn, new)
            except sa.exc.IntegrityError as e:
                if getattr(e.orig, "sqlstate", None) == "23505":  # unique_violation
                    raise _StoredPastLatestSeq from e
                raise
        return conflicted

    @staticmethod
    def _copy_telemetry_pg(conn: sa.Connection,
                           rows: Sequence[tuple[tuple[str, int], _Entry]]) -> None:
        """``COPY`` the rows in: no statement to plan, the values formatted in C, and the
        server inserts them in bulk. A database error is raised as SQLAlchemy's (a
        unique violation as :class:`sqlalchemy.exc.IntegrityError`), like any other
        statement's."""
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        try:
            with driver.cursor() as cursor, cursor.copy(_PG_COPY_TELEMETRY) as copy:
                copy.set_types(_PG_COPY_TYPES)
                write = copy.write_row
                for (device_id, seq), e in rows:
                    write((device_id, seq, e.ts, e.received_at, e.readings_json))
        except psycopg.Error as error:
            raise sa.exc.DBAPIError.instance(
                _PG_COPY_TELEMETRY, None, error, psycopg.Error,
                ismulti=False) from error

    @staticmethod
    def _insert_series_pg(conn: sa.Connection, sql: str, kind: str,
                          ordered: Sequence[tuple[tuple[str, int], _Entry]]
                          ) -> set[tuple[str, int]]:
        """Insert with ``ON CONFLICT DO NOTHING``; returns the keys already stored."""
        result = conn.exec_driver_sql(sql, _series_params(kind, ordered))
        return {(r[0], r[1]) for r in result.all()}

    @staticmethod
    def _insert_series_sqlite(conn: sa.Connection, table: sa.Table,
                              ordered: Sequence[tuple[tuple[str, int], _Entry]]
                              ) -> set[tuple[str, int]]:
        """Insert; returns the keys inserted. Rows that hit the unique (device_id, seq)
        constraint return nothing; the caller resolves them.

        One multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` per chunk, with the
        values already in SQLite's storage form (what SQLAlchemy's types would bind:
        UTC wall time ``YYYY-MM-DD HH:MM:SS.ffffff``, JSON text - a test pins both), so
        no per-row type processing runs."""
        inserted: set[tuple[str, int]] = set()
        telemetry = table.name == "telemetry"
        for start in range(0, len(ordered), _INSERT_CHUNK):
            chunk = ordered[start:start + _INSERT_CHUNK]
            params: list[object] = []
            add = params.extend
            received_at: dt.datetime | None = None
            received_text: str | None = None
            for (device_id, seq), e in chunk:
                msg = e.msg
                if e.received_at is not received_at:  # one per read burst: format it once
                    received_at, received_text = e.received_at, _sqlite_ts(e.received_at)
                add((device_id, seq, _sqlite_ts(e.ts), received_text))
                if telemetry:
                    params.append(e.readings_json)
                else:
                    add((e.digest, msg.kind, msg.detail))  # type: ignore[union-attr]
            sql = _sqlite_insert_sql(table.name, len(chunk))
            inserted.update((r[0], r[1]) for r in conn.exec_driver_sql(sql, tuple(params)).all())
        return inserted

    @staticmethod
    def _stored_rows(conn: sa.Connection, pg: bool, table: sa.Table,
                     keys: Sequence[tuple[str, int]]
                     ) -> dict[tuple[str, int], tuple[Any, ...]]:
        """What is stored under ``keys``: telemetry ``(ts, readings)``, events
        ``(digest,)``. Only conflicts (redeliveries, replays) come here."""
        stored: dict[tuple[str, int], tuple[Any, ...]] = {}
        if pg:
            sql = _PG_SELECT_STORED[table.name]
            result = conn.exec_driver_sql(sql, ([k[0] for k in keys], [k[1] for k in keys]))
            stored.update(((r[0], r[1]), tuple(r[2:])) for r in result.all())
            return stored
        content = ((table.c.ts, table.c.readings) if table.name == "telemetry"
                   else (table.c.digest,))
        for start in range(0, len(keys), _INSERT_CHUNK):
            chunk_keys = keys[start:start + _INSERT_CHUNK]
            stmt = sa.select(table.c.device_id, table.c.seq, *content).where(
                sa.tuple_(table.c.device_id, table.c.seq).in_(chunk_keys)
            )
            stored.update(((r[0], r[1]), tuple(r[2:])) for r in conn.execute(stmt).all())
        return stored

    @staticmethod
    def _store_results(conn: sa.Connection, accepted: Sequence[_Entry]) -> None:
        results = list(accepted)
        results.sort(key=lambda e: e.msg.command_id)  # type: ignore[union-attr]  # lock order
        with Session(bind=conn) as session:  # in conn's transaction (which it leaves open)
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
        conn: sa.Connection,
        pg: bool,
        units: dict[str, _LockedUnit],
        entries: Sequence[_Entry],
        stored_telemetry: Sequence[_Entry],
    ) -> None:
        """Last seen time of every unit heard from, its count of accepted messages, and
        the latest state (readings merged in sequence order) of those with newly stored
        telemetry. One statement per batch."""
        get = units.get
        for e in entries:  # device_id None (an unknown topic): no unit
            unit = get(e.device_id)  # type: ignore[arg-type]
            if unit is None:
                continue
            if e.reason == ACCEPTED:
                unit.accepted += 1
            last_seen = unit.last_seen_at
            if last_seen is None or e.received_at > last_seen:
                unit.last_seen_at, unit.seen_moved = e.received_at, True
        # each unit's newest stored message (stored_telemetry is in (device_id, seq)
        # order); the usual case: it reports every reading of its model, so it alone is
        # the delta, whatever came before it
        newest = {e.device_id: e for e in stored_telemetry}
        partial: dict[str, dict[str, Any]] = {}
        for device_id, e in newest.items():
            unit = units[device_id]  # type: ignore[index]
            msg = cast(protocol.Telemetry, e.msg)
            if unit.latest_seq is not None and msg.seq <= unit.latest_seq:
                continue  # late messages only: stored, but not the current state
            names = _READING_NAMES.get(unit.model)
            if names is not None and msg.readings.keys() >= names:
                unit.set_state(msg.readings, e.readings_json, e)
            else:
                partial[device_id] = {}  # type: ignore[index]
        if partial:  # merge their messages past latest_seq, in seq order
            for e in stored_telemetry:
                delta = partial.get(e.device_id)  # type: ignore[arg-type]
                if delta is None:
                    continue
                unit = units[e.device_id]  # type: ignore[index]
                msg = cast(protocol.Telemetry, e.msg)
                if unit.latest_seq is None or msg.seq > unit.latest_seq:
                    delta.update(msg.readings)
            for device_id, delta in partial.items():
                units[device_id].set_state(delta, None, newest[device_id])
        changed = {d: u for d, u in units.items()
                   if u.accepted or u.seen_moved or u.delta is not None}
        if not changed:
            return
        ordered = sorted(changed.items())
        # A delta with every reading of the unit's model replaces the stored state (which
        # holds nothing else); the database merges only a partial one (a jsonb merge
        # costs PostgreSQL about 1 µs a unit).
        whole = [u.whole for _, u in ordered]
        if pg:
            conn.exec_driver_sql(_PG_UPDATE_UNITS, (
                [d for d, _ in ordered],
                [u.last_seen_at for _, u in ordered],
                [u.latest_seq for _, u in ordered],
                [u.latest_ts for _, u in ordered],
                [u.delta_json for _, u in ordered],
                [u.accepted for _, u in ordered],
                whole,
            ))
            return
        seen = [(_sqlite_ts(u.last_seen_at), u.accepted, d) for d, u in ordered
                if u.delta is None]
        state = [(_sqlite_ts(u.last_seen_at), u.accepted, u.latest_seq, _sqlite_ts(u.latest_ts),
                  w, u.delta_json, u.delta_json, d)
                 for (d, u), w in zip(ordered, whole, strict=True) if u.delta is not None]
        if seen:
            conn.exec_driver_sql(_SQLITE_UPDATE_SEEN, seen)
        if state:
            conn.exec_driver_sql(_SQLITE_UPDATE_STATE, state)

    def _store_quarantine(self, conn: sa.Connection, entries: Sequence[_Entry]) -> None:
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
            conn.execute(sa.insert(QuarantineRow), rows)

    @staticmethod
    def _count(conn: sa.Connection, pg: bool, entries: Sequence[_Entry]) -> None:
        """Counters of the batch's other outcomes than accepted (those are counted with
        the unit, :meth:`_update_units`) aggregated, then one upsert (rows in key order)."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter(
            (e.device_id or UNKNOWN, e.reason) for e in entries if e.reason != ACCEPTED
        )
        if not counts:
            return
        ordered = sorted(counts.items())
        if pg:
            conn.exec_driver_sql(_PG_UPSERT_COUNTERS, (
                [k[0] for k, _ in ordered], [k[1] for k, _ in ordered],
                [n for _, n in ordered],
            ))
            return
        conn.exec_driver_sql(_SQLITE_UPSERT_COUNTERS, [(d, r, n) for (d, r), n in ordered])

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

    One thread: the :class:`hearth.service.subscriber.Subscriber` network thread reads
    the messages (persistent session, ``$share/hearth-ingest/...`` at QoS 1), hands each
    read burst to the core, and on every tick flushes a batch that is due and then
    acknowledges what was committed. No queue and no second thread: measured in
    ``bench/ingest.py``, the hand-over between two threads cost more than the overlap of
    reads with database writes gained on a loaded machine (7-11 % fewer messages per
    second). While a write runs, new messages wait in the socket and at the broker;
    the session's Receive Maximum (twice the batch size) bounds how many are in flight.

    When the database is unavailable the batch is kept and retried with a growing delay
    while the connection stays up; nothing of it is acknowledged, so the broker keeps
    every message. Acks of messages received on an earlier connection are not sent - the
    broker redelivers those on the resumed session, and the copy is counted as a
    duplicate.
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
        self._subscriber: Subscriber | None = None
        self._stopping = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._acked = 0

    @property
    def connected(self) -> bool:
        return self._subscriber is not None and self._subscriber.connected

    @property
    def subscribed(self) -> bool:
        return self._subscriber is not None and self._subscriber.subscribed

    def start(self) -> None:
        """Connect (in the background, retrying) and start consuming."""
        if self._subscriber is not None:
            raise RuntimeError("worker already started")
        try:
            self._core.preload_units()
        except sa.exc.SQLAlchemyError:
            log.warning("ingest: could not preload the unit cache; units are looked up "
                        "as they are heard from")
        self._subscriber = Subscriber(
            self._identity, SUBSCRIPTIONS, self._on_messages, on_tick=self._on_tick,
            client_id=self._client_id, qos=1, clean_start=False,
            session_expiry=self._session_expiry,
            receive_maximum=min(0xFFFF, max(self._core.batch_size * 2, 20)),
            name=f"{self._client_id}-net")
        # Everything that exists now (modules, ORM/pydantic schemas, ...) lives as long as
        # the process: exclude it from the garbage collector's full scans, which otherwise
        # walk it again and again as the stream of short-lived messages triggers them.
        # And collect young objects less often: each message allocates about ten
        # containers, so the default (a collection every 700) ran one every 70 messages,
        # walking a batch that stays alive until it is written (in-process, 3.2 µs of
        # collector per message; 0.2 with this threshold). Cycles are rare on this path.
        gc.freeze()
        if gc.get_threshold()[0] < _GC_YOUNG_THRESHOLD:
            gc.set_threshold(_GC_YOUNG_THRESHOLD)
        self._subscriber.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what can be flushed, acknowledge it, disconnect. Anything not committed
        stays unacknowledged, so the broker keeps it for the next start."""
        self._stopping = True
        if self._subscriber is not None:
            self._subscriber.stop(timeout)

    def stats(self) -> dict[str, int]:
        out = self._core.stats()
        out["acked"] = self._acked
        out["connected"] = int(self.connected)
        if self._subscriber is not None:
            for key in ("connects", "connection_errors", "protocol_errors", "refused",
                        "internal_errors"):
                out[f"mqtt.{key}"] = self._subscriber.stats[key]
        return out

    # -- network thread --------------------------------------------------------------------

    def _on_messages(self, generation: int, received_at: dt.datetime,
                     messages: list[Message]) -> None:
        handle = self._core.handle
        for message in messages:
            try:
                topic = message.topic.decode()
            except UnicodeDecodeError:
                topic = message.topic.decode("utf-8", "replace")  # refused: not a topic
            handle(topic, message.payload, received_at,
                   ack=(generation, message.packet_id, message.qos))

    def _on_tick(self, _generation: int) -> float | None:
        """Flush when due (or when stopping) unless a failed flush is waiting for its
        retry; returns when to be called again."""
        core = self._core
        now = time.monotonic()
        if core.pending and (self._stopping or (now >= self._retry_at and core.flush_due())):
            if self._flush():
                self._backoff = 0.0
            else:
                self._backoff = min(max(self._backoff * 2, 0.1), self._max_backoff)
                self._retry_at = now + self._backoff
                log.warning("ingest: retrying the batch in %.1fs", self._backoff)
        if not core.pending:
            return None
        return max(self._retry_at - time.monotonic(), core.seconds_until_due() or 0.0)

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

    def _ack(self, acks: Iterable[object]) -> None:
        """PUBACK the QoS 1 messages among ``acks`` (tokens ``(generation, packet id,
        qos)``), in order, per connection; the subscriber drops those of a connection
        that is gone."""
        subscriber = self._subscriber
        if subscriber is None:
            return
        pending: list[int] = []
        current = -1
        for token in acks:
            if not isinstance(token, tuple) or token[2] != 1:
                continue  # QoS 0: nothing to acknowledge
            generation, packet_id, _qos = token
            if generation != current and pending:
                self._acked += subscriber.ack(current, pending)
                pending = []
            current = generation
            pending.append(packet_id)
        if pending:
            self._acked += subscriber.ack(current, pending)
