"""What structured outputs cost the requests that do not use them, and what a masked token costs.

Concurrency 32 on the default model (SmolLM2-135M-Instruct, 49k vocabulary), in this process:
each round runs 32 requests at once twice, all unconstrained (`plain`), then half of them under
a JSON Schema (`mixed`). Every request decodes exactly --max-tokens tokens (the unconstrained
ones with ignore_eos, the constrained ones under a schema whose array cannot close that soon),
so both runs have 32 rows in every decode step and their times compare directly. Rounds
alternate so a machine whose speed drifts hits both alike. Prints JSON:

- `unconstrained_throughput_drop`: 1 - (plain time / mixed time), median over rounds (the
  target is at most 0.10);
- `mask_ms_per_token`: time filling and applying bitmask rows, per constrained token.

    python benchmarks/structured.py [--rounds 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {
    "type": "array",
    "minItems": 50,  # never complete within the run: every row decodes --max-tokens tokens
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age", "email", "tags"],
        "additionalProperties": False,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    import ember

    llm = ember.LLM(max_num_seqs=args.concurrency)
    n = args.concurrency
    prompts = [f"Person {i} as JSON (name, age, email, tags):" for i in range(n)]
    plain = ember.SamplingParams(
        max_tokens=args.max_tokens, temperature=0.8, seed=1, ignore_eos=True
    )
    shaped = ember.SamplingParams(
        max_tokens=args.max_tokens, temperature=0.8, seed=1, structured_outputs={"json": SCHEMA}
    )
    mixed = [shaped if i % 2 else plain for i in range(n)]
    backend = llm.engine.structured
    llm.generate(prompts[:2], [plain, shaped])  # warm-up: compile the schema, first steps

    times: dict[str, list[float]] = {"plain": [], "mixed": []}
    mask_s, masked = 0.0, 0
    for _ in range(args.rounds):
        for name, params in (("plain", [plain] * n), ("mixed", mixed)):
            s0, r0 = backend.mask_seconds, backend.masked_rows
            t0 = time.perf_counter()
            results = llm.generate(prompts, params)
            times[name].append(time.perf_counter() - t0)
            assert all(len(r.outputs[0].token_ids) == args.max_tokens for r in results)
            if name == "mixed":
                mask_s += backend.mask_seconds - s0
                masked += backend.masked_rows - r0
    ratios = [p / m for p, m in zip(times["plain"], times["mixed"])]
    tokens = n * args.max_tokens
    print(
        json.dumps(
            {
                "concurrency": n,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "plain_tokens_per_s": [round(tokens / t, 1) for t in times["plain"]],
                "mixed_tokens_per_s": [round(tokens / t, 1) for t in times["mixed"]],
                "unconstrained_throughput_drop": round(1 - statistics.median(ratios), 4),
                "mask_ms_per_token": round(1000 * mask_s / max(masked, 1), 4),
                "constrained_tokens": masked,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
