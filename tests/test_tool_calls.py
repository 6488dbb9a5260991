"""OpenAI tool calling: the reply parsers, their selection, and the API end to end.

The parsers are checked on exact text, whole and streamed in pieces. The API is checked with the
official `openai` client against the session server (the default SmolLM2 model, whose ChatML
template gets Ember's Hermes-style tools template), where the 135M model's choices are not
predictable, so those tests assert shapes and invariants; and against an in-process ChatGLM3
server on a tiny random checkpoint, whose replies are scripted token by token so that the
ChatGLM3 path (special tokens kept, metadata lines, forced tool names) is checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from pydantic import BaseModel, Field

from ember.chat.tool_parsers import (
    ChatGLM3Parser,
    HermesParser,
    Llama3JsonParser,
    ParseResult,
    ToolParser,
    chatglm3_arguments,
    chatml_tools_template,
    make_parser,
    parser_for_template,
)

from conftest import API_KEY

# ------------------------------------------------------------------ helpers


def streamed(parser: ToolParser, text: str, size: int) -> tuple[ParseResult, list[str]]:
    """Feed `text` in pieces of `size` characters; the merged result and each content delta."""
    out, deltas = ParseResult(), []
    for i in range(0, len(text), size):
        step = parser.feed(text[i : i + size])
        deltas.append(step.content)
        out.merge(step)
    end = parser.finish()
    deltas.append(end.content)
    return out.merge(end), deltas


def calls_of(result: ParseResult) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


def same_streamed_and_whole(make: type[ToolParser], text: str, **kw) -> ParseResult:
    """Every chunking gives the whole-text result; returns that result."""
    whole = make(**kw).parse(text)
    for size in (1, 2, 3, 5, 8, 13, len(text) or 1):
        got, _ = streamed(make(**kw), text, size)
        assert got.content == whole.content, size
        assert calls_of(got) == calls_of(whole), size
    return whole


# ------------------------------------------------------------------ hermes

HERMES_TWO = (
    "Let me look both up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)


@pytest.mark.parametrize(
    "fmt, text",
    [
        (
            "hermes",
            '<tool_call>\n{"name": "f", "arguments": {"x": 1e999, "y": [-1e999]}}\n</tool_call>',
        ),
        ("llama3_json", '{"name": "f", "parameters": {"x": 1e999, "y": [-1e999]}}'),
        ("chatglm3", "f\n```python\ntool_call(x=1e999, y=[-1e999])\n```"),
    ],
)
def test_arguments_past_a_doubles_range_stay_json(fmt, text):
    """1e999 is JSON, but Python reads it as infinity and once wrote it back as Infinity,
    which JSON.parse and other strict parsers refuse."""
    (call,) = make_parser(fmt, ["f"]).parse(text).tool_calls
    assert call.arguments == '{"x": 1e999, "y": [-1e999]}'
    strict = json.loads(call.arguments, parse_constant=lambda name: pytest.fail(name))
    assert strict == {"x": float("inf"), "y": [float("-inf")]}


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": Infinity}"}\n</tool_call>',
    ],
)
def test_a_call_with_no_json_arguments_is_no_call(text):
    """NaN and Infinity are no JSON: such a call is left as the text it is."""
    res = make_parser("hermes", ["f"]).parse(text)
    assert not res.tool_calls and ("NaN" in res.content or "Infinity" in res.content)


def test_hermes_text_then_several_calls():
    r = same_streamed_and_whole(HermesParser, HERMES_TWO)
    assert r.content == "Let me look both up."
    assert calls_of(r) == [
        ("get_weather", {"city": "Paris", "days": 3}),
        ("get_time", {"tz": "Europe/Paris"}),
    ]
    assert all(c.id.startswith("call_") for c in r.tool_calls)
    assert len({c.id for c in r.tool_calls}) == 2


def test_hermes_never_streams_part_of_an_opener():
    _, deltas = streamed(HermesParser(), HERMES_TWO, 1)
    shown = ""
    for d in deltas:
        shown += d
        assert "<" not in shown  # not even the first character of <tool_call>
    assert shown == "Let me look both up."


def test_hermes_plain_text_comes_back_exactly():
    text = "  a < b and <tool is not a call; x<tool_call"[:-1] + "\n\n"
    r = same_streamed_and_whole(HermesParser, text)
    assert r.content == text and r.tool_calls == []


@pytest.mark.parametrize("cut", [False, True])
def test_hermes_closing_tag_inside_a_string_argument_does_not_end_the_call(cut):
    """A string argument may hold the tag's text (a grammar-forced call may write it there):
    the call ends at the tag after its JSON, streamed in any pieces."""
    args = {"s": 'a</tool_call>b \\" </tool_call> "', "t": "</tool_"}
    text = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}) + "\n</tool_call> after"
    if cut:  # out of tokens inside the string that holds the tag: a call as far as it got
        text = text[: text.index("b \\")]
        r = HermesParser(["f"]).parse(text, cut=True)
        assert [(c.name, c.arguments) for c in r.tool_calls] == [("f", '{"s": "a</tool_call>')]
        assert r.content == ""
        return
    r = same_streamed_and_whole(HermesParser, text, tool_names=["f"])
    assert calls_of(r) == [("f", args)] and r.content == "after"


@pytest.mark.parametrize("cut", [False, True])
def test_hermes_a_stray_quote_ends_the_call_at_its_tag_and_the_next_call_still_counts(cut):
    """Once a call's body is no JSON, its string bounds mean nothing: the first tag ends it
    (as before strings were read), so the call after it is read, streamed as soon as it ends."""
    bad = '<tool_call>\n{"name": "f", "arguments": {"size": "5" inch"}}\n</tool_call>'
    good = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    text = f"{bad}\n{good}\nMore text"
    r = same_streamed_and_whole(HermesParser, text, tool_names=["f", "g"])
    assert calls_of(r) == [("g", {})] and r.content == bad + "More text"
    cut_r = HermesParser(["f", "g"]).parse(text, cut=True)
    assert calls_of(cut_r) == [("g", {})] and cut_r.content == bad + "More text"
    parser, when = HermesParser(["f", "g"]), None
    for i, ch in enumerate(text):
        if parser.feed(ch).tool_calls:
            when = i
            break
    assert when == len(bad) + len(good)  # the moment its tag is whole


def test_hermes_a_body_found_no_json_stays_so_when_the_stream_resumes():
    text = '<tool_call>\n{"a": "b" x, "</tool_call>\nAfter'
    whole = HermesParser(["f"]).parse(text, stopped=True)
    cut = text.index("x") + 1
    parser = HermesParser(["f"])
    streamed = parser.feed(text[:cut]).merge(parser.feed(text[cut:]))
    streamed.merge(parser.finish(stopped=True))
    assert (streamed.content, streamed.tool_calls) == (whole.content, whole.tool_calls)
    assert whole.content.startswith("<tool_call>") and whole.content.endswith("After")


def test_hermes_a_stop_string_inside_a_string_argument_drops_the_call_whole():
    text = 'Sure.<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>b'
    r = HermesParser(["f"]).parse(text, stopped=True)
    assert r.tool_calls == [] and r.content == "Sure."


def test_hermes_invalid_json_is_content():
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    r = same_streamed_and_whole(HermesParser, text)
    assert r.tool_calls == [] and r.content == text


@pytest.mark.parametrize(
    "written, arguments",
    [
        ('{"city": "Par', '{"city": "Par'),  # the arguments themselves cut
        ('{"city": "Paris"}', '{"city": "Paris"}'),  # the wrapper's brace not written
        ('{"city": "Paris"}}\n</tool_', '{"city": "Paris"}'),  # only the closing tag cut
        ("", ""),
    ],
)
def test_hermes_call_cut_by_the_token_limit_comes_back_as_far_as_it_got(written, arguments):
    """OpenAI returns a call that ran out of tokens as a call (finish_reason length), with
    its arguments so far; the model's call markup never reaches the content."""
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": ' + written
    cut = HermesParser(NAMES).parse(text, cut=True)
    assert cut.content == "Sure."
    assert [(c.name, c.arguments) for c in cut.tool_calls] == [("get_weather", arguments)]
    # Not cut (the model stopped there): text, as before; and a name not among the tools.
    assert HermesParser(NAMES).parse(text).tool_calls == []
    other = text.replace("get_weather", "launch")
    assert HermesParser(NAMES).parse(other, cut=True).tool_calls == []


@pytest.mark.parametrize(
    "tail", ["<tool", "<tool_call>", '<tool_call>\n{"na', '<tool_call>\n{"name": "get_we']
)
def test_hermes_reply_cut_before_a_call_named_its_function_shows_none_of_it(tail):
    """Out of tokens inside an opener, or before the name is whole: neither a call nor the
    markup comes back, streamed or whole; the calls before it stay."""
    done = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text = "Sure. " + done + "\n" + tail
    whole = HermesParser(NAMES).parse(text, cut=True)
    streamed = HermesParser(NAMES)
    parts = [streamed.feed(ch) for ch in text] + [streamed.finish(cut=True)]
    merged = ParseResult()
    for part in parts:
        merged.merge(part)
    for res in (whole, merged):
        assert res.content == "Sure."
        assert [(c.name, c.arguments) for c in res.tool_calls] == [
            ("get_weather", '{"city": "Paris"}')
        ]
    # The model stopped there on its own: the text is kept, as before.
    assert HermesParser(NAMES).parse("Sure. " + tail).content.endswith(tail.rstrip())


@pytest.mark.parametrize(
    "tail", ["<tool", "<tool_call>\n", '<tool_call>\n{"name": "get_weather", "arg']
)
def test_hermes_call_broken_off_by_a_stop_string_is_dropped_whole(tail):
    """A stop string of the request that matched inside a call: no call (it has no arguments
    to give) and no markup in the content; calls closed before it stay."""
    done = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    res = HermesParser(NAMES).parse("Sure. " + done + "\n" + tail, stopped=True)
    assert res.content == "Sure."
    assert [(c.name, c.complete) for c in res.tool_calls] == [("get_time", True)]


def test_hermes_marks_only_a_call_the_tokens_ran_out_in_as_incomplete():
    done = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    closed = HermesParser(NAMES).parse(done + "\n<tool_c", cut=True)
    assert [c.complete for c in closed.tool_calls] == [True]
    cut = HermesParser(NAMES).parse(done + '\n<tool_call>\n{"name": "get_time", "arg', cut=True)
    assert [c.complete for c in cut.tool_calls] == [True, False]


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json"])
def test_json_nested_past_the_decoders_limit_is_content(fmt):
    """A model can write brackets without end; that is text, not a failed request."""
    deep = "[" * 5000 + "]" * 5000
    text = {
        "hermes": '<tool_call>\n{"name": "get_weather", "arguments": ' + deep + "}\n</tool_call>",
        "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": ' + deep + "}",
    }[fmt]
    r = same_streamed_and_whole(
        {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[fmt], text
    )
    assert r.tool_calls == [] and r.content


def test_hermes_unknown_function_is_content():
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    r = same_streamed_and_whole(HermesParser, text, tool_names=["get_weather"])
    assert r.tool_calls == [] and r.content == text
    ok = HermesParser(tool_names=["rm_rf"]).parse(text)
    assert calls_of(ok) == [("rm_rf", {})]


def test_hermes_call_cut_by_the_stop_token_still_counts():
    r = same_streamed_and_whole(HermesParser, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert calls_of(r) == [("f", {"a": 1})] and r.content == ""


def test_hermes_arguments_given_as_a_json_string_become_an_object():
    r = HermesParser().parse(
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>'
    )
    assert calls_of(r) == [("f", {"a": [1, 2]})]
    bad = HermesParser().parse('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert bad.tool_calls == []


def test_hermes_text_after_a_call_is_content_without_the_gap():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone, calling f.'
    r = same_streamed_and_whole(HermesParser, text)
    assert calls_of(r) == [("f", {})] and r.content == "Done, calling f."


def test_hermes_max_calls_keeps_the_first():
    r = HermesParser(max_calls=1).parse(HERMES_TWO)
    assert [name for name, _ in calls_of(r)] == ["get_weather"]


def test_hermes_forced_prefix_is_read_with_the_reply():
    named = HermesParser.forced_prefix("get_weather")
    assert named == '<tool_call>\n{"name": "get_weather", "arguments": '
    r = HermesParser().parse(named + '{"city": "Oslo"}}\n</tool_call>')
    assert calls_of(r) == [("get_weather", {"city": "Oslo"})]
    assert HermesParser.forced_prefix(None) == "<tool_call>\n"


# ------------------------------------------------------------------ llama3_json


def test_llama3_python_tag_and_calls_separated_by_semicolons():
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    )
    r = same_streamed_and_whole(Llama3JsonParser, text)
    assert r.content == ""
    assert calls_of(r) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


def test_llama3_bare_json_call_without_tag():
    r = same_streamed_and_whole(
        Llama3JsonParser, '\n{"name": "f", "parameters": {"x": [1, {"y": null}]}}'
    )
    assert calls_of(r) == [("f", {"x": [1, {"y": None}]})]


def test_llama3_text_streams_at_once_and_stays_text():
    parser = Llama3JsonParser()
    assert parser.feed("The answer").content == "The answer"
    assert parser.feed(' is {"name": "f", "parameters": {}}').content.startswith(" is")
    assert parser.finish().tool_calls == []


def test_llama3_json_that_is_no_call_is_content():
    for text in (
        '{"answer": 42}',
        '{"name": "f"}',
        '{"name": "f", "parameters": {}} trailing',
        "{oops",
    ):
        r = same_streamed_and_whole(Llama3JsonParser, text)
        assert r.tool_calls == [] and r.content == text


def test_llama3_forced_prefixes():
    assert Llama3JsonParser.forced_prefix(None) == '{"name": "'
    named = Llama3JsonParser.forced_prefix("f")
    assert named == '{"name": "f", "parameters": '
    assert calls_of(Llama3JsonParser().parse(named + '{"a": true}}')) == [("f", {"a": True})]


# ------------------------------------------------------------------ chatglm3

GLM_CALL = (
    "\nLet me check the weather.<|assistant|>get_weather\n```python\n"
    "tool_call(city='北京', days=3, ratio=-0.5, tags=['a', \"b\"], "
    "opts={'unit': 'celsius', 'nested': {'deep': [1, (2, 3)]}}, flag=True, none=None)\n```"
)


def test_chatglm3_text_then_a_call_with_literal_kwargs():
    r = same_streamed_and_whole(ChatGLM3Parser, GLM_CALL, tool_names=["get_weather"])
    assert r.content == "Let me check the weather."
    assert calls_of(r) == [
        (
            "get_weather",
            {
                "city": "北京",
                "days": 3,
                "ratio": -0.5,
                "tags": ["a", "b"],
                "opts": {"unit": "celsius", "nested": {"deep": [1, [2, 3]]}},
                "flag": True,
                "none": None,
            },
        )
    ]
    assert "北京" in r.tool_calls[0].arguments  # not \u-escaped


def test_chatglm3_call_fed_token_by_token():
    tokens = ["\n", "<|assistant|>", "get", "_weather", "\n", "```", "python", "\n", "tool",
              "_call", "(", "city", "='", "Paris", "')", "\n", "```"]  # fmt: skip
    parser = ChatGLM3Parser(tool_names=["get_weather", "get_time"])
    out = ParseResult()
    for t in tokens:
        out.merge(parser.feed(t))
    out.merge(parser.finish())
    assert out.content == "" and calls_of(out) == [("get_weather", {"city": "Paris"})]


def test_chatglm3_plain_reply_loses_its_leading_newline():
    for text in ("\nHello there!", "\n Hello there!", "Hello there!"):
        r = same_streamed_and_whole(ChatGLM3Parser, text, tool_names=[])
        assert r.content == "Hello there!" and r.tool_calls == []
    first = ChatGLM3Parser(tool_names=[]).feed("\n")
    assert first.content == ""  # the metadata newline is never streamed


def test_chatglm3_inner_newlines_are_kept():
    r = ChatGLM3Parser(tool_names=[]).parse("\nLine one.\n\nLine two.")
    assert r.content == "Line one.\n\nLine two."


def test_chatglm3_segment_separators_and_empty_metadata_are_dropped():
    r = same_streamed_and_whole(
        ChatGLM3Parser, "\nPart one.<|assistant|>\n Part two.", tool_names=[]
    )
    assert r.content == "Part one.Part two."


def test_chatglm3_without_tools_a_call_is_text():
    text = "\n<|assistant|>get_weather\n```python\ntool_call(city='Paris')\n```"
    r = ChatGLM3Parser(tool_names=[]).parse(text)
    assert r.tool_calls == []
    assert r.content == "get_weather\n```python\ntool_call(city='Paris')\n```"


def test_chatglm3_code_that_is_no_literal_call_is_never_run_and_is_content():
    for code in (
        "tool_call(city=__import__('os').system('echo pwned'))",
        "tool_call('Paris')",
        "tool_call(**{'city': 'Paris'})",
        "print(city='Paris')",
        "tool_call(city='Paris'",
        "tool_call(n=float('nan'))",
        "tool_call(s={1, 2})",
    ):
        assert chatglm3_arguments(f"```python\n{code}\n```") is None, code
        text = f"\n<|assistant|>get_weather\n```python\n{code}\n```"
        r = ChatGLM3Parser(tool_names=["get_weather"]).parse(text)
        assert r.tool_calls == [] and code in r.content


def test_chatglm3_kwargs_accept_json_literals_and_a_bare_call():
    assert json.loads(chatglm3_arguments("tool_call(a=true, b=null, c=[false])")) == {
        "a": True,
        "b": None,
        "c": [False],
    }
    assert chatglm3_arguments("```python\ntool_call()\n```") == "{}"


def test_chatglm3_forced_name_is_the_metadata_line():
    assert ChatGLM3Parser.forced_prefix(None) == ""  # "required": the call grammar names one
    prefix = ChatGLM3Parser.forced_prefix("get_weather")
    assert prefix == "get_weather\n"
    r = ChatGLM3Parser(tool_names=["get_weather"]).parse(
        prefix + "```python\ntool_call(city='Rome')\n```"
    )
    assert calls_of(r) == [("get_weather", {"city": "Rome"})]


# ------------------------------------------------------------------ selection


def test_parser_for_template_reads_the_templates_own_format():
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }}{% if tools %}{% endif %}") == "llama3_json"
    assert parser_for_template("{% if message.role == 'ipython' %}{% endif %}") == "llama3_json"
    assert parser_for_template("<|im_start|>{{ content }}") is None
    assert parser_for_template(None) is None


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from ember.chat.tokenizer import Tokenizer

    from checkpoints import write_tokenizer

    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return Tokenizer.from_dir(out)


QWEN_LIKE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call><|im_start|>"
LLAMA3_LIKE = "{% if tools %}{{ tools | tojson }}{% endif %}<|start_header_id|>ipython"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    "template, flag, parser, fallback",
    [
        (QWEN_LIKE, "auto", "hermes", False),
        (LLAMA3_LIKE, "auto", "llama3_json", False),
        (CHATML, "auto", "hermes", True),
        (CHATML, "hermes", "hermes", True),
        (CHATML, "llama3_json", None, False),
        (QWEN_LIKE, "llama3_json", "llama3_json", False),
        (QWEN_LIKE, "none", None, False),
        ("{% if tools %}[AVAILABLE_TOOLS]{% endif %}", "auto", None, False),
        ("{{ bos_token }}{{ messages[0].content }}", "auto", None, False),
    ],
)
def test_tool_support_per_template_and_flag(hf_tokenizer, template, flag, parser, fallback):
    from ember.chat.templates import ChatFormatter
    from ember.server.routes.chat_tools import tool_support

    formatter = ChatFormatter(hf_tokenizer, template)
    support = tool_support(formatter, flag)
    assert support.parser == parser and not support.chatglm3
    if parser is None:
        assert support.formatter is None and support.refusal
    elif fallback:
        assert support.formatter.template == chatml_tools_template()
    else:
        assert support.formatter is formatter


def test_chatml_tools_template_renders_tools_calls_and_results():
    from transformers.utils.chat_template_utils import render_jinja_template

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21C"},
        {"role": "tool", "tool_call_id": "b", "content": "25C"},
    ]
    (text,), _ = render_jinja_template(
        [messages], tools=tools, chat_template=chatml_tools_template(), add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert text.count("<|im_start|>system") == 1
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n21C\n</tool_response>\n"
        "<tool_response>\n25C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    # Without tools it is plain ChatML.
    (plain,), _ = render_jinja_template(
        [messages[1:2]], chat_template=chatml_tools_template(), add_generation_prompt=True
    )
    assert (
        plain == "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_call_parser_flag_has_an_environment_twin(monkeypatch):
    from ember.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.tool_call_parser == "auto"
    monkeypatch.setenv("EMBER_TOOL_CALL_PARSER", "hermes")
    assert build_parser().parse_args(["serve"]).tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "xml"])


# ------------------------------------------------------------------ the API, default model

MODEL = "smol"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = [WEATHER, TIME]
NAMES = {"get_weather", "get_time"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# One finished call in the history: small models copy the pattern.
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
    {"role": "user", "content": "And in London?"},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def stream_final(client: openai.OpenAI, **kw):
    """Stream a request and put it together with the SDK's own accumulator."""
    state = ChatCompletionStreamState(input_tools=kw["tools"]) if "tools" in kw else None
    state = state or ChatCompletionStreamState()
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for c in chunks:
        state.handle_chunk(c)
    return state.get_final_completion(), chunks


def check_choice(
    choice, name: str | None = None, forced: bool = False, named: bool = False
) -> None:
    """A reply is either well-formed calls (finish tool_calls; stop when tool_choice named the
    function, as OpenAI ends those) or content (stop or length); under a forced tool_choice
    ("required" or named) it must be a call whose arguments validate against the tool's
    parameter schema."""
    calls = choice.message.tool_calls or []
    if forced:
        assert calls, f"no tool call came back: {choice.message.content!r}"
    if calls:
        assert choice.finish_reason == ("stop" if named else "tool_calls")
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name in ({name} if name else NAMES)
            args = json.loads(call.function.arguments)
            assert isinstance(args, dict)
            if forced:
                schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
                jsonschema.validate(args, schema["function"]["parameters"])
        return
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)


def summary(choice) -> tuple:
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content or "", calls, choice.finish_reason


slow = pytest.mark.slow


@slow
def test_tool_choice_none_renders_no_tools(client):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=16)
    plain = client.chat.completions.create(**kw)
    none = client.chat.completions.create(**kw, tools=TOOLS, tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


@slow
def test_tools_are_rendered_into_the_prompt(client):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=1)
    plain = client.chat.completions.create(**kw)
    auto = client.chat.completions.create(**kw, tools=TOOLS)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50


@slow
@pytest.mark.parametrize("tool_choice", ["auto", "required", "named"])
def test_tokenize_counts_what_a_tool_request_runs_on(client, server, tool_choice):
    tool_choice = NAMED if tool_choice == "named" else tool_choice
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice}
    r = httpx.post(server + "/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    chat = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=1
    )
    assert r.json()["count"] == chat.usage.prompt_tokens


@slow
@pytest.mark.parametrize("messages", [ASK, HISTORY], ids=["ask", "history"])
def test_auto_reply_is_content_or_valid_calls(client, messages):
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=32
    )
    check_choice(r.choices[0])


@slow
def test_required_makes_one_call_or_more_where_parallel_calls_are_asked_for(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0)
    r = client.chat.completions.create(max_tokens=96, **kw).choices[0]
    check_choice(r, forced=True)
    assert len(r.message.tool_calls) == 1  # small models forced on repeat their call
    both = client.chat.completions.create(max_tokens=96, parallel_tool_calls=True, **kw)
    check_choice(both.choices[0], forced=True)
    # The default model, asked for Paris's weather, looks up its time as well.
    calls = both.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].id != calls[1].id
    # Streamed alike, each call under its own index.
    final, chunks = stream_final(client, max_tokens=96, parallel_tool_calls=True, **kw)
    assert summary(final.choices[0]) == summary(both.choices[0])
    indexes = {d.index for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []}
    assert indexes == {0, 1}


@slow
@pytest.mark.parametrize("messages", [ASK, HISTORY], ids=["ask", "history"])
def test_named_tool_choice_calls_that_function(client, messages):
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice=NAMED, temperature=0, max_tokens=32
    )
    check_choice(r.choices[0], name="get_weather", forced=True, named=True)


@slow
@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_call_cut_by_max_tokens_is_a_call_as_far_as_it_got(client, tool_choice):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0)
    whole = client.chat.completions.create(max_tokens=64, **kw).choices[0]
    [call] = whole.message.tool_calls
    r = client.chat.completions.create(max_tokens=12, **kw).choices[0]
    assert r.finish_reason == "length" and not r.message.content
    [cut] = r.message.tool_calls
    assert cut.function.name == call.function.name
    assert call.function.arguments.startswith(cut.function.arguments)
    # (The SDK's stream accumulator refuses a "length" finish when given tools, as it does
    # with OpenAI's, so the chunks are put together here.)
    chunks = [
        c.choices[0] for c in client.chat.completions.create(max_tokens=12, stream=True, **kw)
    ]
    deltas = [d for c in chunks for d in c.delta.tool_calls or []]
    streamed = (
        "".join(d.function.name or "" for d in deltas),
        "".join(d.function.arguments or "" for d in deltas),
    )
    assert streamed == (cut.function.name, cut.function.arguments)
    assert not "".join(c.delta.content or "" for c in chunks)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]


@slow
def test_a_responses_call_cut_by_max_output_tokens_is_an_incomplete_item(client):
    fn = TOOLS[0]["function"]
    kw = dict(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[{"type": "function", **fn}],
        tool_choice={"type": "function", "name": fn["name"]},
        temperature=0,
    )
    whole = client.responses.create(max_output_tokens=64, **kw)
    [call] = whole.output
    assert (whole.status, call.type, call.status) == ("completed", "function_call", "completed")
    cut = client.responses.create(max_output_tokens=12, **kw)
    [item] = cut.output
    assert (cut.status, item.type, item.status) == ("incomplete", "function_call", "incomplete")
    assert item.arguments and call.arguments.startswith(item.arguments)
    with client.responses.stream(max_output_tokens=12, **kw) as stream:
        events = list(stream)
    final = events[-1]
    assert final.type == "response.incomplete"
    [streamed] = final.response.output
    assert (streamed.status, streamed.arguments) == ("incomplete", item.arguments)


@slow
def test_a_function_declared_without_parameters_is_called_with_none(client):
    # OpenAI: leaving out `parameters` defines a function with an empty parameter list.
    tools = [{"type": "function", "function": {"name": "now", "description": "The time."}}]
    ask = [{"role": "user", "content": "What time is it?"}]
    for choice in ("required", {"type": "function", "function": {"name": "now"}}):
        r = client.chat.completions.create(
            model=MODEL, messages=ask, tools=tools, tool_choice=choice, temperature=0, max_tokens=32
        )
        [call] = r.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("now", {}), choice


@slow
@pytest.mark.parametrize(
    "tool_choice", ["auto", "required", NAMED], ids=["auto", "required", "named"]
)
def test_stream_gives_the_non_streamed_result(client, tool_choice):
    kw = dict(
        model=MODEL,
        messages=HISTORY,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=32,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    final, chunks = stream_final(client, **kw)
    assert summary(final.choices[0]) == summary(whole)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-1]
    if whole.message.tool_calls:
        streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "<tool_call>" not in streamed_text


@slow
def test_sdk_stream_helper_fires_its_done_events(client):
    # The SDK closes a streamed call (tool_calls.function.arguments.done) only when the
    # finish reason comes after it, in a chunk of its own, as OpenAI sends it.
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, temperature=0)
    with client.chat.completions.stream(max_tokens=32, **kw) as stream:
        events = list(stream)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather"
    final = stream.get_final_completion().choices[0]
    assert done[0].arguments == final.message.tool_calls[0].function.arguments
    with client.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=8) as stream:
        kinds = [e.type for e in stream]
    assert kinds.count("content.done") == 1 and kinds[-1] == "content.done"


@slow
def test_n_choices_with_logprobs_parse_each_on_its_own(client):
    kw = dict(
        model=MODEL,
        messages=HISTORY,
        tools=TOOLS,
        tool_choice=NAMED,
        temperature=1.0,
        seed=5,
        max_tokens=24,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        check_choice(choice, name="get_weather", forced=True, named=True)
        assert choice.logprobs.content and all(
            len(t.top_logprobs) == 2 for t in choice.logprobs.content
        )
    assert sum(len(c.logprobs.content) for c in whole.choices) == whole.usage.completion_tokens
    final, _ = stream_final(client, **kw)
    assert [summary(c) for c in final.choices] == [summary(c) for c in whole.choices]
    assert [len(c.logprobs.content) for c in final.choices] == [
        len(c.logprobs.content) for c in whole.choices
    ]


@slow
def test_parallel_tool_calls_false_is_accepted_and_bounds_the_calls(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=96,
        parallel_tool_calls=False,
    )
    # One call, ended there by its grammar (without the bound the model makes two).
    assert len(r.choices[0].message.tool_calls) == 1
    check_choice(r.choices[0], forced=True)


@slow
def test_tool_history_without_tools_is_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, max_tokens=4)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


class GetWeather(BaseModel):
    """Get the current weather in a city"""

    city: str = Field(max_length=20)


class Report(BaseModel):
    city: str = Field(max_length=20)
    temperature_c: int = Field(ge=-90, le=60)


@slow
def test_stop_strings_never_break_a_forced_call_nor_leak_its_markup(client):
    """A stop string that matches inside a call: a forced call ignores it (its grammar says
    where it ends); under auto (here with a JSON format, so that the default model calls) the
    broken call is dropped, and no markup reaches the content, streamed or whole."""
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=48)
    for stop in (["}"], ["Paris"], ["\n"]):
        forced = client.chat.completions.create(tool_choice="required", stop=stop, **kw)
        check_choice(forced.choices[0], forced=True)
        auto = dict(kw, stop=stop, response_format={"type": "json_object"})
        whole = client.chat.completions.create(**auto).choices[0]
        assert "<tool_call" not in (whole.message.content or ""), (stop, whole.message.content)
        chunks = list(client.chat.completions.create(stream=True, **auto))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == (whole.message.content or ""), stop


@slow
@pytest.mark.parametrize("name", ["", "a b!", 'q"uote', "x" * 65])
def test_a_function_name_no_call_can_spell_is_a_400(client, name):
    tool = {"type": "function", "function": {"name": name}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], max_tokens=4)
    assert e.value.body["param"] == "tools.0.function.name"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model=MODEL, input="hi", tools=[{"type": "function", "name": name}], max_output_tokens=4
        )
    assert e.value.body["param"] == "tools.0.name"


@slow
def test_two_tools_of_one_name_and_required_without_tools_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, WEATHER])
    assert e.value.body["param"] == "tools" and "'get_weather'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", tool_choice="required")
    assert e.value.body["param"] == "tool_choice"


BAD_SCHEMAS = [
    {"type": "objekt"},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}},
    {"type": "object", "properties": {"x": {"type": "string", "pattern": "(("}}},
]


@slow
@pytest.mark.parametrize("bad", BAD_SCHEMAS, ids=["type", "ref", "pattern"])
@pytest.mark.parametrize("where", ["tools", "response_format"])
def test_a_bad_schema_beside_tools_is_a_400_naming_its_own_field(client, bad, where):
    """Tools and a format compile into one grammar; a bad schema in either is named by its own
    field, in a short message (not the combined grammar's text)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    if where == "tools":
        tool["function"]["parameters"] = bad
    else:
        fmt["json_schema"]["schema"] = bad
    for tool_choice in ("auto", "required"):
        if tool_choice == "required" and where == "response_format":
            continue  # a forced call outranks the format, which then plays no part
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                tools=[tool],
                tool_choice=tool_choice,
                response_format=fmt,
                max_tokens=8,
            )
        assert e.value.body["param"] == where
        assert "start:" not in e.value.body["message"] and len(e.value.body["message"]) < 300


@slow
def test_keywords_the_grammar_cannot_enforce_are_not_refused(client):
    """pydantic writes uniqueItems for a set: the format is served (that one keyword not
    enforced), as vLLM serves it, not refused."""

    class Tags(BaseModel):
        tags: set[str] = Field(max_length=3)

    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Tags, max_tokens=40, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length")


REPORT = [{"role": "user", "content": "It is 21 degrees in Paris today. Report it."}]


@slow
@pytest.mark.parametrize("branch", ["call", "answer"])
def test_auto_tools_with_a_response_format_give_a_valid_call_or_the_answer(client, branch):
    """An agent with tools and an output type sends both: as from OpenAI, the reply is a call
    or the answer in the format, each valid (before, the format held every reply to the
    answer, and no call could come). The default model, greedy, calls for ASK and answers
    REPORT; streamed, the same comes back."""
    kw = dict(
        model=MODEL,
        messages=ASK if branch == "call" else REPORT,
        tools=[openai.pydantic_function_tool(GetWeather)],
        temperature=0,
        max_tokens=64,
    )
    choice = client.chat.completions.parse(response_format=Report, **kw).choices[0]
    if branch == "call":
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert isinstance(call.function.parsed_arguments, GetWeather)
    else:
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        assert isinstance(choice.message.parsed, Report)
    schema = {"name": "Report", "schema": Report.model_json_schema(), "strict": True}
    fmt = {"type": "json_schema", "json_schema": schema}
    streamed, _ = stream_final(client, response_format=fmt, **kw)
    assert summary(streamed.choices[0]) == summary(choice)


def _with_arguments(arguments: str) -> list[dict]:
    call = {
        **HISTORY[1]["tool_calls"][0],
        "function": {"name": "get_weather", "arguments": arguments},
    }
    return [HISTORY[0], {**HISTORY[1], "tool_calls": [call]}, *HISTORY[2:]]


DEEP_ARGUMENTS = "[" * 1500 + "]" * 1500  # past what json.loads takes


@slow
def test_tool_history_with_arguments_nested_past_json_s_limit_is_text(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_with_arguments(DEEP_ARGUMENTS), tools=TOOLS, max_tokens=4
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@slow
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm_rf"}}),
        dict(tool_choice="required"),
        dict(tool_choice=NAMED),
        dict(tools=TOOLS, tool_choice="sometimes"),
        dict(tools=TOOLS, tool_choice={"type": "function"}),
        dict(tools=TOOLS, tool_choice={"type": "retrieval", "function": {"name": "get_weather"}}),
    ],
    ids=[
        "unknown-function",
        "required-no-tools",
        "named-no-tools",
        "bad-string",
        "no-name",
        "bad-type",
    ],
)
def test_bad_tool_choice_is_400(client, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "tool_choice"
    assert e.value.body["type"] == "invalid_request_error"


@slow
def test_bad_tool_definition_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, tools=[{"type": "retrieval"}]
        )
    assert "tools" in e.value.body["param"]
    strict = {"type": "function", "function": {"name": "f", "parameters": {}, "strict": "yes"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, tools=[strict])
    assert e.value.body["param"] == "tools.0.function.strict"


UNENDING = {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}


@slow
def test_forced_call_of_parameters_no_grammar_can_take_is_400(client):
    """The call would be decoded under a grammar with no complete output."""
    deep: dict = {"type": "string"}
    for _ in range(200):  # past what the grammar compiler parses, and the walks that close it
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    for params, words in ((UNENDING, "no finite value"), (deep, "100 levels")):
        bad = {"type": "function", "function": {"name": "walk", "parameters": params}}
        for choice in ("required", {"type": "function", "function": {"name": "walk"}}):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(
                    model=MODEL, messages=ASK, max_tokens=4, tools=[*TOOLS, bad], tool_choice=choice
                )
            assert e.value.body["param"] == "tools" and "walk" in e.value.body["message"]
            assert words in e.value.body["message"]
    bad = {"type": "function", "function": {"name": "walk", "parameters": UNENDING}}
    # Naming another function leaves this one's grammar unbuilt, and "auto" builds none.
    named = {"type": "function", "function": {"name": TOOLS[0]["function"]["name"]}}
    for choice in (named, "auto"):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, tools=[*TOOLS, bad], tool_choice=choice
        )
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")


@slow
def test_parameters_that_are_no_object_schema_are_400_and_an_untyped_one_is_an_object(client):
    """Arguments are a JSON object: a schema of another type is a 400 (as OpenAI answers), and
    one that names no type (`{}`, an anyOf) or several holds a forced call to its objects."""
    for params in ({"type": "array"}, {"type": "string"}, {"type": ["integer", "null"]}):
        bad = {"type": "function", "function": {"name": "f", "parameters": params}}
        for choice in ("auto", "required", "none"):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(
                    model=MODEL, messages=ASK, max_tokens=4, tools=[bad], tool_choice=choice
                )
            assert e.value.body["param"] == "tools" and "'f'" in e.value.body["message"]
            assert '"object"' in e.value.body["message"]
    untyped = [
        {},
        {
            "anyOf": [
                {"type": "object", "properties": {"n": {"type": "integer"}}},
                {"type": "integer"},
            ]
        },
        {"type": ["object", "null"], "properties": {"n": {"type": "integer"}}},
    ]
    for params in untyped:
        tool = {"type": "function", "function": {"name": "f", "parameters": params}}
        ended = 0
        for seed in range(3):
            r = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                tools=[tool],
                tool_choice={"type": "function", "function": {"name": "f"}},
                max_tokens=60,
                seed=seed,
                temperature=1.0,
            )
            choice = r.choices[0]
            if choice.finish_reason == "length":
                continue  # arguments cut short; those that end are checked
            [call] = choice.message.tool_calls
            assert isinstance(json.loads(call.function.arguments), dict), params
            ended += 1
        assert ended, params


def tokenize(server: str, **body) -> list[int]:
    r = httpx.post(server + "/tokenize", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


ALLOW_TIME = {
    "type": "allowed_tools",
    "allowed_tools": {
        "mode": "required",
        "tools": [{"type": "function", "function": {"name": "get_time"}}],
    },
}


@slow
def test_allowed_tools_shows_and_calls_only_those(client, server):
    # The prompt lists only the allowed tool, as if the request had sent just that one.
    allowed = tokenize(server, messages=ASK, tools=TOOLS, tool_choice=ALLOW_TIME)
    assert allowed == tokenize(server, messages=ASK, tools=[TIME], tool_choice="required")
    assert allowed != tokenize(server, messages=ASK, tools=TOOLS, tool_choice="required")
    for seed in range(3):  # ASK is about the weather: only the grammar keeps get_weather out
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=ALLOW_TIME, max_tokens=32, seed=seed
        )
        check_choice(r.choices[0], name="get_time", forced=True)
    auto = {
        "type": "allowed_tools",
        "allowed_tools": {**ALLOW_TIME["allowed_tools"], "mode": "auto"},
    }
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=auto, temperature=0, max_tokens=32
    )
    check_choice(r.choices[0], name="get_time")


@slow
@pytest.mark.parametrize(
    "choice",
    [
        {"type": "allowed_tools", "allowed_tools": {"mode": "sometimes", "tools": []}},
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "x"}]}},
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": ["get_time"]}},
        {"type": "allowed_tools", "allowed_tools": "auto"},
        {
            "type": "allowed_tools",
            "allowed_tools": {
                "mode": "auto",
                "tools": [{"type": "function", "function": {"name": "rm_rf"}}],
            },
        },
    ],
    ids=["bad-mode", "empty", "bad-tool", "tool-as-string", "spec-as-string", "unknown-function"],
)
def test_bad_allowed_tools_is_400(client, choice):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, tools=TOOLS, tool_choice=choice
        )
    assert e.value.body["param"] == "tool_choice"


# OpenAI's deprecated form of the same thing, which older clients still send.
FUNCTIONS = [WEATHER["function"], TIME["function"]]
LEGACY_HISTORY = [
    HISTORY[0],
    {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"role": "function", "name": "get_weather", "content": '{"temperature": 21}'},
    *HISTORY[3:],
]


@slow
def test_legacy_functions_give_a_function_call(client):
    kw = dict(
        model=MODEL,
        messages=LEGACY_HISTORY,
        functions=FUNCTIONS,
        function_call={"name": "get_weather"},
        temperature=0,
        max_tokens=32,
    )
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "function_call"
    assert whole.message.tool_calls is None
    assert whole.message.function_call.name == "get_weather"
    args = json.loads(whole.message.function_call.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.tool_calls for d in deltas)
    name = "".join(d.function_call.name or "" for d in deltas if d.function_call)
    arguments = "".join(d.function_call.arguments or "" for d in deltas if d.function_call)
    assert (name, arguments) == ("get_weather", whole.message.function_call.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "function_call"
    # The same request in today's form makes the same call.
    modern = client.chat.completions.create(
        model=MODEL,
        messages=HISTORY,
        tools=TOOLS,
        tool_choice=NAMED,
        temperature=0,
        max_tokens=32,
        parallel_tool_calls=False,
    ).choices[0]
    call = modern.message.tool_calls[0].function
    assert (call.name, call.arguments) == ("get_weather", whole.message.function_call.arguments)


@slow
def test_legacy_function_history_renders_as_tool_history(server):
    legacy = tokenize(server, messages=LEGACY_HISTORY)
    assert legacy == tokenize(server, messages=HISTORY)
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": MODEL, "messages": LEGACY_HISTORY, "functions": FUNCTIONS, "max_tokens": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 200, r.text
    with_tools = tokenize(server, messages=HISTORY, tools=TOOLS)
    assert r.json()["usage"]["prompt_tokens"] == len(with_tools)
    assert tokenize(server, messages=LEGACY_HISTORY, functions=FUNCTIONS) == with_tools
    # A reply without a call has no function_call key at all, as OpenAI's replies have none.
    assert "function_call" not in r.json()["choices"][0]["message"]


@slow
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(functions=FUNCTIONS, tools=TOOLS),
        dict(functions=FUNCTIONS, tool_choice="auto"),
        dict(function_call="auto"),
        dict(functions=FUNCTIONS, function_call={"name": "rm_rf"}),
        dict(functions=FUNCTIONS, function_call="required"),
        dict(functions=FUNCTIONS, function_call={"name": "get_time", "x": 1}),
    ],
    ids=["with-tools", "with-tool-choice", "no-functions", "unknown", "required", "extra-key"],
)
def test_bad_legacy_functions_are_400(client, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kwargs)
    assert e.value.body["param"] in ("functions", "function_call")


# ------------------------------------------------------------------ the API, ChatGLM3


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """An in-process server on a tiny random ChatGLM3 checkpoint with its own tokenizer."""
    from fastapi.testclient import TestClient

    from ember.config import EngineConfig
    from ember.server.app import build_app
    from ember.server.state import ServerConfig

    from chatglm_checkpoint import write_chatglm_checkpoint
    from sp_models import train_sentencepiece, write_chatglm3_tokenizer

    out: Path = tmp_path_factory.mktemp("glm")
    write_chatglm3_tokenizer(out, train_sentencepiece("unigram", vocab_size=420))
    write_chatglm_checkpoint(out, "safetensors", seed=3, padded_vocab_size=448)
    cfg = EngineConfig(model=str(out), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    app = build_app(cfg, ServerConfig(["glm"]), load_in_background=False)
    with TestClient(app) as http:
        state = app.state.ember
        assert state.formatter.name == "chatglm3"
        sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
        yield sdk, state


class Script:
    """Stands in for the engine's generate(): replies with fixed ids, decoded by the real
    incremental detokenizer under the request's own sampling params, and records what the
    route asked for."""

    def __init__(self, state, reply_ids: list[int], stop_id: int | None) -> None:
        self.state, self.reply_ids, self.stop_id = state, reply_ids, stop_id
        self.calls: list[tuple[list[int], object]] = []

    async def __call__(self, prompt_ids, params, request_id, ticket=None):
        from ember.chat.detokenizer import IncrementalDetokenizer
        from ember.engine.request import RequestOutput

        self.calls.append((list(prompt_ids), params))
        detok = IncrementalDetokenizer(self.state.tokenizer, prompt_ids, params)
        ids = self.reply_ids + ([self.stop_id] if self.stop_id is not None else [])
        for k, token in enumerate(ids):
            last = k == len(ids) - 1
            # A stop token's text is never detokenized, as in the engine.
            text = detok.flush()[0] if token == self.stop_id else detok.add_tokens([token])[0]
            if last and token != self.stop_id:
                text += detok.flush()[0]
            yield RequestOutput(
                request_id,
                list(prompt_ids),
                [token],
                text,
                finished=last,
                finish_reason=("stop" if token == self.stop_id else "length") if last else None,
                stop_reason=token if last and token == self.stop_id else None,
            )


def glm_reply(state, *parts: str | int) -> list[int]:
    """Reply ids: text parts encoded as separate SentencePiece segments, ints as special ids."""
    tok = state.tokenizer
    return [i for p in parts for i in ([p] if isinstance(p, int) else tok.encode_plain(p))]


def test_chatglm3_plain_chat_has_no_metadata_newline(glm, monkeypatch):
    sdk, state = glm
    eos = state.tokenizer.eos_token_id
    script = Script(state, glm_reply(state, "\n", "Hello there, friend."), eos)
    monkeypatch.setattr(state.engine, "generate", script)
    r = sdk.chat.completions.create(model="glm", messages=ASK, max_tokens=40)
    assert r.choices[0].message.content == "Hello there, friend."
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    final, _ = stream_final(sdk, model="glm", messages=ASK, max_tokens=40)
    assert final.choices[0].message.content == "Hello there, friend."
    params = script.calls[0][1]  # specials skipped, but the segment separator kept
    assistant = state.tokenizer.token_to_id("<|assistant|>")
    assert params.skip_special_tokens and params.keep_special_token_ids == [assistant]


def test_chatglm3_text_then_tool_call(glm, monkeypatch):
    sdk, state = glm
    special = state.tokenizer.special_ids
    script = Script(
        state,
        glm_reply(
            state,
            "\n",
            "Let me check.",
            special["<|assistant|>"],
            "get_weather\n",
            "```python\ntool_call(city='Paris', days=[1, 2])\n```",
        ),
        special["<|observation|>"],
    )
    monkeypatch.setattr(state.engine, "generate", script)
    kw = dict(model="glm", messages=ASK, tools=TOOLS, max_tokens=200)
    whole = sdk.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "Let me check."
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}
    final, chunks = stream_final(sdk, **kw)
    assert summary(final.choices[0]) == summary(whole)
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_text == "Let me check."
    # The tools reached the prompt: it is longer than the plain one.
    plain_len = len(state.formatter.encode([{"role": "user", "content": ASK[0]["content"]}]))
    assert len(script.calls[0][0]) > plain_len + 20


def test_chatglm3_named_tool_choice_appends_the_name_line(glm, monkeypatch):
    sdk, state = glm
    tok = state.tokenizer
    script = Script(
        state,
        glm_reply(state, "```python\ntool_call(city='Rome')\n```"),
        tok.special_ids["<|observation|>"],
    )
    monkeypatch.setattr(state.engine, "generate", script)
    r = sdk.chat.completions.create(
        model="glm", messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=50
    )
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Rome"},
    )
    prompt = script.calls[0][0]
    forced = tok.encode("get_weather\n", add_special_tokens=False)
    assert prompt[-len(forced) - 1 :] == [tok.special_ids["<|assistant|>"], *forced]


def test_chatglm3_real_generation_keeps_the_invariants(glm):
    sdk, _ = glm
    for kw in (dict(), dict(tools=TOOLS), dict(tools=TOOLS, tool_choice=NAMED)):
        # A forced call is written to its end: room for the opener and 20 byte-fallback chars.
        max_tokens = 120 if "tool_choice" in kw else 24
        r = sdk.chat.completions.create(
            model="glm", messages=ASK, max_tokens=max_tokens, temperature=0, **kw
        )
        choice = r.choices[0]
        content = choice.message.content or ""
        assert "<|assistant|>" not in content and content == content.lstrip()
        named = "tool_choice" in kw
        check_choice(choice, name="get_weather" if named else None, forced=named, named=named)


def test_chatglm3_history_with_arguments_nested_past_json_s_limit_is_400(glm):
    sdk, _ = glm
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(
            model="glm", messages=_with_arguments(DEEP_ARGUMENTS), tools=TOOLS, max_tokens=4
        )
    assert e.value.body["param"] == "messages" and "JSON object" in e.value.body["message"]


def test_chatglm3_legacy_function_call_and_history(glm):
    sdk, state = glm
    r = sdk.chat.completions.create(
        model="glm",
        messages=ASK,
        functions=FUNCTIONS,
        function_call={"name": "get_weather"},
        max_tokens=120,
        temperature=0,
    ).choices[0]
    assert r.finish_reason == "function_call" and r.message.function_call.name == "get_weather"
    jsonschema.validate(
        json.loads(r.message.function_call.arguments), WEATHER["function"]["parameters"]
    )
    # A function-role result renders as the observation a tool result is.
    from ember.server import protocol as P
    from ember.server.routes.chat import chat_prompt

    def ids(messages, **kw):
        req = P.ChatCompletionRequest(model="glm", messages=messages, **kw)
        return chat_prompt(req, state)[1]

    assert ids(LEGACY_HISTORY, functions=FUNCTIONS) == ids(HISTORY, tools=TOOLS)
