"""Property: no input - random bytes, random topics, almost-valid messages - makes the
ingest core raise, and a good message after any of them is still stored."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.ingest import ACCEPTED, IngestCore
from hearth.service.models import TelemetryRow
from tests.service import messages as m
from tests.service.conftest import Fleet

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def almost_valid(device_ids: list[str]) -> st.SearchStrategy[bytes]:
    base = st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 2, "1", None]),
            "device_id": st.sampled_from(device_ids) | st.text(max_size=40),
            "seq": st.integers(min_value=-5, max_value=2**64) | st.text(max_size=5),
            "ts": st.sampled_from(["2025-06-01T12:00:00Z", "2025-06-01T12:00:00",
                                   "9999-12-31T23:59:59Z", "nonsense", ""]),
            "readings": st.dictionaries(
                st.sampled_from(["temperature", "humidity", "heater", "target", "lock",
                                 "battery", "x"]) | st.text(max_size=40),
                json_values, max_size=6),
            "kind": st.text(max_size=40),
            "detail": st.text(max_size=300),
            "command_id": st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
            "status": st.sampled_from(["succeeded", "rejected", "failed", "maybe"]),
            "state": st.dictionaries(st.text(max_size=10), json_values, max_size=4),
            "extra": json_values,
        },
    )
    return base.map(lambda d: json.dumps(d).encode())


def topics(device_ids: list[str]) -> st.SearchStrategy[str]:
    kinds = st.sampled_from(["telemetry", "event", "cmd/result", "cmd", "other", ""])
    return st.one_of(
        st.text(max_size=300),
        st.builds(m.topic, st.sampled_from(device_ids), kinds),
        st.builds(m.topic, st.text(alphabet="0123456789abcdefABCDEF/+#", max_size=40), kinds),
    )


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_handle_never_raises_and_good_data_survives(
    sf: sessionmaker[Session], imported: Fleet, data: st.DataObject
) -> None:
    ids = imported.thermostats + imported.locks + ["0" * 32]
    core = IngestCore(sf, batch_size=50)
    payloads = st.one_of(st.binary(max_size=2048), almost_valid(ids),
                         json_values.map(lambda v: json.dumps(v).encode()))
    items: list[tuple[Any, Any]] = data.draw(
        st.lists(st.tuples(topics(ids), payloads), max_size=15))
    for topic, payload in items:
        core.handle(topic, payload)
    good_seq = data.draw(st.integers(min_value=10**9, max_value=10**12))
    dev = imported.thermostats[2]
    assert core.handle(m.topic(dev), m.telemetry(dev, good_seq)).reason == ACCEPTED
    core.flush()
    stats = core.stats()
    assert stats["pending"] == 0
    assert stats["received"] == stats["accepted"] + stats["duplicate"] + stats["quarantined"]
    with sf() as s:
        stored = s.scalar(sa.select(TelemetryRow.seq).where(TelemetryRow.device_id == dev,
                                                            TelemetryRow.seq == good_seq))
    assert stored == good_seq


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=500) | st.binary(max_size=100),
       payload=st.binary(max_size=20_000) | st.text(max_size=100) | st.none() | st.integers())
def test_classification_never_raises_on_anything(topic: Any, payload: Any) -> None:
    """``handle`` without touching the database (an unknown-topic message never needs it),
    and with a database that is gone: nothing raises."""
    sf = sessionmaker()  # unbound: any database access fails
    core = IngestCore(sf)
    outcome = core.handle(topic, payload)
    assert isinstance(outcome.reason, str)
    assert core.pending == 1

