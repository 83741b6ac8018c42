"""Intake: strict limits with clear, counted errors; spam defence; rate limit; attachments."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hearth.service.disclosure.antiabuse import address_key, leading_zero_bits, solve_pow
from hearth.service.disclosure.intake import sniff_content_type
from hearth.service.disclosure.service import DisclosureService

from .conftest import VALID, FrozenClock, file_via_form, hidden, status_token_from, team_login

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
PDF = b"%PDF-1.7\n%%EOF\n"
EXE = b"MZ\x90\x00\x03" + b"\x00" * 64


def metrics(client: TestClient, token: str) -> dict[str, int]:
    r = client.get("/api/v1/disclosure/triage/metrics",
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    counts: dict[str, int] = r.json()["rejections"]
    return counts


# --- the web form -----------------------------------------------------------------------
def test_a_valid_report_is_accepted(client: TestClient, clock: FrozenClock) -> None:
    r = file_via_form(client, clock, files=[("attachments", ("poc.txt", b"replay\n", "x/y"))])
    assert r.status_code == 303
    page = client.get(f"/security/status/{status_token_from(r)}")
    assert page.status_code == 200 and VALID["title"] in page.text
    assert "poc.txt" in page.text and "text/plain" in page.text


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"title": "x" * 201}, "field_too_long", "title"),
        ({"title": ""}, "missing_field", "title"),
        ({"title": "abc"}, "field_too_short", "title"),
        ({"description": "y" * 20_001}, "field_too_long", "description"),
        ({"description": "too short"}, "field_too_short", "description"),
        ({"model": "toaster"}, "unknown_model", "model"),
        ({"reporter_email": "not-an-address"}, "invalid_email", "reporter_email"),
        ({"title": "Bad \x00 byte in title"}, "control_characters", "title"),
        ({"title": "Trojan \u202e source title"}, "control_characters", "title"),
        ({"admin": "yes"}, "unknown_field", "admin"),
    ],
)
def test_form_refuses_invalid_fields_with_a_clear_reason(
    client: TestClient, clock: FrozenClock, team_token: str,
    change: dict[str, str], reason: str, field: str,
) -> None:
    r = file_via_form(client, clock, {**VALID, **change})
    assert r.status_code == 400
    assert f"<code>{reason}</code>" in r.text
    assert f'href="#{field}"' in r.text
    assert metrics(client, team_token) == {reason: 1}


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ([("attachments", ("a.png", EXE, "image/png"))], "attachment_type_refused"),
        ([("attachments", ("notes.txt", b"\x00\x01\x02 binary", "text/plain"))],
         "attachment_type_refused"),
        ([("attachments", ("big.txt", b"a" * (2 * 1024 * 1024 + 1), "text/plain"))],
         "attachment_too_large"),
        ([("attachments", (f"{i}.png", PNG, "image/png")) for i in range(4)],
         "too_many_attachments"),
    ],
)
def test_form_refuses_bad_attachments(client: TestClient, clock: FrozenClock, team_token: str,
                                      files: list[Any], reason: str) -> None:
    r = file_via_form(client, clock, files=files)
    assert r.status_code == 400, r.text
    assert f"<code>{reason}</code>" in r.text
    assert metrics(client, team_token) == {reason: 1}


def test_an_oversize_request_is_refused_before_it_is_parsed(
    client: TestClient, clock: FrozenClock, team_token: str
) -> None:
    huge = [("attachments", (f"{i}.txt", b"a" * (3 * 1024 * 1024), "text/plain"))
            for i in range(3)]
    r = file_via_form(client, clock, files=huge)
    assert r.status_code == 413
    assert "<code>request_too_large</code>" in r.text
    assert metrics(client, team_token) == {"request_too_large": 1}


def test_spam_defences(client: TestClient, clock: FrozenClock, team_token: str) -> None:
    assert file_via_form(client, clock, wait=0.5).status_code == 400  # form_too_fast
    assert file_via_form(client, clock, wait=5 * 3600).status_code == 400  # form_expired
    page = client.get("/security/report")
    clock.advance(seconds=10)
    bot = client.post("/security/report", data={
        **VALID, "csrf_token": hidden(page.text, "csrf_token"),
        "form_stamp": hidden(page.text, "form_stamp"), "website": "http://spam.example"})
    assert bot.status_code == 400
    forged = client.post("/security/report", data={
        **VALID, "csrf_token": hidden(page.text, "csrf_token"),
        "form_stamp": "1700000000.000.forged", "website": ""})
    assert forged.status_code == 400
    assert metrics(client, team_token) == {"form_too_fast": 1, "form_expired": 1,
                                           "spam_suspected": 1, "bad_form_token": 1}


def test_csrf_is_required(client: TestClient, clock: FrozenClock, team_token: str) -> None:
    page = client.get("/security/report")
    stamp = hidden(page.text, "form_stamp")
    clock.advance(seconds=10)
    no_token = client.post("/security/report", data={**VALID, "form_stamp": stamp})
    wrong = client.post("/security/report", data={**VALID, "form_stamp": stamp,
                                                  "csrf_token": "A" * 43})
    cross = client.post("/security/report", headers={"Origin": "https://evil.example"},
                        data={**VALID, "form_stamp": stamp,
                              "csrf_token": hidden(page.text, "csrf_token")})
    assert [r.status_code for r in (no_token, wrong, cross)] == [400, 400, 400]
    assert metrics(client, team_token) == {"csrf_failed": 3}


def test_rate_limit_per_address(client: TestClient, clock: FrozenClock,
                                service: DisclosureService, team_token: str) -> None:
    burst = service.config.rates.report_burst
    for _ in range(burst):
        assert file_via_form(client, clock, wait=4).status_code == 303
    refused = file_via_form(client, clock, wait=4)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert metrics(client, team_token) == {"rate_limited": 1}
    clock.advance(seconds=service.config.rates.report_every_seconds)
    assert file_via_form(client, clock, wait=4).status_code == 303


def test_address_keys_group_ipv6_by_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("not an address") == "unknown"


# --- the JSON API ---------------------------------------------------------------------------
def pow_fields(client: TestClient) -> dict[str, str]:
    ch = client.post("/api/v1/disclosure/challenge").json()
    return {"challenge": ch["challenge"], "nonce": solve_pow(ch["challenge"], ch["difficulty"])}


def test_json_intake_and_status(client: TestClient) -> None:
    body = {**VALID, "wants_credit": True, "pow": pow_fields(client),
            "attachments": [{"filename": "shot.png",
                             "content_base64": base64.b64encode(PNG).decode()}]}
    r = client.post("/api/v1/disclosure/reports", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["tracking_id"].startswith("HR-") and out["state"] == "received"
    assert out["status_url"].endswith(out["status_token"])
    st = client.get("/api/v1/disclosure/status",
                    headers={"Authorization": f"Bearer {out['status_token']}"})
    assert st.status_code == 200 and st.json()["tracking_id"] == out["tracking_id"]
    m = client.post("/api/v1/disclosure/status/messages", json={"body": "any news?"},
                    headers={"Authorization": f"Bearer {out['status_token']}"})
    assert m.status_code == 201
    events = client.get("/api/v1/disclosure/status", headers={
        "Authorization": f"Bearer {out['status_token']}"}).json()["events"]
    assert [e["kind"] for e in events] == ["submitted", "message"]


@pytest.mark.parametrize(
    ("body", "reason", "status"),
    [
        (b"{not json", "malformed_json", 400),
        (b"[1, 2]", "malformed_json", 400),
    ],
)
def test_json_intake_refuses_malformed_bodies(client: TestClient, body: bytes, reason: str,
                                              status: int) -> None:
    r = client.post("/api/v1/disclosure/reports", content=body,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"] == reason


def test_json_intake_field_errors_and_proof_of_work(client: TestClient, clock: FrozenClock,
                                                    team_token: str) -> None:
    def post(body: dict[str, Any]) -> Any:
        return client.post("/api/v1/disclosure/reports", json=body)

    assert post(VALID).json()["error"] == "pow_required"
    bad = pow_fields(client)
    bad["nonce"] = next(n for n in (f"x{i}" for i in range(1000)) if leading_zero_bits(
        hashlib.sha256(f"{bad['challenge']}:{n}".encode()).digest()) < 6)
    assert post({**VALID, "pow": bad}).json()["error"] == "pow_invalid"
    r = post({**VALID, "title": 42, "pow": pow_fields(client)})
    assert r.status_code == 400 and r.json() == {
        "error": "wrong_type", "field": "title", "detail": "title must be text"}
    used = pow_fields(client)
    assert post({**VALID, "pow": used}).status_code == 201
    assert post({**VALID, "pow": used}).json()["error"] == "challenge_reused"
    old = pow_fields(client)
    clock.advance(seconds=3600)
    assert post({**VALID, "pow": old}).json()["error"] == "challenge_expired"
    r = post({**VALID, "pow": pow_fields(client),
              "attachments": [{"filename": "x.png", "content_base64": "@@@"}]})
    assert r.json()["error"] == "wrong_type"
    counts = metrics(client, team_token)
    assert counts["pow_required"] == 1 and counts["challenge_reused"] == 1
    assert counts["challenge_expired"] == 1 and counts["wrong_type"] == 2


def test_sniffing_decides_the_type_not_the_name() -> None:
    assert sniff_content_type(PNG) == "image/png"
    assert sniff_content_type(JPEG) == "image/jpeg"
    assert sniff_content_type(PDF) == "application/pdf"
    assert sniff_content_type("naïve text\n".encode()) == "text/plain"
    assert sniff_content_type(EXE) is None
    assert sniff_content_type(b"\xff\xfe\x00bad") is None


# --- attachments are never served inline -----------------------------------------------------
def test_attachments_download_only(client: TestClient, clock: FrozenClock,
                                   team_token: str) -> None:
    svg_like = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    r = file_via_form(client, clock, files=[("attachments", ("../../evil.svg", svg_like,
                                                             "image/svg+xml"))])
    assert r.status_code == 303  # it is plain UTF-8 text, so accepted - as text
    page = client.get(f"/security/status/{status_token_from(r)}")
    reporter_url = next(p for p in page.text.split('"') if "/attachments/" in p)
    team_login(client, team_token)
    listing = client.get("/security/triage").text
    report = next(p for p in listing.split('"') if p.startswith("/security/triage/reports/"))
    team_url = next(p for p in client.get(report).text.split('"') if "/attachments/" in p)
    for url in (reporter_url, team_url):
        dl = client.get(url)
        assert dl.status_code == 200 and dl.content == svg_like
        assert dl.headers["content-type"] == "application/octet-stream"
        assert dl.headers["content-disposition"] == 'attachment; filename="evil.txt"'
        assert dl.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in dl.headers["content-security-policy"]
