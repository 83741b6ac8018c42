"""A new consumer, on a phone-sized screen, signs up, claims a thermostat by typing the code
from its label and watches it live - against the real service (HTTPS, broker, ingest) and
a real running unit. No script may run from page content and the CSP must hold."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Fleet, running_fleet
from tests.helpers import wait_until

PHONE = {"width": 390, "height": 844}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, thermostats=1, locks=0) as f:
        yield f


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True,
                                  device_scale_factor=2, ignore_https_errors=True)
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    page.on("console", lambda m: problems.append(f"console: {m.text}") if (
        m.type == "error" and not str(m.location.get("url", "")).endswith("/favicon.ico"))
        else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.problems = problems
    yield page
    context.close()
    assert problems == [], problems


def test_new_consumer_signs_up_claims_a_thermostat_and_sees_it_live(
        fleet: Fleet, phone: Any) -> None:
    unit = fleet.units[0]
    with (fleet.root / "units" / "labels" / "print-manifest.csv").open() as fh:
        code = next(r["setup_code"] for r in csv.DictReader(fh)
                    if r["device_id"] == unit.device_id)
    agent = fleet.agent(unit, telemetry_interval=0.3, backoff_base=0.1, backoff_cap=1.0)
    agent.start()
    base = f"https://localhost:{fleet.settings.http_port}"

    # step 1: an account
    phone.goto(base + "/account/sign-up")
    phone.get_by_label("E-mail address").fill("new.owner@example.org")
    phone.get_by_label("Password").fill("my thermostat lives in the hallway")
    phone.get_by_role("button", name="Create account").click()
    phone.wait_for_url(re.compile(r".*/units/claim\?welcome=1$"))
    assert "Step 2 of 3" in phone.inner_text("main")

    # step 2: the codes from the label
    phone.get_by_label("Device ID").fill(unit.device_id[:8].upper())
    phone.get_by_label("Setup code").fill(code.lower())
    phone.get_by_role("button", name="Add device").click()
    phone.wait_for_selector("#claimed-notice")
    assert len(phone.inner_text("#local-key").strip()) == 43

    # step 3: live
    phone.click("#see-units")
    phone.wait_for_url(re.compile(r".*/units$"))
    card = f'[data-device="{unit.device_id}"]'
    humidity = f'{card} [data-reading="humidity"]'
    phone.wait_for_selector(humidity)  # the page script reloads once readings arrive
    assert phone.inner_text(f'{card} [data-field="online"]') == "online"
    first = phone.inner_text(humidity)
    # the readings change on the page by themselves (no navigation), from the real unit
    phone.wait_for_function(
        "([sel, old]) => document.querySelector(sel).textContent !== old",
        arg=[humidity, first], timeout=30_000)
    assert "°C" in phone.inner_text(f'{card} [data-reading="temperature"]')
    # the unit confirmed its owner, and the page fits the phone (no sideways scrolling)
    wait_until(lambda: agent.owner.binding() is not None, timeout=30, what="bind_owner")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]
    headers = phone.request.get(base + "/units").headers
    assert "script-src 'self'" in headers["content-security-policy"]
