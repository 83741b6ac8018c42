"""Vulnerability disclosure: reports, their audit trail, attachments, advisories.

Revision ID: 0101
Revises: 0001
Create Date: 2026-11-25

Frozen like every migration: plain SQLAlchemy types, not the application's models. The
audit trail (``disclosure_events``) is append-only in the database too: triggers refuse
UPDATE and DELETE on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0101"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = ("received", "acknowledged", "triaged", "fixing", "fixed", "disclosed", "rejected",
           "duplicate")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    states = ", ".join(f"'{s}'" for s in _STATES)
    op.create_table(
        "disclosure_reports",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("tracking_id", sa.String(32), nullable=False),
        sa.Column("status_token_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("title", sa.String(1000), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.String(1000), nullable=False),
        sa.Column("reporter_name", sa.String(1000), nullable=False),
        sa.Column("reporter_email", sa.String(254), nullable=False),
        sa.Column("wants_credit", sa.Boolean(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.Column("acknowledge_by", _ts(), nullable=False),
        sa.Column("fix_target", _ts(), nullable=False),
        sa.Column("acknowledged_at", _ts(), nullable=True),
        sa.Column("last_public_update_at", _ts(), nullable=False),
        sa.Column("closed_at", _ts(), nullable=True),
        sa.Column("cvss_vector", sa.String(300), nullable=True),
        sa.Column("cvss_version", sa.String(8), nullable=True),
        sa.Column("cvss_score", sa.Double(), nullable=True),
        sa.Column("severity", sa.String(16), nullable=True),
        sa.Column("affected", _json(), nullable=False),
        sa.Column("fixing_release", sa.String(64), nullable=True),
        sa.Column("duplicate_of", sa.String(32), nullable=True),
        sa.Column("advisory_id", sa.String(32), nullable=True),
        sa.CheckConstraint(f"state IN ({states})", name=op.f("ck_disclosure_reports_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_reports")),
        sa.UniqueConstraint("tracking_id", name=op.f("uq_disclosure_reports_tracking_id")),
        sa.UniqueConstraint("status_token_hash",
                            name=op.f("uq_disclosure_reports_status_token_hash")),
    )
    op.create_index(op.f("ix_disclosure_reports_state"), "disclosure_reports", ["state"])
    op.create_index(op.f("ix_disclosure_reports_received_at"), "disclosure_reports",
                    ["received_at"])

    op.create_table(
        "disclosure_events",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("report_id", _big_id(), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("data", _json(), nullable=False),
        sa.ForeignKeyConstraint(["report_id"], ["disclosure_reports.id"], ondelete="RESTRICT",
                                name=op.f("fk_disclosure_events_report_id_disclosure_reports")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_events")),
    )
    op.create_index(op.f("ix_disclosure_events_report_id"), "disclosure_events", ["report_id"])

    op.create_table(
        "disclosure_attachments",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("report_id", _big_id(), nullable=False),
        sa.Column("filename", sa.String(80), nullable=False),
        sa.Column("content_type", sa.String(40), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"], ["disclosure_reports.id"], ondelete="RESTRICT",
            name=op.f("fk_disclosure_attachments_report_id_disclosure_reports")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_attachments")),
    )
    op.create_index(op.f("ix_disclosure_attachments_report_id"), "disclosure_attachments",
                    ["report_id"])

    op.create_table(
        "disclosure_advisories",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("report_id", _big_id(), nullable=True),
        sa.Column("title", sa.String(1000), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("cvss_vector", sa.String(300), nullable=False),
        sa.Column("cvss_version", sa.String(8), nullable=False),
        sa.Column("cvss_score", sa.Double(), nullable=False),
        sa.Column("cve", sa.String(32), nullable=True),
        sa.Column("fixing_release", sa.String(64), nullable=True),
        sa.Column("initial_release_date", _ts(), nullable=False),
        sa.Column("current_release_date", _ts(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"], ["disclosure_reports.id"], ondelete="RESTRICT",
            name=op.f("fk_disclosure_advisories_report_id_disclosure_reports")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_advisories")),
    )
    op.create_index(op.f("ix_disclosure_advisories_initial_release_date"),
                    "disclosure_advisories", ["initial_release_date"])

    op.create_table(
        "disclosure_advisory_products",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("advisory_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("introduced", sa.String(64), nullable=True),
        sa.Column("fixed", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["advisory_id"], ["disclosure_advisories.id"],
                                ondelete="CASCADE", name="fk_disclosure_products_advisory"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_advisory_products")),
    )
    op.create_index(op.f("ix_disclosure_advisory_products_advisory_id"),
                    "disclosure_advisory_products", ["advisory_id"])
    op.create_index(op.f("ix_disclosure_advisory_products_model"),
                    "disclosure_advisory_products", ["model"])

    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION disclosure_events_append_only() RETURNS trigger AS $$ "
            "BEGIN RAISE EXCEPTION 'the disclosure audit trail is append-only'; END; "
            "$$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER disclosure_events_append_only BEFORE UPDATE OR DELETE "
            "ON disclosure_events FOR EACH ROW EXECUTE FUNCTION disclosure_events_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER disclosure_events_no_{verb.lower()} BEFORE {verb} "
                "ON disclosure_events BEGIN "
                "SELECT RAISE(ABORT, 'the disclosure audit trail is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS disclosure_events_append_only ON disclosure_events")
        op.execute("DROP FUNCTION IF EXISTS disclosure_events_append_only()")
    for table in ("disclosure_advisory_products", "disclosure_advisories",
                  "disclosure_attachments", "disclosure_events", "disclosure_reports"):
        op.drop_table(table)
