"""polar-usage-outbox: a credit ledger and a transactional outbox that bills usage through Polar.

The public library API (safe to call inside your own SQLAlchemy transaction):

    from outbox import record_usage, grant_credits, refund_usage, debit_credits
"""

from outbox.errors import (
    ConfigError,
    CustomerNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    NotRefundable,
    OutboxError,
    RefundExceedsUsage,
)
from outbox.ledger import GrantResult, UsageResult, debit_credits, grant_credits, record_usage
from outbox.refunds import RefundResult, refund_usage

__all__ = [
    "ConfigError",
    "CustomerNotFound",
    "GrantResult",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidRequest",
    "NotRefundable",
    "OutboxError",
    "RefundExceedsUsage",
    "RefundResult",
    "UsageResult",
    "debit_credits",
    "grant_credits",
    "record_usage",
    "refund_usage",
]
