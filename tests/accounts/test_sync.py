"""Keeping units in step with their owner bindings, without a broker: what is sent, when it
is sent again, erasures before bindings, and resets the unit reports."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import NotFoundError
from hearth.service.accounts.models import ResetState, UnitOwner, UnitReset
from hearth.service.accounts.service import AccountsService
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.models import CommandRow, EventRow, Unit
from tests.disclosure.conftest import FrozenClock

from .conftest import PASSWORD, Minted


def names(publisher: InMemoryCommandPublisher, dev: str) -> list[str]:
    return [c.name for c in publisher.published if c.device_id == dev]


def finish(sessions: sessionmaker[Session], command_id: str, status: str) -> None:
    with sessions.begin() as s:
        s.execute(sa.update(CommandRow).where(CommandRow.command_id == command_id)
                  .values(status=status, result={"source": "unit", "status": status}))


def seen(sessions: sessionmaker[Session], dev: str, at: dt.datetime) -> None:
    with sessions.begin() as s:
        s.execute(sa.update(Unit).where(Unit.device_id == dev).values(last_seen_at=at))


def last(publisher: InMemoryCommandPublisher, dev: str) -> str:
    return [c for c in publisher.published if c.device_id == dev][-1].command_id


@pytest.fixture
def alice(service: AccountsService) -> str:
    return service.sign_up("alice@example.org", PASSWORD, address="10.0.0.1")


def test_bind_is_resent_only_when_the_unit_is_back_and_stops_once_confirmed(
        service: AccountsService, minted: Minted, alice: str, clock: FrozenClock,
        publisher: InMemoryCommandPublisher, sessions: sessionmaker[Session]) -> None:
    dev = minted.thermostats[0]
    service.ownership.claim(alice, dev, minted.codes[dev], address=None)
    assert names(publisher, dev) == ["bind_owner"]
    clock.advance(hours=2)  # the command expired; the unit has not been heard from
    service.reconcile()
    assert names(publisher, dev) == ["bind_owner"]
    seen(sessions, dev, clock.t)  # it is back
    clock.advance(minutes=2)
    service.reconcile()
    assert names(publisher, dev) == ["bind_owner", "bind_owner"]
    finish(sessions, last(publisher, dev), "succeeded")
    service.reconcile()
    with sessions() as s:
        owner = s.get(UnitOwner, dev)
        assert owner is not None and owner.bound_at == clock.t
    clock.advance(hours=5)
    seen(sessions, dev, clock.t)
    service.reconcile()
    assert names(publisher, dev) == ["bind_owner", "bind_owner"]


def test_old_firmware_that_refuses_the_command_is_not_spammed(
        service: AccountsService, minted: Minted, alice: str, clock: FrozenClock,
        publisher: InMemoryCommandPublisher, sessions: sessionmaker[Session]) -> None:
    dev = minted.thermostats[0]
    service.ownership.claim(alice, dev, minted.codes[dev], address=None)
    service.ownership.release(alice, dev, reset=True)
    finish(sessions, last(publisher, dev), "rejected")
    for _ in range(3):
        clock.advance(hours=1)
        seen(sessions, dev, clock.t)
        service.reconcile()
    assert names(publisher, dev) == ["bind_owner", "factory_reset"]
    with sessions() as s:
        assert s.scalar(sa.select(UnitReset.state)) == ResetState.REFUSED.value


def test_a_reset_is_delivered_before_the_next_owners_binding(
        service: AccountsService, minted: Minted, alice: str, clock: FrozenClock,
        publisher: InMemoryCommandPublisher, sessions: sessionmaker[Session]) -> None:
    dev = minted.thermostats[0]
    service.ownership.claim(alice, dev, minted.codes[dev], address=None)
    finish(sessions, last(publisher, dev), "succeeded")
    service.ownership.release(alice, dev, reset=True)
    assert names(publisher, dev)[-1] == "factory_reset"
    bob = service.sign_up("bob@example.org", PASSWORD, address="10.0.0.2")
    service.ownership.claim(bob, dev, minted.codes[dev], address=None)
    assert names(publisher, dev) == ["bind_owner", "factory_reset"]  # bob's bind waits
    finish(sessions, last(publisher, dev), "succeeded")
    service.reconcile()
    assert names(publisher, dev) == ["bind_owner", "factory_reset", "bind_owner"]


def test_a_reset_the_unit_reports_ends_that_binding_at_once(
        service: AccountsService, minted: Minted, alice: str, clock: FrozenClock,
        publisher: InMemoryCommandPublisher, sessions: sessionmaker[Session]) -> None:
    dev, other = minted.thermostats[0], minted.thermostats[1]
    service.ownership.claim(alice, dev, minted.codes[dev], address=None)
    service.ownership.claim(alice, other, minted.codes[other], address=None)
    with sessions() as s:
        owner = s.get(UnitOwner, dev)
        assert owner is not None
        ref = owner.owner_ref

    def report(device: str, detail: str, seq: int) -> None:
        with sessions.begin() as s:
            s.add(EventRow(device_id=device, seq=seq, ts=clock.t, received_at=clock.t,
                           kind="factory_reset", detail=detail, digest="0" * 64))

    report(dev, "someone-elses-ref-000", 1)  # not this binding: nothing ends
    with sessions() as s:
        service.ownership.owned(s, alice, dev)
    report(dev, ref, 2)
    with sessions() as s:  # immediately, before any reconcile
        with pytest.raises(NotFoundError):
            service.ownership.owned(s, alice, dev)
        service.ownership.owned(s, alice, other)  # the other unit is untouched
        assert [u.device_id for u, _ in service.ownership.units_of(s, alice)] == [other]
    service.reconcile()
    with sessions() as s:
        assert s.get(UnitOwner, dev) is None and s.get(UnitOwner, other) is not None
