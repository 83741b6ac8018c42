"""Database engine, sessions, column types and migrations.

One code path for both back ends:

* **SQLite** (the embedded default): WAL journal so readers never block the writer, a busy
  timeout so a second writer waits instead of failing, foreign keys on. pysqlite's own
  transaction handling is switched off and Hearth issues ``BEGIN`` itself, so a transaction
  that will write can start with ``BEGIN IMMEDIATE`` (:func:`begin_write`): a read-then-write
  transaction in WAL mode would otherwise fail with ``SQLITE_BUSY`` instead of waiting when
  another writer committed in between.
* **PostgreSQL** via psycopg 3 (``postgresql+psycopg://``), for several service and ingest
  processes.

Times are stored timezone-aware and always come back as UTC (:class:`UTCDateTime`; SQLite
has no time-zone type, so the decorator restores it). Naive datetimes are refused on the
way in: a naive time is a bug, not an input to guess about.

The schema is owned by Alembic migrations shipped inside the package
(``hearth/service/migrations``); :func:`migrate` runs ``upgrade head`` without an
``alembic.ini``.

Example::

    engine = make_engine(settings.database_url)
    migrate(engine)
    Session = session_factory(engine)
    with Session.begin() as session:
        begin_write(session)
        ...
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import ConfigError, HearthError

__all__ = [
    "JSONType",
    "StorageError",
    "UTCDateTime",
    "begin_write",
    "is_postgresql",
    "is_transient",
    "make_engine",
    "migrate",
    "session_factory",
    "utcnow",
    "write_transaction",
]

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for another writer before giving up."""
_WRITE_OPTION = "hearth_write"
MIGRATIONS = "hearth.service:migrations"


class StorageError(HearthError):
    """The database could not be reached or refused a write (``__cause__`` has the details).

    ``transient`` tells whether retrying the same work later can succeed (lost connection,
    lock timeout) or not (the data itself was refused).
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def is_transient(error: BaseException) -> bool:
    """Whether a database error is worth retrying as it is (connection or lock trouble)."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(
        error, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError
        | sa.exc.DisconnectionError
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timezone-aware timestamp that always round-trips as UTC.

    Raises ``ValueError`` when given a naive datetime.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime refused: Hearth stores UTC-aware times only")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)  # stored as UTC wall time, restored below
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):  # pragma: no cover - driver contract
            raise TypeError(f"expected datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
"""JSON everywhere; JSONB on PostgreSQL."""


def is_postgresql(bind: Engine | sa.Connection | Session) -> bool:
    if isinstance(bind, Session):
        return bind.get_bind().dialect.name == "postgresql"
    return bind.dialect.name == "postgresql"


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    Raises :class:`ConfigError` for an unsupported URL. For SQLite the database file's
    directory is created (mode 0700) if missing.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as e:
        raise ConfigError(f"not a database URL: {e}") from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError("SQLite needs a file path (an in-memory database loses data)")
        path = Path(parsed.database)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        engine = sa.create_engine(
            parsed,
            echo=echo,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername != "postgresql+psycopg":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed, echo=echo, pool_pre_ping=True)
    raise ConfigError(f"unsupported database {parsed.get_backend_name()!r}")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # Hearth emits BEGIN itself (see module doc)
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def begin_write(session: Session) -> None:
    """Mark the session's transaction as one that will write; call it first.

    On SQLite this starts the transaction with ``BEGIN IMMEDIATE`` (takes the write lock up
    front, waiting up to the busy timeout); on PostgreSQL it is a no-op. Called later in
    a transaction it has no effect (SQLAlchemy warns).
    """
    session.connection(execution_options={_WRITE_OPTION: True})


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[sa.Connection]:
    """A Core connection in a transaction that will write, as :func:`begin_write` marks
    a session's (``BEGIN IMMEDIATE`` on SQLite): committed when the block ends, rolled
    back if it raises. For hot paths that need no ORM session (an ORM session and its
    transaction cost about as much client CPU again as a short statement)."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})  # in place (SQLAlchemy 2)
        with conn.begin():
            yield conn


# --- migrations ---------------------------------------------------------------------------


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config pointing at the migrations inside the package.

    With ``connection`` the migration environment runs on that connection (tests use it to
    migrate a private PostgreSQL schema).
    """
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(target: str | Engine, *, revision: str = "head") -> None:
    """Upgrade the database at ``target`` (URL or engine) to ``revision`` (default head).

    Safe to run on every start: Alembic records the applied revision and does nothing when
    the schema is current. Raises :class:`ConfigError` if the database cannot be reached or
    migrated.
    """
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
    except SQLAlchemyError as e:
        raise ConfigError(f"database migration failed: {type(e).__name__}") from e
    finally:
        if isinstance(target, str):
            engine.dispose()


def _env_database_url() -> str:  # used by migrations/env.py when run from the alembic CLI
    from hearth.service.config import Settings

    return Settings.from_env(os.environ).database_url
