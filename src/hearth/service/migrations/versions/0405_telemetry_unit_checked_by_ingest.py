"""Telemetry's unit is checked by the ingest under a row lock, not by a foreign key.

PostgreSQL checks a foreign key with a trigger that runs one query per inserted row,
taking a share lock on the referenced unit. The ingest's write transaction has already
locked every unit of its batch ``FOR UPDATE`` (it must: a revocation has to be honoured
at once), and it stores telemetry only for units it found there and found active - a
stronger check than the key's, made once per unit and batch. The key's per-row check
cost 5-8 µs of server CPU per message (`bench/ingest.py`; about a quarter of the
server's cost per message), to prove again what the transaction had established.

The ingest is the only writer of ``telemetry``, and units are never deleted (revocation
keeps the row: history, audit and certificate serials stay). Events, commands and the
quarantine keep their foreign keys: they are not on the per-message path.

The downgrade restores the key; it fails, naming the constraint, if rows without a unit
exist (which would be a bug to investigate, not something to delete quietly).

Revision ID: 0405
Revises: 0404
Create Date: 2026-11-26

Frozen like every migration.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0405"
down_revision: str | None = "0404"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FK = "fk_telemetry_device_id_units"


def upgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_constraint(_FK, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.create_foreign_key(_FK, "units", ["device_id"], ["device_id"],
                                 ondelete="CASCADE")
