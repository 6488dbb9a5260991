"""/v1/responses and response_format in process, on the tiny random Llama: fast checks of the
shapes the openai SDK reads (its own parsers and stream accumulator), and of schema guarantees
under a model that writes noise."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "word": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "word"],
    "additionalProperties": False,
}


def test_response_from_a_string(tiny_sdk):
    r = tiny_sdk.responses.create(
        model="tiny", input="hello", instructions="be brief", max_output_tokens=5
    )
    assert r.object == "response" and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.output[0].status == "incomplete" and r.output_text  # cut off, text kept
    assert r.usage.output_tokens == 5 and r.usage.total_tokens > 5
    # The sampling it ran with, as OpenAI echoes it: unset means the defaults, not null.
    assert (r.temperature, r.top_p) == (1.0, 1.0)
    greedy = tiny_sdk.responses.create(
        model="tiny", input="hello", temperature=0, max_output_tokens=2
    )
    assert (greedy.temperature, greedy.top_p) == (0.0, 1.0)


def test_response_text_format_always_validates(tiny_sdk):
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        r = tiny_sdk.responses.create(
            model="tiny",
            input="x",
            text=fmt,
            temperature=1.0,
            max_output_tokens=60,
            extra_body={"seed": seed},
        )
        assert r.status == "completed" and r.output[0].status == "completed"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)


def test_response_stream_events_and_final_response(tiny_sdk):
    kw = dict(model="tiny", input=[{"role": "user", "content": "count"}], max_output_tokens=6)
    with tiny_sdk.responses.stream(temperature=0, **kw) as stream:
        events = list(stream)
    final = events[-1].response  # the SDK's accumulator only finishes on response.completed
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == deltas
    assert final.output[0].status == "incomplete"
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.status == "incomplete" and done.item.content[0].text == deltas
    assert tiny_sdk.responses.create(temperature=0, **kw).output_text == deltas


def test_chat_response_format_json_schema_streams_what_it_returns(tiny_sdk):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "x"}], response_format=fmt)
    whole = tiny_sdk.chat.completions.create(temperature=0, max_tokens=60, **kw)
    text = whole.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    chunks = tiny_sdk.chat.completions.create(stream=True, temperature=0, max_tokens=60, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": [{"type": "image_generation_call"}]}, "input.0"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frob"}}}},
            "text.format",
        ),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),  # past the context
        # Each of these once answered 500 (and the connection closed) or ran as text.
        ({"tool_choice": {"type": "allowed_tools", "tools": 5}}, "tool_choice.tools"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
            "input.0.content.0.text",
        ),
        ({"input": [{"role": "user"}]}, "input.0.content"),
        ({"input": [{"type": "function_call_output", "output": "4"}]}, "input.0.call_id"),
        # As OpenAI: a function_call item given back needs its call_id and arguments.
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"input": [{"type": "function_call", "name": "f", "call_id": "c"}]}, "input.0.arguments"),
        (
            {"input": [{"type": "function_call", "name": "f", "call_id": "c", "arguments": {}}]},
            "input.0.arguments",
        ),
        ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input.0.name"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {}, "strict": "yes"}]},
            "tools.0.strict",
        ),
    ],
)
def test_responses_bad_requests_are_400(tiny_sdk, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_sdk.responses.create(**{"model": "tiny", "input": "x", **body})
    assert e.value.body["param"] == param


def test_a_completed_stream_is_accumulated_by_the_sdk(tiny_sdk):
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA}}
    kw = dict(model="tiny", input="x", text=fmt, max_output_tokens=60, temperature=0)
    with tiny_sdk.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.status == "completed"
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    assert final.output_text == tiny_sdk.responses.create(**kw).output_text


def test_output_text_logprobs_when_included(tiny_sdk):
    kw = dict(
        model="tiny",
        input="count",
        max_output_tokens=6,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    r = tiny_sdk.responses.create(**kw)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 6
    assert "".join(t.token for t in part.logprobs) == part.text
    for t in part.logprobs:
        assert len(t.top_logprobs) == 2 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-6  # greedy: the top token
        if "\ufffd" not in t.token:  # else part of a character: its own bytes, not U+FFFD's
            assert bytes(t.bytes).decode() == t.token
    spelled = b"".join(bytes(t.bytes) for t in part.logprobs)
    assert spelled.decode("utf-8", "replace") == part.text
    with tiny_sdk.responses.stream(**kw) as stream:
        events = list(stream)
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in part.logprobs
    ]
    assert len(done.logprobs) == len(streamed)
    plain = tiny_sdk.responses.create(**{k: v for k, v in kw.items() if k != "include"})
    assert plain.output[0].content[0].logprobs == []  # only when included


def test_truncation_auto_drops_the_oldest_turns_until_the_input_fits(tiny_sdk):
    """OpenAI's truncation "auto": past the context window, the conversation's oldest items go
    (a call with its output), the instructions and the newest turn stay; "disabled" is a 400."""
    long = "the quick brown fox " * 2
    turns = []
    for i in range(8):
        turns += [
            {"role": "user", "content": f"{i} {long}"},
            {"type": "function_call", "call_id": f"c{i}", "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{i}", "output": long},
            {"role": "assistant", "content": long},
        ]
    turns.append({"role": "user", "content": "and now?"})
    kw = dict(model="tiny", input=turns, instructions="be brief", max_output_tokens=4)
    for truncation in ("disabled", None):
        with pytest.raises(openai.BadRequestError) as e:
            tiny_sdk.responses.create(**kw, **({"truncation": truncation} if truncation else {}))
        assert e.value.body["code"] == "context_length_exceeded"
    r = tiny_sdk.responses.create(**kw, truncation="auto")
    assert r.truncation == "auto" and r.usage.output_tokens > 0
    assert 512 - 4 - 180 < r.usage.input_tokens <= 512 - 4  # only as much dropped as needed
    last = tiny_sdk.responses.create(**{**kw, "input": turns[-1:]}, truncation="auto")
    assert last.usage.input_tokens < r.usage.input_tokens
    # The newest turn alone past the window: nothing can be dropped, still a 400.
    with pytest.raises(openai.BadRequestError) as e:
        tiny_sdk.responses.create(**{**kw, "input": long * 40}, truncation="auto")
    assert e.value.body["code"] == "context_length_exceeded"
