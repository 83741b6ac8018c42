"""Telemetry rows carry no digest: a redelivery is told from a replay by content.

A telemetry message is its key (device id, seq), its version, ``ts`` and ``readings``;
the ingest now compares the stored ``ts`` and ``readings`` with a message that reuses a
key, which is exact, instead of a SHA-256 of the canonical form computed for every
message and stored in 65 bytes of every row - the hottest table's largest column after
the readings. Events keep their digest (low volume; their text fields are free-form).

The downgrade computes the digests again, exactly as the ingest before this revision
did (SHA-256 of the sorted, compact JSON of the message with ``ts`` in UTC ISO 8601), so
rows stored in between are told apart from replays by the older code too. It reads the
table once, in key order.

Revision ID: 0404
Revises: 0403
Create Date: 2026-11-26

Frozen like every migration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0404"
down_revision: str | None = "0403"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 5000


def upgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_column("digest")


def _digest(device_id: str, seq: int, ts: dt.datetime, readings: dict[str, Any]) -> str:
    if ts.tzinfo is None:  # SQLite keeps UTC wall time
        ts = ts.replace(tzinfo=dt.UTC)
    # the schema parsed every number as a float; a JSON column may return whole numbers
    # as ints
    values = {k: float(v) if type(v) is int else v for k, v in readings.items()}
    canonical = json.dumps(
        {"device_id": device_id, "readings": values, "seq": seq,
         "ts": ts.astimezone(dt.UTC).isoformat(), "v": 1},
        sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def downgrade() -> None:
    op.add_column("telemetry", sa.Column("digest", sa.String(64), nullable=True))
    bind = op.get_bind()
    table = sa.table(
        "telemetry", sa.column("device_id", sa.String()), sa.column("seq", sa.BigInteger()),
        sa.column("ts", sa.DateTime(timezone=True)), sa.column("readings", sa.JSON()),
        sa.column("digest", sa.String()))
    update = (sa.update(table)
              .where(table.c.device_id == sa.bindparam("d"), table.c.seq == sa.bindparam("s"))
              .values(digest=sa.bindparam("h")))
    after: tuple[str, int] | None = None
    while True:
        query = sa.select(table.c.device_id, table.c.seq, table.c.ts, table.c.readings)
        if after is not None:
            query = query.where(sa.tuple_(table.c.device_id, table.c.seq) > after)
        rows = bind.execute(query.order_by(table.c.device_id, table.c.seq)
                            .limit(_CHUNK)).all()
        if not rows:
            break
        bind.execute(update, [{"d": r.device_id, "s": r.seq,
                               "h": _digest(r.device_id, r.seq, r.ts, r.readings)}
                              for r in rows])
        after = (rows[-1].device_id, rows[-1].seq)
    with op.batch_alter_table("telemetry") as batch:
        batch.alter_column("digest", existing_type=sa.String(64), nullable=False)
