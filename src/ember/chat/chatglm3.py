"""ChatGLM3's prompt format, built in token ids exactly as the official `build_chat_input`.

A prompt is `[gMASK] sop`, then per message `<|role|>` + SP(metadata + "\\n") + SP(content)
(two separate SentencePiece encodes, each with its dummy prefix), then `<|assistant|>` where the
reply starts. Role tokens are ids, never text, so a user cannot forge a turn by typing one.

OpenAI-style conversations map onto it the way THUDM's openai_api_demo and tool demo do:
role "tool" (and the legacy "function") is `observation`; request tools are listed as JSON in the
system message; an assistant tool call is replayed in the model's own output form, an assistant
item whose metadata is the function name and whose content is
"```python\\ntool_call(k=v, ...)\\n```".
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ember.chat.tokenizer import BaseTokenizer, ChatGLM3Tokenizer

# The system prompt of THUDM's tool demos, used when a request has tools but no system message.
TOOLS_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)

# OpenAI roles → ChatGLM3 roles.
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "observation": "observation",
    "tool": "observation",
    "function": "observation",
}


# ---- a reply's metadata line: blank (plain text follows) or the name of the tool it calls

_NAME_CHARS = re.compile(r"[\w.\-]+")


def is_tool_name(name: str, names: Collection[str] | None) -> bool:
    """Whether a whole metadata line (stripped) names a tool: one of `names` (None: any)."""
    if names is None:
        return bool(_NAME_CHARS.fullmatch(name))
    return name in names


def may_be_metadata(line: str, names: Collection[str] | None) -> bool:
    """Whether an unfinished first line could still become a blank or tool metadata line."""
    head = line.lstrip()
    if not head:
        return True
    name = head.rstrip()
    if names is None:
        return bool(_NAME_CHARS.fullmatch(name))
    if name != head:  # trailing whitespace only after a whole name
        return name in names
    return any(n.startswith(name) for n in names)


@dataclass(frozen=True)
class ChatGLM3Message:
    """One item of the official history: a role, a metadata line, and the content."""

    role: str
    content: str
    metadata: str = ""


def tool_call_code(arguments: dict[str, Any]) -> str:
    """A call as the model writes it (Python keyword arguments in a fenced block)."""
    kwargs = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({kwargs})\n```"


def tools_json(tools: list[dict[str, Any]]) -> str:
    """The tools as the official code appends them to the system message."""
    return json.dumps(tools, indent=4, ensure_ascii=False)


def message_text(content: Any, index: int) -> str:
    """A message's content as one string (text parts joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ValueError(f"messages[{index}]: only text content parts are supported.")
            texts.append(str(part.get("text") or ""))
        return "\n".join(texts)
    raise ValueError(f"messages[{index}]: content must be text.")


def to_chatglm3_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[ChatGLM3Message]:
    """Turn OpenAI-style messages (and request tools) into ChatGLM3 history items.

    Raises ValueError for a conversation ChatGLM3 cannot express.
    """
    # ChatGLM3 was trained on bare function descriptions (name, description, parameters), the
    # form of its tool demo; OpenAI wraps each in {"type": "function", "function": {...}}.
    functions = [_function_of(tool) for tool in tools] if tools else None
    items: list[ChatGLM3Message] = []
    tools_placed = False
    for i, message in enumerate(messages):
        role = ROLES.get(message.get("role", ""))
        if role is None:
            raise ValueError(
                f"messages[{i}]: role {message.get('role')!r} is not one ChatGLM3 has "
                f"(use one of {', '.join(sorted(ROLES))})."
            )
        content = message_text(message.get("content"), i)
        metadata = str(message.get("metadata") or "")
        if role == "system" and functions is not None and not tools_placed:
            content = content + "\n" + tools_json(functions)
            tools_placed = True
        calls = list(message.get("tool_calls") or [])
        if message.get("function_call"):  # the legacy single-call form
            calls.append(message["function_call"])
        if role == "assistant" and calls:
            if content.strip():  # text the model wrote before calling
                items.append(ChatGLM3Message("assistant", content, metadata))
            for call in calls:
                name, arguments = _call_of(call, i)
                items.append(ChatGLM3Message("assistant", tool_call_code(arguments), name))
            continue
        items.append(ChatGLM3Message(role, content, metadata))
    if functions is not None and not tools_placed:
        prompt = TOOLS_SYSTEM_PROMPT + "\n" + tools_json(functions)
        items.insert(0, ChatGLM3Message("system", prompt))
    return items


class ChatGLM3Format:
    """The `chatglm3` built-in chat format: conversations to ids and to the text they show."""

    name = "chatglm3"

    def __init__(self, tokenizer: BaseTokenizer) -> None:
        if not isinstance(tokenizer, ChatGLM3Tokenizer):
            raise ValueError(
                "The chatglm3 chat format needs ChatGLM3's own tokenizer (tokenizer.model with "
                "tokenizer_class ChatGLMTokenizer); this model's tokenizer is another one."
            )
        self.tokenizer = tokenizer
        self._role_ids = {
            role: tokenizer.special_ids[f"<|{role}|>"]
            for role in ("system", "user", "assistant", "observation")
        }

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **_: Any,
    ) -> list[int]:
        # No token ends a ChatGLM3 message, so without the generation prompt the last one is
        # already open: continue_final_message needs nothing more.
        tok = self.tokenizer
        ids = list(tok.prefix_ids)
        for item in to_chatglm3_messages(messages, tools):
            ids.append(self._role_ids[item.role])
            ids += tok.encode_plain(item.metadata + "\n")
            ids += tok.encode_plain(item.content)
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
        return ids

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **_: Any,
    ) -> str:
        """The prompt as text, special tokens written out; what decoding its ids shows (the
        space before the content is the dummy prefix of its separate SentencePiece encode)."""
        parts = ["[gMASK]sop"]
        for item in to_chatglm3_messages(messages, tools):
            parts.append(f"<|{item.role}|>{item.metadata}\n")
            if item.content:
                parts.append(" " + item.content)
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)


def _function_of(tool: Any) -> Any:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool  # already a bare function description


def _call_of(call: Any, index: int) -> tuple[str, dict[str, Any]]:
    """(name, keyword arguments) of an OpenAI tool call or a legacy function_call."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not function.get("name"):
        raise ValueError(f"messages[{index}]: a tool call needs a function name.")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as e:
            raise ValueError(
                f"messages[{index}]: tool call arguments must be a JSON object: {e}"
            ) from e
    if not isinstance(arguments, dict):
        raise ValueError(f"messages[{index}]: tool call arguments must be a JSON object.")
    return str(function["name"]), arguments
