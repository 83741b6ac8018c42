"""Operators and the security team must use TOTP at every sign-in; the first operator comes
from ``hearth admin create`` (no default account); TOTP secrets are encrypted at rest."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.accounts.admin import create_admin
from hearth.service.accounts.models import Account, Role
from hearth.service.accounts.service import AccountsService, SignInFailed
from hearth.service.accounts.totp import totp_code
from hearth.service.db import begin_write
from tests.disclosure.conftest import FrozenClock

from .conftest import BASE, PASSWORD, SECRET, hidden, new_client, sign_in

OPERATOR = "ops@example.org"


def make_operator(sessions: sessionmaker[Session], *, totp_now: bool = False,
                  role: Role = Role.OPERATOR, email: str = OPERATOR) -> Any:
    with sessions.begin() as s:
        begin_write(s)
        return create_admin(s, email=email, role=role, password=PASSWORD,
                            secret_key=SECRET, totp_now=totp_now)


def enrol(client: TestClient, clock: FrozenClock) -> str:
    page = client.get("/account/totp/enrol")
    assert page.status_code == 200
    secret = re.search(r'id="totp-secret">([A-Z2-7 ]+)<', page.text)
    assert secret
    key = secret.group(1).replace(" ", "")
    r = client.post("/account/totp/enrol", data={"csrf_token": hidden(page.text),
                                                 "code": totp_code(key, clock.t)},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/operator", r.text
    return key


def test_no_totp_means_no_operator_session(app: Any, sessions: sessionmaker[Session],
                                           clock: FrozenClock) -> None:
    make_operator(sessions)
    c = new_client(app)
    r = sign_in(c, OPERATOR)
    assert r.status_code == 303 and r.headers["location"] == "/account/totp/enrol"
    # the password alone opens nothing: every page sends the operator to enrol first
    for url in ("/operator", "/units", "/account"):
        r = c.get(url, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/account/totp/enrol", url
    api = c.post("/api/v1/account/sessions", json={"email": OPERATOR, "password": PASSWORD})
    assert api.status_code == 403 and api.json()["error"] == "totp_enrolment_required"
    key = enrol(c, clock)
    assert c.get("/operator").status_code == 200
    # next sign-in: password, then the code - again
    clock.advance(minutes=1)
    d = new_client(app, "10.0.0.5")
    r = sign_in(d, OPERATOR)
    assert r.headers["location"] == "/account/sign-in/totp"
    assert d.get("/operator", follow_redirects=False).headers["location"] == (
        "/account/sign-in/totp")
    api = d.post("/api/v1/account/sessions", json={"email": OPERATOR, "password": PASSWORD})
    assert api.status_code == 401 and api.json()["error"] == "totp_required"
    page = d.get("/account/sign-in/totp")
    bad = d.post("/account/sign-in/totp", data={"csrf_token": hidden(page.text),
                                                "code": "000000"})
    assert bad.status_code == 401
    pending = d.cookies.get("__Host-hearth-session")
    good = d.post("/account/sign-in/totp", data={"csrf_token": hidden(page.text),
                                                 "code": totp_code(key, clock.t)},
                  follow_redirects=False)
    assert good.status_code == 303
    assert d.cookies.get("__Host-hearth-session") != pending  # rotated again
    assert d.get("/operator").status_code == 200


def test_a_totp_code_works_once(service: AccountsService, sessions: sessionmaker[Session],
                                clock: FrozenClock, app: Any) -> None:
    created = make_operator(sessions, totp_now=True)
    key = pyotp.parse_uri(created.totp_uri).secret
    code = totp_code(key, clock.t)
    c = new_client(app)
    token = c.post("/api/v1/account/sessions", json={"email": OPERATOR, "password": PASSWORD,
                                                      "totp": code})
    assert token.status_code == 201
    replay = c.post("/api/v1/account/sessions", json={"email": OPERATOR, "password": PASSWORD,
                                                       "totp": code})
    assert replay.status_code == 401 and replay.json()["error"] == "sign_in_failed"


def test_consumers_cannot_open_operator_pages(app: Any) -> None:
    from .conftest import consumer

    c = consumer(app, "alice@example.org")
    r = c.get("/operator")
    assert r.status_code == 403


def test_totp_guessing_is_throttled(service: AccountsService, sessions: sessionmaker[Session],
                                    clock: FrozenClock) -> None:
    make_operator(sessions, totp_now=True)
    result = service.sign_in(OPERATOR, PASSWORD, address="10.0.0.1")
    from hearth.service.accounts.throttle import Throttled

    outcomes = []
    for _ in range(8):
        try:
            service.complete_totp(result.session_id, "123456")
        except Throttled:
            outcomes.append("throttled")
        except SignInFailed:
            outcomes.append("wrong")
    assert outcomes[:5] == ["wrong"] * 5 and "throttled" in outcomes


def test_totp_secrets_are_encrypted_at_rest(sessions: sessionmaker[Session]) -> None:
    created = make_operator(sessions, totp_now=True)
    key = pyotp.parse_uri(created.totp_uri).secret
    with sessions() as s:
        row = s.scalar(sa.select(Account).where(Account.email == OPERATOR))
        assert row is not None and row.totp_secret_enc is not None
        assert key not in row.totp_secret_enc and row.totp_secret_enc.startswith("v1.")
        dump = str(list(s.execute(sa.text("SELECT * FROM accounts"))))
    assert key not in dump and PASSWORD not in dump


def test_there_is_no_default_account(tmp_path: Path) -> None:
    from hearth.service import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    db.migrate(engine)
    with db.session_factory(engine)() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Account)) == 0
    engine.dispose()


def test_hearth_admin_create_prints_a_generated_password_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hearth.cli import main
    from hearth.service import db

    data = tmp_path / "data"
    assert main(["admin", "create", "--email", "first@example.org", "--data-dir",
                 str(data)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and len(out[0]) == 24  # the generated password, once
    password = out[0]
    engine = db.make_engine(f"sqlite:///{data / 'hearth.db'}")
    with db.session_factory(engine)() as s:
        row = s.scalar(sa.select(Account))
        assert row is not None and row.role == "operator" and row.totp_enrolled_at is None
        assert password not in row.password_hash and row.password_hash.startswith("$argon2id$")
    engine.dispose()
    # again with the same address: refused; a weak password from a file: refused
    assert main(["admin", "create", "--email", "first@example.org", "--data-dir",
                 str(data)]) == 2
    weak = tmp_path / "pw"
    weak.write_text("password\n")
    assert main(["admin", "create", "--email", "second@example.org", "--password-file",
                 str(weak), "--data-dir", str(data)]) == 2
    strong = tmp_path / "pw2"
    strong.write_text("a long and unusual passphrase for ops\n")
    assert main(["admin", "create", "--email", "sec@example.org", "--role", "security",
                 "--password-file", str(strong), "--totp-now", "--data-dir", str(data)]) == 0
    uri = capsys.readouterr().out.strip()
    assert uri.startswith("otpauth://totp/") and "secret=" in uri


def test_admin_accounts_need_totp_even_when_created_with_it(
        app: Any, sessions: sessionmaker[Session], clock: FrozenClock) -> None:
    created = make_operator(sessions, totp_now=True, role=Role.SECURITY,
                            email="sec@example.org")
    key = pyotp.parse_uri(created.totp_uri).secret
    c = TestClient(app, base_url=BASE)
    r = sign_in(c, "sec@example.org")
    assert r.headers["location"] == "/account/sign-in/totp"
    clock.advance(seconds=dt.timedelta(minutes=2).total_seconds())
    page = c.get("/account/sign-in/totp")
    ok = c.post("/account/sign-in/totp", data={"csrf_token": hidden(page.text),
                                               "code": totp_code(key, clock.t)},
                follow_redirects=False)
    assert ok.status_code == 303
    assert c.get("/account", follow_redirects=False).status_code == 200


def test_a_stolen_active_session_cannot_add_a_second_factor(app: Any) -> None:
    from .conftest import consumer

    c = consumer(app, "alice@example.org")
    assert c.get("/account/totp/enrol", follow_redirects=False).status_code == 303
    assert c.get("/account/totp/enrol.svg").status_code == 404
    r = c.post("/account/totp/enrol", data={"csrf_token": hidden(c.get("/units").text),
                                            "code": "123456"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/account/sign-in"
