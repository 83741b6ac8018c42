"""Sessions: random server-side ids stored as hashes, Secure/HttpOnly/SameSite cookies,
a new id at every sign-in (no fixation), idle and absolute timeouts, CSRF on every form."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.accounts.models import AccountSession
from hearth.service.web import iter_web_routes
from tests.disclosure.conftest import FrozenClock

from .conftest import BASE, PASSWORD, consumer, csrf, hidden, new_client, sign_in, sign_up

COOKIE = "__Host-hearth-session"


def set_cookie_header(response: Any, name: str) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(name + "="):
            return str(value)
    raise AssertionError(f"no {name} cookie set")


def test_session_cookie_flags(app: Any) -> None:
    c = new_client(app)
    r = sign_up(c, "alice@example.org")
    header = set_cookie_header(r, COOKIE).lower()
    assert "secure" in header and "httponly" in header and "samesite=lax" in header
    assert "path=/" in header and "domain" not in header
    known = set_cookie_header(r, "__Host-hearth-device").lower()
    assert "secure" in known and "httponly" in known and "samesite=strict" in known


def test_only_a_hash_of_the_session_id_is_stored(app: Any,
                                                 sessions: sessionmaker[Session]) -> None:
    c = consumer(app, "alice@example.org")
    raw = c.cookies.get(COOKIE)
    assert raw and len(raw) == 43
    with sessions() as s:
        rows = list(s.scalars(sa.select(AccountSession)))
    assert [r.id_hash for r in rows] == [hashlib.sha256(raw.encode()).hexdigest()]


def test_session_fixation_a_new_id_at_sign_in_and_the_old_one_dies(app: Any) -> None:
    c = consumer(app, "alice@example.org")
    old = c.cookies.get(COOKIE)
    assert c.get("/units", follow_redirects=False).status_code == 200
    # an attacker plants a cookie value before the victim signs in: it is never adopted
    victim = new_client(app, "10.0.0.9")
    victim.cookies.set(COOKIE, old or "", domain="hearth.example")
    r = sign_in(victim, "alice@example.org")
    assert r.status_code == 303
    new = victim.cookies.get(COOKIE)
    assert new and new != old
    # the old id no longer opens anything
    attacker = TestClient(app, base_url=BASE)
    attacker.cookies.set(COOKIE, old or "", domain="hearth.example")
    assert attacker.get("/units", follow_redirects=False).status_code == 303
    # an id the attacker made up is not adopted either
    fixed = "A" * 43
    fresh = new_client(app, "10.0.0.10")
    fresh.cookies.set(COOKIE, fixed, domain="hearth.example")
    sign_in(fresh, "alice@example.org")
    assert fresh.cookies.get(COOKIE) != fixed


def test_sign_out_ends_the_session(app: Any) -> None:
    c = consumer(app, "alice@example.org")
    raw = c.cookies.get(COOKIE)
    token = hidden(c.get("/units").text)
    r = c.post("/account/sign-out", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    replay = TestClient(app, base_url=BASE)
    replay.cookies.set(COOKIE, raw or "", domain="hearth.example")
    assert replay.get("/units", follow_redirects=False).status_code == 303


def test_idle_and_absolute_timeouts(app: Any, clock: FrozenClock) -> None:
    c = consumer(app, "alice@example.org")
    clock.advance(hours=23)
    assert c.get("/units", follow_redirects=False).status_code == 200   # used: stays alive
    clock.advance(hours=24, minutes=1)
    assert c.get("/units", follow_redirects=False).status_code == 303   # idle > 24 h
    d = consumer(app, "bob@example.org", "10.0.0.2")
    for _ in range(33):  # used every day: the absolute limit (30 days) still ends it
        clock.advance(hours=23)
        last = d.get("/units", follow_redirects=False).status_code
    assert last == 303


def test_every_form_refuses_a_post_without_a_valid_csrf_token(app: Any) -> None:
    c = consumer(app, "alice@example.org")
    posts = [path for path, route, _ in iter_web_routes(app.routes)
             if "POST" in getattr(route, "methods", ()) and not path.startswith("/api/")]
    assert len(posts) >= 10
    for path in posts:
        url = path.replace("{device_id}", "0" * 32)
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": "x" * 43}):
            r = c.post(url, data=data, follow_redirects=False)
            assert r.status_code in (400, 403), (path, r.status_code)
    # a cross-origin post with a valid token is refused too
    token = csrf(c, "/account/sign-in")
    r = c.post("/account/sign-in", data={"csrf_token": token, "email": "alice@example.org",
                                         "password": PASSWORD},
               headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert r.status_code == 403


def test_open_redirects_are_not_possible_after_sign_in(app: Any) -> None:
    c = new_client(app)
    sign_up(c, "alice@example.org")
    for target, expected in (("//evil.example/x", "/units"), ("https://evil.example", "/units"),
                             ("/units/claim", "/units/claim"), ("/\\evil.example", "/units")):
        token = csrf(c)
        r = c.post("/account/sign-in", data={"csrf_token": token, "email": "alice@example.org",
                                             "password": PASSWORD, "next": target},
                   follow_redirects=False)
        assert r.headers["location"] == expected


def test_expired_sessions_are_purged(service: Any, app: Any, clock: FrozenClock,
                                     sessions: sessionmaker[Session]) -> None:
    consumer(app, "alice@example.org")
    clock.t += dt.timedelta(days=31)
    service.reconcile()
    with sessions() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(AccountSession)) == 0
