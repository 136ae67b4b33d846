"""The OpenAPI schema, completed with what FastAPI cannot see: the statuses every route may
answer (413, 431, 500, 503), the links between operations, and the reserved metadata key as
configured. (The bearer security scheme comes from api.deps.BEARER.)"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.schemas import RESERVED_KEYS
from outbox.settings import Settings
from outbox.validation import MAX_ID, RESERVED_METADATA_KEYS

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
COMMON_RESPONSES: dict[str, str] = {
    "431": "headers_too_large: the request headers are over 16 KiB or 100 headers",
    "500": "internal_error: an unexpected error (logged); nothing was recorded",
}
BODY_TOO_LARGE = "request_too_large: the body is over 256 KiB"
# api.app.body_limit: Polar's webhooks may be larger (Polar documents no size for them).
WEBHOOK_BODY_TOO_LARGE = {"/v1/polar/webhooks": "request_too_large: the body is over 10 MiB"}
UNAVAILABLE = (
    "database_unavailable (or `locked`, `overloaded`, `database_timeout`): nothing was "
    "recorded, retry after `Retry-After`; outcome_unknown: the commit was sent and no answer "
    "came, it may have been recorded: retry with the same Idempotency-Key"
)
WITHOUT_DATABASE = {"/healthz"}
INTEGERS = (
    'Integers are JSON integers: `1.0` or `"1"` is refused where an integer is asked. '
    'Errors are `{"code", "detail", "field"?}`; `code` is machine-readable.'
)


def _operation_ids(spec: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (method, path): operation["operationId"]
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    }


def _links(spec: dict[str, Any]) -> None:
    """Links from what creates to what reads or closes it (Swagger shows them; schemathesis
    follows them in its stateful run)."""
    ids = _operation_ids(spec)
    credits = ids[("get", "/v1/customers/{customer_id}/credits")]
    usage = ids[("get", "/v1/customers/{customer_id}/usage")]
    capture = ids[("post", "/v1/holds/{hold_id}/capture")]
    release = ids[("post", "/v1/holds/{hold_id}/release")]
    spend = ids[("post", "/v1/usage")]
    reserve = ids[("post", "/v1/holds")]
    refund = ids[("post", "/v1/usage/{event_id}/refunds")]
    granted = "$request.path.customer_id"
    customer = "$response.body#/customer_id"

    def of_customer(expression: str) -> dict[str, Any]:
        return {
            "credits": {"operationId": credits, "parameters": {"customer_id": expression}},
            "usage": {"operationId": usage, "parameters": {"customer_id": expression}},
        }

    hold = "$response.body#/hold_id"
    links = {
        ("post", "/v1/customers/{customer_id}/grants", "201"): of_customer(granted),
        ("get", "/v1/customers/{customer_id}/credits", "200"): {
            # A request body with this customer in it (the id as the body spells it, decoded).
            "spend": {"operationId": spend, "requestBody": {"customer_id": customer}},
            "hold": {"operationId": reserve, "requestBody": {"customer_id": customer}},
        },
        ("post", "/v1/usage", "201"): {
            **of_customer("$request.body#/customer_id"),
            "refund": {
                "operationId": refund,
                "parameters": {"event_id": "$response.body#/event_id"},
            },
        },
        ("post", "/v1/holds", "201"): {
            **of_customer("$request.body#/customer_id"),
            "capture": {"operationId": capture, "parameters": {"hold_id": hold}},
            "release": {"operationId": release, "parameters": {"hold_id": hold}},
        },
    }
    for (method, path, status), link in links.items():
        spec["paths"][path][method]["responses"][status]["links"] = link


def _reserved_metadata_key(node: Any, credits_field: str) -> None:
    """USAGE_CREDITS_FIELD renames the reserved `credits_used`: the schema follows it."""
    if isinstance(node, dict):
        names = node.get("propertyNames")
        if isinstance(names, dict) and names.get("not") == {"enum": RESERVED_KEYS}:
            names["not"] = {"enum": sorted(RESERVED_METADATA_KEYS | {credits_field})}
            node["description"] = node["description"].replace(
                "`credits_used`", f"`{credits_field}`"
            )
        for value in node.values():
            _reserved_metadata_key(value, credits_field)
    elif isinstance(node, list):
        for value in node:
            _reserved_metadata_key(value, credits_field)


def _exact_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model types `minimum`/`maximum` as floats: `1000000.0`, and 2^63-1
    rounded up to 2^63. Integers again, exactly (the only bound past 2^53 is MAX_ID)."""
    if isinstance(node, dict):
        for key in ("minimum", "maximum"):
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                if abs(value) <= 2**53:
                    node[key] = int(value)
                elif value == float(MAX_ID):
                    node[key] = MAX_ID
                else:
                    raise ValueError(f"a bound the schema cannot state exactly: {value}")
        for value in node.values():
            _exact_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_bounds(value)


def build_schema(app: FastAPI, settings: Settings) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=f"{app.description}\n\n{INTEGERS}",
        routes=app.routes,
    )
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            if method == "post":
                too_large = WEBHOOK_BODY_TOO_LARGE.get(path, BODY_TOO_LARGE)
                responses.setdefault("413", {"description": too_large, "content": ERROR})
            for status, description in COMMON_RESPONSES.items():
                responses.setdefault(status, {"description": description, "content": ERROR})
            if path == "/readyz":
                responses.setdefault(
                    "503", {"description": "not_ready: the same body, with what failed"}
                )
            elif path not in WITHOUT_DATABASE:
                responses.setdefault("503", {"description": UNAVAILABLE, "content": ERROR})
    _exact_bounds(spec)
    _links(spec)
    if settings.usage_credits_field != "credits_used":
        _reserved_metadata_key(spec, settings.usage_credits_field)
    return spec


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve `build_schema` at /openapi.json (and /docs), built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
