"""Offline throughput on the CPU: Ember's batched engine versus transformers one at a time.

The baseline is what FastChat's model_worker does: `model.generate` for one request after
another. Both run the default model (SmolLM2-135M-Instruct) in float32, in this process, on
the same prompts, with the same number of new tokens (ignore_eos). Peak RSS is measured in a
separate process that runs Ember alone with 32 concurrent requests. Prints JSON.

    python benchmarks/offline_cpu.py [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

TOPICS = [
    "the ocean",
    "volcanoes",
    "honey bees",
    "the moon",
    "chess",
    "bread",
    "rainforests",
    "the Roman empire",
    "jazz",
    "glaciers",
    "electric cars",
    "coffee",
    "owls",
    "the internet",
    "deserts",
    "tea",
    "trains",
    "lighthouses",
    "octopuses",
    "mountains",
    "bicycles",
    "libraries",
    "comets",
    "gardening",
    "penguins",
    "music theory",
    "bridges",
    "clouds",
    "ancient Egypt",
    "photography",
    "whales",
    "paper",
]


def prompts(llm, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        out.append(llm.tokenizer.encode(llm.chat_formatter.render(msg), add_special_tokens=False))
    return out


def ember_run(llm, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    import ember

    params = ember.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    results = llm.generate(batch, params)
    dt = time.perf_counter() - t0
    return sum(len(r.outputs[0].token_ids) for r in results), dt


def hf_sequential(model, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    tokens = 0
    t0 = time.perf_counter()
    for ids in batch:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(
                    1, len(ids), dtype=torch.long
                ),  # pad id 2 is also <|im_end|>
                do_sample=False,
                max_new_tokens=max_tokens,
                pad_token_id=2,
            )
        tokens += out.shape[1] - len(ids)
    return tokens, time.perf_counter() - t0


def hf_static_batch(model, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    """transformers with all requests in one left-padded batch: the best a static batch does."""
    width = max(len(b) for b in batch)
    ids = torch.tensor([[2] * (width - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=2,
        )
    return (out.shape[1] - width) * len(batch), time.perf_counter() - t0


def peak_rss(n: int, max_tokens: int) -> float:
    """Peak RSS (GiB) of a fresh process serving n concurrent requests with Ember alone."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
import ember
from offline_cpu import prompts, ember_run
llm = ember.LLM(dtype="float32")
ember_run(llm, prompts(llm, {n}), {max_tokens})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20  # KiB -> GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single", type=int, default=4, help="requests for the batch-size-1 runs")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import ember

    llm = ember.LLM(dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(llm.engine.model_dir), dtype=torch.float32)
    ref.eval()
    ref.generation_config.eos_token_id = None  # every request makes max_tokens, as with ignore_eos
    batch = prompts(llm, args.requests)
    ember_run(llm, batch[:2], 4)  # warm up both
    hf_sequential(ref, batch[:1], 4)

    e_tok, e_dt = ember_run(llm, batch, args.max_tokens)
    b_tok, b_dt = hf_sequential(ref, batch, args.max_tokens)
    e1_tok, e1_dt = 0, 0.0
    for ids in batch[: args.single]:
        t, d = ember_run(llm, [ids], args.max_tokens)
        e1_tok, e1_dt = e1_tok + t, e1_dt + d
    b1_tok, b1_dt = hf_sequential(ref, batch[: args.single], args.max_tokens)
    s_tok, s_dt = hf_static_batch(ref, batch, args.max_tokens)

    ember_tps, base_tps = e_tok / e_dt, b_tok / b_dt
    report = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, run in float32)",
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "ember_batched": {
            "output_tokens": e_tok,
            "seconds": round(e_dt, 2),
            "tokens_per_s": round(ember_tps, 1),
        },
        "baseline_sequential": {
            "output_tokens": b_tok,
            "seconds": round(b_dt, 2),
            "tokens_per_s": round(base_tps, 1),
        },
        "speedup": round(ember_tps / base_tps, 2),
        "transformers_static_batch": {
            "tokens_per_s": round(s_tok / s_dt, 1),
            "speedup_vs_sequential": round((s_tok / s_dt) / base_tps, 2),
        },
        "batch1": {
            "ember_tokens_per_s": round(e1_tok / e1_dt, 1),
            "baseline_tokens_per_s": round(b1_tok / b1_dt, 1),
            "speedup": round((e1_tok / e1_dt) / (b1_tok / b1_dt), 2),
        },
        "peak_rss_gib_32_concurrent": round(peak_rss(args.requests, args.max_tokens), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
