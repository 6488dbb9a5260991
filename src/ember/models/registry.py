"""`architectures` in config.json → the model class that runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `ember pull` / `ember models` read this list without importing torch
    from torch import nn

_ARCHITECTURES: dict[str, tuple[str, str]] = {
    # ChatGLM2/3 and GLM-4 name their base class; both carry the same weights.
    "ChatGLMModel": ("ember.models.chatglm", "ChatGLMForCausalLM"),
    "ChatGLMForConditionalGeneration": ("ember.models.chatglm", "ChatGLMForCausalLM"),
    "LlamaForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("ember.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(config: dict[str, Any]) -> type[nn.Module]:
    import importlib

    for arch in config.get("architectures") or []:
        if arch in _ARCHITECTURES:
            module, name = _ARCHITECTURES[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(
        f"unsupported architecture {config.get('architectures')}; "
        f"Ember runs {', '.join(supported_architectures())}"
    )
