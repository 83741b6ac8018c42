"""Ingest throughput: QoS 1 telemetry through the real Mosquitto into Hearth's database.

What it measures
    N minted units (default 200 thermostats) publish valid telemetry at QoS 1 over mutual
    TLS (each unit with its own certificate and dynamic-security identity) through the
    broker that Hearth supervises (:class:`hearth.service.broker.Broker`). Publisher
    processes each drive many paho clients from one event loop with pre-built payloads
    and full QoS 1 windows. The phases run in the same process tree, one after another:

    a. **bare (paho-mqtt)**: subscribers as ``hearth-ingest`` on the same
       ``$share/hearth-ingest/...`` subscriptions that only count what they receive, with
       paho-mqtt (which acknowledges each message when its callback returns);
    a'. **bare (Hearth)**: the same with Hearth's own subscriber
       (:mod:`hearth.service.subscriber`, the ingest's receive path), acknowledging each
       read burst at once. The ratios are against the faster of the two bare phases;
    b. **SQLite**: Hearth's ingest (``IngestWorker`` + ``IngestCore``: validated,
       deduplicated, batched, acknowledged after commit) into a fresh SQLite database;
    c. **PostgreSQL**: the same into a temporary database created on the server of
       ``--postgres-url`` (skipped with a message when it cannot be reached).

    Each phase sends ``units x messages-per-unit`` messages with fresh sequence numbers.
    The phases run ``--rounds`` times (default 3), interleaved, each ingest phase on a
    fresh database: one phase's rate varies by about 15 % from run to run on a shared
    2-core machine (mostly the publishers and the broker, which do the same work in every
    phase), so the verdict takes, per ingest phase, the median of the per-round ratios.
    Publishers never run more than ``--max-backlog`` messages ahead of what the consumers
    have taken: Mosquitto drops QoS 1 messages for a session whose queue passes
    ``max_queued_messages`` (after having PUBACKed them to the unit), and the cap keeps
    the test inside the broker's limits, so the measured rate is the sustained one.
    Any "dropped" line in Mosquitto's log during a phase fails that phase.

How to read the output
    ``msg/s`` is end to end: from the first message sent to the last message received
    (bare) or committed (ingest). ``publisher msg/s`` is how fast PUBACKs came back;
    when it is close to the end-to-end rate of the bare phase, the publishers (not the
    consumers) limited that phase. The verdict lines compare with the targets of issue 2:
    stored / bare >= 0.8 (median over the rounds), and >= 10,000 msg/s into PostgreSQL on
    a 2-core machine (median). The ratio is judged against the faster bare phase of the
    same round (the stricter baseline: it isolates
    what validation and storage cost on top of the same receive path); the ratio to the
    other bare phase is printed beside it. The
    correctness lines check that every message sent was stored exactly once (per unit,
    the full range of sequence numbers, nothing quarantined). Other work on the machine
    (see the load average printed at start and end) lowers every figure.

    The CPU table of each phase says where the CPU went, from the "go" to the last message
    taken: user + system seconds (all threads) of the consumer processes, the publisher
    processes, the Mosquitto process, the PostgreSQL server (every ``postgres`` process,
    the whole server, in the PostgreSQL phase only; SQLite runs inside the consumers) and
    this orchestrating process, read from ``/proc/<pid>/stat``; the machine total is the
    non-idle time of all CPUs from ``/proc/stat`` (hypervisor steal excluded) and "other"
    is the rest: other processes on the machine (and a process that exited during the
    window). The machine total is sampled once per clock tick while the processes' times
    are exact, so "other" is only good to about a tick per CPU per second and can come out
    slightly negative. The kernel's irq+softirq time (loopback networking among it) is
    shown too: it is inside the machine total and, unless the kernel was built with
    IRQ_TIME_ACCOUNTING, also inside the times of the processes it interrupted. ``cores``
    is CPU seconds per wall-clock second of the window; ``µs/msg`` CPU microseconds per
    message taken.

Example::

    .venv/bin/python bench/ingest.py --units 200 --messages-per-unit 500 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import multiprocessing as mp
import os
import selectors
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    DEFAULT_PG_URL,
    CpuSnapshot,
    CpuUsage,
    PgUnavailable,
    clean_mqtt_session,
    cpu_snapshot,
    free_port,
    machine_load,
    mint_units,
    pids_by_comm,
    raise_fd_limit,
    run_bench,
    say,
    stop_processes,
    temp_pg_database,
)

from hearth.service.config import INGEST_BATCH_SIZE, INGEST_FLUSH_MS

TARGET_RATIO = 0.8
TARGET_PG_RATE = 10_000.0
PROGRESS_EVERY = 1.0
_SPAWN = mp.get_context("spawn")


# --- publisher processes ---------------------------------------------------------------------
class _PubClient:
    """One unit's paho client and where it is in the current phase."""

    def __init__(self, device_id: str, directory: Path, window: int) -> None:
        self.device_id = device_id
        self.directory = directory
        self.window = window
        self.topic = f"hearth/v1/d/{device_id}/telemetry"
        self.payloads: list[bytes] = []
        self.next = 0
        self.inflight = 0
        self.acked = 0
        self.refused = 0
        self.connected = False
        self.lost = False
        self.client: Any = None
        self.sock: Any = None


class _Publisher:
    """Drives many unit clients from one selector loop (no paho threads)."""

    def __init__(self, index: int, units: list[tuple[str, str]], host: str, port: int,
                 window: int, keepalive: int, conn: Connection, sent: Any, consumed: Any,
                 max_backlog: int, n_publishers: int) -> None:
        self.index = index
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.conn = conn
        self.sent_arr, self.consumed_arr = sent, consumed
        self.max_backlog = max_backlog
        self.n_publishers = n_publishers
        self.clients = [_PubClient(d, Path(p), window) for d, p in units]
        self.sel = selectors.DefaultSelector()
        self.sent = 0
        self.last_misc = 0.0

    # paho callbacks (called from loop_read in this thread)
    @staticmethod
    def _on_connect(_c: Any, pc: _PubClient, _f: Any, reason: Any, props: Any) -> None:
        pc.connected = not reason.is_failure
        rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if isinstance(rm, int) and rm > 0:
            pc.window = min(pc.window, rm)

    @staticmethod
    def _on_publish(_c: Any, pc: _PubClient, _mid: int, reason: Any, _p: Any) -> None:
        pc.inflight -= 1
        if reason.is_failure:
            pc.refused += 1
        else:
            pc.acked += 1

    @staticmethod
    def _on_disconnect(_c: Any, pc: _PubClient, _f: Any, _reason: Any, _p: Any) -> None:
        pc.connected = False
        pc.lost = True

    def connect_all(self, timeout: float) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from hearth.device.identity import UnitIdentity
        from hearth.device.link import make_tls_context

        for pc in self.clients:
            identity = UnitIdentity.load(pc.directory)
            client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=pc.device_id, protocol=paho.MQTTv5, userdata=pc,
                                 reconnect_on_failure=False)
            client.username_pw_set(pc.device_id, identity.mqtt_password)
            client.tls_set_context(make_tls_context(identity.ca_file, identity.keystore))
            client.max_inflight_messages_set(pc.window)
            client.on_connect = self._on_connect
            client.on_publish = self._on_publish
            client.on_disconnect = self._on_disconnect
            client.connect(self.host, self.port, self.keepalive, clean_start=True)
            pc.client = client
            pc.sock = client.socket()
            self.sel.register(pc.sock, selectors.EVENT_READ, pc)
        deadline = time.monotonic() + timeout
        while not all(pc.connected for pc in self.clients):
            if time.monotonic() > deadline:
                n = sum(pc.connected for pc in self.clients)
                raise RuntimeError(f"only {n}/{len(self.clients)} units got a CONNACK")
            self.service(0.05)

    def service(self, timeout: float) -> None:
        """Read what arrived (PUBACKs), write what is pending, keep the sessions alive."""
        from paho.mqtt.enums import MQTTErrorCode

        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        for pc in self.clients:
            if pc.client.want_write():
                pc.client.loop_write()
        for key, _ in self.sel.select(timeout):
            pc = key.data
            rc = pc.client.loop_read()
            while rc == ok and pc.sock.pending():  # records already decrypted by ssl
                rc = pc.client.loop_read()
            if rc != ok and not pc.lost:
                pc.lost = True
                with contextlib.suppress(Exception):
                    self.sel.unregister(pc.sock)
        now = time.monotonic()
        if now - self.last_misc > 1.0:
            self.last_misc = now
            for pc in self.clients:
                if not pc.lost:
                    pc.client.loop_misc()

    def prepare(self, seq_base: int, per_unit: int) -> None:
        from hearth.protocol import Telemetry, encode

        ts = dt.datetime.now(dt.UTC)
        for pc in self.clients:
            pc.payloads = [
                encode(Telemetry(
                    device_id=pc.device_id, seq=seq_base + i, ts=ts,
                    readings={"temperature": 15.0 + (i % 100) / 10, "humidity": 45.5,
                              "heater": i % 2 == 0, "target": 21.0},
                ))
                for i in range(per_unit)
            ]
            pc.next = pc.acked = pc.refused = 0
        self.sent = 0
        self.sent_arr[self.index] = 0

    def _budget(self) -> int:
        backlog = int(sum(self.sent_arr[:])) - int(sum(self.consumed_arr[:]))
        return (self.max_backlog - backlog) // self.n_publishers

    def go(self) -> tuple[float, float, int, int, bool]:
        """Publish the prepared payloads; returns (first sent, last acked, acked, refused,
        aborted) with wall-clock times."""
        from paho.mqtt.enums import MQTTErrorCode

        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        first = 0.0
        last_ack = 0.0
        total = sum(len(pc.payloads) for pc in self.clients)
        done_before = 0
        aborted = False
        start = 0
        next_poll = 0.0
        while True:
            budget = self._budget()
            n = len(self.clients)
            blocked = budget <= 0
            for k in range(n):
                if budget <= 0:
                    break
                pc = self.clients[(start + k) % n]
                if pc.lost:
                    continue
                while pc.inflight < pc.window and pc.next < len(pc.payloads) and budget > 0:
                    info = pc.client.publish(pc.topic, pc.payloads[pc.next], qos=1)
                    if info.rc != ok:
                        break
                    if not first:
                        first = time.time()
                    pc.next += 1
                    pc.inflight += 1
                    self.sent += 1
                    budget -= 1
            start += 1
            self.sent_arr[self.index] = self.sent
            self.service(0.002 if blocked else 0.02)
            done = sum(pc.acked + pc.refused for pc in self.clients)
            if done != done_before:
                done_before = done
                last_ack = time.time()
            lost = [pc for pc in self.clients if pc.lost]
            if done + sum(len(pc.payloads) - pc.acked - pc.refused for pc in lost) >= total:
                break
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 0.2
                if self.conn.poll(0):
                    msg = self.conn.recv()
                    if msg[0] in ("abort", "stop"):
                        aborted = True
                        break
        acked = sum(pc.acked for pc in self.clients)
        refused = sum(pc.refused for pc in self.clients)
        return first, last_ack, acked, refused, aborted

    def run(self) -> None:
        self.connect_all(timeout=120.0)
        self.conn.send(("connected", len(self.clients),
                        min(pc.window for pc in self.clients)))
        while True:
            while not self.conn.poll(0.2):
                self.service(0.0)
            msg = self.conn.recv()
            if msg[0] == "prepare":
                self.prepare(msg[1], msg[2])
                self.conn.send(("prepared",))
            elif msg[0] == "go":
                first, last_ack, acked, refused, aborted = self.go()
                lost = sum(pc.lost for pc in self.clients)
                self.conn.send(("done", first, last_ack, acked, refused, aborted, lost))
            elif msg[0] == "stop":
                break
        for pc in self.clients:
            with contextlib.suppress(Exception):
                pc.client.disconnect()
                pc.client.loop_write()
                pc.sock.close()


def _publisher_main(index: int, units: list[tuple[str, str]], host: str, port: int,
                    window: int, keepalive: int, conn: Connection, sent: Any, consumed: Any,
                    max_backlog: int, n_publishers: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates the shutdown
    try:
        _Publisher(index, units, host, port, window, keepalive, conn, sent, consumed,
                   max_backlog, n_publishers).run()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
        with contextlib.suppress(Exception):
            conn.send(("error", f"publisher {index}: {type(e).__name__}: {e}"))


# --- consumer processes ----------------------------------------------------------------------
def _consumer_main(mode: str, slot0: int, client_ids: list[str], identity: Any,
                   db_url: str | None, batch_size: int, flush_ms: int, conn: Connection,
                   received: Any, stored: Any, last: Any) -> None:
    """Run ``len(client_ids)`` consumers (bare counters or IngestWorkers) in this process
    and copy their counters into the shared arrays every few milliseconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if mode == "bare":
            _run_bare(slot0, client_ids, identity, batch_size, conn, received, stored, last)
        elif mode == "bare-paho":
            _run_bare_paho(slot0, client_ids, identity, batch_size, conn, received, stored,
                           last)
        else:
            assert db_url is not None
            _run_ingest(slot0, client_ids, identity, db_url, batch_size, flush_ms, conn,
                        received, stored, last)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
        with contextlib.suppress(Exception):
            conn.send(("error", f"consumer: {type(e).__name__}: {e}"))


class _Count:
    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0
        self.subscribed = False
        self.sub: Any = None


def _read_counts(counts: list[_Count]) -> list[tuple[int, int, float]]:
    """A bare consumer's counters as (received, stored, last): it stores what it receives."""
    return [(c.n, c.n, c.last) for c in counts]


def _run_bare(slot0: int, client_ids: list[str], identity: Any, batch_size: int,
              conn: Connection, received: Any, stored: Any, last: Any) -> None:
    """Hearth's own MQTT subscriber (the one the ingest uses), acknowledging every
    message the moment it is read: the same receive path as the ingest, minus the work."""
    from hearth.service.ingest import SUBSCRIPTIONS
    from hearth.service.subscriber import Message, Subscriber

    counts = [_Count() for _ in client_ids]

    def counter(count: _Count) -> Any:
        def on_messages(generation: int, _at: Any, messages: list[Message]) -> None:
            count.sub.ack(generation, [m.packet_id for m in messages if m.qos == 1])
            count.n += len(messages)
            count.last = time.time()
        return on_messages

    for cid, count in zip(client_ids, counts, strict=True):
        count.sub = Subscriber(identity, SUBSCRIPTIONS, counter(count), client_id=cid,
                               clean_start=True, session_expiry=0,
                               receive_maximum=min(65535, max(batch_size * 2, 20)))
    subs = [c.sub for c in counts]
    for sub in subs:
        sub.start()
    _wait_ready(lambda: all(s.subscribed for s in subs), conn)
    read = functools.partial(_read_counts, counts)
    try:
        _publish_counts(read, slot0, received, stored, last, conn)
    finally:
        for sub in subs:
            sub.stop()
    _publish_counts(read, slot0, received, stored, last)
    conn.send(("stats", [{"received": c.n} for c in counts]))


def _run_bare_paho(slot0: int, client_ids: list[str], identity: Any, batch_size: int,
                   conn: Connection, received: Any, stored: Any, last: Any) -> None:
    """A paho-mqtt subscriber that acknowledges at once (paho's default): for reference."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from hearth.service.ingest import SUBSCRIPTIONS
    from hearth.service.mqtt import make_client

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe([(t, 1) for t in SUBSCRIPTIONS])

    def on_subscribe(_c: Any, u: _Count, _mid: int, reasons: Any, _p: Any) -> None:
        u.subscribed = not any(r.is_failure for r in reasons)

    def on_message(_c: Any, u: _Count, _msg: Any) -> None:
        u.n += 1
        u.last = time.time()

    counts = [_Count() for _ in client_ids]
    clients = []
    for cid, count in zip(client_ids, counts, strict=True):
        client = make_client(identity, client_id=cid, clean_start=True)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = min(65535, max(batch_size * 2, 20))  # as IngestWorker
        client.connect_async(identity.host, identity.port, clean_start=True, properties=props)
        client.user_data_set(count)
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.loop_start()
        clients.append(client)
    _wait_ready(lambda: all(c.subscribed for c in counts), conn)

    read = functools.partial(_read_counts, counts)
    try:
        _publish_counts(read, slot0, received, stored, last, conn)
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
    _publish_counts(read, slot0, received, stored, last)
    conn.send(("stats", [{"received": c.n} for c in counts]))


def _publish_counts(counts: Any, slot0: int, received: Any, stored: Any, last: Any,
                    conn: Connection | None = None) -> None:
    """Copy ``counts()`` - (received, stored, last taken at) per consumer - into the shared
    arrays; with ``conn``, every 20 ms until the parent says stop (the parent only watches
    progress with them: the end time is noted by the consumers themselves)."""
    while True:
        for i, (n_received, n_stored, at) in enumerate(counts()):
            received[slot0 + i], stored[slot0 + i], last[slot0 + i] = n_received, n_stored, at
        if conn is None:
            return
        if conn.poll(0.02):
            conn.recv()
            return


def _wait_ready(ready: Any, conn: Connection, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the consumers did not connect and subscribe within 60 s")
        time.sleep(0.02)
    conn.send(("ready",))


def _run_ingest(slot0: int, client_ids: list[str], identity: Any, db_url: str,
                batch_size: int, flush_ms: int, conn: Connection, received: Any,
                stored: Any, last: Any) -> None:
    from hearth.service import db
    from hearth.service.ingest import IngestCore, IngestWorker

    class MeteredCore(IngestCore):
        """IngestCore that notes, in its own thread, how much it has committed and when."""

        metered_received = 0
        metered_accepted = 0
        metered_at = 0.0

        def handle(self, topic: str, payload: bytes, received_at: dt.datetime | None = None,
                   *, ack: object = None) -> Any:
            out = super().handle(topic, payload, received_at, ack=ack)
            self.metered_received += 1
            return out

        def flush(self) -> list[object]:
            acks = super().flush()
            if acks:
                self.metered_accepted = self.stats()["accepted"]
                self.metered_at = time.time()
            return acks

    engine = db.make_engine(db_url)
    cores = [MeteredCore(db.session_factory(engine), batch_size=batch_size,
                         flush_interval=flush_ms / 1000) for _ in client_ids]
    workers = [IngestWorker(identity, core, client_id=cid)
               for core, cid in zip(cores, client_ids, strict=True)]
    for w in workers:
        w.start()
    def read() -> list[tuple[int, int, float]]:
        return [(c.metered_received, c.metered_accepted, c.metered_at) for c in cores]

    try:
        _wait_ready(lambda: all(w.subscribed for w in workers), conn)
        _publish_counts(read, slot0, received, stored, last, conn)
    finally:
        for w in workers:
            w.stop()
        engine.dispose()
    _publish_counts(read, slot0, received, stored, last)
    conn.send(("stats", [w.stats() for w in workers]))


# --- the orchestrator ------------------------------------------------------------------------
@dataclass
class PhaseResult:
    name: str
    expected: int
    sent: int = 0
    refused: int = 0
    taken: int = 0
    first: float = 0.0
    last: float = 0.0
    pub_last_ack: float = 0.0
    complete: bool = False
    skipped: str = ""
    broker_drops: int = 0
    stats: list[dict[str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: bool = False
    cpu: CpuUsage | None = None

    @property
    def seconds(self) -> float:
        return max(1e-9, self.last - self.first)

    @property
    def rate(self) -> float:
        return self.taken / self.seconds if self.taken else 0.0

    @property
    def publisher_rate(self) -> float:
        span = self.pub_last_ack - self.first
        return self.sent / span if span > 0 else 0.0


class IngestBench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.exit = contextlib.ExitStack()
        self.processes: list[BaseProcess] = []
        self.pub_conns: list[Connection] = []
        self.pub_procs: list[BaseProcess] = []
        self.broker: Any = None
        self.device_ids: list[str] = []
        self.manifest: dict[str, Any] = {}
        self.pki: Any = None
        n_slots = args.workers
        self.sent = _SPAWN.RawArray("q", args.publishers)
        self.received = _SPAWN.RawArray("q", n_slots)
        self.stored = _SPAWN.RawArray("q", n_slots)
        self.last = _SPAWN.RawArray("d", n_slots)
        self.log_offset = 0
        self.seq_base = 1

    def close(self) -> None:
        for conn in self.pub_conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        deadline = time.monotonic() + 5
        for p in self.processes:
            p.join(max(0.1, deadline - time.monotonic()))
        stop_processes(self.processes)
        if self.broker is not None:
            say("stopping the broker")
            self.broker.stop()
        self.exit.close()

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        from hearth.factory import Endpoint
        from hearth.pki import MakerPKI
        from hearth.service.broker import Broker, units_from_manifest

        a = self.args
        port = free_port()
        self.pki = MakerPKI.create(self.root / "pki")
        say(f"minting {a.units} thermostats (labels=False; argon2 + scrypt per unit) ...")
        t = time.monotonic()
        self.manifest, units = mint_units(
            self.pki, {"thermostat": a.units}, self.root / "units",
            Endpoint(mqtt_host="127.0.0.1", mqtt_port=port, http_url="https://127.0.0.1:1"),
            processes=max(1, min(a.mint_processes, a.units)))
        say(f"minted {len(units)} units in {time.monotonic() - t:.1f}s")
        self.device_ids = [u.device_id for u in units]
        self.broker = Broker(self.root / "broker", self.pki, host="127.0.0.1", port=port,
                             units=units_from_manifest(self.manifest))
        t = time.monotonic()
        self.broker.start()
        say(f"Mosquitto up on 127.0.0.1:{port} (mTLS + dynamic security, {len(units)} units) "
            f"in {time.monotonic() - t:.1f}s")
        share = [(u.device_id, str(u.directory)) for u in units]
        groups = [share[i::a.publishers] for i in range(a.publishers)]
        say(f"starting {a.publishers} publisher processes "
            f"({', '.join(str(len(g)) for g in groups)} units each) ...")
        for i, group in enumerate(groups):
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(
                target=_publisher_main, name=f"bench-publisher-{i}", daemon=True,
                args=(i, group, "127.0.0.1", port, a.window, 60, child, self.sent,
                      self.received, a.max_backlog, a.publishers))
            p.start()
            self.processes.append(p)
            self.pub_procs.append(p)
            self.pub_conns.append(parent)
        t = time.monotonic()
        windows = []
        for conn in self.pub_conns:
            msg = self._recv(conn, 180.0, "publisher connect")
            windows.append(msg[2])
        say(f"all {a.units} units connected over mTLS in {time.monotonic() - t:.1f}s "
            f"(QoS 1 window per unit: {min(windows)})")

    @staticmethod
    def _recv(conn: Connection, timeout: float, what: str) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError(f"no answer from a child process ({what}) within {timeout:.0f}s")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    def prepare_db(self, url: str) -> None:
        from hearth.service import db, fleet

        engine = db.make_engine(url)
        try:
            db.migrate(engine)
            with db.session_factory(engine)() as session:
                fleet.import_manifest(session, self.manifest,
                                      device_ca_cert=self.pki.device_ca.cert)
                session.commit()
        finally:
            engine.dispose()

    # -- one phase ----------------------------------------------------------------------
    def phase(self, name: str, tag: str, mode: str, db_url: str | None,
              seq_base: int) -> PhaseResult:
        from hearth.service.broker import INGEST

        a = self.args
        per_unit = a.messages_per_unit
        res = PhaseResult(name, expected=per_unit * len(self.device_ids))
        say(f"phase {name}: {res.expected:,} messages ({len(self.device_ids)} units x "
            f"{per_unit}), {a.workers} consumer(s) in {a.worker_processes} process(es)")
        identity = self.broker.identity(INGEST)
        for i in range(a.workers):
            self.received[i] = self.stored[i] = 0
            self.last[i] = 0.0
        client_ids = [f"{INGEST}-bench-{tag}-{i}" for i in range(a.workers)]
        per_proc = [list(range(a.workers))[k::a.worker_processes]
                    for k in range(a.worker_processes)]
        consumers: list[tuple[BaseProcess, Connection]] = []
        slot = 0
        slots_of: list[list[int]] = []
        for k, idx in enumerate(per_proc):
            if not idx:
                continue
            ids = [client_ids[i] for i in idx]
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(
                target=_consumer_main, name=f"bench-{tag}-consumer-{k}", daemon=True,
                args=(mode, slot, ids, identity, db_url, a.batch_size, a.flush_ms, child,
                      self.received, self.stored, self.last))
            p.start()
            self.processes.append(p)
            consumers.append((p, parent))
            slots_of.append(list(range(slot, slot + len(ids))))
            slot += len(ids)
        try:
            for _, conn in consumers:
                self._recv(conn, 90.0, "consumer ready")
            for conn in self.pub_conns:
                conn.send(("prepare", seq_base, per_unit))
            for conn in self.pub_conns:
                self._recv(conn, 120.0, "payloads prepared")
            self.log_offset = self._log_size()
            say(f"  {name}: consumers subscribed, payloads built; go")
            kind = "bare subscriber" if mode.startswith("bare") else "ingest worker"
            consumer_pids = [p.pid for p, _ in consumers]
            pg = db_url is not None and db_url.startswith("postgresql")
            cpu_before = self._cpu(consumer_pids, kind, pg=pg)
            for conn in self.pub_conns:
                conn.send(("go",))
            self._watch(res)
            res.cpu = CpuUsage.between(cpu_before,
                                       self._cpu(consumer_pids, kind, pg=pg))
        finally:
            for _, conn in consumers:
                with contextlib.suppress(Exception):
                    conn.send(("stop",))
            for proc, conn in consumers:
                try:
                    msg = self._recv(conn, 30.0, "consumer stats")
                    res.stats += msg[1]
                except (RuntimeError, EOFError, OSError) as e:
                    res.problems.append(f"consumer did not report: {e}")
                proc.join(10)
            stop_processes([p for p, _ in consumers])
            for cid in client_ids:
                clean_mqtt_session(identity, cid)
        res.broker_drops = self._count_log_drops()
        return res

    def _cpu(self, consumer_pids: list[int | None], kind: str, *, pg: bool) -> CpuSnapshot:
        """CPU used so far by each part of the benchmark (labels as the report shows)."""
        n, k = len(consumer_pids), self.args.workers
        groups: dict[str, list[int | None]] = {
            f"consumers: {k} {kind}(s) in {n} proc(s)": consumer_pids,
            f"publishers: {len(self.pub_procs)} proc(s)": [p.pid for p in self.pub_procs],
            "Mosquitto broker": [self.broker.pid],
        }
        if pg:
            groups["PostgreSQL server (all processes)"] = list(pids_by_comm("postgres"))
        groups["bench orchestrator (this process)"] = [os.getpid()]
        return cpu_snapshot(groups)

    def _watch(self, res: PhaseResult) -> None:
        a = self.args
        pending = set(range(len(self.pub_conns)))
        t0 = time.monotonic()
        last_progress = (0, t0)
        next_print = t0 + PROGRESS_EVERY
        firsts: list[float] = []
        while True:
            for i in list(pending):
                conn = self.pub_conns[i]
                if conn.poll(0):
                    msg = self._recv(conn, 1.0, "publisher result")
                    _, first, last_ack, acked, refused, aborted, lost = msg
                    pending.discard(i)
                    if first:
                        firsts.append(first)
                    res.pub_last_ack = max(res.pub_last_ack, last_ack)
                    res.sent += acked
                    res.refused += refused
                    if aborted:
                        res.problems.append(f"publisher {i} aborted")
                    if lost:
                        res.problems.append(f"publisher {i}: {lost} unit connection(s) lost")
            taken = sum(self.stored[:])
            now = time.monotonic()
            if taken != last_progress[0]:
                last_progress = (taken, now)
            if now >= next_print:
                next_print = now + PROGRESS_EVERY
                sent_so_far = sum(self.sent[:])
                per = "/".join(f"{n:,}" for n in self.received[:])
                say(f"  {res.name}: {taken:,}/{res.expected:,} taken, "
                    f"{taken / max(1e-9, now - t0):,.0f} msg/s so far, "
                    f"sent {sent_so_far:,}, backlog {sent_so_far - sum(self.received[:]):,} "
                    f"(received per consumer {per})")
            if not pending and taken >= res.expected:
                res.complete = True
                break
            if now - last_progress[1] > a.stall:
                res.problems.append(
                    f"no progress for {a.stall:.0f}s: {taken:,}/{res.expected:,} taken")
                for conn in self.pub_conns:
                    with contextlib.suppress(Exception):
                        conn.send(("abort",))
                for i in list(pending):
                    with contextlib.suppress(Exception):
                        self._recv(self.pub_conns[i], 30.0, "publisher abort")
                break
            time.sleep(0.01)
        res.taken = sum(self.stored[:])
        res.first = min(firsts) if firsts else 0.0
        res.last = max(self.last[:]) if res.taken else 0.0

    def _log_size(self) -> int:
        try:
            return int(self.broker.log_path.stat().st_size)
        except OSError:
            return 0

    def _count_log_drops(self) -> int:
        try:
            with self.broker.log_path.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if "dropped" in line.lower())

    def verify(self, res: PhaseResult, url: str, seq_base: int) -> None:
        """Every unit's full range of sequence numbers stored once; nothing quarantined."""
        from sqlalchemy.orm import Session

        from hearth.service import db
        from hearth.service.ingest import totals as ingest_totals

        per_unit = self.args.messages_per_unit
        engine = db.make_engine(url)
        try:
            with Session(engine) as session:
                rows = session.execute(sa.text(
                    "SELECT device_id, count(*), count(DISTINCT seq), min(seq), max(seq) "
                    "FROM telemetry GROUP BY device_id")).all()
                quarantined = session.execute(
                    sa.text("SELECT count(*) FROM quarantine")).scalar_one()
                counters = ingest_totals(session)
        finally:
            engine.dispose()
        total = sum(int(r[1]) for r in rows)
        by_unit = {r[0]: r for r in rows}
        wrong = 0
        for d in self.device_ids:
            r = by_unit.get(d)
            if r is None or (int(r[1]), int(r[2]), int(r[3]), int(r[4])) != (
                    per_unit, per_unit, seq_base, seq_base + per_unit - 1):
                wrong += 1
        res.checked = True
        if total != res.expected:
            res.problems.append(f"{total:,} rows stored, {res.expected:,} sent")
        if wrong:
            res.problems.append(f"{wrong} unit(s) without exactly their {per_unit} seqs")
        if set(by_unit) - set(self.device_ids):
            res.problems.append("rows for unknown units")
        if quarantined:
            res.problems.append(f"{quarantined} message(s) quarantined: {counters}")
        if counters.get("accepted", 0) != res.expected:
            res.problems.append(f"ingest counters say accepted={counters.get('accepted', 0):,}")
        res.stats.append({"db_rows": total, "db_duplicate_counter": counters.get("duplicate", 0)})

    # -- the run ------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.setup()
        rounds = [self.one_round(k) for k in range(a.rounds)]
        return report(rounds, a)

    def one_round(self, k: int) -> list[PhaseResult]:
        """Every selected phase once, in order, each on fresh sequence numbers and (for
        the ingest phases) a fresh database."""
        a = self.args
        per = a.messages_per_unit
        mark = f" #{k + 1}" if a.rounds > 1 else ""
        results: list[PhaseResult] = []
        if a.rounds > 1:
            say(f"round {k + 1} of {a.rounds}")
        for phase, name in (("bare-paho", "bare (paho-mqtt)"), ("bare", "bare (Hearth)")):
            if phase in a.phases:
                bare = self.phase(name + mark, f"{phase}{k}", phase, None,
                                  seq_base=self.seq_base)
                self.seq_base += per
                if bare.taken != bare.expected:
                    bare.problems.append(f"received {bare.taken:,} of {bare.expected:,}")
                results.append(bare)

        if "sqlite" in a.phases:
            sqlite_url = f"sqlite:///{self.root / f'sqlite-{k}' / 'hearth.db'}"
            self.prepare_db(sqlite_url)
            lite = self.phase("ingest -> SQLite" + mark, f"sqlite{k}", "ingest", sqlite_url,
                              seq_base=self.seq_base)
            self.verify(lite, sqlite_url, self.seq_base)
            self.seq_base += per
            results.append(lite)

        if "pg" in a.phases:
            try:
                pg_url = self.exit.enter_context(temp_pg_database(a.postgres_url))
            except PgUnavailable as e:
                say(f"SKIPPING the PostgreSQL phase: {e}")
                results.append(PhaseResult("ingest -> PostgreSQL" + mark, 0, skipped=str(e)))
            else:
                self.prepare_db(pg_url)
                pg = self.phase("ingest -> PostgreSQL" + mark, f"pg{k}", "ingest", pg_url,
                                seq_base=self.seq_base)
                self.verify(pg, pg_url, self.seq_base)
                self.seq_base += per
                results.append(pg)
        return results


def _bare_of(results: list[PhaseResult]) -> PhaseResult | None:
    """The faster bare phase of a round: the stricter baseline."""
    bares = [r for r in results if r.name.startswith("bare") and not r.skipped and r.rate]
    return max(bares, key=lambda r: r.rate, default=None)


def _kind(r: PhaseResult) -> str:
    return r.name.split(" #")[0]


def report(rounds: list[list[PhaseResult]], a: argparse.Namespace) -> int:
    results = [r for rnd in rounds for r in rnd]
    print()
    print(f"== ingest benchmark: {a.units} units x {a.messages_per_unit} msgs, QoS 1, mTLS; "
          f"{a.publishers} publisher procs, {a.workers} consumers in "
          f"{a.worker_processes} procs; {a.rounds} round(s) ==")
    print(f"   machine: {machine_load()}")
    print(f"   {'phase':<26}{'messages':>10}{'taken':>10}{'seconds':>9}{'msg/s':>10}"
          f"{'publisher msg/s':>17}")
    for r in results:
        if r.skipped:
            print(f"   {r.name:<26}  skipped: {r.skipped}")
            continue
        print(f"   {r.name:<26}{r.expected:>10,}{r.taken:>10,}{r.seconds:>9.2f}"
              f"{r.rate:>10,.0f}{r.publisher_rate:>17,.0f}")
    report_cpu(results)

    # Per round, each ingest phase against the faster bare phase of the *same* round
    # (run minutes apart at most); the verdict takes the median over the rounds.
    ratios: dict[str, list[float]] = {}
    others: dict[str, list[str]] = {}
    rates: dict[str, list[float]] = {}
    baselines: list[str] = []
    for rnd in rounds:
        bare = _bare_of(rnd)
        if bare is None:
            continue
        baselines.append(_kind(bare))
        for r in rnd:
            if r.name.startswith("bare") or r.skipped or not r.rate:
                continue
            ratios.setdefault(_kind(r), []).append(r.rate / bare.rate)
            rates.setdefault(_kind(r), []).append(r.rate)
            others.setdefault(_kind(r), []).extend(
                f"{r.rate / b.rate:.2f}" for b in rnd
                if b.name.startswith("bare") and b is not bare and b.rate and not b.skipped)
    ok = True
    if baselines:
        print("   verdict: (each ingest phase against the faster bare phase of its round: "
              f"{', '.join(sorted(set(baselines)))}; median over {len(rounds)} round(s))")
    for kind, values in ratios.items():
        median = statistics.median(values)
        hit = median >= TARGET_RATIO
        spread = ", ".join(f"{v:.2f}" for v in values)
        other = f"; against the other bare phase: {', '.join(others[kind])}" \
            if others[kind] else ""
        print(f"     {kind}: stored / bare = {median:.3f}  (rounds: {spread}; target >= "
              f"{TARGET_RATIO}: {'MET' if hit else 'NOT MET'}{other})")
    if "ingest -> PostgreSQL" in rates:
        pg_rate = statistics.median(rates["ingest -> PostgreSQL"])
        hit = pg_rate >= TARGET_PG_RATE
        print(f"     PostgreSQL stored rate = {pg_rate:,.0f} msg/s, median  (target >= "
              f"{TARGET_PG_RATE:,.0f} on 2 cores; this machine has {os.cpu_count()}: "
              f"{'MET' if hit else 'NOT MET'})")
    print("   correctness:")
    for r in results:
        if r.skipped:
            continue
        extra = ""
        dup = sum(s.get("duplicate", 0) for s in r.stats)
        if r.checked:
            extra = f"; QoS 1 redeliveries deduplicated: {dup}"
            flushes = sum(s.get("flushes", 0) for s in r.stats)
            if flushes:  # how well the per-batch costs (unit rows, counters) are shared
                received = sum(s.get("received", 0) for s in r.stats)
                extra += f"; {flushes:,} batches of {received / flushes:,.0f} on average"
        if r.broker_drops:
            r.problems.append(f"Mosquitto logged {r.broker_drops} 'dropped' line(s)")
        if r.refused:
            r.problems.append(f"{r.refused} publish(es) refused by the broker")
        if r.problems or not r.complete:
            ok = False
            print(f"     {r.name}: PROBLEM: {'; '.join(r.problems) or 'incomplete'}")
        else:
            what = ("stored exactly once, every unit's full seq range, nothing quarantined"
                    if r.checked else "received == sent")
            print(f"     {r.name}: OK ({r.taken:,} {what}{extra})")
    return 0 if ok else 1


def report_cpu(results: list[PhaseResult]) -> None:
    """Per phase: CPU seconds, cores and CPU microseconds per message taken, by part."""
    measured = [r for r in results if r.cpu is not None and not r.skipped]
    if not measured:
        return
    print(f"   CPU from \"go\" to the last message taken (user+system, /proc; "
          f"{os.cpu_count()} CPUs):")
    for r in measured:
        cpu = r.cpu
        assert cpu is not None
        wall = max(1e-9, cpu.wall)

        def row(label: str, seconds: float, wall: float = wall, taken: int = r.taken) -> None:
            per_msg = f"{seconds / taken * 1e6:>9,.1f}" if taken else f"{'-':>9}"
            print(f"     {label:<46}{seconds:>8.2f}{seconds / wall:>7.2f}{per_msg}")

        print(f"   {r.name}: {cpu.wall:.2f} s window, {r.taken:,} messages taken")
        print(f"     {'part':<46}{'CPU s':>8}{'cores':>7}{'µs/msg':>9}")
        for label, seconds in cpu.groups.items():
            row(label, seconds)
        row("other (machine total - the above)", cpu.other)
        row("machine total (non-idle, all CPUs)", cpu.machine)
        notes = [f"kernel irq+softirq {cpu.irq:.2f} s, inside the machine total"]
        if cpu.steal >= 0.01:
            notes.append(f"hypervisor steal {cpu.steal:.2f} s not counted")
        missing = [label.split(":")[0] for label, n in cpu.processes.items() if not n]
        if missing:
            notes.append(f"no process found for: {', '.join(missing)}")
        exited = [f"{n} of {label.split(':')[0]}" for label, n in cpu.exited.items() if n]
        if exited:
            notes.append(f"exited during the window (CPU in other): {', '.join(exited)}")
        print(f"     ({'; '.join(notes)})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Messages/s through the real Mosquitto (mTLS, QoS 1) received by a bare "
                    "subscriber vs stored by Hearth's ingest into SQLite and PostgreSQL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--units", type=int, default=200, help="simulated units (minted)")
    p.add_argument("--messages-per-unit", type=int, default=500,
                   help="telemetry messages each unit sends per phase")
    p.add_argument("--workers", type=int, default=2,
                   help="ingest workers (and bare subscribers) on the shared subscription")
    p.add_argument("--worker-processes", type=int, default=0,
                   help="processes the workers are spread over (0: one per worker; "
                        "1: all in one process like `hearth up`)")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes")
    p.add_argument("--window", type=int, default=100,
                   help="QoS 1 messages in flight per unit (capped by the broker)")
    p.add_argument("--max-backlog", type=int, default=0,
                   help="most messages sent but not yet taken by consumers "
                        "(0: 2000 per worker, well inside Mosquitto's 10,000-message "
                        "per-session queue)")
    p.add_argument("--batch-size", type=int, default=INGEST_BATCH_SIZE,
                   help="ingest batch size (the service's default)")
    p.add_argument("--flush-ms", type=int, default=INGEST_FLUSH_MS,
                   help="ingest flush interval (ms; the service's default)")
    p.add_argument("--postgres-url",
                   default=os.environ.get("HEARTH_TEST_DATABASE_URL") or DEFAULT_PG_URL,
                   help="PostgreSQL server (loopback) on which a temporary database is "
                        "created and dropped")
    p.add_argument("--mint-processes", type=int, default=max(1, os.cpu_count() or 1),
                   help="processes used to mint units")
    p.add_argument("--stall", type=float, default=60.0,
                   help="give up a phase after this many seconds without progress")
    p.add_argument("--timeout", type=float, default=1200.0,
                   help="hard limit for the whole run (seconds)")
    p.add_argument("--phases", default="bare-paho,bare,sqlite,pg",
                   help="which phases to run, comma-separated: bare-paho (a paho-mqtt "
                        "subscriber), bare (Hearth's subscriber, the ingest's receive "
                        "path), sqlite, pg; the ratios are against the faster bare phase")
    p.add_argument("--rounds", type=int, default=3,
                   help="run the phases this many times, interleaved; the verdict takes "
                        "the median of the per-round ratios (a single phase varies by "
                        "+-15%% from run to run on a shared 2-core machine)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.phases = {x.strip() for x in a.phases.split(",") if x.strip()}
    if not a.phases or a.phases - {"bare-paho", "bare", "sqlite", "pg"}:
        p.error("--phases takes bare-paho, bare, sqlite and pg")
    if (a.units < 1 or a.messages_per_unit < 1 or a.workers < 1 or a.publishers < 1
            or a.rounds < 1):
        p.error("--units, --messages-per-unit, --workers, --publishers and --rounds must "
                "be >= 1")
    a.publishers = min(a.publishers, a.units)
    if a.worker_processes <= 0 or a.worker_processes > a.workers:
        a.worker_processes = a.workers
    if a.max_backlog <= 0:
        a.max_backlog = 2000 * a.workers
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    say(f"ingest benchmark; machine: {machine_load()}")
    return run_bench(lambda root: IngestBench(args, root), timeout=args.timeout,
                     prefix="hearth-bench-ingest-", keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
