"""Tools in chat requests: how the served model takes them (its template and call format),
the plan for one request (tool_choice, allowed_tools, OpenAI's legacy functions), and its
reply read back as content and calls."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from ember.chat.templates import ChatFormatter
from ember.chat.tool_parsers import (
    PARSERS,
    ParseResult,
    ToolParser,
    call_parameters,
    chatml_tools_template,
    make_parser,
    parameters_type_error,
)
from ember.chat.tool_parsers import parser_for_template as template_parser
from ember.engine.json_schema import schema_error
from ember.engine.structured import StructuredOutputsParams
from ember.server import protocol as P
from ember.server.errors import APIError
from ember.server.routes.common import SeqResult
from ember.server.state import ServerState


@dataclass(frozen=True)
class ToolSupport:
    """How the served model does tool calling, worked out once per chat template and flag."""

    parser: str | None  # the parser of replies to requests with tools; None: tools refused
    formatter: ChatFormatter | None  # renders tools and tool history; None: the model's own
    chatglm3: bool  # replies start with a metadata line, read with special tokens kept
    refusal: str = ""  # why tools are refused


def _is_chatglm3(formatter: ChatFormatter) -> bool:
    """ChatGLM3's built-in format (chat/chatglm3.py), which builds the prompt in ids."""
    return getattr(formatter, "name", None) == "chatglm3"


@functools.lru_cache(maxsize=8)
def tool_support(formatter: ChatFormatter, flag: str) -> ToolSupport:
    template = formatter.template or ""
    off = "Tool calling is turned off on this server (--tool-call-parser none)."
    if _is_chatglm3(formatter):
        parser = "chatglm3" if flag == "auto" else flag
        if parser == "none":
            return ToolSupport(None, None, True, off)
        return ToolSupport(parser, formatter, True)
    if flag == "none":
        return ToolSupport(None, None, False, off)
    if "tools" in template:  # the model's own template renders tools
        parser = template_parser(template) if flag == "auto" else flag
        if parser is not None:
            return ToolSupport(parser, formatter, False)
        return ToolSupport(
            None,
            None,
            False,
            "This model's chat template renders tools in a format Ember cannot read calls "
            "from; start the server with --tool-call-parser (hermes, llama3_json or chatglm3).",
        )
    if "<|im_start|>" in template and flag in ("auto", "hermes"):
        # A ChatML model whose template ignores tools: Qwen2.5's Hermes-style convention.
        return ToolSupport(
            "hermes", ChatFormatter(formatter.tokenizer, chatml_tools_template()), False
        )
    return ToolSupport(
        None,
        None,
        False,
        "This model's chat template does not support tools; start the server with a "
        "--chat-template that renders them, or send the request without tools.",
    )


@dataclass
class ChatPlan:
    """How one chat request is rendered and how its replies are read."""

    formatter: ChatFormatter
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt
    parser: str | None = None  # None: the reply is content as generated
    tool_names: list[str] = field(default_factory=list)  # empty: no calls, only content
    prefix: str = ""  # forced call opener: appended to the prompt, read before the reply
    max_calls: int | None = None
    # With a forced call: the grammar of the rest of the call, so it always parses.
    call_grammar: str | None = None
    legacy_functions: bool = False  # the request used `functions`: a call is a function_call
    # tool_choice named one function: its call ends with finish_reason "stop", as OpenAI's
    # (and vLLM's) do; "auto" and "required" calls end with "tool_calls".
    named_call: bool = False
    continuing: bool = False  # the reply continues the request's last message

    def new_parser(self) -> ToolParser | None:
        """A parser per choice: each keeps its own streaming state."""
        if self.parser is None:
            return None
        return make_parser(self.parser, self.tool_names, self.max_calls, self.continuing)


def legacy_functions(req: P.ChatCompletionRequest) -> P.ChatCompletionRequest:
    """A request in OpenAI's deprecated `functions` / `function_call` form, as tools: one call
    at most, as that form returns (the reply maps back in `chat_message` and the stream)."""
    if req.functions is None:
        if req.function_call is not None:
            raise APIError("function_call needs functions.", param="function_call")
        return req
    if req.tools is not None or req.tool_choice is not None:
        raise APIError(
            "Send tools and tool_choice, or the legacy functions and function_call, not both.",
            param="functions",
        )
    choice = req.function_call
    if isinstance(choice, dict):
        name = choice.get("name")
        if not isinstance(name, str) or not name or set(choice) != {"name"}:
            raise APIError(
                'function_call is "none", "auto" or {"name": ...}.', param="function_call"
            )
        names = [f.name for f in req.functions]
        if name not in names:
            known = f" ({', '.join(names)})" if names else ""
            raise APIError(
                f"function_call names {name!r}, which is not among the functions{known}.",
                param="function_call",
            )
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in (None, "none", "auto"):
        raise APIError(
            f'function_call is "none", "auto" or {{"name": ...}}; got {choice!r}.',
            param="function_call",
        )
    return req.model_copy(
        update={
            "tools": [P.ToolDefinition(function=f) for f in req.functions] or None,
            "tool_choice": choice,
            "parallel_tool_calls": False,
        }
    )


def _allowed_tools(choice: dict[str, Any], names: list[str]) -> tuple[str, list[str]]:
    """OpenAI's {"type": "allowed_tools", "allowed_tools": {"mode": ..., "tools": [...]}}:
    the mode ("auto" or "required") and the names of the tools that may be called."""
    spec = choice.get("allowed_tools")
    mode = spec.get("mode") if isinstance(spec, dict) else None
    tools = spec.get("tools") if isinstance(spec, dict) else None
    if mode not in ("auto", "required") or not isinstance(tools, list) or not tools:
        raise APIError(
            'An allowed_tools tool_choice is {"type": "allowed_tools", "allowed_tools": '
            '{"mode": "auto" or "required", "tools": [{"type": "function", "function": '
            '{"name": ...}}, ...]}}.',
            param="tool_choice",
        )
    allowed = []
    for i, tool in enumerate(tools):
        tool = tool if isinstance(tool, dict) else {}
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool.get("type") != "function" or not isinstance(name, str):
            raise APIError(
                f'tool_choice.allowed_tools.tools[{i}] is {{"type": "function", "function": '
                '{"name": ...}}.',
                param="tool_choice",
            )
        if name not in names:
            raise APIError(
                f"tool_choice.allowed_tools names the function {name!r}, which is not among "
                "the tools.",
                param="tool_choice",
            )
        allowed.append(name)
    return mode, allowed


def _tool_choice(req: P.ChatCompletionRequest) -> tuple[str, str | None, list[str] | None]:
    """("none" | "auto" | "required" | "named", function name, the names that may be called:
    None for all), checked against the tools."""
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice
    if choice is None:
        return ("auto" if names else "none"), None, None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode, allowed = _allowed_tools(choice, names)
        return mode, None, allowed
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(
                "tool_choice must be 'none', 'auto', 'required' or "
                f'{{"type": "function", "function": {{"name": ...}}}}; got {choice!r}.',
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise APIError("tool_choice 'required' needs tools.", param="tool_choice")
        return (choice if names else "none"), None, None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str) or not name:
        raise APIError(
            'A named tool_choice is {"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        known = f" ({', '.join(names)})" if names else ""
        raise APIError(
            f"tool_choice names the function {name!r}, which is not among the tools{known}.",
            param="tool_choice",
        )
    return "named", name, None


def chat_plan(req: P.ChatCompletionRequest, state: ServerState) -> ChatPlan:
    assert state.formatter is not None and state.engine is not None
    support = tool_support(state.formatter, state.engine.core.cfg.tool_call_parser)
    req = legacy_functions(req)
    mode, function, allowed = _tool_choice(req)
    for t in req.tools or []:  # as OpenAI: whatever the tool_choice
        if problem := parameters_type_error(t.function.model_dump(exclude_none=True)):
            name = t.function.name
            raise APIError(f"The parameters of function {name!r} {problem}.", param="tools")
    history = any(
        m.role in ("tool", "function") or m.tool_calls or m.function_call for m in req.messages
    )
    formatter = state.formatter
    if (mode != "none" or history) and support.formatter is not None:
        formatter = support.formatter
    if mode != "none":
        if support.parser is None:
            raise APIError(support.refusal, param="tools")
        forced = mode in ("required", "named")
        # With allowed_tools, the model sees and may call only those.
        names = [t.function.name for t in req.tools or []]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise APIError(
                f"tools name the function {twice[0]!r} more than once; names must differ.",
                param="tools",
            )
        tools = [
            t.model_dump(exclude_none=True)
            for t in req.tools or []
            if allowed is None or t.function.name in allowed
        ]
        max_calls = 1 if req.parallel_tool_calls is False else None
        parser = PARSERS[support.parser]
        call_grammar = None
        if forced:  # calls are decoded under a grammar of these functions' parameters
            check_tool_schemas(tools, function)
            # "required" makes one call unless the request asks for parallel calls in so many
            # words: small models, the default one among them, forced past the first call
            # repeat it until the tokens run out.
            parallel = req.parallel_tool_calls is True
            call_grammar = (
                parser.call_grammar(tools, function)
                if function is not None
                else parser.required_grammar(tools, None if parallel else 1)
            )
        return ChatPlan(
            formatter,
            tools=tools,
            parser=support.parser,
            tool_names=[t["function"]["name"] for t in tools],
            prefix=parser.forced_prefix(function) if forced else "",
            max_calls=max_calls,
            call_grammar=call_grammar,
            legacy_functions=req.functions is not None,
            named_call=mode == "named" and req.functions is None,
        )
    if support.chatglm3:  # no tools, but the metadata line still has to go
        return ChatPlan(formatter, parser="chatglm3")
    return ChatPlan(formatter)


def check_tool_schemas(tools: list[dict[str, Any]], function: str | None = None) -> None:
    """Refuse parameter schemas no grammar can take, of `function` (None: of every tool)."""
    for f in (t["function"] for t in tools):
        wanted = function in (None, f["name"]) and isinstance(f.get("parameters"), dict)
        if wanted and (problem := schema_error(call_parameters(f))):
            raise APIError(f"The parameters of function {f['name']!r}: {problem}.", param="tools")


def answer_or_call(
    plan: ChatPlan, spec: StructuredOutputsParams | None
) -> StructuredOutputsParams | None:
    """With tool_choice "auto" and a JSON response_format: the constraint under which the reply
    is either the answer in that format or calls to the tools, as OpenAI serves the pair (an
    agent with both tools and an output type sends it). None where that does not apply."""
    if not plan.tool_names or plan.parser is None or spec is None:
        return None
    if spec.param != "response_format" or (spec.json is None and not spec.json_object):
        return None
    schema = {"type": "object"} if spec.json_object else spec.json
    if not isinstance(schema, dict):
        return None  # response_format always gives a schema object
    if problem := schema_error(schema):
        raise APIError(f"Invalid JSON Schema: {problem}.", param="response_format")
    check_tool_schemas(plan.tools or [])
    parser = PARSERS[plan.parser]
    grammar = parser.answer_or_call_grammar(plan.tools or [], schema, plan.max_calls)
    return StructuredOutputsParams(grammar=grammar, param="response_format")


def read_reply(plan: ChatPlan, r: SeqResult) -> ParseResult:
    """A whole reply read as content and calls, as the plan's parser reads it."""
    parser = plan.new_parser()
    if parser is None:
        return ParseResult(content=r.text)
    return parser.feed(plan.prefix + r.text).merge(
        end_reply(parser, r.finish_reason, r.stop_reason)
    )


def chat_message(plan: ChatPlan, r: SeqResult) -> tuple[P.ChatResponseMessage, str | None]:
    """The reply as an OpenAI message (content and tool calls), and its finish reason."""
    if plan.parser is None:
        return P.ChatResponseMessage(content=r.text), r.finish_reason
    res = read_reply(plan, r)
    if not res.tool_calls:
        return P.ChatResponseMessage(content=res.content), r.finish_reason
    reason = call_finish_reason(plan, r.finish_reason)
    if plan.legacy_functions:  # that form has one call, and no id
        c = res.tool_calls[0]
        call = P.FunctionCall(name=c.name, arguments=c.arguments)
        return P.ChatResponseMessage(content=res.content or None, function_call=call), reason
    calls = [
        P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments))
        for c in res.tool_calls
    ]
    return P.ChatResponseMessage(content=res.content or None, tool_calls=calls), reason


def end_reply(
    parser: ToolParser, finish_reason: str | None, stop_reason: int | str | None
) -> ParseResult:
    """The parser's last word, told how the reply ended: out of tokens, or at a stop string."""
    stopped = finish_reason == "stop" and isinstance(stop_reason, str)
    return parser.finish(cut=finish_reason == "length", stopped=stopped)


def call_finish_reason(plan: ChatPlan, finish_reason: str | None) -> str:
    """The finish reason of a reply that made calls, as OpenAI gives it: "length" when the
    tokens ran out (a call may be cut short), else "tool_calls" ("function_call" for the
    legacy form; "stop" where tool_choice named the function)."""
    if finish_reason == "length":
        return "length"
    if plan.legacy_functions:
        return "function_call"
    return "stop" if plan.named_call else "tool_calls"
