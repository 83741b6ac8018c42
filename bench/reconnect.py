"""Reconnect storm: a fleet loses the broker and gets it back, and nothing is lost.

What it measures
    ``--units`` minted units (default 2,000; every ``--locks-every``-th a lock, the rest
    thermostats) run the real device runtime (:class:`hearth.device.agent.Agent` with the
    reference apps, persistent outbox, mTLS link with exponential backoff and full jitter),
    spread over several processes, against a real :class:`hearth.service.runner.Stack`
    (supervised Mosquitto, ingest, API; SQLite). Once every unit is connected and has
    delivered telemetry, the broker is stopped (``stack.broker.stop()``), kept down for
    ``--outage`` seconds and started again (``stack.broker.start()``). The benchmark then
    measures

    * the time until every unit is connected again (from the moment the restart began,
      and from the moment ``start()`` returned, i.e. the broker let units in);
    * the peak of new unit connections per second, counted from Mosquitto's log
      (``New client connected`` lines, 1-second timestamps), and the connection attempts
      per second the units made while the broker was away (from the agents' own records);
    * telemetry lost: after everything drained, for every unit, each sequence number it
      enqueued (1 .. next_seq-1, telemetry and events) must be stored, unless it is still
      queued in the unit's outbox or the outbox dropped it by its bounded-queue policy.

How to read the output
    "all reconnected after" is the figure to watch for orderly reconnection: with full
    jitter it is bounded by the backoff cap plus the outage, not by the fleet size; the
    peak connections/s shows whether the jitter spread the storm (Mosquitto with mTLS
    accepts a few hundred connects per second on this kind of machine). "lost" must be 0.
    The knobs that keep 2,000 units x 3 threads affordable on 2 cores (telemetry
    interval, app tick, the link's poll interval) are printed with the results; the load
    average printed at start and end tells how busy the machine was.

Example::

    .venv/bin/python bench/reconnect.py --units 2000 --outage 10
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import logging
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    free_port,
    machine_load,
    mint_units,
    raise_fd_limit,
    run_bench,
    say,
    stop_processes,
)

_SPAWN = mp.get_context("spawn")
_NEW_CLIENT = re.compile(r"^(\S+): New client connected from \S+ as ([0-9a-f]{32}) ")
PROGRESS_EVERY = 5.0
AGENTS_PER_PROCESS = 50
MAX_AGENTS_PER_PROCESS = 150


# --- agent processes -------------------------------------------------------------------------
class _Fleetlet:
    """The agents of one process, with a monitor thread noting reconnections."""

    def __init__(self, units: list[tuple[str, str]], opts: dict[str, Any]) -> None:
        from hearth.device.agent import Agent
        from hearth.device.apps import APPS
        from hearth.device.identity import UnitIdentity

        self.opts = opts
        self.agents: list[Any] = []
        for _, path in units:
            identity = UnitIdentity.load(Path(path))
            app = APPS[identity.model.name](tick=opts["app_tick"])
            agent = Agent(identity, app, telemetry_interval=opts["telemetry_interval"],
                          backoff_base=opts["backoff_base"], backoff_cap=opts["backoff_cap"],
                          mqtt_host="127.0.0.1", mqtt_port=opts["port"])
            # The link polls its socket every poll_interval; 2,000 links at the default
            # 50 ms would spend the machine's CPU on wake-ups alone.
            agent.link.poll_interval = opts["poll_interval"]
            self.agents.append(agent)
        n = len(self.agents)
        self.baseline: list[int] | None = None
        self.down_at: list[float] = [0.0] * n
        self.back_at: list[float] = [0.0] * n
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, daemon=True)

    def start(self, rate: float) -> None:
        gap = 1.0 / rate if rate > 0 else 0.0
        for agent in self.agents:
            agent.start()
            if gap:
                time.sleep(gap)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            base = self.baseline
            if base is None:
                continue
            now = time.monotonic()
            for i, agent in enumerate(self.agents):
                if not self.down_at[i] and not agent.link.connected:
                    self.down_at[i] = now
                if not self.back_at[i] and agent.link.connects > base[i]:
                    self.back_at[i] = now

    def status(self) -> tuple[int, int, int, int]:
        connected = sum(a.link.connected for a in self.agents)
        delivered = sum(a.link.published > 0 for a in self.agents)
        queued = sum(len(a.outbox) for a in self.agents)
        return len(self.agents), connected, delivered, queued

    def mark(self) -> None:
        self.down_at = [0.0] * len(self.agents)
        self.back_at = [0.0] * len(self.agents)
        self.baseline = [a.link.connects for a in self.agents]

    def progress(self) -> tuple[int, int, int]:
        return (sum(1 for t in self.down_at if t), sum(1 for t in self.back_at if t),
                sum(a.link.connected for a in self.agents))

    def times(self) -> tuple[list[float], list[float], list[float]]:
        attempts: list[float] = []
        for a in self.agents:
            attempts += a.connect_attempts
        return list(self.down_at), list(self.back_at), attempts

    def quiesce(self) -> None:
        """Stop producing telemetry (``request_stop`` ends the agents' telemetry timers);
        the links stay up and keep draining the outboxes."""
        for a in self.agents:
            a.request_stop()

    def finish(self) -> list[tuple[str, int, list[int], int, int]]:
        """Stop every agent, then read each outbox: (device id, next seq, seqs still
        queued, dropped by the outbox bound, refused by the broker)."""
        from hearth.device.outbox import Outbox

        self._stop.set()
        with ThreadPoolExecutor(max_workers=8) as pool:  # closing outboxes is disk-bound
            list(pool.map(lambda a: a.stop(), self.agents))
        out = []
        for a in self.agents:
            box = Outbox.for_unit(a.identity.directory)
            try:
                left = [m.seq for m in box.peek(1_000_000)]
                out.append((a.device_id, box.next_seq, left, box.dropped, a.link.refused))
            finally:
                box.close()
        return out


def _agents_main(index: int, units: list[tuple[str, str]], opts: dict[str, Any],
                 conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates the shutdown
    raise_fd_limit()
    # Thousands of "cannot reach the broker" warnings are the expected outage; the
    # agents' own connection-attempt records are what the benchmark reports instead.
    logging.getLogger("hearth.device").setLevel(logging.ERROR)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: stacks
    # A real unit has its CPU to itself; here ~150 agent threads share one GIL. Waiting
    # threads wake every switch interval to ask for it; at the default 5 ms a reconnect
    # storm turns into ~200k context switches/s on 2 cores (measured) and starves all.
    sys.setswitchinterval(opts["switch_interval"])
    fleet: _Fleetlet | None = None
    try:
        fleet = _Fleetlet(units, opts)
        conn.send(("loaded", len(fleet.agents)))
        fleet.start(opts["start_rate"])
        conn.send(("started",))
        while True:
            cmd = conn.recv()[0]
            if cmd == "status":
                conn.send(("status", *fleet.status()))
            elif cmd == "mark":
                fleet.mark()
                conn.send(("marked",))
            elif cmd == "progress":
                conn.send(("progress", *fleet.progress()))
            elif cmd == "times":
                conn.send(("times", *fleet.times()))
            elif cmd == "quiesce":
                fleet.quiesce()
                conn.send(("quiesced",))
            elif cmd == "finish":
                conn.send(("final", fleet.finish()))
                fleet = None
                return
    except (EOFError, OSError):
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the run
        with contextlib.suppress(Exception):
            conn.send(("error", f"agent process {index}: {type(e).__name__}: {e}"))
    finally:
        if fleet is not None:
            with contextlib.suppress(Exception):
                fleet.finish()


# --- the orchestrator ------------------------------------------------------------------------
@dataclass
class Figures:
    units: int = 0
    initial_connect: float = 0.0
    broker_stop: float = 0.0
    broker_start: float = 0.0
    saw_outage: int = 0
    reconnected: int = 0
    all_back_from_restart: float | None = None
    all_back_from_up: float | None = None
    delays: list[float] = field(default_factory=list)
    peak_connects: int = 0
    peak_connects_at: str = ""
    log_unit_connects: int = 0
    tls_errors: int = 0
    outage_attempts: int = 0
    peak_attempts: int = 0
    enqueued: int = 0
    stored: int = 0
    still_queued: int = 0
    dropped: int = 0
    refused: int = 0
    lost: int = 0
    lost_units: int = 0
    lost_examples: list[str] = field(default_factory=list)
    ingest_sessions: str = ""
    problems: list[str] = field(default_factory=list)


class ReconnectBench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.stack: Any = None
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.units: list[Any] = []
        self.fig = Figures(units=args.units)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("finish",))
        deadline = time.monotonic() + 60
        for p in self.processes:
            p.join(max(0.1, deadline - time.monotonic()))
        stop_processes(self.processes)
        if self.stack is not None:
            say("stopping the stack (API, ingest, broker)")
            self.stack.stop()

    def _ask(self, cmd: str, timeout: float = 120.0) -> list[Any]:
        for conn in self.conns:
            conn.send((cmd,))
        return [self._recv(conn, timeout, cmd) for conn in self.conns]

    @staticmethod
    def _recv(conn: Connection, timeout: float, what: str) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError(f"no answer from an agent process ({what}) in {timeout:.0f}s")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    # -- setup --------------------------------------------------------------------------
    def setup(self) -> None:
        from hearth.factory import Endpoint
        from hearth.pki import MakerPKI
        from hearth.service import db, fleet
        from hearth.service.config import Settings
        from hearth.service.runner import Stack

        a = self.args
        settings = Settings(data_dir=self.root / "service", http_port=free_port(),
                            mqtt_port=free_port())
        pki = MakerPKI.create(settings.pki_dir)
        locks = a.units // a.locks_every if a.locks_every else 0
        models = {"thermostat": a.units - locks, "lock": locks}
        models = {m: n for m, n in models.items() if n}
        say(f"minting {a.units} units ({models}) with {a.mint_processes} processes "
            "(argon2 + scrypt per unit: this takes a while) ...")
        t = time.monotonic()
        manifest, self.units = mint_units(
            pki, models, self.root / "units",
            Endpoint(mqtt_host="127.0.0.1", mqtt_port=settings.mqtt_port,
                     http_url=f"https://127.0.0.1:{settings.http_port}"),
            processes=a.mint_processes)
        say(f"minted {len(self.units)} units in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        engine = db.make_engine(settings.database_url)
        db.migrate(engine)
        with db.session_factory(engine)() as session:
            fleet.import_manifest(session, manifest, device_ca_cert=pki.device_ca.cert)
            session.commit()
        engine.dispose()
        say(f"imported them into the registry in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        self.stack = Stack(settings, ingest_workers=a.ingest_workers)
        self.stack.start()
        broker = self.stack.broker
        sessions = getattr(broker, "ingest_sessions", None)
        self.fig.ingest_sessions = (
            "Broker has no ingest_sessions parameter" if sessions is None
            else f"Broker.ingest_sessions = {list(sessions)}")
        say(f"stack up in {time.monotonic() - t:.1f}s: Mosquitto on 127.0.0.1:"
            f"{settings.mqtt_port}, {a.ingest_workers} ingest worker(s), SQLite; "
            f"{self.fig.ingest_sessions}")

    def start_agents(self) -> None:
        a = self.args
        opts = {
            "port": self.stack.settings.mqtt_port, "app_tick": a.app_tick,
            "telemetry_interval": a.telemetry_interval, "backoff_base": a.backoff_base,
            "backoff_cap": a.backoff_cap, "poll_interval": a.poll_interval,
            "start_rate": a.start_rate / a.processes, "switch_interval": a.switch_interval,
        }
        share = [(u.device_id, str(u.directory)) for u in self.units]
        groups = [share[i::a.processes] for i in range(a.processes)]
        say(f"starting {a.units} agents in {a.processes} processes "
            f"(~{len(groups[0])} each, 3 threads per agent; started at ~{a.start_rate:.0f}/s)")
        for i, group in enumerate(groups):
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(target=_agents_main, args=(i, group, opts, child),
                               name=f"bench-agents-{i}", daemon=True)
            p.start()
            self.processes.append(p)
            self.conns.append(parent)
        for conn in self.conns:
            self._recv(conn, 300.0, "agents loaded")
        t0 = time.monotonic()
        for conn in self.conns:
            self._recv(conn, 60.0 + a.units / max(1.0, a.start_rate) * 2, "agents started")
        deadline = t0 + a.connect_timeout
        next_print = 0.0
        while True:
            rows = self._ask("status")
            total = sum(r[1] for r in rows)
            connected = sum(r[2] for r in rows)
            delivered = sum(r[3] for r in rows)
            queued = sum(r[4] for r in rows)
            now = time.monotonic()
            if connected == total and delivered == total:
                self.fig.initial_connect = now - t0
                say(f"all {total} units connected and delivered telemetry "
                    f"({self.fig.initial_connect:.1f}s after the last agent started; "
                    f"{queued} message(s) queued on units)")
                return
            if now > deadline:
                raise RuntimeError(f"after {a.connect_timeout:.0f}s only {connected}/{total} "
                                   f"connected and {delivered} delivered telemetry")
            if now >= next_print:
                next_print = now + PROGRESS_EVERY
                say(f"  {connected}/{total} connected, {delivered} delivered telemetry")
            time.sleep(0.5)

    # -- the outage ---------------------------------------------------------------------
    def outage(self) -> None:
        a = self.args
        broker = self.stack.broker
        self._ask("mark")
        say(f"stopping the broker (it stays down {a.outage:.0f}s)")
        t_stop = time.monotonic()
        broker.stop()
        t_stopped = time.monotonic()
        self.fig.broker_stop = t_stopped - t_stop
        time.sleep(max(0.0, a.outage - (time.monotonic() - t_stop)))
        rows = self._ask("progress")
        down = sum(r[1] for r in rows)
        say(f"  {down}/{a.units} units noticed the outage; starting the broker again")
        log_offset = broker.log_path.stat().st_size if broker.log_path.exists() else 0
        t_restart = time.monotonic()
        broker.start()
        t_up = time.monotonic()
        self.fig.broker_start = t_up - t_restart
        say(f"  broker back after {t_up - t_stop:.1f}s in all (start() took "
            f"{self.fig.broker_start:.2f}s, including any ingest-session restore)")
        deadline = t_up + a.reconnect_timeout
        next_print = t_up + PROGRESS_EVERY
        while True:
            # an overloaded machine answers late; wait for it within the reconnect deadline
            rows = self._ask("progress", max(120.0, deadline - time.monotonic() + 60.0))
            back = sum(r[2] for r in rows)
            now = time.monotonic()
            if back >= a.units:
                break
            if now > deadline:
                self.fig.problems.append(
                    f"only {back}/{a.units} reconnected within {a.reconnect_timeout:.0f}s")
                break
            if now >= next_print:
                next_print = now + PROGRESS_EVERY
                say(f"  {back}/{a.units} reconnected ({now - t_up:.0f}s after the restart)")
            time.sleep(0.2)
        down_at: list[float] = []
        back_at: list[float] = []
        attempts: list[float] = []
        for r in self._ask("times"):
            down_at += r[1]
            back_at += r[2]
            attempts += r[3]
        f = self.fig
        f.saw_outage = sum(1 for t in down_at if t)
        backs = [t for t in back_at if t]
        f.reconnected = len(backs)
        if backs and f.reconnected == a.units:
            f.all_back_from_restart = max(backs) - t_restart
            f.all_back_from_up = max(backs) - t_up
        f.delays = sorted(t - t_restart for t in backs)
        window = [t for t in attempts if t_stop <= t <= (max(backs) if backs else t_up)]
        f.outage_attempts = len(window)
        per_second = collections.Counter(int(t - t_stop) for t in window)
        f.peak_attempts = max(per_second.values(), default=0)
        say(f"  {f.reconnected}/{a.units} units reconnected; last one "
            f"{(max(backs) - t_up) if backs else float('nan'):.1f}s after start() returned")
        self._read_log(broker.log_path, log_offset)

    def _read_log(self, path: Path, offset: int) -> None:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError as e:
            self.fig.problems.append(f"cannot read the Mosquitto log: {e}")
            return
        per_second: collections.Counter[str] = collections.Counter()
        for line in text.splitlines():
            m = _NEW_CLIENT.match(line)
            if m:
                per_second[m.group(1)] += 1
            elif "OpenSSL Error" in line:
                self.fig.tls_errors += 1
        self.fig.log_unit_connects = sum(per_second.values())
        if per_second:
            stamp, n = per_second.most_common(1)[0]
            self.fig.peak_connects, self.fig.peak_connects_at = n, stamp

    # -- draining and the loss check ----------------------------------------------------
    def drain_and_check(self) -> None:
        a = self.args
        say("units stop producing telemetry; waiting for their outboxes to drain ...")
        self._ask("quiesce")
        deadline = time.monotonic() + a.drain_timeout
        while True:
            rows = self._ask("status")
            queued = sum(r[4] for r in rows)
            if queued == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        say(f"  {queued} message(s) still queued on units; stopping the agents "
            "(each closes its SQLite outbox: disk-bound, takes a while)")
        finals: list[tuple[str, int, list[int], int, int]] = []
        for conn in self.conns:
            conn.send(("finish",))
        for conn in self.conns:
            finals += self._recv(conn, 600.0, "finish")[1]
        for p in self.processes:
            p.join(30)
        expected: dict[str, set[int]] = {}
        f = self.fig
        for device_id, next_seq, left, dropped, refused in finals:
            expected[device_id] = set(range(1, next_seq)) - set(left)
            f.enqueued += next_seq - 1
            f.still_queued += len(left)
            f.dropped += dropped
            f.refused += refused
        want = sum(len(s) for s in expected.values())
        say(f"  units enqueued {f.enqueued:,} messages; {want:,} left their outboxes; "
            "waiting for ingest to store them ...")
        deadline = time.monotonic() + a.drain_timeout
        missing: dict[str, set[int]] = {}
        while True:
            stored = self._stored()
            missing = {d: s - stored.get(d, set()) for d, s in expected.items()}
            missing = {d: s for d, s in missing.items() if s}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        f.stored = sum(len(s & stored.get(d, set())) for d, s in expected.items())
        f.lost = sum(len(s) for s in missing.values()) - f.dropped
        f.lost = max(f.lost, 0) if f.dropped else f.lost
        f.lost_units = len(missing)
        f.lost_examples = [f"{d[:8]}… seqs {sorted(s)[:5]}" for d, s in list(missing.items())[:3]]

    def _stored(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = collections.defaultdict(set)
        with self.stack.session_factory() as session:
            rows = session.execute(sa.text(
                "SELECT device_id, seq FROM telemetry UNION ALL "
                "SELECT device_id, seq FROM events")).all()
        for device_id, seq in rows:
            out[device_id].add(int(seq))
        return out

    def run(self) -> int:
        self.setup()
        self.start_agents()
        self.outage()
        self.drain_and_check()
        return report(self.fig, self.args)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def report(f: Figures, a: argparse.Namespace) -> int:
    print()
    print(f"== reconnect benchmark: {a.units} units, broker down {a.outage:.0f}s ==")
    print(f"   machine: {machine_load()}")
    print(f"   settings: telemetry every {a.telemetry_interval:g}s, app tick {a.app_tick:g}s, "
          f"backoff base {a.backoff_base:g}s cap {a.backoff_cap:g}s (full jitter), link poll "
          f"{a.poll_interval:g}s, {a.processes} agent processes (switch interval "
          f"{a.switch_interval:g}s), {a.ingest_workers} ingest worker(s), SQLite")
    print(f"   initial connect of all units: {f.initial_connect:.1f}s after the last start")
    print(f"   broker stop took {f.broker_stop:.2f}s; start took {f.broker_start:.2f}s "
          f"({f.ingest_sessions})")
    print(f"   units that saw the outage: {f.saw_outage}/{a.units}; "
          f"reconnected: {f.reconnected}/{a.units}")
    if f.all_back_from_restart is not None and f.all_back_from_up is not None:
        print(f"   ALL RECONNECTED after {f.all_back_from_restart:.1f}s from the restart "
              f"({f.all_back_from_up:.1f}s after start() returned)")
    if f.delays:
        print(f"   reconnect delay from the restart: median {statistics.median(f.delays):.1f}s, "
              f"p90 {_pct(f.delays, 0.9):.1f}s, p99 {_pct(f.delays, 0.99):.1f}s")
    print(f"   PEAK NEW CONNECTIONS/s (Mosquitto log): {f.peak_connects} at "
          f"{f.peak_connects_at or '-'} ({f.log_unit_connects} unit connects logged after the "
          f"restart; {f.tls_errors} TLS handshake errors logged)")
    print(f"   connection attempts by units while the broker was away or holding them: "
          f"{f.outage_attempts} (peak {f.peak_attempts}/s)")
    print(f"   telemetry+events enqueued by units: {f.enqueued:,}; stored: {f.stored:,}; "
          f"still queued on units: {f.still_queued}; dropped by outbox bound: {f.dropped}; "
          f"refused by broker: {f.refused}")
    ok = not f.problems and f.lost == 0 and f.reconnected == a.units
    print(f"   TELEMETRY LOST: {f.lost}  (must be 0: {'OK' if f.lost == 0 else 'FAILED'})")
    if f.lost:
        print(f"     {f.lost_units} unit(s) affected, e.g. {'; '.join(f.lost_examples)}")
        print(f"     ingest sessions across the restart: {f.ingest_sessions}. Mosquitto "
              "2.0.11 does not restore $share subscriptions from persistence; the broker "
              "must hold units back until the ingest sessions are restored.")
    for p in f.problems:
        print(f"   PROBLEM: {p}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        description="Time for a fleet of real device agents to reconnect after a broker "
                    "outage, peak new connections per second, and telemetry lost (must be 0).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--units", type=int, default=2000, help="units (minted, each an Agent)")
    p.add_argument("--locks-every", type=int, default=10,
                   help="every Nth unit is a lock, the rest thermostats (0: no locks)")
    p.add_argument("--outage", type=float, default=10.0, help="seconds the broker stays down")
    p.add_argument("--processes", type=int, default=0,
                   help=f"agent processes (0: one per {AGENTS_PER_PROCESS} units; paho "
                        "polls with select(), which fails once a process has 1,024 open "
                        "files, and each agent holds ~6)")
    p.add_argument("--telemetry-interval", type=float, default=10.0,
                   help="seconds between telemetry messages of each unit")
    p.add_argument("--app-tick", type=float, default=5.0,
                   help="control-loop tick of the reference apps (seconds)")
    p.add_argument("--backoff-base", type=float, default=1.0, help="reconnect backoff base (s)")
    p.add_argument("--backoff-cap", type=float, default=30.0, help="reconnect backoff cap (s)")
    p.add_argument("--poll-interval", type=float, default=0.5,
                   help="the device link's socket poll interval (s); Link's default is 0.05")
    p.add_argument("--switch-interval", type=float, default=0.05,
                   help="sys.setswitchinterval in the agent processes (Python's default: "
                        "0.005)")
    p.add_argument("--start-rate", type=float, default=200.0,
                   help="agents started per second at the beginning (all processes)")
    p.add_argument("--ingest-workers", type=int, default=1, help="ingest workers in the stack")
    p.add_argument("--mint-processes", type=int, default=max(1, cpus),
                   help="processes used to mint units")
    p.add_argument("--connect-timeout", type=float, default=300.0,
                   help="seconds allowed for the initial connection of all units")
    p.add_argument("--reconnect-timeout", type=float, default=180.0,
                   help="seconds allowed for all units to reconnect after the restart")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds allowed for outboxes and ingest to drain")
    p.add_argument("--timeout", type=float, default=1500.0,
                   help="hard limit for the whole run (seconds)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    if a.units < 1 or a.processes < 0 or a.outage < 0:
        p.error("--units must be >= 1, --processes and --outage >= 0")
    if a.processes == 0:
        a.processes = -(-a.units // AGENTS_PER_PROCESS)
    a.processes = min(a.processes, a.units)
    if a.units / a.processes > MAX_AGENTS_PER_PROCESS:
        p.error(f"more than {MAX_AGENTS_PER_PROCESS} agents per process would pass the "
                "1,024 file descriptors that select() (used by paho) can watch")
    a.mint_processes = max(1, min(a.mint_processes, a.units))
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="[%(asctime)s] %(name)s %(levelname)s: %(message)s")
    raise_fd_limit()  # Mosquitto, started by this process, inherits it
    say(f"reconnect benchmark; machine: {machine_load()}")
    return run_bench(lambda root: ReconnectBench(args, root), timeout=args.timeout,
                     prefix="hearth-bench-reconnect-", keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
