"""The schema. Money-like columns are integers; timestamps are timezone-aware UTC.

Invariants live in the database too (CHECK, UNIQUE), so they hold even if a Python guard is
removed: see tests/outbox/test_models.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from outbox.states import (
    AttemptDecision,
    EventStatus,
    GrantCycleState,
    HoldStatus,
    LedgerKind,
    ReconcileRunStatus,
    TokenScope,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT identity on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on PostgreSQL; on SQLite naive values are read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: Any) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Customer(Base):
    """A customer's real-time balance. `balance` is spendable; `held` is reserved by holds."""

    __tablename__ = "customers"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_non_negative"),
        CheckConstraint("held >= 0", name="held_non_negative"),
        CheckConstraint("granted >= 0 AND used >= 0", name="totals_non_negative"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    granted: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    used: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class LedgerEntry(Base):
    """Append-only: every change of a balance is one entry; balance == sum(delta) per customer."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(_in("kind", LedgerKind), name="kind_known"),
        CheckConstraint(
            "(kind IN ('grant', 'release', 'capture', 'refund') AND delta > 0)"
            " OR (kind IN ('usage', 'hold', 'debit') AND delta < 0)"
            " OR (kind = 'revoke' AND delta <= 0)",
            name="delta_sign_matches_kind",
        ),
        # A refund points at the usage it refunds, and at its compensating event if it has
        # one (none when the usage was cancelled before Polar could see it).
        CheckConstraint("(kind = 'refund') = (refund_of IS NOT NULL)", name="refund_has_usage"),
        CheckConstraint(
            "kind <> 'refund' OR ((event_id IS NULL) = (external_id IS NULL))",
            name="refund_event_complete",
        ),
        CheckConstraint("balance_after >= 0", name="balance_after_non_negative"),
        CheckConstraint(
            "kind <> 'usage' OR (event_id IS NOT NULL AND external_id IS NOT NULL)",
            name="usage_has_event",
        ),
        Index("ix_ledger_entries_customer_id_id", "customer_id", "id"),
        # A usage (or a compensating event) found by its outbox id, even after `outbox prune`.
        Index(
            "ix_ledger_entries_event_id",
            "event_id",
            postgresql_where=text("event_id IS NOT NULL"),
            sqlite_where=text("event_id IS NOT NULL"),
        ),
        Index(
            "uq_ledger_entries_customer_kind_idempotency_key",
            "customer_id",
            "kind",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("customers.id"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    delta: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The outbox row of a usage entry. Not a foreign key: pruning delivered outbox rows
    # must never touch the ledger.
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The usage's Polar `external_id`, kept here too: a pruned outbox row can be re-created
    # with the same id (reconcile --fix), and dedup keeps that free of double billing.
    external_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hold_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # A refund: the outbox id of the usage it gives credits back for.
    refund_of: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class OutboxEvent(Base):
    """One usage event on its way to Polar; see docs/state_machine.md."""

    __tablename__ = "outbox_events"
    __table_args__ = (
        CheckConstraint(_in("status", EventStatus), name="status_known"),
        # A usage bills credits >= 1; only a compensating event (which points at its usage)
        # carries negative credits (docs/explanation/corrections.md).
        CheckConstraint(
            "(refund_of IS NULL AND credits >= 1) OR (refund_of IS NOT NULL AND credits <= -1)",
            name="credits_sign_matches_kind",
        ),
        CheckConstraint(
            "refund_of IS NULL OR status <> 'cancelled'", name="only_a_usage_is_cancelled"
        ),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        CheckConstraint(
            "(status = 'inflight') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name="lease_iff_inflight",
        ),
        CheckConstraint(
            "(status = 'delivered') = (delivered_at IS NOT NULL)", name="delivered_at_iff_delivered"
        ),
        # Claiming: the oldest due pending rows.
        Index(
            "ix_outbox_events_pending_due",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Rescue: expired leases.
        Index(
            "ix_outbox_events_inflight_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'inflight'"),
            sqlite_where=text("status = 'inflight'"),
        ),
        Index(
            "ix_outbox_events_failed",
            "id",
            postgresql_where=text("status = 'failed'"),
            sqlite_where=text("status = 'failed'"),
        ),
        Index("ix_outbox_events_customer_id_id", "customer_id", "id"),
        # The console's newest-first listing of rows not yet delivered.
        Index(
            "ix_outbox_events_undelivered_id",
            "id",
            postgresql_where=text("status IN ('pending', 'inflight')"),
            sqlite_where=text("status IN ('pending', 'inflight')"),
        ),
        Index(
            "ix_outbox_events_delivered_at",
            "delivered_at",
            postgresql_where=text("status = 'delivered'"),
            sqlite_where=text("status = 'delivered'"),
        ),
        # SQLite would hand out the id of a pruned newest row again.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    customer_id: Mapped[str] = mapped_column(String(128), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", Json, nullable=False, default=dict
    )
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=EventStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_replay_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # A compensating event: the outbox id of the usage it corrects (NULL for a usage). Not a
    # foreign key: `outbox prune` deletes delivered usages.
    refund_of: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Set once a send of the row ended without Polar refusing it (accepted, or an unknown
    # outcome: a timeout, a 5xx, a lost worker, attempts exhausted); never cleared. Until then
    # Polar cannot hold the row, and a whole refund may cancel it (outbox.events).
    maybe_at_polar: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())


class UsageRefund(Base):
    """How much of one usage was refunded: one row per refunded usage, kept within the
    usage's credits by the database (the guard of `outbox.refunds.refund_usage`)."""

    __tablename__ = "usage_refunds"
    __table_args__ = (
        CheckConstraint("credits >= 1", name="credits_positive"),
        CheckConstraint("refunded >= 1 AND refunded <= credits", name="refunded_within_usage"),
    )

    event_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    customer_id: Mapped[str] = mapped_column(String(128), nullable=False)
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    refunded: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class IdempotencyRecord(Base):
    """The first response to an HTTP request carrying an `Idempotency-Key`, per token."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("token_id", "key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    token_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("api_tokens.id", ondelete="CASCADE"),
        nullable=False,
    )
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    request_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ApiToken(Base):
    """A bearer token, stored as its SHA-256 (tokens are random, 256 bits: no slow hash needed)."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("scope", TokenScope), name="scope_known"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Hold(Base):
    """Credits reserved before a long generation; captured (billed) or released (returned).
    `credits` is what the hold holds now: a revoke of Polar credits shrinks it and counts what
    it took in `revoked_credits`; a hold left with nothing is `revoked` (outbox/holds.py)."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint(_in("status", HoldStatus), name="status_known"),
        CheckConstraint("credits >= 0", name="credits_non_negative"),
        CheckConstraint(
            "revoked_credits >= 0 AND credits + revoked_credits >= 1", name="revoked_within_hold"
        ),
        CheckConstraint("(status = 'revoked') = (credits = 0)", name="revoked_iff_emptied"),
        CheckConstraint(
            "captured_credits IS NULL OR (captured_credits >= 0 AND captured_credits <= credits)",
            name="captured_within_hold",
        ),
        Index(
            "ix_holds_open_expires_at",
            "expires_at",
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    customer_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("customers.id"), nullable=False
    )
    credits: Mapped[int] = mapped_column(BigInteger, nullable=False)
    revoked_credits: Mapped[int] = mapped_column(
        BigInteger, nullable=False, default=0, server_default=text("0")
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=HoldStatus.OPEN)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    captured_credits: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    event_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    capture_response: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class WebhookEvent(Base):
    """A verified Polar webhook: its raw body as received, stored once per `webhook-id`."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # SHA-256 (hex) of the raw `webhook-id` header: the dedup key, whatever the id's length.
    webhook_id_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    webhook_id: Mapped[str] = mapped_column(Text, nullable=False)
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    # The bytes Polar signed, never re-encoded: JSONB would refuse some signed payloads
    # (\u0000), and an operator can re-verify these.
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)


class PolarGrantCycle(Base):
    """One credit of a Polar Meter Credits grant (grant id + cycle) and where it stands, so
    webhooks may come in any order and any number of times (outbox/webhooks.py)."""

    __tablename__ = "polar_grant_cycles"
    __table_args__ = (
        UniqueConstraint("grant_id", "cycle"),
        CheckConstraint(_in("state", GrantCycleState), name="state_known"),
        CheckConstraint("units >= 1", name="units_positive"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    grant_id: Mapped[str] = mapped_column(String(128), nullable=False)  # Polar's `data.id`
    # The credit's `properties.last_credited_at`, as Polar wrote it.
    cycle: Mapped[str] = mapped_column(String(64), nullable=False)
    customer_id: Mapped[str] = mapped_column(String(128), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class Replay(Base):
    """An operator's replay: who moved which failed rows back to pending, when and why."""

    __tablename__ = "replays"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    event_ids: Mapped[list[int]] = mapped_column(Json, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ServiceState(Base):
    """Small shared facts every process must see, e.g. whether Polar rejects our token."""

    __tablename__ = "service_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class DeliveryAttempt(Base):
    """One step of an outbox row's history, kept across replays: each settled delivery attempt
    (who sent it, in which claim, what Polar answered, what the policy decided), each rescue,
    replay and re-queue (docs/howto/console.md)."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        CheckConstraint(_in("decision", AttemptDecision), name="decision_known"),
        Index("ix_delivery_attempts_event_id_id", "event_id", "id"),
        # The overview's count of Polar's 429s in the last minutes.
        Index(
            "ix_delivery_attempts_throttled",
            "attempted_at",
            postgresql_where=text("polar_status = 429"),
            sqlite_where=text("polar_status = 429"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # Pruning a delivered row takes its history with it.
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"),
        ForeignKey("outbox_events.id", ondelete="CASCADE"),
        nullable=False,
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)
    # The claim token (`<worker id>:<random>`): which worker, which batch.
    claim_token: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    polar_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    replay_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AuditEntry(Base):
    """Every operator change (replay, grant, reconcile --fix, sign-in): who, when, what, why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    action: Mapped[str] = mapped_column(String(32), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(Json, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class ReconcileRun(Base):
    """A reconcile started from the console: its window, progress while it runs, its result."""

    __tablename__ = "reconcile_runs"
    __table_args__ = (CheckConstraint(_in("status", ReconcileRunStatus), name="status_known"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    customer_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    fix: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(Json, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
