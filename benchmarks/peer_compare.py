"""Ember against a peer OpenAI-compatible server on the same model file.

Prints JSON: prompt processing (time to a first token, max_tokens 1) at several prompt lengths,
decode speed of one stream, how faithful each server's greedy text is to a full-precision
reference server (the first token where it parts from the reference; `--max-tokens` when it
never does), and with `--concurrency` the same load from `ember bench` on both servers at each
level (output tokens/s, TTFT and TPOT). Start the servers first, for example:

    ember serve --port 8011                                 # GGUF precision (the default)
    ember serve --port 8013 --quantization none             # the same weights in float32
    python -m llama_cpp.server --model FILE.gguf --port 8012 --n_threads 2
    llama-server -m FILE.gguf --port 8012 -t 2 -np 16 -c 32768  # or llama.cpp's own server
    python benchmarks/peer_compare.py --ember http://127.0.0.1:8011 \\
        --peer http://127.0.0.1:8012 --reference http://127.0.0.1:8013

Greedy requests turn off what peers add by default (llama-cpp-python's repeat_penalty 1.1) and
ban the end-of-text ids with logit_bias, since not every peer knows ignore_eos.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from ember.bench import run_bench

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "In 1969, the first humans",
    "import numpy as np\n\n",
    "Water boils at a temperature of",
    "The quick brown fox",
    "My favorite programming language is",
    "Photosynthesis is the process by which",
    "The largest planet in our solar system is",
    "Here is a list of fruits:",
    "The meaning of life is",
    "SELECT * FROM users WHERE",
    "The French word for cat is",
    "1, 2, 3, 4,",
    "Dear Sir or Madam,",
    "The Pythagorean theorem states that",
    "A haiku about autumn:\n",
]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "quick",
    "brown",
    "lazy",
    "dog",
    "house",
    "garden",
    "music",
    "light",
    "window",
]


def complete(url: str, model: str, prompt: str, max_tokens: int, **extra) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        **extra,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def model_of(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


def prefill(url: str, model: str, words: int, rounds: int) -> dict:
    """Best of `rounds` fresh prompts (no prefix cache hits): prompt tokens per second."""
    best, tokens = float("inf"), 0
    for k in range(rounds):
        rng = random.Random(words * 100 + k)
        prompt = " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))
        t = time.perf_counter()
        tokens = complete(url, model, prompt, 1)["usage"]["prompt_tokens"]
        best = min(best, time.perf_counter() - t)
    return {"prompt_tokens": tokens, "seconds": round(best, 3), "tok_per_s": round(tokens / best)}


def decode(url: str, model: str, max_tokens: int, rounds: int, eos: list[int]) -> float:
    """Best of `rounds`: generated tokens per second of one stream, end to end."""
    best = 0.0
    for k in range(rounds):
        bias = {str(t): -100 for t in eos}
        t = time.perf_counter()
        out = complete(url, model, f"Write a story about dragon {k}.", max_tokens, logit_bias=bias)
        best = max(best, out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    return round(best, 1)


def greedy_tokens(url: str, model: str, prompt: str, n: int) -> list[str]:
    return complete(url, model, prompt, n, logprobs=0)["choices"][0]["logprobs"]["tokens"]


def parting(a: list[str], b: list[str]) -> int:
    """Index of the first token where two greedy outputs differ (the shorter length if none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def under_load(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    """`ember bench` at one concurrency: 4 requests per slot, greedy, ignore_eos."""
    args = argparse.Namespace(
        url=url,
        model=model,
        concurrency=concurrency,
        requests=4 * concurrency,
        max_tokens=max_tokens,
        chat=False,
        api_key=None,
        prompt_len=64,
        seed=concurrency,
        ignore_eos=True,
        temperature=0.0,
        timeout=600.0,
        no_progress=True,
    )
    r = asyncio.run(run_bench(args))
    return {
        "concurrency": concurrency,
        "completed": r["completed"],
        "errors": r["errors"],
        "output_tokens": r["output_tokens"],
        "output_tok_per_s": round(r["output_tokens_per_s"] or 0.0, 1),
        "ttft_p50_ms": round(1000 * (r["ttft_s"]["p50"] or 0.0)),
        "ttft_p99_ms": round(1000 * (r["ttft_s"]["p99"] or 0.0)),
        "tpot_p50_ms": round(1000 * (r["tpot_s"]["p50"] or 0.0), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ember", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--reference", help="A full-precision server on the same weights.")
    ap.add_argument("--words", type=int, nargs="+", default=[100, 250, 500, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--eos", type=int, nargs="+", default=[0, 1, 2], help="Ids to ban in decode.")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[], help="Load levels to run.")
    ap.add_argument("--load-max-tokens", type=int, default=128)
    ap.add_argument("--skip-single", action="store_true", help="Only the load levels.")
    args = ap.parse_args()
    servers = {"ember": args.ember, "peer": args.peer}
    models = {name: model_of(url) for name, url in servers.items()}
    result: dict = {name: {} for name in servers}
    if not args.skip_single:
        for name, url in servers.items():
            result[name]["prefill"] = [
                prefill(url, models[name], w, args.rounds) for w in args.words
            ]
            result[name]["decode_tok_per_s"] = decode(url, models[name], 128, args.rounds, args.eos)
        result["decode_ratio"] = round(
            result["ember"]["decode_tok_per_s"] / result["peer"]["decode_tok_per_s"], 2
        )
    for c in args.concurrency:
        for name, url in servers.items():
            load = under_load(url, models[name], c, args.load_max_tokens)
            result[name].setdefault("load", []).append(load)
        ember, peer = result["ember"]["load"][-1], result["peer"]["load"][-1]
        if peer["output_tok_per_s"]:
            result.setdefault("load_ratio", {})[str(c)] = round(
                ember["output_tok_per_s"] / peer["output_tok_per_s"], 2
            )
    if args.reference and not args.skip_single:
        ref_model = model_of(args.reference)
        n = args.max_tokens
        refs = [greedy_tokens(args.reference, ref_model, p, n) for p in PROMPTS]
        for name, url in servers.items():
            outs = [greedy_tokens(url, models[name], p, n) for p in PROMPTS]
            parts = [parting(r, o) for r, o in zip(refs, outs)]
            result[name]["parts_from_reference_at"] = parts
            result[name]["mean_tokens_before_parting"] = round(statistics.mean(parts), 1)
            result[name]["identical_to_reference"] = sum(p >= n for p in parts)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
