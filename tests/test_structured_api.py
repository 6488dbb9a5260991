"""Structured outputs and /v1/responses over HTTP: the official openai client against a real
`ember serve` on the default model (the session `server` fixture)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import API_KEY

pytestmark = pytest.mark.slow
MODEL = "smol"


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)  # bounded: a finite number of digits


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "rank": {"type": "integer", "minimum": 1, "maximum": 100},
        "sunny": {"type": "boolean"},
    },
    "required": ["name", "rank", "sunny"],
    "additionalProperties": False,
}
ASK_CITY = [{"role": "user", "content": "Name a large city, as JSON."}]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def _post(server: str, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(server + path, json=body, headers=headers, timeout=120)


# ------------------------------------------------------------------ chat and completions


def test_parse_with_a_pydantic_model_gives_a_typed_result(client):
    for seed in range(1):
        r = client.chat.completions.parse(
            model=MODEL,
            messages=ASK_CITY,
            response_format=City,
            temperature=0.8,
            seed=seed,
            max_tokens=120,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, City)


def test_json_schema_streamed_and_whole_are_the_same_valid_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    kw = dict(model=MODEL, messages=ASK_CITY, response_format=fmt, temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(whole), CITY_SCHEMA)
    chunks = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_json_object_mode_gives_an_object(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=40,
    )
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_structured_outputs_extra_field_on_completions(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The best colour is",
        max_tokens=10,
        n=3,
        temperature=1.0,
        extra_body={"structured_outputs": {"choice": ["red", "green", "deep blue"]}},
    )
    assert {c.text for c in r.choices} <= {"red", "green", "deep blue"}
    r = client.completions.create(
        model=MODEL,
        prompt="Today's date:",
        max_tokens=12,
        extra_body={"structured_outputs": {"regex": "2[0-9]{3}-[01][0-9]-[0-3][0-9]"}},
    )
    text = r.choices[0].text
    assert len(text) == 10 and text[4] == text[7] == "-"


@pytest.mark.parametrize(
    "kind, value",
    [
        ("json", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
        ("regex", "[0-9]{3}"),
        ("choice", ["yes", "no", "maybe"]),
        ("grammar", 'start: "x" ("y" | "z")'),
    ],
)
def test_vllm_guided_fields_are_structured_outputs(client, kind, value):
    # vLLM's older guided_* names: same constraint, same seeded result.
    kw = dict(model=MODEL, prompt="Answer:", max_tokens=16, temperature=1.0, seed=3, n=2)
    new = client.completions.create(**kw, extra_body={"structured_outputs": {kind: value}})
    old = client.completions.create(**kw, extra_body={f"guided_{kind}": value})
    assert [c.text for c in old.choices] == [c.text for c in new.choices]
    if kind == "choice":
        assert {c.text for c in old.choices} <= set(value)
    if kind == "regex":
        assert all(len(c.text) == 3 and c.text.isdigit() for c in old.choices)


def test_a_short_max_tokens_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK_CITY, response_format=fmt, max_tokens=3
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def _nested(schema: dict, depth: int) -> dict:
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format",
            "frob",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a b", "schema": {}},
                }
            },
            "response_format.json_schema.name",
            "name",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"$ref": "#"}},
                            "required": ["a"],
                        },
                    },
                }
            },
            "response_format",
            "no finite value",
        ),
        (
            {"structured_outputs": {"json": _nested({"type": "string"}, 200)}},
            "structured_outputs",
            "nested more than 100 levels",
        ),
        (
            {"structured_outputs": {"json": "[" * 5000 + "]" * 5000}},  # text json.loads refuses
            "structured_outputs",
            "nested too deeply",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly"),
        ({"guided_json": {"type": "frob"}}, "guided_json", "frob"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "guided_choice"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "a"}}, "guided_regex", "several"),
        # A response_format beside them was once dropped without a word.
        (
            {"response_format": {"type": "json_object"}, "guided_choice": ["NOT JSON"]},
            "guided_choice",
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "several",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "array", "contains": {"const": 42}},
                    },
                }
            },
            "response_format",
            "cannot enforce the keyword(s) contains",
        ),
        # Past llguidance's parser limit (a choice is one lexer terminal, so any size).
        (
            {
                "structured_outputs": {
                    "grammar": "start: " + " | ".join(f'"i{i}"' for i in range(2001))
                }
            },
            "structured_outputs",
            "max is 2000",
        ),
    ],
)
def test_a_bad_schema_is_a_400_naming_the_problem(server, body, param, words):
    for stream in (False, True):
        r = _post(
            server,
            "/v1/chat/completions",
            {"model": MODEL, "messages": ASK_CITY, "stream": stream, **body},
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"]
        assert err["type"] == "invalid_request_error"


def _events(r: httpx.Response) -> list[dict]:
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    return [json.loads(ln) for ln in lines if ln != "[DONE]"]


@pytest.mark.parametrize(
    "ban",
    [{"allowed_token_ids": [5]}, {"logit_bias": {}}],
    ids=["allowed_token_ids", "logit_bias"],
)
def test_constraints_no_output_can_meet_together_are_a_400(server, client, ban):
    """A JSON object whose every opening token another rule bans: once a 200 "stop" with no
    JSON at all; now the request's own error, and the server goes on."""
    if "logit_bias" in ban:  # every token that can open an object, banned by -100
        ids = _post(server, "/tokenize", {"model": MODEL, "prompt": "{"}).json()["tokens"]
        ban = {"logit_bias": {str(t): -100 for t in ids}, "allowed_token_ids": ids + [5]}
    body = {
        "model": MODEL,
        "messages": ASK_CITY,
        "max_tokens": 20,
        "response_format": {"type": "json_object"},
        **ban,
    }
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and "no output can meet" in err["message"]
    r = _post(server, "/v1/chat/completions", {**body, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert _events(r)[-1]["error"]["param"] == "response_format"
    fine = client.chat.completions.create(
        model=MODEL, messages=ASK_CITY, max_tokens=30, response_format={"type": "json_object"}
    )
    assert fine.choices[0].message.content.lstrip().startswith("{")


def test_an_output_complete_where_other_rules_ban_its_end_stops_there(client):
    """min_tokens keeps eos away from an output the grammar says is whole: it ends there,
    as the grammar allows, rather than with a token outside it."""
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK_CITY,
        max_tokens=10,
        extra_body={"structured_outputs": {"regex": "a"}, "min_tokens": 5},
    )
    assert r.choices[0].message.content == "a" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


# ------------------------------------------------------------------ /v1/responses


def test_responses_create_with_a_string(client):
    r = client.responses.create(
        model=MODEL, input="Say hello.", instructions="Be brief.", max_output_tokens=16
    )
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text and r.output[0].type == "message"
    assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_responses_text_format_json_schema(client):
    r = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "A city as JSON."}]}],
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA}},
        temperature=0,
        max_output_tokens=80,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), CITY_SCHEMA)


def test_responses_parse_gives_a_typed_result(client):
    r = client.responses.parse(
        model=MODEL, input="Name a large city.", text_format=City, max_output_tokens=120
    )
    assert isinstance(r.output_parsed, City)


def test_responses_stream_events_in_order(client):
    kinds, deltas, final = [], [], None
    with client.responses.stream(
        model=MODEL, input="Count to five.", max_output_tokens=24, temperature=0
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        # The SDK's accumulator finishes only on response.completed (not on .incomplete).
        final = stream.get_final_response() if kinds[-1] == "response.completed" else event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert final.output_text == "".join(deltas)
    whole = client.responses.create(
        model=MODEL, input="Count to five.", max_output_tokens=24, temperature=0
    )
    assert whole.output_text == final.output_text


def test_responses_allowed_tools_calls_only_those(client):
    time_tool = {
        "type": "function",
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "get_time"}],
    }
    for seed in range(2):  # the question is about the weather; only get_time may be called
        r = client.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL, time_tool],
            tool_choice=choice,
            max_output_tokens=60,
            extra_body={"seed": seed},
        )
        calls = [o for o in r.output if o.type == "function_call"]
        assert [c.name for c in calls] == ["get_time"]
    bad = {**choice, "tools": [{"type": "function", "name": "rm_rf"}]}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", tools=[WEATHER_TOOL], tool_choice=bad)
    assert e.value.body["param"] == "tool_choice"


class Report(BaseModel):
    city: str = Field(max_length=20)
    temperature_c: int = Field(ge=-90, le=60)


@pytest.mark.parametrize(
    "text", ["What is the weather in Paris?", "Write a JSON report: Paris is 21 degrees."]
)
def test_responses_with_tools_and_a_text_format_call_or_answer(client, text):
    """Tools with tool_choice auto beside text.format: a function call whose arguments
    validate, or the answer parsed into the format (the default model, greedy, calls for the
    question and answers the report)."""
    r = client.responses.parse(
        model=MODEL,
        input=text,
        tools=[WEATHER_TOOL],
        text_format=Report,
        temperature=0,
        max_output_tokens=64,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    if text.startswith("What"):
        assert calls and r.output_parsed is None
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])
    else:
        assert not calls and isinstance(r.output_parsed, Report)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_forced_function_call_parses_and_validates(client, stream):
    kw = dict(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.done" in kinds
        response = events[-1].response
    else:
        response = client.responses.create(**kw)
    calls = [o for o in response.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_TOOL["parameters"])
    # The call's result goes back as input items; the reply is text.
    follow = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"},
        ],
        tools=[WEATHER_TOOL],
        max_output_tokens=16,
    )
    assert follow.output


def test_previous_response_id_is_a_clear_400(server):
    r = _post(
        server, "/v1/responses", {"model": MODEL, "input": "Hi", "previous_response_id": "resp_1"}
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "previous_response_id" and "stores no responses" in err["message"]


def test_retrieving_a_response_is_a_404_that_says_why(client):
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        client.responses.retrieve("resp_1")


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"text": {"format": {"type": "json_schema"}}}, "text.format.name"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}},
            "text.format.name",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": 5}}},
            "text.format.schema",
        ),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"truncation": "bogus"}, "truncation"),
        (
            {"input": [{"type": "function_call_output", "call_id": 5, "output": "x"}]},
            "input.0.call_id",
        ),
        ({"input": [{"type": "function_call", "arguments": "{}"}]}, "input.0.name"),
    ],
)
def test_a_bad_responses_field_is_named_as_the_client_sent_it(server, extra, param):
    """Checked as a chat request inside, but the error speaks of the Responses fields."""
    r = _post(server, "/v1/responses", {"model": MODEL, "input": "Hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "pydantic" not in err["message"] and "ChatCompletionRequest" not in err["message"]
    assert "response_format" not in err["message"], err


def test_backend_options_alone_beside_a_response_format_are_no_second_constraint(server):
    """vLLM's structured_outputs options (disable_any_whitespace...) with no constraint of their
    own go with a response_format, as vLLM merges them."""
    body = {
        "model": MODEL,
        "messages": ASK_CITY,
        "max_tokens": 20,
        "response_format": {"type": "json_object"},
        "structured_outputs": {"disable_any_whitespace": True},
    }
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith("{")
