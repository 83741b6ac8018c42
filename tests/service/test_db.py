"""Storage: migrations, models/migrations agreement, time zones, SQLite settings."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import ConfigError
from hearth.service import db
from hearth.service.models import ApiToken, all_metadata
from tests.service.conftest import POSTGRESQL_ONLY


def test_upgrade_head_creates_every_table(engine: Engine) -> None:
    tables = set(sa.inspect(engine).get_table_names())
    assert set(all_metadata().tables) <= tables
    assert "alembic_version" in tables
    head = ScriptDirectory.from_config(db.alembic_config()).get_current_head()
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head


def test_models_and_migrations_agree(engine: Engine) -> None:
    """`alembic check`: autogenerate finds nothing to do after `upgrade head`."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, all_metadata())
    assert diff == []


def test_migrate_is_idempotent(engine: Engine) -> None:
    db.migrate(engine)
    db.migrate(engine)


def test_history_is_linear_from_the_initial_revision() -> None:
    scripts = ScriptDirectory.from_config(db.alembic_config())
    assert scripts.get_bases() == ["0001"]
    assert len(scripts.get_heads()) == 1


def test_times_round_trip_as_utc(sf: sessionmaker[Session]) -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    created = dt.datetime(2025, 6, 1, 14, 0, 0, 123456, tzinfo=plus_two)
    with sf.begin() as s:
        s.add(ApiToken(id="a" * 16, name="t", token_hash="0" * 64, permissions=["fleet:read"],
                       created_at=created, revoked_at=None))
    with sf() as s:
        row = s.get(ApiToken, "a" * 16)
        assert row is not None
        assert row.created_at == created
        assert row.created_at.tzinfo == dt.UTC
        assert row.created_at.hour == 12


def test_naive_datetime_is_refused(sf: sessionmaker[Session]) -> None:
    with pytest.raises(sa.exc.StatementError), sf.begin() as s:
        s.add(ApiToken(id="b" * 16, name="t", token_hash="0" * 64, permissions=[],
                       created_at=dt.datetime(2025, 1, 1), revoked_at=None))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite_runs_in_wal_mode_with_busy_timeout(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite_write_transactions_begin_immediate(sf: sessionmaker[Session]) -> None:
    """A write transaction holds the write lock from its first statement: a second writer
    waits for it instead of failing with SQLITE_BUSY after reading a stale snapshot."""
    with sf() as first, first.begin():
        db.begin_write(first)
        first.execute(sa.text("SELECT 1"))
        other = sf.kw["bind"].connect()
        try:
            other.exec_driver_sql("PRAGMA busy_timeout=0")
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                other.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            other.close()


def test_make_engine_refuses_unsupported_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        db.make_engine("mysql://localhost/x")
    with pytest.raises(ConfigError):
        db.make_engine("sqlite://")
    with pytest.raises(ConfigError):
        db.make_engine("not a url")


def test_migrate_reports_unreachable_database() -> None:
    with pytest.raises(ConfigError, match="migration failed"):
        db.migrate("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")


@POSTGRESQL_ONLY
def test_units_pages_leave_room_for_in_place_updates(engine: Engine) -> None:
    """Migration 0401: the ingest's per-batch unit updates can stay on their page."""
    with engine.connect() as conn:
        options = conn.exec_driver_sql(
            "SELECT reloptions FROM pg_class WHERE oid = 'units'::regclass").scalar_one()
    assert "fillfactor=50" in (options or [])


def _insert_unit(conn: sa.Connection, device_id: str, now: dt.datetime) -> None:
    """A unit row as any revision since 0001 holds it (for migration tests)."""
    conn.execute(sa.text(
        "INSERT INTO units (device_id, model, certificate_pem, cert_serial, "
        "mqtt_password_hash, status, imported_at, latest_state) VALUES "
        "(:d, 'thermostat', '-', :d, '{}', 'active', :t, '{}')"), {"d": device_id, "t": now})


def test_telemetry_keyed_by_unit_and_seq_keeps_existing_rows(bare_engine: Engine) -> None:
    """Migration 0402 drops the unused surrogate ``id``: rows stored before it survive,
    (device_id, seq) becomes the primary key, and it can be undone and redone."""
    db.migrate(bare_engine, revision="0401")
    now = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    unit = "ab" * 16
    with bare_engine.begin() as conn:
        _insert_unit(conn, unit, now)
        conn.execute(sa.text(
            "INSERT INTO telemetry (device_id, seq, ts, received_at, readings, digest) "
            "VALUES (:d, 1, :t, :t, '{\"humidity\": 40}', 'x'), "
            "(:d, 2, :t, :t, '{\"humidity\": 41}', 'y')"), {"d": unit, "t": now})

    def shape() -> tuple[list[str], list[str], list[tuple[object, ...]]]:
        inspector = sa.inspect(bare_engine)
        columns = [c["name"] for c in inspector.get_columns("telemetry")]
        key = inspector.get_pk_constraint("telemetry")["constrained_columns"]
        with bare_engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text(
                "SELECT device_id, seq, digest FROM telemetry ORDER BY seq"))]
        return columns, key, rows

    stored = [(unit, 1, "x"), (unit, 2, "y")]
    db.migrate(bare_engine, revision="0402")
    columns, key, rows = shape()
    assert "id" not in columns and key == ["device_id", "seq"] and rows == stored
    with bare_engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text(
            "INSERT INTO telemetry (device_id, seq, ts, received_at, readings, digest) "
            "VALUES (:d, 2, :t, :t, '{}', 'z')"), {"d": unit, "t": now})
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0401")
    columns, key, rows = shape()
    assert "id" in columns and key == ["id"] and rows == stored
    db.migrate(bare_engine, revision="0403")
    assert shape()[1] == ["device_id", "seq"]


def test_telemetry_digest_column_goes_and_comes_back_as_it_was(bare_engine: Engine) -> None:
    """Migration 0404 drops telemetry's digest (the ingest compares content instead); the
    downgrade computes every row's digest again exactly as the ingest before it did."""
    import hashlib
    import json

    db.migrate(bare_engine, revision="0403")
    unit = "cd" * 16
    rows = [  # (seq, ts, readings as the unit sent them)
        (1, dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
         {"temperature": 20, "heater": True}),
        (2, dt.datetime(2026, 11, 26, 9, 30, 0, 125, tzinfo=dt.UTC),
         {"humidity": 45.5, "mode": "é"}),
    ]

    def reference(seq: int, ts: dt.datetime, readings: dict[str, object]) -> str:
        """The digest the ingest stored up to revision 0403 (numbers parsed as floats)."""
        values = {k: float(v) if type(v) is int else v for k, v in readings.items()}
        data = {"v": 1, "device_id": unit, "seq": seq, "readings": values,
                "ts": ts.astimezone(dt.UTC).isoformat()}
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
                                         default=str).encode()).hexdigest()

    expected = [(unit, seq, reference(seq, ts, r)) for seq, ts, r in rows]
    now = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    with bare_engine.begin() as conn:
        _insert_unit(conn, unit, now)
        table = sa.table("telemetry", *(sa.column(c) for c in (
            "device_id", "seq", "ts", "received_at", "digest")),
            sa.column("readings", sa.JSON()))
        conn.execute(sa.insert(table), [
            {"device_id": unit, "seq": seq, "ts": ts.astimezone(dt.UTC), "received_at": now,
             "readings": r, "digest": h} for (seq, ts, r), (_, _, h) in zip(
                rows, expected, strict=True)])

    def digests() -> list[tuple[object, ...]]:
        with bare_engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT device_id, seq, digest FROM telemetry ORDER BY seq"))]

    assert digests() == expected
    db.migrate(bare_engine, revision="0404")
    assert "digest" not in {c["name"] for c in sa.inspect(bare_engine).get_columns("telemetry")}
    with bare_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM telemetry")).scalar_one() == 2
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0403")
    assert digests() == expected
    column = {c["name"]: c for c in sa.inspect(bare_engine).get_columns("telemetry")}["digest"]
    assert column["nullable"] is False
    db.migrate(bare_engine)


def test_telemetry_unit_key_goes_and_comes_back(bare_engine: Engine) -> None:
    """Migration 0405 leaves the telemetry -> units check to the ingest (which locks the
    units of every batch); the downgrade restores the foreign key with its cascade."""

    def telemetry_keys() -> list[tuple[list[str], str, str | None]]:
        return [(fk["constrained_columns"], fk["referred_table"],
                 fk.get("options", {}).get("ondelete"))
                for fk in sa.inspect(bare_engine).get_foreign_keys("telemetry")]

    db.migrate(bare_engine, revision="0404")
    assert telemetry_keys() == [(["device_id"], "units", "CASCADE")]
    db.migrate(bare_engine, revision="0405")
    assert telemetry_keys() == []
    assert [fk["referred_table"] for fk in sa.inspect(bare_engine).get_foreign_keys(
        "events")] == ["units"]
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0404")
    assert telemetry_keys() == [(["device_id"], "units", "CASCADE")]
    db.migrate(bare_engine)


def test_accepted_counts_move_onto_the_units_and_back(bare_engine: Engine) -> None:
    """Migration 0406 counts accepted messages on the unit row; the counts stored before
    move there, the other outcomes stay, and the downgrade moves them back - leaving the
    rows that reference the unit alone (SQLite: no table rebuild, no cascade)."""
    db.migrate(bare_engine, revision="0405")
    unit, other = "ef" * 16, "12" * 16
    now = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    with bare_engine.begin() as conn:
        for d in (unit, other):
            _insert_unit(conn, d, now)
        conn.execute(sa.text(
            'INSERT INTO ingest_counters (device_id, reason, "count") VALUES '
            "(:d, 'accepted', 7), (:d, 'duplicate', 2), ('', 'unknown_device', 3)"),
            {"d": unit})
        conn.execute(sa.text(
            "INSERT INTO events (device_id, seq, ts, received_at, kind, detail, digest) "
            "VALUES (:d, 1, :t, :t, 'boot', '', 'x')"), {"d": unit, "t": now})

    def state() -> tuple[dict[str, int], set[tuple[str, str, int]], int]:
        with bare_engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(bare_engine).get_columns("units")}
            accepted = ({r[0]: r[1] for r in conn.execute(sa.text(
                "SELECT device_id, accepted_count FROM units"))}
                if "accepted_count" in columns else {})
            counters = {tuple(r) for r in conn.execute(sa.text(
                'SELECT device_id, reason, "count" FROM ingest_counters'))}
            events = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        return accepted, counters, events  # type: ignore[return-value]

    before = {(unit, "accepted", 7), (unit, "duplicate", 2), ("", "unknown_device", 3)}
    assert state() == ({}, before, 1)
    db.migrate(bare_engine, revision="0406")
    assert state() == ({unit: 7, other: 0},
                       {(unit, "duplicate", 2), ("", "unknown_device", 3)}, 1)
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0405")
    assert state() == ({}, before, 1)
    db.migrate(bare_engine)


def _pg_telemetry_column(conn: sa.Connection, column: str, fact: str) -> str | None:
    """``information_schema.columns.<fact>`` of a telemetry column on PostgreSQL; None
    on SQLite (which has no such facts to migrate)."""
    if conn.dialect.name != "postgresql":
        return None
    assert fact in ("data_type", "collation_name")
    value: str | None = conn.execute(sa.text(
        f"SELECT {fact} FROM information_schema.columns "  # noqa: S608 - fixed names
        "WHERE table_name = 'telemetry' AND column_name = :c"), {"c": column}).scalar_one()
    return value


def test_telemetry_readings_keep_their_values_across_the_json_change(
        bare_engine: Engine) -> None:
    """Migration 0407 stores telemetry readings as ``json`` on PostgreSQL (``jsonb``
    before): the stored values survive both directions; SQLite keeps its JSON text."""
    db.migrate(bare_engine, revision="0406")
    unit = "ab" * 16
    now = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    readings = {"temperature": 21.5, "humidity": 40.0, "heater": True, "lock": "locked"}
    with bare_engine.begin() as conn:
        _insert_unit(conn, unit, now)
        conn.execute(sa.text(
            "INSERT INTO telemetry (device_id, seq, ts, received_at, readings) "
            "VALUES (:d, 1, :t, :t, :r)").bindparams(sa.bindparam("r", type_=db.JSONType)),
            {"d": unit, "t": now, "r": readings})

    def stored() -> tuple[str, object]:
        with bare_engine.connect() as conn:
            kind = _pg_telemetry_column(conn, "readings", "data_type") or ""
            value = conn.execute(sa.select(sa.column("readings", sa.JSON())).select_from(
                sa.table("telemetry"))).scalar_one()
        return kind, value

    pg = bare_engine.dialect.name == "postgresql"
    assert stored() == ("jsonb" if pg else "", readings)
    db.migrate(bare_engine, revision="0407")
    assert stored() == ("json" if pg else "", readings)
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0406")
    assert stored() == ("jsonb" if pg else "", readings)
    db.migrate(bare_engine)


def test_telemetry_device_ids_compare_in_byte_order_after_0408(bare_engine: Engine) -> None:
    """Migration 0408 gives telemetry.device_id byte order (``COLLATE "C"``) on
    PostgreSQL, where autogenerate does not compare collations; rows and their order
    survive both directions. SQLite compares bytes already: nothing changes there."""
    db.migrate(bare_engine, revision="0407")
    pg = bare_engine.dialect.name == "postgresql"
    now = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    ids = ["0f" * 16, "a0" * 16, "9f" * 16]
    with bare_engine.begin() as conn:
        for i, d in enumerate(ids):
            _insert_unit(conn, d, now)
            conn.execute(sa.text(
                "INSERT INTO telemetry (device_id, seq, ts, received_at, readings) "
                "VALUES (:d, :s, :t, :t, '{}')"), {"d": d, "s": i, "t": now})

    def state() -> tuple[str | None, list[str]]:
        with bare_engine.connect() as conn:
            collation = _pg_telemetry_column(conn, "device_id", "collation_name")
            rows = conn.execute(sa.text(
                "SELECT device_id FROM telemetry ORDER BY device_id")).scalars().all()
        return collation, list(rows)

    assert state() == (None, sorted(ids))
    db.migrate(bare_engine, revision="0408")
    assert state() == ("C" if pg else None, sorted(ids))
    with bare_engine.begin() as conn:
        command.downgrade(db.alembic_config(conn), "0407")
    assert state() == (None, sorted(ids))
    db.migrate(bare_engine)
