"""Journeys in a real browser: a researcher files a report and follows it; the security team
triages a hostile report (shown literally, no script runs) and publishes an advisory."""

from __future__ import annotations

import re
from typing import Any

import httpx

from hearth.service.disclosure import csaf

from .conftest import Live

XSS = '<script>alert("t")</script><img src=x onerror=alert("i")>"\'><b>bold</b>'


def test_researcher_files_a_report_and_follows_it(live: Live, page: Any) -> None:
    page.goto(live.base + "/security/policy")
    assert "5 working days" in page.inner_text("main")
    page.click("text=report form")
    page.fill("#title", "Lock accepts replayed unlock commands")
    page.select_option("#model", "lock")
    page.fill("#version", "1.2.0")
    page.fill("#description", "Capture an unlock frame and replay it: the bolt opens.")
    page.set_input_files("#attachments", files=[
        {"name": "poc.txt", "mimeType": "text/plain", "buffer": b"replay proof\n"}])
    page.fill("#reporter_name", "Ada Researcher")
    page.check("#wants_credit")
    live.clock.advance(seconds=30)  # a person takes time to write a report
    page.click("button[type=submit]")

    page.wait_for_selector("#saved-notice")
    link = page.inner_text("#status-link").strip()
    tracking_id = page.inner_text("#tracking-id").strip()
    assert re.fullmatch(r".*/security/status/[A-Za-z0-9_-]{43}", link)
    assert page.get_attribute("#report-state", "data-state") == "received"
    assert "poc.txt" in page.inner_text("main")

    # the team acknowledges and writes (through its API)
    headers = {"Authorization": f"Bearer {live.team_token}"}
    api = f"{live.base}/api/v1/disclosure/triage/reports/{tracking_id}"
    assert httpx.post(api + "/transition", json={"state": "acknowledged"},
                      headers=headers).status_code == 200
    assert httpx.post(api + "/messages", json={"body": "Can you share the radio capture?",
                                               "visibility": "public"},
                      headers=headers).status_code == 200
    assert httpx.post(api + "/messages", json={"body": "internal: looks real",
                                               "visibility": "internal"},
                      headers=headers).status_code == 200

    # the researcher comes back later through the secret link
    page.goto(link)
    assert page.get_attribute("#report-state", "data-state") == "acknowledged"
    timeline = page.inner_text("#timeline")
    assert "Can you share the radio capture?" in timeline
    assert "internal: looks real" not in page.content()
    page.fill("#body", "Sure - attached to the next message.")
    page.click("form[action$='/messages'] button")
    page.wait_for_selector("text=Sure - attached to the next message.")
    assert "Security team" in page.inner_text("#timeline")


def test_team_triages_a_hostile_report_and_publishes_an_advisory(live: Live, page: Any) -> None:
    # a hostile report, straight through the JSON API (every text field carries markup)
    ch = httpx.post(live.base + "/api/v1/disclosure/challenge").json()
    from hearth.service.disclosure.antiabuse import solve_pow

    r = httpx.post(live.base + "/api/v1/disclosure/reports", json={
        "title": "T " + XSS, "description": "D " + XSS, "version": "V " + XSS,
        "reporter_name": "N " + XSS, "reporter_email": "x'onmouseover=alert`1`@evil.example",
        "model": "lock", "wants_credit": True,
        "pow": {"challenge": ch["challenge"], "nonce": solve_pow(ch["challenge"],
                                                                  ch["difficulty"])}})
    assert r.status_code == 201, r.text
    tracking_id = r.json()["tracking_id"]

    page.goto(live.base + "/security/triage")
    assert page.url.endswith("/security/triage/login")
    page.fill("#token", live.team_token)
    page.click("button[type=submit]")
    page.wait_for_selector("#reports")
    assert page.inner_text("#reports .report-title") == "T " + XSS  # shown literally
    page.click(f"text={tracking_id}")

    # the view shows every field as text; none became markup
    assert page.inner_text("#report-title") == "T " + XSS
    assert page.inner_text("#report-description") == "D " + XSS
    assert page.inner_text("#report-version") == "V " + XSS
    assert "N " + XSS in page.inner_text("#report-reporter")
    injected = page.evaluate("""() => document.querySelectorAll(
        'main script, main img, main b, [onerror], [onmouseover]').length""")
    assert injected == 0

    def change_state(state: str) -> None:
        page.select_option("#state", state)
        page.click("form[action$='/transition'] button")
        page.wait_for_selector(f"#report-state[data-state={state}]")

    change_state("acknowledged")
    page.fill("#cvss_vector", "CVSS:3.1/AV:A/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:N")
    page.fill("#affected", "lock 1.0 1.4.2")
    page.fill("#fixing_release", "1.4.2")
    page.click("form[action$='/assess'] button")
    page.wait_for_selector("text=Assessment saved.")
    assert "high (8.1)" in page.inner_text("#report-severity")
    for state in ("triaged", "fixing", "fixed"):
        change_state(state)
    page.fill("#adv-title", "Lock accepts replayed unlock commands")
    page.fill("#adv-summary", "An attacker in radio range could replay an unlock command. "
                              "Update to firmware 1.4.2.")
    page.click("form[action$='/advisory'] button")
    page.wait_for_selector("#report-state[data-state=disclosed]")
    advisory_id = re.search(r"Advisory (HSA-\d{4}-\d{4}) published", page.inner_text("main"))
    assert advisory_id

    # public pages: the advisory, its CSAF document, and the product page
    page.goto(live.base + "/products/lock")
    page.click(f"text={advisory_id.group(1)}")
    assert "Lock accepts replayed unlock commands" in page.inner_text("h1")
    json_href = page.get_attribute("text=CSAF 2.0 JSON", "href")
    doc = httpx.get(live.base + json_href).json()
    assert doc["document"]["tracking"]["id"] == advisory_id.group(1)
    errors = csaf.validate_advisory(doc)
    assert errors == [], errors
    assert "N " + XSS in page.inner_text("main")  # credited by name, shown literally
