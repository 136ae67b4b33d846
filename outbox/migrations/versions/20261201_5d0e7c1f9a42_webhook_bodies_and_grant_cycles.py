"""webhook bodies as bytes, whole webhook ids, Polar grant cycles

Revision ID: 5d0e7c1f9a42
Revises: c499b4e2ea0e
Create Date: 2026-12-01 11:00:00

`webhook_events` keeps the raw body (bytes) instead of re-encoded JSON, and dedups on the
SHA-256 of the whole `webhook-id` (ids were cut at 255 characters, so long ones collided).
`polar_grant_cycles` holds the state of each credit of a Polar Meter Credits grant.
Rows stored before this revision keep their JSON as the body; their ids were already cut.

Credits granted before this revision (ledger key `polar-webhook:{webhook-id}`, no cycle row)
get their cycle row here, from the stored payloads, so that a revoke after the upgrade takes
them back and a redelivery under a new webhook id does not credit them again:
`benefit_grant.created`/`cycled` whose ledger grant exists -> `credited` with the units the
ledger shows; then a `benefit_grant.revoked` of that cycle whose ledger revoke exists ->
`revoked`. A revoke applied before its credit came is not recorded (no state says "already
taken back": the credit, when it comes, is granted, which nets the old revoke out).
"""

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

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
    rows = bind.execute(
        sa.select(events.c.id, events.c.webhook_id, events.c.payload).order_by(events.c.id)
    ).all()
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
    _backfill_grant_cycles(bind, [(webhook_id, payload) for _, webhook_id, payload in rows])


_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _identifier(value: Any, limit: int) -> str | None:
    if isinstance(value, str) and len(value) <= limit and _PRINTABLE.fullmatch(value):
        return value
    return None


def _backfill_grant_cycles(bind: sa.Connection, events: list[tuple[str, Any]]) -> None:
    """A cycle row for each credit the code before this revision applied (in received order).

    What was applied is read from the ledger itself (the entry under the old key), not from
    the payload: it is what the customer holds."""
    ledger = sa.table(
        "ledger_entries",
        sa.column("customer_id", sa.String()),
        sa.column("kind", sa.String()),
        sa.column("delta", sa.BigInteger()),
        sa.column("idempotency_key", sa.String()),
    )
    cycles: dict[tuple[str, str], dict[str, Any]] = {}
    now = datetime.now(UTC)
    for webhook_id, payload in events:
        kind = _get(payload, "type")
        data = _get(payload, "data")
        customer_id = _get(data, "customer", "external_id")
        grant_id = _identifier(_get(data, "id"), 128)
        if kind == "benefit_grant.revoked":
            ledger_kind, cycle_path = "revoke", ("previous_properties", "last_credited_at")
        elif kind in ("benefit_grant.created", "benefit_grant.cycled"):
            ledger_kind, cycle_path = "grant", ("properties", "last_credited_at")
        else:
            continue
        cycle = _identifier(_get(data, *cycle_path), 64)
        if grant_id is None or cycle is None or not isinstance(customer_id, str):
            continue
        delta = bind.execute(
            sa.select(ledger.c.delta).where(
                ledger.c.customer_id == customer_id,
                ledger.c.kind == ledger_kind,
                ledger.c.idempotency_key == f"polar-webhook:{webhook_id}"[:255],
            )
        ).scalar_one_or_none()
        if delta is None:  # not applied (ignored, refused, or another benefit)
            continue
        known = cycles.get((grant_id, cycle))
        if ledger_kind == "grant" and known is None and delta >= 1:
            cycles[grant_id, cycle] = {
                "grant_id": grant_id,
                "cycle": cycle,
                "customer_id": customer_id,
                "state": "credited",
                "units": delta,
                "created_at": now,
                "updated_at": now,
            }
        elif ledger_kind == "revoke" and known is not None and known["state"] == "credited":
            known["state"] = "revoked"
    if cycles:
        table = sa.table(
            "polar_grant_cycles",
            sa.column("grant_id", sa.String()),
            sa.column("cycle", sa.String()),
            sa.column("customer_id", sa.String()),
            sa.column("state", sa.String()),
            sa.column("units", sa.BigInteger()),
            sa.column("created_at", sa.DateTime(timezone=True)),
            sa.column("updated_at", sa.DateTime(timezone=True)),
        )
        bind.execute(table.insert(), list(cycles.values()))


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
