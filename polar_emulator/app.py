"""The emulator's HTTP surface: Polar's /v1 endpoints we use, and a control API (/_emulator)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from polar_emulator.meters import quantities_response
from polar_emulator.state import EmulatorConfig, EmulatorState

log = logging.getLogger("polar_emulator")

MAX_BODY_BYTES = 10 * 1024 * 1024
SCHEMA_VARIANT = "EventCreateExternalCustomer"


def _error(loc: list[Any], msg: str, type_: str, value: Any = None) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": type_, "input": value}


def _parse_timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def validate_batch(
    state: EmulatorState, events: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Polar's validation of a batch: (clean events, errors). Schema errors name the union
    variant, service errors (future timestamp, refused customer) the field alone."""
    if not isinstance(events, list):
        return [], [_error(["body", "events"], "Input should be a valid list", "list_type")]
    config = state.config
    errors: list[dict[str, Any]] = []
    clean: list[dict[str, Any]] = []
    now = state.now()
    for i, event in enumerate(events):
        base = ["body", "events", i, SCHEMA_VARIANT]
        if not isinstance(event, dict):
            errors.append(_error(["body", "events", i], "Input should be an object", "dict_type"))
            continue
        name = event.get("name")
        if not isinstance(name, str) or not name:
            errors.append(_error([*base, "name"], "Field required", "missing"))
        customer = event.get("external_customer_id", event.get("customer_id"))
        if not isinstance(customer, str) or not customer:
            errors.append(_error([*base, "external_customer_id"], "Field required", "missing"))
        raw_ts = event.get("timestamp")
        timestamp = now if raw_ts is None else _parse_timestamp(raw_ts)
        if timestamp is None:
            errors.append(
                _error([*base, "timestamp"], "Input should be a valid datetime", "datetime_type")
            )
        elif timestamp.tzinfo is None:
            errors.append(
                _error([*base, "timestamp"], "Input should have timezone info", "timezone_aware")
            )
        metadata = event.get("metadata", {})
        if not isinstance(metadata, dict):
            errors.append(_error([*base, "metadata"], "Input should be an object", "dict_type"))
            metadata = {}
        for key, value in metadata.items():
            ok = isinstance(value, bool | int | float) or (
                isinstance(value, str) and 1 <= len(value) <= 500
            )
            if not ok:
                errors.append(
                    _error(
                        [*base, "metadata", key],
                        "Input should be a string (1-500 characters), a number or a boolean",
                        "metadata_value",
                        value,
                    )
                )
        if errors and errors[-1]["loc"][2] == i:
            continue
        # Service-level rules, checked by Polar after the schema.
        assert timestamp is not None
        if timestamp > now:
            errors.append(
                _error(
                    ["body", "events", i, "timestamp"],
                    "Timestamp must be in the past.",
                    "value_error",
                    raw_ts,
                )
            )
            continue
        if customer in config.reject_customers:
            errors.append(
                _error(
                    ["body", "events", i, "external_customer_id"],
                    f"Customer {customer} is not accepted (emulator reject_customers).",
                    "value_error",
                    customer,
                )
            )
            continue
        clean.append({**event, "timestamp": timestamp, "metadata": metadata})
    return clean, errors


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
        if _bearer(request) not in config.accepted_tokens:
            state.stats.status_401 += 1
            return JSONResponse(
                {"error": "Unauthorized", "detail": "Invalid or missing access token."},
                status_code=401,
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
        except ValueError:
            return JSONResponse(
                {"detail": [_error(["body"], "JSON decode error", "json_invalid")]},
                status_code=422,
            )
        with state.lock:
            state.stats.ingest_requests += 1
            if state.chance(state.config.error_5xx_rate):
                state.stats.injected_5xx += 1
                return JSONResponse({"detail": "injected 503"}, status_code=503)
            events = payload.get("events") if isinstance(payload, dict) else None
            clean, errors = validate_batch(state, events)
            if errors:
                state.stats.status_422 += 1
                return JSONResponse({"detail": errors}, status_code=422)
            inserted, duplicates = state.store(clean)
            state.stats.accepted_batches += 1
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
        try:
            page = max(1, int(q.get("page", "1")))
            limit = min(100, max(1, int(q.get("limit", "10"))))
        except ValueError:
            return JSONResponse({"detail": [_error(["query", "page"], "bad int", "int")]}, 422)
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
        max_page = max(1, -(-total // limit))
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
        ]
    )


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """The emulator app with fresh state (reachable as `app.state.emulator`)."""
    state = EmulatorState(config)
    app = build_app(state)
    app.state.emulator = state
    return app
