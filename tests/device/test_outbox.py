"""The outbox: ordered, persistent, bounded with an explicit drop policy, crash-safe."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hearth.device.outbox import KINDS, Kind, Outbox
from hearth.errors import DeviceError
from hearth.protocol import MAX_PAYLOAD_BYTES

TOPIC = "hearth/v1/d/" + "0" * 32 + "/telemetry"


def payload(seq: int) -> bytes:
    return f'{{"seq":{seq}}}'.encode()


def put(box: Outbox, kind: Kind = "telemetry", **kw: str) -> int | None:
    return box.put(kind, TOPIC, payload, **kw)


def test_order_preserved_and_seq_in_payload(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs = [put(box, k) for k in ("telemetry", "event", "cmd/result", "telemetry")]
        assert seqs == [1, 2, 3, 4]
        msgs = box.peek(10)
        assert [m.seq for m in msgs] == seqs
        assert [m.kind for m in msgs] == ["telemetry", "event", "cmd/result", "telemetry"]
        assert all(m.payload == payload(m.seq) for m in msgs)
        assert [m.seq for m in box.peek(2, after=1)] == [2, 3]


def test_ack_removes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for _ in range(5):
            put(box)
        assert box.ack([2, 4, 99]) == 2
        assert [m.seq for m in box.peek(10)] == [1, 3, 5]
        assert len(box) == 3
        assert box.ack([]) == 0


def test_survives_reopen_with_queue_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for _ in range(3):
            put(box)
        box.ack([3])  # the newest is gone: its number must still never come back
    with Outbox(path) as box:
        assert [m.seq for m in box.peek(10)] == [1, 2]
        assert put(box) == 4
        assert box.next_seq == 5


def test_for_unit_lives_in_state_and_is_private(unit_dir: Path) -> None:
    with Outbox.for_unit(unit_dir) as box:
        put(box)
    db = unit_dir / "state" / "outbox.db"
    assert db.exists()
    assert stat.S_IMODE(db.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(db.parent.stat().st_mode) & 0o077 == 0


def test_wal_mode(tmp_path: Path) -> None:
    import sqlite3

    with Outbox(tmp_path / "o.db") as box:
        put(box)
        db = sqlite3.connect(tmp_path / "o.db")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_full_drops_oldest_telemetry_first_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=4) as box:
        assert put(box, "cmd/result") == 1
        assert put(box, "telemetry") == 2
        assert put(box, "event") == 3
        assert put(box, "telemetry") == 4
        assert put(box, "telemetry") == 5  # drops 2, the oldest telemetry
        assert [m.seq for m in box.peek(10)] == [1, 3, 4, 5]
        assert put(box, "cmd/result") == 6  # drops 4
        assert put(box, "cmd/result") == 7  # drops 5
        assert put(box, "cmd/result") == 8  # no telemetry left: drops the event 3
        assert [m.seq for m in box.peek(10)] == [1, 6, 7, 8]
        assert box.dropped == 4
        assert box.dropped_by_kind == {"telemetry": 3, "event": 1, "cmd/result": 0}
    with Outbox(path, max_messages=4) as box:
        assert box.dropped == 4  # the count is persistent


def test_full_of_results_drops_the_new_telemetry_not_a_result(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=2) as box:
        put(box, "cmd/result")
        put(box, "cmd/result")
        assert put(box, "telemetry") is None  # counted, number used up
        assert put(box, "event") is None
        assert [m.seq for m in box.peek(10)] == [1, 2]
        assert box.dropped_by_kind == {"telemetry": 1, "event": 1, "cmd/result": 0}
        assert put(box, "cmd/result") == 5  # only now must a result go: the oldest
        assert [m.seq for m in box.peek(10)] == [2, 5]


def test_reopen_with_a_smaller_bound_trims_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        kinds: list[Kind] = ["telemetry", "cmd/result", "telemetry", "event"]
        for kind in kinds:
            put(box, kind)
    with Outbox(path, max_messages=2) as box:
        assert [m.seq for m in box.peek(10)] == [2, 4]
        assert box.dropped == 2


def test_drop_report_counts_each_drop_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=3) as box:
        for _ in range(5):
            put(box)
        assert box.unreported_drops == 2
        reported: list[int] = []

        def build(seq: int, count: int) -> bytes:
            reported.append(count)
            return payload(seq)

        seq = box.put_drop_report(TOPIC, build)
        assert seq == 6 and reported == [2]
        # the report itself pushed out one telemetry; that one is reported next time
        assert box.unreported_drops == 1
        assert [m.kind for m in box.peek(10)] == ["telemetry", "telemetry", "event"]
        box.ack(m.seq for m in box.peek(10))  # drained after reconnecting
        assert box.put_drop_report(TOPIC, build) == 7 and reported == [2, 1]
        assert box.put_drop_report(TOPIC, build) is None  # nothing new to report
        assert box.dropped == 3 and box.unreported_drops == 0


def test_build_failure_stores_nothing_and_keeps_the_number(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:

        def broken(seq: int) -> bytes:
            raise ValueError("bad message")

        with pytest.raises(ValueError, match="bad message"):
            box.put("telemetry", TOPIC, broken)
        assert len(box) == 0 and box.next_seq == 1
        with pytest.raises(DeviceError, match="over the limit"):
            box.put("telemetry", TOPIC, lambda seq: b"x" * (MAX_PAYLOAD_BYTES + 1))
        with pytest.raises(DeviceError, match="unknown outbox message kind"):
            box.put("cmd", TOPIC, payload)  # type: ignore[arg-type]
        assert put(box) == 1


def test_command_ids_are_remembered_bounded_and_persistent(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_commands=3) as box:
        put(box, "cmd/result", command_id="a" * 32)
        for c in "bcd":
            box.record_command(c * 32)
        assert not box.command_seen("a" * 32)  # pushed out by the bound
        assert box.command_seen("b" * 32)
    with Outbox(path, max_commands=3) as box:
        assert all(box.command_seen(c * 32) for c in "bcd")
        box.record_command("b" * 32)  # recording twice is harmless
        assert box.command_seen("d" * 32)


def test_refuses_a_file_that_is_not_an_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DeviceError, match="cannot open the outbox"):
        Outbox(path)


_WRITER = """
import sys
from pathlib import Path
from hearth.device.outbox import Outbox
box = Outbox(Path(sys.argv[1]))
topic = "hearth/v1/d/" + "0" * 32 + "/telemetry"
while True:
    seq = box.put("telemetry", topic, lambda s: str(s).encode())
    print(seq, flush=True)
"""


def test_survives_kill_9_without_losing_committed_messages(tmp_path: Path) -> None:
    """Every put that returned before SIGKILL is still there, and no number is reused."""
    path = tmp_path / "o.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    confirmed: list[int] = []
    try:
        while len(confirmed) < 40:
            line = proc.stdout.readline()
            assert line, "writer died"
            confirmed.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with Outbox(path) as box:
        stored = {m.seq for m in box.peek(100_000)}
        assert set(confirmed) <= stored
        assert [m.seq for m in box.peek(100_000)] == sorted(stored)
        assert box.next_seq > max(stored)
        assert put(box) == max(stored) + 1


# -- property: random puts/acks/reopens never lose or reorder un-acked messages ----------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KINDS)),
        st.tuples(st.just("ack"), st.lists(st.integers(0, 40), max_size=4)),
        st.tuples(st.just("ack_head"), st.integers(1, 5)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, bound=st.integers(1, 8))
def test_property_never_loses_or_reorders_unacked_messages(
    ops: list[tuple[str, object]], bound: int
) -> None:
    prio = {"telemetry": 0, "event": 1, "cmd/result": 2}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "o.db"
        box = Outbox(path, max_messages=bound, synchronous="NORMAL")
        model: list[tuple[int, str]] = []  # (seq, kind), oldest first
        dropped = 0
        next_seq = 1
        try:
            for op, arg in ops:
                if op == "put":
                    kind = str(arg)
                    seq = box.put(kind, TOPIC, payload)  # type: ignore[arg-type]
                    expect: int | None = next_seq
                    if len(model) >= bound:
                        victim = min(model, key=lambda m: (prio[m[1]], m[0]))
                        dropped += 1
                        if prio[victim[1]] > prio[kind]:
                            expect = None
                        else:
                            model.remove(victim)
                    if expect is not None:
                        model.append((next_seq, kind))
                    assert seq == expect
                    next_seq += 1
                elif op == "ack":
                    seqs = list(arg)  # type: ignore[call-overload]
                    box.ack(seqs)
                    model = [m for m in model if m[0] not in seqs]
                elif op == "ack_head":
                    head = box.peek(int(arg))  # type: ignore[call-overload]
                    box.ack(m.seq for m in head)
                    model = model[len(head):]
                else:
                    box.close()
                    box = Outbox(path, max_messages=bound, synchronous="NORMAL")
                got = [(m.seq, m.kind) for m in box.peek(10_000)]
                assert got == model
                assert all(m.payload == payload(m.seq) for m in box.peek(10_000))
                assert len(got) <= bound
                assert box.dropped == dropped
        finally:
            box.close()
