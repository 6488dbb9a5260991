"""Sentence embeddings from a BERT-family encoder directory (`--embedding-model`).

Mean pooling over the attention mask, then L2 normalisation: what sentence-transformers does
for models such as all-MiniLM-L6-v2. The encoder runs through transformers' own `AutoModel`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch


class EncodingStopped(RuntimeError):
    """An encoding given up between batches, as its request ended (shutdown, disconnect)."""


class SentenceEncoder:
    # Padded tokens per forward pass: attention memory grows with the batch times the square
    # of its longest input, so a request of 2048 long inputs runs as many small batches.
    BATCH_TOKENS = 8192

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
        # transformers sets each call's truncation on the shared Rust tokenizer: calls on
        # several threads at once would cut one another's texts.
        self._tokenize_lock = threading.Lock()

    def tokenize(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids, cut to `max_length` (at most the model's own) with the special tokens
        kept, as sentence-transformers cuts long texts."""
        from ember.chat.tokenizer import require_unicode

        texts = [require_unicode(t) for t in texts]
        limit = min(max_length or self.max_length, self.max_length)
        with self._tokenize_lock:
            enc = self.tokenizer(texts, truncation=True, max_length=limit)
        return [list(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]], stop: threading.Event | None = None) -> torch.Tensor:
        """Token-id lists (from `tokenize`, or a client's own) to unit vectors, in batches of
        similar lengths (little padding) of at most BATCH_TOKENS padded tokens. Once `stop`
        is set (its request has ended), no further batch runs: EncodingStopped."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), self.dimensions)
        start = 0
        while start < len(order):
            end = start + 1  # lengths ascend: the batch's last input is its longest
            while end < len(order) and (end - start + 1) * len(inputs[order[end]]) <= (
                self.BATCH_TOKENS
            ):
                end += 1
            if stop is not None and stop.is_set():
                raise EncodingStopped("the request ended before its inputs were encoded")
            rows = order[start:end]
            out[rows] = self._encode_batch([inputs[i] for i in rows])
            start = end
        return out

    def _encode_batch(self, inputs: list[list[int]]) -> torch.Tensor:
        batch = self.tokenizer.pad({"input_ids": inputs}, return_tensors="pt")
        with self._lock:
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)
