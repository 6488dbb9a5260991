"""/openapi.json says what the server accepts and answers, and the server keeps to it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from ember.config import EngineConfig
from ember.server import protocol as P
from ember.server.app import build_app
from ember.server.state import ServerConfig


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No `with`: the lifespan (which loads the model) does not run; the document needs none.
    return TestClient(build_app(EngineConfig(), ServerConfig(["smol"])))


@pytest.fixture(scope="module")
def document(client) -> dict:
    return client.get("/openapi.json").json()


def test_operation_ids_are_unique(document):
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), ids


def test_every_optional_request_field_takes_null_and_required_ones_do_not(document):
    schemas = document["components"]["schemas"]
    for model in (P.ChatCompletionRequest, P.CompletionRequest, P.EmbeddingRequest):
        schema = schemas[model.__name__]
        for name, prop in schema["properties"].items():
            takes_null = {"type": "null"} in prop.get("anyOf", [])
            assert takes_null == (name not in schema.get("required", [])), (model, name, prop)


def test_streamed_routes_document_server_sent_events(document):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, path
        # OpenAPI reads an event stream's schema as each event's: an object of its fields.
        event = content["text/event-stream"]["schema"]
        assert event["type"] == "object" and "data" in event["required"], path


def test_a_405_on_health_lists_both_of_its_methods(client):
    r = client.options("/health")
    assert r.status_code == 405
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == ["GET", "HEAD"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", "16"),  # a number in a string
        ("seed", False),  # a boolean where a number goes
        ("n", 2.5),
        ("temperature", True),
        ("stream", "true"),
        ("logprobs", 1),  # chat's logprobs is a boolean
        ("stop", 5),
    ],
)
def test_json_types_are_not_coerced(field, value):
    """OpenAI's types, not pydantic's lax reading: each of these is a 400 naming the field."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], field: value}
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest.model_validate(body)
    assert e.value.errors()[0]["loc"][0] == field


def test_a_whole_float_where_an_int_goes_is_that_int():
    """JSON Schema's integer includes 256.0, which client arithmetic produces."""
    body = {"model": "m", "prompt": "Hi", "max_tokens": 256.0, "n": 2.0, "temperature": 1}
    req = P.CompletionRequest.model_validate(body)
    assert (req.max_tokens, req.n, req.temperature) == (256, 2, 1.0)
    assert type(req.max_tokens) is int and type(req.n) is int


@pytest.mark.parametrize(
    "body, valid",
    [
        ({"prompt": "Hi"}, True),
        ({"messages": [{"role": "user", "content": "Hi"}]}, True),
        ({"prompt": "Hi", "messages": None}, True),  # null is unset
        ({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}, False),
        ({}, False),
        ({"prompt": None, "messages": None}, False),
    ],
)
def test_tokenize_takes_exactly_one_of_prompt_and_messages(document, body, valid):
    """As the route does (routes/admin.py), so fuzzers send bodies it accepts."""
    import jsonschema

    schema = {"$ref": "#/components/schemas/TokenizeRequest", **document}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
    assert (not errors) == valid, errors
