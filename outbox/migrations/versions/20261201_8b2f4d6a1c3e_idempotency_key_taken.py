"""a function that aborts a keyed usage whose Idempotency-Key a concurrent request recorded first

Revision ID: 8b2f4d6a1c3e
Revises: 5d0e7c1f9a42
Create Date: 2026-12-01 15:30:00

PostgreSQL only. POST /v1/usage with an Idempotency-Key is one statement, run in autocommit
(docs/explanation/request-path.md): the lookup of the key, the spend and the key's record. When a concurrent request
with the same key committed its record first, that statement has spent but could not record
the key; it calls `outbox_idempotency_key_taken()`, which raises SQLSTATE OB001, so PostgreSQL
undoes the whole statement and the request replays the first one's answer
(`outbox.idempotency.http_usage_steps`).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "8b2f4d6a1c3e"
down_revision: str | None = "5d0e7c1f9a42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION outbox_idempotency_key_taken() RETURNS integer
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            RAISE EXCEPTION 'the Idempotency-Key was recorded by a concurrent request'
                USING ERRCODE = 'OB001';
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS outbox_idempotency_key_taken()")
