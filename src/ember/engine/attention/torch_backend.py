"""Reference attention on plain torch: runs anywhere, used on the CPU and to check GPU kernels.

Decodes are batched into one padded SDPA call over gathered cache slots. Each prefill chunk
attends on its own: straight over its fresh keys when nothing is cached before it, otherwise
over its whole context gathered from the cache with a causal mask offset by the cached length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.engine.attention.base import AttentionBackend, AttentionMetadata, SeqSpan


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def _slots(self, span: SeqSpan) -> torch.Tensor:
        """Cache slot of every context position of a sequence."""
        table = torch.tensor(span.block_table, dtype=torch.long)
        pos = torch.arange(span.context_len)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def build_metadata(
        self,
        spans: list[SeqSpan],
        num_decode_seqs: int,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> AttentionMetadata:
        all_slots = [self._slots(span) for span in spans]  # once per sequence per step
        slot_mapping = torch.cat(
            [slots[span.context_len - span.query_len :] for span, slots in zip(spans, all_slots)]
        ).to(device)
        extra: dict = {}
        decodes = spans[:num_decode_seqs]
        if decodes:
            max_len = max(s.context_len for s in decodes)
            gather = torch.zeros(len(decodes), max_len, dtype=torch.long)
            mask = torch.zeros(len(decodes), max_len, dtype=torch.bool)
            for i, (span, slots) in enumerate(zip(decodes, all_slots)):
                # Padding repeats a slot this sequence has written: the cache is allocated
                # uninitialised, and masked garbage could still be NaN (0 * NaN = NaN).
                gather[i] = slots[0]
                gather[i, : span.context_len] = slots
                mask[i, : span.context_len] = True
            extra["decode_gather"] = gather.view(-1).to(device)  # flat: index_select is fastest
            extra["decode_shape"] = (len(decodes), max_len)
            extra["decode_mask"] = mask[:, None, None, :].to(device)  # [B, 1, 1, L]
        prefills = []
        for span, slots in zip(spans[num_decode_seqs:], all_slots[num_decode_seqs:]):
            cached = span.context_len - span.query_len
            if cached == 0:
                prefills.append((span, None, None))
                continue
            slots = slots.to(device)
            # Query i (absolute position cached + i) sees keys 0..cached + i.
            q_pos = torch.arange(span.query_len, device=device)[:, None] + cached
            k_pos = torch.arange(span.context_len, device=device)[None, :]
            prefills.append((span, slots, k_pos <= q_pos))
        extra["prefills"] = prefills
        return AttentionMetadata(slot_mapping, spans, num_decode_seqs, kv_caches, extra)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = meta.kv_caches[layer]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        gqa = self.num_heads != self.num_kv_heads
        n_dec = meta.num_decode_seqs
        if n_dec:
            gather = meta.extra["decode_gather"]
            b, length = meta.extra["decode_shape"]
            kvh, d = self.num_kv_heads, self.head_dim
            # The query heads that share a KV head become that head's "query rows", so grouped
            # attention is one plain SDPA call with no copies of K and V per query head.
            qd = q[:n_dec].view(b, kvh, self.num_heads // kvh, d)
            kd = k_cache.index_select(0, gather).view(b, length, kvh, d).transpose(1, 2)
            vd = v_cache.index_select(0, gather).view(b, length, kvh, d).transpose(1, 2)
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=meta.extra["decode_mask"], scale=self.scale
            )
            out[:n_dec] = od.reshape(b, self.num_heads, d)
        for span, slots, mask in meta.extra["prefills"]:
            s, e = span.query_start, span.query_start + span.query_len
            qp = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if slots is None:
                kp = k[s:e].transpose(0, 1).unsqueeze(0)
                vp = v[s:e].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=gqa
                )
            else:
                kp = k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                vp = v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(
                    qp, kp, vp, attn_mask=mask, scale=self.scale, enable_gqa=gqa
                )
            out[s:e] = op.squeeze(0).transpose(0, 1)
        return out
