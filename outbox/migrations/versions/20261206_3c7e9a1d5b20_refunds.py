"""refunds: a cancelled event status, compensating events, refund and debit ledger kinds,
the per-usage refunded total

Revision ID: 3c7e9a1d5b20
Revises: 3f6a9c2e7b15
Create Date: 2026-12-06 05:30:00

docs/explanation/corrections.md. An outbox row may now be `cancelled` (a usage refunded whole
before any claim) and may carry negative credits, but only as a compensating event pointing at
its usage (`refund_of`). The ledger gains `refund` (pointing at the usage) and `debit` entries.
`maybe_at_polar` marks a row once a send of it ended without a refusal from Polar (only rows
without it may be cancelled). `usage_refunds` holds, per refunded usage, the credits given back so far; its CHECK keeps them
within the usage's credits whatever the concurrency.

On SQLite the two altered tables are copied (batch mode); the ledger's append-only triggers go
with the old table and are created again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3c7e9a1d5b20"
down_revision: str | None = "3f6a9c2e7b15"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_STATUSES = ("pending", "inflight", "delivered", "failed", "cancelled")
OLD_EVENT_STATUSES = EVENT_STATUSES[:-1]
LEDGER_KINDS = ("grant", "usage", "hold", "capture", "release", "revoke", "refund", "debit")
OLD_LEDGER_KINDS = LEDGER_KINDS[:-2]
DELTA_SIGN = (
    "(kind IN ('grant', 'release', 'capture', 'refund') AND delta > 0)"
    " OR (kind IN ('usage', 'hold', 'debit') AND delta < 0)"
    " OR (kind = 'revoke' AND delta <= 0)"
)
OLD_DELTA_SIGN = (
    "(kind IN ('grant', 'release', 'capture') AND delta > 0)"
    " OR (kind IN ('usage', 'hold') AND delta < 0)"
    " OR (kind = 'revoke' AND delta <= 0)"
)
SQLITE_LEDGER_TRIGGERS = (
    "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END",
    "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END",
)


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _drop_sqlite_ledger_triggers() -> None:
    if _sqlite():
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_update")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_no_delete")


def _create_sqlite_ledger_triggers() -> None:
    if _sqlite():
        for statement in SQLITE_LEDGER_TRIGGERS:
            op.execute(statement)


def _keep_sqlite_event_ids() -> None:
    """SQLite copies outbox_events: its counter starts past every id ever used again (ids
    must never be reused, revision 3f6a9c2e7b1d)."""
    if not _sqlite():
        return
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox_events', 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox_events')"
    )
    op.execute(
        "UPDATE sqlite_sequence SET seq = max(seq,"
        " (SELECT coalesce(max(id), 0) FROM outbox_events),"
        " (SELECT coalesce(max(event_id), 0) FROM ledger_entries),"
        " (SELECT coalesce(max(event_id), 0) FROM holds))"
        " WHERE name = 'outbox_events'"
    )


def upgrade() -> None:
    with op.batch_alter_table(
        "outbox_events", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.add_column(sa.Column("refund_of", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("maybe_at_polar", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.drop_constraint(op.f("ck_outbox_events_status_known"), type_="check")
        batch.create_check_constraint(
            op.f("ck_outbox_events_status_known"), _in("status", EVENT_STATUSES)
        )
        batch.drop_constraint(op.f("ck_outbox_events_credits_positive"), type_="check")
        batch.create_check_constraint(
            op.f("ck_outbox_events_credits_sign_matches_kind"),
            "(refund_of IS NULL AND credits >= 1) OR (refund_of IS NOT NULL AND credits <= -1)",
        )
        batch.create_check_constraint(
            op.f("ck_outbox_events_only_a_usage_is_cancelled"),
            "refund_of IS NULL OR status <> 'cancelled'",
        )

    # Rows sent before this revision: whatever may have reached Polar is marked (a retry, a
    # delivery, a lease, a replay), so that no refund cancels it.
    op.execute(
        "UPDATE outbox_events SET maybe_at_polar = true WHERE attempts > 0"
        " OR status IN ('inflight', 'delivered') OR last_replay_id IS NOT NULL"
    )

    _drop_sqlite_ledger_triggers()
    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("refund_of", sa.BigInteger(), nullable=True))
        batch.drop_constraint(op.f("ck_ledger_entries_kind_known"), type_="check")
        batch.create_check_constraint(
            op.f("ck_ledger_entries_kind_known"), _in("kind", LEDGER_KINDS)
        )
        batch.drop_constraint(op.f("ck_ledger_entries_delta_sign_matches_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_ledger_entries_delta_sign_matches_kind"), DELTA_SIGN)
        batch.create_check_constraint(
            op.f("ck_ledger_entries_refund_has_usage"),
            "(kind = 'refund') = (refund_of IS NOT NULL)",
        )
        batch.create_check_constraint(
            op.f("ck_ledger_entries_refund_event_complete"),
            "kind <> 'refund' OR ((event_id IS NULL) = (external_id IS NULL))",
        )
    _create_sqlite_ledger_triggers()
    _keep_sqlite_event_ids()
    op.create_index(
        "ix_ledger_entries_event_id",
        "ledger_entries",
        ["event_id"],
        unique=False,
        postgresql_where=sa.text("event_id IS NOT NULL"),
        sqlite_where=sa.text("event_id IS NOT NULL"),
    )

    op.create_table(
        "usage_refunds",
        sa.Column("event_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("refunded", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("credits >= 1", name=op.f("ck_usage_refunds_credits_positive")),
        sa.CheckConstraint(
            "refunded >= 1 AND refunded <= credits",
            name=op.f("ck_usage_refunds_refunded_within_usage"),
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_usage_refunds")),
    )


def downgrade() -> None:
    # Refunds cannot be expressed in the old schema: refuse rather than lose them.
    bind = op.get_bind()
    refunds = bind.execute(
        sa.text("SELECT count(*) FROM ledger_entries WHERE kind IN ('refund', 'debit')")
    ).scalar_one()
    if refunds:
        raise RuntimeError(
            f"{refunds} refund or debit ledger entries exist: the previous schema cannot hold "
            "them; downgrade refused"
        )
    op.drop_table("usage_refunds")
    op.drop_index(
        "ix_ledger_entries_event_id",
        table_name="ledger_entries",
        postgresql_where=sa.text("event_id IS NOT NULL"),
        sqlite_where=sa.text("event_id IS NOT NULL"),
    )
    _drop_sqlite_ledger_triggers()
    with op.batch_alter_table("ledger_entries") as batch:
        batch.drop_constraint(op.f("ck_ledger_entries_refund_event_complete"), type_="check")
        batch.drop_constraint(op.f("ck_ledger_entries_refund_has_usage"), type_="check")
        batch.drop_constraint(op.f("ck_ledger_entries_delta_sign_matches_kind"), type_="check")
        batch.create_check_constraint(
            op.f("ck_ledger_entries_delta_sign_matches_kind"), OLD_DELTA_SIGN
        )
        batch.drop_constraint(op.f("ck_ledger_entries_kind_known"), type_="check")
        batch.create_check_constraint(
            op.f("ck_ledger_entries_kind_known"), _in("kind", OLD_LEDGER_KINDS)
        )
        batch.drop_column("refund_of")
    _create_sqlite_ledger_triggers()
    with op.batch_alter_table(
        "outbox_events", table_kwargs={"sqlite_autoincrement": True}
    ) as batch:
        batch.drop_constraint(op.f("ck_outbox_events_only_a_usage_is_cancelled"), type_="check")
        batch.drop_constraint(op.f("ck_outbox_events_credits_sign_matches_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_outbox_events_credits_positive"), "credits >= 1")
        batch.drop_constraint(op.f("ck_outbox_events_status_known"), type_="check")
        batch.create_check_constraint(
            op.f("ck_outbox_events_status_known"), _in("status", OLD_EVENT_STATUSES)
        )
        batch.drop_column("maybe_at_polar")
        batch.drop_column("refund_of")
    _keep_sqlite_event_ids()
