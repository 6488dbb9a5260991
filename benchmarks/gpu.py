"""Ember on one GPU against the bandwidth roofline and transformers, full-size shapes, dummy weights.

    python benchmarks/gpu.py [--models llama-2-7b,chatglm3-6b] [--out results.json]
    python benchmarks/gpu.py --device cpu --tiny      # the same steps on tiny shapes (a dry run)

For each model, in one process (the served model in a child `ember serve`), it measures:
1. device copy bandwidth, and the batch-1 roofline: bandwidth / weight bytes = decode steps/s;
2. transformers `generate` at batch 1 (FastChat's path), the baseline;
3. Ember at batch 1: decode tokens/s, its fraction of the roofline, and how long the GPU sits
   idle per step (wall time per step against one replay of the batch-1 CUDA graph);
4. Ember offline throughput: 512 requests of 128 random prompt tokens, 256 output tokens each;
5. the same through `ember serve` and `ember bench` at concurrency 256;
6. Ember at batch 1 with int4 and int8 weights (`--quantizations`), against the roofline of
   the quantized bytes: <q>_batch1_tok_per_s, <q>_roofline_steps_per_s, <q>_weight_bytes.
Weights are random (`--load-format dummy`), bf16, which runs exactly like real ones. Prints JSON
with, per model: model, roofline_steps_per_s, hf_batch1_tok_per_s, batch1_tok_per_s,
batch1_roofline_fraction, offline_tok_per_s, serve_tok_per_s, serve_ttft_p50_ms, and more.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# THUDM/chatglm3-6b's own config keys (the on-disk format Ember reads).
CHATGLM3_6B = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "ffn_hidden_size": 13696,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-5,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
TINY = {
    "llama-2-7b": {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
    "chatglm3-6b": {
        "hidden_size": 64,
        "ffn_hidden_size": 96,
        "num_layers": 2,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "padded_vocab_size": 512,
        "seq_length": 512,
    },
}
MODELS = {"llama-2-7b": LLAMA_2_7B, "chatglm3-6b": CHATGLM3_6B}


def vocab_size(cfg: dict[str, Any]) -> int:
    return cfg.get("padded_vocab_size") or cfg["vocab_size"]


def bench_words() -> list[str]:
    """Every word and mark of `ember bench`'s prompts, so the served run's prompts are as
    varied in tokens as in text (unknown words would all read as one token, and the prefix
    cache would serve 512 equal prompts)."""
    from ember import bench

    text = " ".join([*bench._OPENERS, *bench._TOPICS, *bench._WORDS, "using these words"])
    return sorted(set(text.split())) + [",", ".", ":"]


def write_model_dir(cfg: dict[str, Any], out: Path) -> Path:
    """config.json plus a word-level tokenizer: ids 0-2 are t0 (unknown), t1, t2 (end), then
    `ember bench`'s words, then t<id> for the rest of the vocabulary. Prompts of random ids are
    exactly as many tokens, and no tokenizer download is involved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    names = ["t0", "t1", "t2", *bench_words()]
    names += [f"t{i}" for i in range(len(names), vocab_size(cfg))]
    vocab = {name: i for i, name in enumerate(names[: vocab_size(cfg)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2").save_pretrained(
        str(out)
    )
    return out


def hf_config(cfg: dict[str, Any]):
    """The same shapes as a transformers config: LlamaConfig, or GlmConfig for ChatGLM3."""
    if cfg["model_type"] == "llama":
        from transformers import LlamaConfig

        keys = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
        return LlamaConfig(**keys)
    from transformers import GlmConfig  # transformers 4.46 on

    heads = cfg["num_attention_heads"]
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"],
        head_dim=cfg["kv_channels"],
        hidden_act="silu",
        max_position_embeddings=cfg["seq_length"],
        rms_norm_eps=cfg["layernorm_epsilon"],
        tie_word_embeddings=False,
        # transformers 5 reads rope_parameters; 4.x reads the two flat keys
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=2,
    )


# ------------------------------------------------------------------ timing


class Clock:
    """Wall time that waits for the device first (CUDA events would time only the GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy (median of repeats)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock = Clock(device)
    for _ in range(3):
        dst.copy_(src)
    times = sorted(clock.time(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / times[len(times) // 2]


def weight_bytes(cfg: dict[str, Any], dtype_bytes: int = 2) -> tuple[int, int]:
    """Parameter bytes of the model as Ember builds it (built on `meta`: no memory): all of
    them (the issue's roofline), and those a batch-1 decode step reads, which leave out the
    input embedding table (one row of it is read) unless the output layer shares it."""
    from ember.models.registry import model_class

    with torch.device("meta"):
        model = model_class(cfg)(cfg, backend=None)
    total = sum(p.numel() for p in model.parameters()) * dtype_bytes
    return total, total - _embedding_bytes(model)


def _embedding_bytes(model: torch.nn.Module) -> int:
    """Bytes of input embedding tables that no other layer shares (parameters() lists a shared
    tensor once, under the embedding)."""
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    others = {
        id(p) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    }  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tables if id(t) not in others)


def loaded_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a loaded model's weights that a batch-1 step reads, as they sit in memory:
    float parameters plus the quantized layers' codes, scales and minimums, less the input
    embedding table (one row of it is read)."""
    quantized = {"qweight", "qscale", "qmin"}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in quantized:
            total += b.numel() * b.element_size()
    return total - _embedding_bytes(model)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ the five measurements


def hf_batch1(
    cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, prompt: list[int], new: int
) -> float:
    """transformers generate at batch 1, greedy, exactly `new` tokens: output tokens/s."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(hf_config(cfg), torch_dtype=dtype)
    model.eval()
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        min_new_tokens=new,
        max_new_tokens=new,
        pad_token_id=0,
    )
    clock = Clock(device)
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        seconds = clock.time(lambda: model.generate(ids, **kwargs))
    return new / seconds  # the model goes with this frame; the caller frees its memory


def ember_batch1(llm, clock: Clock, prompt: list[int], new: int) -> dict[str, float]:
    """Decode tokens/s at batch 1 (prefill time taken out), and GPU idle time per step."""
    import ember

    def gen(n: int) -> None:
        llm.generate([prompt], ember.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    gen(8)  # warm-up
    first = min(clock.time(lambda: gen(1)) for _ in range(3))
    total = min(clock.time(lambda: gen(new)) for _ in range(2))
    # On a noisy host a short run's difference can vanish; then the prefill counts in too.
    step_s = (total - first) / (new - 1) if total > first else total / new
    out = {"batch1_tok_per_s": 1 / step_s, "batch1_step_ms": step_s * 1e3}
    graphs = llm.engine.runner.graphs
    if graphs is not None and 1 in graphs.graphs:
        # One replay of the batch-1 graph is the GPU's share of a step; the rest of the wall
        # time per step is host work during which the GPU waits. The last row's cache slot
        # is set to -1 so the replays write nothing.
        graphs.dev[0, 2] = -1
        graph = graphs.graphs[1][0]
        reps = 50
        gpu_s = clock.time(lambda: [graph.replay() for _ in range(reps)]) / reps
        out["batch1_gpu_ms_per_step"] = gpu_s * 1e3
        out["batch1_gpu_idle_fraction"] = max(0.0, 1 - gpu_s / step_s)
    return out


def ember_offline(llm, clock: Clock, prompts: list[list[int]], new: int) -> dict[str, float]:
    import ember

    params = ember.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts[:4], ember.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    results: list = []
    seconds = clock.time(lambda: results.extend(llm.generate(prompts, params)))
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    return {"offline_tok_per_s": tokens / seconds, "offline_seconds": seconds}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_dir: Path, engine_args: list[str], log_path: Path) -> Iterator[str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "ember.cli", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--served-model-name", "bench", *engine_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 900
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"ember serve exited with {proc.returncode}; see {log_path}")
                if time.time() > deadline:
                    raise RuntimeError(f"ember serve never became healthy; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(1)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def ember_serve(
    model_dir: Path,
    engine_args: list[str],
    requests: int,
    concurrency: int,
    prompt_len: int,
    new: int,
    log_dir: Path,
) -> dict[str, Any]:
    """`ember bench` against `ember serve`: output tokens/s, TTFT and TPOT percentiles."""
    name = model_dir.name
    with served(model_dir, engine_args, log_dir / f"serve-{name}.log") as base:
        bench = [sys.executable, "-m", "ember.cli", "bench", "--url", base, "--no-progress"]
        warm = subprocess.run(
            [*bench, "-c", "2", "-n", "2", "--max-tokens", "4"], capture_output=True, text=True
        )
        if warm.returncode:
            raise RuntimeError(f"ember bench warm-up failed: {warm.stderr[-2000:]}")
        args = ["-c", str(concurrency), "-n", str(requests), "--max-tokens", str(new)]
        args += ["--prompt-len", str(prompt_len), "--temperature", "0"]
        run = subprocess.run([*bench, *args], capture_output=True, text=True)
        (log_dir / f"bench-{name}.log").write_text(run.stdout + run.stderr)
        if run.returncode:
            raise RuntimeError(f"ember bench failed: {run.stderr[-2000:]}")
        report = json.loads(run.stdout)
    ms = {k: None if v is None else v * 1e3 for k, v in report["ttft_s"].items()}
    tpot = {k: None if v is None else v * 1e3 for k, v in report["tpot_s"].items()}
    return {
        "serve_tok_per_s": report["output_tokens_per_s"],
        "serve_ttft_p50_ms": ms["p50"],
        "serve_ttft_p90_ms": ms["p90"],
        "serve_ttft_p99_ms": ms["p99"],
        "serve_tpot_p50_ms": tpot["p50"],
        "serve_tpot_p90_ms": tpot["p90"],
        "serve_tpot_p99_ms": tpot["p99"],
        "serve_errors": report["errors"],
        "serve_completed": report["completed"],
    }


def bench_model(
    name: str,
    args: argparse.Namespace,
    work: Path,
    log_dir: Path,
    report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every measurement of one model; `report(row)` is called after each, so a run cut short
    keeps what it measured."""
    import ember

    cfg = dict(MODELS[name])
    if args.tiny:
        cfg.update(TINY[name])
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype
    ]
    model_dir = write_model_dir(cfg, work / name)
    rng = random.Random(0)
    vocab = vocab_size(cfg)

    def prompt() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(args.prompt_len)]

    row: dict[str, Any] = {"model": name, "dtype": args.dtype}
    clock = Clock(device)
    nbytes, step_bytes = weight_bytes(cfg, torch.tensor([], dtype=dtype).element_size())
    bw = copy_bandwidth(device, args.copy_bytes, 20)
    row.update(
        weight_bytes=nbytes,
        copy_bandwidth_gb_s=bw / 1e9,
        roofline_steps_per_s=bw / nbytes,
        # Stricter: only the bytes a step reads (no input embedding table).
        step_read_bytes=step_bytes,
        read_roofline_steps_per_s=bw / step_bytes,
    )
    log(f"{name}: {nbytes / 1e9:.2f} GB of weights, {bw / 1e9:.0f} GB/s → roofline "
        f"{row['roofline_steps_per_s']:.0f} steps/s")  # fmt: skip
    report(row)
    p1 = prompt()
    try:
        row["hf_batch1_tok_per_s"] = hf_batch1(cfg, device, dtype, p1, args.batch1_tokens)
        log(f"{name}: transformers batch 1: {row['hf_batch1_tok_per_s']:.1f} tok/s")
    except Exception as exc:  # an older transformers: Ember's figures still count
        row["hf_batch1_tok_per_s"] = None
        row["hf_error"] = f"{type(exc).__name__}: {exc}"
        log(f"{name}: transformers baseline failed: {row['hf_error']}")
    free_memory()
    report(row)

    engine_args = {
        "load_format": "dummy",
        "dtype": args.dtype,
        "device": args.device,
        "max_num_seqs": args.concurrency,
        "enforce_eager": args.enforce_eager,
    }
    reset_peak_memory(device)
    llm = ember.LLM(str(model_dir), **engine_args)
    row["kv_cache_tokens"] = llm.engine.runner.num_blocks * llm.engine.runner.block_size
    row["attention_backend"] = llm.engine.runner.backend.name
    row["cuda_graphs"] = llm.engine.runner.graphs is not None
    row.update(ember_batch1(llm, clock, p1, args.batch1_tokens))
    row["batch1_roofline_fraction"] = row["batch1_tok_per_s"] / row["roofline_steps_per_s"]
    row["batch1_read_roofline_fraction"] = (
        row["batch1_tok_per_s"] / row["read_roofline_steps_per_s"]
    )
    report(row)
    log(f"{name}: Ember batch 1: {row['batch1_tok_per_s']:.1f} tok/s "
        f"({100 * row['batch1_roofline_fraction']:.0f}% of roofline)")  # fmt: skip
    prompts = [prompt() for _ in range(args.requests)]
    row.update(ember_offline(llm, clock, prompts, args.output_len))
    row["offline_requests"] = args.requests
    log(f"{name}: Ember offline: {row['offline_tok_per_s']:.0f} tok/s")
    if device.type == "cuda":
        row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del llm
    free_memory()
    report(row)

    # The served run comes before the quantized ones: its figures are the issue's, and a run
    # cut short by its time limit keeps them.
    if not args.skip_serve:
        flags = ["--load-format", "dummy", "--dtype", args.dtype, "--device", args.device]
        flags += ["--max-num-seqs", str(args.concurrency)]
        if args.enforce_eager:
            flags.append("--enforce-eager")
        row.update(
            ember_serve(
                model_dir,
                flags,
                args.requests,
                args.concurrency,
                args.prompt_len,
                args.output_len,
                log_dir,
            )
        )
        row["serve_vs_offline"] = row["serve_tok_per_s"] / row["offline_tok_per_s"]
        log(f"{name}: ember serve: {row['serve_tok_per_s']:.0f} tok/s, "
            f"TTFT p50 {row['serve_ttft_p50_ms']:.0f} ms")  # fmt: skip
        report(row)

    for q in filter(None, args.quantizations.split(",")):
        reset_peak_memory(device)
        llm = ember.LLM(str(model_dir), **engine_args, quantization=q)
        qbytes = loaded_weight_bytes(llm.engine.runner.model)
        row[f"{q}_weight_bytes"] = qbytes
        row[f"{q}_roofline_steps_per_s"] = bw / qbytes
        measured = ember_batch1(llm, clock, p1, args.batch1_tokens)
        row[f"{q}_batch1_tok_per_s"] = measured["batch1_tok_per_s"]
        row[f"{q}_batch1_roofline_fraction"] = measured["batch1_tok_per_s"] * qbytes / bw
        log(f"{name}: Ember {q} batch 1: {measured['batch1_tok_per_s']:.1f} tok/s "
            f"({qbytes / 1e9:.2f} GB, {100 * row[f'{q}_batch1_roofline_fraction']:.0f}% of "
            f"its roofline)")  # fmt: skip
        del llm
        free_memory()
        report(row)
    return rounded(row)


def rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,chatglm3-6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="Tiny shapes and counts: a dry run.")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--copy-bytes", type=int, default=1 << 30)
    ap.add_argument("--enforce-eager", action="store_true", help="No CUDA graphs (to compare).")
    ap.add_argument(
        "--quantizations",
        default="int4,int8",
        help="Also measure batch-1 decode with these weight formats (comma-separated; '' for none).",
    )
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--log-dir", default=None, help="Server and bench logs; default: a temp dir.")
    ap.add_argument("--out", default=None, help="Also write the JSON here.")
    args = ap.parse_args(argv)
    if args.tiny:
        for key, value in dict(
            requests=8, concurrency=4, prompt_len=16, output_len=8, batch1_tokens=8
        ).items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
        if args.copy_bytes == ap.get_default("copy_bytes"):
            args.copy_bytes = 1 << 24
    work = Path(tempfile.mkdtemp(prefix="ember-gpu-bench-"))
    log_dir = Path(args.log_dir) if args.log_dir else work
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "models": [],
    }
    with contextlib.suppress(ImportError):
        import triton

        report["triton"] = triton.__version__

    def save(partial: dict[str, Any] | None = None) -> str:
        """The report so far (with the model being measured, marked partial) to --out."""
        doc = dict(report)
        if partial is not None:
            doc["models"] = [*report["models"], {**rounded(partial), "partial": True}]
        text = json.dumps(doc, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return text

    # `timeout` ends the run with SIGTERM: exit through the finally blocks, so a served
    # child is stopped and the figures measured so far are on disk.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    for name in args.models.split(","):
        report["models"].append(bench_model(name.strip(), args, work, log_dir, save))
        save()
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
