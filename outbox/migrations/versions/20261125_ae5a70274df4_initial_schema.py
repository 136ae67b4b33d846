"""initial schema

Revision ID: ae5a70274df4
Revises:
Create Date: 2026-11-25 02:20:45.628073
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "ae5a70274df4"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


LEDGER_APPEND_ONLY_PG = """
CREATE FUNCTION ledger_entries_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only (% refused)', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();
"""

LEDGER_APPEND_ONLY_SQLITE = (
    "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END",
    "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END",
)


def _create_ledger_guard() -> None:
    """The ledger is append-only in the database itself, not only by convention."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(LEDGER_APPEND_ONLY_PG)
    else:
        for statement in LEDGER_APPEND_ONLY_SQLITE:
            op.execute(statement)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("scope IN ('usage', 'admin')", name=op.f("ck_api_tokens_scope_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "customers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("granted", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("balance >= 0", name=op.f("ck_customers_balance_non_negative")),
        sa.CheckConstraint(
            "granted >= 0 AND used >= 0", name=op.f("ck_customers_totals_non_negative")
        ),
        sa.CheckConstraint("held >= 0", name=op.f("ck_customers_held_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
    )
    op.create_table(
        "outbox_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("external_id", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_replay_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "(status = 'delivered') = (delivered_at IS NOT NULL)",
            name=op.f("ck_outbox_events_delivered_at_iff_delivered"),
        ),
        sa.CheckConstraint(
            "(status = 'inflight') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name=op.f("ck_outbox_events_lease_iff_inflight"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'inflight', 'delivered', 'failed')",
            name=op.f("ck_outbox_events_status_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_outbox_events_attempts_non_negative")),
        sa.CheckConstraint("credits >= 1", name=op.f("ck_outbox_events_credits_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("external_id", name=op.f("uq_outbox_events_external_id")),
    )
    op.create_index(
        "ix_outbox_events_customer_id_id", "outbox_events", ["customer_id", "id"], unique=False
    )
    op.create_index(
        "ix_outbox_events_delivered_at",
        "outbox_events",
        ["delivered_at"],
        unique=False,
        postgresql_where=sa.text("status = 'delivered'"),
        sqlite_where=sa.text("status = 'delivered'"),
    )
    op.create_index(
        "ix_outbox_events_failed",
        "outbox_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status = 'failed'"),
        sqlite_where=sa.text("status = 'failed'"),
    )
    op.create_index(
        "ix_outbox_events_inflight_lease",
        "outbox_events",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'inflight'"),
        sqlite_where=sa.text("status = 'inflight'"),
    )
    op.create_index(
        "ix_outbox_events_pending_due",
        "outbox_events",
        ["next_attempt_at", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "replays",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "event_ids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replays")),
    )
    op.create_table(
        "webhook_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("webhook_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=100), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("webhook_id", name=op.f("uq_webhook_events_webhook_id")),
    )
    op.create_table(
        "holds",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("captured_credits", sa.BigInteger(), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "capture_response",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('open', 'captured', 'released', 'expired')",
            name=op.f("ck_holds_status_known"),
        ),
        sa.CheckConstraint(
            "captured_credits IS NULL OR (captured_credits >= 0 AND captured_credits <= credits)",
            name=op.f("ck_holds_captured_within_hold"),
        ),
        sa.CheckConstraint("credits >= 1", name=op.f("ck_holds_credits_positive")),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_holds_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
    )
    op.create_index(
        "ix_holds_open_expires_at",
        "holds",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )
    op.create_table(
        "idempotency_records",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column(
            "response_body",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name=op.f("fk_idempotency_records_token_id_api_tokens"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_records")),
        sa.UniqueConstraint("token_id", "key", name=op.f("uq_idempotency_records_token_id_key")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.Column("external_id", sa.String(length=64), nullable=True),
        sa.Column("hold_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(kind IN ('grant', 'release', 'capture') AND delta > 0) OR (kind IN ('usage', 'hold') AND delta < 0) OR (kind = 'revoke' AND delta <= 0)",
            name=op.f("ck_ledger_entries_delta_sign_matches_kind"),
        ),
        sa.CheckConstraint(
            "kind <> 'usage' OR (event_id IS NOT NULL AND external_id IS NOT NULL)",
            name=op.f("ck_ledger_entries_usage_has_event"),
        ),
        sa.CheckConstraint(
            "kind IN ('grant', 'usage', 'hold', 'capture', 'release', 'revoke')",
            name=op.f("ck_ledger_entries_kind_known"),
        ),
        sa.CheckConstraint(
            "balance_after >= 0", name=op.f("ck_ledger_entries_balance_after_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_ledger_entries_customer_id_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        "ix_ledger_entries_customer_id_id", "ledger_entries", ["customer_id", "id"], unique=False
    )
    op.create_index(
        "uq_ledger_entries_customer_kind_idempotency_key",
        "ledger_entries",
        ["customer_id", "kind", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
    )

    _create_ledger_guard()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_append_only ON ledger_entries")
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    op.drop_index(
        "uq_ledger_entries_customer_kind_idempotency_key",
        table_name="ledger_entries",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index("ix_ledger_entries_customer_id_id", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("idempotency_records")
    op.drop_index(
        "ix_holds_open_expires_at",
        table_name="holds",
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )
    op.drop_table("holds")
    op.drop_table("webhook_events")
    op.drop_table("replays")
    op.drop_index(
        "ix_outbox_events_pending_due",
        table_name="outbox_events",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.drop_index(
        "ix_outbox_events_inflight_lease",
        table_name="outbox_events",
        postgresql_where=sa.text("status = 'inflight'"),
        sqlite_where=sa.text("status = 'inflight'"),
    )
    op.drop_index(
        "ix_outbox_events_failed",
        table_name="outbox_events",
        postgresql_where=sa.text("status = 'failed'"),
        sqlite_where=sa.text("status = 'failed'"),
    )
    op.drop_index(
        "ix_outbox_events_delivered_at",
        table_name="outbox_events",
        postgresql_where=sa.text("status = 'delivered'"),
        sqlite_where=sa.text("status = 'delivered'"),
    )
    op.drop_index("ix_outbox_events_customer_id_id", table_name="outbox_events")
    op.drop_table("outbox_events")
    op.drop_table("customers")
    op.drop_table("api_tokens")
