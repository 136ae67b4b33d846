"""The Celery adapter: `celery -A worker worker` / `celery -A worker beat`."""

from worker.celery_app import app

__all__ = ["app"]
