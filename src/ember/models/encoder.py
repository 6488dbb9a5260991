"""Sentence embeddings from a BERT-family encoder directory (`--embedding-model`).

Mean pooling over the attention mask, then L2 normalisation: what sentence-transformers does
for models such as all-MiniLM-L6-v2. The encoder runs through transformers' own `AutoModel`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch


class SentenceEncoder:
    def __init__(self, path: str | Path, max_length: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32).eval()
        self.max_length = max_length or min(
            getattr(self.model.config, "max_position_embeddings", 512), 512
        )
        self.dimensions = int(self.model.config.hidden_size)
        self._lock = threading.Lock()  # one forward at a time on a CPU-bound model

    def tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids, cut to `max_length` (at most the model's own) with the special tokens
        kept, as sentence-transformers cuts long texts."""
        from ember.chat.tokenizer import require_unicode

        enc = self.tokenizer(
            [require_unicode(t) for t in texts],
            truncation=True,
            max_length=min(max_length or self.max_length, self.max_length),
        )
        return [list(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]]) -> torch.Tensor:
        """Token-id lists (from `tokenize`, or a client's own) to unit vectors."""
        batch = self.tokenizer.pad({"input_ids": inputs}, return_tensors="pt")
        with self._lock:
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)
