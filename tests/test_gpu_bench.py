"""benchmarks/gpu.py runs end to end: every measurement on tiny shapes on the CPU (a dry run
of the GPU benchmark, which is otherwise run only where a GPU is at hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = [
    "model",
    "roofline_steps_per_s",
    "hf_batch1_tok_per_s",
    "batch1_tok_per_s",
    "batch1_roofline_fraction",
    "offline_tok_per_s",
    "serve_tok_per_s",
    "serve_ttft_p50_ms",
]


@pytest.mark.slow
def test_gpu_benchmark_dry_run_reports_every_figure(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny"]
    cmd += ["--dtype", "float32", "--models", "llama-2-7b", "--out", str(out)]
    cmd += ["--log-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(run.stdout) == report
    (row,) = report["models"]
    for key in REQUIRED:
        assert row[key] is not None, key
    assert row["model"] == "llama-2-7b"
    for key in REQUIRED[1:]:
        assert row[key] > 0, key
    assert row["serve_completed"] == report["requests"] and row["serve_errors"] == 0
    assert (tmp_path / "serve-llama-2-7b.log").exists()
