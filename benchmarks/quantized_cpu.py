"""Quantized weights against float32 on the CPU: `ember bench` on `ember serve`, same run.

Starts one `ember serve` per variant of the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF
file): `--quantization none` (its weights dequantized to float32, the baseline), `auto` (the
file's own Q4_1 layers and Q8_0 output layer, repacked), and `int8` (per-channel int8
rounded from the float weights). Each round runs concurrency 1 and then 32 against every
variant in turn, so a shared machine whose speed drifts drifts for all; tokens/s are pooled
over the rounds. Prints one JSON object: per variant tokens/s, tokens per second of the
server's own CPU time (robust when other work shares the machine), TTFT p50 and the server's
peak RSS, and the ratios to float32.

    python benchmarks/quantized_cpu.py [--variants none auto int8] [--rounds 2]
                                       [--requests-c1 4] [--requests-c32 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_cpu import bench, free_port, wait_healthy  # noqa: E402


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(variant: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(tempfile.gettempdir(), f"ember-quant-bench-{variant}-{port}.log")
    cmd = [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--quantization", variant]
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_API_KEY", "OPENAI_API_KEY")}
    log = open(log_path, "w")  # noqa: SIM115 (kept open for the server's lifetime)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, base, log_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["none", "auto", "int8"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests-c1", type=int, default=4)
    ap.add_argument("--requests-c32", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32, help="words per prompt")
    args = ap.parse_args()

    # All servers up at once (the model is small), so the rounds can interleave them.
    servers = {v: start(v) for v in args.variants}
    runs: dict[str, dict[str, list[dict]]] = {v: {"c1": [], "c32": []} for v in args.variants}
    rss: dict[str, float | None] = {}
    try:
        for proc, base, log_path in servers.values():
            wait_healthy(proc, base, log_path)
        seed = 0
        for _ in range(args.rounds):
            for conc, key, n in ((1, "c1", args.requests_c1), (32, "c32", args.requests_c32)):
                for v, (proc, base, _) in servers.items():
                    seed += 1  # fresh prompts every run: no prefix-cache hits across runs
                    cpu0 = cpu_seconds(proc.pid)
                    r = bench(base, conc, n, args.max_tokens, False, args.prompt_len, seed)
                    r["server_cpu_s"] = cpu_seconds(proc.pid) - cpu0
                    runs[v][key].append(r)
        for v, (proc, _, _) in servers.items():
            rss[v] = peak_rss_mib(proc.pid)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def pooled(rs: list[dict]) -> float:
        seconds = sum(r["duration_s"] for r in rs)
        return round(sum(r["output_tokens"] for r in rs) / seconds, 2) if seconds else 0.0

    def per_cpu_s(rs: list[dict]) -> float:
        # Tokens per second of the server's own CPU time: on a machine shared with other
        # work, wall-clock rates measure the neighbours as much as the code.
        cpu = sum(r["server_cpu_s"] for r in rs)
        return round(sum(r["output_tokens"] for r in rs) / cpu, 2) if cpu else 0.0

    result: dict = {"max_tokens": args.max_tokens, "rounds": args.rounds, "variants": {}}
    for v in args.variants:
        result["variants"][v] = {
            "c1_tokens_per_s": pooled(runs[v]["c1"]),
            "c32_tokens_per_s": pooled(runs[v]["c32"]),
            "c1_tokens_per_cpu_s": per_cpu_s(runs[v]["c1"]),
            "c32_tokens_per_cpu_s": per_cpu_s(runs[v]["c32"]),
            "c1_ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in runs[v]["c1"]),
            "c32_ttft_p50_s": statistics.median(r["ttft_s"]["p50"] for r in runs[v]["c32"]),
            "peak_rss_mib": rss.get(v),
            "per_round_c1": [r["output_tokens_per_s"] for r in runs[v]["c1"]],
            "per_round_c32": [r["output_tokens_per_s"] for r in runs[v]["c32"]],
        }
    base = result["variants"].get("none")
    if base:
        result["ratio_to_float32"] = {
            v: {
                "c1": round(d["c1_tokens_per_s"] / base["c1_tokens_per_s"], 2),
                "c32": round(d["c32_tokens_per_s"] / base["c32_tokens_per_s"], 2),
                "c1_per_cpu_s": round(d["c1_tokens_per_cpu_s"] / base["c1_tokens_per_cpu_s"], 2),
                "c32_per_cpu_s": round(d["c32_tokens_per_cpu_s"] / base["c32_tokens_per_cpu_s"], 2),
            }
            for v, d in result["variants"].items()
            if v != "none" and base["c1_tokens_per_s"] and base["c32_tokens_per_s"]
        }
    result["finished_at"] = time.strftime("%H:%M:%S")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
