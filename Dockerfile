# syntax=docker/dockerfile:1
# Build stage: wheels for the project and its pinned dependencies (build tools stay here).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The dependencies exactly as locked (versions and hashes: requirements-deploy.txt, kept by
# ./scripts/lock.sh), then the project alone.
COPY requirements-deploy.txt ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile --require-hashes -r requirements-deploy.txt
COPY pyproject.toml README.md alembic.ini ./
COPY outbox ./outbox
COPY api ./api
COPY worker ./worker
COPY polar_emulator ./polar_emulator
RUN /opt/venv/bin/pip install --no-compile --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

# Final stage: the virtualenv only, a non-root user, no compilers.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json
RUN useradd --create-home --uid 10001 outbox
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/alembic.ini /app/alembic.ini
WORKDIR /app
USER outbox
EXPOSE 8000 9108
CMD ["outbox", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
