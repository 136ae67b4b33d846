"""The delivery states of an outbox row; docs/state_machine.md says who moves each transition."""

from enum import StrEnum


class EventStatus(StrEnum):
    PENDING = "pending"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    FAILED = "failed"
    # A usage refunded whole before any claim (docs/explanation/corrections.md): terminal,
    # never claimed, replayed nor reconciled; nothing of it reaches Polar.
    CANCELLED = "cancelled"


class LedgerKind(StrEnum):
    GRANT = "grant"
    USAGE = "usage"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    REVOKE = "revoke"
    REFUND = "refund"  # credits of a usage given back (`outbox.refunds.refund_usage`)
    DEBIT = "debit"  # an operator takes credits back (`outbox.refunds.debit_credits`)


class HoldStatus(StrEnum):
    OPEN = "open"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"  # a revoke of Polar credits took all it held (outbox/ledger.py)


class TokenScope(StrEnum):
    USAGE = "usage"
    ADMIN = "admin"
    VIEWER = "viewer"  # reads everything an admin reads (console, admin GETs), changes nothing


class AttemptDecision(StrEnum):
    """What happened to an outbox row at one step of its history (`delivery_attempts`)."""

    DELIVERED = "delivered"  # Polar accepted the batch
    RETRY = "retry"  # pending again, with backoff (or after Retry-After)
    FAILED = "failed"  # Polar refused the event, or its attempts ran out
    RELEASED = "released"  # back to pending without an attempt (Polar refused our token)
    RESCUED = "rescued"  # its worker's lease expired; pending (or failed) again
    REPLAYED = "replayed"  # an operator moved it from failed back to pending
    REQUEUED = "requeued"  # reconcile found Polar lacks it; pending again


class ReconcileRunStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class GrantCycleState(StrEnum):
    """One credit of a Polar Meter Credits grant (transitions: docs/explanation/webhooks.md)."""

    CREDITED = "credited"  # the credit was applied
    REVOKED_EARLY = "revoked_early"  # its revoke came first: remembered, nothing applied yet
    REVOKED = "revoked"  # applied, then taken back
    CANCELLED = "cancelled"  # the credit came after its revoke: never applied (net zero)
