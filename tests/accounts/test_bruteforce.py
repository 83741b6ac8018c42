"""Online guessing of setup codes is throttled: measured with a fake clock (no sleeping),
the attempts per hour match the arithmetic in docs/accounts.md, and the limits live in the
database, so they hold across service processes and restarts."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.accounts.claims import ClaimRefused
from hearth.service.accounts.service import AccountsService
from hearth.service.accounts.throttle import Throttled
from hearth.service.commands import CommandService, InMemoryCommandPublisher
from hearth.setupcode import ENTROPY_BITS, new_setup_code
from tests.disclosure.conftest import FrozenClock

from .conftest import Minted, make_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "accounts.md"
HOURS = 48


def attack(service: AccountsService, clock: FrozenClock, *, hours: int,
           target: str | None = None, account: str | None = None,
           address: str | None = None) -> Counter[int]:
    """Guess as fast as the service allows for ``hours``; every guess comes from a fresh
    account and a fresh address unless pinned. Returns guesses checked per hour."""
    start = clock.t
    checked: Counter[int] = Counter()
    n = 0
    while clock.t < start + dt.timedelta(hours=hours):
        n += 1
        unit = target or secrets.token_hex(16)
        try:
            service.ownership.claim(account or f"attacker-{n}", unit, new_setup_code(),
                                    address=address or f"198.51.{n // 250 % 250}.{n % 250}")
        except Throttled as e:
            clock.advance(seconds=e.retry_after)
            continue
        except ClaimRefused as e:
            assert e.reason == "claim_failed"
            checked[int((clock.t - start).total_seconds() // 3600)] += 1
    return checked


def test_online_brute_force_against_one_unit_is_throttled(
        service: AccountsService, minted: Minted, clock: FrozenClock) -> None:
    checked = attack(service, clock, hours=HOURS, target=minted.thermostats[0])
    first_hour = checked[0]
    later = [checked[h] for h in range(1, HOURS)]
    assert first_hour <= 10
    assert max(later) <= 1, later
    per_hour = sum(later) / len(later)
    assert 0.9 <= per_hour <= 1.0  # the attacker got exactly what the policy allows
    per_year = first_hour + 24 * 365 * per_hour
    expected_years = 2 ** (ENTROPY_BITS - 1) / per_year
    assert expected_years > 1e10
    # and docs/accounts.md states these very numbers
    text = DOCS.read_text()
    assert re.search(rf"at most \*\*{first_hour} guesses in the first hour\*\*,\s+then\s+"
                     rf"\*\*{round(per_hour)} per hour\*\*", text), (
        "docs/accounts.md must state the measured bound")
    assert "6.4 × 10^10 years" in text


def test_one_account_spreading_guesses_over_many_units_is_throttled(
        service: AccountsService, clock: FrozenClock) -> None:
    checked = attack(service, clock, hours=6, account="one-attacker")
    assert checked[0] <= 15 and max(checked[h] for h in range(1, 6)) <= 1


def test_one_address_spreading_guesses_over_accounts_and_units_is_throttled(
        service: AccountsService, clock: FrozenClock) -> None:
    checked = attack(service, clock, hours=6, address="203.0.113.9")
    assert checked[0] <= 25 and max(checked[h] for h in range(1, 6)) <= 1


def test_the_limits_hold_across_processes_and_restarts(
        service: AccountsService, sessions: sessionmaker[Session], minted: Minted,
        clock: FrozenClock) -> None:
    second = AccountsService(make_config(), sessions,
                             commands=CommandService(InMemoryCommandPublisher()), clock=clock)
    dev = minted.thermostats[0]
    refused = 0
    for i in range(12):  # alternate between two "processes" on one database
        svc = (service, second)[i % 2]
        try:
            svc.ownership.claim(f"a{i}", dev, new_setup_code(), address=f"192.0.2.{i}")
        except Throttled:
            refused += 1
        except ClaimRefused:
            pass
    assert refused >= 1
    restarted = AccountsService(make_config(), sessions,
                                commands=CommandService(InMemoryCommandPublisher()), clock=clock)
    with pytest.raises(Throttled) as e:
        restarted.ownership.claim("new", dev, minted.codes[dev], address="192.0.2.200")
    assert e.value.retry_after >= 1
    # the right code is refused too while throttled: a guess cannot be confirmed early


def test_the_owner_can_claim_once_the_wait_is_over(
        service: AccountsService, minted: Minted, clock: FrozenClock) -> None:
    dev = minted.thermostats[1]
    owner = service.sign_up("owner@example.org", "correct horse battery staple",
                            address="192.0.2.1")
    attack(service, clock, hours=3, target=dev)
    waits = []
    for _ in range(3):
        try:
            result = service.ownership.claim(owner, dev, minted.codes[dev], address="192.0.2.1")
            break
        except Throttled as e:
            waits.append(e.retry_after)
            clock.advance(seconds=e.retry_after)
    else:
        pytest.fail("the owner never got through")
    assert result.device_id == dev
    assert all(w <= 3600 for w in waits)  # never locked for good: at most the cap
