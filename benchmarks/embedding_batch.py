"""How fast a real `ember serve` embeds many short inputs on the served model.

Starts `ember serve` (the default model unless --model) on a free port and posts one
/v1/embeddings request of --inputs short sentences, --rounds times. Prints one JSON object: the
request's tokens, each round's seconds, and inputs per second in the best round. Run it on two
commits to compare them (the engine prefills short inputs together, a token budget per pass).

    python benchmarks/embedding_batch.py [--inputs 256] [--rounds 2] [--model M]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_cpu import served  # noqa: E402


def measure(base: str, inputs: int, rounds: int) -> dict:
    texts = [f"Sentence {i} is about cats, dogs and the weather today." for i in range(inputs)]
    seconds: list[float] = []
    with httpx.Client(timeout=1800) as client:
        client.post(base + "/v1/embeddings", json={"model": "m", "input": texts[:4]})  # warm
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = client.post(base + "/v1/embeddings", json={"model": "m", "input": texts})
            r.raise_for_status()
            seconds.append(round(time.perf_counter() - t0, 2))
    return {
        "inputs": inputs,
        "tokens": r.json()["usage"]["prompt_tokens"],
        "seconds": seconds,
        "inputs_per_s": round(inputs / min(seconds), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None, help="Model for `ember serve`; default: embedded.")
    args = ap.parse_args()
    with served(args.model, ["--served-model-name", "m"], "embed") as (base, _):
        print(json.dumps(measure(base, args.inputs, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
