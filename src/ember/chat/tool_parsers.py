"""Tool calls in model replies: one parser per native format, streaming or whole.

Models write tool calls in the format they were trained on:

* ``hermes`` (Qwen2.5, Hermes, and Ember's ChatML fallback): any text, then one or more
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks.
* ``llama3_json`` (Llama 3.1): an optional ``<|python_tag|>``, then JSON objects
  ``{"name": ..., "parameters": {...}}`` separated by ``;``; the reply is a call from its start.
* ``chatglm3``: the reply is segments separated by ``<|assistant|>``, each a metadata line, a
  newline, then content. Empty metadata is plain text; a tool name as metadata makes the content a
  ``tool_call(k=v, ...)`` in a fenced python block. The parser needs the text decoded with the
  special tokens kept, and it always removes the metadata lines, tools or not.

Each parser is a small state machine fed the reply text as it arrives (`feed`), then told the
reply ended (`finish`). Both return what may be shown now: content text and complete calls.
Text that might still grow into a call opener is held back, as the detokenizer holds back stop
strings, and whitespace next to a call is dropped. A block that fails to parse comes back as
content, as written. The whole-reply path (`parse`) runs the same code, so a streamed reply and
a non-streamed one with the same tokens give the same result.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, ClassVar

from ember.chat.chatglm3 import is_tool_name, may_be_metadata
from ember.engine.json_schema import COMPACT_JSON, close_objects


def tool_call_id() -> str:
    """OpenAI's form: "call_" and 24 characters."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it
    id: str = field(default_factory=tool_call_id)
    complete: bool = True  # False: the tokens ran out inside it (its arguments as far as they got)


@dataclass
class ParseResult:
    """What a step of parsing releases: content text and complete tool calls, in that order."""

    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def merge(self, other: ParseResult) -> ParseResult:
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _arguments_json(value: Any) -> str | None:
    """A call's arguments as a JSON object string, or None when they are not an object."""
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json_loads(value)
        except (ValueError, RecursionError):  # RecursionError: nested past json's limit
            return None
    if not isinstance(value, dict):
        return None
    try:
        text = json.dumps(_mark_overflow(value), ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    # A number past a double's range (1e999, which JSON allows) reads as infinity: it is
    # written back as such a number, never as the Infinity that is no JSON.
    return text.replace(_OVERFLOW_JSON["+"], "1e999").replace(_OVERFLOW_JSON["-"], "-1e999")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_loads(text: str) -> Any:
    """JSON as the spec has it: NaN and Infinity, which Python's json reads, are refused."""
    return json.loads(text, parse_constant=_reject_constant)


_OVERFLOW = {"+": "\x00ember:+1e999\x00", "-": "\x00ember:-1e999\x00"}
_OVERFLOW_JSON = {k: json.dumps(v) for k, v in _OVERFLOW.items()}


def _mark_overflow(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return _OVERFLOW["+" if value > 0 else "-"]
    if isinstance(value, dict):
        return {k: _mark_overflow(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_overflow(v) for v in value]
    return value


def _call_from_object(obj: Any, args_required: bool) -> tuple[str, str] | None:
    """(name, arguments JSON) from `{"name": ..., "arguments"|"parameters": {...}}`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    if key not in obj:
        return None if args_required else (obj["name"], "{}")
    args = _arguments_json(obj[key])
    return None if args is None else (obj["name"], args)


# ---------------------------------------------------------------- grammars of forced calls
#
# With tool_choice "required" or a named function, the reply is decoded under a grammar (Lark,
# llguidance's dialect, with the tools' parameter schemas embedded as %json) of the format's
# call, starting right after the forced prefix, so the call always parses and validates.

# Arguments as json.dumps writes them; no "\/" escape, which Python literals (ChatGLM3) lack.
_JSON_STYLE = {**COMPACT_JSON, "json_allowed_escapes": 'nrbtfu"\\'}


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema: Any, root: dict[str, Any] | None = None) -> str:
    """%json of a schema; with no schema, any object. `root`: the tool's parameters, whose
    definitions a property's schema may refer to."""
    schema = dict(close_objects(schema)) if isinstance(schema, dict) else {"type": "object"}
    for key in ("$defs", "definitions"):  # draft 2019's name and draft 7's
        if root and isinstance(root.get(key), dict) and key not in schema:
            schema[key] = root[key]  # as written: closing it alone could break an allOf
    schema["x-guidance"] = _JSON_STYLE
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _rooted(schema: Any, root: str) -> Any:
    """`schema` with each local `$ref` ("#", "#/$defs/X", ...) moved under `root`."""
    if isinstance(schema, list):
        return [_rooted(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rooted(v, root) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = root + ref[1:]
    return out


def _tool_functions(tools: list[dict[str, Any]], function: str | None) -> list[dict[str, Any]]:
    fns = [t.get("function") or {} for t in tools]
    return [f for f in fns if function is None or f.get("name") == function]


def call_parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameter schema, as its calls are decoded: arguments are a JSON object,
    so a schema that names no type (`{}`, an `anyOf`) or several (["object", "null"]) is held
    to its object values (`parameters_type_error` refuses one without "object"). One
    declared without parameters takes none, as OpenAI reads it: its arguments are `{}`."""
    params = function.get("parameters")
    if not isinstance(params, dict):
        return {"type": "object", "properties": {}}
    return params if params.get("type") == "object" else {**params, "type": "object"}


def parameters_type_error(function: dict[str, Any]) -> str | None:
    """Why a function's parameter schema cannot describe arguments (a JSON object), or None."""
    params = function.get("parameters")
    kind = params.get("type", "object") if isinstance(params, dict) else "object"
    if kind == "object" or (isinstance(kind, list) and "object" in kind):
        return None
    return f'must be a JSON Schema of type "object" (arguments are an object), not {kind!r}'


def _lark(start: str, rules: dict[str, str]) -> str:
    return "\n".join([f"start: {start}"] + [f"{k}: {v}" for k, v in rules.items()]) + "\n"


class ToolParser:
    """Base of the streaming parsers: a text buffer, content and call helpers.

    `tool_names`: the functions a call may name (None: any name); a call to another name is
    content. `max_calls`: calls beyond this many are dropped (OpenAI's parallel_tool_calls=false).
    """

    name: ClassVar[str]

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self.cut = False  # set by finish()
        self.stopped = False  # set by finish(): a stop string ended the reply
        self.max_calls = max_calls
        self.num_calls = 0
        self._buf = ""
        self._strip_leading = False  # drop whitespace at the start of the next content
        self._finished = False

    # ---- public face

    def feed(self, text: str) -> ParseResult:
        out = ParseResult()
        if self._finished:
            return out
        self._buf += text
        self._scan(out, final=False)
        return out

    def finish(self, cut: bool = False, stopped: bool = False) -> ParseResult:
        """The rest of the reply; `cut`: it ran out of tokens, so a call it was writing is
        returned as far as it got (as OpenAI does), where the format allows; `stopped`: a stop
        string of the request ended it, so a call it was writing is dropped (a stop string is
        meant for text; a call it broke has no arguments to give, and its markup is no text)."""
        out = ParseResult()
        if not self._finished:
            self.cut, self.stopped = cut, stopped
            self._scan(out, final=True)
            self._finished = True
        return out

    def parse(self, text: str, cut: bool = False, stopped: bool = False) -> ParseResult:
        """A whole reply at once (the parser is used up)."""
        return self.feed(text).merge(self.finish(cut, stopped))

    def continue_message(self) -> None:
        """The reply continues a message the request began (continue_final_message): it is
        that message's rest, not the start of a reply."""

    @classmethod
    def forced_prefix(cls, function: str | None) -> str:
        """Text appended to the prompt to force a call: `function` named, or any (None)."""
        raise NotImplementedError

    @classmethod
    def call_grammar(cls, tools: list[dict[str, Any]], function: str | None) -> str:
        """A Lark grammar of the reply after `forced_prefix(function)`: exactly one call to
        `function` (or any of the tools) whose arguments match its parameter schema."""
        raise NotImplementedError

    @classmethod
    def required_grammar(cls, tools: list[dict[str, Any]], max_calls: int | None) -> str:
        """A Lark grammar of the reply after `forced_prefix(None)` under tool_choice
        "required": a call to any of the tools, then more calls where the format writes several
        in one reply and parallel calls are allowed (OpenAI's default), as the model chooses."""
        more = cls._more_calls(max_calls)
        if not more:
            return cls.call_grammar(tools, None)
        rules = cls.call_grammar(tools, None).replace("start:", "call:", 1)
        return f"start: call{more}\n{rules}"

    @classmethod
    def _more_calls(cls, max_calls: int | None) -> str:
        """The grammar's tail after a first `call`: further calls, each with its opener, where
        the format writes several in one reply and more than one is allowed; else ""."""
        if cls.CALL_SEPARATOR is None or max_calls == 1:
            return ""
        return f" ({_lit(cls.CALL_SEPARATOR + cls.forced_prefix(None))} call)*"

    # Between two calls of one reply (None: the format writes one call per reply here).
    CALL_SEPARATOR: ClassVar[str | None] = None
    # Before a reply that is an answer, not a call (ChatGLM3's empty metadata line).
    ANSWER_PREFIX: ClassVar[str] = ""

    @classmethod
    def answer_or_call_grammar(
        cls, tools: list[dict[str, Any]], answer_schema: dict[str, Any], max_calls: int | None
    ) -> str:
        """A Lark grammar of a whole reply under tool_choice "auto" with a JSON response
        format, as OpenAI serves it: either the answer, JSON matching `answer_schema`, or one
        or more calls to the tools (each as `call_grammar` has it)."""
        rules = cls.call_grammar(tools, None).replace("start:", "call:", 1)
        prefix = cls.forced_prefix(None)
        calls = (f"{_lit(prefix)} call" if prefix else "call") + cls._more_calls(max_calls)
        answer = f"{_lit(cls.ANSWER_PREFIX)} answer" if cls.ANSWER_PREFIX else "answer"
        schema = {**close_objects(answer_schema), "x-guidance": COMPACT_JSON}
        return f"start: {answer} | {calls}\n{rules}answer: %json{json.dumps(schema)}\n"

    # ---- for subclasses

    def _scan(self, out: ParseResult, final: bool) -> None:
        raise NotImplementedError

    def _accepts(self, name: str) -> bool:
        return self.tool_names is None or name in self.tool_names

    def _content(self, out: ParseResult, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            if text:
                self._strip_leading = False
        out.content += text

    def _call(self, out: ParseResult, name: str, arguments: str, complete: bool = True) -> bool:
        """Record a call; False when its name is not one of the tools (the caller shows it)."""
        if not self._accepts(name):
            return False
        if self.max_calls is None or self.num_calls < self.max_calls:
            out.tool_calls.append(ParsedToolCall(name, arguments, complete=complete))
        self.num_calls += 1
        self._strip_leading = True
        return True

    def _release_text(self, out: ParseResult, final: bool, marker: str) -> None:
        """Emit the buffer as content, holding back a possible start of `marker` and the
        whitespace before it (dropped if the marker does follow)."""
        if final:
            self._content(out, self._buf)
            self._buf = ""
            return
        k = _partial_suffix(self._buf, marker)
        safe = self._buf[: len(self._buf) - k].rstrip()
        self._content(out, safe)
        self._buf = self._buf[len(safe) :]


class HermesParser(ToolParser):
    """``text <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> ...``"""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    CALL_SEPARATOR = "\n"

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._in_call = False
        self._gap = ""  # whitespace before the opener, restored if the call does not parse
        # Where _find_close stopped: (index, in a string, after a backslash, last character
        # outside strings that was not a space; "!" once the body is no JSON).
        self._body_scan: tuple[int, bool, bool, str] = (0, False, False, "")

    @classmethod
    def forced_prefix(cls, function: str | None) -> str:
        if function is None:
            return cls.OPEN + "\n"
        return (
            cls.OPEN + '\n{"name": ' + json.dumps(function, ensure_ascii=False) + ', "arguments": '
        )

    @classmethod
    def call_grammar(cls, tools: list[dict[str, Any]], function: str | None) -> str:
        end = _lit("}\n" + cls.CLOSE)
        fns = _tool_functions(tools, function)
        if function is not None:
            return _lark(f"args_0 {end}", {"args_0": _json_rule(call_parameters(fns[0]))})
        rules = {}
        for i, f in enumerate(fns):
            head = _lit('{"name": ' + json.dumps(f["name"], ensure_ascii=False) + ', "arguments": ')
            rules[f"call_{i}"] = f"{head} args_{i}"
            rules[f"args_{i}"] = _json_rule(call_parameters(f))
        calls = " | ".join(f"call_{i}" for i in range(len(fns)))
        return _lark(f"({calls}) {end}", rules)

    def _scan(self, out: ParseResult, final: bool) -> None:
        while True:
            if not self._in_call:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    if final and (self.cut or self.stopped):  # ended inside an opener
                        k = _partial_suffix(self._buf, self.OPEN)
                        self._buf = self._buf[: len(self._buf) - k].rstrip() if k else self._buf
                    self._release_text(out, final, self.OPEN)
                    return
                before = self._buf[:i]
                text = before.rstrip()
                self._content(out, text)
                self._gap = before[len(text) :]
                self._buf = self._buf[i + len(self.OPEN) :]
                self._in_call = True
                self._body_scan = (0, False, False, "")
                continue
            j = self._find_close()
            if j < 0 and not final:
                return  # the call is still being written
            if j < 0 and not (self.cut or self.stopped):
                j = self._buf.find(self.CLOSE)  # the model ended inside a string it left open
            # At the end, a call the model did not close (it stopped at EOS) still counts.
            end = len(self._buf) if j < 0 else j + len(self.CLOSE)
            body, raw = self._buf[: j if j >= 0 else end], self._buf[:end]
            self._buf = self._buf[end:]
            self._in_call = False
            call, complete = self._decode(body), True
            if call is None and j < 0 and self.cut:  # the arguments as far as they got
                call, complete = self._cut_call(body), False
                if call is None and self._before_name(body):
                    self._gap = ""  # out of tokens before the call named its function
                    continue
            if call is None and j < 0 and self.stopped:
                self._gap = ""  # a stop string broke the call off: neither call nor markup
                continue
            if call is None or not self._call(out, *call, complete=complete):
                self._content(out, self._gap + self.OPEN + raw)
            self._gap = ""

    def _find_close(self) -> int:
        """Where the closing tag starts in the buffer, or -1: outside the JSON strings of the
        call's body, since an argument's string may hold "</tool_call>" itself (a grammar-forced
        call may write it there). Once the body is no JSON (a stray quote: `"5" inch"`), string
        bounds mean nothing and the first tag ends the call, as it did before strings were
        read. The scan resumes where the last one stopped."""
        i, in_string, escape, last = self._body_scan
        buf, close = self._buf, self.CLOSE
        if last == "!":  # already not JSON: only a tag still to come can end it
            return buf.find(close)
        while i < len(buf):
            c = buf[i]
            if in_string:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_string, last = False, '"'
            elif c == "<" and close.startswith(buf[i : i + len(close)]):
                if buf.startswith(close, i):
                    self._body_scan = (i, False, False, last)
                    return i
                break  # the tag's start, its rest still to come
            elif not c.isspace():
                # A string opens after "{", "[", ",", ":" (or first); after a string comes one
                # of ",:}]". Anything else: not JSON.
                opens = c == '"' and last not in ("", "{", "[", ",", ":")
                if opens or (last == '"' and c not in ",:}]"):
                    self._body_scan = (i, False, False, "!")
                    return self._buf.find(close)
                in_string = c == '"'
                last = c
            i += 1
        self._body_scan = (i, in_string, escape, last)
        return -1

    @staticmethod
    def _decode(body: str) -> tuple[str, str] | None:
        try:
            obj = json_loads(body)
        except (ValueError, RecursionError):
            return None
        return _call_from_object(obj, args_required=False)

    _CUT_NAME = re.compile(r'\s*\{"name": ("(?:[^"\\]|\\.)*")')
    _NAME_KEY = '{"name": "'

    @classmethod
    def _before_name(cls, body: str) -> bool:
        """Whether `body` stops before a call's name was whole: `{"na`, `{"name": "get_w`."""
        head = body.lstrip()
        if cls._NAME_KEY.startswith(head):
            return True
        return head.startswith(cls._NAME_KEY) and '"' not in head[len(cls._NAME_KEY) :]

    _ARGS_KEY = ', "arguments": '

    @classmethod
    def _cut_call(cls, body: str) -> tuple[str, str] | None:
        """A call cut off before its end, as OpenAI returns one that ran out of tokens: its
        name and its arguments' text so far (whole, if only the closing tags were cut)."""
        head = cls._CUT_NAME.match(body)
        if head is None:
            return None
        name, rest = json.loads(head.group(1)), body[head.end() :]
        if not rest.startswith(cls._ARGS_KEY):
            return (name, "") if cls._ARGS_KEY.startswith(rest) else None
        args = rest[len(cls._ARGS_KEY) :]
        close = "\n" + cls.CLOSE  # after the arguments come "}" and this, possibly in part
        cut = next((k for k in range(len(close), 0, -1) if args.endswith(close[:k])), 0)
        args = args[: len(args) - cut]
        for whole in (args[:-1], args) if args.endswith("}") else (args,):
            try:
                json_loads(whole)
                return name, whole
            except (ValueError, RecursionError):
                pass
        return name, args  # the arguments themselves were cut


class Llama3JsonParser(ToolParser):
    """``<|python_tag|>{"name": ..., "parameters": {...}}; {...}``: a call from the start.

    A reply that starts like a call is held to the end, then it is either all calls or all
    content (a JSON answer that is no call, or a builtin-tool code call, stays text).
    """

    name = "llama3_json"
    TAG = "<|python_tag|>"

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._mode = "start"  # start -> json | text

    @classmethod
    def forced_prefix(cls, function: str | None) -> str:
        if function is None:
            return '{"name": "'
        return '{"name": ' + json.dumps(function, ensure_ascii=False) + ', "parameters": '

    @classmethod
    def call_grammar(cls, tools: list[dict[str, Any]], function: str | None) -> str:
        fns = _tool_functions(tools, function)
        if function is not None:
            return _lark('args_0 "}"', {"args_0": _json_rule(call_parameters(fns[0]))})
        rules = {}
        for i, f in enumerate(fns):
            # After the prefix '{"name": "': the rest of the name, then the parameters.
            name = json.dumps(f["name"], ensure_ascii=False)[1:]
            rules[f"call_{i}"] = (
                f'{_lit(name + ", " + chr(34) + "parameters" + chr(34) + ": ")} args_{i} "}}"'
            )
            rules[f"args_{i}"] = _json_rule(call_parameters(f))
        return _lark(" | ".join(f"call_{i}" for i in range(len(fns))), rules)

    @classmethod
    def answer_or_call_grammar(
        cls, tools: list[dict[str, Any]], answer_schema: dict[str, Any], max_calls: int | None
    ) -> str:
        """Answer and call both start with "{": one JSON value of either schema, since
        llguidance's lexer, greedy, would not leave a literal call opener for the answer's
        "{". One call, then: Llama 3.1 makes calls one at a time."""
        fns = _tool_functions(tools, None)
        # Each schema sits in $defs under a name of its own, its "#..." refs moved under it,
        # so that a schema's own $defs still resolve inside the union.
        defs = {"answer": _rooted(close_objects(answer_schema), "#/$defs/answer")}
        calls = []
        for i, f in enumerate(fns):
            defs[f"call_{i}"] = _rooted(close_objects(call_parameters(f)), f"#/$defs/call_{i}")
            calls.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": f["name"]},
                        "parameters": {"$ref": f"#/$defs/call_{i}"},
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
            )
        either = {
            "anyOf": [{"$ref": "#/$defs/answer"}, *calls],
            "$defs": defs,
            "x-guidance": COMPACT_JSON,
        }
        return _lark("value", {"value": f"%json{json.dumps(either)}"})

    def _scan(self, out: ParseResult, final: bool) -> None:
        if self._mode == "start":
            head = self._buf.lstrip()
            if head.startswith((self.TAG, "{")):
                self._mode = "json"
            elif not final and (not head or self.TAG.startswith(head)):
                return  # not yet known whether this is a call
            else:
                self._mode = "text"
        if self._mode == "text":
            self._content(out, self._buf)
            self._buf = ""
            return
        if not final:
            return
        calls = self._decode(self._buf)
        if calls is None or not all(self._accepts(name) for name, _ in calls):
            self._content(out, self._buf)
        else:
            for name, args in calls:
                self._call(out, name, args)
        self._buf = ""

    @classmethod
    def _decode(cls, text: str) -> list[tuple[str, str]] | None:
        text = text.strip()
        if text.startswith(cls.TAG):
            text = text[len(cls.TAG) :]
        decoder = json.JSONDecoder(parse_constant=_reject_constant)
        calls: list[tuple[str, str]] = []
        pos = 0
        while True:
            while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
                pos += 1
            if pos == len(text):
                return calls or None
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError):
                return None
            call = _call_from_object(obj, args_required=True)
            if call is None:
                return None
            calls.append(call)


# ---------------------------------------------------------------- ChatGLM3

_FENCED = re.compile(r"```[\w+-]*[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _JsonNames(ast.NodeTransformer):
    """Lets `tool_call(flag=true)` through: JSON's literal names as Python constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def chatglm3_arguments(code: str) -> str | None:
    """The keyword arguments of ChatGLM3's ``tool_call(k=v, ...)`` as a JSON object string.

    The official demo evaluates the code; here each value must be a literal (`ast.literal_eval`),
    so nothing the model writes is ever executed. None when the code is not such a call.
    """
    text = code.strip()
    m = _FENCED.fullmatch(text)
    if m:
        text = m.group(1).strip()
    try:
        tree = ast.parse(text, mode="eval")
        call = tree.body
        if (
            not isinstance(call, ast.Call)
            or not isinstance(call.func, ast.Name)
            or call.func.id != "tool_call"
            or call.args
            or any(kw.arg is None for kw in call.keywords)  # **kwargs
        ):
            return None
        kwargs = {kw.arg: ast.literal_eval(_JsonNames().visit(kw.value)) for kw in call.keywords}
        return _arguments_json(kwargs)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def k_index(props: dict[str, Any], key: str) -> int:
    """A property's position: rule names must be identifiers, property names need not be."""
    return list(props).index(key)


class ChatGLM3Parser(ToolParser):
    """``[metadata]\\ncontent<|assistant|>name\\n```python\\ntool_call(k=v)\\n``` ``

    Every segment starts with a metadata line. An empty one (plain chat) is removed with the
    whitespace after it; a tool's name makes the segment a call. A first line that cannot be a
    tool name is text (a reply that skipped the metadata line loses nothing).
    """

    name = "chatglm3"
    SEP = "<|assistant|>"
    ANSWER_PREFIX = "\n"  # an empty metadata line: what follows is the answer

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._mode = "meta"  # meta -> text | tool, and back to meta at each SEP
        self._strip_leading = True
        self._tool: tuple[str, str] = ("", "")  # the call's name and its metadata line

    @classmethod
    def forced_prefix(cls, function: str | None) -> str:
        # The prompt ends with <|assistant|>: the metadata line names the tool. ChatGLM3 has no
        # way to force "some tool", so "required" behaves as "auto".
        return "" if function is None else function + "\n"

    @classmethod
    def call_grammar(cls, tools: list[dict[str, Any]], function: str | None) -> str:
        """``name\n```python\ntool_call(k=v, ...)\n``` `` with each value a JSON value of its
        property's schema (the parser reads true/false/null as Python's)."""
        rules: dict[str, str] = {}
        calls = []
        for i, f in enumerate(_tool_functions(tools, function)):
            params = f.get("parameters") if isinstance(f.get("parameters"), dict) else {}
            props = params.get("properties") or {}
            required = [k for k in params.get("required") or [] if k in props]
            optional = [k for k in props if k not in required]
            if not required:  # every property, in order: no optional comma to place
                required, optional = list(props), []
            parts = []
            for j, k in enumerate(required):
                rules[f"v_{i}_{k_index(props, k)}"] = _json_rule(props[k], params)
                sep = ", " if j else ""
                parts.append(f"{_lit(sep + k + '=')} v_{i}_{k_index(props, k)}")
            for k in optional:
                rules[f"v_{i}_{k_index(props, k)}"] = _json_rule(props[k], params)
                parts.append(f"({_lit(', ' + k + '=')} v_{i}_{k_index(props, k)})?")
            head = ("" if function is not None else f["name"] + "\n") + "```python\ntool_call("
            rules[f"call_{i}"] = " ".join([_lit(head), *parts, _lit(")\n```")])
            calls.append(f"call_{i}")
        return _lark(" | ".join(calls), rules)

    def _scan(self, out: ParseResult, final: bool) -> None:
        while True:
            if self._mode == "meta":
                nl = self._buf.find("\n")
                line = self._buf if nl < 0 else self._buf[:nl]
                if self.SEP in line:  # a segment without a metadata line: all text
                    self._mode = "text"
                    continue
                name = line.strip()
                if nl >= 0 and not name:
                    self._buf = self._buf[nl + 1 :]
                    self._mode = "text"
                    continue
                if nl >= 0 and is_tool_name(name, self.tool_names):
                    self._tool = (name, self._buf[: nl + 1])
                    self._buf = self._buf[nl + 1 :]
                    self._mode = "tool"
                    continue
                if nl < 0 and not final and may_be_metadata(line, self.tool_names):
                    return  # wait for the rest of the line
                self._mode = "text"
                continue
            if self._mode == "text":
                i = self._buf.find(self.SEP)
                if i < 0:
                    self._release_text(out, final, self.SEP)
                    return
                self._content(out, self._buf[:i].rstrip())
                self._buf = self._buf[i + len(self.SEP) :]
                self._new_segment()
                continue
            # tool: the call runs to the next segment or the end (the model stops on
            # <|observation|>, which is a stop token and so never in the text)
            i = self._buf.find(self.SEP)
            if i < 0 and not final:
                return
            body = self._buf if i < 0 else self._buf[:i]
            self._buf = "" if i < 0 else self._buf[i + len(self.SEP) :]
            name, head = self._tool
            args = chatglm3_arguments(body)
            if args is None or not self._call(out, name, args):
                self._content(out, head + body)
            self._new_segment()
            if i < 0:
                return

    def _new_segment(self) -> None:
        self._mode = "meta"
        self._strip_leading = True

    def continue_message(self) -> None:
        # No metadata line to read, and the text as written, leading newlines included.
        self._mode = "text"
        self._strip_leading = False


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, ChatGLM3Parser)
}


def make_parser(
    name: str,
    tool_names: Collection[str] | None = None,
    max_calls: int | None = None,
    continuing: bool = False,
) -> ToolParser:
    parser = PARSERS[name](tool_names, max_calls)
    if continuing:
        parser.continue_message()
    return parser


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's own tool format needs, judged from its text."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


@cache
def chatml_tools_template() -> str:
    """The built-in ChatML template with Hermes-style tools, for ChatML models without them."""
    path = resources.files("ember.chat").joinpath("builtin_templates/chatml-tools.jinja")
    return path.read_text()
