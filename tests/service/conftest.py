"""Fixtures for the service tests: a migrated database per test, minted units, a core.

Storage fixtures run on SQLite and, when ``HEARTH_TEST_DATABASE_URL`` is set (for example
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), also on PostgreSQL. Each
PostgreSQL test gets its own schema (``search_path``), created and dropped around it, so
tests can run in parallel (``pytest -n``) against one database.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from hearth.factory import load_manifest, mint
from hearth.pki import MakerPKI
from hearth.service import db, fleet
from hearth.service.broker import Broker, units_from_manifest
from tests.helpers import free_port

PG_URL = os.environ.get("HEARTH_TEST_DATABASE_URL", "")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(not PG_URL, reason="HEARTH_TEST_DATABASE_URL is not set"),
        ],
    ),
]


@dataclass(frozen=True)
class Fleet:
    """Units minted once per test session; each test imports them into its own database."""

    manifest: dict[str, Any]
    thermostats: list[str]
    locks: list[str]
    directory: Path

    def copy_manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self.manifest)


@pytest.fixture(scope="session")
def minted(session_pki: MakerPKI, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    out = tmp_path_factory.mktemp("fleet")
    thermostats = [u.device_id for u in mint(session_pki, model="thermostat", count=3, out=out,
                                             labels=False)]
    locks = [u.device_id for u in mint(session_pki, model="lock", count=2, out=out,
                                       labels=False)]
    return Fleet(load_manifest(out), thermostats, locks, out)


def _pg_engine(schema: str) -> Engine:
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return db.make_engine(url.render_as_string(hide_password=False))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bare_engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (not migrated) on ``backend``."""
    if backend == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
        yield engine
        engine.dispose()
        return
    schema = f"hearth_t_{secrets.token_hex(6)}"
    admin = sa.create_engine(make_url(PG_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = _pg_engine(schema)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


POSTGRESQL_ONLY = pytest.mark.parametrize(
    "backend", [p for p in BACKENDS if p.id == "postgresql"], indirect=True)
"""For a test of PostgreSQL behaviour (row locks, statement timeouts, COPY, schemas)."""


def refuse_telemetry_seq(engine: Engine, seq: int) -> None:
    """Make the database itself refuse any telemetry row with ``seq`` (a constraint
    violation, whatever statement inserts it: INSERT or COPY), as a poison message would
    be refused: a data error, not an outage."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text(f"ALTER TABLE telemetry ADD CONSTRAINT test_poison "
                                 f"CHECK (seq <> {int(seq)}) NOT VALID"))
        else:
            conn.execute(sa.text(f"CREATE TRIGGER test_poison BEFORE INSERT ON telemetry "
                                 f"WHEN NEW.seq = {int(seq)} "
                                 "BEGIN SELECT RAISE(ABORT, 'poison'); END"))


@pytest.fixture
def engine(bare_engine: Engine) -> Engine:
    db.migrate(bare_engine)
    return bare_engine


@pytest.fixture
def sf(engine: Engine) -> sessionmaker[Session]:
    return db.session_factory(engine)


@pytest.fixture
def imported(sf: sessionmaker[Session], minted: Fleet, session_pki: MakerPKI) -> Fleet:
    """The minted fleet, imported into this test's database."""
    with sf.begin() as session:
        fleet.import_manifest(session, minted.copy_manifest(),
                              device_ca_cert=session_pki.device_ca.cert)
    return minted


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def broker(session_pki: MakerPKI, minted: Fleet, tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto (supervised by :class:`Broker`) knowing the minted units, on a free
    port in this test's directory."""
    b = Broker(tmp_path / "broker", session_pki, port=free_port(),
               units=units_from_manifest(minted.manifest))
    b.start()
    try:
        yield b
    finally:
        b.stop()
