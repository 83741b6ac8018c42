"""The agent with no broker at all: the device keeps working, nothing accepted is lost,
and the link retries with capped, jittered backoff (guideline 9)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from hearth.device.agent import Agent, run_device
from hearth.device.apps import ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.device.outbox import Outbox
from hearth.errors import DeviceError
from hearth.protocol import new_command_id, to_wire
from tests.helpers import free_port, wait_until


def test_device_keeps_working_and_queueing_while_the_broker_is_unreachable(
    unit_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    identity = UnitIdentity.load(unit_dir)
    app = ThermostatApp(tick=0.01, time_scale=600.0, outside=5.0, temperature=10.0, target=22.0)
    agent = Agent(
        identity, app, telemetry_interval=0.05, mqtt_host="127.0.0.1", mqtt_port=free_port(),
        backoff_base=0.01, backoff_cap=0.05,
    )
    agent.start()
    try:
        wait_until(lambda: len(agent.connect_attempts) >= 5, what="reconnect attempts")
        wait_until(lambda: agent.status().telemetry_enqueued >= 5, what="telemetry")
        wait_until(lambda: app.temperature > 12.0, what="the room warming up")
        assert not agent.connected
        # the control loop never waited for the network
        assert app.max_gap < 2.0 and app.step_errors == 0
        # a local action and a command handed over by any path still work
        app.set_target_locally(24.0)
        assert app.target == 24.0
        attempts = agent.connect_attempts
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(set(gaps)) > 1  # jittered, not a fixed period
        queued_before_stop = agent.status().queued
        assert queued_before_stop >= 5
    finally:
        agent.stop()
    # nothing accepted was lost: the queue is on disk for the next run
    with Outbox.for_unit(unit_dir) as box:
        assert len(box) >= queued_before_stop
    password = identity.mqtt_password
    assert all(password not in r.getMessage() for r in caplog.records)
    assert password not in caplog.text


def test_stop_is_idempotent_and_a_stopped_agent_cannot_restart(unit_dir: Path) -> None:
    agent = Agent(UnitIdentity.load(unit_dir), ThermostatApp(tick=0.01), mqtt_port=free_port())
    agent.start()
    agent.stop()
    agent.stop()
    with pytest.raises(DeviceError, match="stopped"):
        agent.start()


def test_only_one_agent_runs_a_unit_at_a_time(unit_dir: Path) -> None:
    first = Agent(UnitIdentity.load(unit_dir), ThermostatApp(tick=0.01), mqtt_port=free_port())
    second = Agent(UnitIdentity.load(unit_dir), ThermostatApp(tick=0.01), mqtt_port=free_port())
    first.start()
    try:
        with pytest.raises(DeviceError, match="already running"):
            second.start()
        assert not second.app.running  # type: ignore[attr-defined]
    finally:
        first.stop()
        second.stop()
    third = Agent(UnitIdentity.load(unit_dir), ThermostatApp(tick=0.01), mqtt_port=free_port())
    third.start()  # the lock went with the first agent
    third.stop()


def test_run_forever_returns_after_request_stop(unit_dir: Path) -> None:
    agent = Agent(UnitIdentity.load(unit_dir), ThermostatApp(tick=0.01), mqtt_port=free_port(),
                  telemetry_interval=0.05)
    done = threading.Event()

    def run() -> None:
        agent.run_forever()
        done.set()

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: agent.status().telemetry_enqueued >= 1, what="agent running")
    agent.request_stop()
    t.join(timeout=15)
    assert done.is_set()
    assert not agent.app.running  # type: ignore[attr-defined]


def test_run_device_stops_cleanly_on_sigterm(unit_dir: Path) -> None:
    """The CLI entry point: runs until SIGTERM, then stops everything and returns 0."""
    started: list[Agent] = []

    def ready(agent: Agent) -> None:
        started.append(agent)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by run_device, not the test runner

    previous = signal.getsignal(signal.SIGTERM)
    rc = run_device(
        unit_dir, telemetry_interval=0.05, mqtt_host="127.0.0.1", mqtt_port=free_port(),
        app_options={"tick": 0.01}, ready=ready,
    )
    assert rc == 0
    assert started and not started[0].link.connected
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_run_device_refuses_a_broken_unit(unit_dir: Path) -> None:
    (unit_dir / "unit.json").write_text("{}")
    with pytest.raises(DeviceError, match="format"):
        run_device(unit_dir, telemetry_interval=1.0)


def test_command_result_is_queued_while_offline(unit_dir: Path) -> None:
    agent = Agent(UnitIdentity.load(unit_dir), ThermostatApp(), mqtt_port=free_port())
    try:
        cid = new_command_id()
        agent.handle_command(to_wire({
            "v": 1, "command_id": cid, "device_id": agent.device_id, "name": "set_target",
            "params": {"target": 19.5}, "issued_at": "2030-01-01T00:00:00+00:00",
            "expires_at": "2099-01-01T00:00:00+00:00",
        }))
        (msg,) = agent.outbox.peek(10)
        assert msg.kind == "cmd/result" and cid.encode() in msg.payload
    finally:
        agent.stop()
