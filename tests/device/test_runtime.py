"""The unit runtime without a network: the app comes from the verified slot (and only from
verified bytes), trial versions that cannot load or fail their health check are rolled back,
quarantine restricts commands. The networked journeys are in tests/e2e/test_updates.py."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hearth.device import runtime as runtime_mod
from hearth.device.appload import load_app
from hearth.device.apps import CommandFailed
from hearth.device.runtime import AppHost, UnitRuntime
from hearth.device.slots import SlotManager
from hearth.protocol import MODELS
from hearth.updates.bundle import build_bundle, target_name_for
from hearth.updates.errors import UpdateError, UpdateReason
from hearth.updates.reference import build_reference_bundle, write_reference_app
from tests.helpers import free_port, wait_until
from tests.updates.support import World, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    for model in ("thermostat", "lock"):
        out = tmp_path / f"{model}-1.0.0.tar"
        build_reference_bundle(model, "1.0.0", out=out)
        w.repo.publish(out, model=model, version="1.0.0", min_from_version="0.0.0")
    return w


@pytest.fixture
def unit(world: World, copy_unit: Callable[..., Path]) -> Path:
    directory = copy_unit("thermostat", 0)
    world.provision(directory, "thermostat/thermostat-1.0.0.tar")
    return directory


@pytest.fixture
def runtimes() -> Iterator[list[UnitRuntime]]:
    made: list[UnitRuntime] = []
    yield made
    for rt in made:
        rt.stop()


def offline(unit: Path, made: list[UnitRuntime], **kw: object) -> UnitRuntime:
    """A runtime whose broker does not answer (nothing listens on the port)."""
    rt = UnitRuntime(unit, mqtt_host="127.0.0.1", mqtt_port=free_port(), backoff_base=0.05,
                     backoff_cap=0.2, health_timeout=0.5, **kw)  # type: ignore[arg-type]
    made.append(rt)
    return rt


def _publish_app(world: World, tmp: Path, version: str, app_py: str | None = None) -> str:
    src = write_reference_app("thermostat", tmp / f"src-{version}", version=version)
    if app_py is not None:
        (src / "app.py").write_text(app_py)
    out = tmp / f"t-{version}.tar"
    build_bundle(src, model="thermostat", version=version, min_from_version="1.0.0", out=out)
    world.repo.publish(out, model="thermostat", version=version, min_from_version="1.0.0")
    return target_name_for("thermostat", version)


def _install(world: World, unit: Path, target: str) -> None:
    SlotManager(unit).install(world.repo.target_file(target), world.repo.delivery(target))


def test_app_runs_from_the_verified_slot_and_writes_nothing_there(
        unit: Path, runtimes: list[UnitRuntime]) -> None:
    before = {p: p.stat().st_mtime_ns for p in (unit / "slots").rglob("*") if p.is_file()}
    rt = offline(unit, runtimes, app_options={"tick": 0.05})
    boot = rt.start()
    assert (boot.slot, rt.mode, rt.loaded_version) == ("a", "normal", "1.0.0")
    app = rt.host.current
    assert app is not None and type(app).__module__.startswith("_hearth_app_a_1_0_0")
    wait_until(lambda: getattr(app, "ticks", 0) >= 3, timeout=5, what="the control loop")
    assert set(rt.host.readings()) == set(MODELS["thermostat"].readings)
    rt.host.call(lambda a: a.set_target_locally(23.0))  # type: ignore[attr-defined]
    assert rt.host.readings()["target"] == 23.0
    rt.stop()
    runtimes.clear()
    assert not list((unit / "slots").rglob("__pycache__"))
    after = {p: p.stat().st_mtime_ns for p in (unit / "slots").rglob("*") if p.is_file()
             and p.name not in ("state.json", ".lock")}
    assert after == {p: t for p, t in before.items() if p in after}
    assert SlotManager(unit).verify_slot("a").ok


def test_only_bytes_matching_the_signed_manifest_are_executed(unit: Path) -> None:
    slots = SlotManager(unit)
    assert slots.boot().slot == "a"
    # changed after the boot-time check (time of check / time of use): refused at load
    entry = unit / "slots" / "a" / "app" / "thermostat.py"
    entry.write_text(entry.read_text().replace("class ThermostatApp", "class Evil"))
    with pytest.raises(UpdateError) as e:
        load_app(slots, "a")
    assert e.value.reason is UpdateReason.TAMPERED
    manifest = unit / "slots" / "a" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"1.0.0"', b'"1.0.1"', 1))
    with pytest.raises(UpdateError) as e:
        load_app(slots, "a")
    assert e.value.reason is UpdateReason.TAMPERED


def test_a_new_version_that_cannot_start_is_rolled_back_at_boot(
        world: World, unit: Path, tmp_path: Path, runtimes: list[UnitRuntime]) -> None:
    target = _publish_app(world, tmp_path, "1.1.0", app_py="raise RuntimeError('bug')\n")
    _install(world, unit, target)
    rt = offline(unit, runtimes)
    boot = rt.start()
    assert (boot.slot, rt.loaded_version, rt.mode) == ("a", "1.0.0", "normal")
    state = SlotManager(unit).state()
    assert (state.committed, state.pending, state.versions["b"]) == ("a", None, None)
    assert state.last_result is not None and state.last_result["reason"] == "load_failed"


def test_a_new_version_without_a_health_check_rolls_back_in_process(
        world: World, unit: Path, tmp_path: Path, runtimes: list[UnitRuntime]) -> None:
    _install(world, unit, _publish_app(world, tmp_path, "1.1.0"))
    rt = offline(unit, runtimes, app_options={"tick": 0.05})
    boot = rt.start()
    assert (boot.slot, boot.trial) == ("b", True)
    # no broker: it cannot connect and report within the health timeout -> back to 1.0.0
    wait_until(lambda: ("update_rolled_back", "1.1.0 health_check") in rt.events, timeout=10,
               what="the rollback")
    assert rt.loaded_version == "1.0.0" and rt.host_slot() == "a"
    assert rt.host.current is not None and rt.host.current.running  # type: ignore[attr-defined]
    state = SlotManager(unit).state()
    assert (state.committed, state.pending) == ("a", None)


def test_safe_mode_runs_nothing_and_refuses_every_command(
        unit: Path, runtimes: list[UnitRuntime]) -> None:
    (unit / "slots" / "a" / "app" / "thermostat.py").write_text("# nothing\n")
    rt = offline(unit, runtimes)
    rt.start()
    assert rt.mode == "safe_mode" and rt.host.current is None
    assert rt.agent is not None and rt.agent.quiet
    assert rt.agent.enqueue_telemetry() is None  # nothing but the alerting path
    with pytest.raises(CommandFailed) as e:
        rt.host.execute("set_target", {"target": 21.0})
    assert e.value.reason == "safe_mode"
    with pytest.raises(CommandFailed):
        rt.host.execute("acknowledge_alert", {})
    wait_until(lambda: any(k == "integrity_alert" for k, _ in rt.events), timeout=5)
    assert rt.mode == "safe_mode"


def test_quarantine_until_acknowledged(
        world: World, unit: Path, tmp_path: Path, runtimes: list[UnitRuntime]) -> None:
    _install(world, unit, _publish_app(world, tmp_path, "1.1.0"))
    slots = SlotManager(unit)
    assert slots.boot().trial
    slots.commit()
    (unit / "slots" / "b" / "app" / "app.py").write_text("# replaced\n")
    rt = offline(unit, runtimes, app_options={"tick": 0.05})
    rt.start()
    assert (rt.mode, rt.host_slot(), rt.loaded_version) == ("quarantined", "a", "1.0.0")
    assert rt.agent is not None and rt.agent.enqueue_telemetry() is None
    with pytest.raises(CommandFailed) as e:
        rt.host.execute("set_target", {"target": 21.0})
    assert e.value.reason == "quarantined"
    with pytest.raises(CommandFailed):
        rt.host.execute("check_updates", {})
    assert rt.host.call(lambda app: app.readings())["target"] == 20.0  # the knob still works
    rt.host.execute("acknowledge_alert", {})
    assert rt.mode == "normal" and slots.state().alert is None
    rt.host.execute("set_target", {"target": 21.0})
    assert rt.agent.enqueue_telemetry() is not None


def test_app_host_swaps_under_one_lock() -> None:
    calls: list[str] = []

    class App:
        model = MODELS["lock"]
        running = False

        def __init__(self, name: str) -> None:
            self.name = name

        def readings(self) -> dict[str, bool | float | str]:
            return {"lock": "locked"}

        def execute(self, name: str, params: object) -> None:
            calls.append(f"{self.name}:{name}")

        def start(self) -> None:
            self.running = True

        def stop(self) -> None:
            self.running = False

    old, new = App("old"), App("new")
    host = AppHost(MODELS["lock"], old, on_system=lambda n: calls.append(f"system:{n}"))  # type: ignore[arg-type]
    host.start()
    host.execute("lock", {})
    assert host.swap(new) is old  # type: ignore[arg-type]
    assert (old.running, new.running) == (False, True)
    host.execute("unlock", {})
    host.execute("check_updates", {})
    host.restricted = "quarantined"
    with pytest.raises(CommandFailed):
        host.execute("lock", {})
    assert calls == ["old:lock", "new:unlock", "system:check_updates"]


class _CheckLoop:
    """What :meth:`UnitRuntime._loop` reads, with a scripted ``check_for_update``."""

    def __init__(self, outcomes: list[str], check_interval: float) -> None:
        self.outcomes = outcomes
        self.checks: list[float] = []
        self.mode = "normal"
        self.alert_interval = 3600.0
        self.check_interval = check_interval
        self._stop = threading.Event()
        self._check_now = threading.Event()
        self.agent = types.SimpleNamespace(link=types.SimpleNamespace(connected=True,
                                                                      connects=1))

    def check_for_update(self) -> str:
        self.checks.append(time.monotonic())
        return self.outcomes[min(len(self.checks), len(self.outcomes)) - 1]


def test_unanswered_checks_are_retried_with_backoff_then_back_to_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A check that got no answer (update service away) or whose update failed is
    retried after a jittered backoff, not a whole check_interval (an hour here) later;
    after an answer the unit waits the interval again."""
    monkeypatch.setattr(runtime_mod, "CHECK_RETRY_BASE", 0.2)
    monkeypatch.setattr(runtime_mod, "MIN_CHECK_SPACING", 0.0)
    loop = _CheckLoop(["no_answer", "failed", "no_answer", "up_to_date"], 3600.0)
    thread = threading.Thread(target=UnitRuntime._loop, args=(loop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(loop.checks) >= 4, timeout=20,
                   what="three retries after unanswered or failed checks")
        # after the answer: nothing more for a while (the next check is an hour away)
        with pytest.raises(AssertionError, match="timed out"):
            wait_until(lambda: len(loop.checks) > 4, timeout=1.5, what="a fifth check")
    finally:
        loop._stop.set()
        thread.join(timeout=5)
    assert len(loop.checks) == 4
