"""The GPU backend: paged attention in Triton kernels (`triton_kernels.py`).

Same cache layout as the torch backend ([slots, 2, kv_heads, head_dim] per layer), so either
can read what the other wrote and the torch backend stays the reference for these kernels.
Metadata is a handful of small integer tensors (slots, block tables, lengths) that the
kernels read on the device; nothing in `forward` depends on host data, which is what lets a
decode step be captured once in a CUDA graph and replayed with new values in the same
tensors (`graph_metadata`).
"""

from __future__ import annotations

import os

import torch

from ember.engine.attention.base import AttentionBackend, AttentionMetadata, SeqSpan

# Decode splits the KV length until about this many programs per streaming multiprocessor
# run at once; more splits only add merge work.
PROGRAMS_PER_SM = 2


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        from ember.engine.attention import triton_kernels

        self.kernels = triton_kernels
        # Tile sizes: tiny under the interpreter (tests), GPU-sized otherwise.
        small = _interpreted()
        self.decode_block_n = 16 if small else 32
        self.prefill_block = 16 if small else 64
        self.num_sms = 1
        if torch.cuda.is_available():
            # the current device: the runner has made it the model's
            device = torch.cuda.current_device()
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    @classmethod
    def available(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return triton_available()

    def allocate_cache(
        self, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        shape = (num_blocks * self.block_size, 2, self.num_kv_heads, self.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def decode_splits(self, num_seqs: int, max_context: int) -> int:
        """KV splits per decode sequence: enough programs to fill the GPU, no empty tiles."""
        programs = max(1, num_seqs * self.num_kv_heads)
        want = -(-PROGRAMS_PER_SM * self.num_sms // programs)
        tiles = max(1, -(-max_context // self.decode_block_n))
        return max(1, min(want, self.kernels.MAX_SPLITS, tiles))

    def _tables(self, spans: list[SeqSpan]) -> torch.Tensor:
        width = max(len(s.block_table) for s in spans)
        tables = torch.zeros(len(spans), max(width, 1), dtype=torch.int32)
        for i, span in enumerate(spans):
            tables[i, : len(span.block_table)] = torch.tensor(span.block_table, dtype=torch.int32)
        return tables

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
    ) -> AttentionMetadata:
        slots = [slot for span in spans for slot in span.new_slots(self.block_size)]
        slot_mapping = torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True)
        extra: dict = {"prefill": None}
        decodes = spans[:num_decode_seqs]
        if decodes:
            max_ctx = max(s.context_len for s in decodes)
            splits = self.decode_splits(len(decodes), max_ctx)
            extra["decode_tables"] = self._tables(decodes).to(device, non_blocking=True)
            extra["decode_lens"] = torch.tensor(
                [s.context_len for s in decodes], dtype=torch.int32
            ).to(device, non_blocking=True)
            extra["decode_splits"] = splits
            extra["decode_workspace"] = (
                self.kernels.decode_workspace(
                    len(decodes), self.num_heads, self.head_dim, splits, device
                )
                if splits > 1
                else None
            )
        prefills = spans[num_decode_seqs:]
        if prefills:
            # One transfer; rows, so each of the three is contiguous as the kernel reads it,
            # padded to 16 bytes so every row starts aligned (Triton compiles a variant of the
            # kernel for each pointer alignment it meets).
            n = len(prefills)
            pad = [0] * (-n % 4)
            ints = torch.tensor(
                [
                    [s.query_start for s in prefills] + pad,
                    [s.query_len for s in prefills] + pad,
                    [s.context_len for s in prefills] + pad,
                ],
                dtype=torch.int32,
            ).to(device, non_blocking=True)
            extra["prefill"] = (
                self._tables(prefills).to(device, non_blocking=True),
                ints[0, :n],
                ints[1, :n],
                ints[2, :n],
                max(s.query_len for s in prefills),
            )
        return AttentionMetadata(slot_mapping, spans, num_decode_seqs, kv_caches, extra)

    def graph_metadata(
        self,
        slot_mapping: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        max_context: int,
        kv_caches: list[torch.Tensor],
    ) -> AttentionMetadata:
        """Metadata for a decode-only step over fixed tensors a CUDA graph is captured with;
        later steps write new values into the same tensors and replay. Padding rows carry
        slot -1 (nothing written) and length 0 (output zeros)."""
        n = lens.shape[0]
        splits = self.decode_splits(n, max_context)
        workspace = (
            self.kernels.decode_workspace(n, self.num_heads, self.head_dim, splits, lens.device)
            if splits > 1
            else None
        )
        extra = {
            "prefill": None,
            "decode_tables": tables,
            "decode_lens": lens,
            "decode_splits": splits,
            "decode_workspace": workspace,
        }
        return AttentionMetadata(slot_mapping, [], n, kv_caches, extra)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cache = meta.kv_caches[layer]
        kern = self.kernels
        kern.write_kv(k, v, cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n = meta.num_decode_seqs
        extra = meta.extra
        if n:
            kern.decode_attention(
                q[:n],
                cache,
                extra["decode_tables"],
                extra["decode_lens"],
                out[:n],
                self.scale,
                self.block_size,
                extra["decode_splits"],
                extra["decode_workspace"],
                block_n=self.decode_block_n,
            )
        if extra["prefill"] is not None:
            tables, starts, q_lens, ctx_lens, max_q = extra["prefill"]
            kern.prefill_attention(
                q,
                cache,
                tables,
                starts,
                q_lens,
                ctx_lens,
                max_q,
                out,
                self.scale,
                self.block_size,
                block_m=self.prefill_block,
                block_n=self.prefill_block,
            )
        return out
