"""Chat templates: the model's own when it has one, a built-in format when it does not.

Resolution order: `--chat-template` (a file path or a built-in name), then the tokenizer's
template (tokenizer_config.json, chat_template.jinja or GGUF metadata), then a built-in chosen
from the model type. Rendering goes through transformers' sandboxed Jinja environment, the one
the model authors wrote their templates for.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ember.chat.tokenizer import Tokenizer

BUILTIN = ("chatml", "llama-2")


def builtin_template(name: str) -> str:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in chat template {name!r} (have: {', '.join(BUILTIN)})")
    return resources.files("ember.chat").joinpath(f"builtin_templates/{name}.jinja").read_text()


def _fallback_for(model_config: dict[str, Any]) -> str | None:
    model_type = model_config.get("model_type", "")
    if model_type == "llama" and model_config.get("vocab_size") == 32000:
        return "llama-2"  # a Llama-2 directory without a template of its own
    if model_type in ("qwen2",):
        return "chatml"
    return None


def resolve_chat_template(
    override: str | None, tokenizer: Tokenizer, model_config: dict[str, Any]
) -> str | None:
    if override:
        path = Path(override)
        if path.is_file():
            return path.read_text()
        return builtin_template(override)
    if tokenizer.chat_template:
        return tokenizer.chat_template
    name = _fallback_for(model_config)
    return builtin_template(name) if name else None


class ChatTemplateError(ValueError):
    pass


class ChatFormatter:
    """Renders conversations to prompt text and token ids."""

    def __init__(self, tokenizer: Tokenizer, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if self.template is None:
            raise ChatTemplateError(
                "This model has no chat template; pass --chat-template or use completions."
            )
        try:
            return self.tokenizer.hf.apply_chat_template(
                messages,
                chat_template=self.template,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except Exception as e:  # template errors are the caller's input problem
            raise ChatTemplateError(f"could not apply the chat template: {e}") from e

    def encode(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # The template writes BOS itself when the model wants one.
        return self.tokenizer.encode(self.render(messages, **kwargs), add_special_tokens=False)
