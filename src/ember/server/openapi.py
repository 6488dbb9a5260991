"""/openapi.json that tells the truth, so schema-driven clients and fuzzers are not misled.

FastAPI's generated document says 422 for invalid bodies (Ember answers 400), knows nothing of
the errors routes raise, calls /metrics JSON, and leaves untyped what the OpenAI routes return.
Here the document is corrected once: every error status a route can give, with the one error
schema; the response bodies and their media types (JSON, or SSE when `stream` is true); the
Retry-After header of a 503; text/plain for /metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ember.server import protocol as P

REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            },
        }
    },
}

WHY = {
    400: "Invalid request: a field is missing, of the wrong type, or out of range.",
    401: "Missing or wrong API key (when the server has keys).",
    404: "Unknown model.",
    413: "The request body is over the server's limit.",
    500: "An internal error while handling this request; other requests are not affected.",
    503: "Overloaded (admission bound reached), still loading, shutting down, or the engine "
    "stopped. Retry after Retry-After seconds.",
    504: "The request ran past the server's --request-timeout and was aborted.",
}

# JSON responses of the OpenAI routes.
BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): P.ChatCompletionResponse,
    ("/v1/completions", "post"): P.CompletionResponse,
}


def _sse_event(*fields: str) -> dict[str, Any]:
    """One server-sent event, as OpenAPI reads an event stream's schema: an object of its
    fields."""
    return {
        "type": "object",
        "required": list(fields),
        "properties": {name: {"type": "string"} for name in fields},
    }


CHUNK_EVENTS = {
    "schema": _sse_event("data"),
    "description": "With `stream: true`: `data: {chunk}` events, then `data: [DONE]`.",
}
# The routes that stream with `stream: true`, and their events.
STREAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/chat/completions", "post"): CHUNK_EVENTS,
    ("/v1/completions", "post"): CHUNK_EVENTS,
    ("/v1/responses", "post"): {
        "schema": _sse_event("event", "data"),
        "description": "With `stream: true`: `event: response.*` events, each with its "
        "`data: {event}`.",
    },
}
# Routes that load the model's state (get_state) or check `model`.
NEEDS_MODEL = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
# Routes whose engine work is cut off at --request-timeout.
TIMED = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
PROTECTED = ("/v1/", "/dashboard/", "/tokenize", "/detokenize")


def _error(status: int, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": WHY[status],
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
    }
    if retry_after:
        out["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string"},
            }
        }
    return out


def _add_model(schema: dict, model: type[BaseModel]) -> dict:
    js = model.model_json_schema(ref_template=REF, mode="serialization")
    defs = js.pop("$defs", {})
    comps = schema["components"]["schemas"]
    comps.update({k: v for k, v in defs.items() if k not in comps})
    comps.setdefault(model.__name__, js)
    return {"$ref": REF.format(model=model.__name__)}


def truthful_openapi(app: FastAPI, metrics_require_key: bool) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, description=__doc__.splitlines()[0], routes=app.routes
    )
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    comps["ErrorResponse"] = ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            has_body = "requestBody" in op
            if has_body:
                responses["400"] = _error(400)
                responses["413"] = _error(413)
            if path.startswith(PROTECTED) or (path == "/metrics" and metrics_require_key):
                responses["401"] = _error(401)
            if path.startswith(NEEDS_MODEL) or path.startswith("/v1/models/"):
                responses["404"] = _error(404)
            if path.startswith("/v1/models/{"):
                responses.setdefault("400", _error(400))  # a path that is not a model name
            if path.startswith(TIMED):
                responses["504"] = _error(504)
            if path != "/metrics":  # everything else answers 503 while shutting down
                responses["503"] = _error(503, retry_after=True)
            if path.startswith(NEEDS_MODEL):
                responses["500"] = _error(500)
            if (path, method) in BODIES:
                body = {"schema": _add_model(schema, BODIES[(path, method)])}
                responses["200"] = {
                    "description": "The completion.",
                    "content": {"application/json": body},
                }
            if (path, method) in STREAMS:
                responses["200"]["content"]["text/event-stream"] = STREAMS[(path, method)]
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }
    health = {
        "200": {
            "description": "Ready: the model is loaded and has produced a token.",
            "content": {"application/json": {"schema": status}},
        },
        "503": {
            "description": "Loading, failed to load, shutting down, or the engine stopped.",
            "content": {"application/json": {"schema": {"anyOf": [status, ERROR_SCHEMA]}}},
        },
    }
    # One route answers GET and HEAD (routes/admin.py); FastAPI would give both one operationId.
    schema["paths"]["/health"] = {
        "get": {"summary": "Health", "operationId": "health", "responses": health},
        "head": {
            "summary": "Health, without a body",
            "operationId": "health_head",
            "responses": {code: {"description": r["description"]} for code, r in health.items()},
        },
    }
    schema["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return schema


def install_openapi(app: FastAPI, state: Any) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_openapi(app, state.config.limits.metrics_require_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
