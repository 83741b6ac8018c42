"""Sign-in throttling: exponential backoff per account+address, per account and per
address; it never locks anyone out for good, and a browser that signed in before keeps
its own path in (an attacker elsewhere cannot lock the owner out)."""

from __future__ import annotations

from typing import Any

import pytest

from hearth.service.accounts.service import AccountsService, SignInFailed
from hearth.service.accounts.throttle import Throttled
from tests.disclosure.conftest import FrozenClock

from .conftest import PASSWORD, new_client, sign_in, sign_up

EMAIL = "alice@example.org"


def guess(service: AccountsService, address: str, **kw: Any) -> str:
    try:
        service.sign_in(EMAIL, "wrong password guess", address=address, **kw)
    except Throttled:
        return "throttled"
    except SignInFailed:
        return "wrong"
    return "in"


def test_guessing_from_one_address_backs_off_exponentially(
        service: AccountsService, clock: FrozenClock) -> None:
    service.sign_up(EMAIL, PASSWORD, address="10.0.0.1")
    outcomes = [guess(service, "203.0.113.5") for _ in range(7)]
    assert outcomes[:5] == ["wrong"] * 5 and outcomes[5:] == ["throttled"] * 2
    waits = []
    for _ in range(6):
        with pytest.raises(Throttled) as e:
            service.sign_in(EMAIL, "x", address="203.0.113.5")
        waits.append(e.value.retry_after)
        clock.advance(seconds=e.value.retry_after)
        assert guess(service, "203.0.113.5") == "wrong"
    assert waits == sorted(waits) and waits[-1] >= 16 * waits[0] // 2  # doubling
    assert max(waits) <= 900  # the cap: never a lock-out for good


def test_unknown_accounts_are_throttled_the_same_way(service: AccountsService) -> None:
    outcomes = []
    for _ in range(7):
        try:
            service.sign_in("nobody@example.org", "whatever it is", address="203.0.113.5")
            outcomes.append("in")
        except Throttled:
            outcomes.append("throttled")
        except SignInFailed as e:
            assert e.detail == "the e-mail address or password is not right"
            outcomes.append("wrong")
    assert outcomes[:5] == ["wrong"] * 5 and outcomes[5:] == ["throttled"] * 2


def test_the_owner_at_home_is_not_locked_out_by_an_attacker_elsewhere(
        service: AccountsService) -> None:
    service.sign_up(EMAIL, PASSWORD, address="10.0.0.1")
    for _ in range(7):
        guess(service, "203.0.113.5")
    result = service.sign_in(EMAIL, PASSWORD, address="10.0.0.1")
    assert result.session_id


def test_a_known_browser_gets_in_even_during_a_distributed_attack(
        app: Any, service: AccountsService, clock: FrozenClock) -> None:
    owner = new_client(app, "10.0.0.1")
    assert sign_up(owner, EMAIL).status_code == 303
    assert owner.cookies.get("__Host-hearth-device")
    # many addresses, each under its own limit, exhaust the per-account allowance
    for n in range(30):
        guess(service, f"198.51.100.{n}")
    assert guess(service, "198.51.100.200") == "throttled"
    # a new browser of the owner is throttled like everyone, for a bounded time only...
    stranger = new_client(app, "10.0.0.2")
    assert sign_in(stranger, EMAIL).status_code == 429
    # ...but the browser that signed in before has its own path in
    r = sign_in(owner, EMAIL)
    assert r.status_code == 303 and r.headers["location"] == "/units"
    # and once the wait is over, everyone with the password gets in again
    clock.advance(seconds=300)
    assert sign_in(stranger, EMAIL).status_code == 303


def test_throttled_sign_in_page_says_when_to_try_again(app: Any) -> None:
    c = new_client(app, "203.0.113.77")
    sign_up(new_client(app, "10.0.0.1"), EMAIL)
    codes = [sign_in(c, EMAIL, "not the password at all").status_code for _ in range(7)]
    assert codes[:5] == [401] * 5 and codes[5] == 429
    r = sign_in(c, EMAIL, "not the password at all")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "try again in" in r.text
