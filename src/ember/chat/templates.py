"""Chat templates: the model's own when it has one, a built-in format when it does not.

Resolution order: `--chat-template` (a file path or a built-in name), then the tokenizer's
template (tokenizer_config.json, chat_template.jinja or GGUF metadata), then a built-in chosen
from the tokenizer and the model type. The resolved template is Jinja source, rendered through
transformers' sandboxed Jinja environment (the one model authors wrote their templates for), or
the name of a built-in format that is built in token ids by code:

* `chatglm3`: ChatGLM3's role tokens are ids that text must never produce (`chatglm3.py`).
* `llama-2`: Meta encodes each turn on its own, so SentencePiece's dummy prefix follows every
  `<s>` (`<s>[INST]` is 1, 518 "▁[", ...). Transformers 5 puts that prefix only at the start of
  the whole text (with legacy false, which Llama-2-chat-hf sets and which is the default), so a
  rendered `<s>[INST]` becomes 1, "[", ... instead. The ids built here are Meta's, and this
  format replaces any template in Meta's format, the model's own included.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import jinja2

from ember.chat.chatglm3 import ChatGLM3Format, message_text
from ember.chat.tokenizer import BaseTokenizer, ChatGLM3Tokenizer, Tokenizer


class ChatTemplateError(ValueError):
    """A conversation the template cannot render: the client's input problem."""


class CodeFormat(Protocol):
    """A built-in chat format written in code rather than Jinja.

    `continue_final_message`: the last message stays open (no end of turn after it), so the
    reply continues it; it comes with add_generation_prompt false.
    """

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> list[int]: ...

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str: ...


class Llama2Format:
    """Meta's Llama-2 chat format, built the way Meta's `chat_completion` builds it.

    The system prompt folds into the first user turn as "<<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{user}";
    each finished exchange is `<s>` + SP("[INST] {u} [/INST] {a} ") + `</s>` and the open turn
    is `<s>` + SP("[INST] {u} [/INST]"), with both sides stripped. Llama-2 has no tool format:
    the format ignores tools, and the server answers a request with tools with a 400. Beyond
    Meta's one system prompt and strict turns, as FastChat served it: system messages join into
    that one, and messages of one role in a row into one turn.
    """

    name = "llama-2"

    def __init__(self, tokenizer: BaseTokenizer) -> None:
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("The llama-2 chat format needs a tokenizer with <s> and </s> ids.")
        self.tokenizer = tokenizer
        self.bos_token_id: int = tokenizer.bos_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        self._bos, self._eos = tokenizer.convert_ids_to_tokens(
            [self.bos_token_id, self.eos_token_id]
        )

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **_: Any,
    ) -> list[int]:
        ids: list[int] = []
        for text, finished in self._turns(messages, continue_final_message):
            ids.append(self.bos_token_id)
            ids += self.tokenizer.encode_plain(text)
            if finished:
                ids.append(self.eos_token_id)
        return ids

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **_: Any,
    ) -> str:
        return "".join(
            self._bos + text + (self._eos if finished else "")
            for text, finished in self._turns(messages, continue_final_message)
        )

    @staticmethod
    def _turns(
        messages: list[dict[str, Any]], continue_final_message: bool = False
    ) -> list[tuple[str, bool]]:
        """(text of one [INST] block, whether the assistant's answer closed it)."""
        if not messages:
            raise ValueError("The conversation has no messages.")
        for i, m in enumerate(messages):  # Meta's format has neither: a 400, not a user turn
            what = "a tool result" if _role_of(m) in ("tool", "function") else None
            if m.get("tool_calls") or m.get("function_call"):
                what = "tool calls"
            if what:
                raise ChatTemplateError(
                    f"messages[{i}] holds {what}, which the llama-2 chat format has no place "
                    "for (it takes system, user and assistant text)."
                )
        all_roles = [_role_of(m) for m in messages]
        all_contents = [message_text(m.get("content"), i) for i, m in enumerate(messages)]
        # Meta's format takes one system prompt, then user and assistant in turn. Clients send
        # more than that (NextChat: a memory summary beside a mask's system prompt, and two
        # user turns in a row where a reply failed), which FastChat took: the system messages
        # join into one, and messages of one role in a row into one turn.
        systems = [c for r, c in zip(all_roles, all_contents) if r == "system"]
        roles: list[str] = []
        contents: list[str] = []
        for role, content in zip(all_roles, all_contents):
            if role == "system":
                continue
            if roles and roles[-1] == role:
                contents[-1] = contents[-1].rstrip() + "\n\n" + content.lstrip()
            else:
                roles.append(role)
                contents.append(content)
        if not roles or roles[0] != "user":  # an opening assistant greeting answers no one
            roles, contents = ["user", *roles], ["", *contents]
        if systems:
            system = "\n\n".join(systems)
            contents[0] = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + contents[0]
        if continue_final_message and roles[-1] != "assistant":
            raise ValueError(
                "continue_final_message continues an assistant message; in the llama-2 format "
                "the last message must be the assistant's."
            )
        turns = []
        for i in range(0, len(roles), 2):
            user = contents[i].strip()
            if i + 1 < len(roles):
                answer = contents[i + 1].strip()
                if continue_final_message and i + 2 == len(roles):  # left open, to continue
                    turns.append((f"[INST] {user} [/INST] {answer}", False))
                else:
                    turns.append((f"[INST] {user} [/INST] {answer} ", True))
            else:
                turns.append((f"[INST] {user} [/INST]", False))
        return turns


# Built-in formats written in code; the others are the .jinja files beside this module.
CODE_FORMATS: dict[str, Callable[[BaseTokenizer], CodeFormat]] = {
    "chatglm3": ChatGLM3Format,
    "llama-2": Llama2Format,
}


def _jinja_builtins() -> tuple[str, ...]:
    folder = resources.files("ember.chat").joinpath("builtin_templates")
    names = (p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))
    return tuple(sorted(n for n in names if n not in CODE_FORMATS))


JINJA_BUILTIN = _jinja_builtins()
BUILTIN = tuple(sorted(JINJA_BUILTIN + tuple(CODE_FORMATS)))


def builtin_template(name: str) -> str:
    """The resolved template of a built-in: Jinja source, or the name of a code format."""
    if name in CODE_FORMATS:
        return name
    if name not in JINJA_BUILTIN:
        raise ValueError(f"unknown built-in chat template {name!r} (have: {', '.join(BUILTIN)})")
    return resources.files("ember.chat").joinpath(f"builtin_templates/{name}.jinja").read_text()


def _is_meta_llama2_template(template: str) -> bool:
    """Meta's Llama-2 chat format (Llama-2-chat-hf's and CodeLlama-Instruct's templates)."""
    return "[INST]" in template and "<<SYS>>" in template


def _fallback_for(tokenizer: BaseTokenizer, model_config: dict[str, Any]) -> str | None:
    if isinstance(tokenizer, ChatGLM3Tokenizer):
        return "chatglm3"
    model_type = model_config.get("model_type", "")
    if model_type == "llama" and model_config.get("vocab_size") == 32000:
        return "llama-2"  # a Llama-2 directory without a template of its own
    if model_type in ("qwen2",):
        return "chatml"
    return None


def read_chat_template(value: str) -> str:
    """A chat template given by name (a built-in) or by file, resolved as `builtin_template`
    does. A file's Jinja is compiled now: a typo in it must stop the server when it starts,
    not fail every chat request afterwards with an error that blames the client."""
    path = Path(value)
    if path.is_file():
        source = path.read_text()
        try:
            _compile_jinja(source)
        except jinja2.TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ChatTemplateError(f"chat template {value}{line}: {e}") from None
        return source
    if value in BUILTIN:
        return builtin_template(value)
    raise ChatTemplateError(
        f"chat template {value!r} is neither a file nor a built-in (built-ins: "
        f"{', '.join(BUILTIN)})"
    )


def _compile_jinja(source: str) -> None:
    """Compile as transformers does when it applies the template (its sandbox, extensions
    and `{% generation %}` tag), for the same syntax errors."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # moved in another release: the first chat request tells instead
        return
    _compile_jinja_template(source)


def resolve_chat_template(
    override: str | None, tokenizer: BaseTokenizer, model_config: dict[str, Any]
) -> str | None:
    """Jinja source, the name of a code format (see CODE_FORMATS), or None for no template."""
    if override:
        return read_chat_template(override)
    if tokenizer.chat_template:
        if _is_meta_llama2_template(tokenizer.chat_template) and tokenizer.bos_token_id is not None:
            return builtin_template("llama-2")  # the same format, but id-exact
        return tokenizer.chat_template
    name = _fallback_for(tokenizer, model_config)
    return builtin_template(name) if name else None


class ChatFormatter:
    """Renders conversations to prompt text and token ids."""

    def __init__(self, tokenizer: BaseTokenizer, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        # The built-in code format in use ("chatglm3", "llama-2"), None for Jinja or no template.
        self.name: str | None = None
        self._format: CodeFormat | None = None
        if template in CODE_FORMATS:
            self.name = template
            self._format = CODE_FORMATS[template](tokenizer)
        elif template is not None and not isinstance(tokenizer, Tokenizer):
            raise ValueError(
                "Jinja chat templates need a Hugging Face tokenizer; ChatGLM3's tokenizer "
                "uses the built-in chatglm3 format."
            )

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt as text (for display and echo; `encode` gives the ids to run).

        `continue_final_message`: leave the last message open so the reply continues it (as
        transformers and vLLM name it); it needs add_generation_prompt false.
        """
        _check_continue(add_generation_prompt, continue_final_message)
        if self._format is not None:
            try:
                return self._format.render(
                    messages, add_generation_prompt, tools, continue_final_message, **kwargs
                )
            except ValueError as e:
                raise ChatTemplateError(str(e)) from e
        if self.template is None:
            raise ChatTemplateError(
                "This model has no chat template; pass --chat-template or use completions."
            )
        assert isinstance(self.tokenizer, Tokenizer)  # checked in __init__
        try:
            return self.tokenizer.hf.apply_chat_template(
                messages,
                chat_template=self.template,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        except Exception as e:  # template errors are the caller's input problem
            raise ChatTemplateError(f"could not apply the chat template: {e}") from e

    def encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """The prompt's token ids, ready for the engine."""
        if self._format is not None:
            _check_continue(add_generation_prompt, continue_final_message)
            try:
                return self._format.encode(
                    messages, add_generation_prompt, tools, continue_final_message, **kwargs
                )
            except ValueError as e:
                raise ChatTemplateError(str(e)) from e
        # The template writes BOS itself when the model wants one.
        text = self.render(messages, add_generation_prompt, tools, continue_final_message, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)


def _check_continue(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError(
            "continue_final_message and add_generation_prompt cannot both be true."
        )


def _role_of(message: dict[str, Any]) -> str:
    role = message.get("role")
    return "system" if role == "developer" else str(role)
