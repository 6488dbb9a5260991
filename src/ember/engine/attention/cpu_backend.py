"""The CPU backend: every query token attends over the paged cache in place, by one C kernel.

The kernel (`ember.native`'s `paged_attention`, float32) walks each sequence's block table and
reads keys and values where they lie, so no step gathers a context out of the cache. It takes
decodes and prefill chunks alike, one query row per new token, and a row's arithmetic depends
on that row alone. So the output of a token is bit for bit the same whether it was a decode, a
prompt's last token after a prefix-cache hit, part of a long prefill or of a batch of other
sequences. With 8-bit quantized weights and activations that is what keeps a greedy reply the
same under load: a last-bit difference in attention can move an activation across a rounding
step, and that can change a token a few layers on.
"""

from __future__ import annotations

import torch

from ember.engine.attention.base import AttentionMetadata, SeqSpan
from ember.engine.attention.torch_backend import TorchAttentionBackend
from ember.native import cpu_kernels


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend's cache layout, read by the C kernel for every query token."""

    name = "cpu"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> None:
        if not self.available(num_heads, num_kv_heads, head_dim):
            raise ValueError(
                f"the cpu attention backend needs the C kernels and a head size that is a "
                f"multiple of 16 up to 256 (this model's: {head_dim}); use --attention-backend "
                "torch"
            )
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)

    @classmethod
    def available(cls, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return head_dim % 16 == 0 and 0 < head_dim <= 256 and cpu_kernels() is not None

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
    ) -> AttentionMetadata:
        # One tensor from padded Python lists: a torch call per sequence costs more at 32.
        max_blocks = max((len(s.block_table) for s in spans), default=1)
        tables = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in spans],
            dtype=torch.int32,
        ).view(len(spans), max_blocks)
        bs = self.block_size
        if num_decode_seqs == len(spans):
            # A step of decodes alone (the steps that matter most at one or a few sequences):
            # plain integers, no per-sequence tensors.
            slots = [s.new_slots(bs)[0] for s in spans]
            lens = torch.tensor([s.context_len for s in spans], dtype=torch.int32)
            row_seq = None
            extra = {"decode_tables": tables, "decode_lens": lens}  # for models/cpu_decode.py
        else:
            slot_list, seq_list, len_list = [], [], []
            for i, s in enumerate(spans):
                slot_list += s.new_slots(bs)
                seq_list += [i] * s.query_len
                len_list += range(s.context_len - s.query_len + 1, s.context_len + 1)
            slots = slot_list
            lens = torch.tensor(len_list, dtype=torch.int32)
            row_seq = torch.tensor(seq_list, dtype=torch.int32)
            extra = {}
        extra.update(tables=tables, row_seq=row_seq, row_len=lens)
        slot_mapping = torch.tensor(slots, dtype=torch.long)
        return AttentionMetadata(slot_mapping, spans, num_decode_seqs, kv_caches, extra)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cache = self._write_kv(layer, k, v, meta)
        out = torch.empty(q.shape, dtype=q.dtype)
        self._attend(cache, q, out, meta)
        return out

    def _attend(
        self, cache: torch.Tensor, q: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        lib = cpu_kernels()
        assert lib is not None and cache.dtype == torch.float32 and cache.is_contiguous()
        assert out.is_contiguous() and out.shape == q.shape
        if q.stride(2) != 1 or q.stride(1) != self.head_dim:  # a token's heads must be one run
            q = q.contiguous()
        tables, row_seq, row_len = (meta.extra[k] for k in ("tables", "row_seq", "row_len"))
        lib.paged_attention(
            q.data_ptr(),
            q.stride(0),
            cache.data_ptr(),
            out.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            None if row_seq is None else row_seq.data_ptr(),
            row_len.data_ptr(),
            q.shape[0],
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            self.scale,
        )
