"""Command handling in the agent, without a broker: raw bytes in, queued results out.

Every queued message is parsed with the same functions the cloud's ingest uses, so a result
the cloud would refuse fails these tests too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hearth.device.agent import Agent
from hearth.device.apps import LockApp, ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.errors import DeviceError
from hearth.pki import new_device_id
from hearth.protocol import (
    MAX_PAYLOAD_BYTES,
    CommandResult,
    Event,
    Reason,
    new_command_id,
    parse_command_result,
    parse_event,
    parse_telemetry,
    to_wire,
)
from tests.helpers import free_port

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def make_agent(unit_dir: Path, app: Any = None, **kw: Any) -> Agent:
    identity = UnitIdentity.load(unit_dir)
    return Agent(
        identity,
        app if app is not None else ThermostatApp(target=20.0),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        clock=lambda: NOW,
        **kw,
    )


@pytest.fixture
def agent(unit_dir: Path) -> Iterator[Agent]:
    a = make_agent(unit_dir)
    yield a
    a.stop()


def command(device_id: str, /, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1,
        "command_id": new_command_id(),
        "device_id": device_id,
        "name": "set_target",
        "params": {"target": 23.0},
        "issued_at": (NOW - dt.timedelta(seconds=5)).isoformat(),
        "expires_at": (NOW + dt.timedelta(minutes=5)).isoformat(),
    }
    body.update(over)
    return body


def queued(agent: Agent) -> list[CommandResult | Event]:
    """Everything in the outbox, parsed the way the cloud parses it."""
    out: list[CommandResult | Event] = []
    for m in agent.outbox.peek(1000):
        if m.kind == "cmd/result":
            out.append(
                parse_command_result(
                    m.payload, topic_device_id=agent.device_id, model=agent.identity.model,
                    now=NOW,
                )
            )
        elif m.kind == "event":
            out.append(parse_event(m.payload, topic_device_id=agent.device_id, now=NOW))
    return out


def only_result(agent: Agent) -> CommandResult:
    (result,) = queued(agent)
    assert isinstance(result, CommandResult)
    return result


def test_valid_command_is_executed_and_answered(agent: Agent) -> None:
    cmd = command(agent.device_id)
    returned = agent.handle_command(to_wire(cmd))
    result = only_result(agent)
    assert returned == result
    assert result.command_id == cmd["command_id"]
    assert result.status == "succeeded" and result.reason == ""
    assert result.state["target"] == 23.0
    assert agent.status().commands_executed == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"device_id": "f" * 32}, Reason.DEVICE_MISMATCH),
        ({"expires_at": (NOW - dt.timedelta(seconds=1)).isoformat()}, Reason.EXPIRED),
        ({"name": "self_destruct", "params": {}}, Reason.UNKNOWN_COMMAND),
        ({"params": {"target": 80.0}}, Reason.OUT_OF_RANGE),
        ({"params": {"target": "hot"}}, Reason.WRONG_TYPE),
        ({"params": {}}, Reason.INVALID_SCHEMA),
        ({"params": {"target": 20.0, "fan": True}}, Reason.UNKNOWN_READING),
        ({"shell": "rm -rf /"}, Reason.UNKNOWN_FIELD),
        ({"issued_at": "yesterday"}, Reason.INVALID_SCHEMA),
    ],
)
def test_refused_command_gets_a_rejected_result_with_its_reason(
    agent: Agent, changes: dict[str, Any], reason: Reason
) -> None:
    cmd = command(agent.device_id, **changes)
    agent.handle_command(to_wire(cmd))
    result = only_result(agent)
    assert result.command_id == cmd["command_id"]
    assert result.device_id == agent.device_id
    assert (result.status, result.reason) == ("rejected", reason)
    assert result.detail
    assert agent.app.readings()["target"] == 20.0  # nothing was done
    status = agent.status()
    assert status.commands_rejected == {reason: 1} and status.commands_executed == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", Reason.MALFORMED_JSON),
        (b"\xff\xfe\x00garbage", Reason.MALFORMED_JSON),
        (b"", Reason.MALFORMED_JSON),
        (b"[" * 5_000 + b"]" * 5_000, Reason.MALFORMED_JSON),
        (b"{\"a\":" * 2_000 + b"1" + b"}" * 2_000, Reason.MALFORMED_JSON),
        (b'{"v": 1}', Reason.INVALID_SCHEMA),
        (b'{"command_id": "../../etc", "v": 1}', Reason.INVALID_SCHEMA),
        (b" " * (MAX_PAYLOAD_BYTES + 1), Reason.PAYLOAD_TOO_LARGE),
    ],
)
def test_payload_without_usable_command_id_is_reported_as_an_event(
    agent: Agent, raw: bytes, reason: Reason
) -> None:
    assert agent.handle_command(raw) is None
    (event,) = queued(agent)
    assert isinstance(event, Event)
    assert (event.kind, event.detail) == ("command_rejected", reason)
    assert agent.status().commands_rejected == {reason: 1}


def test_oversize_command_with_an_id_is_refused_without_parsing(agent: Agent) -> None:
    cmd = command(agent.device_id, params={"target": 21.0})
    raw = to_wire(cmd)[:-1] + b"," + b'"pad":"' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    agent.handle_command(raw)
    (event,) = queued(agent)
    assert isinstance(event, Event) and event.detail == Reason.PAYLOAD_TOO_LARGE


def test_duplicate_command_id_is_executed_once(agent: Agent) -> None:
    app = agent.app
    assert isinstance(app, ThermostatApp)
    cmd = command(agent.device_id, params={"target": 25.0})
    agent.handle_command(to_wire(cmd))
    app.set_target_locally(18.0)  # the user turns the knob afterwards
    assert agent.handle_command(to_wire(cmd)) is None  # QoS 1 redelivery
    assert app.target == 18.0  # the redelivered command did not undo the knob
    assert len(queued(agent)) == 1
    status = agent.status()
    assert (status.commands_executed, status.commands_duplicate) == (1, 1)


def test_redelivered_command_that_expired_meanwhile_is_still_a_duplicate(
    unit_dir: Path,
) -> None:
    now = [NOW]
    agent = Agent(
        UnitIdentity.load(unit_dir), ThermostatApp(), mqtt_port=free_port(),
        clock=lambda: now[0],
    )
    try:
        cmd = command(agent.device_id)
        agent.handle_command(to_wire(cmd))
        now[0] = NOW + dt.timedelta(hours=1)
        agent.handle_command(to_wire(cmd))
        assert [r.status for r in queued(agent) if isinstance(r, CommandResult)] == [
            "succeeded"
        ]
    finally:
        agent.stop()


def test_dedupe_survives_a_restart(unit_dir: Path) -> None:
    cmd = to_wire(command(unit_dir.name))
    first = make_agent(unit_dir)
    first.handle_command(cmd)
    first.stop()
    second = make_agent(unit_dir)
    try:
        assert second.handle_command(cmd) is None
        assert second.status().commands_duplicate == 1
        assert second.status().commands_executed == 0
    finally:
        second.stop()


def test_rejected_command_id_does_not_block_the_real_command(agent: Agent) -> None:
    """Only executed ids are remembered: a refused copy cannot pre-empt a valid one."""
    cid = new_command_id()
    agent.handle_command(to_wire(command(agent.device_id, command_id=cid, params={"target": 99})))
    agent.handle_command(to_wire(command(agent.device_id, command_id=cid)))
    assert [(r.status, r.reason) for r in queued(agent) if isinstance(r, CommandResult)] == [
        ("rejected", Reason.OUT_OF_RANGE),
        ("succeeded", ""),
    ]


def test_app_refusal_is_a_failed_result_with_the_apps_reason(lock_dir: Path) -> None:
    app = LockApp(locked=False, door="open")
    agent = make_agent(lock_dir, app)
    try:
        agent.handle_command(to_wire(command(agent.device_id, name="lock", params={})))
        result = only_result(agent)
        assert (result.status, result.reason) == ("failed", "door_open")
        assert result.state == {"lock": "unlocked", "door": "open", "battery": 100.0}
        assert agent.status().commands_failed == 1
    finally:
        agent.stop()


class _BuggyApp(ThermostatApp):
    def execute(self, name: str, params: Mapping[str, object]) -> None:
        raise KeyError("secret internal detail")


def test_app_bug_is_a_failed_result_without_internal_detail(unit_dir: Path) -> None:
    agent = make_agent(unit_dir, _BuggyApp())
    try:
        agent.handle_command(to_wire(command(agent.device_id)))
        result = only_result(agent)
        assert (result.status, result.reason) == ("failed", "internal_error")
        assert "secret" not in result.detail
    finally:
        agent.stop()


def test_results_and_telemetry_carry_increasing_sequence_numbers(agent: Agent) -> None:
    agent.enqueue_telemetry()
    agent.handle_command(to_wire(command(agent.device_id)))
    agent.handle_command(b"nonsense")
    agent.enqueue_telemetry()
    msgs = agent.outbox.peek(100)
    assert [m.seq for m in msgs] == [1, 2, 3, 4]
    assert [m.kind for m in msgs] == ["telemetry", "cmd/result", "event", "telemetry"]
    tele = parse_telemetry(
        msgs[-1].payload, topic_device_id=agent.device_id, model=agent.identity.model, now=NOW
    )
    assert tele.seq == 4 and tele.readings["target"] == 23.0
    assert all(m.topic.endswith(m.kind) for m in msgs)


def test_drop_report_event_after_the_outbox_overflowed(unit_dir: Path) -> None:
    agent = make_agent(unit_dir, max_outbox=3)
    try:
        for _ in range(5):
            agent.enqueue_telemetry()
        assert agent.status().dropped == 2
        agent.report_drops()  # what the link does on (re)connecting
        events = [e for e in queued(agent) if isinstance(e, Event)]
        assert [e.kind for e in events] == ["outbox_dropped"]
        assert events[0].detail.startswith("2 ")
    finally:
        agent.stop()


class _LyingApp(ThermostatApp):
    def readings(self) -> dict[str, bool | float | str]:
        return {**super().readings(), "temperature": 500.0}


def test_out_of_range_readings_are_not_sent(unit_dir: Path) -> None:
    agent = make_agent(unit_dir, _LyingApp())
    try:
        assert agent.enqueue_telemetry() is None
        assert agent.status().telemetry_invalid == 1
        assert len(agent.outbox) == 0
    finally:
        agent.stop()


def test_agent_refuses_an_app_for_another_model(unit_dir: Path) -> None:
    with pytest.raises(DeviceError, match="implements 'lock'"):
        make_agent(unit_dir, LockApp())


def test_wrong_device_in_topic_payload_is_not_executed(agent: Agent) -> None:
    other = new_device_id()
    agent.handle_command(to_wire(command(other, params={"target": 30.0})))
    assert agent.app.readings()["target"] == 20.0
