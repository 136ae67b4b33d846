"""The emulator's HTTP surface: Polar's /v1 endpoints we use, and a control API (/_emulator)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from polar_emulator import schemas, webhooks
from polar_emulator.meters import quantities_response
from polar_emulator.state import EmulatorConfig, EmulatorState

log = logging.getLogger("polar_emulator")

MAX_BODY_BYTES = 10 * 1024 * 1024
SCHEMA_STAGE = "RequestValidationError"  # Polar's body "error" for a schema 422
SERVICE_STAGE = "PolarRequestValidationError"  # ... and for a service 422 (after the schema)
# What `unattributed_422_next` answers: a 422 naming no event (as Polar answers a body without
# `events`), for tests of the delivery's loud retry.
UNATTRIBUTED_DETAIL = [
    {"type": "missing", "loc": ["body", "events"], "msg": "Field required", "input": {}}
]


def _error(loc: list[Any], msg: str, type_: str, value: Any = None) -> dict[str, Any]:
    return {"type": type_, "loc": loc, "msg": msg, "input": value}


def _parse_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class BatchCheck:
    """Polar's two validation stages over one body: the events to store, or the 422's
    `error` (which stage refused it) and `detail`."""

    events: list[dict[str, Any]]
    stage: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)


def validate_batch(state: EmulatorState, payload: Any, body: bytes | None = None) -> BatchCheck:
    """Validate an ingest body as Polar does (server/polar/event/endpoints.py + service.py):
    first the schema (`schemas.validate_ingest`: every error, union-shaped), and only if it
    passes the service checks (organization_id with an organization token, unknown
    `customer_id`; here also `reject_customers`), one error per refused event."""
    config = state.config
    try:
        ingest = schemas.validate_ingest(payload, state.now(), body)
    except ValidationError as exc:
        return BatchCheck([], SCHEMA_STAGE, schemas.request_errors(exc))
    errors: list[dict[str, Any]] = []
    clean: list[dict[str, Any]] = []
    known = set(config.known_customer_ids)
    for i, event in enumerate(ingest.events):
        base = ["body", "events", i]
        if event.organization_id is not None:
            errors.append(
                _error(
                    [*base, "organization_id"],
                    "Setting organization_id is disallowed when using an organization token.",
                    "organization_token",
                    str(event.organization_id),
                )
            )
            continue
        if isinstance(event, schemas.EventCreateCustomer):
            if str(event.customer_id) not in known:
                errors.append(
                    _error(
                        [*base, "customer_id"],
                        "Customer not found.",
                        "customer_id",
                        str(event.customer_id),
                    )
                )
                continue
            if event.member_id is not None:
                errors.append(
                    _error(
                        [*base, "member_id"], "Member not found.", "member_id", str(event.member_id)
                    )
                )
                continue
            customer = {"customer_id": str(event.customer_id), "external_customer_id": None}
        else:
            if event.external_customer_id in config.reject_customers:
                errors.append(
                    _error(
                        [*base, "external_customer_id"],
                        f"Customer {event.external_customer_id} is not accepted "
                        "(emulator reject_customers).",
                        "external_customer_id",
                        event.external_customer_id,
                    )
                )
                continue
            customer = {"customer_id": None, "external_customer_id": event.external_customer_id}
        clean.append(
            {
                "name": event.name,
                "external_id": event.external_id,
                "timestamp": event.timestamp,
                "metadata": dict(event.metadata),
                **customer,
            }
        )
    if errors:
        return BatchCheck([], SERVICE_STAGE, errors)
    return BatchCheck(clean)


# Polar's error text for a token it does not know (not a secret).
INVALID_TOKEN_MESSAGE = (
    "The access token provided is expired, revoked, malformed, or invalid for other reasons."  # noqa: S105
)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def _gate(request: Request, state: EmulatorState) -> Response | None:
    """Latency, the rate window, auth and random 429/5xx: what happens before the handler."""
    config = state.config
    delay = config.latency_ms
    if config.latency_jitter_ms:
        with state.lock:
            delay += state.rng.uniform(0, config.latency_jitter_ms)
    if delay > 0:
        await asyncio.sleep(delay / 1000)
    with state.lock:
        retry_after = state.count_request()
        if retry_after is not None:
            return Response(status_code=429, headers={"Retry-After": str(int(retry_after))})
        token = _bearer(request)
        if token not in config.accepted_tokens:
            state.stats.status_401 += 1
            if not token:  # as Polar answers (tests/contract/fixtures/auth_401.json)
                return JSONResponse(
                    {"error": "Unauthorized", "detail": "Unauthorized"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="polar"'},
                )
            return JSONResponse(
                {"error": "invalid_token", "error_description": INVALID_TOKEN_MESSAGE},
                status_code=401,
                headers={
                    "WWW-Authenticate": f'Bearer realm="polar", error="invalid_token", '
                    f'error_description="{INVALID_TOKEN_MESSAGE}"'
                },
            )
        if state.chance(config.rate_429_rate):
            state.stats.status_429 += 1
            return Response(status_code=429, headers={"Retry-After": "1"})
    return None


def build_app(state: EmulatorState) -> Starlette:
    async def ingest(request: Request) -> Response:
        if "content-length" not in request.headers:
            return JSONResponse({"detail": "Length Required"}, status_code=411)
        if int(request.headers["content-length"]) > MAX_BODY_BYTES:
            return JSONResponse({"detail": "Request Entity Too Large"}, status_code=413)
        refused = await _gate(request, state)
        if refused is not None:
            return refused
        body = await request.body()
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as exc:
            return JSONResponse(
                {"error": SCHEMA_STAGE, "detail": schemas.json_error(exc)}, status_code=422
            )
        with state.lock:
            state.stats.ingest_requests += 1
            if state.chance(state.config.error_5xx_rate):
                state.stats.injected_5xx += 1
                return JSONResponse({"detail": "injected 503"}, status_code=503)
            if state.config.unattributed_422_next > 0:
                state.config.unattributed_422_next -= 1
                state.stats.status_422 += 1
                state.stats.unattributed_422 += 1
                return JSONResponse(
                    {"error": SCHEMA_STAGE, "detail": UNATTRIBUTED_DETAIL}, status_code=422
                )
            check = validate_batch(state, payload, body)
            if check.stage is not None:
                state.stats.status_422 += 1
                return JSONResponse({"error": check.stage, "detail": check.errors}, 422)
            if state.overflows_meter_events(check.events):
                state.stats.meter_event_overflows += 1
                return Response("Internal Server Error", status_code=500)
            inserted, duplicates = state.store(check.events)
            state.stats.accepted_batches += 1
            state.stats.accepted_batch_sizes.append(len(check.events))
            if state.chance(state.config.accept_then_drop_rate):
                state.stats.dropped_after_store += 1
                return JSONResponse({"detail": "injected: stored, then failed"}, status_code=502)
        log.info("ingest: %d inserted, %d duplicates", inserted, duplicates)
        return JSONResponse({"inserted": inserted, "duplicates": duplicates})

    async def list_events(request: Request) -> Response:
        refused = await _gate(request, state)
        if refused is not None:
            return refused
        if state.config.events_list_status is not None:
            return Response("Internal Server Error", status_code=state.config.events_list_status)
        q = request.query_params
        errors = []
        numbers = {}
        for key, default in (("page", "1"), ("limit", "10")):
            raw = q.get(key, default)
            try:
                numbers[key] = int(raw)
            except ValueError:
                errors.append(
                    _error(
                        ["query", key],
                        "Input should be a valid integer, unable to parse string as an integer",
                        "int_parsing",
                        raw,
                    )
                )
                continue
            if numbers[key] <= 0:
                error = _error(
                    ["query", key], "Input should be greater than 0", "greater_than", raw
                )
                errors.append({**error, "ctx": {"gt": 0}})
        if errors:
            return JSONResponse({"error": SCHEMA_STAGE, "detail": errors}, 422)
        page, limit = numbers["page"], min(100, numbers["limit"])  # Polar clamps the limit
        names = q.getlist("name")
        customers = q.getlist("external_customer_id")
        start = _parse_timestamp(q.get("start_timestamp"))
        end = _parse_timestamp(q.get("end_timestamp"))
        meta = {
            key[len("metadata[") : -1]: value
            for key, value in q.multi_items()
            if key.startswith("metadata[") and key.endswith("]")
        }
        with state.lock:
            state.stats.list_requests += 1
            matches = [
                e
                for e in state.events
                if (not names or e.name in names)
                and (not customers or e.external_customer_id in customers)
                and (start is None or e.timestamp > start)
                and (end is None or e.timestamp < end)
                and all(str(e.metadata.get(k)) == v for k, v in meta.items())
            ]
        descending = q.get("sorting", "-timestamp").startswith("-")
        matches.sort(key=lambda e: e.timestamp, reverse=descending)
        total = len(matches)
        items = [e.public() for e in matches[(page - 1) * limit : page * limit]]
        max_page = -(-total // limit)  # ceil: 0 when nothing matches, as Polar answers
        return JSONResponse(
            {"items": items, "pagination": {"total_count": total, "max_page": max_page}}
        )

    async def list_meters(request: Request) -> Response:
        refused = await _gate(request, state)
        if refused is not None:
            return refused
        meters = state.config.meters
        return JSONResponse(
            {"items": meters, "pagination": {"total_count": len(meters), "max_page": 1}}
        )

    async def meter_quantities(request: Request) -> Response:
        refused = await _gate(request, state)
        if refused is not None:
            return refused
        with state.lock:
            state.stats.quantities_requests += 1
        return quantities_response(state, request.path_params["meter_id"], request.query_params)

    async def get_product(request: Request) -> Response:
        refused = await _gate(request, state)
        if refused is not None:
            return refused
        product = state.config.products.get(request.path_params["product_id"])
        if product is None:
            return JSONResponse({"error": "ResourceNotFound", "detail": "Not found"}, 404)
        return JSONResponse(product)

    # -- control API --------------------------------------------------------------------------

    async def config(request: Request) -> Response:
        if request.method == "POST":
            try:
                state.configure(await request.json())
            except (ValueError, TypeError) as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
        return JSONResponse(state.config.as_dict())

    async def reset(_: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def stats(_: Request) -> Response:
        with state.lock:
            data = dict(vars(state.stats))
            data["events_stored"] = len(state.events)
        return JSONResponse(data)

    async def all_events(_: Request) -> Response:
        with state.lock:
            return JSONResponse([e.full() for e in state.events])

    async def totals(_: Request) -> Response:
        return JSONResponse(state.totals())

    async def send_meter_credits(request: Request) -> Response:
        """Send a signed Meter Credits webhook (a grant of `units` to `customer_id`) to
        `url` (default: the configured webhook_url), as Polar would; answer what it got."""
        try:
            body = await request.json()
            customer_id = body["customer_id"]
            units = body.get("units", 10)
            if not isinstance(customer_id, str) or not isinstance(units, int) or units < 1:
                raise TypeError("customer_id must be a string and units an integer >= 1")
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse(
                {"detail": f'give {{"customer_id": "...", "units": N}}: {exc}'}, 400
            )
        url = body.get("url") or state.config.webhook_url
        secret = body.get("secret") or state.config.webhook_secret
        if not url or not secret:
            return JSONResponse(
                {"detail": "no webhook url or secret: give url and secret, or configure them"},
                400,
            )
        meter_id = body.get("meter_id") or state.config.meters[0]["id"]
        payload = webhooks.meter_credits_granted(customer_id, units, meter_id)
        content, headers = webhooks.signed_request(payload, secret)
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                answer = await client.post(url, content=content, headers=headers)
            except httpx.HTTPError as exc:
                return JSONResponse({"detail": f"{url}: {type(exc).__name__}: {exc}"}, 502)
        try:
            answered: Any = answer.json()
        except ValueError:
            answered = answer.text
        return JSONResponse(
            {"sent_to": url, "status": answer.status_code, "response": answered, "payload": payload}
        )

    async def delete_event(request: Request) -> Response:
        deleted = state.delete(request.path_params["external_id"])
        return JSONResponse({"deleted": deleted}, status_code=200 if deleted else 404)

    return Starlette(
        routes=[
            Route("/v1/events/ingest", ingest, methods=["POST"]),
            Route("/v1/events/", list_events, methods=["GET"]),
            Route("/v1/meters/", list_meters, methods=["GET"]),
            Route("/v1/meters/{meter_id}/quantities", meter_quantities, methods=["GET"]),
            Route("/v1/products/{product_id}", get_product, methods=["GET"]),
            Route("/_emulator/config", config, methods=["GET", "POST"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/_emulator/stats", stats, methods=["GET"]),
            Route("/_emulator/events", all_events, methods=["GET"]),
            Route("/_emulator/totals", totals, methods=["GET"]),
            Route("/_emulator/events/{external_id}", delete_event, methods=["DELETE"]),
            Route("/_emulator/webhooks/meter-credits", send_meter_credits, methods=["POST"]),
        ]
    )


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """The emulator app with fresh state (reachable as `app.state.emulator`)."""
    state = EmulatorState(config)
    app = build_app(state)
    app.state.emulator = state
    return app
