"""Reconnect backoff: exponential bound, full jitter, cap, reset."""

from __future__ import annotations

import random

import pytest

from hearth.device.link import Backoff


@pytest.mark.parametrize("attempt", [0, 1, 3, 6, 10])
def test_full_jitter_spreads_over_the_whole_window(attempt: int) -> None:
    b = Backoff(base=0.5, cap=60.0, rng=random.Random(attempt))
    bound = min(60.0, 0.5 * 2**attempt)
    draws = []
    for _ in range(500):
        b.attempt = attempt
        draws.append(b.next_delay())
    assert all(0.0 <= d <= bound for d in draws)
    assert len(set(draws)) > 490  # not one delay shared by the fleet
    # full jitter: the draws cover [0, bound], not only its upper half ("equal jitter")
    assert min(draws) < 0.1 * bound
    assert max(draws) > 0.9 * bound
    assert 0.4 * bound < sum(draws) / len(draws) < 0.6 * bound


def test_bound_doubles_then_is_capped() -> None:
    b = Backoff(base=1.0, cap=30.0, rng=random.Random(1))
    assert [b.bound(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.bound(10_000) == 30.0  # no overflow however long the outage
    bounds = []
    for _ in range(50):
        bounds.append(b.bound())
        assert b.next_delay() <= 30.0
    assert bounds[:5] == [1, 2, 4, 8, 16] and set(bounds[5:]) == {30.0}


def test_reset_starts_over_at_base() -> None:
    b = Backoff(base=2.0, cap=100.0, rng=random.Random(2))
    for _ in range(5):
        b.next_delay()
    assert b.attempt == 5 and b.bound() == 64.0
    b.reset()
    assert b.attempt == 0 and b.bound() == 2.0
    assert b.next_delay() <= 2.0


def test_two_units_do_not_follow_the_same_schedule() -> None:
    """The default source is the OS CSPRNG, so no two units share a jitter sequence."""
    a, b = Backoff(base=1.0, cap=60.0), Backoff(base=1.0, cap=60.0)
    assert isinstance(a._rng, random.SystemRandom)
    assert [a.next_delay() for _ in range(8)] != [b.next_delay() for _ in range(8)]


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_refuses_nonsense_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base=base, cap=cap)
