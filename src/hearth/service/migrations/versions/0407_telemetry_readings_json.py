"""Telemetry readings are stored as ``json`` on PostgreSQL, not ``jsonb``.

Nothing queries inside a telemetry row's readings: the API returns them whole, and the
ingest compares a message that reuses a (unit, seq) key with the stored readings in
Python (revision 0404). ``jsonb`` parses every value into its binary form on the way in
and prints it again on the way out; ``json`` only checks the text and keeps it. The
telemetry insert is the ingest's largest server cost, and ``jsonb`` input was about
1.6 µs of PostgreSQL CPU per row of it (an 800-row insert of four readings each,
``/proc/<backend>/schedstat``; see ADR 0004). The units' latest state stays ``jsonb``:
the ingest merges it with ``||``.

The ingest writes the readings as compact JSON of values it has validated, so the text
holds no duplicate keys and nothing that ``jsonb`` would have normalised away.

SQLite: nothing changes (JSON is text there either way).

On PostgreSQL both directions rewrite the table under an exclusive lock (a type change):
with a large history, run it in a maintenance window.

Revision ID: 0407
Revises: 0406
Create Date: 2026-11-26

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0407"
down_revision: str | None = "0406"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry ALTER COLUMN readings TYPE json USING readings::json")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE telemetry ALTER COLUMN readings TYPE jsonb "
                   "USING readings::jsonb")
