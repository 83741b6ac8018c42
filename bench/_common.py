"""Helpers shared by the benchmarks in ``bench/`` (not part of Hearth's API).

Everything here keeps to loopback addresses and cleans up after itself: temporary
directories, child processes and temporary PostgreSQL databases.
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing as mp
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from hearth.factory import Endpoint, MintedUnit, mint
from hearth.pki import MakerPKI

__all__ = [
    "DEFAULT_PG_URL",
    "Bench",
    "BenchTimeout",
    "CpuSnapshot",
    "CpuUsage",
    "PgUnavailable",
    "clean_mqtt_session",
    "cpu_snapshot",
    "free_port",
    "machine_load",
    "mint_units",
    "pids_by_comm",
    "raise_fd_limit",
    "run_bench",
    "say",
    "stop_processes",
    "temp_pg_database",
    "temp_root",
    "watchdog",
]

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_T0 = time.monotonic()


def say(message: str) -> None:
    """Print a progress line with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


def machine_load() -> str:
    """CPU count and load averages, to put the figures in context."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} / {five:.2f} / {fifteen:.2f}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (inherited by Mosquitto)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class BenchTimeout(Exception):
    """The benchmark ran past its own time limit (``--timeout``)."""


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise :class:`BenchTimeout` in the main thread after ``seconds``; SIGTERM raises
    ``KeyboardInterrupt``. Either way the caller's ``finally`` blocks clean up."""

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise BenchTimeout(f"the benchmark exceeded its time limit of {seconds:.0f}s")

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    old_term = signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)


@contextlib.contextmanager
def temp_root(prefix: str, *, keep: bool = False) -> Iterator[Path]:
    """A private temporary directory, removed at the end unless ``keep``."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


class Bench(Protocol):
    """A benchmark that :func:`run_bench` runs: ``run()`` returns the exit code."""

    def run(self) -> int: ...

    def close(self) -> None: ...


def run_bench(make_bench: Callable[[Path], Bench], *, timeout: float, prefix: str,
              keep: bool) -> int:
    """Run ``make_bench(root)`` in a temporary ``root`` under a :func:`watchdog`.

    The bench is always closed. Returns its exit code, or 2 on :class:`BenchTimeout`, 1 on
    ``RuntimeError`` and 130 on ``KeyboardInterrupt`` (each reported on stderr).
    """
    try:
        with watchdog(timeout), temp_root(prefix, keep=keep) as root:
            bench = make_bench(root)
            try:
                code = bench.run()
            finally:
                bench.close()
    except BenchTimeout as e:
        print(f"ABORTED: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    say(f"done; machine: {machine_load()}")
    return code


def stop_processes(processes: list[BaseProcess], timeout: float = 5.0) -> None:
    """Terminate (then kill) the benchmark's own child processes."""
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(Exception):
                p.kill()
            p.join(2)


# --- CPU accounting (Linux /proc) ----------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[str, int, float] | None:
    """``(comm, starttime in ticks, utime + stime in seconds)`` of ``pid`` from
    ``/proc/<pid>/stat`` (the totals of all its threads), or ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, tail = text.rpartition(")")  # comm may hold spaces and parentheses
    comm = head.partition("(")[2]
    fields = tail.split()  # fields[0] is field 3 (state) of proc(5)
    try:
        utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    except (IndexError, ValueError):
        return None
    return comm, start, (utime + stime) / _CLK_TCK


def pids_by_comm(prefix: str) -> list[int]:
    """Pids of the processes whose command name (``/proc/<pid>/comm``) starts with
    ``prefix``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(prefix):
            pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class _MachineCpu:
    """Seconds summed over all CPUs since boot, from the ``cpu`` line of ``/proc/stat``."""

    busy: float  # user + nice + system + irq + softirq (guest time is inside user)
    irq: float  # irq + softirq (also in the interrupted tasks' times without
    # CONFIG_IRQ_TIME_ACCOUNTING)
    steal: float  # taken by the hypervisor: neither idle nor used here


def _machine_cpu() -> _MachineCpu:
    with open("/proc/stat") as f:
        first = f.readline().split()
    assert first[0] == "cpu", first
    v = [int(x) for x in first[1:]] + [0] * 10
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return _MachineCpu(busy=(user + nice + system + irq + softirq) / _CLK_TCK,
                       irq=(irq + softirq) / _CLK_TCK, steal=steal / _CLK_TCK)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by named groups of processes and by the whole machine."""

    at: float  # time.monotonic()
    machine: _MachineCpu
    groups: dict[str, dict[tuple[int, int], float]]  # name -> (pid, starttime) -> seconds


def cpu_snapshot(groups: Mapping[str, Iterable[int | None]]) -> CpuSnapshot:
    """Read ``/proc`` for each group of pids (``None`` and vanished pids are skipped).

    A process is keyed by pid and start time, so a reused pid is not taken for the
    process that had it before.
    """
    machine = _machine_cpu()
    seen: dict[str, dict[tuple[int, int], float]] = {}
    for name, pids in groups.items():
        seen[name] = {}
        for pid in pids:
            st = None if pid is None else _proc_stat(pid)
            if pid is not None and st is not None:
                seen[name][(pid, st[1])] = st[2]
    return CpuSnapshot(at=time.monotonic(), machine=machine, groups=seen)


@dataclass
class CpuUsage:
    """CPU seconds used between two snapshots.

    ``groups`` holds each group's seconds; a process that started in between counts in
    full, one that exited in between counts for nothing (it is in ``other``) and is
    counted in ``exited``. ``machine`` is the non-idle time of all CPUs (steal excluded;
    sampled per clock tick, while the processes' times are exact), ``other`` what the
    groups do not explain: other processes, give or take a tick per CPU per second.
    """

    wall: float
    machine: float
    irq: float
    steal: float
    groups: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)

    @property
    def other(self) -> float:
        return self.machine - sum(self.groups.values())

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot) -> CpuUsage:
        usage = cls(wall=after.at - before.at,
                    machine=after.machine.busy - before.machine.busy,
                    irq=after.machine.irq - before.machine.irq,
                    steal=after.machine.steal - before.machine.steal)
        for name, now in after.groups.items():
            then = before.groups.get(name, {})
            usage.groups[name] = sum((s - then.get(key, 0.0) for key, s in now.items()), 0.0)
            usage.processes[name] = len(now)
            usage.exited[name] = len(then.keys() - now.keys())
        return usage


# --- minting -------------------------------------------------------------------------------
def _mint_part(pki_dir: str, model: str, count: int, out: str, endpoint: Endpoint) -> list[
        tuple[str, str, str]]:
    pki = MakerPKI.load(Path(pki_dir))
    units = mint(pki, model=model, count=count, out=Path(out), endpoint=endpoint, labels=False)
    return [(u.device_id, u.model, str(u.directory)) for u in units]


def mint_units(pki: MakerPKI, models: dict[str, int], out: Path, endpoint: Endpoint,
               processes: int) -> tuple[dict[str, Any], list[MintedUnit]]:
    """Mint units in parallel (``hearth.factory.mint``, ``labels=False``).

    Each process mints into its own ``out/part-N`` directory (argon2 and scrypt hashing of
    the setup code dominate: tens of ms per unit). Returns one merged manifest (what
    ``hearth fleet import`` would read) and the minted units.
    """
    from hearth.factory import load_manifest

    jobs: list[tuple[str, int, Path]] = []
    n = 0
    for model, count in models.items():
        per = max(1, -(-count // processes))
        left = count
        while left > 0:
            k = min(per, left)
            jobs.append((model, k, out / f"part-{n}"))
            n += 1
            left -= k
    units: list[MintedUnit] = []
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, processes), mp_context=ctx) as pool:
        futures = [pool.submit(_mint_part, str(pki.directory), model, k, str(d), endpoint)
                   for model, k, d in jobs]
        for f in futures:
            units += [MintedUnit(i, m, Path(d)) for i, m, d in f.result()]
    merged: dict[str, Any] = {"format": 1, "batch_id": secrets.token_hex(8), "units": []}
    for _, _, d in jobs:
        merged["units"] += load_manifest(d)["units"]
    return merged, units


# --- PostgreSQL ----------------------------------------------------------------------------
class PgUnavailable(Exception):
    """PostgreSQL cannot be used (unreachable, not loopback, no psycopg)."""


def _is_loopback(host: str | None) -> bool:
    if host is None or host.startswith("/"):
        return True  # a Unix socket
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def temp_pg_database(url: str) -> Iterator[str]:
    """Create a temporary database on the server of ``url``; yield its URL; drop it.

    ``url`` names an existing database to connect to for ``CREATE DATABASE``
    (``postgres`` or ``test``). Raises :class:`PgUnavailable` if the server cannot be
    reached or is not on a loopback address.
    """
    try:
        import psycopg
        from sqlalchemy.engine import make_url
    except ImportError as e:  # pragma: no cover - psycopg is a Hearth dependency
        raise PgUnavailable(f"psycopg is not installed: {e}") from e
    try:
        parsed = make_url(url)
    except Exception as e:
        raise PgUnavailable(f"not a database URL: {e}") from e
    if not parsed.get_backend_name().startswith("postgresql"):
        raise PgUnavailable(f"not a PostgreSQL URL: {parsed.get_backend_name()}")
    if not _is_loopback(parsed.host):
        raise PgUnavailable(f"{parsed.host} is not a loopback address; benchmarks stay local")
    params: dict[str, Any] = {
        "host": parsed.host, "port": parsed.port, "user": parsed.username,
        "password": parsed.password, "dbname": parsed.database or "postgres",
        "connect_timeout": 5, "autocommit": True,
    }
    params = {k: v for k, v in params.items() if v is not None}
    name = f"hearth_bench_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(**params) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as e:
        raise PgUnavailable(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    say(f"created temporary PostgreSQL database {name}")
    try:
        yield parsed.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False)
    finally:
        try:
            with psycopg.connect(**params) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            say(f"dropped temporary PostgreSQL database {name}")
        except psycopg.Error as e:
            print(f"WARNING: could not drop database {name}: {e}", file=sys.stderr)


# --- MQTT sessions -------------------------------------------------------------------------
def clean_mqtt_session(identity: Any, client_id: str, timeout: float = 10.0) -> bool:
    """Discard the broker's persistent session of ``client_id`` (connect with clean start
    and no session expiry, then disconnect). ``identity`` is an ``MqttIdentity``."""
    from hearth.service.mqtt import make_client

    client = make_client(identity, client_id=client_id, clean_start=True, session_expiry=0)
    acked: list[bool] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: acked.append(not rc.is_failure)
    try:
        client.reconnect()
        deadline = time.monotonic() + timeout
        while not acked and time.monotonic() < deadline:
            client.loop(0.05)
        client.disconnect()
        client.loop(0.05)
        return bool(acked and acked[0])
    except OSError:
        return False
    finally:
        with contextlib.suppress(Exception):
            sock = client.socket()
            if sock is not None:
                sock.close()
