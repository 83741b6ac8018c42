"""Ingest's fast write path: array statements (PostgreSQL), batched unit updates and
counters, the event digest, telemetry compared by content, and the batched PUBACK -
pinned against the plain forms."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.protocol import Reason
from hearth.service import fleet
from hearth.service.ingest import (
    ACCEPTED,
    DUPLICATE,
    IngestCore,
    _canonical,
    _digest,
    _readings_json,
    _same_telemetry,
    _utc,
    counts,
)
from hearth.service.models import TelemetryRow
from tests.service import messages as m
from tests.service.conftest import Fleet


def _reference_digest(msg: protocol.Telemetry | protocol.Event | protocol.CommandResult) -> str:
    """The digest as first defined (rows already stored carry it: it must not change)."""
    data = msg.model_dump(mode="python")
    data["ts"] = msg.ts.astimezone(dt.UTC).isoformat()
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("offset", [0, 2, -7])
def test_digest_is_the_canonical_sha256_as_stored(offset: int) -> None:
    ts = dt.datetime(2025, 6, 1, 12, 0, 0, 123, tzinfo=dt.timezone(dt.timedelta(hours=offset)))
    dev = "a" * 32
    msgs: list[protocol.Telemetry | protocol.Event | protocol.CommandResult] = [
        protocol.Telemetry(device_id=dev, seq=3, ts=ts,
                           readings={"temperature": 21.5, "heater": True, "mode": "é"}),
        protocol.Event(device_id=dev, seq=4, ts=ts, kind="boot", detail="x\u2028y"),
        protocol.CommandResult(command_id="b" * 32, device_id=dev, seq=5, ts=ts,
                               status="failed", reason="r", state={"target": 20.0}),
    ]
    for msg in msgs:
        assert _digest(msg) == _reference_digest(msg)
    parsed = protocol.parse_telemetry(m.telemetry(dev, 9, {"temperature": 1e-7}),
                                      topic_device_id=dev, model=protocol.MODELS["thermostat"],
                                      now=dt.datetime.now(dt.UTC))
    assert _digest(parsed) == _reference_digest(parsed)


def test_cached_canonical_encoder_is_json_dumps_sorted_and_compact() -> None:
    """The cached C encoder gives exactly what ``json.dumps`` gives (and it is reusable:
    the same object twice, and nested values, encode the same every time)."""
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    samples: list[object] = [
        {}, {"b": 1, "a": [True, None, 1.5, -0.0, 1e16]}, {"é": "\u2028\"q\"\\", "x": when},
        {"z": {"y": {"x": [1, {"w": False}]}}}, [1, "two", 3.0], "text", 7, None,
    ]
    for _ in range(2):
        for obj in samples:
            assert _canonical(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                                 default=str)


def _random_telemetry(rng: random.Random, i: int) -> bytes:
    """A telemetry message as a unit could send it: any offset, microseconds or none,
    extreme floats, whole numbers, escaped strings."""
    values: list[object] = [True, False, 0.0, -0.0, 1e-7, 85.0, -40.0, 1e16, 1e300, 123456.789,
                            21, 0, "é", '"q"', "\\", "\u2028", "a\tb", "\x7f", ""]
    ts = dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(
        minutes=rng.randrange(-14 * 60, 14 * 60)))) + dt.timedelta(
        seconds=rng.randrange(10**7), microseconds=rng.choice([0, rng.randrange(10**6)]))
    names = rng.sample(["temperature", "humidity", "heater", "target", "a", "z_9"],
                       rng.randrange(0, 6))
    readings: dict[str, Any] = {}
    for name in names:
        value = rng.choice(values)
        readings[name] = rng.uniform(-1e6, 1e6) if value == 123456.789 else value
    return m.telemetry(format(i, "032x"), rng.randrange(2**40), readings, ts=ts.isoformat())


def test_telemetry_content_survives_the_round_trip_through_a_json_column() -> None:
    """A redelivery is recognised by comparing the stored ``ts`` and ``readings`` with the
    message: what a JSON column gives back (PostgreSQL's jsonb turns 1e300 into a whole
    number; SQLite returns the canonical text parsed) is still the same message."""
    rng = random.Random(20261126)
    for i in range(2000):
        msg = protocol.Telemetry.model_validate_json(_random_telemetry(rng, i))
        ts = _utc(msg.ts)
        stored = json.loads(_readings_json(msg.readings))
        assert stored == msg.readings
        assert _same_telemetry(ts, stored, msg, ts)
        # jsonb: whole-valued numerics come back as ints (str(Decimal) has no exponent)
        as_jsonb = {k: int(v) if type(v) is float and v.is_integer() else v
                    for k, v in stored.items()}
        assert _same_telemetry(ts.astimezone(dt.timezone(dt.timedelta(hours=3))),
                               as_jsonb, msg, ts)


@pytest.mark.parametrize("change", [
    {"ts": dt.timedelta(microseconds=1)}, {"temperature": 21.500001}, {"heater": 1.0},
    {"temperature": True}, {"temperature": "21.5"}, {"extra": 1.0}, {"drop": "heater"},
])
def test_telemetry_that_differs_in_anything_is_not_the_same(change: dict[str, Any]) -> None:
    ts = dt.datetime(2026, 2, 1, 12, 0, tzinfo=dt.UTC)
    msg = protocol.Telemetry(device_id="c" * 32, seq=1, ts=ts,
                             readings={"temperature": 21.5, "heater": True})
    stored: dict[str, Any] = {"temperature": 21.5, "heater": True}
    stored_ts = ts + change.pop("ts", dt.timedelta(0))
    if "drop" in change:
        del stored[change.pop("drop")]
    stored.update(change)
    assert _same_telemetry(ts, {"temperature": 21.5, "heater": True}, msg, ts)
    assert not _same_telemetry(stored_ts, stored, msg, ts)
    assert not _same_telemetry(ts, "not a mapping", msg, ts)


def test_series_rows_are_stored_as_the_orm_would_store_them(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The SQLite fast path binds values already in storage form; PostgreSQL gets arrays.
    Rows written by the ORM and by the ingest for the same message must hold the same
    column values, down to the stored text of timestamps (microseconds or none, any offset)."""
    a, b, _ = imported.thermostats
    received = [dt.datetime(2026, 3, 1, 0, 0, 0, tzinfo=dt.UTC),
                dt.datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=dt.timezone(
                    dt.timedelta(hours=-5)))]
    core = IngestCore(sf, batch_size=100)
    for seq, at in enumerate(received, start=1):
        ts = at - dt.timedelta(seconds=seq)
        raw = m.telemetry(a, seq, {"temperature": 20.25, "heater": seq == 1},
                          ts=ts.isoformat())
        core.handle(m.topic(a), raw, at)
        msg = protocol.Telemetry.model_validate_json(raw)
        with sf.begin() as s:
            s.add(TelemetryRow(device_id=b, seq=seq, ts=msg.ts, received_at=at,
                               readings=dict(msg.readings)))
    core.flush()
    with sf() as s:
        query = sa.text("SELECT seq, ts, received_at, readings FROM telemetry "
                        "WHERE device_id = :d ORDER BY seq")
        raw_rows = {d: s.execute(query, {"d": d}).all() for d in (a, b)}
    assert len(raw_rows[a]) == 2
    for fast, orm in zip(raw_rows[a], raw_rows[b], strict=True):
        assert fast[:3] == orm[:3]  # seq and both timestamps, as stored
        readings = [r if isinstance(r, dict) else json.loads(r) for r in (fast[3], orm[3])]
        assert readings[0] == readings[1]


def _counters(sf: sessionmaker[Session]) -> dict[tuple[str, str], int]:
    with sf() as s:
        return counts(s)


def test_a_large_mixed_batch_is_exact(sf: sessionmaker[Session], imported: Fleet) -> None:
    """Several units, in-batch and cross-batch redeliveries, replays, late messages and
    events in one batch: rows, counters and unit state as the one-by-one rules say."""
    core = IngestCore(sf, batch_size=10_000)
    a, b, c = imported.thermostats
    for seq in range(1, 301):
        for dev in (a, b):
            core.handle(m.topic(dev), m.telemetry(dev, seq, {"temperature": seq / 10}))
    core.handle(m.topic(a), m.telemetry(a, 5, {"temperature": 0.5}))  # in-batch redelivery
    core.handle(m.topic(a), m.telemetry(a, 6, {"temperature": 9.9}))  # in-batch replay
    core.handle(m.topic(c, "event"), m.event(c, 1, "boot"))  # c: events only, no telemetry yet
    core.flush()
    core.handle(m.topic(b), m.telemetry(b, 7, {"temperature": 0.7}))  # redelivery
    core.handle(m.topic(b), m.telemetry(b, 8, {"temperature": 8.8}))  # replay
    core.handle(m.topic(b), m.telemetry(b, 400, {"heater": True}))
    core.handle(m.topic(c, "event"), m.event(c, 1, "boot"))  # event redelivery
    core.flush()
    core.handle(m.topic(b), m.telemetry(b, 350, {"temperature": 3.5}))  # late: stored only
    core.flush()
    assert _counters(sf) == {
        (a, ACCEPTED): 300, (a, DUPLICATE): 1, (a, Reason.REPLAYED_SEQUENCE): 1,
        (b, ACCEPTED): 302, (b, DUPLICATE): 1, (b, Reason.REPLAYED_SEQUENCE): 1,
        (c, ACCEPTED): 1, (c, DUPLICATE): 1,
    }
    with sf() as s:
        n = s.scalar(sa.select(sa.func.count()).select_from(TelemetryRow))
        assert n == 602
        ua, ub, uc = (fleet.get_unit(s, d) for d in (a, b, c))
    assert ua.latest_seq == 300 and ua.latest_state["temperature"] == 30.0
    assert ub.latest_seq == 400
    assert ub.latest_state == {"temperature": 30.0, "heater": True}
    assert ub.latest_ts == m.TS + dt.timedelta(seconds=400)
    assert uc.latest_seq is None and uc.latest_ts is None and uc.latest_state == {}
    assert uc.last_seen_at is not None
