"""webhook bodies as bytes, whole webhook ids, Polar grant cycles

Revision ID: 5d0e7c1f9a42
Revises: c499b4e2ea0e
Create Date: 2026-12-01 11:00:00

`webhook_events` keeps the raw body (bytes) instead of re-encoded JSON, and dedups on the
SHA-256 of the whole `webhook-id` (ids were cut at 255 characters, so long ones collided).
`polar_grant_cycles` holds the state of each credit of a Polar Meter Credits grant.
Rows stored before this revision keep their JSON as the body; their ids were already cut.
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5d0e7c1f9a42"
down_revision: str | None = "c499b4e2ea0e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_json = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("webhook_id_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("body", sa.LargeBinary(), nullable=True))

    events = sa.table(
        "webhook_events",
        sa.column("id", sa.BigInteger()),
        sa.column("webhook_id", sa.Text()),
        sa.column("payload", _json),
        sa.column("webhook_id_sha256", sa.String()),
        sa.column("body", sa.LargeBinary()),
    )
    bind = op.get_bind()
    # Webhooks are few (a handful per customer per month): converting them in Python keeps
    # this one migration for both PostgreSQL and SQLite (which has no sha256()).
    rows = bind.execute(sa.select(events.c.id, events.c.webhook_id, events.c.payload)).all()
    for row_id, webhook_id, payload in rows:
        bind.execute(
            events.update()
            .where(events.c.id == row_id)
            .values(
                webhook_id_sha256=hashlib.sha256(webhook_id.encode()).hexdigest(),
                body=json.dumps(payload).encode(),
            )
        )

    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_constraint("uq_webhook_events_webhook_id", type_="unique")
        batch.alter_column("webhook_id_sha256", existing_type=sa.String(length=64), nullable=False)
        batch.alter_column("body", existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column(
            "webhook_id", existing_type=sa.String(length=255), type_=sa.Text(), nullable=False
        )
        batch.drop_column("payload")
        batch.create_unique_constraint(
            op.f("uq_webhook_events_webhook_id_sha256"), ["webhook_id_sha256"]
        )

    op.create_table(
        "polar_grant_cycles",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("grant_id", sa.String(length=128), nullable=False),
        sa.Column("cycle", sa.String(length=64), nullable=False),
        sa.Column("customer_id", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('credited', 'revoked_early', 'revoked', 'cancelled')",
            name=op.f("ck_polar_grant_cycles_state_known"),
        ),
        sa.CheckConstraint("units >= 1", name=op.f("ck_polar_grant_cycles_units_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_polar_grant_cycles")),
        sa.UniqueConstraint("grant_id", "cycle", name=op.f("uq_polar_grant_cycles_grant_id_cycle")),
    )


def downgrade() -> None:
    op.drop_table("polar_grant_cycles")
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("payload", _json, nullable=True))

    events = sa.table(
        "webhook_events",
        sa.column("id", sa.BigInteger()),
        sa.column("webhook_id", sa.Text()),
        sa.column("body", sa.LargeBinary()),
        sa.column("payload", _json),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(events.c.id, events.c.webhook_id, events.c.body)).all()
    for row_id, webhook_id, body in rows:
        try:
            payload = json.loads(bytes(body).decode())
            # Lone surrogates and \u0000 cannot go back into a JSON column (JSONB refuses them).
            if "\\u0000" in json.dumps(payload):
                raise ValueError("\\u0000")
            json.dumps(payload, ensure_ascii=False).encode()
        except (ValueError, RecursionError):
            payload = {"type": "unparseable"}
        bind.execute(
            events.update()
            .where(events.c.id == row_id)
            .values(payload=payload, webhook_id=webhook_id[:255])
        )

    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_constraint("uq_webhook_events_webhook_id_sha256", type_="unique")
        batch.alter_column("payload", existing_type=_json, nullable=False)
        batch.alter_column(
            "webhook_id", existing_type=sa.Text(), type_=sa.String(length=255), nullable=False
        )
        batch.drop_column("body")
        batch.drop_column("webhook_id_sha256")
        batch.create_unique_constraint(op.f("uq_webhook_events_webhook_id"), ["webhook_id"])
