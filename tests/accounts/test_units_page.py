"""The owner's devices page: live state from the units table, advisories that affect the
owner's models (issue 5: owners of affected units are told in the web app)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.disclosure.models import Advisory, AdvisoryProduct
from hearth.service.models import Unit

from .conftest import START, Minted, api_token, consumer, hidden


def claim(client: Any, dev: str, code: str) -> None:
    token = hidden(client.get("/units/claim").text)
    assert client.post("/units/claim", data={"csrf_token": token, "device_id": dev,
                                              "setup_code": code}).status_code == 201


def publish_advisory(sessions: sessionmaker[Session], model: str, adv_id: str) -> None:
    with sessions.begin() as s:
        s.add(Advisory(id=adv_id, report_id=None, title=f"{model} accepts a bad thing",
                       summary="s", severity="High", cvss_vector="CVSS:3.1/AV:N",
                       cvss_version="3.1", cvss_score=8.1, cve=None, fixing_release="1.2.0",
                       initial_release_date=START, current_release_date=START, version=1,
                       document="{}"))
        s.flush()
        s.add(AdvisoryProduct(advisory_id=adv_id, model=model, introduced=None,
                              fixed="1.2.0"))


def test_owners_see_live_state_and_the_advisories_for_their_units(
        app: Any, minted: Minted, sessions: sessionmaker[Session]) -> None:
    alice = consumer(app, "alice@example.org", "10.0.0.1")
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    therm, lock = minted.thermostats[0], minted.locks[0]
    claim(alice, therm, minted.codes[therm])
    claim(bob, lock, minted.codes[lock])
    publish_advisory(sessions, "thermostat", "HEARTH-2026-0007")
    publish_advisory(sessions, "lock", "HEARTH-2026-0008")
    with sessions.begin() as s:
        s.execute(sa.update(Unit).where(Unit.device_id == therm).values(
            latest_state={"temperature": 21.25, "target": 20.0, "heater": False,
                          "humidity": 44.0}, latest_ts=START, last_seen_at=START))
    page = alice.get("/units").text
    assert "21.2 °C" in page or "21.3 °C" in page
    assert "HEARTH-2026-0007" in page and "fixed in 1.2.0" in page
    assert "HEARTH-2026-0008" not in page  # bob's lock, not alice's
    state = alice.get("/units/state.json").json()
    assert [u["device_id"] for u in state["units"]] == [therm]
    assert state["units"][0]["online"] is True and state["units"][0]["state"]["target"] == 20.0
    token = api_token(alice, "alice@example.org")
    listed = alice.get("/api/v1/account/units",
                       headers={"Authorization": f"Bearer {token}"}).json()["units"]
    assert listed[0]["advisories"] == ["HEARTH-2026-0007"]
    assert "HEARTH-2026-0008" in bob.get("/units").text
