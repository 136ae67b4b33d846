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


class GrantCycleState(StrEnum):
    """One credit of a Polar Meter Credits grant (transitions: docs/explanation/webhooks.md)."""

    CREDITED = "credited"  # the credit was applied
    REVOKED_EARLY = "revoked_early"  # its revoke came first: remembered, nothing applied yet
    REVOKED = "revoked"  # applied, then taken back
    CANCELLED = "cancelled"  # the credit came after its revoke: never applied (net zero)
