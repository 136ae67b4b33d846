"""One small error tree. Each class's docstring is its user-facing message; `api/errors.py` maps
each class to one HTTP status and `code`."""

from __future__ import annotations


class OutboxError(Exception):
    """Something went wrong in polar-usage-outbox."""

    code = "outbox_error"

    def __init__(self, detail: str | None = None, **context: object) -> None:
        self.detail = detail or (self.__doc__ or "").strip()
        self.context = context
        super().__init__(self.detail)


class InvalidRequest(OutboxError):
    """The request is not valid."""

    code = "invalid_request"


class InvalidSignature(OutboxError):
    """The webhook is not signed with POLAR_WEBHOOK_SECRET (or its timestamp is stale)."""

    code = "invalid_signature"


class InsufficientCredits(OutboxError):
    """The customer does not have enough credits for this usage."""

    code = "insufficient_credits"


class CustomerNotFound(OutboxError):
    """No such customer: a customer exists once it has received a grant."""

    code = "customer_not_found"


class IdempotencyConflict(OutboxError):
    """This Idempotency-Key was already used with a different request body."""

    code = "idempotency_key_reused"


class HoldNotFound(OutboxError):
    """No such hold."""

    code = "hold_not_found"


class HoldClosed(OutboxError):
    """This hold was already released or expired; it cannot be captured."""

    code = "hold_closed"


class EventNotFound(OutboxError):
    """No such outbox event."""

    code = "event_not_found"


class NotReplayable(OutboxError):
    """Only failed events can be replayed."""

    code = "not_replayable"


class DatabaseUnavailable(OutboxError):
    """The database cannot be reached or opened: check DATABASE_URL."""

    code = "database_unavailable"


class SchemaNotMigrated(OutboxError):
    """The database schema is not migrated: run `outbox db upgrade`."""

    code = "schema_not_migrated"


class BrokerUnavailable(OutboxError):
    """Redis (REDIS_URL) cannot be reached: workers get their tasks from it."""

    code = "broker_unavailable"


class ConfigError(OutboxError):
    """The configuration is invalid."""

    code = "config_error"


class ReconcileDeadline(OutboxError):
    """reconcile did not finish within its --deadline; nothing was re-queued."""

    code = "reconcile_deadline"


class PolarUnavailable(OutboxError):
    """Polar could not answer (an error, a refusal or no answer)."""

    code = "polar_unavailable"


class NotRefundable(OutboxError):
    """This event is a refund (a compensating event): only a usage can be refunded."""

    code = "not_refundable"


class RefundExceedsUsage(OutboxError):
    """The refund exceeds the usage's credits not yet refunded."""

    code = "refund_exceeds_usage"
