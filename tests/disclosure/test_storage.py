"""Storage on both back ends: the migration matches the models, the audit trail is
append-only in the database itself, and the reporter/triage/advisory path works.

PostgreSQL runs when ``HEARTH_TEST_DATABASE_URL`` is set (each test in its own schema)."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine, make_url

from hearth.service import db
from hearth.service.disclosure import reports as rep
from hearth.service.disclosure import triage as tri
from hearth.service.disclosure.advisories import advisories_for_model, publish_advisory
from hearth.service.disclosure.intake import ReportSubmission
from hearth.service.disclosure.models import Report
from hearth.service.disclosure.service import DisclosureService
from hearth.service.models import Base

from .conftest import MONDAY_9AM, make_config

PG_URL = os.environ.get("HEARTH_TEST_DATABASE_URL", "")


@pytest.fixture(params=[
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_URL, reason="HEARTH_TEST_DATABASE_URL is not set")]),
])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'h.db'}")
        db.migrate(engine)
        yield engine
        engine.dispose()
        return
    schema = f"hearth_d_{secrets.token_hex(6)}"
    admin = sa.create_engine(make_url(PG_URL).set(drivername="postgresql+psycopg"))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = db.make_engine(make_url(PG_URL).update_query_dict(
        {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False))
    try:
        db.migrate(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_migration_matches_the_models(any_engine: Engine) -> None:
    with any_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(ctx, Base.metadata) if "disclosure" in str(d)]
    assert diff == []


def test_audit_trail_is_append_only_in_the_database(any_engine: Engine) -> None:
    sessions = db.session_factory(any_engine)
    service = DisclosureService(make_config(), sessions, clock=lambda: MONDAY_9AM)
    with sessions.begin() as s:
        rep.submit_report(s, ReportSubmission(
            title="A title", description="d" * 30, model="lock", version="", reporter_name="",
            reporter_email="", wants_credit=False), now=MONDAY_9AM, calendar=service.calendar,
            acknowledge_within_working_days=5, fix_target_days=90)
    for sql in ("UPDATE disclosure_events SET body = 'x'", "DELETE FROM disclosure_events"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), any_engine.begin() as c:
            c.execute(sa.text(sql))
    with any_engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM disclosure_events")).scalar() == 1


def test_report_to_advisory(any_engine: Engine) -> None:
    sessions = db.session_factory(any_engine)
    config = make_config()
    service = DisclosureService(config, sessions, clock=lambda: MONDAY_9AM)
    now = MONDAY_9AM
    with sessions.begin() as s:
        report, token = rep.submit_report(s, ReportSubmission(
            title="Thermostat relay", description="d" * 30, model="thermostat", version="2.0",
            reporter_name="Grace", reporter_email="g@example.org", wants_credit=True),
            now=now, calendar=service.calendar, acknowledge_within_working_days=5,
            fix_target_days=90)
        for state in ("acknowledged",):
            tri.transition(s, report, state, actor="team:t", now=now)
        tri.assess(s, report, actor="team:t", now=now, models=service.models,
                   cvss_vector="CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
                   affected=[{"model": "thermostat", "introduced": "2.0", "fixed": "2.3"}],
                   fixing_release="2.3")
        for state in ("triaged", "fixing", "fixed"):
            tri.transition(s, report, state, actor="team:t", now=now)
        adv = publish_advisory(s, report, config=config, models=service.models,
                               now=now + dt.timedelta(days=10), actor="team:t",
                               title="Relay stuck on", summary="A remote attacker could ...!")
    with sessions() as s:
        assert rep.report_for_token(s, token).state == "disclosed"
        assert [a.id for a in advisories_for_model(s, "thermostat", "2.2.9")] == [adv.id]
        assert advisories_for_model(s, "thermostat", "2.3") == []
        assert s.scalar(sa.select(sa.func.count()).select_from(Report)) == 1
