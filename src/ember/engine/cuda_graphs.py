"""CUDA graphs for decode steps: the whole model forward replayed as one launch.

A decode step of a 7B model is ~1,300 small kernels; launched one by one from Python the host
takes longer than the GPU does. Here each bucketed batch size (1, 2, 4, 8, then every 16 up to
the largest) is captured once at start-up over fixed input tensors; a step copies its inputs
into them in one transfer, pads the batch up to its bucket, and replays. Buckets are captured
largest first and share one memory pool, so all of them together cost about as much memory
as the largest. Prefill and mixed steps run eagerly.

The inputs live in one pinned host matrix and its device twin, a row per sequence:
[token id, position, cache slot, context length, block table ...]. Padding rows carry slot -1
(the KV write skips them) and length 0 (attention outputs zeros), so they touch no real state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ember.engine.attention import AttentionBackend, AttentionMetadata

log = logging.getLogger(__name__)

_ID, _POS, _SLOT, _LEN, _TABLE = 0, 1, 2, 3, 4


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        capture: bool = True,
    ) -> None:
        """capture=False runs the same fixed-buffer steps without graphs (the CPU tests use
        it to check the inputs, padding and metadata that the graphs replay)."""
        self.model = model
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_batch)
        width = _TABLE + self.max_blocks
        pinned = device.type == "cuda"  # the host-to-device copy then runs asynchronously
        self.host = torch.zeros(max_batch, width, dtype=torch.int64, pin_memory=pinned)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(max_batch, width, dtype=torch.int64, device=device)
        # Per bucket: the graph, its output logits, and its metadata (which owns the split
        # workspace the graph writes into: it must live as long as the graph).
        self.graphs: dict[int, tuple[Any, torch.Tensor | None, AttentionMetadata]] = {}
        if capture:
            self._capture(backend, kv_caches)
        else:
            for b in self.buckets:
                self.graphs[b] = (None, None, self._metadata(backend, kv_caches, b))

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _metadata(
        self, backend: AttentionBackend, kv_caches: list[torch.Tensor], b: int
    ) -> AttentionMetadata:
        rows = self.dev[:b]
        return backend.graph_metadata(  # type: ignore[attr-defined]
            rows[:, _SLOT], rows[:, _TABLE:], rows[:, _LEN], self.max_model_len, kv_caches
        )

    def _forward(self, meta: AttentionMetadata, b: int) -> torch.Tensor:
        rows = self.dev[:b]
        hidden = self.model(rows[:, _ID], rows[:, _POS], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, backend: AttentionBackend, kv_caches: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        self.host[:, _SLOT] = -1  # padding everywhere: no KV write, no attention
        self.host[:, _LEN] = 0
        self.dev.copy_(self.host)
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        for b in reversed(self.buckets):
            meta = self._metadata(backend, kv_caches, b)
            with torch.cuda.stream(stream):
                for _ in range(2):  # compiles the Triton kernels, settles the allocator
                    self._forward(meta, b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self._forward(meta, b)
            pool = graph.pool()
            self.graphs[b] = (graph, logits, meta)
        torch.cuda.synchronize()
        log.info(
            "captured CUDA graphs for decode batches %s in %.1fs",
            self.buckets,
            time.perf_counter() - t0,
        )

    def can_run(self, batch: list[Any]) -> bool:
        """Decodes only, at most the largest bucket, every block table within the width."""
        if not batch or len(batch) > self.max_batch:
            return False
        return all(len(item.seq.block_table) <= self.max_blocks for item in batch)

    def run(self, batch: list[Any], fill: Callable[[np.ndarray, list[Any]], None]) -> torch.Tensor:
        """Replay the bucket for len(batch) decodes; returns their logits (a view of the
        graph's output, valid until the next replay)."""
        n = len(batch)
        b = next(size for size in self.buckets if size >= n)
        rows = self.host_np[:b]
        fill(rows, batch)
        if b > n:
            rows[n:, :_TABLE] = (0, 0, -1, 0)
        self.dev[:b].copy_(self.host[:b], non_blocking=True)
        graph, logits, meta = self.graphs[b]
        if graph is None:
            with torch.inference_mode():
                logits = self._forward(meta, b)
        else:
            graph.replay()
        assert logits is not None
        return logits[:n]


def fill_decode_rows(rows: np.ndarray, batch: list[Any], block_size: int) -> None:
    """One row per decode: its last token, its position, the slot it writes, its new length
    and its block table."""
    for i, item in enumerate(batch):
        seq = item.seq
        pos = seq.num_computed_tokens
        table = seq.block_table
        row = rows[i]
        row[_ID] = seq.token_ids[pos]
        row[_POS] = pos
        row[_SLOT] = table[pos // block_size] * block_size + pos % block_size
        row[_LEN] = pos + 1
        row[_TABLE : _TABLE + len(table)] = table
