"""Browser tests: Debian's chromium driven by Playwright against a real uvicorn server.

``live`` starts the disclosure web app on a free port in a thread (SQLite, frozen clock,
``unsafe_allow_http`` because the test server has no TLS); ``page`` is a fresh browser
context per test that fails the test on any JavaScript dialog (an XSS would open one).
Waiting is always Playwright's auto-wait or a deadline poll, never a sleep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from hearth.service import auth, db
from hearth.service.disclosure import models as _models  # noqa: F401 - registers the tables
from hearth.service.disclosure.config import DisclosureConfig
from hearth.service.disclosure.routes import create_router
from hearth.service.disclosure.service import DisclosureService
from hearth.service.web import create_web_app
from tests.disclosure.conftest import FrozenClock
from tests.helpers import free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
    # Never skip: a missing browser is a missing install step (make test installs it).
    pytest.fail("chromium is not installed (apt-get install chromium)", pytrace=False)


@dataclass
class Live:
    base: str
    clock: FrozenClock
    sessions: sessionmaker[Session]
    service: DisclosureService
    team_token: str


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    sessions = db.session_factory(engine)
    with sessions.begin() as s:
        token = auth.create_token(s, "security-team")
    clock = FrozenClock(dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC))
    config = DisclosureConfig.load({
        "organisation": "Example Devices Ltd", "base_url": base,
        "contacts": ["mailto:security@hearth.example"], "unsafe_allow_http": True,
        "secret_key": b"b" * 32, "spam": {"form_min_seconds": 3.0, "pow_difficulty_bits": 4},
    })
    service = DisclosureService(config, sessions, clock=clock)
    app = create_web_app(create_router(service), hsts=False)
    with serve(app, port, probe="/security/policy"):
        yield Live(base, clock, sessions, service, token)
    engine.dispose()


@contextlib.contextmanager
def serve(app: Any, port: int, *, probe: str, timeout: float = 30) -> Iterator[None]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` until the block ends; returns once
    ``probe`` answers 200."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=timeout, what="uvicorn to serve")
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(10_000)
    p = context.new_page()
    dialogs: list[str] = []

    def on_dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    p.on("dialog", on_dialog)
    p.dialogs = dialogs
    yield p
    context.close()
    assert dialogs == [], f"a script ran and opened a dialog: {dialogs}"
