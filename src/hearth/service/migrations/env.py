"""Alembic environment: runs on a connection handed in by :func:`hearth.service.db.migrate`.

From the command line (``alembic -c src/hearth/service/migrations/alembic.ini ...``) it
connects to ``HEARTH_DATABASE_URL`` (or the default SQLite file) instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from hearth.service.db import _env_database_url, make_engine
from hearth.service.models import all_metadata

target_metadata = all_metadata()


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_env_database_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them online")
run_migrations_online()
