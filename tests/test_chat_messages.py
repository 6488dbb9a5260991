"""How a chat request's messages become the template's messages: content parts, roles, calls."""

from __future__ import annotations

import pytest

from ember.server import protocol as P
from ember.server.errors import APIError
from ember.server.routes.chat import message_dicts


def _dicts(messages: list[dict]) -> list[dict]:
    return message_dicts(P.ChatCompletionRequest(model="m", messages=messages))


def test_text_parts_are_joined_by_newlines():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert _dicts([{"role": "user", "content": parts}])[0]["content"] == "first\nsecond"


def test_an_assistant_refusal_part_is_its_text():
    """OpenAI's assistant content parts are text or refusal; history replays both."""
    parts = [{"type": "refusal", "refusal": "I can't help with that."}]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": parts}]
    assert _dicts(messages)[1] == {"role": "assistant", "content": "I can't help with that."}


@pytest.mark.parametrize(
    "role, part",
    [
        ("user", {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
        ("user", {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}),
        ("user", {"type": "refusal", "refusal": "a user does not refuse"}),
        ("assistant", {"type": "text"}),
    ],
)
def test_parts_that_are_not_text_are_a_400_naming_the_message(role, part):
    messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": [part]}]
    with pytest.raises(APIError) as e:
        _dicts(messages)
    assert e.value.param == "messages.1.content"
    assert repr(part["type"]) in str(e.value)


def test_developer_is_a_system_message_and_a_legacy_function_answers_its_call():
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": "{}"}},
        {"role": "function", "name": "w", "content": "sunny"},
    ]
    system, _, call, answer = _dicts(messages)
    assert system == {"role": "system", "content": "Be brief."}
    assert call["tool_calls"][0]["function"] == {"name": "w", "arguments": {}}
    assert answer["role"] == "tool" and answer["tool_call_id"] == call["tool_calls"][0]["id"]
