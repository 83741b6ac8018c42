"""Rollouts in the service: cohorts, halting on failures, offline catch-up, preferences,
support periods, integrity alerts and the consumer's view (database level, no network)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import NotFoundError, ValidationError
from hearth.service import db
from hearth.service.models import EventRow, Unit
from hearth.service.updates import rollouts
from hearth.service.updates.models import RolloutStatus

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def sf(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    yield db.session_factory(engine)
    engine.dispose()


def add_units(sf: sessionmaker[Session], n: int, model: str = "thermostat") -> list[str]:
    ids = [secrets.token_hex(16) for _ in range(n)]
    with sf.begin() as s:
        for i in ids:
            s.add(Unit(device_id=i, model=model, certificate_pem="-", cert_serial="1",
                       mqtt_password_hash={}, status="active", imported_at=NOW,
                       revoked_at=None, last_seen_at=None, latest_seq=None, latest_ts=None,
                       latest_state={}))
            s.flush()
            rollouts.record_check(s, i, version="1.0.0", running="1.0.0", mode="normal",
                                  now=NOW)
    return ids


def release(model: str, version: str, min_from: str = "0.0.0") -> SimpleNamespace:
    return SimpleNamespace(
        target_name=f"{model}/{model}-{version}.tar", length=1000, sha256="0" * 64,
        info=SimpleNamespace(model=model, version=version, min_from_version=min_from))


def publish(sf: sessionmaker[Session], *releases: SimpleNamespace) -> None:
    with sf.begin() as s:
        rollouts.sync_releases(s, releases, now=NOW)


def offer(sf: sessionmaker[Session], device_id: str, now: dt.datetime = NOW
          ) -> rollouts.Assignment:
    with sf.begin() as s:
        unit = s.get(Unit, device_id)
        assert unit is not None
        return rollouts.assignment_for(s, unit, rollouts.unit_state(s, device_id), now=now)


_seq = iter(range(1, 10**9))


def event(sf: sessionmaker[Session], device_id: str, kind: str, detail: str) -> None:
    """What ingest stores when a unit's event arrives; then the monitor runs."""
    with sf.begin() as s:
        s.add(EventRow(device_id=device_id, seq=next(_seq), ts=NOW, received_at=NOW,
                       kind=kind, detail=detail, digest="0" * 64))
    with sf.begin() as s:
        rollouts.process_events(s)


def start(sf: sessionmaker[Session], target: str = "thermostat/thermostat-1.1.0.tar",
          **kw: object) -> str:
    with sf.begin() as s:
        return rollouts.create_rollout(s, target_name=target, created_by="test", now=NOW,
                                       **kw).id  # type: ignore[arg-type]


def status(sf: sessionmaker[Session], rollout_id: str) -> str:
    with sf() as s:
        return rollouts.get_rollout(s, rollout_id).status


def test_cohorts_are_stable_and_proportional() -> None:
    ids = [secrets.token_hex(16) for _ in range(20_000)]
    assert [rollouts.cohort_bucket(i) for i in ids[:50]] == [
        rollouts.cohort_bucket(i) for i in ids[:50]]
    for pct in (1, 10, 50):
        share = sum(rollouts.cohort_bucket(i) < pct * 100 for i in ids) / len(ids)
        assert abs(share - pct / 100) < 0.01 + pct / 1000


def test_a_stage_offers_only_its_cohort_and_widening_keeps_it(
        sf: sessionmaker[Session]) -> None:
    units = add_units(sf, 300)
    publish(sf, release("thermostat", "1.1.0"))
    rid = start(sf, stages=[10, 50, 100])
    first = {u for u in units if offer(sf, u).target}
    expected = {u for u in units if rollouts.cohort_bucket(u) < 1000}
    assert first == expected and 0 < len(first) < 100
    with sf.begin() as s:
        rollouts.advance_rollout(s, rid, by="op", now=NOW)
    second = {u for u in units if offer(sf, u).target}
    assert first <= second and len(second) > len(first)


def test_rollout_halts_when_a_cohort_fails_and_stops_offering(
        sf: sessionmaker[Session]) -> None:
    units = add_units(sf, 40)
    publish(sf, release("thermostat", "1.1.0"))
    rid = start(sf, stages=[100], failure_threshold=0.25, min_sample=8)
    offered = [u for u in units if offer(sf, u).target]
    assert len(offered) == 40
    for u in offered[:4]:  # 4 of 4 failed, but below the minimum sample: no halt yet
        event(sf, u, "update_rolled_back", "1.1.0 health_check")
    assert status(sf, rid) == "active"
    for u in offered[4:8]:
        event(sf, u, "update_installed", "1.1.0")
    # 4 failures of 8 outcomes = 50 % > 25 %: halted by itself
    assert status(sf, rid) == "halted"
    with sf() as s:
        progress = rollouts.rollout_progress(s, rollouts.get_rollout(s, rid))
    assert progress["stages"][0]["rolled_back"] == 4
    assert progress["stages"][0]["installed"] == 4
    assert "halted: 4 of 8" in progress["status_reason"]
    assert len(progress["recent_failures"]) == 4
    assert offer(sf, offered[20]).target is None  # nobody else gets it
    with sf.begin() as s:
        rollouts.set_rollout_status(s, rid, "resume", by="op", now=NOW)
    assert offer(sf, offered[20]).target == "thermostat/thermostat-1.1.0.tar"


def test_rollout_below_the_threshold_keeps_going_and_auto_advances(
        sf: sessionmaker[Session]) -> None:
    units = add_units(sf, 400)
    publish(sf, release("thermostat", "1.1.0"))
    rid = start(sf, stages=[10, 100], failure_threshold=0.2, min_sample=5, auto_advance=True)
    offered = [u for u in units if offer(sf, u).target]
    event(sf, offered[0], "update_failed", "1.1.0 download_failed: reset")
    for u in offered[1:6]:
        event(sf, u, "update_installed", "1.1.0")
    with sf() as s:
        rollout = rollouts.get_rollout(s, rid)
        assert (rollout.status, rollout.stage) == ("active", 1)


def test_a_failed_download_is_retried_a_rolled_back_version_is_not(
        sf: sessionmaker[Session]) -> None:
    a, b = add_units(sf, 2)
    publish(sf, release("thermostat", "1.1.0"))
    start(sf, stages=[100], min_sample=100)
    assert offer(sf, a).target and offer(sf, b).target
    event(sf, a, "update_failed", "1.1.0 download_failed: reset")
    event(sf, b, "update_rolled_back", "1.1.0 health_check")
    assert offer(sf, a).target
    assert offer(sf, b).target is None
    for _ in range(rollouts.MAX_ATTEMPTS):
        event(sf, a, "update_failed", "1.1.0 download_failed: reset")
        offer(sf, a)
    assert offer(sf, a).target is None


def test_an_offline_unit_catches_up_when_it_checks_in(sf: sessionmaker[Session]) -> None:
    online, offline = add_units(sf, 2)
    publish(sf, release("thermostat", "1.1.0"))
    rid = start(sf, stages=[100])
    assert offer(sf, online).target
    event(sf, online, "update_installed", "1.1.0")
    assert status(sf, rid) == "active"  # the offline unit has not updated yet
    later = NOW + dt.timedelta(days=30)
    assert offer(sf, offline, later).target == "thermostat/thermostat-1.1.0.tar"
    event(sf, offline, "update_installed", "1.1.0")
    assert status(sf, rid) == "completed"


def test_maintenance_window_defers_the_install_not_the_news(
        sf: sessionmaker[Session]) -> None:
    (unit,) = add_units(sf, 1)
    publish(sf, release("thermostat", "1.1.0"))
    start(sf, stages=[100])
    with sf.begin() as s:
        rollouts.set_preference(s, unit, automatic=False, window_start="02:00",
                                window_end="04:00", tz="Europe/London")
    noon = offer(sf, unit, dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC))
    assert (noon.target, noon.available) == (None, "1.1.0")
    night = offer(sf, unit, dt.datetime(2026, 6, 1, 2, 30, tzinfo=dt.UTC))  # 03:30 BST
    assert night.target == "thermostat/thermostat-1.1.0.tar"
    with sf.begin() as s:
        rollouts.set_preference(s, unit, automatic=True)
    assert offer(sf, unit).target


@pytest.mark.parametrize(("kw", "reason"), [
    ({"automatic": False}, "invalid_schema"),
    ({"automatic": False, "window_start": "25:00", "window_end": "01:00"}, "invalid_schema"),
    ({"automatic": False, "window_start": "01:00", "window_end": "01:00"}, "out_of_range"),
    ({"automatic": True, "tz": "Mars/Olympus"}, "invalid_schema"),
])
def test_bad_preferences_are_refused(sf: sessionmaker[Session], kw: dict[str, object],
                                     reason: str) -> None:
    (unit,) = add_units(sf, 1)
    with sf.begin() as s, pytest.raises(ValidationError) as e:
        rollouts.set_preference(s, unit, **kw)  # type: ignore[arg-type]
    assert e.value.reason == reason


def test_window_wraps_midnight() -> None:
    at = dt.datetime(2026, 1, 1, 23, 30, tzinfo=dt.UTC)
    assert rollouts.in_window(at, 23 * 60, 60, "UTC")
    assert rollouts.in_window(at + dt.timedelta(minutes=60), 23 * 60, 60, "UTC")
    assert not rollouts.in_window(at + dt.timedelta(hours=2), 23 * 60, 60, "UTC")


def test_one_open_rollout_per_model_and_unknown_releases(sf: sessionmaker[Session]) -> None:
    publish(sf, release("thermostat", "1.1.0"), release("thermostat", "1.2.0"))
    rid = start(sf)
    with pytest.raises(ValidationError, match="still open"):
        start(sf, "thermostat/thermostat-1.2.0.tar")
    with pytest.raises(NotFoundError):
        start(sf, "thermostat/thermostat-9.9.9.tar")
    with sf.begin() as s:
        rollouts.set_rollout_status(s, rid, "cancel", by="op", now=NOW)
    start(sf, "thermostat/thermostat-1.2.0.tar")
    with sf.begin() as s, pytest.raises(ValidationError):
        rollouts.set_rollout_status(s, rid, "resume", by="op", now=NOW)


def test_units_below_min_from_version_are_not_offered(sf: sessionmaker[Session]) -> None:
    (unit,) = add_units(sf, 1)
    publish(sf, release("thermostat", "2.0.0", min_from="1.5.0"))
    start(sf, "thermostat/thermostat-2.0.0.tar", stages=[100])
    assignment = offer(sf, unit)
    assert assignment.target is None and "1.5.0" in assignment.reason


def test_support_period_published_extended_never_shortened(sf: sessionmaker[Session]) -> None:
    with sf.begin() as s:
        rollouts.define_support_period(s, "thermostat", dt.date(2030, 12, 31), now=NOW)
        rollouts.define_support_period(s, "thermostat", dt.date(2031, 12, 31), now=NOW)
    with sf.begin() as s, pytest.raises(ValidationError) as e:
        rollouts.define_support_period(s, "thermostat", dt.date(2030, 1, 1), now=NOW)
    assert e.value.reason == "out_of_range"
    with sf.begin() as s, pytest.raises(ValidationError):
        rollouts.define_support_period(s, "toaster", dt.date(2030, 1, 1), now=NOW)
    with sf() as s:
        period = rollouts.support_period(s, "thermostat")
    assert period is not None and period.end_date == dt.date(2031, 12, 31)


def test_integrity_alerts_collapse_until_acknowledged(sf: sessionmaker[Session]) -> None:
    (unit,) = add_units(sf, 1)
    event(sf, unit, "integrity_alert", "tampered: slot(s) b failed verification (app.py)")
    event(sf, unit, "integrity_alert", "tampered: slot(s) b failed verification (app.py)")
    with sf() as s:
        (alert,) = rollouts.open_alerts(s)
        assert (alert.device_id, alert.count) == (unit, 2)
    with sf.begin() as s:
        assert rollouts.acknowledge_alerts(s, unit, by="op", now=NOW) == 1
    with sf() as s:
        assert rollouts.open_alerts(s) == []


def test_events_are_applied_once(sf: sessionmaker[Session]) -> None:
    (unit,) = add_units(sf, 1)
    event(sf, unit, "integrity_alert", "x")
    for _ in range(3):
        with sf.begin() as s:
            assert rollouts.process_events(s) == 0
    with sf() as s:
        assert rollouts.open_alerts(s)[0].count == 1


def test_consumer_view_tells_available_applied_failed_and_support_end(
        sf: sessionmaker[Session]) -> None:
    (unit,) = add_units(sf, 1)
    publish(sf, release("thermostat", "1.1.0"))
    start(sf, stages=[100], min_sample=100)

    def view(now: dt.datetime = NOW) -> rollouts.UnitUpdateView:
        with sf() as s:
            return rollouts.unit_update_view(s, unit, now=now)

    assert view().available == "1.1.0"
    assert any("not published a support period" in t for _l, t in view().notices)
    with sf.begin() as s:
        rollouts.define_support_period(s, "thermostat", dt.date(2026, 7, 1), now=NOW)
    assert any("ending" in t.lower() or "end on" in t for _l, t in view().notices)
    after = dt.datetime(2026, 7, 2, tzinfo=dt.UTC)
    ended = [t for level, t in view(after).notices if level == "alert"]
    assert ended and "no longer gets security updates" in ended[0]
    assert view(after).support["status"] == "ended"  # type: ignore[index]
    offer(sf, unit)
    event(sf, unit, "update_failed", "1.1.0 hash_mismatch: bundle differs")
    assert any("could not be installed" in t for _l, t in view().notices)
    event(sf, unit, "update_installed", "1.1.0")
    v = view()
    assert (v.version, v.available) == ("1.1.0", None)
    assert any("1.1.0 was installed" in t for _l, t in v.notices)
    event(sf, unit, "integrity_alert", "tampered")
    assert view().alert == "tampered"


def test_release_mirror_adds_new_releases_once(sf: sessionmaker[Session]) -> None:
    with sf.begin() as s:
        assert rollouts.sync_releases(s, [release("lock", "1.0.0")], now=NOW) == 1
        assert rollouts.sync_releases(s, [release("lock", "1.0.0")], now=NOW) == 0
    with sf() as s:
        assert s.scalar(sa.text("select count(*) from update_releases")) == 1
    assert RolloutStatus.HALTED.value == "halted"
