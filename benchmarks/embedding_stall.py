"""How long a long /v1/embeddings input stalls a running stream, on a real `ember serve`.

Starts `ember serve` (the default model unless --model) on a free port, opens one streamed
completion (--stream-tokens tokens, ignore_eos), and a second into it posts one embedding input
of about --words words. Prints one JSON object: the input's token count, the embedding's time,
and the stream's gaps between tokens (largest and median). The engine runs an embedding a token
budget at a time, between generation steps, so the largest gap is one chunk's prefill, not the
whole input's.

    python benchmarks/embedding_stall.py [--words 600] [--stream-tokens 400] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_cpu import served  # noqa: E402


async def measure(base: str, words: int, stream_tokens: int) -> dict:
    gaps: list[float] = []

    async def stream(client: httpx.AsyncClient) -> None:
        body = {
            "model": "m",
            "prompt": "Once upon a time",
            "max_tokens": stream_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        last = None
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

    async with httpx.AsyncClient(timeout=600) as client:
        task = asyncio.create_task(stream(client))
        await asyncio.sleep(1.0)
        text = " ".join(f"word{i}" for i in range(words))
        t0 = time.perf_counter()
        r = await client.post(base + "/v1/embeddings", json={"model": "m", "input": text})
        r.raise_for_status()
        seconds = time.perf_counter() - t0
        await task
    gaps.sort()
    return {
        "embedding_tokens": r.json()["usage"]["prompt_tokens"],
        "embedding_s": round(seconds, 3),
        "stream_tokens": len(gaps) + 1,
        "max_gap_ms": round(gaps[-1] * 1000, 1),
        "p50_gap_ms": round(gaps[len(gaps) // 2] * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=600, help="words in the embedding input")
    ap.add_argument("--stream-tokens", type=int, default=400)
    ap.add_argument("--model", default=None, help="Model for `ember serve`; default: embedded.")
    args = ap.parse_args()

    extra = ["--served-model-name", "m", "--max-model-len", "4096"]
    with served(args.model, extra, "stall") as (base, _):
        result = asyncio.run(measure(base, args.words, args.stream_tokens))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
