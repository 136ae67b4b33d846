"""the operator console: delivery attempts, the audit log, reconcile runs, the viewer scope

Revision ID: c0a51e7d2b19
Revises: 3c7e9a1d5b20
Create Date: 2026-12-06 05:30:00

`delivery_attempts` keeps every step of an outbox row's history (attempts, rescues, replays,
re-queues) across replays; `audit_log` records every operator change; `reconcile_runs` the
reconciles started from the console. Tokens may have the read-only `viewer` scope.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "c0a51e7d2b19"
down_revision: str | None = "3c7e9a1d5b20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIME = sa.DateTime(timezone=True)
DECISIONS = (
    "decision IN ('delivered', 'retry', 'failed', 'released', 'rescued', 'replayed', 'requeued')"
)


def upgrade() -> None:
    op.create_table(
        "delivery_attempts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", BIG_ID, nullable=False),
        sa.Column("attempted_at", TIME, nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("claim_token", sa.String(length=128), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("polar_status", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("replay_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(DECISIONS, name=op.f("ck_delivery_attempts_decision_known")),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["outbox_events.id"],
            name=op.f("fk_delivery_attempts_event_id_outbox_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index(
        "ix_delivery_attempts_event_id_id", "delivery_attempts", ["event_id", "id"], unique=False
    )
    op.create_index(
        "ix_delivery_attempts_throttled",
        "delivery_attempts",
        ["attempted_at"],
        unique=False,
        postgresql_where=sa.text("polar_status = 429"),
        sqlite_where=sa.text("polar_status = 429"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_table(
        "reconcile_runs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=True),
        sa.Column("since", TIME, nullable=True),
        sa.Column("until", TIME, nullable=True),
        sa.Column("fix", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Text(), nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("finished_at", TIME, nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'done', 'failed')", name=op.f("ck_reconcile_runs_status_known")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_runs")),
    )
    op.create_index(
        "ix_outbox_events_undelivered_id",
        "outbox_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'inflight')"),
        sqlite_where=sa.text("status IN ('pending', 'inflight')"),
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_constraint(op.f("ck_api_tokens_scope_known"), type_="check")
        batch.create_check_constraint("scope_known", "scope IN ('usage', 'admin', 'viewer')")


def downgrade() -> None:
    op.execute("DELETE FROM api_tokens WHERE scope = 'viewer'")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_constraint(op.f("ck_api_tokens_scope_known"), type_="check")
        batch.create_check_constraint("scope_known", "scope IN ('usage', 'admin')")
    op.drop_index("ix_outbox_events_undelivered_id", table_name="outbox_events")
    op.drop_table("reconcile_runs")
    op.drop_table("audit_log")
    op.drop_index("ix_delivery_attempts_throttled", table_name="delivery_attempts")
    op.drop_index("ix_delivery_attempts_event_id_id", table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
