"""a revoke of Polar credits takes them from open holds too: holds shrink, `revoked` status

Revision ID: 3f6a9c2e7b15
Revises: 3f6a9c2e7b1d
Create Date: 2026-12-10 10:00:00

`holds.credits` becomes what a hold holds now: a revoke that the balance cannot cover takes the
rest from the customer's open holds (outbox/ledger.py `revoke_credits`), shrinking them and
counting what it took in the new `revoked_credits`; a hold left with nothing is `revoked`.
Existing holds keep their credits (`revoked_credits` 0).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f6a9c2e7b15"
down_revision: str | None = "3f6a9c2e7b1d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATUSES = "status IN ('open', 'captured', 'released', 'expired')"
_NEW_STATUSES = "status IN ('open', 'captured', 'released', 'expired', 'revoked')"


def upgrade() -> None:
    with op.batch_alter_table("holds") as batch:
        batch.add_column(
            sa.Column(
                "revoked_credits", sa.BigInteger(), nullable=False, server_default=sa.text("0")
            )
        )
        batch.drop_constraint(op.f("ck_holds_status_known"), type_="check")
        batch.drop_constraint(op.f("ck_holds_credits_positive"), type_="check")
        batch.create_check_constraint(op.f("ck_holds_status_known"), _NEW_STATUSES)
        batch.create_check_constraint(op.f("ck_holds_credits_non_negative"), "credits >= 0")
        batch.create_check_constraint(
            op.f("ck_holds_revoked_within_hold"),
            "revoked_credits >= 0 AND credits + revoked_credits >= 1",
        )
        batch.create_check_constraint(
            op.f("ck_holds_revoked_iff_emptied"), "(status = 'revoked') = (credits = 0)"
        )


def downgrade() -> None:
    # A revoked hold has nothing left: back to its original credits, closed as released
    # (its credits were taken by the revoke; the ledger says so).
    op.execute(
        "UPDATE holds SET credits = credits + revoked_credits, status = 'released'"
        " WHERE status = 'revoked'"
    )
    with op.batch_alter_table("holds") as batch:
        batch.drop_constraint(op.f("ck_holds_revoked_iff_emptied"), type_="check")
        batch.drop_constraint(op.f("ck_holds_revoked_within_hold"), type_="check")
        batch.drop_constraint(op.f("ck_holds_credits_non_negative"), type_="check")
        batch.drop_constraint(op.f("ck_holds_status_known"), type_="check")
        batch.create_check_constraint(op.f("ck_holds_credits_positive"), "credits >= 1")
        batch.create_check_constraint(op.f("ck_holds_status_known"), _OLD_STATUSES)
        batch.drop_column("revoked_credits")
