"""The torch attention backend against plain causal attention over each sequence's history.

A step mixes decodes, fresh prefills and chunks whose earlier tokens are already cached; the
paged cache is filled in a scrambled block order so a wrong slot or mask shows up in the output.
"""

from __future__ import annotations

import pytest
import torch

from ember.engine.attention import torch_backend
from ember.engine.attention.base import SeqSpan
from ember.engine.attention.torch_backend import TorchAttentionBackend

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 8, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int) -> torch.Tensor:
    """q: [n, H, D] for positions cached..cached+n-1; k, v: [cached + n, KVH, D]."""
    group = HEADS // KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM**-0.5
    n, total = q.shape[0], k.shape[0]
    visible = torch.arange(total)[None, :] <= torch.arange(n)[:, None] + cached
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_step(
    backend: TorchAttentionBackend, seqs: list[tuple[int, int]], num_decodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """seqs: (cached tokens, new tokens) per sequence, decodes first. Returns (ours, reference)."""
    gen = torch.Generator().manual_seed(len(seqs) * 100 + num_decodes)
    num_blocks = 64
    cache = backend.allocate_cache(1, num_blocks, torch.float32, torch.device("cpu"))
    cache[0].fill_(float("nan"))  # unwritten slots must never reach the output
    free = torch.randperm(num_blocks, generator=gen).tolist()
    spans, histories, queries = [], [], []
    start = 0
    for cached, new in seqs:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // BLOCK))]
        k = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen)
        for pos in range(cached):  # what earlier steps wrote
            slot = blocks[pos // BLOCK] * BLOCK + pos % BLOCK
            cache[0][slot, 0], cache[0][slot, 1] = k[pos], v[pos]
        spans.append(SeqSpan(start, new, total, blocks))
        histories.append((k, v))
        queries.append(torch.randn(new, HEADS, HEAD_DIM, generator=gen))
        start += new
    meta = backend.build_metadata(spans, num_decodes, cache, torch.device("cpu"))
    q = torch.cat(queries)
    k_new = torch.cat([k[c:] for (k, _), (c, _) in zip(histories, seqs)])
    v_new = torch.cat([v[c:] for (_, v), (c, _) in zip(histories, seqs)])
    ours = backend.forward(0, q, k_new, v_new, meta)
    ref = torch.cat(
        [reference(qs, k, v, c) for qs, (k, v), (c, _) in zip(queries, histories, seqs)]
    )
    return ours, ref


STEPS = {
    "decodes only": ([(5, 1), (12, 1), (1, 1)], 3),
    "one fresh prefill": ([(0, 9)], 0),
    "one cached chunk": ([(8, 5)], 0),
    "burst of similar prompts": ([(4, 6), (0, 7), (4, 5), (8, 3), (0, 8)], 0),
    "decodes and a burst": ([(9, 1), (3, 1), (4, 6), (0, 7), (0, 5)], 2),
    "long chunk beside short ones": ([(6, 1), (0, 40), (0, 2), (4, 1)], 1),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched-prefill", "per-chunk"])
@pytest.mark.parametrize("case", list(STEPS))
def test_backend_matches_causal_attention(case: str, batched: bool, monkeypatch) -> None:
    # A huge allowance batches every multi-chunk step; zero forces one call per chunk.
    monkeypatch.setattr(torch_backend, "PREFILL_BATCH_MAX_PADDING", 1e9 if batched else 0.0)
    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    seqs, num_decodes = STEPS[case]
    ours, ref = run_step(backend, seqs, num_decodes)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bursts_batch_and_lopsided_steps_do_not() -> None:
    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    cache = backend.allocate_cache(1, 64, torch.float32, torch.device("cpu"))

    def spans(lengths: list[int]) -> list[SeqSpan]:
        out, start, block = [], 0, 0
        for n in lengths:
            blocks = list(range(block, block + -(-n // BLOCK)))
            block += len(blocks)
            out.append(SeqSpan(start, n, n, blocks))
            start += n
        return out

    even = backend.build_metadata(spans([7, 8, 6, 8]), 0, cache, torch.device("cpu"))
    assert even.extra["prefill_batch"] is not None and not even.extra["prefills"]
    lopsided = backend.build_metadata(spans([60, 2, 3]), 0, cache, torch.device("cpu"))
    assert lopsided.extra["prefill_batch"] is None and len(lopsided.extra["prefills"]) == 3
