"""Ember: serve open LLMs behind an OpenAI-compatible API."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ember.engine.request import SamplingParams
    from ember.offline import LLM


def __getattr__(name: str):
    # Lazy, so `import ember` (and `ember --help`) stays fast: torch loads on first use.
    if name == "LLM":
        from ember.offline import LLM

        return LLM
    if name == "SamplingParams":
        from ember.engine.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
