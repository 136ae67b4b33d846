"""The HTTP adapter: FastAPI routes that parse, authorize and call `outbox/`."""
