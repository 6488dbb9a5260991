"""The attention backends against plain causal attention over each sequence's history.

A step mixes decodes, fresh prefills and chunks whose earlier tokens are already cached; the
paged cache is filled in a scrambled block order so a wrong slot or mask shows up in the output.
The CPU backend (one C kernel for decodes and prefill alike) runs the same cases, its kernel is
checked on the shapes real models have, and a token's output from it is shown to be the same bit
for bit however the step that computes it is made up.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from ember.engine.attention import torch_backend
from ember.engine.attention.base import SeqSpan
from ember.engine.attention.cpu_backend import CpuAttentionBackend
from ember.engine.attention.torch_backend import TorchAttentionBackend
from ember.native import cpu_kernels

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4


def needs_kernels() -> None:
    if cpu_kernels() is None:
        # Every machine Ember is tested on has a C compiler: a failed build is a failure here.
        assert shutil.which("cc") is None and shutil.which("gcc") is None, "C kernels failed"
        pytest.skip("no C compiler on this machine")


BACKENDS = {"torch": TorchAttentionBackend, "cpu": CpuAttentionBackend}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int) -> torch.Tensor:
    """q: [n, H, D] for positions cached..cached+n-1; k, v: [cached + n, KVH, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
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


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched-prefill", "per-chunk"])
@pytest.mark.parametrize("case", list(STEPS))
def test_backend_matches_causal_attention(
    case: str, batched: bool, backend_name: str, monkeypatch
) -> None:
    if backend_name == "cpu":
        needs_kernels()
    # A huge allowance batches every multi-chunk step; zero forces one call per chunk.
    monkeypatch.setattr(torch_backend, "PREFILL_BATCH_MAX_PADDING", 1e9 if batched else 0.0)
    backend = BACKENDS[backend_name](HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    seqs, num_decodes = STEPS[case]
    ours, ref = run_step(backend, seqs, num_decodes)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["burst of similar prompts", "long chunk beside short ones"])
def test_torch_before_2_5_repeats_the_grouped_kv_heads_instead(case: str, monkeypatch) -> None:
    """Without SDPA's enable_gqa each K/V head is repeated for its query heads: same output."""
    monkeypatch.setattr(torch_backend, "_SDPA_GQA", False)
    for batched in (1e9, 0.0):
        monkeypatch.setattr(torch_backend, "PREFILL_BATCH_MAX_PADDING", batched)
        backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
        ours, ref = run_step(backend, *STEPS[case])
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


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block",
    [(9, 3, 64, 16), (32, 32, 128, 16), (8, 1, 64, 8), (4, 2, 80, 5), (6, 2, 64, 48)],
    ids=["smollm2", "llama-2", "multi-query", "odd-sizes", "blocks-over-32"],
)
def test_cpu_decode_kernel_on_model_shapes(
    heads: int, kv_heads: int, head_dim: int, block: int
) -> None:
    """The kernel against SDPA over the gathered context, for many sequences of mixed length."""
    needs_kernels()
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    lengths = [1, 2, block, block + 1, 37, 300, 129, 64]
    num_blocks = sum(-(-n // block) for n in lengths) + 5
    backend = CpuAttentionBackend(heads, kv_heads, head_dim, block)
    cache = backend.allocate_cache(1, num_blocks, torch.float32, torch.device("cpu"))[0]
    cache.copy_(torch.randn(cache.shape, generator=gen) * 2)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    spans = []
    for i, n in enumerate(lengths):
        spans.append(SeqSpan(i, 1, n, [order.pop() for _ in range(-(-n // block))]))
    # Q as the kernel gets it in a model: a strided view into the fused QKV projection.
    qkv = torch.randn(len(lengths), (heads + 2 * kv_heads) * head_dim, generator=gen) * 2
    q = qkv[:, : heads * head_dim].view(len(lengths), heads, head_dim)
    meta = backend.build_metadata(spans, len(spans), [cache], torch.device("cpu"))
    out = torch.empty_like(q)
    backend._attend(cache, q, out, meta)
    for i, span in enumerate(spans):
        pos = torch.arange(span.context_len)
        slots = torch.tensor(span.block_table)[pos // block] * block + pos % block
        k, v = cache[slots, 0], cache[slots, 1]  # [n, KVH, D]
        want = reference(q[i : i + 1], k, v, span.context_len - 1)
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block",
    [(9, 3, 64, 8), (32, 2, 128, 16), (8, 8, 64, 8), (4, 1, 32, 5)],
    ids=["smollm2", "chatglm3", "multi-head", "multi-query-odd-block"],
)
def test_cpu_backend_output_of_a_token_does_not_depend_on_the_step(
    heads: int, kv_heads: int, head_dim: int, block: int
) -> None:
    """The last token of a 100-token sequence, computed as a decode, in a fresh prefill, in a
    chunk after a cached prefix, and beside other sequences: the same bits each time."""
    needs_kernels()
    gen = torch.Generator().manual_seed(heads + head_dim)
    n, num_blocks = 100, 64
    backend = CpuAttentionBackend(heads, kv_heads, head_dim, block)
    blocks = torch.randperm(num_blocks, generator=gen).tolist()
    table, other = blocks[: -(-n // block)], blocks[-(-n // block) :]
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    v = torch.randn(n, kv_heads, head_dim, generator=gen)
    q = torch.randn(n, heads, head_dim, generator=gen)
    ko = torch.randn(30, kv_heads, head_dim, generator=gen)
    qo = torch.randn(30, heads, head_dim, generator=gen)

    def last_token(cached: int, with_others: bool) -> torch.Tensor:
        cache = backend.allocate_cache(1, num_blocks, torch.float32, torch.device("cpu"))
        for pos in range(cached):
            slot = table[pos // block] * block + pos % block
            cache[0][slot, 0], cache[0][slot, 1] = k[pos], v[pos]
        decode = cached == n - 1
        spans, qs, ks, vs = [SeqSpan(0, n - cached, n, table)], [q[cached:]], [k[cached:]], []
        vs.append(v[cached:])
        if with_others:  # a fresh 30-token prefill after it
            spans.append(SeqSpan(n - cached, 30, 30, other[: -(-30 // block)]))
            qs, ks, vs = qs + [qo], ks + [ko], vs + [ko.flip(0)]
        meta = backend.build_metadata(spans, int(decode), [cache[0]], torch.device("cpu"))
        out = backend.forward(0, torch.cat(qs), torch.cat(ks), torch.cat(vs), meta)
        return out[n - cached - 1]

    want = last_token(n - 1, with_others=False)  # a decode
    for cached in (0, 1, 16, 20, 40, n - 1):
        for with_others in (False, True):
            got = last_token(cached, with_others)
            assert torch.equal(got, want), (cached, with_others)
