"""Compile every Triton kernel Ember launches on a GPU for an H100/H200 (sm_90), without one.

The interpreter (TRITON_INTERPRET=1, the CPU tests) checks what the kernels compute, not that
they compile: it accepts a `tl.dot` on too few rows, a tile that needs more shared memory than
the card has, or a type the code generator refuses. Here the real compiler runs, to PTX and
through ptxas to a cubin, for the kernels the engine actually launches: a stand-in Triton driver
names the sm_90 target and turns each launch into a record, and the engine runs on the CPU
(`ember.LLM`, Triton attention backend, fused and quantized Triton layers forced on) over
full-size head and hidden shapes (Llama-2-7B, ChatGLM3-6B, a GQA Llama) with one layer and dummy
weights. What the kernels write is left unread: only compilation and the launch limits count.

    python tests/sm90_compile.py [--out report.json]

Prints JSON: each distinct compiled kernel with its shared memory, registers and spills (from
`ptxas -v`), launches per kernel, and the problems found; exits 1 on any. Run it without
TRITON_INTERPRET (Triton reads it when a kernel is defined).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter compiles nothing")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# H100 and H200 (compute capability 9.0): 227 KiB of shared memory a block can opt into,
# 64K registers an SM, at most 255 a thread, 1024 threads a block, 132 SMs.
SM90 = {
    "max_shared_mem": 232448,
    "max_num_regs": 65536,
    "multiprocessor_count": 132,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 6144,
}
MAX_THREADS = 1024


class _Launch:
    """What the CUDA launcher would run: here, a record of the kernel and its grid."""

    launches: Counter[str] = Counter()

    def __init__(self, src: Any, metadata: Any) -> None:
        self.name = metadata.name

    def __call__(self, grid_x: int, grid_y: int, grid_z: int, *args: Any) -> None:
        assert grid_x <= 2**31 - 1 and grid_y <= 65535 and grid_z <= 65535, (
            f"{self.name}: grid ({grid_x}, {grid_y}, {grid_z}) is over CUDA's limits"
        )
        _Launch.launches[self.name] += 1


class _Utils:
    def get_device_properties(self, device: int) -> dict[str, int]:
        return dict(SM90)

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        # module, function, registers, spills, most threads a block: the limits are checked
        # against ptxas's own report below.
        return None, None, 0, 0, MAX_THREADS

    def unload_module(self, module: Any) -> None:
        pass


class CompileOnlyDriver(DriverBase):
    """A Triton driver for an sm_90 card that is not there: compiles, never runs."""

    def __init__(self) -> None:
        self.utils = _Utils()
        self.launcher_cls = _Launch

    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        raise NotImplementedError

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_device_capability(self, device: int = 0) -> tuple[int, int]:
        return (9, 0)


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:  # Triton before 3.4 took no arch
        return compiler.get_ptxas().path


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes of a kernel as ptxas reports them (`-v`)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [
                _ptxas(arch),
                "-v",
                f"--gpu-name=sm_{arch}a",
                str(src),
                "-o",
                str(Path(tmp) / "k.cubin"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    log = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_store_bytes": int(stores.group(1)) if stores else 0,
        "spill_load_bytes": int(loads.group(1)) if loads else 0,
    }


@contextlib.contextmanager
def triton_kernels_forced_on() -> Iterator[None]:
    """The model layers pick Triton kernels for CUDA tensors only; here, for every tensor."""
    from ember.engine import runner
    from ember.models import layers

    saved = (layers.fused_ops, layers.quant_ops, layers.cpu_kernels, runner.CpuQuantDecoder.build)

    def fused(x: torch.Tensor) -> Any:
        return layers._triton_module("triton_ops") if x.dtype in layers._FUSED_DTYPES else None

    layers.fused_ops = fused
    layers.quant_ops = lambda x: layers._triton_module("triton_quant")
    layers.cpu_kernels = lambda: None  # the GPU's layout: no C kernels, no tiled weights
    runner.CpuQuantDecoder.build = staticmethod(lambda *a, **k: None)
    try:
        yield
    finally:
        layers.fused_ops, layers.quant_ops, layers.cpu_kernels = saved[:3]
        runner.CpuQuantDecoder.build = saved[3]


def one_layer(cfg: dict[str, Any], vocab: int = 1024) -> dict[str, Any]:
    cfg = dict(cfg)
    for key in ("num_hidden_layers", "num_layers"):
        if key in cfg:
            cfg[key] = 1
    for key in ("vocab_size", "padded_vocab_size"):
        if key in cfg:
            cfg[key] = vocab
    return cfg


def model_cases() -> dict[str, dict[str, Any]]:
    import gpu  # benchmarks/gpu.py: the full-size configs the GPU benchmark runs

    llama3 = dict(gpu.LLAMA_2_7B, num_key_value_heads=8, intermediate_size=14336)
    return {
        "llama-2-7b": one_layer(gpu.LLAMA_2_7B),
        "chatglm3-6b": one_layer(gpu.CHATGLM3_6B),
        "llama-gqa-8kv": one_layer(llama3),
    }


def run_engine(model_dir: Path, dtype: str, quantization: str | None) -> list[str]:
    """Prefill chunks with and without a cached prefix, then decode steps whose context spans
    several KV splits: every attention path the backend has. Returns the kernels compiled again
    (same types and constexprs) because a step's sizes changed: each such compile would stall
    every stream mid-serving on the GPU."""
    import ember
    from ember.engine.attention import triton_backend
    from ember.engine.request import SamplingParams

    backend_cls = triton_backend.TritonAttentionBackend
    init = backend_cls.__init__

    def init_on_sm90(self: Any, *args: Any) -> None:
        init(self, *args)
        self.num_sms = SM90["multiprocessor_count"]  # the decode split count of an H200

    backend_cls.__init__ = init_on_sm90
    try:
        llm = ember.LLM(
            str(model_dir),
            load_format="dummy",
            dtype=dtype,
            attention_backend="triton",
            quantization=quantization,
            block_size=16,  # the GPU's default
            max_model_len=512,
            max_num_seqs=8,
            max_num_batched_tokens=256,
        )
    finally:
        backend_cls.__init__ = init
    # One short request first: every kernel it runs is compiled for this model.
    llm.generate(["t5 t6 t7"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    before = list(compiled_variants())
    seen = {variant_key(fn, c): c for fn, c in before}
    compiled_before = {id(c) for _, c in before}

    words = [f"t{i}" for i in range(3, 400)]
    shared = " ".join(words[:150])
    # Batches of 1 to 5 prefill chunks of uneven lengths next to decodes, contexts that pass
    # 256 tokens (a block table 16 wide), then a prompt whose prefix is cached.
    prompts = [shared + " t7 t8", shared + " t9", "t5 t6 t7", " ".join(words[:61]), "t4"]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (120, 30, 9, 70, 5)
    ]
    llm.generate(prompts, params)
    llm.generate([shared + " t11 t12"], params[1])
    # Alone in their steps: 16, 32 and 33 rows through every matmul, block tables exactly 16
    # wide (a 250-token prompt, then its decode steps past 256 tokens).
    for n, new_tokens in ((16, 2), (32, 2), (33, 2), (250, 12)):
        one = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        llm.generate([" ".join(words[200 - n // 2 : 200 - n // 2 + n])], one)
    # Batches of other sizes and contexts may need other constexprs (a split count over 1, a
    # wider matmul tile), never the same kernel again for other argument values.
    recompiled = [
        key[0]
        for fn, c in compiled_variants()
        if id(c) not in compiled_before and (key := variant_key(fn, c)) in seen
    ]
    return recompiled


def compiled_variants() -> Iterator[tuple[Any, Any]]:
    """(JIT function, compiled variant) for every variant in Triton's in-process caches."""
    from ember.engine.attention import triton_kernels
    from ember.models import triton_ops, triton_quant

    for module in (triton_kernels, triton_ops, triton_quant):
        for name in dir(module):
            fn = getattr(module, name)
            if isinstance(fn, triton.runtime.jit.JITFunction):
                for cache in fn.device_caches.values():
                    for compiled in cache[0].values():
                        yield fn, compiled


def variant_key(fn: Any, compiled: Any) -> tuple[str, str, str]:
    """What a variant is compiled for besides the specialisation on argument values: the
    kernel, its argument types and its constexprs."""
    # An argument that is not a declared constexpr (upper case here) but was compiled as a
    # constant (an integer equal to 1) counts as the integer it is.
    sig = {
        k: "i32" if v == "constexpr" else v
        for k, v in compiled.src.signature.items()
        if not k.isupper()
    }
    consts = {
        fn.arg_names[path[0]]: value
        for path, value in compiled.src.constants.items()
        if len(path) == 1 and fn.arg_names[path[0]].isupper()
    }
    return compiled.metadata.name, json.dumps(sig), json.dumps(consts, sort_keys=True)


def kernel_reports() -> list[dict[str, Any]]:
    """Every compiled variant, with ptxas's figures."""
    reports = []
    for fn, compiled in compiled_variants():
        meta = compiled.metadata
        name, sig, consts = variant_key(fn, compiled)
        report = {
            "kernel": name,
            "signature": json.loads(sig),
            "constexprs": json.loads(consts),
            # pointers 16-byte aligned and integers that are 1 or a multiple of 16
            "specialization": str(compiled.src.attrs),
            "num_warps": meta.num_warps,
            "num_stages": meta.num_stages,
            "shared_bytes": meta.shared,
        }
        report.update(ptxas_report(compiled.asm["ptx"], meta.target.arch))
        reports.append(report)
    return reports


def problems_of(report: dict[str, Any]) -> list[str]:
    out = []
    if report["shared_bytes"] > SM90["max_shared_mem"]:
        out.append(
            f"{report['shared_bytes']} bytes of shared memory, over {SM90['max_shared_mem']}"
        )
    if report["num_warps"] * 32 > MAX_THREADS:
        out.append(f"{report['num_warps']} warps, over {MAX_THREADS} threads")
    if report["registers"] * report["num_warps"] * 32 > SM90["max_num_regs"]:
        out.append(f"{report['registers']} registers a thread cannot fit one block on an SM")
    return [f"{report['kernel']}: {p}" for p in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--models", default=",".join(model_cases()))
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--quantizations", default="int4,int8")
    args = ap.parse_args()

    import gpu

    triton.runtime.driver.set_active(CompileOnlyDriver())
    cases = model_cases()
    failures: list[str] = []
    runs = []
    with tempfile.TemporaryDirectory() as tmp, triton_kernels_forced_on():
        for name in args.models.split(","):
            model_dir = gpu.write_model_dir(cases[name], Path(tmp) / name)
            plans = [(d, None) for d in args.dtypes.split(",")]
            plans += [("bfloat16", q) for q in args.quantizations.split(",") if q]
            for dtype, quantization in plans:
                label = f"{name} {dtype} {quantization or 'unquantized'}"
                print(f"compiling for sm_90: {label}", file=sys.stderr, flush=True)
                try:
                    recompiled = run_engine(model_dir, dtype, quantization)
                    runs.append(label)
                    failures += [
                        f"{label}: {k} compiled again for other argument values" for k in recompiled
                    ]
                except Exception as exc:  # a compile error names the kernel and line
                    traceback.print_exc()
                    failures.append(f"{label}: {type(exc).__name__}: {exc}")
    reports = kernel_reports()
    for report in reports:
        failures += problems_of(report)
    result = {
        "target": "cuda sm_90 (H100/H200)",
        "triton": triton.__version__,
        "runs": runs,
        "launches": dict(_Launch.launches),
        "kernels": reports,
        "problems": failures,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
