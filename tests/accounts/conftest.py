"""Fixtures for the accounts tests: minted units with their setup codes, a migrated SQLite
database with them imported, a frozen clock, the accounts service (commands go to an
in-memory publisher) and its web app behind FastAPI's TestClient."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from hearth.factory import load_manifest, mint
from hearth.pki import MakerPKI
from hearth.service import db, fleet
from hearth.service.accounts.config import AccountsConfig
from hearth.service.accounts.routes import create_router
from hearth.service.accounts.service import AccountsService
from hearth.service.commands import CommandService, InMemoryCommandPublisher
from hearth.service.web import create_web_app
from tests.disclosure.conftest import FrozenClock

BASE = "https://hearth.example"
START = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
SECRET = b"s" * 32
PASSWORD = "correct horse battery staple"  # pragma: allowlist secret


@dataclass(frozen=True)
class Minted:
    directory: Path
    codes: dict[str, str]
    """device id -> setup code (from the factory's print manifest)."""
    thermostats: list[str]
    locks: list[str]
    units: dict[str, Path]


@pytest.fixture(scope="session")
def minted(session_pki: MakerPKI, tmp_path_factory: pytest.TempPathFactory) -> Minted:
    out = tmp_path_factory.mktemp("units")
    t = mint(session_pki, model="thermostat", count=3, out=out, labels=True)
    lk = mint(session_pki, model="lock", count=1, out=out, labels=False)
    with (out / "labels" / "print-manifest.csv").open() as f:
        codes = {row["device_id"]: row["setup_code"] for row in csv.DictReader(f)}
    return Minted(out, codes, [u.device_id for u in t], [u.device_id for u in lk],
                  {u.device_id: u.directory for u in (*t, *lk)})


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture
def engine(tmp_path: Path, minted: Minted, session_pki: MakerPKI) -> Iterator[Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    with db.session_factory(engine).begin() as s:
        fleet.import_manifest(s, load_manifest(minted.directory),
                              device_ca_cert=session_pki.device_ca.cert)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.session_factory(engine)


@pytest.fixture
def publisher() -> InMemoryCommandPublisher:
    return InMemoryCommandPublisher()


def make_config(**over: Any) -> AccountsConfig:
    return AccountsConfig(base_url=BASE, secret_key=SECRET, **over)


@pytest.fixture
def service(sessions: sessionmaker[Session], clock: FrozenClock,
            publisher: InMemoryCommandPublisher) -> AccountsService:
    return AccountsService(make_config(), sessions, commands=CommandService(publisher),
                           clock=clock)


@pytest.fixture
def app(service: AccountsService) -> Any:
    return create_web_app(create_router(service), hsts=True)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, base_url=BASE) as c:
        yield c


def new_client(app: Any, address: str = "testclient") -> TestClient:
    return TestClient(app, base_url=BASE, client=(address, 50000))


def hidden(html: str, name: str = "csrf_token") -> str:
    m = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert m, f"no hidden field {name}"
    return m.group(1)


def csrf(client: TestClient, page: str = "/account/sign-in") -> str:
    r = client.get(page)
    return hidden(r.text)


def sign_up(client: TestClient, email: str, password: str = PASSWORD) -> Any:
    token = csrf(client, "/account/sign-up")
    r = client.post("/account/sign-up", data={"csrf_token": token, "email": email,
                                              "password": password}, follow_redirects=False)
    return r


def sign_in(client: TestClient, email: str, password: str = PASSWORD) -> Any:
    token = csrf(client)
    return client.post("/account/sign-in", data={"csrf_token": token, "email": email,
                                                 "password": password},
                       follow_redirects=False)


def api_token(client: TestClient, email: str, password: str = PASSWORD,
              totp: str | None = None) -> str:
    body: dict[str, Any] = {"email": email, "password": password}
    if totp is not None:
        body["totp"] = totp
    r = client.post("/api/v1/account/sessions", json=body)
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def consumer(app: Any, email: str, address: str = "testclient") -> TestClient:
    """A signed-in consumer (web session)."""
    c = new_client(app, address)
    r = sign_up(c, email)
    assert r.status_code == 303, r.text
    return c
