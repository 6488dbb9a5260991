"""Validation errors read as the client's own fields, in the OpenAI error shape."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ember.server import protocol as P
from ember.server.errors import install_error_handlers


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest) -> dict:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest) -> dict:
        return {"ok": True}

    return TestClient(app)


def error(r) -> dict:
    assert r.status_code == 400, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    return body


def test_a_body_that_is_not_json_says_so_and_where(client):
    r = client.post(
        "/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    e = error(r)
    assert e["message"].startswith("The request body is not valid JSON: ")
    assert "(at character " in e["message"] and e["param"] is None


def test_a_body_that_is_not_utf8_says_so_and_where(client):
    body = b'{"prompt": "caf\xe9"}'
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    e = error(r)
    assert e["message"].startswith("The request body is not utf-8 text: "), e
    assert e["message"].endswith(f"at byte {body.index(0xE9)}."), e


def test_a_body_nested_past_the_parser_limit_says_so(client):
    body = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    e = error(r)
    assert e["message"] == "The request body nests too deeply to be read as JSON.", e


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_no_number_is_named_as_such(client, value):
    # Python's JSON reader takes these; a bound ("less than or equal to 2") would be the wrong
    # complaint.
    for field in ("temperature", "top_p", "presence_penalty"):
        body = f'{{"prompt": "hi", "{field}": {value}}}'.encode()
        r = client.post(
            "/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
        e = error(r)
        assert e["param"] == field and e["message"] == f"{field}: Input should be a finite number"


def test_union_members_do_not_leak_into_the_field_path(client):
    e = error(client.post("/v1/completions", json={"prompt": ""}))
    assert e["param"] == "prompt"
    assert e["message"] == "prompt: String should have at least 1 character"
    e = error(client.post("/v1/completions", json={"prompt": [1.5]}))
    assert e["param"] == "prompt.0", e
    assert "valid integer" in e["message"], e  # the token-id member: the input was a list
    e = error(client.post("/v1/completions", json={"prompt": ["hi"] * (P.MAX_PROMPTS + 1)}))
    assert e["param"] == "prompt", e  # too many texts, not "should be a valid integer"
    assert f"at most {P.MAX_PROMPTS} items" in e["message"], e
    e = error(client.post("/v1/completions", json={"prompt": []}))
    assert e["message"].startswith("prompt: List should have at least 1 item"), e
    e = error(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]})
    )
    assert e["param"] == "messages.0.content", e


def test_other_fields_at_fault_are_counted_once_each(client):
    e = error(client.post("/v1/completions", json={"prompt": "", "n": 0, "temperature": "hot"}))
    assert e["param"] in ("prompt", "n", "temperature")
    assert e["message"].endswith("(and 2 more fields with problems)"), e
