"""service state

Revision ID: c499b4e2ea0e
Revises: ae5a70274df4
Create Date: 2026-11-25 02:26:57.798508
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c499b4e2ea0e"
down_revision: str | None = "ae5a70274df4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_service_state")),
    )


def downgrade() -> None:
    op.drop_table("service_state")
