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
    # int4 and int8 weights, each against the roofline of its own (smaller) bytes.
    for q in ("int4", "int8"):
        assert 0 < row[f"{q}_weight_bytes"] < row["weight_bytes"], q
        assert row[f"{q}_roofline_steps_per_s"] > row["roofline_steps_per_s"], q
        assert row[f"{q}_batch1_tok_per_s"] > 0, q
    assert row["int4_weight_bytes"] < row["int8_weight_bytes"]
    assert (tmp_path / "serve-llama-2-7b.log").exists()


def test_served_prompts_are_as_varied_in_tokens_as_in_text(tmp_path) -> None:
    """The benchmark's word-level tokenizer knows every word of `ember bench`'s prompts: none
    reads as the unknown token, and no two prompts are the same tokens."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from transformers import AutoTokenizer

    from ember.bench import make_prompts

    model_dir = gpu.write_model_dir(dict(gpu.LLAMA_2_7B), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = make_prompts(64, 128, seed=0)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert all(0 not in row for row in ids)
    assert len({tuple(row) for row in ids}) == len(prompts)
    assert all(128 <= len(row) <= 134 for row in ids), [len(row) for row in ids]
    assert tok.convert_ids_to_tokens([0, 2, 31999]) == ["t0", "t2", "t31999"]


# What the GPU image has (benchmarks/gpu_run.sh's machine) and the wheels brought for it.
GPU_IMAGE = {
    "torch", "triton", "transformers", "tokenizers", "safetensors", "sentencepiece", "jinja2",
    "prometheus_client", "psutil", "rich", "httpx", "numpy", "pytest",
    "huggingface_hub",  # a dependency of transformers
    "markdown_it",  # a dependency of rich
}  # fmt: skip
# Imported only by commands the GPU run never uses: `ember chat --url` and ModelScope pulls.
NOT_ON_GPU_RUN = {"openai", "modelscope_hub", "requests"}


def _wheel_modules() -> set[str]:
    lines = (ROOT / "benchmarks" / "gpu-wheels.txt").read_text().splitlines()
    names = [ln.split("==")[0].strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return {n.replace("-", "_") for n in names} | {"opentelemetry"}


def test_ember_imports_only_what_the_gpu_run_brings() -> None:
    """Every third-party module Ember's code imports is on the GPU image or among the wheels
    gpu_run.sh installs there (a new dependency must be added to benchmarks/gpu-wheels.txt)."""
    import ast

    allowed = (
        GPU_IMAGE | NOT_ON_GPU_RUN | _wheel_modules() | set(sys.stdlib_module_names) | {"ember"}
    )
    found: dict[str, str] = {}
    for path in (ROOT / "src" / "ember").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    missing = {m: where for m, where in found.items() if m not in allowed}
    assert not missing, f"not on the GPU image nor in benchmarks/gpu-wheels.txt: {missing}"


@pytest.mark.slow
def test_make_gpu_wheels_fetches_a_wheel_for_every_pin(tmp_path) -> None:
    """`make gpu-wheels` as the GPU run's preparation does it, from the package index: one
    Python 3.12 x86-64 wheel per pin in benchmarks/gpu-wheels.txt, small enough to carry.
    (A pin whose wheels carry only a newer manylinux tag than the command names fails here.)"""
    out = tmp_path / "wheels"
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(
        ["make", "-s", "gpu-wheels", f"GPU_WHEELS={out}", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (ROOT / "benchmarks" / "gpu-wheels.txt").read_text().splitlines()
    pins = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    wheels = sorted(p.name for p in out.glob("*.whl"))
    for pin in pins:
        name, version = pin.split("==")
        stem = f"{name.replace('-', '_')}-{version}-".lower()
        assert any(w.lower().startswith(stem) for w in wheels), (pin, wheels)
    assert len(wheels) == len(pins), wheels
    assert sum(p.stat().st_size for p in out.glob("*.whl")) < 48 * 2**20
