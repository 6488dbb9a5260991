"""Tokenizers: a thin, uniform face over Hugging Face tokenizers.

The engine needs four things from a tokenizer: encode text, decode ids, the vocabulary size
and the special ids. Everything else (chat templates) lives in `templates.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tokenizer:
    """Wraps a `transformers` tokenizer loaded from a model directory."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.chat_template: str | None = getattr(hf_tokenizer, "chat_template", None)
        self.all_special_ids: frozenset[int] = frozenset(hf_tokenizer.all_special_ids)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(token_ids))
