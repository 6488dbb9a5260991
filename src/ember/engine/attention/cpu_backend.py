"""The CPU backend: the torch backend, with decodes attending over the paged cache in place.

A decode step's attention is mostly memory traffic: the torch path first gathers every
sequence's context out of the cache into a padded copy, then reads that copy again. The C
kernel (`ember.native`, float32) walks each sequence's block table and reads keys and values
where they lie, in one pass with a running softmax, a sequence per task across the cores.
Prefill chunks keep the torch path, where SDPA's matrix products dominate.
"""

from __future__ import annotations

import torch

from ember.engine.attention.base import AttentionMetadata, SeqSpan
from ember.engine.attention.torch_backend import TorchAttentionBackend
from ember.native import cpu_kernels


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    @classmethod
    def available(cls, num_heads: int, num_kv_heads: int) -> bool:
        return cpu_kernels() is not None

    def _decode_metadata(
        self, decodes: list[SeqSpan], slots: list[torch.Tensor] | None, device: torch.device
    ) -> dict:
        # One tensor from padded Python lists: a torch call per sequence costs more at 32.
        max_blocks = max(len(s.block_table) for s in decodes)
        tables = torch.tensor(
            [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in decodes],
            dtype=torch.int32,
        )
        lens = torch.tensor([s.context_len for s in decodes], dtype=torch.int32)
        return {"decode_tables": tables, "decode_lens": lens}

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
    ) -> AttentionMetadata:
        if not spans or num_decode_seqs != len(spans):
            return super().build_metadata(spans, num_decode_seqs, kv_caches, device)
        # A step of decodes alone: each new token's slot in plain integers, not the whole
        # context's slots in tensors (the steps that matter most at one or a few sequences).
        slots = [s.new_slots(self.block_size)[0] for s in spans]
        extra = self._decode_metadata(spans, None, device)
        extra.update(prefill_batch=None, prefills=[])
        slot_mapping = torch.tensor(slots, dtype=torch.long)
        return AttentionMetadata(slot_mapping, spans, num_decode_seqs, kv_caches, extra)

    def _decode(
        self, cache: torch.Tensor, q: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        lib = cpu_kernels()
        assert lib is not None and cache.dtype == torch.float32 and cache.is_contiguous()
        n = meta.num_decode_seqs
        tables, lens = meta.extra["decode_tables"], meta.extra["decode_lens"]
        qd = q[:n]
        if qd.stride(2) != 1 or qd.stride(1) != self.head_dim:  # a token's heads must be one run
            qd = qd.contiguous()
        od = out[:n]
        target = od if od.is_contiguous() else torch.empty(od.shape, dtype=od.dtype)
        lib.decode_attention(
            qd.data_ptr(),
            qd.stride(0),
            cache.data_ptr(),
            target.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            n,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.block_size,
            tables.shape[1],
            self.scale,
        )
        if target is not od:
            od.copy_(target)
