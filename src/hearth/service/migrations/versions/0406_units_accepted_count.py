"""Accepted messages are counted on the unit row, not in ``ingest_counters``.

The ingest updates every unit of a batch once anyway (last seen time, latest state).
Counting the unit's accepted messages in that same row update removes the counters
upsert of one row per unit and batch, which, when a batch holds one message per unit
(a real fleet: many units, each reporting now and then), was one more row write per
message: about 10 µs of CPU per message, client and server together, in-process with
5,000 units on PostgreSQL. ``ingest_counters`` keeps every other outcome (duplicates and
each refusal reason); ``hearth.service.ingest.counts`` reads both.

The upgrade moves the existing accepted counts onto the units; the downgrade moves them
back.

Revision ID: 0406
Revises: 0405
Create Date: 2026-11-26

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0406"
down_revision: str | None = "0405"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("units", sa.Column("accepted_count", sa.BigInteger(), nullable=False,
                                     server_default=sa.text("0")))
    op.execute(
        'UPDATE units SET accepted_count = (SELECT c."count" FROM ingest_counters AS c '
        "WHERE c.device_id = units.device_id AND c.reason = 'accepted') "
        "WHERE EXISTS (SELECT 1 FROM ingest_counters AS c "
        "WHERE c.device_id = units.device_id AND c.reason = 'accepted')")
    op.execute("DELETE FROM ingest_counters WHERE reason = 'accepted' "
               "AND device_id IN (SELECT device_id FROM units)")


def downgrade() -> None:
    op.execute(
        'INSERT INTO ingest_counters (device_id, reason, "count") '
        "SELECT device_id, 'accepted', accepted_count FROM units WHERE accepted_count > 0")
    # in place (SQLite >= 3.35 too): rebuilding ``units`` would drop the table its
    # children reference, and with foreign keys on that cascades
    op.execute("ALTER TABLE units DROP COLUMN accepted_count")
