"""Reference attention on plain torch: runs anywhere, used on the CPU and to check GPU kernels.

Each layer's cache is one tensor of slots holding a key and a value side by side, so one gather
fetches both. Decodes are batched into one padded SDPA call over their gathered cache slots.
Prefill chunks are batched the same way when padding them to a common shape wastes little
(a burst of new prompts); otherwise each attends on its own: straight over its fresh keys when
nothing is cached before it, or over its gathered context with a causal mask offset by the
cached length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.engine.attention.base import AttentionBackend, AttentionMetadata, SeqSpan

# SDPA's enable_gqa (grouped K/V heads without copies) arrived in torch 2.5; before it, each
# K/V head is repeated for its group of query heads.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool, **kw: object
) -> torch.Tensor:
    """scaled_dot_product_attention over [..., heads, tokens, dim], K/V heads grouped."""
    if gqa and not _SDPA_GQA:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        gqa = False
    if gqa:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kw)


# Prefill chunks share one padded SDPA call when the padded work is at most this many times
# the real work; beyond it (one long chunk beside short ones) separate calls are cheaper.
PREFILL_BATCH_MAX_PADDING = 2.0


@dataclass
class _PrefillBatch:
    """Several prefill chunks padded to [seqs, max_query, max_context]."""

    start: int  # flat offset of the first chunk's first token
    num_tokens: int
    gather: torch.Tensor  # [seqs * max_context] cache slots (padding repeats a real slot)
    shape: tuple[int, int, int]  # seqs, max_query, max_context
    mask: torch.Tensor  # [seqs, 1, max_query, max_context]
    rows: torch.Tensor  # [num_tokens]: each real query's row in the padded [seqs * max_query]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def allocate_cache(
        self, num_layers: int, num_blocks: int, dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        shape = (num_blocks * self.block_size, 2, self.num_kv_heads, self.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def _slots(self, span: SeqSpan) -> torch.Tensor:
        """Cache slot of every context position of a sequence."""
        table = torch.tensor(span.block_table, dtype=torch.long)
        pos = torch.arange(span.context_len)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @staticmethod
    def _padded_gather(
        spans: list[SeqSpan], slots: list[torch.Tensor], length: int
    ) -> torch.Tensor:
        # Padding repeats a slot the sequence has written: the cache is uninitialised, and
        # masked garbage could still be NaN (0 * NaN = NaN).
        gather = torch.empty(len(spans), length, dtype=torch.long)
        for i, (span, s) in enumerate(zip(spans, slots)):
            gather[i, : span.context_len] = s
            gather[i, span.context_len :] = s[0]
        return gather.view(-1)  # flat: index_select is the fastest gather

    def _prefill_batch(
        self, spans: list[SeqSpan], slots: list[torch.Tensor], device: torch.device
    ) -> _PrefillBatch | None:
        if len(spans) < 2:
            return None
        max_q = max(s.query_len for s in spans)
        max_ctx = max(s.context_len for s in spans)
        real = sum(s.query_len * s.context_len for s in spans)
        if len(spans) * max_q * max_ctx > PREFILL_BATCH_MAX_PADDING * real:
            return None
        q_len = torch.tensor([s.query_len for s in spans])[:, None, None]
        cached = torch.tensor([s.context_len - s.query_len for s in spans])[:, None, None]
        qi = torch.arange(max_q)[None, :, None]
        kj = torch.arange(max_ctx)[None, None, :]
        # Query i of a chunk (absolute position cached + i) sees keys 0..cached + i; a padding
        # query row sees key 0 only, so its softmax stays finite (its output is dropped).
        mask = ((kj <= cached + qi) & (qi < q_len)) | ((kj == 0) & (qi >= q_len))
        rows = torch.cat([torch.arange(s.query_len) + i * max_q for i, s in enumerate(spans)])
        return _PrefillBatch(
            start=spans[0].query_start,
            num_tokens=sum(s.query_len for s in spans),
            gather=self._padded_gather(spans, slots, max_ctx).to(device),
            shape=(len(spans), max_q, max_ctx),
            mask=mask[:, None].to(device),
            rows=rows.to(device),
        )

    def _decode_metadata(
        self, decodes: list[SeqSpan], slots: list[torch.Tensor], device: torch.device
    ) -> dict:
        max_len = max(s.context_len for s in decodes)
        mask = torch.zeros(len(decodes), max_len, dtype=torch.bool)
        for i, span in enumerate(decodes):
            mask[i, : span.context_len] = True
        return {
            "decode_gather": self._padded_gather(decodes, slots, max_len).to(device),
            "decode_shape": (len(decodes), max_len),
            "decode_mask": mask[:, None, None, :].to(device),  # [B, 1, 1, L]
        }

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[torch.Tensor],
        device: torch.device,
    ) -> AttentionMetadata:
        all_slots = [self._slots(span) for span in spans]  # once per sequence per step
        slot_mapping = torch.cat(
            [slots[span.context_len - span.query_len :] for span, slots in zip(spans, all_slots)]
        ).to(device)
        extra: dict = {}
        decodes = spans[:num_decode_seqs]
        if decodes:
            extra.update(self._decode_metadata(decodes, all_slots[:num_decode_seqs], device))
        pre_spans, pre_slots = spans[num_decode_seqs:], all_slots[num_decode_seqs:]
        batch = self._prefill_batch(pre_spans, pre_slots, device)
        prefills = []
        if batch is None:
            for span, slots in zip(pre_spans, pre_slots):
                cached = span.context_len - span.query_len
                if cached == 0:
                    prefills.append((span, None, None))
                    continue
                # Query i (absolute position cached + i) sees keys 0..cached + i.
                q_pos = torch.arange(span.query_len, device=device)[:, None] + cached
                k_pos = torch.arange(span.context_len, device=device)[None, :]
                prefills.append((span, slots.to(device), k_pos <= q_pos))
        extra["prefill_batch"] = batch
        extra["prefills"] = prefills
        return AttentionMetadata(slot_mapping, spans, num_decode_seqs, kv_caches, extra)

    @staticmethod
    def _write_kv(
        layer: int, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The step's new keys and values into their slots; returns the layer's cache."""
        cache = meta.kv_caches[layer]
        cache[:, 0].index_copy_(0, meta.slot_mapping, k)
        cache[:, 1].index_copy_(0, meta.slot_mapping, v)
        return cache

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cache = self._write_kv(layer, k, v, meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        gqa = self.num_heads != self.num_kv_heads
        kvh, d = self.num_kv_heads, self.head_dim
        if meta.num_decode_seqs:
            self._decode(cache, q, out, meta)
        batch: _PrefillBatch | None = meta.extra["prefill_batch"]
        if batch is not None:
            n, max_q, max_ctx = batch.shape
            s, e = batch.start, batch.start + batch.num_tokens
            qp = q.new_zeros(n * max_q, self.num_heads, d)
            qp.index_copy_(0, batch.rows, q[s:e])
            kv = cache.index_select(0, batch.gather).view(n, max_ctx, 2, kvh, d)
            op = _sdpa(
                qp.view(n, max_q, self.num_heads, d).transpose(1, 2),
                kv[:, :, 0].transpose(1, 2),
                kv[:, :, 1].transpose(1, 2),
                gqa,
                attn_mask=batch.mask,
                scale=self.scale,
            )
            out[s:e] = op.transpose(1, 2).reshape(n * max_q, self.num_heads, d)[batch.rows]
        for span, slots, mask in meta.extra["prefills"]:
            s, e = span.query_start, span.query_start + span.query_len
            qp = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if slots is None:
                kp = k[s:e].transpose(0, 1).unsqueeze(0)
                vp = v[s:e].transpose(0, 1).unsqueeze(0)
                op = _sdpa(qp, kp, vp, gqa, is_causal=True, scale=self.scale)
            else:
                kv = cache.index_select(0, slots)
                op = _sdpa(
                    qp,
                    kv[:, 0].transpose(0, 1).unsqueeze(0),
                    kv[:, 1].transpose(0, 1).unsqueeze(0),
                    gqa,
                    attn_mask=mask,
                    scale=self.scale,
                )
            out[s:e] = op.squeeze(0).transpose(0, 1)
        return out

    def _decode(
        self, cache: torch.Tensor, q: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata
    ) -> None:
        """Attention of the first `num_decode_seqs` queries, one per sequence, into `out`."""
        n_dec, kvh, d = meta.num_decode_seqs, self.num_kv_heads, self.head_dim
        b, length = meta.extra["decode_shape"]
        kv = cache.index_select(0, meta.extra["decode_gather"]).view(b, length, 2, kvh, d)
        # The query heads that share a KV head become that head's "query rows", so grouped
        # attention is one plain SDPA call with no copies of K and V per query head.
        qd = q[:n_dec].view(b, kvh, self.num_heads // kvh, d)
        od = F.scaled_dot_product_attention(
            qd,
            kv[:, :, 0].transpose(1, 2),
            kv[:, :, 1].transpose(1, 2),
            attn_mask=meta.extra["decode_mask"],
            scale=self.scale,
        )
        out[:n_dec] = od.reshape(b, self.num_heads, d)
