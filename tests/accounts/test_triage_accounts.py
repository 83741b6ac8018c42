"""The disclosure triage pages take security-team accounts (password + TOTP) instead of a
pasted operator token; nobody else gets in."""

from __future__ import annotations

from typing import Any

import pyotp
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.accounts.models import Role
from hearth.service.accounts.routes import create_router as accounts_router
from hearth.service.accounts.service import AccountsService
from hearth.service.accounts.totp import totp_code
from hearth.service.disclosure.routes import create_router as disclosure_router
from hearth.service.disclosure.service import DisclosureService
from hearth.service.web import create_web_app
from tests.disclosure.conftest import FrozenClock, make_config

from .conftest import BASE, PASSWORD, consumer, hidden, new_client
from .test_totp import make_operator


def app_with_triage(service: AccountsService, sessions: sessionmaker[Session],
                    clock: FrozenClock) -> Any:
    disclosure = DisclosureService(make_config(base_url=BASE), sessions, clock=clock,
                                   team_session=service.security_actor)
    return create_web_app(disclosure_router(disclosure), accounts_router(service), hsts=True)


def test_security_team_signs_in_with_totp_and_reaches_triage(
        service: AccountsService, sessions: sessionmaker[Session], clock: FrozenClock) -> None:
    app = app_with_triage(service, sessions, clock)
    created = make_operator(sessions, totp_now=True, role=Role.SECURITY,
                            email="sec@example.org")
    key = pyotp.parse_uri(created.totp_uri).secret
    c = new_client(app)
    r = c.get("/security/triage", follow_redirects=False)
    assert r.headers["location"] == "/account/sign-in?next=/security/triage"
    assert c.get("/security/triage/login", follow_redirects=False).status_code == 303
    page = c.get(r.headers["location"])
    r = c.post("/account/sign-in", data={"csrf_token": hidden(page.text),
                                         "email": "sec@example.org", "password": PASSWORD,
                                         "next": "/security/triage"}, follow_redirects=False)
    assert r.headers["location"] == "/account/sign-in/totp?next=/security/triage"
    # password alone: still no triage
    assert c.get("/security/triage", follow_redirects=False).status_code == 303
    page = c.get(r.headers["location"])
    r = c.post("/account/sign-in/totp", data={"csrf_token": hidden(page.text),
                                              "code": totp_code(key, clock.t),
                                              "next": hidden(page.text, "next")},
               follow_redirects=False)
    assert r.headers["location"] == "/security/triage"
    triage = c.get("/security/triage")
    assert triage.status_code == 200 and "sec@example.org" in triage.text


def test_consumers_operators_and_pasted_tokens_do_not_reach_triage(
        service: AccountsService, sessions: sessionmaker[Session], clock: FrozenClock) -> None:
    app = app_with_triage(service, sessions, clock)
    alice = consumer(app, "alice@example.org")
    assert alice.get("/security/triage", follow_redirects=False).status_code == 303
    created = make_operator(sessions, totp_now=True)
    ops = TestClient(app, base_url=BASE)
    result = service.sign_in("ops@example.org", PASSWORD, address="10.0.0.1")
    done = service.complete_totp(result.session_id,
                                 totp_code(pyotp.parse_uri(created.totp_uri).secret, clock.t))
    ops.cookies.set("__Host-hearth-session", done.session_id, domain="hearth.example")
    assert ops.get("/operator").status_code == 200
    assert ops.get("/security/triage", follow_redirects=False).status_code == 303
    from hearth.service import auth

    with sessions.begin() as s:
        token = auth.create_token(s, "team")
    anon = TestClient(app, base_url=BASE)
    page = anon.get("/account/sign-in")
    r = anon.post("/security/triage/login", data={"csrf_token": hidden(page.text),
                                                  "token": token}, follow_redirects=False)
    assert r.status_code == 303 and "/account/sign-in" in r.headers["location"]
    assert anon.get("/security/triage", follow_redirects=False).status_code == 303
