"""Online serving on the CPU: `ember bench` against `ember serve` at concurrency 1 and 32.

Starts `ember serve` (the default model, SmolLM2-135M-Instruct) on a free port, waits for
/health, runs the chat benchmark one request at a time and then 32 at a time (ignore_eos, so
every request yields --max-tokens tokens), stops the server and prints one JSON object with
both runs, the output-token throughput ratio and the median TTFT under load.

With --rounds R the two runs alternate R times against the same server, so a shared machine
whose speed drifts over minutes drifts for both; the ratio is then taken over the pooled
tokens and time of each concurrency, the TTFT is the median of the rounds' medians, and each
round is listed too.

    python benchmarks/serve_cpu.py [--requests-c1 8] [--requests-c32 64] [--max-tokens 64]
                                   [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, log: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ember serve did not become healthy in {timeout:.0f}s; see {log}")


@contextlib.contextmanager
def served(model: str | None, extra: list[str], tag: str) -> Iterator[tuple[str, float]]:
    """`ember serve [MODEL] EXTRA` on a free local port, its output in a log file; yields its
    base URL and start-up seconds once /health answers, and stops it when the block ends."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.gettempdir(), f"ember-serve-{tag}-{port}.log")
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if model:
        cmd.insert(4, model)
    # Keys set in the environment would lock the server and its client out of each other.
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_API_KEY", "OPENAI_API_KEY")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd + extra, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.perf_counter()
            wait_healthy(proc, base, log_path)
            yield base, time.perf_counter() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench(
    base: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    progress: bool,
    prompt_len: int,
    seed: int,
) -> dict:
    # The real command line, in its own process, so the client does not share a GIL with it.
    cmd = [sys.executable, "-m", "ember.bench", "--url", base, "--chat"]
    cmd += ["--concurrency", str(concurrency), "--requests", str(requests)]
    cmd += ["--max-tokens", str(max_tokens), "--prompt-len", str(prompt_len), "--seed", str(seed)]
    if not progress:
        cmd.append("--no-progress")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ember bench failed ({proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-c1", type=int, default=8)
    ap.add_argument("--requests-c32", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    ap.add_argument("--rounds", type=int, default=1, help="Alternate c1 and c32 this many times.")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--model", default=None, help="Model for `ember serve`; default: embedded.")
    args = ap.parse_args()

    with served(args.model, [], "bench") as (base, startup):
        progress = not args.no_progress
        rounds = []
        # Fresh prompts for every run: repeats would be answered from the prefix cache.
        for r in range(max(1, args.rounds)):
            c1 = bench(base, 1, args.requests_c1, args.max_tokens, progress, args.prompt_len, 2 * r)
            c32 = bench(
                base,
                32,
                args.requests_c32,
                args.max_tokens,
                progress,
                args.prompt_len,
                2 * r + 1,
            )
            rounds.append((c1, c32))

    def pooled(runs: list[dict]) -> float:
        seconds = sum(r["duration_s"] for r in runs)
        return sum(r["output_tokens"] for r in runs) / seconds if seconds else 0.0

    tps1, tps32 = pooled([a for a, _ in rounds]), pooled([b for _, b in rounds])
    c1, c32 = rounds[-1]
    result = {
        "server_startup_s": round(startup, 2),
        "prompt_len_words": args.prompt_len,
        "c1": c1,
        "c32": c32,
        "speedup_c32_vs_c1": round(tps32 / tps1, 2) if tps1 and tps32 else None,
        "ttft_p50_c32_s": statistics.median(b["ttft_s"]["p50"] for _, b in rounds),
    }
    if len(rounds) > 1:
        result["rounds"] = [
            {
                "c1_tokens_per_s": a["output_tokens_per_s"],
                "c32_tokens_per_s": b["output_tokens_per_s"],
                "speedup_c32_vs_c1": round(b["output_tokens_per_s"] / a["output_tokens_per_s"], 2),
                "ttft_p50_c32_s": b["ttft_s"]["p50"],
            }
            for a, b in rounds
        ]
        result["c1_tokens_per_s_pooled"] = round(tps1, 2)
        result["c32_tokens_per_s_pooled"] = round(tps32, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
