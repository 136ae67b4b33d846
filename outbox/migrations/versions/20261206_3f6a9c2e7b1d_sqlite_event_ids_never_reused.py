"""SQLite: outbox event ids are never reused (AUTOINCREMENT)

Revision ID: 3f6a9c2e7b1d
Revises: 8b2f4d6a1c3e
Create Date: 2026-12-06 06:00:00

SQLite only (`outbox dev`). Without AUTOINCREMENT SQLite gives a new row the largest id + 1, so
once `outbox prune` had deleted the newest delivered rows their ids were handed out again: two
usages under one `event_id` (in the ledger, the usage history, reconcile). The table is rebuilt
with AUTOINCREMENT (its rows, checks and partial indexes as they are), and its counter starts
past every id already used, pruned ones included (the ledger keeps them). PostgreSQL's identity
never reuses an id.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "3f6a9c2e7b1d"
down_revision: str | None = "8b2f4d6a1c3e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "outbox_events", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass
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


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("outbox_events", recreate="always"):
        pass
