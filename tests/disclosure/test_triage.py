"""The triage workflow: transitions, preconditions, deadlines, the audit trail, and who may
triage."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service import auth
from hearth.service.disclosure import triage as tri
from hearth.service.disclosure.models import AuditTrailError, ReportEvent, ReportState
from hearth.service.disclosure.scoring import score_vector

from .conftest import VALID, FrozenClock, file_via_form, hidden, status_token_from, team_login

V31 = "CVSS:3.1/AV:A/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:N"
V40 = "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N"


def api(client: TestClient, token: str, path: str, body: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/api/v1/disclosure/triage/reports{path}"
    return client.post(url, json=body, headers=headers) if body is not None else client.get(
        url, headers=headers)


def new_report(client: TestClient, clock: FrozenClock) -> tuple[str, str]:
    """File a report; returns (tracking id, status token)."""
    token = status_token_from(file_via_form(client, clock))
    page = client.get(f"/security/status/{token}?new=1").text
    m = re.search(r'id="tracking-id">([^<]+)<', page)
    assert m
    return m.group(1), token


def test_transition_table_is_enforced() -> None:
    every = set(ReportState)
    for source, allowed in tri.TRANSITIONS.items():
        assert allowed <= every and source not in allowed
    assert tri.TRANSITIONS[ReportState.DISCLOSED] == frozenset()


@pytest.mark.parametrize("target", ["triaged", "fixing", "fixed", "disclosed", "received"])
def test_invalid_transitions_from_received_are_refused(
    client: TestClient, clock: FrozenClock, team_token: str, target: str
) -> None:
    tid, _ = new_report(client, clock)
    r = api(client, team_token, f"/{tid}/transition", {"state": target})
    assert r.status_code == 409 and r.json()["error"] == "invalid_transition"
    assert api(client, team_token, f"/{tid}").json()["state"] == "received"


def test_full_workflow_with_preconditions_and_audit_trail(
    client: TestClient, clock: FrozenClock, team_token: str
) -> None:
    tid, token = new_report(client, clock)
    assert api(client, team_token, f"/{tid}/transition",
               {"state": "acknowledged", "comment": "Thanks, we are on it."}).status_code == 200
    r = api(client, team_token, f"/{tid}/transition", {"state": "triaged"})
    assert r.status_code == 400 and r.json()["error"] == "assessment_required"
    r = api(client, team_token, f"/{tid}/assessment", {"cvss_vector": "CVSS:3.1/AV:X"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_cvss_vector"
    r = api(client, team_token, f"/{tid}/assessment", {"cvss_vector": "CVSS:2.0/AV:N"})
    assert r.json()["error"] == "invalid_cvss_vector"
    r = api(client, team_token, f"/{tid}/assessment", {
        "cvss_vector": V31, "affected": [{"model": "lock", "introduced": "1.0", "fixed": "1.4.2"}]})
    assert r.status_code == 200 and r.json()["severity"] == "high"
    assert r.json()["cvss_score"] == score_vector(V31).base_score
    r = api(client, team_token, f"/{tid}/assessment",
            {"affected": [{"model": "lock", "introduced": "2.0", "fixed": "1.0"}]})
    assert r.json()["error"] == "invalid_range"
    assert api(client, team_token, f"/{tid}/transition", {"state": "triaged"}).status_code == 200
    assert api(client, team_token, f"/{tid}/transition", {"state": "fixing"}).status_code == 200
    r = api(client, team_token, f"/{tid}/transition", {"state": "fixed"})
    assert r.json()["error"] == "fixing_release_required"
    api(client, team_token, f"/{tid}/assessment", {"fixing_release": "1.4.2"})
    assert api(client, team_token, f"/{tid}/transition", {"state": "fixed"}).status_code == 200
    r = api(client, team_token, f"/{tid}/transition", {"state": "disclosed"})
    assert r.status_code == 409 and r.json()["error"] == "advisory_required"
    api(client, team_token, f"/{tid}/messages", {"body": "Fix is in 1.4.2", "visibility": "public"})
    api(client, team_token, f"/{tid}/messages", {"body": "INTERNAL: vendor X", "visibility":
                                                 "internal"})
    r = api(client, team_token, f"/{tid}/advisory", {
        "title": "Lock accepts replayed unlock commands",
        "summary": "An attacker in radio range could replay an unlock command."})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "disclosed" and r.json()["advisory"]["id"].startswith("HSA-2026-")
    trail = api(client, team_token, f"/{tid}").json()["events"]
    kinds = [(e["kind"], e["public"]) for e in trail]
    assert ("note", False) in kinds and ("assessment", False) in kinds
    # the reporter sees state changes and public messages, never internal notes
    status = client.get("/api/v1/disclosure/status",
                        headers={"Authorization": f"Bearer {token}"}).json()
    seen = [(e["kind"], e["to_state"]) for e in status["events"]]
    assert ("state_changed", "acknowledged") in seen and ("state_changed", "disclosed") in seen
    assert all(e["kind"] not in ("note", "assessment") for e in status["events"])
    assert "INTERNAL" not in str(status) and "Thanks, we are on it." in str(status)
    page = client.get(f"/security/status/{token}").text
    assert "INTERNAL" not in page and "Fix is in 1.4.2" in page


def test_duplicate_needs_an_existing_report(client: TestClient, clock: FrozenClock,
                                            team_token: str) -> None:
    first, _ = new_report(client, clock)
    second, _ = new_report(client, clock)
    r = api(client, team_token, f"/{second}/transition", {"state": "duplicate"})
    assert r.json()["error"] == "duplicate_of_required"
    r = api(client, team_token, f"/{second}/transition",
            {"state": "duplicate", "duplicate_of": "HR-NOPE"})
    assert r.json()["error"] == "unknown_report"
    r = api(client, team_token, f"/{second}/transition",
            {"state": "duplicate", "duplicate_of": first})
    assert r.status_code == 200 and r.json()["duplicate_of"] == first
    # closed, and may be re-opened
    assert api(client, team_token, f"/{second}/transition",
               {"state": "acknowledged"}).status_code == 200


def test_overdue_flags_with_a_frozen_clock(client: TestClient, clock: FrozenClock,
                                           team_token: str) -> None:
    tid, _ = new_report(client, clock)  # Monday 9:00: acknowledgement due end of next Monday

    def overdue() -> list[str]:
        rows = api(client, team_token, "").json()["reports"]
        return next(r["overdue"] for r in rows if r["tracking_id"] == tid)

    clock.t = dt.datetime(2026, 3, 9, 23, 59, tzinfo=dt.UTC)
    assert overdue() == []
    clock.t = dt.datetime(2026, 3, 10, 0, 1, tzinfo=dt.UTC)
    assert overdue() == ["acknowledgement overdue"]
    api(client, team_token, f"/{tid}/transition", {"state": "acknowledged"})
    assert overdue() == []
    clock.advance(days=14, minutes=1)  # no public update for longer than the cadence
    assert overdue() == ["status update overdue"]
    api(client, team_token, f"/{tid}/messages", {"body": "Still working on it.",
                                                 "visibility": "public"})
    assert overdue() == []
    clock.t = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC) + dt.timedelta(days=90, minutes=1)
    assert "fix target missed" in overdue()
    api(client, team_token, f"/{tid}/transition", {"state": "rejected"})
    assert overdue() == []  # closed reports are not overdue
    listing = client.get("/security/triage", follow_redirects=False)
    assert listing.status_code == 303  # no session: the HTML view asks for sign-in


def test_audit_trail_is_append_only(client: TestClient, clock: FrozenClock,
                                    sessions: sessionmaker[Session]) -> None:
    new_report(client, clock)
    with sessions() as s:
        ev = s.scalars(sa.select(ReportEvent)).first()
        assert ev is not None
        ev.body = "rewritten"
        with pytest.raises(AuditTrailError):
            s.flush()
    with sessions() as s:
        s.delete(s.scalars(sa.select(ReportEvent)).one())
        with pytest.raises(AuditTrailError):
            s.flush()
    # and in the database itself, past the ORM
    with sessions.begin() as s, pytest.raises(sa.exc.DatabaseError, match="append-only"):
        s.execute(sa.text("UPDATE disclosure_events SET body = 'x'"))
    with sessions.begin() as s, pytest.raises(sa.exc.DatabaseError, match="append-only"):
        s.execute(sa.text("DELETE FROM disclosure_events"))


def test_triage_needs_a_valid_operator_token(client: TestClient, clock: FrozenClock,
                                             sessions: sessionmaker[Session],
                                             team_token: str) -> None:
    tid, _ = new_report(client, clock)
    assert api(client, "hth_0123456789abcdef." + "x" * 43, "").status_code == 401
    assert client.get("/api/v1/disclosure/triage/reports").status_code == 401
    with sessions.begin() as s:
        reader = auth.create_token(s, "reader", permissions=[auth.Permission.FLEET_READ])
    assert api(client, reader, "").status_code == 401
    page = client.get("/security/triage/login")
    bad = client.post("/security/triage/login", data={
        "csrf_token": hidden(page.text, "csrf_token"), "token": reader})
    assert bad.status_code == 401
    team_login(client, team_token)
    assert client.get(f"/security/triage/reports/{tid}").status_code == 200
    token_id = team_token.split(".")[0].removeprefix("hth_")
    with sessions.begin() as s:
        auth.revoke_token(s, token_id)
    assert client.get("/security/triage", follow_redirects=False).status_code == 303
    assert api(client, team_token, "").status_code == 401


def test_session_cookie_flags(client: TestClient, team_token: str) -> None:
    page = client.get("/security/triage/login")
    r = client.post("/security/triage/login", data={
        "csrf_token": hidden(page.text, "csrf_token"), "token": team_token},
        follow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("__Host-hearth-triage=")
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag.lower() in cookie.lower()
    assert "domain" not in cookie.lower()
    assert team_token not in cookie


def test_forged_or_expired_session_cookie_is_refused(client: TestClient, clock: FrozenClock,
                                                     team_token: str) -> None:
    team_login(client, team_token)
    assert client.get("/security/triage", follow_redirects=False).status_code == 200
    clock.advance(hours=9)
    assert client.get("/security/triage", follow_redirects=False).status_code == 303
    client.cookies.set("__Host-hearth-triage", "0123456789abcdef~9999999999.forged",
                       domain="hearth.example")
    assert client.get("/security/triage", follow_redirects=False).status_code == 303


def test_html_triage_actions_need_csrf(client: TestClient, clock: FrozenClock,
                                       team_token: str) -> None:
    tid, _ = new_report(client, clock)
    team_login(client, team_token)
    r = client.post(f"/security/triage/reports/{tid}/transition", data={"state": "acknowledged"})
    assert r.status_code == 400 and "csrf_failed" in r.text
    page = client.get(f"/security/triage/reports/{tid}").text
    r = client.post(f"/security/triage/reports/{tid}/transition", data={
        "state": "acknowledged", "csrf_token": hidden(page, "csrf_token")})
    assert r.status_code == 200 and 'data-state="acknowledged"' in r.text
    r = client.post(f"/security/triage/reports/{tid}/assess", data={
        "csrf_token": hidden(page, "csrf_token"), "cvss_vector": "CVSS:4.0/AV:N",
        "affected": "", "fixing_release": ""})
    assert r.status_code == 400 and "not a valid CVSS vector" in r.text
    r = client.post(f"/security/triage/reports/{tid}/assess", data={
        "csrf_token": hidden(page, "csrf_token"), "cvss_vector": V40,
        "affected": "thermostat - 2.0\nlock 1.0 1.1", "fixing_release": ""})
    assert r.status_code == 200 and "critical (9.3)" in r.text


def test_affected_ranges() -> None:
    r = tri.AffectedRange("lock", "1.0", "1.4.2")
    assert r.contains("1.0.0") and r.contains("1.4.1") and not r.contains("1.4.2")
    assert not r.contains("0.9") and r.vers() == "vers:generic/>=1.0|<1.4.2"
    assert tri.AffectedRange("lock").vers() == "vers:generic/*"
    assert tri.parse_version("1.2.0") == tri.parse_version("1.2")
    with pytest.raises(tri.TriageError):
        tri.parse_version("1.2-beta")
    with pytest.raises(tri.TriageError):
        tri.validate_affected([{"model": "toaster"}], ["lock"])


def test_reporter_messages_do_not_count_as_team_updates(
    client: TestClient, clock: FrozenClock, team_token: str
) -> None:
    tid, token = new_report(client, clock)
    before = api(client, team_token, f"/{tid}").json()["next_update_due"]
    clock.advance(days=1)
    client.post("/api/v1/disclosure/status/messages", json={"body": "ping"},
                headers={"Authorization": f"Bearer {token}"})
    assert api(client, team_token, f"/{tid}").json()["next_update_due"] == before
    assert VALID["title"] in api(client, team_token, f"/{tid}").json()["title"]
