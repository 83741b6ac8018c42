"""Support periods and rollouts in a real browser: the public product page (supported, then
ended), the machine-readable document it links to, the operator's rollout page behind its
sign-in, and the consumer's view of a unit (the partial the account pages include)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session, sessionmaker

from hearth.service import auth, db
from hearth.service.disclosure.config import DisclosureConfig
from hearth.service.disclosure.routes import create_router
from hearth.service.disclosure.service import DisclosureService
from hearth.service.models import EventRow, Unit
from hearth.service.updates import rollouts
from hearth.service.updates.service import UpdateService
from hearth.service.updates.web import (
    create_web_router,
    support_period_provider,
    unit_updates_html,
)
from hearth.service.web import create_web_app, declare
from tests.browser.conftest import serve
from tests.disclosure.conftest import FrozenClock
from tests.helpers import free_port

START = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


@dataclass
class Site:
    base: str
    clock: FrozenClock
    sf: sessionmaker[Session]
    token: str
    device_id: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    sf = db.session_factory(engine)
    device_id = secrets.token_hex(16)
    with sf.begin() as s:
        token = auth.create_token(s, "release-manager")
        s.add(Unit(device_id=device_id, model="thermostat", certificate_pem="-",
                   cert_serial="1", mqtt_password_hash={}, status="active", imported_at=START,
                   revoked_at=None, last_seen_at=None, latest_seq=None, latest_ts=None,
                   latest_state={}))
    clock = FrozenClock(START)
    updates = UpdateService(tmp_path / "data", sf, clock=clock)
    config = DisclosureConfig.load({
        "organisation": "Example Devices Ltd", "base_url": base,
        "contacts": ["mailto:security@hearth.example"], "unsafe_allow_http": True,
        "secret_key": b"u" * 32})
    disclosure = DisclosureService(config, sf, clock=clock,
                                   support_period=support_period_provider(updates))

    # Stand-in for the account pages (built by the accounts work): they include the same
    # partial, unit_updates_html(unit_update_view(...)), in the owner's unit page.
    owner = APIRouter()

    @owner.get("/test-owner/units/{device}", dependencies=[declare("owner")])
    def owner_view(device: str) -> HTMLResponse:
        with sf() as s:
            view = rollouts.unit_update_view(s, device, now=clock())
        return HTMLResponse(f"<!doctype html><title>unit</title><main>"
                            f"{unit_updates_html(view)}</main>")

    app = create_web_app(create_router(disclosure),
                         create_web_router(updates, secret_key=b"u" * 32, base_url=base,
                                           secure_cookies=False),
                         owner, hsts=False)
    from hearth.service.api import create_app
    from hearth.service.commands import InMemoryCommandPublisher
    from hearth.service.config import Settings
    from hearth.service.updates.api import create_api_router
    from hearth.service.web import compose

    api = create_app(Settings(data_dir=tmp_path / "data"), session_factory=sf,
                     command_publisher=InMemoryCommandPublisher(), revoker=None,
                     routers=[create_api_router(updates)])
    with serve(compose(api, app), port, probe="/products"):
        yield Site(base, clock, sf, token, device_id)
    engine.dispose()


def test_support_period_on_the_public_page_in_json_and_when_it_ends(site: Site,
                                                                    page: Any) -> None:
    page.goto(site.base + "/products/thermostat")
    assert "has not yet published a support period" in page.inner_text("#support-period")
    r = httpx.put(site.base + "/api/v1/support-periods/thermostat",
                  json={"end_date": "2027-12-31"},
                  headers={"Authorization": f"Bearer {site.token}"})
    assert r.status_code == 200, r.text
    page.goto(site.base + "/products/thermostat")
    section = page.locator("#support-period")
    assert "Security updates are provided until at least 2027-12-31" in section.inner_text()
    assert section.locator("[data-support-status]").get_attribute(
        "data-support-status") == "supported"
    # the machine-readable document it links to, without any token
    page.click("#support-period a[href='/api/v1/support-periods']")
    page.wait_for_url("**/api/v1/support-periods")
    doc = json.loads(page.inner_text("body"))
    assert doc["models"] == [{**doc["models"][0], "model": "thermostat",
                              "end_date": "2027-12-31", "status": "supported",
                              "security_updates": True}]
    # near the end, then past it: the page says so
    site.clock.t = dt.datetime(2027, 11, 1, tzinfo=dt.UTC)
    page.goto(site.base + "/products/thermostat")
    assert "ending soon" in page.inner_text("#support-period")
    site.clock.t = dt.datetime(2028, 1, 2, tzinfo=dt.UTC)
    page.goto(site.base + "/products/thermostat")
    text = page.inner_text("#support-period")
    assert "ended on 2027-12-31" in text and "no longer gets security updates" in text
    assert httpx.get(site.base + "/api/v1/support-periods").json()["models"][0][
        "security_updates"] is False


def test_owner_sees_update_news_and_the_support_end(site: Site, page: Any) -> None:
    with site.sf.begin() as s:
        rollouts.define_support_period(s, "thermostat", dt.date(2026, 5, 1), now=START)
        rollouts.sync_releases(s, [SimpleNamespace(
            target_name="thermostat/thermostat-1.1.0.tar", length=1, sha256="0" * 64,
            info=SimpleNamespace(model="thermostat", version="1.1.0",
                                 min_from_version="1.0.0"))], now=START)
        rollouts.record_check(s, site.device_id, version="1.0.0", running="1.0.0",
                              mode="normal", now=START)
        rollouts.create_rollout(s, target_name="thermostat/thermostat-1.1.0.tar",
                                stages=[100], created_by="t", now=START)
    url = f"{site.base}/test-owner/units/{site.device_id}"
    page.goto(url)
    notices = page.locator("[data-notice]").all_inner_texts()
    assert any("Update 1.1.0 is available" in n for n in notices)
    assert any("end on 2026-05-01" in n for n in notices)  # less than 90 days left
    assert page.inner_text("[data-field=support]").startswith("2026-05-01")
    with site.sf.begin() as s:
        s.add(EventRow(device_id=site.device_id, seq=1, ts=START, received_at=START,
                       kind="update_installed", detail="1.1.0", digest="0" * 64))
        rollouts.process_events(s)
    site.clock.t = dt.datetime(2026, 5, 2, tzinfo=dt.UTC)
    page.goto(url)
    assert page.inner_text("[data-field=version]") == "1.1.0"
    alerts = page.locator("[data-notice=alert]").all_inner_texts()
    assert any("no longer gets security updates" in a for a in alerts)
    assert "(ended" in page.inner_text("[data-field=support]")


def test_operator_sees_rollout_progress_and_failures(site: Site, page: Any) -> None:
    with site.sf.begin() as s:
        rollouts.sync_releases(s, [SimpleNamespace(
            target_name="thermostat/thermostat-1.1.0.tar", length=1, sha256="0" * 64,
            info=SimpleNamespace(model="thermostat", version="1.1.0",
                                 min_from_version="1.0.0"))], now=START)
        rollout = rollouts.create_rollout(s, target_name="thermostat/thermostat-1.1.0.tar",
                                          stages=[100], min_sample=1, failure_threshold=0.5,
                                          created_by="release-manager", now=START)
        unit = s.get(Unit, site.device_id)
        assert unit is not None
        rollouts.assignment_for(s, unit, rollouts.unit_state(s, site.device_id), now=START)
        s.add(EventRow(device_id=site.device_id, seq=1, ts=START, received_at=START,
                       kind="update_rolled_back", detail="1.1.0 health_check <b>x</b>",
                       digest="0" * 64))
        s.add(EventRow(device_id=site.device_id, seq=2, ts=START, received_at=START,
                       kind="integrity_alert", detail="tampered: slot(s) b <script>",
                       digest="1" * 64))
        rollouts.process_events(s)
        rid = rollout.id
    page.goto(site.base + "/operator/updates")
    assert page.url.endswith("/operator/login")
    page.fill("#token", "hth_0000000000000000.wrong-token-wrong-token-wrong-token-wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("text=That token may not see rollouts.")
    page.fill("#token", site.token)
    page.click("button[type=submit]")
    page.wait_for_selector(f"#rollout-{rid}")
    section = page.locator(f"#rollout-{rid}")
    assert section.get_attribute("data-status") == "halted"
    assert "halted: 1 of 1 units at 100 % failed" in section.inner_text()
    assert "1.1.0 health_check <b>x</b>" in section.locator(".failures").inner_text()
    assert "tampered: slot(s) b <script>" in page.inner_text("#integrity-alerts")
    assert page.evaluate("() => document.querySelectorAll('main script, main b').length") == 0
