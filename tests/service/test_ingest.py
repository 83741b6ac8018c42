"""Ingest core: every message is stored, deduplicated or quarantined - and counted.

One named test per kind of bad input; after each, a good message must still be stored.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.protocol import Reason
from hearth.service import fleet
from hearth.service.db import StorageError
from hearth.service.ingest import (
    ACCEPTED,
    DUPLICATE,
    INTERNAL_ERROR,
    SUBSCRIPTIONS,
    IngestCore,
    counts,
)
from hearth.service.models import (
    CommandRow,
    EventRow,
    QuarantineRow,
    TelemetryRow,
    Unit,
)
from tests.service import messages as m
from tests.service.conftest import POSTGRESQL_ONLY, Fleet, refuse_telemetry_seq


@pytest.fixture
def core(sf: sessionmaker[Session], imported: Fleet) -> IngestCore:
    return IngestCore(sf, batch_size=100)


def counters(sf: sessionmaker[Session]) -> dict[tuple[str, str], int]:
    with sf() as s:
        return counts(s)


def quarantine(sf: sessionmaker[Session]) -> list[QuarantineRow]:
    with sf() as s:
        return list(s.scalars(sa.select(QuarantineRow).order_by(QuarantineRow.id)))


def telemetry_rows(sf: sessionmaker[Session], device_id: str) -> list[TelemetryRow]:
    with sf() as s:
        return list(s.scalars(sa.select(TelemetryRow).where(TelemetryRow.device_id == device_id)
                              .order_by(TelemetryRow.seq)))


def unit(sf: sessionmaker[Session], device_id: str) -> Unit:
    with sf() as s:
        return fleet.get_unit(s, device_id)


def test_subscriptions_are_shared_qos1_on_uplink_topics() -> None:
    assert SUBSCRIPTIONS == (
        "$share/hearth-ingest/hearth/v1/d/+/telemetry",
        "$share/hearth-ingest/hearth/v1/d/+/event",
        "$share/hearth-ingest/hearth/v1/d/+/cmd/result",
    )


def test_accepted_telemetry_is_stored(core: IngestCore, sf: sessionmaker[Session],
                                      imported: Fleet) -> None:
    dev = imported.thermostats[0]
    received = dt.datetime.now(dt.UTC)
    outcome = core.handle(m.topic(dev), m.telemetry(dev, 1), received, ack="a1")
    assert outcome.reason == ACCEPTED and outcome.device_id == dev
    assert core.flush() == ["a1"]
    rows = telemetry_rows(sf, dev)
    assert [(r.seq, r.readings) for r in rows] == [(1, {"temperature": 21.5, "heater": False})]
    assert rows[0].ts == m.TS + dt.timedelta(seconds=1)
    assert rows[0].received_at == received
    u = unit(sf, dev)
    assert (u.latest_seq, u.latest_state, u.last_seen_at) == (
        1, {"temperature": 21.5, "heater": False}, received)
    assert counters(sf) == {(dev, ACCEPTED): 1}
    assert quarantine(sf) == []
    assert core.stats()["accepted"] == 1 and core.pending == 0


def _big(dev: str) -> bytes:
    return m.telemetry(dev, 7, {"temperature": 20.0}, pad="x" * protocol.MAX_PAYLOAD_BYTES)


BAD_TELEMETRY: dict[str, tuple[Reason, Callable[[str, str], bytes]]] = {
    "malformed_json": (Reason.MALFORMED_JSON, lambda d, o: b'{"v":1,"device_id":'),
    "not_an_object": (Reason.INVALID_SCHEMA, lambda d, o: b"[1,2,3]"),
    "binary_garbage": (Reason.MALFORMED_JSON, lambda d, o: bytes(range(256))),
    "empty_payload": (Reason.MALFORMED_JSON, lambda d, o: b""),
    "nan_literal": (Reason.INVALID_SCHEMA,
                    lambda d, o: m.telemetry(d, 7).replace(b"21.5", b"NaN")),
    "wrong_type_reading": (Reason.WRONG_TYPE,
                           lambda d, o: m.telemetry(d, 7, {"temperature": "hot"})),
    "wrong_type_bool": (Reason.WRONG_TYPE, lambda d, o: m.telemetry(d, 7, {"heater": 1.0})),
    "wrong_type_seq": (Reason.INVALID_SCHEMA,
                       lambda d, o: protocol.to_wire({**m.telemetry_dict(d, 7), "seq": "7"})),
    "nested_reading": (Reason.INVALID_SCHEMA,
                       lambda d, o: m.telemetry(d, 7, {"temperature": {"v": 1}})),
    "unknown_field": (Reason.UNKNOWN_FIELD, lambda d, o: m.telemetry(d, 7, debug=True)),
    "unknown_reading": (Reason.UNKNOWN_READING, lambda d, o: m.telemetry(d, 7, {"co2": 400.0})),
    "out_of_range_high": (Reason.OUT_OF_RANGE,
                          lambda d, o: m.telemetry(d, 7, {"temperature": 500.0})),
    "out_of_range_low": (Reason.OUT_OF_RANGE, lambda d, o: m.telemetry(d, 7, {"humidity": -1})),
    "out_of_range_huge": (Reason.OUT_OF_RANGE,
                          lambda d, o: m.telemetry(d, 7, {"temperature": 1e308})),
    "oversize": (Reason.PAYLOAD_TOO_LARGE, lambda d, o: _big(d)),
    "too_many_readings": (Reason.TOO_MANY_READINGS, lambda d, o: m.telemetry(
        d, 7, {f"r{i}": 1.0 for i in range(protocol.MAX_READINGS + 1)})),
    "device_mismatch": (Reason.DEVICE_MISMATCH, lambda d, o: m.telemetry(o, 7)),
    "future_timestamp": (Reason.TIMESTAMP_OUT_OF_RANGE, lambda d, o: m.telemetry(
        d, 7, ts=(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat())),
    "ancient_timestamp": (Reason.TIMESTAMP_OUT_OF_RANGE,
                          lambda d, o: m.telemetry(d, 7, ts="1999-01-01T00:00:00Z")),
    "naive_timestamp": (Reason.INVALID_SCHEMA,
                        lambda d, o: m.telemetry(d, 7, ts="2025-06-01T12:00:00")),
    "negative_seq": (Reason.INVALID_SCHEMA, lambda d, o: m.telemetry(d, -1)),
    "seq_overflow": (Reason.INVALID_SCHEMA, lambda d, o: m.telemetry(d, 2**63)),
    "wrong_version": (Reason.INVALID_SCHEMA, lambda d, o: m.telemetry(d, 7, v=2)),
}


@pytest.mark.parametrize("case", sorted(BAD_TELEMETRY))
def test_bad_telemetry_is_quarantined_counted_and_survived(
    case: str, core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    reason, build = BAD_TELEMETRY[case]
    dev, other = imported.thermostats[0], imported.thermostats[1]
    payload = build(dev, other)
    outcome = core.handle(m.topic(dev), payload)
    assert outcome.reason == reason, outcome.detail
    good = core.handle(m.topic(dev), m.telemetry(dev, 8))
    assert good.reason == ACCEPTED
    core.flush()
    [row] = quarantine(sf)
    assert (row.device_id, row.reason) == (dev, reason)
    assert row.topic == m.topic(dev)
    assert row.payload_size == len(payload)
    assert base64.b64decode(row.payload_excerpt) == payload[:512]
    assert 0 < len(row.detail) <= 256
    assert counters(sf) == {(dev, reason): 1, (dev, ACCEPTED): 1}
    assert [r.seq for r in telemetry_rows(sf, dev)] == [8], "a bad message lost good data"


def test_unknown_device_is_quarantined_under_the_unknown_key(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    stranger = "f" * 32
    assert core.handle(m.topic(stranger), m.telemetry(stranger, 1)).reason == Reason.UNKNOWN_DEVICE
    core.flush()
    [row] = quarantine(sf)
    assert (row.device_id, row.reason) == (None, Reason.UNKNOWN_DEVICE)
    assert counters(sf) == {("", Reason.UNKNOWN_DEVICE): 1}
    with sf() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(TelemetryRow)) == 0


@pytest.mark.parametrize("bad_topic", [
    "", "hearth/v1/d", "hearth/v1/d/xyz/telemetry", "hearth/v2/d/" + "a" * 32 + "/telemetry",
    "hearth/v1/d/" + "A" * 32 + "/telemetry", "hearth/v1/d/" + "a" * 32 + "/telemetry/x",
    "#", "x" * 5000,
])
def test_unknown_topic_is_quarantined(bad_topic: str, core: IngestCore,
                                      sf: sessionmaker[Session]) -> None:
    assert core.handle(bad_topic, b"{}").reason == Reason.UNKNOWN_TOPIC
    core.flush()
    [row] = quarantine(sf)
    assert row.reason == Reason.UNKNOWN_TOPIC and row.device_id is None
    assert len(row.topic) <= 128
    assert counters(sf) == {("", Reason.UNKNOWN_TOPIC): 1}


def test_downlink_topic_from_a_unit_is_refused(core: IngestCore, sf: sessionmaker[Session],
                                               imported: Fleet) -> None:
    dev = imported.thermostats[0]
    assert core.handle(m.topic(dev, "cmd"), b"{}").reason == Reason.UNKNOWN_TOPIC
    core.flush()
    assert counters(sf) == {(dev, Reason.UNKNOWN_TOPIC): 1}


def test_revoked_unit_is_quarantined(core: IngestCore, sf: sessionmaker[Session],
                                     imported: Fleet) -> None:
    dev = imported.locks[0]
    with sf.begin() as s:
        fleet.mark_revoked(s, dev)
    assert core.handle(m.topic(dev), m.telemetry(dev, 1, {"battery": 50.0})).reason == (
        Reason.REVOKED)
    core.flush()
    assert counters(sf) == {(dev, Reason.REVOKED): 1}
    assert telemetry_rows(sf, dev) == []


def test_revocation_is_honoured_even_when_the_cache_is_stale(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    core.handle(m.topic(dev), m.telemetry(dev, 1))  # caches the unit as active
    core.flush()
    with sf.begin() as s:  # revoked by another process: this core's cache does not know
        fleet.mark_revoked(s, dev)
    assert core.handle(m.topic(dev), m.telemetry(dev, 2)).reason == ACCEPTED
    core.flush()
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1]
    assert counters(sf)[(dev, Reason.REVOKED)] == 1


def test_telemetry_is_stored_only_for_a_unit_that_exists_at_write_time(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The write transaction's unit lock is what keeps telemetry tied to a registered
    unit (there is no foreign key, revision 0405): a unit row gone after the cache
    learned it refuses the message as unknown_device, and nothing is stored for it."""
    dev = imported.thermostats[0]
    core.handle(m.topic(dev), m.telemetry(dev, 1))  # caches the unit
    with sf.begin() as s:  # gone behind the cache's back (no Hearth code deletes units)
        s.execute(sa.text("DELETE FROM units WHERE device_id = :d"), {"d": dev})
    core.flush()
    with sf() as s:
        assert s.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one() == 0
    assert counters(sf) == {("", Reason.UNKNOWN_DEVICE): 1}


def test_identical_redelivery_is_counted_as_duplicate_not_stored_twice(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    payload = m.telemetry(dev, 5)
    core.handle(m.topic(dev), payload)
    core.handle(m.topic(dev), payload)  # same batch
    core.flush()
    core.handle(m.topic(dev), payload)  # later batch (QoS 1 redelivery after reconnect)
    # re-encoded by the unit's outbox after a restart: other key order, other UTC spelling
    again = json.loads(payload)
    again["ts"] = again["ts"].replace("+00:00", "Z")
    core.handle(m.topic(dev), json.dumps(dict(reversed(list(again.items())))).encode())
    core.flush()
    assert len(telemetry_rows(sf, dev)) == 1
    assert counters(sf) == {(dev, ACCEPTED): 1, (dev, DUPLICATE): 3}
    assert quarantine(sf) == []
    assert core.stats()["duplicate"] == 3


def test_replayed_sequence_with_different_content_is_quarantined(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    core.handle(m.topic(dev), m.telemetry(dev, 5, {"temperature": 20.0}))
    core.handle(m.topic(dev), m.telemetry(dev, 5, {"temperature": 30.0}))  # same batch
    core.flush()
    core.handle(m.topic(dev), m.telemetry(dev, 5, {"temperature": 40.0}))  # later batch
    core.handle(m.topic(dev), m.telemetry(dev, 6))
    core.flush()
    rows = telemetry_rows(sf, dev)
    assert [(r.seq, r.readings.get("temperature")) for r in rows] == [(5, 20.0), (6, 21.5)]
    assert counters(sf) == {(dev, ACCEPTED): 2, (dev, Reason.REPLAYED_SEQUENCE): 2}
    assert [q.reason for q in quarantine(sf)] == [Reason.REPLAYED_SEQUENCE] * 2
    assert unit(sf, dev).latest_state["temperature"] == 21.5


def test_stored_telemetry_is_compared_by_its_whole_content(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    """Against what the database holds (a later batch): whole numbers written as ints,
    read back from a JSON column, are the same message; another timestamp, or a bool
    where a number was, is not."""
    dev = imported.thermostats[0]
    readings = {"temperature": 20, "humidity": 0, "heater": True, "target": 21.0}
    core.handle(m.topic(dev), m.telemetry(dev, 7, readings))
    core.flush()
    core.handle(m.topic(dev), m.telemetry(dev, 7, {k: float(v) if k != "heater" else v
                                                    for k, v in readings.items()}))
    core.handle(m.topic(dev), m.telemetry(dev, 7, readings,
                                          ts=(m.TS + dt.timedelta(seconds=8)).isoformat()))
    core.handle(m.topic(dev), m.telemetry(dev, 7, {**readings, "heater": 1}))
    core.flush()
    assert counters(sf) == {(dev, ACCEPTED): 1, (dev, DUPLICATE): 1,
                            (dev, Reason.REPLAYED_SEQUENCE): 1, (dev, Reason.WRONG_TYPE): 1}
    assert [r.readings for r in telemetry_rows(sf, dev)] == [
        {"temperature": 20.0, "humidity": 0.0, "heater": True, "target": 21.0}]


def test_keys_at_or_below_the_latest_seq_are_checked_and_others_are_new(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet, backend: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL copies a unit's telemetry past its ``latest_seq`` in without a conflict
    check (it cannot be stored yet). Were ``latest_seq`` ever behind what is stored, the
    batch is written again with every key checked: a redelivery is still a duplicate, a
    replay still a replay, and a new message in the same batch is still stored (both
    backends; SQLite always checks)."""
    dev, other = imported.thermostats[:2]
    for seq in (1, 2, 3):
        core.handle(m.topic(dev), m.telemetry(dev, seq, {"temperature": 20.0 + seq}))
    core.handle(m.topic(other), m.telemetry(other, 7))
    core.flush()
    with sf.begin() as s:  # behind the ingest's back: no Hearth code moves it down
        s.execute(sa.text("UPDATE units SET latest_seq = NULL WHERE device_id = :d"),
                  {"d": dev})
    core.handle(m.topic(dev), m.telemetry(dev, 2, {"temperature": 22.0}))  # redelivery
    core.handle(m.topic(dev), m.telemetry(dev, 3, {"temperature": 30.0}))  # replay
    core.handle(m.topic(dev), m.telemetry(dev, 4, {"temperature": 24.0}))  # new
    core.handle(m.topic(other), m.telemetry(other, 5))  # late, below its latest seq: new
    core.handle(m.topic(other), m.telemetry(other, 8))  # new
    with caplog.at_level("WARNING", logger="hearth.service.ingest"):
        core.flush()
    assert ("written again" in caplog.text) == (backend == "postgresql")
    assert [(r.seq, r.readings["temperature"]) for r in telemetry_rows(sf, dev)] == [
        (1, 21.0), (2, 22.0), (3, 23.0), (4, 24.0)]
    assert [r.seq for r in telemetry_rows(sf, other)] == [5, 7, 8]
    assert counters(sf) == {(dev, ACCEPTED): 4, (dev, DUPLICATE): 1,
                            (dev, Reason.REPLAYED_SEQUENCE): 1, (other, ACCEPTED): 3}
    assert [q.reason for q in quarantine(sf)] == [Reason.REPLAYED_SEQUENCE]
    assert (unit(sf, dev).latest_seq, unit(sf, other).latest_seq) == (4, 8)
    assert unit(sf, dev).latest_state["temperature"] == 24.0


def test_sequence_numbers_are_per_unit(core: IngestCore, sf: sessionmaker[Session],
                                       imported: Fleet) -> None:
    a, b = imported.thermostats[:2]
    core.handle(m.topic(a), m.telemetry(a, 1))
    core.handle(m.topic(b), m.telemetry(b, 1))
    core.flush()
    assert counters(sf) == {(a, ACCEPTED): 1, (b, ACCEPTED): 1}


def test_latest_state_merges_in_sequence_order(core: IngestCore, sf: sessionmaker[Session],
                                               imported: Fleet) -> None:
    dev = imported.thermostats[0]
    core.handle(m.topic(dev), m.telemetry(dev, 2, {"temperature": 22.0}))
    core.handle(m.topic(dev), m.telemetry(dev, 1, {"temperature": 19.0, "humidity": 40.0}))
    core.handle(m.topic(dev), m.telemetry(dev, 3, {"heater": True}))
    core.flush()
    u = unit(sf, dev)
    assert u.latest_seq == 3
    assert u.latest_state == {"temperature": 22.0, "humidity": 40.0, "heater": True}
    assert u.latest_ts == m.TS + dt.timedelta(seconds=3)
    # an old message delivered late (outbox replay) is stored but does not rewind the state
    core.handle(m.topic(dev), m.telemetry(dev, 0, {"temperature": 5.0}))
    core.flush()
    assert len(telemetry_rows(sf, dev)) == 4
    assert unit(sf, dev).latest_state["temperature"] == 22.0


def test_a_message_with_every_reading_replaces_the_state_a_partial_one_merges(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The latest state is merged with a message that reports some readings, and replaced
    by one that reports all of its model's (the stored state can hold nothing else: a key
    seeded behind the ingest's back goes). Both backends agree."""
    dev = imported.thermostats[0]
    full = {"temperature": 21.0, "humidity": 40.0, "heater": False, "target": 20.0}
    with sf.begin() as s:
        s.execute(sa.update(Unit).where(Unit.device_id == dev).values(
            latest_state={"legacy": 1.0, "temperature": 5.0}))
    core.handle(m.topic(dev), m.telemetry(dev, 1, {"temperature": 19.5}))
    core.flush()
    assert unit(sf, dev).latest_state == {"legacy": 1.0, "temperature": 19.5}
    core.handle(m.topic(dev), m.telemetry(dev, 2, {"heater": True}))
    core.handle(m.topic(dev), m.telemetry(dev, 3, full))
    core.flush()
    assert unit(sf, dev).latest_state == full
    core.handle(m.topic(dev), m.telemetry(dev, 4, {"target": 22.0}))
    core.flush()
    assert unit(sf, dev).latest_state == {**full, "target": 22.0}


def test_events_are_stored_and_deduplicated(core: IngestCore, sf: sessionmaker[Session],
                                            imported: Fleet) -> None:
    dev = imported.locks[0]
    core.handle(m.topic(dev, "event"), m.event(dev, 1, "tamper", "case opened"))
    core.handle(m.topic(dev, "event"), m.event(dev, 1, "tamper", "case opened"))
    core.handle(m.topic(dev, "event"), m.event(dev, 1, "boot"))
    core.handle(m.topic(dev, "event"), m.event(dev, 2, "Bad Kind"))
    core.handle(m.topic(dev, "event"), m.event(dev, 3, "boot", "nul\x00byte"))
    core.flush()
    with sf() as s:
        rows = list(s.scalars(sa.select(EventRow)))
    assert [(r.seq, r.kind, r.detail) for r in rows] == [(1, "tamper", "case opened")]
    assert counters(sf) == {(dev, ACCEPTED): 1, (dev, DUPLICATE): 1,
                            (dev, Reason.REPLAYED_SEQUENCE): 1, (dev, Reason.INVALID_SCHEMA): 2}


def _command(sf: sessionmaker[Session], device_id: str, status: str = "sent",
             result: dict[str, Any] | None = None, expired: bool = False) -> str:
    command_id = protocol.new_command_id()
    now = dt.datetime.now(dt.UTC)
    with sf.begin() as s:
        s.add(CommandRow(command_id=command_id, device_id=device_id, name="set_target",
                         params={"target": 22.0}, issued_at=now - dt.timedelta(minutes=10),
                         expires_at=now + dt.timedelta(minutes=-5 if expired else 5),
                         status=status, result=result, completed_at=None))
    return command_id


def _row(sf: sessionmaker[Session], command_id: str) -> CommandRow:
    with sf() as s:
        row = s.get(CommandRow, command_id)
        assert row is not None
        return row


def test_command_result_completes_the_command(core: IngestCore, sf: sessionmaker[Session],
                                              imported: Fleet) -> None:
    dev = imported.thermostats[0]
    cid = _command(sf, dev)
    received = dt.datetime.now(dt.UTC)
    assert core.handle(m.topic(dev, "cmd/result"),
                       m.result(dev, cid, state={"target": 22.0}), received).reason == ACCEPTED
    core.flush()
    row = _row(sf, cid)
    assert row.status == "succeeded"
    assert row.completed_at == received
    assert row.result is not None
    assert (row.result["status"], row.result["state"], row.result["source"]) == (
        "succeeded", {"target": 22.0}, "unit")
    assert counters(sf) == {(dev, ACCEPTED): 1}


def test_rejected_command_result_keeps_the_units_reason(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    cid = _command(sf, dev)
    core.handle(m.topic(dev, "cmd/result"),
                m.result(dev, cid, status="rejected", reason="out_of_range", detail="too hot"))
    core.flush()
    row = _row(sf, cid)
    assert row.status == "rejected" and row.result is not None
    assert row.result["reason"] == "out_of_range"


def test_result_for_another_units_command_is_refused(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    victim, attacker = imported.thermostats[0], imported.thermostats[1]
    cid = _command(sf, victim)
    core.handle(m.topic(attacker, "cmd/result"), m.result(attacker, cid))
    core.handle(m.topic(attacker, "cmd/result"), m.result(attacker, protocol.new_command_id()))
    core.flush()
    assert _row(sf, cid).status == "sent"
    assert counters(sf) == {(attacker, Reason.UNKNOWN_COMMAND): 2}


def test_repeated_result_is_a_duplicate_and_a_different_one_is_refused(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    cid = _command(sf, dev)
    core.handle(m.topic(dev, "cmd/result"), m.result(dev, cid))
    core.handle(m.topic(dev, "cmd/result"), m.result(dev, cid))
    core.flush()
    core.handle(m.topic(dev, "cmd/result"), m.result(dev, cid, status="failed"))
    core.flush()
    assert _row(sf, cid).status == "succeeded"
    assert counters(sf) == {(dev, ACCEPTED): 1, (dev, DUPLICATE): 1,
                            (dev, Reason.REPLAYED_SEQUENCE): 1}


def test_late_result_wins_over_expiry_and_publish_failure(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    expired = _command(sf, dev, status="expired", expired=True)
    unpublished = _command(sf, dev, status="failed",
                           result={"source": "service", "reason": "not_published"})
    core.handle(m.topic(dev, "cmd/result"), m.result(dev, expired, seq=1))
    core.handle(m.topic(dev, "cmd/result"), m.result(dev, unpublished, seq=2))
    core.flush()
    assert _row(sf, expired).status == "succeeded"
    assert _row(sf, unpublished).status == "succeeded"


def test_result_state_is_validated_against_the_model(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    cid = _command(sf, dev)
    outcome = core.handle(m.topic(dev, "cmd/result"), m.result(dev, cid, state={"target": 99.0}))
    assert outcome.reason == Reason.OUT_OF_RANGE
    core.flush()
    assert _row(sf, cid).status == "sent"


def test_quarantine_rows_are_sampled_but_counters_are_exact(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    core = IngestCore(sf, batch_size=1000, quarantine_rows_per_key=3)
    dev = imported.thermostats[0]
    for _ in range(50):
        core.handle(m.topic(dev), b"garbage")
    core.flush()
    assert len(quarantine(sf)) == 3
    assert counters(sf) == {(dev, Reason.MALFORMED_JSON): 50}


def test_flush_is_due_by_size_or_age(sf: sessionmaker[Session], imported: Fleet) -> None:
    clock = [100.0]
    core = IngestCore(sf, batch_size=3, flush_interval=0.5, clock=lambda: clock[0])
    dev = imported.thermostats[0]
    assert not core.flush_due() and core.seconds_until_due() is None
    core.handle(m.topic(dev), m.telemetry(dev, 1))
    assert not core.flush_due()
    clock[0] += 0.5
    assert core.flush_due()
    core.flush()
    for seq in (2, 3, 4):
        core.handle(m.topic(dev), m.telemetry(dev, seq))
    assert core.flush_due()
    assert core.flush() == [None, None, None]
    assert core.flush() == []


class _Outage:
    """Makes every statement on ``engine`` fail like a lost database while ``on``."""

    def __init__(self, sf: sessionmaker[Session]) -> None:
        self.on = False
        engine = sf.kw["bind"]
        error = engine.dialect.loaded_dbapi.OperationalError

        @sa_event.listens_for(engine, "before_cursor_execute")
        def _fail(*_a: Any) -> None:
            if self.on:
                raise error("simulated database failure")


def test_database_outage_keeps_the_batch_and_acks_nothing(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev = imported.thermostats[0]
    core.handle(m.topic(dev), m.telemetry(dev, 1), ack=1)  # unit now cached
    outage = _Outage(sf)
    outage.on = True
    core.handle(m.topic(dev), m.telemetry(dev, 2), ack=2)
    for _ in range(3):
        with pytest.raises(StorageError) as info:
            core.flush()
        assert info.value.transient
    assert core.pending == 2
    assert core.stats()["flush_failures"] == 3
    outage.on = False
    assert core.flush() == [1, 2]
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1, 2]
    assert counters(sf) == {(dev, ACCEPTED): 2}


def test_unit_lookup_during_an_outage_is_deferred_not_lost(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    dev, stranger = imported.thermostats[0], "e" * 32
    outage = _Outage(sf)
    outage.on = True
    # nothing cached yet: classification must wait for the database
    assert core.handle(m.topic(dev), m.telemetry(dev, 1), ack=1).reason == ACCEPTED
    core.handle(m.topic(dev), m.telemetry(dev, 2, {"temperature": 900.0}), ack=2)
    core.handle(m.topic(stranger), m.telemetry(stranger, 1), ack=3)
    with pytest.raises(StorageError):
        core.flush()
    outage.on = False
    assert core.flush() == [1, 2, 3]
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1]
    assert counters(sf) == {(dev, ACCEPTED): 1, (dev, Reason.OUT_OF_RANGE): 1,
                            ("", Reason.UNKNOWN_DEVICE): 1}


@contextlib.contextmanager
def _after_the_unit_lock(engine: sa.Engine, action: Callable[[Any], None]) -> Iterator[list[str]]:
    """Run ``action(cursor)`` once, right after a write transaction has locked its units
    (while it is still open); yields the statements it ran after (one at most)."""
    done: list[str] = []

    def hook(_conn: Any, cursor: Any, statement: str, *_a: Any) -> None:
        if done or "FROM units" not in statement or " FOR " not in statement:
            return
        action(cursor)
        done.append(statement)

    sa_event.listen(engine, "after_cursor_execute", hook)
    try:
        yield done
    finally:
        sa_event.remove(engine, "after_cursor_execute", hook)


@POSTGRESQL_ONLY
def test_a_write_stuck_on_a_lock_is_cancelled_kept_and_retried(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    """Another transaction holds the unit's row lock (a real one): the batch's write is
    cancelled after ``write_timeout`` instead of stalling the worker's only thread, the
    batch is kept, and it is stored once when the lock goes away."""
    dev = imported.thermostats[0]
    core = IngestCore(sf, batch_size=10, write_timeout=0.3)
    core.handle(m.topic(dev), m.telemetry(dev, 1), ack=1)
    outcome: list[BaseException | list[object]] = []

    def flush() -> None:  # in a thread: without the timeout it would wait for the lock
        try:
            outcome.append(core.flush())
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    holder = sf()
    holder.execute(sa.select(Unit).where(Unit.device_id == dev).with_for_update())
    attempt = threading.Thread(target=flush, daemon=True)
    attempt.start()
    attempt.join(timeout=15)
    stuck = attempt.is_alive()
    holder.rollback()
    holder.close()
    attempt.join(timeout=15)
    assert not stuck, "the write waited for the lock instead of timing out"
    [error] = outcome
    assert isinstance(error, StorageError) and error.transient
    assert isinstance(error.__cause__, sa.exc.OperationalError)
    assert "statement timeout" in str(error.__cause__)
    assert core.pending == 1 and telemetry_rows(sf, dev) == []
    assert core.flush() == [1]
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1]
    assert counters(sf) == {(dev, ACCEPTED): 1}


@POSTGRESQL_ONLY
def test_a_connection_lost_during_the_copy_keeps_the_batch(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The batch's telemetry goes in with COPY, outside SQLAlchemy's statements: when
    the server ends the connection right before it (a real termination, after the unit
    lock), the flush fails as a transient storage error, nothing is stored or
    acknowledged, and the next flush stores the batch once."""
    dev = imported.thermostats[0]
    core = IngestCore(sf, batch_size=10)
    for seq in (1, 2):
        core.handle(m.topic(dev), m.telemetry(dev, seq), ack=seq)
    engine = sf.kw["bind"]

    def kill(cursor: Any) -> None:
        pid = cursor.connection.info.backend_pid
        with engine.connect() as other:  # waits (up to 10 s) until the backend has exited
            assert other.exec_driver_sql(
                "SELECT pg_terminate_backend(%(pid)s, 10000)", {"pid": pid}).scalar()

    with _after_the_unit_lock(engine, kill) as killed, pytest.raises(StorageError) as info:
        core.flush()
    assert killed and info.value.transient
    assert isinstance(info.value.__cause__, sa.exc.OperationalError)
    assert core.pending == 2 and telemetry_rows(sf, dev) == []
    assert core.flush() == [1, 2]
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1, 2]
    assert counters(sf) == {(dev, ACCEPTED): 2}


@POSTGRESQL_ONLY
def test_a_batch_in_flight_does_not_hold_up_rows_that_reference_its_units(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The write transaction locks its units against a concurrent revocation, not
    against rows that merely reference them: while it holds the locks, a command for one
    of its units (a foreign-key check on the unit) is inserted without waiting."""
    dev = imported.thermostats[0]
    core = IngestCore(sf, batch_size=10)
    core.handle(m.topic(dev), m.telemetry(dev, 1), ack=1)
    engine = sf.kw["bind"]

    def meanwhile(_cursor: Any) -> None:
        now = dt.datetime.now(dt.UTC)
        with engine.begin() as other:  # another transaction, while the batch's is open
            other.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            other.execute(sa.insert(CommandRow).values(
                command_id="c" * 32, device_id=dev, name="set_target",
                params={"target": 21.0}, issued_at=now,
                expires_at=now + dt.timedelta(minutes=5), status="pending"))

    with _after_the_unit_lock(engine, meanwhile) as inserted:
        assert core.flush() == [1]
    assert len(inserted) == 1
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1]


def test_write_timeout_is_validated(sf: sessionmaker[Session]) -> None:
    for bad in (0, -1, 3601):
        with pytest.raises(ValueError, match="write_timeout"):
            IngestCore(sf, write_timeout=bad)


def test_a_poison_message_cannot_stall_the_stream(
    core: IngestCore, sf: sessionmaker[Session], imported: Fleet
) -> None:
    """The database refuses one message for a data reason: the rest of the batch is
    stored and the poison message is quarantined, not retried forever."""
    dev = imported.thermostats[0]
    refuse_telemetry_seq(sf.kw["bind"], 666)
    for seq in (1, 666, 3):
        core.handle(m.topic(dev), m.telemetry(dev, seq), ack=seq)
    assert core.flush() == [1, 666, 3]
    assert [r.seq for r in telemetry_rows(sf, dev)] == [1, 3]
    [row] = quarantine(sf)
    assert row.reason == INTERNAL_ERROR
    assert counters(sf) == {(dev, ACCEPTED): 2, (dev, INTERNAL_ERROR): 1}
    assert core.stats()["poison_splits"] == 1


@pytest.mark.parametrize("payload", [None, 42, "text", bytearray(b"{}"), memoryview(b"{}")])
def test_handle_survives_wrong_python_types(core: IngestCore, imported: Fleet,
                                            payload: Any) -> None:
    dev = imported.thermostats[0]
    outcome = core.handle(m.topic(dev), payload, received_at="yesterday")  # type: ignore[arg-type]
    assert outcome.reason != ACCEPTED
    core.handle(None, b"{}", None)  # type: ignore[arg-type]
    core.flush()


def test_two_workers_sharing_one_units_stream_keep_exact_counts(
    sf: sessionmaker[Session], imported: Fleet
) -> None:
    """A shared subscription spreads one unit's messages over several workers: concurrent
    batches must neither fail nor lose updates (units are locked in a fixed order)."""
    import threading

    dev = imported.thermostats[0]
    errors: list[BaseException] = []

    def run(start: int) -> None:
        core = IngestCore(sf, batch_size=10)
        try:
            for seq in range(start, 200, 2):
                core.handle(m.topic(dev), m.telemetry(dev, seq, {"temperature": seq / 10}))
                if seq % 3 == 0:  # and some redeliveries of what the other worker got
                    core.handle(m.topic(dev), m.telemetry(dev, seq - 1,
                                                          {"temperature": (seq - 1) / 10}))
                if core.flush_due():
                    core.flush()
            core.flush()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.seq for r in telemetry_rows(sf, dev)] == list(range(1, 200))
    c = counters(sf)
    assert c[(dev, ACCEPTED)] == 199
    assert c[(dev, ACCEPTED)] + c.get((dev, DUPLICATE), 0) + c.get(
        (dev, Reason.REPLAYED_SEQUENCE), 0) == 199 + sum(1 for s in range(1, 200) if s % 3 == 0)
    u = unit(sf, dev)
    assert (u.latest_seq, u.latest_state) == (199, {"temperature": 19.9})
