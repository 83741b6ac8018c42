"""Signed updates end to end, against the real service (Stack: Mosquitto with mTLS and the
dynsec ACLs, ingest, the HTTPS listener serving the TUF repository with update tokens) and
real unit runtimes (boot, slots, in-process switch, health check).

One fleet for the module (the service takes seconds to start); each test uses its own units.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hearth.device.runtime import UnitRuntime
from hearth.device.slots import SlotManager
from hearth.factory import MintedUnit
from hearth.updates.reference import build_reference_bundle
from tests.e2e.conftest import Fleet, make_fleet
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
T11 = "thermostat/thermostat-1.1.0.tar"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("updates-e2e")
    f = make_fleet(root, thermostats=4, locks=1)
    assert f.stack.updates is not None
    repo = f.stack.updates.repository
    assert repo is not None
    bundle = root / "thermostat-1.1.0.tar"
    build_reference_bundle("thermostat", "1.1.0", out=bundle, min_from_version="1.0.0")
    repo.publish(bundle, model="thermostat", version="1.1.0", min_from_version="1.0.0")
    runtimes: list[UnitRuntime] = []
    f.runtimes = runtimes  # type: ignore[attr-defined]
    try:
        yield f
    finally:
        for rt in runtimes:
            rt.stop()
        f.stack.stop()


def units(f: Fleet, model: str) -> list[MintedUnit]:
    return [u for u in f.units if u.model == model]


def run(f: Fleet, unit: MintedUnit, **kw: Any) -> UnitRuntime:
    options: dict[str, Any] = {"telemetry_interval": 0.5, "backoff_base": 0.2,
                               "backoff_cap": 1.0, "check_interval": 2.0,
                               "health_timeout": 20.0, **kw}
    rt = UnitRuntime(unit.directory, **options)
    rt.start()
    f.runtimes.append(rt)  # type: ignore[attr-defined]
    return rt


def api(f: Fleet) -> httpx.Client:
    return f.api()


def rollout(f: Fleet, **body: Any) -> dict[str, Any]:
    with api(f) as c:
        r = c.post("/rollouts", json=body)
        assert r.status_code == 201, r.text
        result: dict[str, Any] = r.json()
        return result


def unit_update(f: Fleet, device_id: str) -> dict[str, Any]:
    with api(f) as c:
        body: dict[str, Any] = c.get(f"/units/{device_id}/update").json()
        return body


class Sampler:
    """Records the time between consecutive control-loop steps of whichever app runs."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self._current = current
        self.gaps: list[float] = []
        self.apps: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last: float | None = None
        while not self._stop.is_set():
            app = self._current()
            tick = getattr(app, "last_tick", None)
            if tick is not None and tick != last:
                self.apps.add(id(app))
                if last is not None:
                    self.gaps.append(tick - last)
                last = tick
            self._stop.wait(0.002)  # sampling cadence of the control-loop observer


def test_update_through_the_service_keeps_regulating_and_offline_unit_catches_up(
    fleet: Fleet,
) -> None:
    online, offline = units(fleet, "thermostat")[:2]
    rt = run(fleet, online, app_options={"tick": 0.5})
    wait_until(lambda: unit_update(fleet, online.device_id).get("last_check_at"), timeout=30,
               what="the unit's first update check")
    assert rt.loaded_version == "1.0.0"
    with api(fleet) as c:
        r = c.put("/support-periods/thermostat", json={"end_date": "2031-12-31"})
        assert r.status_code == 200, r.text
    with Sampler(lambda: rt.host.current) as sampler:
        started = rollout(fleet, target_name=T11, stages=[100], min_sample=1)
        wait_until(lambda: ("update_installed", "1.1.0") in rt.events, timeout=60,
                   what="the update to be installed and committed")
        ticks = getattr(rt.host.current, "ticks", 0)
        wait_until(lambda: getattr(rt.host.current, "ticks", 0) >= ticks + 2, timeout=30,
                   what="a couple of control steps of the new version")
    assert rt.loaded_version == "1.1.0" and rt.mode == "normal"
    state = SlotManager(online.directory).state()
    assert (state.committed, state.pending, state.versions["b"]) == ("b", None, "1.1.0")
    # the device's job: the control loop paused only for the switch
    assert len(sampler.apps) == 2, "steps were seen from the old and the new version"
    assert max(sampler.gaps) < 2.0, f"control-loop gap {max(sampler.gaps):.3f} s"
    print(f"\ncontrol-loop gap across the update: max {max(sampler.gaps):.3f} s "
          f"(tick 0.5 s); switch held the device {max(rt.host.swaps) * 1000:.1f} ms")
    assert rt.events[0] == ("update_available", "1.1.0")
    # the service saw it (events through ingest) and shows it
    wait_until(lambda: unit_update(fleet, online.device_id)["version"] == "1.1.0", timeout=30,
               what="the service to record the new version")
    with api(fleet) as c:
        progress = c.get(f"/rollouts/{started['id']}").json()
    assert progress["stages"][0]["installed"] == 1 and progress["status"] == "active"
    assert rt.support() is not None and rt.support()["end_date"] == "2031-12-31"  # type: ignore[index]

    # a unit that was offline while its cohort was reached gets the release when it returns
    late = run(fleet, offline, app_options={"tick": 0.5})
    wait_until(lambda: ("update_installed", "1.1.0") in late.events, timeout=60,
               what="the offline unit to catch up")
    wait_until(lambda: c_installed(fleet, started["id"]) == 2, timeout=30,
               what="both outcomes recorded")


def c_installed(f: Fleet, rollout_id: str) -> int:
    with api(f) as c:
        return int(c.get(f"/rollouts/{rollout_id}").json()["stages"][0]["installed"])


def test_lock_accepts_local_commands_throughout_its_update_then_refuses_a_tampered_one(
    fleet: Fleet, tmp_path: Path,
) -> None:
    (lock,) = units(fleet, "lock")
    rt = run(fleet, lock)
    repo = fleet.stack.updates.repository  # type: ignore[union-attr]
    assert repo is not None
    wait_until(lambda: rt.agent is not None and rt.agent.connected, timeout=30)
    for version, min_from in (("1.1.0", "1.0.0"), ("1.2.0", "1.1.0")):
        bundle = tmp_path / f"lock-{version}.tar"
        build_reference_bundle("lock", version, out=bundle, min_from_version=min_from)
        repo.publish(bundle, model="lock", version=version, min_from_version=min_from)

    latencies: list[float] = []
    errors: list[BaseException] = []
    served_by: set[int] = set()
    stop = threading.Event()

    def press_buttons() -> None:
        actions = ("unlock", "lock")
        i = 0
        while not stop.is_set():
            action = actions[i % 2]

            def press(app: Any, action: str = action) -> None:
                served_by.add(id(app))
                app.operate_locally(action)

            t0 = time.monotonic()
            try:
                rt.host.call(press)
            except BaseException as e:  # noqa: BLE001 - every refusal is a test failure
                errors.append(e)
            latencies.append(time.monotonic() - t0)
            i += 1
            stop.wait(0.005)  # a person pressing the button every 5 ms

    presser = threading.Thread(target=press_buttons, daemon=True)
    presser.start()
    try:
        first = rollout(fleet, target_name="lock/lock-1.1.0.tar", stages=[100], min_sample=1)
        wait_until(lambda: ("update_installed", "1.1.0") in rt.events, timeout=60,
                   what="the lock's update")
        wait_until(lambda: len(served_by) == 2, timeout=30,
                   what="the button served by the new version too")
    finally:
        stop.set()
        presser.join()
    assert errors == []
    assert len(served_by) == 2, "the button worked on the old and on the new version"
    assert max(latencies) < 0.5, f"a local command waited {max(latencies):.3f} s"
    print(f"\nlock: {len(latencies)} local operations during the update, none refused, "
          f"slowest {max(latencies) * 1000:.1f} ms")

    # a bundle tampered on the service's disk: refused by the unit, and the rollout halts
    target = repo.target_file("lock/lock-1.2.0.tar")
    data = bytearray(target.read_bytes())
    data[-600] ^= 0xFF
    target.write_bytes(bytes(data))
    with api(fleet) as c:
        assert c.post(f"/rollouts/{first['id']}/cancel").json()["status"] == "cancelled"
    second = rollout(fleet, target_name="lock/lock-1.2.0.tar", stages=[100], min_sample=1,
                     failure_threshold=0.5)

    def halted() -> bool:
        with api(fleet) as c:
            return bool(c.get(f"/rollouts/{second['id']}").json()["status"] == "halted")

    wait_until(halted, timeout=60, what="the rollout to halt on the failure")
    failed = [d for k, d in rt.events if k == "update_failed"]
    assert failed and failed[0].startswith("1.2.0 hash_mismatch"), failed
    state = SlotManager(lock.directory).state()
    assert (state.versions[state.committed], state.pending) == ("1.1.0", None)
    assert rt.loaded_version == "1.1.0"
    with api(fleet) as c:
        progress = c.get(f"/rollouts/{second['id']}").json()
    assert progress["recent_failures"][0]["detail"].startswith("1.2.0 hash_mismatch")
    view = unit_update(fleet, lock.device_id)
    assert any("could not be installed" in text for _lvl, text in view["notices"])


def _install_and_commit(f: Fleet, unit: MintedUnit, target: str) -> None:
    repo = f.stack.updates.repository  # type: ignore[union-attr]
    assert repo is not None
    slots = SlotManager(unit.directory)
    slots.install(repo.target_file(target), repo.delivery(target))
    assert slots.boot().trial
    slots.commit()


def _telemetry_count(f: Fleet, device_id: str) -> int:
    with api(f) as c:
        return len(c.get(f"/units/{device_id}/telemetry", params={"limit": 100}).json()["items"])


def _alerts(f: Fleet, device_id: str) -> list[dict[str, Any]]:
    with api(f) as c:
        return [a for a in c.get("/integrity-alerts").json()["alerts"]
                if a["device_id"] == device_id]


def test_tampered_active_slot_falls_back_alerts_and_waits_for_an_operator(
    fleet: Fleet,
) -> None:
    unit = units(fleet, "thermostat")[2]
    _install_and_commit(fleet, unit, T11)  # slot b: 1.1.0 (active), slot a: 1.0.0
    app_file = unit.directory / "slots" / "b" / "app" / "thermostat.py"
    app_file.write_text(app_file.read_text() + "\nimport os  # implant\n")
    rt = run(fleet, unit, app_options={"tick": 0.5})
    assert (rt.mode, rt.loaded_version, rt.host_slot()) == ("quarantined", "1.0.0", "a")
    alert = wait_until(lambda: _alerts(fleet, unit.device_id), timeout=30,
                       what="the alert at the service")[0]
    assert "slot(s) b failed verification" in alert["detail"]
    assert "thermostat.py" in alert["detail"]
    # the app still regulates, but the unit talks only to the alerting path
    ticks = rt.host.current.ticks  # type: ignore[attr-defined]
    wait_until(lambda: rt.host.current.ticks >= ticks + 3,  # type: ignore[attr-defined]
               timeout=30, what="the quarantined app to keep regulating")
    assert rt.host.current is not None and rt.host.current.running  # type: ignore[attr-defined]
    assert _telemetry_count(fleet, unit.device_id) == 0
    with api(fleet) as c:
        cmd = c.post(f"/units/{unit.device_id}/commands",
                     json={"name": "set_target", "params": {"target": 22}}).json()
        result = wait_until(lambda: (c.get(f"/commands/{cmd['command_id']}").json()
                                     if c.get(f"/commands/{cmd['command_id']}").json()["status"]
                                     not in ("pending", "sent") else None), timeout=30)
        assert (result["status"], result["result"]["reason"]) == ("failed", "quarantined")
        # the owner's view shows it too
        view = c.get(f"/units/{unit.device_id}/update").json()
        assert view["alert"] and view["notices"][0][0] == "alert"
        # an operator acts: the quarantine is lifted on the unit
        ack = c.post(f"/units/{unit.device_id}/integrity/acknowledge")
        assert ack.status_code == 200 and ack.json()["acknowledged"] == 1
    wait_until(lambda: rt.mode != "quarantined", timeout=30, what="the quarantine to lift")
    wait_until(lambda: _telemetry_count(fleet, unit.device_id) > 0, timeout=30,
               what="telemetry after the acknowledgement")
    assert _alerts(fleet, unit.device_id) == []


def test_both_slots_tampered_gives_safe_mode_that_keeps_alerting(fleet: Fleet) -> None:
    unit = units(fleet, "thermostat")[3]
    _install_and_commit(fleet, unit, T11)
    for slot in ("a", "b"):
        (unit.directory / "slots" / slot / "app" / "app.py").write_text("raise SystemExit\n")
    rt = run(fleet, unit, alert_interval=1.0)
    assert rt.mode == "safe_mode" and rt.host.current is None
    wait_until(lambda: (_alerts(fleet, unit.device_id) or [{"count": 0}])[0]["count"] >= 2,
               timeout=30, what="repeated alerts from the unit in safe mode")
    assert "safe_mode" in _alerts(fleet, unit.device_id)[0]["detail"]
    assert _telemetry_count(fleet, unit.device_id) == 0
    with api(fleet) as c:
        ack = c.post(f"/units/{unit.device_id}/integrity/acknowledge").json()
        result = wait_until(lambda: (c.get(f"/commands/{ack['command_id']}").json()
                                     if c.get(f"/commands/{ack['command_id']}").json()["status"]
                                     not in ("pending", "sent") else None), timeout=30)
    assert (result["status"], result["result"]["reason"]) == ("failed", "safe_mode")
    first = dt.datetime.now(dt.UTC)
    wait_until(lambda: _alerts(fleet, unit.device_id)
               and dt.datetime.fromisoformat(
                   _alerts(fleet, unit.device_id)[0]["last_seen_at"]) > first,
               timeout=30, what="the unit to keep alerting after the acknowledgement")
    assert rt.mode == "safe_mode"
