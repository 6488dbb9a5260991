"""The CPU attention kernel against torch's SDPA, and its batch invariance; prints JSON.

    python benchmarks/cpu_attention.py [--lengths 256 1024 2048] [--repeat 5]

For each model's attention shape (SmolLM2-135M, Llama-2-7B, ChatGLM3-6B):
- prefill: a causal prompt of L tokens in one call, Ember's `paged_attention` reading the
  paged cache in place against SDPA over the same keys laid out contiguously (the baseline:
  what the CPU backend ran for prefill before, with no gather counted);
- decode: 8 sequences of L tokens each taking a step, `paged_attention` against the torch
  backend's decode (the cache gathered into a padded copy, one SDPA call);
- invariance: every row of the prefill computed again alone as a decode; the number of rows
  whose output differs in any bit (must be 0), and the largest difference from SDPA.
Times are the best of --repeat runs, in milliseconds per layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from ember.engine.attention.base import SeqSpan
from ember.engine.attention.cpu_backend import CpuAttentionBackend
from ember.engine.attention.torch_backend import TorchAttentionBackend
from ember.native import cpu_kernels

SHAPES = {  # heads, kv_heads, head_dim
    "smollm2-135m": (9, 3, 64),
    "llama-2-7b": (32, 32, 128),
    "chatglm3-6b": (32, 2, 128),
}
BLOCK = 8  # the CPU's block size


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 3)


def prefill(heads: int, kv_heads: int, head_dim: int, length: int, repeat: int) -> dict:
    gen = torch.Generator().manual_seed(length)
    blocks = -(-length // BLOCK)
    table = torch.randperm(blocks, generator=gen).tolist()
    backend = CpuAttentionBackend(heads, kv_heads, head_dim, BLOCK)
    cache = backend.allocate_cache(1, blocks, torch.float32, torch.device("cpu"))
    k = torch.randn(length, kv_heads, head_dim, generator=gen)
    v = torch.randn(length, kv_heads, head_dim, generator=gen)
    q = torch.randn(length, heads, head_dim, generator=gen)
    meta = backend.build_metadata([SeqSpan(0, length, length, table)], 0, cache, "cpu")
    ours = backend.forward(0, q, k, v, meta)  # writes the cache too

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=True,
            scale=backend.scale,
        )[0].transpose(0, 1)

    out = torch.empty_like(ours)
    ember_ms = best_ms(lambda: backend._attend(cache[0], q, out, meta), repeat)
    # Every row again as a decode of its own (context: its position + 1).
    rows = list(range(length))
    spans = [SeqSpan(i, 1, r + 1, table[: -(-(r + 1) // BLOCK)]) for i, r in enumerate(rows)]
    dmeta = backend.build_metadata(spans, len(spans), cache, "cpu")
    alone = torch.empty_like(ours)
    backend._attend(cache[0], q, alone, dmeta)
    differing = int((alone != ours).flatten(1).any(1).sum())
    return {
        "sdpa_ms": best_ms(sdpa, repeat),
        "ember_ms": ember_ms,
        "rows_differing_from_decode": differing,
        "max_abs_diff_vs_sdpa": float((ours - sdpa()).abs().max()),
    }


def decode(heads: int, kv_heads: int, head_dim: int, length: int, repeat: int) -> dict:
    seqs = 8
    gen = torch.Generator().manual_seed(length + 1)
    blocks = seqs * -(-length // BLOCK)
    order = torch.randperm(blocks, generator=gen).tolist()
    per = -(-length // BLOCK)
    spans = [SeqSpan(i, 1, length, order[i * per : (i + 1) * per]) for i in range(seqs)]
    ours_b = CpuAttentionBackend(heads, kv_heads, head_dim, BLOCK)
    torch_b = TorchAttentionBackend(heads, kv_heads, head_dim, BLOCK)
    cache = ours_b.allocate_cache(1, blocks, torch.float32, torch.device("cpu"))
    cache[0].copy_(torch.randn(cache[0].shape, generator=gen))
    q = torch.randn(seqs, heads, head_dim, generator=gen)
    meta = ours_b.build_metadata(spans, seqs, cache, "cpu")
    tmeta = torch_b.build_metadata(spans, seqs, cache, "cpu")
    out, ref = torch.empty_like(q), torch.empty_like(q)
    ember_ms = best_ms(lambda: ours_b._attend(cache[0], q, out, meta), repeat)
    torch_ms = best_ms(lambda: torch_b._decode(cache[0], q, ref, tmeta), repeat)
    return {
        "torch_ms": torch_ms,
        "ember_ms": ember_ms,
        "max_abs_diff": float((out - ref).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    if cpu_kernels() is None:
        raise SystemExit("the C kernels are not available (no compiler, or EMBER_NATIVE=0)")
    results = []
    for name in args.models:
        heads, kv_heads, head_dim = SHAPES[name]
        for length in args.lengths:
            row = {"model": name, "length": length}
            row["prefill"] = prefill(heads, kv_heads, head_dim, length, args.repeat)
            row["decode_8_seqs"] = decode(heads, kv_heads, head_dim, length, args.repeat)
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
