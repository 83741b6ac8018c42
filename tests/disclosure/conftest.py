"""Fixtures for the disclosure tests: a migrated SQLite database, a frozen clock, the
service and its web app behind FastAPI's TestClient, and an operator token."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from hearth.service import auth, db
from hearth.service.disclosure import models as _models  # noqa: F401 - registers the tables
from hearth.service.disclosure.config import DisclosureConfig
from hearth.service.disclosure.routes import create_router
from hearth.service.disclosure.service import DisclosureService
from hearth.service.web import create_web_app

BASE = "https://hearth.example"
MONDAY_9AM = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


class FrozenClock:
    """A clock that only moves when the test says so."""

    def __init__(self, start: dt.datetime) -> None:
        self.t = start

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, **kwargs: float) -> None:
        self.t += dt.timedelta(**kwargs)


def make_config(**overrides: Any) -> DisclosureConfig:
    data: dict[str, Any] = {
        "organisation": "Example Devices Ltd",
        "base_url": BASE,
        "contacts": ["mailto:security@hearth.example"],
        "encryption": ["https://hearth.example/security/pgp-key.txt"],
        "acknowledgments_url": "https://hearth.example/security/thanks",
        "preferred_languages": ["en", "de"],
        "secret_key": b"k" * 32,
        "spam": {"pow_difficulty_bits": 6, "form_min_seconds": 3.0},
    }
    data.update(overrides)
    return DisclosureConfig.load(data)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(MONDAY_9AM)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return db.session_factory(engine)


@pytest.fixture
def config() -> DisclosureConfig:
    return make_config()


@pytest.fixture
def service(config: DisclosureConfig, sessions: sessionmaker[Session],
            clock: FrozenClock) -> DisclosureService:
    return DisclosureService(config, sessions, clock=clock)


@pytest.fixture
def client(service: DisclosureService) -> Iterator[TestClient]:
    app = create_web_app(create_router(service), hsts=True)
    with TestClient(app, base_url=BASE) as c:
        yield c


@pytest.fixture
def team_token(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as s:
        return auth.create_token(s, "security-team")


def hidden(html: str, name: str) -> str:
    m = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert m, f"no hidden field {name}"
    return m.group(1)


VALID = {
    "title": "Lock accepts replayed unlock commands",
    "description": "Capture an unlock command over the air and replay it: the bolt opens.",
    "model": "lock",
    "version": "1.2.0",
    "reporter_name": "Ada Researcher",
    "reporter_email": "ada@example.org",
}


def file_via_form(client: TestClient, clock: FrozenClock, fields: dict[str, Any] | None = None,
                  files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
                  *, wait: float = 5.0, follow: bool = False) -> Any:
    """GET the form, wait like a person, POST it. Returns the response."""
    page = client.get("/security/report")
    assert page.status_code == 200
    data = {"csrf_token": hidden(page.text, "csrf_token"),
            "form_stamp": hidden(page.text, "form_stamp"), "website": "",
            **(VALID if fields is None else fields)}
    clock.advance(seconds=wait)
    return client.post("/security/report", data=data, files=files or [],
                       follow_redirects=follow)


def status_token_from(response: Any) -> str:
    loc = response.headers["location"]
    m = re.match(r"^/security/status/([A-Za-z0-9_-]{43})\?new=1$", loc)
    assert m, loc
    return m.group(1)


def team_login(client: TestClient, token: str) -> None:
    page = client.get("/security/triage/login")
    r = client.post("/security/triage/login", data={
        "csrf_token": hidden(page.text, "csrf_token"), "token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
