"""A reporter can read only their own report: tracking ids and other people's status links
open nothing, and every wrong key gets the same 404 as a report that does not exist."""

from __future__ import annotations

import re
import secrets

from fastapi.testclient import TestClient

from .conftest import VALID, FrozenClock, file_via_form, status_token_from


def two_reports(client: TestClient, clock: FrozenClock) -> tuple[str, str, str, str]:
    a = file_via_form(client, clock, files=[("attachments", ("a.txt", b"secret A\n", "t/p"))])
    b = file_via_form(client, clock, {**VALID, "title": "Thermostat overheats on command"})
    ta, tb = status_token_from(a), status_token_from(b)
    page_a = client.get(f"/security/status/{ta}?new=1").text
    page_b = client.get(f"/security/status/{tb}?new=1").text
    ida = re.search(r'id="tracking-id">([^<]+)<', page_a)
    idb = re.search(r'id="tracking-id">([^<]+)<', page_b)
    assert ida and idb
    return ta, tb, ida.group(1), idb.group(1)


def test_each_link_opens_only_its_own_report(client: TestClient, clock: FrozenClock) -> None:
    ta, tb, ida, _idb = two_reports(client, clock)
    page_b = client.get(f"/security/status/{tb}").text
    assert "Thermostat overheats" in page_b and VALID["title"] not in page_b
    assert ida not in page_b and ta not in page_b


def test_wrong_keys_look_exactly_like_missing_reports(client: TestClient,
                                                      clock: FrozenClock) -> None:
    ta, _tb, ida, _idb = two_reports(client, clock)
    nonexistent = client.get(f"/security/status/{secrets.token_urlsafe(32)}")
    assert nonexistent.status_code == 404
    for guess in (ida, ida.lower(), ta[:-1] + ("A" if ta[-1] != "A" else "B"), ta.upper(),
                  "0" * 43, ta + "x", ta[:20], "%00"):
        clock.advance(minutes=1)  # stay under the guessing rate limit (next test)
        r = client.get(f"/security/status/{guess}")
        assert r.status_code == 404 and r.text == nonexistent.text, guess
    for path in ("/security/status/", "/security/status/..%2f..%2fetc%2fpasswd"):
        assert client.get(path).status_code == 404


def test_json_status_refuses_tracking_ids_and_other_tokens(client: TestClient,
                                                           clock: FrozenClock) -> None:
    ta, _tb, ida, _ = two_reports(client, clock)
    missing = client.get("/api/v1/disclosure/status",
                         headers={"Authorization": f"Bearer {secrets.token_urlsafe(32)}"})
    assert missing.status_code == 404
    for key in (ida, ta[:-2], "", "hth_0000000000000000." + "a" * 43):
        r = client.get("/api/v1/disclosure/status", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 404 and r.json() == missing.json()
    r = client.post("/api/v1/disclosure/status/messages", json={"body": "hi"},
                    headers={"Authorization": f"Bearer {ida}"})
    assert r.status_code == 404 and r.json() == missing.json()


def test_attachments_cannot_be_reached_through_another_link(client: TestClient,
                                                            clock: FrozenClock) -> None:
    ta, tb, _, _ = two_reports(client, clock)
    page_a = client.get(f"/security/status/{ta}").text
    att_path = next(p for p in page_a.split('"') if "/attachments/" in p)
    att_id = att_path.rsplit("/", 1)[1]
    assert client.get(att_path).status_code == 200
    other = client.get(f"/security/status/{tb}/attachments/{att_id}")
    assert other.status_code == 404 and b"secret A" not in other.content


def test_a_message_cannot_be_posted_to_another_report(client: TestClient,
                                                      clock: FrozenClock) -> None:
    ta, _tb, ida, _ = two_reports(client, clock)
    page = client.get(f"/security/status/{ta}").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf
    r = client.post(f"/security/status/{ida}/messages",
                    data={"csrf_token": csrf.group(1), "body": "hello"})
    assert r.status_code == 404


def test_status_pages_are_private(client: TestClient, clock: FrozenClock) -> None:
    ta, *_ = two_reports(client, clock)
    r = client.get(f"/security/status/{ta}")
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "noindex" in r.headers["x-robots-tag"]


def test_guessing_status_links_is_rate_limited(client: TestClient, clock: FrozenClock) -> None:
    codes = [client.get(f"/security/status/{secrets.token_urlsafe(32)}").status_code
             for _ in range(30)]
    assert set(codes[:10]) == {404} and set(codes[-10:]) == {429}
