"""The device <-> cloud contract: every refusal has the right reason code."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.errors import ValidationError
from hearth.pki import new_device_id
from hearth.protocol import (
    MAX_PAYLOAD_BYTES,
    MODELS,
    Reason,
    command_topic,
    device_topic,
    new_command_id,
    parse_command,
    parse_command_result,
    parse_event,
    parse_telemetry,
    parse_topic,
    parse_uplink,
)

DEV = new_device_id()
NOW = dt.datetime.now(dt.UTC)
THERMOSTAT = MODELS["thermostat"]
LOCK = MODELS["lock"]


def telemetry(**over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "v": 1, "device_id": DEV, "seq": 7, "ts": NOW.isoformat(),
        "readings": {"temperature": 21.5, "humidity": 40, "heater": False, "target": 20.0},
    }
    msg.update(over)
    return msg


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_valid_telemetry_is_accepted() -> None:
    msg = parse_telemetry(raw(telemetry()), topic_device_id=DEV, model=THERMOSTAT)
    assert msg.seq == 7 and msg.readings["temperature"] == 21.5


def test_uplink_parser_checks_as_the_per_kind_parsers_and_gives_the_time_in_utc() -> None:
    """The ingest's entry point: the same message and refusals as parse_telemetry and
    parse_event, the timestamp in UTC (dt.UTC), and no parsing for a topic units do not
    publish on."""
    east = NOW.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    payload = raw(telemetry(ts=east.isoformat()))
    msg, ts = parse_uplink("telemetry", payload, topic_device_id=DEV, model=THERMOSTAT)
    assert msg == parse_telemetry(payload, topic_device_id=DEV, model=THERMOSTAT)
    assert ts == NOW and ts.tzinfo is dt.UTC
    event = raw({"v": 1, "device_id": DEV, "seq": 1, "ts": east.isoformat(), "kind": "boot"})
    msg, ts = parse_uplink("event", event, topic_device_id=DEV, model=THERMOSTAT)
    assert msg == parse_event(event, topic_device_id=DEV) and ts.tzinfo is dt.UTC
    for kind, body, reason in [
        ("telemetry", raw(telemetry(readings={"temperature": 99.0})), Reason.OUT_OF_RANGE),
        ("telemetry", raw(telemetry(device_id=new_device_id())), Reason.DEVICE_MISMATCH),
        ("cmd", payload, Reason.UNKNOWN_TOPIC),
        ("update/check", b"not even json", Reason.UNKNOWN_TOPIC),
    ]:
        with pytest.raises(ValidationError) as e:
            parse_uplink(kind, body, topic_device_id=DEV, model=THERMOSTAT)
        assert e.value.reason == reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", Reason.MALFORMED_JSON),
        (b"\xff\xfe\x00", Reason.MALFORMED_JSON),
        (raw([1, 2]), Reason.INVALID_SCHEMA),
        (raw(telemetry(seq="7")), Reason.INVALID_SCHEMA),
        (raw(telemetry(seq=-1)), Reason.INVALID_SCHEMA),
        (raw(telemetry(seq=2**63)), Reason.INVALID_SCHEMA),
        (raw(telemetry(v=2)), Reason.INVALID_SCHEMA),
        (raw(telemetry(extra="x")), Reason.UNKNOWN_FIELD),
        (raw(telemetry(readings={"temperature": 85.01})), Reason.OUT_OF_RANGE),
        (raw(telemetry(readings={"temperature": -40.5})), Reason.OUT_OF_RANGE),
        (raw(telemetry(readings={"humidity": 101})), Reason.OUT_OF_RANGE),
        (raw(telemetry(readings={"target": 4.9})), Reason.OUT_OF_RANGE),
        (raw(telemetry(readings={"temperature": "hot"})), Reason.WRONG_TYPE),
        (raw(telemetry(readings={"heater": 1.0})), Reason.WRONG_TYPE),
        (raw(telemetry(readings={"lock": "locked"})), Reason.UNKNOWN_READING),
        (raw(telemetry(readings={f"r{i}": 1.0 for i in range(33)})), Reason.TOO_MANY_READINGS),
        (raw(telemetry(device_id=new_device_id())), Reason.DEVICE_MISMATCH),
        (raw(telemetry(ts="2019-12-31T23:59:59+00:00")), Reason.TIMESTAMP_OUT_OF_RANGE),
        (raw(telemetry(ts=(NOW + dt.timedelta(hours=1)).isoformat())),
         Reason.TIMESTAMP_OUT_OF_RANGE),
        (raw(telemetry(ts="2026-01-01T00:00:00")), Reason.INVALID_SCHEMA),  # no UTC offset
        (b" " * (MAX_PAYLOAD_BYTES + 1), Reason.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_telemetry_is_refused_with_its_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(ValidationError) as e:
        parse_telemetry(payload, topic_device_id=DEV, model=THERMOSTAT)
    assert e.value.reason == reason


def test_nan_and_infinity_are_refused() -> None:
    body = raw(telemetry()).replace(b"21.5", b"NaN")
    with pytest.raises(ValidationError):
        parse_telemetry(body, topic_device_id=DEV, model=THERMOSTAT)


def test_lock_enums_are_checked() -> None:
    good = telemetry(readings={"lock": "locked", "door": "closed", "battery": 80})
    parse_telemetry(raw(good), topic_device_id=DEV, model=LOCK)
    bad = telemetry(readings={"lock": "ajar"})
    with pytest.raises(ValidationError) as e:
        parse_telemetry(raw(bad), topic_device_id=DEV, model=LOCK)
    assert e.value.reason == Reason.OUT_OF_RANGE


def test_topics() -> None:
    assert parse_topic(device_topic(DEV, "telemetry")) == (DEV, "telemetry")
    assert parse_topic(command_topic(DEV) + "/result") == (DEV, "cmd/result")
    for bad in ["hearth/v1/d/+/telemetry", f"hearth/v1/d/{DEV}/telemetry/x",
                f"hearth/v2/d/{DEV}/telemetry", "#", "", f"hearth/v1/d/{DEV.upper()}/event",
                f"hearth/v1/d/{DEV}/telemetry\n", f"hearth/v1/d/{DEV}/cmd\n"]:
        with pytest.raises(ValidationError) as e:
            parse_topic(bad)
        assert e.value.reason == Reason.UNKNOWN_TOPIC
    with pytest.raises(ValueError, match="not a valid device topic"):
        device_topic(DEV, "telemetry\n")


def command(**over: Any) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)  # fresh: the module may be imported minutes earlier
    msg: dict[str, Any] = {
        "v": 1, "command_id": new_command_id(), "device_id": DEV, "name": "set_target",
        "params": {"target": 22.0}, "issued_at": now.isoformat(),
        "expires_at": (now + dt.timedelta(minutes=5)).isoformat(),
    }
    msg.update(over)
    return msg


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"device_id": new_device_id()}, Reason.DEVICE_MISMATCH),
        ({"expires_at": "2021-01-01T00:00:00+00:00"}, Reason.EXPIRED),
        ({"name": "self_destruct"}, Reason.UNKNOWN_COMMAND),
        ({"params": {"target": 36}}, Reason.OUT_OF_RANGE),
        ({"params": {"target": 22, "boost": 1}}, Reason.UNKNOWN_READING),
        ({"params": {}}, Reason.INVALID_SCHEMA),
        ({"command_id": "1"}, Reason.INVALID_SCHEMA),
    ],
)
def test_bad_commands_are_refused_by_the_unit(over: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(ValidationError) as e:
        parse_command(raw(command(**over)), device_id=DEV, model=THERMOSTAT)
    assert e.value.reason == reason


def test_good_command_and_result() -> None:
    cmd = parse_command(raw(command()), device_id=DEV, model=THERMOSTAT)
    result = {
        "v": 1, "command_id": cmd.command_id, "device_id": DEV, "seq": 9, "ts": NOW.isoformat(),
        "status": "succeeded", "state": {"target": 22.0},
    }
    assert parse_command_result(raw(result), topic_device_id=DEV, model=THERMOSTAT).seq == 9
    event = {"v": 1, "device_id": DEV, "seq": 10, "ts": NOW.isoformat(), "kind": "boot"}
    assert parse_event(raw(event), topic_device_id=DEV).kind == "boot"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20,
).map(lambda o: json.dumps(o).encode()))
def test_parsers_only_ever_raise_validation_errors(payload: bytes) -> None:
    for parse in (
        lambda: parse_telemetry(payload, topic_device_id=DEV, model=THERMOSTAT),
        lambda: parse_event(payload, topic_device_id=DEV),
        lambda: parse_command(payload, device_id=DEV, model=LOCK),
        lambda: parse_command_result(payload, topic_device_id=DEV, model=LOCK),
    ):
        try:
            parse()
        except ValidationError as e:
            assert e.reason in set(Reason)
