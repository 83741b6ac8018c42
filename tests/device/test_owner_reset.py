"""The unit learns its owner over its link and forgets it at a factory reset: binding,
local user data and queued personal data erased, identity kept, and afterwards only the
unit's own setup code works - never a shared default."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hearth import protocol
from hearth.cli import main
from hearth.device.agent import Agent
from hearth.device.apps import ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.device.owner import OWNER_FILE, USER_DATA_DIR, OwnerStore, check_setup_code
from hearth.factory import mint
from hearth.pki import MakerPKI
from hearth.protocol import Event, new_command_id, parse_event, to_wire
from tests.helpers import free_port

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
IDENTITY_FILES = ("device.key", "device.pem", "ca.pem", "mqtt.secret", "setup.hash",
                  "unit.json")


@pytest.fixture(scope="module")
def minted_pair(tmp_path_factory: pytest.TempPathFactory,
                session_pki: MakerPKI) -> tuple[list[Path], dict[str, str]]:
    out = tmp_path_factory.mktemp("owned")
    units = mint(session_pki, model="thermostat", count=2, out=out, labels=False)
    with (out / "labels" / "print-manifest.csv").open() as f:
        codes = {r["device_id"]: r["setup_code"] for r in csv.DictReader(f)}
    return [u.directory for u in units], codes


@pytest.fixture
def unit(minted_pair: tuple[list[Path], dict[str, str]], tmp_path: Path) -> tuple[Path, str]:
    import shutil

    src = minted_pair[0][0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst, minted_pair[1][src.name]


@pytest.fixture
def agent(unit: tuple[Path, str]) -> Iterator[Agent]:
    a = Agent(UnitIdentity.load(unit[0]), ThermostatApp(target=20.0), mqtt_host="127.0.0.1",
              mqtt_port=free_port(), clock=lambda: NOW)
    yield a
    a.stop()


def system(agent: Agent, name: str, **params: Any) -> Any:
    body = {"v": 1, "command_id": new_command_id(), "device_id": agent.device_id,
            "name": name, "params": params,
            "issued_at": (NOW - dt.timedelta(seconds=1)).isoformat(),
            "expires_at": (NOW + dt.timedelta(minutes=5)).isoformat()}
    return agent.handle_command(to_wire(body))


def fingerprints(directory: Path) -> dict[str, str]:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in IDENTITY_FILES}


def test_bind_owner_stores_only_the_verifier(agent: Agent) -> None:
    credential = secrets.token_urlsafe(32)
    owner = secrets.token_urlsafe(16)
    result = system(agent, "bind_owner", owner=owner,
                    verifier=protocol.owner_verifier(credential))
    assert result.status == "succeeded"
    stored = (agent.identity.directory / OWNER_FILE).read_text()
    assert credential not in stored and owner in stored
    assert (agent.identity.directory / OWNER_FILE).stat().st_mode & 0o077 == 0
    assert agent.owner.check_owner_credential(credential)
    assert not agent.owner.check_owner_credential(credential[:-1] + "x")


def test_system_command_params_are_validated(agent: Agent) -> None:
    result = system(agent, "bind_owner", owner="short!", verifier="x" * 20)
    assert result.status == "rejected" and result.reason == "wrong_type"
    assert not agent.owner.claimed


def test_factory_reset_erases_owner_user_data_and_queue_and_keeps_identity(
        agent: Agent, unit: tuple[Path, str]) -> None:
    directory, code = unit
    before = fingerprints(directory)
    credential = secrets.token_urlsafe(32)
    owner = secrets.token_urlsafe(16)
    system(agent, "bind_owner", owner=owner, verifier=protocol.owner_verifier(credential))
    system(agent, "set_target", target=27.5)
    (directory / USER_DATA_DIR).mkdir(parents=True, exist_ok=True)
    (directory / USER_DATA_DIR / "schedule.json").write_text('{"owner": "Alice"}')
    for _ in range(5):
        agent.enqueue_telemetry()
    seq_before = agent.outbox.next_seq
    assert len(agent.outbox) >= 7
    assert not OwnerStore(directory).check_setup_code(code)  # claimed: code is closed

    result = system(agent, "factory_reset")
    assert result.status == "succeeded"
    assert not agent.owner.claimed and not (directory / OWNER_FILE).exists()
    assert not (directory / USER_DATA_DIR / "schedule.json").exists()
    assert agent.app.readings()["target"] == 20.0  # the factory setting again
    queued = agent.outbox.peek(100)
    assert [m.kind for m in queued] == ["event", "cmd/result"]  # nothing personal left
    event = parse_event(queued[0].payload, topic_device_id=agent.device_id, now=NOW)
    assert event.kind == "factory_reset" and event.detail == owner
    assert queued[0].seq >= seq_before  # sequence numbers are never reused
    assert fingerprints(directory) == before  # the unit's identity is kept
    assert UnitIdentity.load(directory).device_id == agent.device_id
    # afterwards: only its own setup code works, never the old credential or a default
    assert not agent.owner.check_owner_credential(credential)
    assert OwnerStore(directory).check_setup_code(code)
    for universal in ("", "admin", "password", "00000-00000-0", "12345678", "hearth",
                      credential):
        assert not OwnerStore(directory).check_setup_code(universal)


def test_unbind_forgets_only_the_named_owner(agent: Agent) -> None:
    owner = secrets.token_urlsafe(16)
    system(agent, "bind_owner", owner=owner, verifier=secrets.token_urlsafe(24))
    system(agent, "unbind_owner", owner=secrets.token_urlsafe(16))
    assert agent.owner.claimed
    system(agent, "unbind_owner", owner=owner)
    assert not agent.owner.claimed


def test_an_unreadable_binding_fails_closed(unit: tuple[Path, str]) -> None:
    directory, code = unit
    (directory / OWNER_FILE).parent.mkdir(parents=True, exist_ok=True)
    (directory / OWNER_FILE).write_text("{not json")
    store = OwnerStore(directory)
    assert store.claimed and not store.check_setup_code(code)
    assert check_setup_code(directory, code)  # the code itself is still the unit's


def test_hearth_device_reset_cli(unit: tuple[Path, str]) -> None:
    directory, code = unit
    agent = Agent(UnitIdentity.load(directory), ThermostatApp(), mqtt_host="127.0.0.1",
                  mqtt_port=free_port(), clock=lambda: NOW)
    owner = secrets.token_urlsafe(16)
    system(agent, "bind_owner", owner=owner, verifier=secrets.token_urlsafe(24))
    agent.enqueue_telemetry()
    agent.start()
    try:
        assert main(["device", "reset", "--dir", str(directory)]) == 1  # running: refused
        assert OwnerStore(directory).claimed
    finally:
        agent.stop()
    before = fingerprints(directory)
    assert main(["device", "reset", "--dir", str(directory)]) == 0
    assert not OwnerStore(directory).claimed and OwnerStore(directory).check_setup_code(code)
    assert fingerprints(directory) == before
    from hearth.device.outbox import Outbox

    with Outbox.for_unit(directory) as box:
        msgs = box.peek(100)
    assert [m.kind for m in msgs] == ["event"]
    event = Event.model_validate_json(msgs[0].payload)
    assert event.kind == "factory_reset" and event.detail == owner


def test_old_firmware_refuses_system_commands_cleanly() -> None:
    """Backwards compatible: the protocol change adds commands; a model's own commands and
    the wire format are unchanged, and unknown names are still refused with a reason."""
    from hearth.errors import ValidationError

    spec = protocol.MODELS["thermostat"]
    assert "bind_owner" not in spec.commands
    assert protocol.command_spec(spec, "bind_owner") is not None
    with pytest.raises(ValidationError) as e:
        protocol.validate_values({"owner": "x" * 33}, {"owner": protocol.ReadingSpec("token")})
    assert e.value.reason == "wrong_type"
