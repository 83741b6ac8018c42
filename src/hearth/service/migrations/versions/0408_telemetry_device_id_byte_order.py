"""Telemetry's device id compares in byte order (``COLLATE "C"``) on PostgreSQL.

Both indexes of the telemetry table, the primary key (device_id, seq) and
(device_id, ts), compare device ids on every insert. Under the database's default
collation each comparison of two different ids goes through the locale's collation
(``strcoll`` or ICU) instead of ``memcmp``. A device id is 32 lowercase hex digits, so
byte order is its natural order and nothing else changes. A plain 800-row insert cost
PostgreSQL 0.4-0.6 µs of CPU per row less with ``"C"`` on a ``C.UTF-8`` database, and
1.2-1.4 µs less than under ICU ``en-US`` (``/proc/<backend>/schedstat``; ADR 0004).

Comparisons with other tables' device ids (default collation) take the column's
collation; queries are unchanged. SQLite compares bytes already (BINARY).

On PostgreSQL both directions rewrite the table and its indexes under an exclusive
lock: with a large history, run it in a maintenance window.

Revision ID: 0408
Revises: 0407
Create Date: 2026-11-26

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0408"
down_revision: str | None = "0407"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('ALTER TABLE telemetry ALTER COLUMN device_id TYPE varchar(32) COLLATE "C"')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry ALTER COLUMN device_id TYPE varchar(32) "
                   'COLLATE "default"')
