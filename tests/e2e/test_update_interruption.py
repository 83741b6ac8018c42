"""``kill -9`` of a real unit process (``hearth device run``) during the download, during the
install and between the switch and the commit of an update served by the real service; after
each kill the next start boots a good version and carries on, and the update completes.

The slot layer's own interruption tests (``tests/device/test_slots.py``) stop at every
durable step; this is the same at the agent level, with the whole runtime in the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hearth.device.slots import SlotManager
from hearth.updates.bundle import build_bundle
from hearth.updates.reference import write_reference_app
from tests.e2e.conftest import make_fleet
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = 24 * 1024 * 1024  # a firmware-sized bundle: the download and install take a while


def _start(unit: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hearth.cli", "device", "run", "--dir", str(unit),
         "--telemetry-interval", "0.5", "--backoff-base", "0.2", "--backoff-cap", "1",
         "--check-interval", "2", "--health-timeout", "30"],
        cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def _kill_when(proc: subprocess.Popen[bytes], cond: Callable[[], bool], what: str,
               log: Path) -> None:
    def reached() -> bool:
        assert proc.poll() is None, f"the unit exited: {log.read_text()[-3000:]}"
        return cond()

    wait_until(reached, timeout=60, interval=0.001, what=what)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_kill_9_at_each_step_of_an_update_leaves_a_unit_that_boots_and_finishes(
    tmp_path: Path,
) -> None:
    f = make_fleet(tmp_path, thermostats=1, locks=0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert f.stack.updates is not None and f.stack.broker is not None
        repo = f.stack.updates.repository
        assert repo is not None
        src = write_reference_app("thermostat", tmp_path / "src", version="1.1.0")
        (src / "firmware.bin").write_bytes(os.urandom(PAYLOAD))
        bundle = tmp_path / "thermostat-1.1.0.tar"
        build_bundle(src, model="thermostat", version="1.1.0", min_from_version="1.0.0",
                     out=bundle)
        release = repo.publish(bundle, model="thermostat", version="1.1.0",
                               min_from_version="1.0.0")
        unit = f.units[0].directory
        slots = SlotManager(unit)
        downloads = unit / "update" / "downloads"
        log = tmp_path / "unit.log"
        with f.api() as api:
            r = api.post("/rollouts", json={"target_name": release.target_name,
                                            "stages": [100], "min_sample": 1})
            assert r.status_code == 201, r.text

        def committed() -> tuple[str, str | None, str | None]:
            st = slots.state()
            return st.committed, st.pending, st.versions[st.committed]

        # 1. during the download
        procs.append(p1 := _start(unit, log))
        part = downloads / f"{release.sha256}.bundle.part"
        _kill_when(p1, lambda: part.exists() and part.stat().st_size > 0, "the download", log)
        got = part.stat().st_size
        assert 0 < got < release.length
        assert committed() == ("a", None, "1.0.0")

        # 2. during the install (the download resumes from where it stopped)
        procs.append(p2 := _start(unit, log))
        staging = unit / "slots" / ".b.staging"
        _kill_when(p2, staging.exists, "the install", log)
        assert committed() == ("a", None, "1.0.0")
        served = f.stack.updates.stats.by_kind["targets"]
        assert served == 2 * release.length - got, "the second start resumed with a Range"
        assert slots.boot().slot == "a"  # what the next start will run: the good version

        # 3. between the switch and the commit: the broker is frozen so the new version's
        #    health check (connect and report) cannot finish, and the unit is killed then
        procs.append(p3 := _start(unit, log))
        broker_pid = f.stack.broker.pid
        assert broker_pid is not None
        installing = unit / "slots" / ".b.staging"
        wait_until(lambda: installing.exists() or slots.state().pending == "b", timeout=60,
                   interval=0.001, what="the install to start")
        os.kill(broker_pid, signal.SIGSTOP)
        try:
            # killed once the switch is made and the new version's trial boot has begun
            # (counted on disk before its app runs): it is waiting for its health check
            _kill_when(p3, lambda: slots.state().pending == "b"
                       and slots.state().boot_attempts >= 1,
                       "the new version awaiting its health check", log)
        finally:
            os.kill(broker_pid, signal.SIGCONT)
        st = slots.state()
        assert (st.committed, st.pending, st.versions["b"]) == ("a", "b", "1.1.0")

        # 4. the next start boots the new version on trial, passes the check and commits
        procs.append(_start(unit, log))
        wait_until(lambda: committed() == ("b", None, "1.1.0"), timeout=60,
                   what=f"the commit ({log.read_text()[-2000:] if log.exists() else ''})")
        with f.api() as api:
            wait_until(lambda: api.get(f"/units/{f.units[0].device_id}/update").json()
                       .get("last_event") == "update_installed", timeout=30,
                       what="the service to hear of it")
        assert not list(downloads.glob("*.part"))
        assert SlotManager(unit).verify_slot("b").ok
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
        f.stack.stop()
