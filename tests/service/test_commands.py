"""Commands: checked against the model before anything is stored or sent."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import BrokerError, NotFoundError, ValidationError
from hearth.protocol import MODELS, Reason
from hearth.service import fleet
from hearth.service.commands import CommandService, InMemoryCommandPublisher
from hearth.service.models import CommandRow
from tests.service.conftest import Fleet


@pytest.fixture
def publisher() -> InMemoryCommandPublisher:
    return InMemoryCommandPublisher()


@pytest.fixture
def service(publisher: InMemoryCommandPublisher) -> CommandService:
    return CommandService(publisher)


def _rows(sf: sessionmaker[Session]) -> list[CommandRow]:
    with sf() as s:
        return list(s.scalars(sa.select(CommandRow)))


def test_command_is_stored_published_and_acceptable_to_the_unit(
    sf: sessionmaker[Session], imported: Fleet, service: CommandService,
    publisher: InMemoryCommandPublisher,
) -> None:
    dev = imported.thermostats[0]
    cid = service.send(sf, dev, "set_target", {"target": 21})
    [published] = publisher.published
    assert published.command_id == cid and published.device_id == dev
    assert published.params == {"target": 21.0}
    assert published.expires_at - published.issued_at == protocol.COMMAND_TTL
    # the unit's own check (hearth.protocol.parse_command) accepts exactly what was sent
    parsed = protocol.parse_command(protocol.encode(published), device_id=dev,
                                    model=MODELS["thermostat"])
    assert parsed == published
    [row] = _rows(sf)
    assert (row.command_id, row.status, row.params) == (cid, "sent", {"target": 21.0})
    assert row.issued_at == published.issued_at


def test_lock_commands_take_no_parameters(sf: sessionmaker[Session], imported: Fleet,
                                          service: CommandService) -> None:
    service.send(sf, imported.locks[0], "unlock", {})
    with pytest.raises(ValidationError) as info:
        service.send(sf, imported.locks[0], "lock", {"force": True})
    assert info.value.reason == Reason.UNKNOWN_READING


@pytest.mark.parametrize(
    ("name", "params", "reason"),
    [
        ("reboot", {}, Reason.UNKNOWN_COMMAND),
        ("lock", {}, Reason.UNKNOWN_COMMAND),  # a lock command sent to a thermostat
        ("set_target", {"target": 99.0}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": 4.9}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": float("nan")}, Reason.OUT_OF_RANGE),
        ("set_target", {"target": "warm"}, Reason.WRONG_TYPE),
        ("set_target", {"target": True}, Reason.WRONG_TYPE),
        ("set_target", {"target": [20]}, Reason.WRONG_TYPE),
        ("set_target", {"target": 20.0, "speed": 1.0}, Reason.UNKNOWN_READING),
        ("set_target", {}, Reason.INVALID_SCHEMA),
        ("set_target", {f"p{i}": 1.0 for i in range(40)}, Reason.TOO_MANY_READINGS),
    ],
)
def test_invalid_command_is_refused_before_anything_is_stored_or_sent(
    sf: sessionmaker[Session], imported: Fleet, service: CommandService,
    publisher: InMemoryCommandPublisher, name: str, params: dict[str, Any], reason: str,
) -> None:
    with pytest.raises(ValidationError) as info:
        service.send(sf, imported.thermostats[0], name, params)
    assert info.value.reason == reason
    assert publisher.published == []
    assert _rows(sf) == []


@pytest.mark.parametrize("ttl", [dt.timedelta(0), dt.timedelta(seconds=-5), dt.timedelta(days=2)])
def test_ttl_is_bounded(sf: sessionmaker[Session], imported: Fleet, service: CommandService,
                        ttl: dt.timedelta) -> None:
    with pytest.raises(ValidationError) as info:
        service.send(sf, imported.thermostats[0], "set_target", {"target": 20.0}, ttl)
    assert info.value.reason == Reason.OUT_OF_RANGE


def test_unknown_unit(sf: sessionmaker[Session], imported: Fleet,
                      service: CommandService) -> None:
    with pytest.raises(NotFoundError):
        service.send(sf, "0" * 32, "set_target", {"target": 20.0})


def test_revoked_unit_gets_no_commands(sf: sessionmaker[Session], imported: Fleet,
                                       service: CommandService,
                                       publisher: InMemoryCommandPublisher) -> None:
    dev = imported.thermostats[0]
    with sf.begin() as s:
        fleet.mark_revoked(s, dev)
    with pytest.raises(ValidationError) as info:
        service.send(sf, dev, "set_target", {"target": 20.0})
    assert info.value.reason == Reason.REVOKED
    assert publisher.published == []


def test_publish_failure_is_reported_and_recorded(
    sf: sessionmaker[Session], imported: Fleet, service: CommandService,
    publisher: InMemoryCommandPublisher,
) -> None:
    publisher.fail = True
    with pytest.raises(BrokerError):
        service.send(sf, imported.thermostats[0], "set_target", {"target": 20.0})
    [row] = _rows(sf)
    assert row.status == "failed" and row.result is not None
    assert (row.result["source"], row.result["reason"]) == ("service", "not_published")


def test_open_commands_expire(sf: sessionmaker[Session], imported: Fleet,
                              service: CommandService) -> None:
    dev = imported.thermostats[0]
    cid = service.send(sf, dev, "set_target", {"target": 20.0}, dt.timedelta(seconds=30))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    with sf() as s:
        row = CommandService.get(s, cid)
        assert CommandService.as_json(row)["status"] == "sent"
        shown = CommandService.as_json(row, now=later)
        assert shown["status"] == "expired" and shown["completed_at"] == row.expires_at
    with sf.begin() as s:
        assert CommandService.expire_due(s) == 0
        assert CommandService.expire_due(s, now=later) == 1
        assert CommandService.expire_due(s, now=later) == 0
    with sf() as s:
        assert CommandService.get(s, cid).status == "expired"


@pytest.mark.parametrize("command_id", ["0" * 32, "short", ""])
def test_get_unknown_command(sf: sessionmaker[Session], command_id: str) -> None:
    with sf() as s, pytest.raises(NotFoundError):
        CommandService.get(s, command_id)
