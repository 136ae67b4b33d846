"""polar-usage-outbox: a credit ledger and a transactional outbox that bills usage through Polar.

The public library API (safe to call inside your own SQLAlchemy transaction):

    from outbox import record_usage, grant_credits
"""

from outbox.errors import (
    ConfigError,
    CustomerNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    OutboxError,
)
from outbox.ledger import GrantResult, UsageResult, grant_credits, record_usage

__all__ = [
    "ConfigError",
    "CustomerNotFound",
    "GrantResult",
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidRequest",
    "OutboxError",
    "UsageResult",
    "grant_credits",
    "record_usage",
]
