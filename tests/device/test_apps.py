"""Reference apps: they do their job locally and never report out-of-range readings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.device.apps import APPS, CommandFailed, DeviceApp, LockApp, ThermostatApp
from hearth.errors import ValidationError
from hearth.protocol import MODELS, Reason, validate_values
from tests.helpers import wait_until

THERMOSTAT = MODELS["thermostat"]
LOCK = MODELS["lock"]


def test_registry_covers_every_model_with_a_matching_app() -> None:
    assert set(APPS) == set(MODELS)
    for name, factory in APPS.items():
        app = factory()
        assert isinstance(app, DeviceApp)
        assert app.model is MODELS[name]
        validate_values(app.readings(), MODELS[name].readings)


# -- thermostat --------------------------------------------------------------------------


def test_thermostat_heats_a_cold_room_to_target_and_holds_it() -> None:
    app = ThermostatApp(outside=5.0, temperature=12.0, target=21.0, hysteresis=0.5, seed=1)
    assert not app.heater
    app.step(1.0)
    assert app.heater  # far below target: heating
    for _ in range(6 * 360):  # six simulated hours in 10 s steps
        app.step(10.0)
    switches_before = app.heater_switches
    temps = []
    for _ in range(6 * 360):
        app.step(10.0)
        temps.append(app.temperature)
        validate_values(app.readings(), THERMOSTAT.readings)
    # regulated within the hysteresis band (plus one step's overshoot)
    assert 20.3 <= min(temps) and max(temps) <= 21.7
    # the relay cycles, but not at every step: hysteresis prevents chatter
    cycles = app.heater_switches - switches_before
    assert 2 <= cycles < len(temps) / 20


def test_thermostat_hysteresis_keeps_relay_state_inside_the_band() -> None:
    app = ThermostatApp(outside=20.0, temperature=20.0, target=20.0, hysteresis=1.0, seed=2)
    app.step(1.0)
    assert not app.heater  # at target, in the band: stays off
    app.execute("set_target", {"target": 21.2})
    assert app.heater  # now below target - hysteresis
    app.execute("set_target", {"target": 20.5})
    assert app.heater  # in the band: keeps heating
    app.execute("set_target", {"target": 18.0})
    assert not app.heater  # above target + hysteresis


def test_thermostat_cools_towards_outside_when_target_is_low() -> None:
    app = ThermostatApp(outside=0.0, temperature=25.0, target=5.0, seed=3)
    for _ in range(2000):
        app.step(10.0)
    assert not app.heater
    assert 4.0 <= app.temperature < 6.0


@settings(max_examples=50, deadline=None)
@given(
    outside=st.floats(-80.0, 150.0),
    temperature=st.floats(-40.0, 85.0),
    target=st.floats(5.0, 35.0),
    power=st.floats(0.0, 1.0),
    steps=st.lists(st.floats(0.0, 5000.0), max_size=30),
)
def test_thermostat_readings_always_in_model_range(
    outside: float, temperature: float, target: float, power: float, steps: list[float]
) -> None:
    app = ThermostatApp(
        outside=outside, temperature=temperature, target=target, heater_power=power, seed=4
    )
    validate_values(app.readings(), THERMOSTAT.readings)
    for dt in steps:
        app.step(dt)
        validate_values(app.readings(), THERMOSTAT.readings)


@pytest.mark.parametrize(
    ("name", "params", "reason"),
    [
        ("set_target", {"target": 99.0}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": 4.99}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": float("nan")}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": True}, Reason.WRONG_TYPE),
        ("set_target", {"target": "20"}, Reason.WRONG_TYPE),
        ("set_target", {}, Reason.INVALID_SCHEMA),
        ("set_target", {"target": 20.0, "extra": 1.0}, Reason.UNKNOWN_READING),
        ("open_window", {}, Reason.UNKNOWN_COMMAND),
    ],
)
def test_thermostat_refuses_bad_commands(name: str, params: dict[str, object], reason: str) -> None:
    app = ThermostatApp(target=20.0)
    with pytest.raises(ValidationError) as e:
        app.execute(name, params)
    assert e.value.reason == reason
    assert app.target == 20.0


def test_thermostat_local_knob_works_and_is_checked() -> None:
    app = ThermostatApp(target=20.0)
    app.set_target_locally(23.5)
    assert app.readings()["target"] == 23.5
    with pytest.raises(ValidationError):
        app.set_target_locally(50.0)


def test_thermostat_control_loop_runs_on_its_own_thread() -> None:
    app = ThermostatApp(tick=0.01, time_scale=600.0, outside=5.0, temperature=10.0, target=22.0)
    app.start()
    try:
        wait_until(lambda: app.ticks >= 20, what="control ticks")
        wait_until(lambda: app.temperature > 11.0, what="heating")
        assert app.running and app.last_tick is not None
        assert app.max_gap < 2.0
    finally:
        app.stop()
    assert not app.running


def test_control_loop_survives_a_failing_step() -> None:
    app = ThermostatApp(tick=0.01)
    calls = {"n": 0}
    original = app.step

    def flaky(dt: float) -> None:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("sensor glitch")
        original(dt)

    app.step = flaky  # type: ignore[method-assign]
    app.start()
    try:
        wait_until(lambda: app.ticks >= 6, what="ticks despite failures")
        assert app.step_errors >= 3
    finally:
        app.stop()


# -- lock --------------------------------------------------------------------------------


def test_lock_operates_locally_with_no_network() -> None:
    app = LockApp(locked=True)
    app.operate_locally("unlock")
    assert app.readings()["lock"] == "unlocked"
    app.operate_locally("lock")
    assert app.readings()["lock"] == "locked"
    assert app.operations == {"local": 2, "remote": 0}


def test_lock_refuses_to_throw_the_bolt_into_an_open_door() -> None:
    app = LockApp(locked=False, door="open")
    with pytest.raises(CommandFailed) as e:
        app.operate_locally("lock")
    assert e.value.reason == "door_open"
    with pytest.raises(CommandFailed):
        app.execute("lock", {})
    assert app.readings() == {"lock": "unlocked", "door": "open", "battery": 100.0}
    app.execute("unlock", {})  # unlocking an open door is fine
    app.set_door("closed")
    app.execute("lock", {})
    assert app.locked


def test_lock_battery_drains_and_an_empty_lock_reports_failure() -> None:
    app = LockApp(battery=0.5, drain_per_hour=0.1)
    app.step(3600.0)
    assert app.battery == pytest.approx(0.4)
    for _ in range(10):
        app.step(3600.0)
        validate_values(app.readings(), LOCK.readings)
    assert app.battery == 0.0
    with pytest.raises(CommandFailed) as e:
        app.operate_locally("unlock")
    assert e.value.reason == "battery_empty"


def test_lock_refuses_bad_commands() -> None:
    app = LockApp()
    with pytest.raises(ValidationError) as e:
        app.execute("open_sesame", {})
    assert e.value.reason == Reason.UNKNOWN_COMMAND
    with pytest.raises(ValidationError) as e:
        app.execute("lock", {"force": True})
    assert e.value.reason == Reason.UNKNOWN_READING
    with pytest.raises(ValueError, match="lock or unlock"):
        app.operate_locally("jiggle")  # type: ignore[arg-type]
