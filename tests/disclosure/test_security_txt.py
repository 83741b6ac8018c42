"""security.txt (RFC 9116): the served file meets the RFC's rules and renews itself."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient

from hearth.errors import ConfigError
from hearth.service.disclosure.security_txt import parse_security_txt, render_security_txt

from .conftest import BASE, MONDAY_9AM, FrozenClock, make_config

URL = BASE + "/.well-known/security.txt"


def test_served_file_meets_rfc_9116(client: TestClient, clock: FrozenClock) -> None:
    r = client.get("/.well-known/security.txt")
    assert r.status_code == 200
    parsed = parse_security_txt(r.content, now=clock(), retrieved_from=URL,
                                content_type=r.headers["content-type"])
    assert parsed.ok, parsed.errors
    assert parsed.warnings == []
    assert parsed.get("contact")[0] == BASE + "/security/report"
    assert "mailto:security@hearth.example" in parsed.get("contact")
    assert parsed.get("policy") == [BASE + "/security/policy"]
    assert parsed.get("canonical") == [URL]
    assert parsed.get("preferred-languages") == ["en, de"]
    assert parsed.get("encryption") == ["https://hearth.example/security/pgp-key.txt"]
    assert parsed.get("acknowledgments") == ["https://hearth.example/security/thanks"]
    assert parsed.get("csaf") == [BASE + "/.well-known/csaf/provider-metadata.json"]
    assert parsed.expires is not None
    assert clock() + dt.timedelta(days=170) < parsed.expires < clock() + dt.timedelta(days=365)


def test_optional_fields_only_when_configured() -> None:
    cfg = make_config(encryption=[], acknowledgments_url=None)
    text = render_security_txt(cfg, now=MONDAY_9AM)
    parsed = parse_security_txt(text, now=MONDAY_9AM, retrieved_from=URL)
    assert parsed.ok, parsed.errors
    assert parsed.get("encryption") == [] and parsed.get("acknowledgments") == []


def test_expires_renews_before_it_is_reached(client: TestClient, clock: FrozenClock) -> None:
    """Freeze time, read Expires, jump to just before it: the file served then is valid
    again and expires later still - it never goes stale while the service runs."""
    first = parse_security_txt(client.get("/.well-known/security.txt").text, now=clock())
    assert first.expires is not None
    clock.t = first.expires - dt.timedelta(minutes=1)
    again = parse_security_txt(client.get("/.well-known/security.txt").text, now=clock(),
                               retrieved_from=URL)
    assert again.ok, again.errors
    assert again.expires is not None and again.expires > first.expires
    assert again.expires - clock() > dt.timedelta(days=170)
    # the old file, read at that time, is close to expiry and would be stale a minute later
    assert parse_security_txt(client.get("/.well-known/security.txt").text,
                              now=first.expires + dt.timedelta(days=400)).errors == ["expired"]


def test_legacy_location_redirects(client: TestClient) -> None:
    r = client.get("/security.txt", follow_redirects=False)
    assert r.status_code == 301 and r.headers["location"] == "/.well-known/security.txt"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("Expires: 2027-01-01T00:00:00Z\n", "missing_contact"),
        ("Contact: mailto:a@b.example\n", "missing_expires"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n"
         "Expires: 2027-02-01T00:00:00Z\n", "duplicate_expires"),
        ("Contact: mailto:a@b.example\nExpires: 1 January 2027\n", "bad_expires_format"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01 00:00:00\n", "bad_expires_format"),
        ("Contact: mailto:a@b.example\nExpires: 2026-01-01T00:00:00Z\n", "expired"),
        ("Contact: http://b.example/report\nExpires: 2027-01-01T00:00:00Z\n", "not_https:contact"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n"
         "Policy: http://b.example/policy\n", "not_https:policy"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n"
         "Canonical: https://other.example/.well-known/security.txt\n", "canonical_mismatch"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n"
         "Preferred-Languages: en\nPreferred-Languages: de\n", "duplicate_preferred_languages"),
        ("Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n"
         "Preferred-Languages: en, 12\n", "bad_language_tag"),
        ("Contact mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n", "bad_line"),
        ("Contact:mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n", "bad_line"),
        (b"Contact: mailto:a@b.example\nExpires: 2027-01-01T00:00:00Z\n\xff", "not_utf8"),
    ],
)
def test_parser_enforces_the_rules(text: str | bytes, error: str) -> None:
    parsed = parse_security_txt(text, now=MONDAY_9AM, retrieved_from=URL)
    assert error in parsed.errors


def test_parser_accepts_crlf_comments_and_case_insensitive_names() -> None:
    text = ("# comment\r\ncontact: mailto:a@b.example\r\n\r\nEXPIRES: 2026-09-01T10:00:00+02:00"
            "\r\nX-Unknown: ignored\r\n")
    parsed = parse_security_txt(text, now=MONDAY_9AM)
    assert parsed.ok, parsed.errors
    assert parsed.expires == dt.datetime(2026, 9, 1, 8, 0, tzinfo=dt.UTC)


def test_parser_warns_about_expiry_over_a_year_and_checks_content_type() -> None:
    text = "Contact: mailto:a@b.example\nExpires: 2028-01-01T00:00:00Z\n"
    parsed = parse_security_txt(text, now=MONDAY_9AM, content_type="text/html")
    assert parsed.warnings == ["expires_over_a_year"]
    assert "bad_content_type" in parsed.errors


def test_config_refuses_a_validity_of_a_year_or_more_and_non_https() -> None:
    with pytest.raises(ConfigError, match="expires_after_days"):
        make_config(expires_after_days=365)
    with pytest.raises(ConfigError, match="https"):
        make_config(base_url="http://hearth.example")
    with pytest.raises(ConfigError, match="contact"):
        make_config(contacts=["javascript:alert(1)"])
