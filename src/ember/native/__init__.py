"""Ember's C kernels for the CPU, built once per machine with the system's C compiler.

`cpu_kernels()` compiles `cpu_kernels.c`, `quant_kernels.c` and `decode_layers.c` for the host CPU
(`-march=native`, OpenMP) into `$EMBER_CACHE_DIR/kernels/` the first time it is needed, and
loads it with ctypes. The name of the built library hashes the sources, the flags, the
compiler and the CPU's features, so an edit or another machine sharing the cache builds afresh.
Without a compiler, or with `EMBER_NATIVE=0`, it returns None and callers keep their plain torch
path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from ember.config import BadEnvValue, env_switch
from ember.models.loader import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Quantized matmuls (int8/int4 weights against int8-quantized activations) live in their own file.
# the decode step through every layer in one call (models/cpu_decode.py) in a third.
SOURCES = [SOURCE, *(Path(__file__).with_name(n) for n in ("quant_kernels.c", "decode_layers.c"))]
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]

_i64, _f32 = ctypes.c_int64, ctypes.c_float
_ptr = ctypes.c_void_p
SIGNATURES = {
    # q, q row stride, cache, out, block_tables, context_lens, seqs, heads, kv_heads, head_dim,
    # block_size, max_blocks, scale
    "decode_attention": [
        _ptr,
        _i64,
        _ptr,
        _ptr,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _f32,
    ],  # fmt: skip
    # q, q row stride, cache, out, block_tables, max_blocks, row_seq, row_len, rows, heads,
    # kv_heads, head_dim, block_size, scale
    "paged_attention": [
        _ptr,
        _i64,
        _ptr,
        _ptr,
        _ptr,
        _i64,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _f32,
    ],  # fmt: skip
    "silu_and_mul": [_ptr, _ptr, _i64, _i64],  # x, out, rows, n
    "rms_norm": [_ptr, _ptr, _ptr, _i64, _i64, _f32],  # x, weight, out, rows, dim, eps
    # x, rows, row stride, heads, head_dim, rot_dim, cos, sin, neox
    "rotary": [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64],
    "sample_logits": [_ptr, _i64, _i64, _ptr, _ptr],  # logits, rows, vocab, u (double), out
    "top_p_mask": [_ptr, _i64, _i64, _ptr],  # logits (in place), rows, vocab, p (float)
    # x, rows, K, row stride, Kp, xq (int8), xd (float), xs (int32 sums per 16 columns)
    "quantize_rows_q8": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr],
    # x, rows, K, x row stride, w (tiled), bits, scales, mins, N, Kp, group, bias, out, out stride
    "linear_quant": [
        _ptr,
        _i64,
        _i64,
        _i64,
        _ptr,
        _i64,
        _ptr,
        _ptr,
        _i64,
        _i64,
        _i64,
        _ptr,
        _ptr,
        _i64,
    ],  # fmt: skip
    # layers, num_layers, dims, final norm, rows, x, residual, out, cos, sin, slots,
    # block_tables, context_lens, max_blocks (structures in models/cpu_decode.py)
    "decode_layers": [_ptr, _i64, _ptr, _ptr, _i64, *[_ptr] * 8, _i64],
    "set_threads": [_i64],  # threads for the parallel loops; 0: OpenMP's default
}


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [*(p.read_text() for p in SOURCES), " ".join(FLAGS), version, _cpu_features()]
        ).encode()
    ).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent servers never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def cpu_kernels() -> ctypes.CDLL | None:
    switch = env_switch("EMBER_NATIVE", True)
    if isinstance(switch, BadEnvValue):
        raise switch.error()
    if not switch:
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: CPU kernels fall back to plain torch")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError) as e:
        log.warning("CPU kernels unavailable, using plain torch: %s", e)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.ember_num_threads.argtypes = []
    lib.ember_num_threads.restype = ctypes.c_int
    lib.set_threads(_threads)
    return lib


_threads = 0


def set_threads(n: int) -> None:
    """Run the kernels' parallel loops on `n` threads (0: OpenMP's default, one per core)."""
    global _threads
    _threads = max(0, n)
    if cpu_kernels.cache_info().currsize:  # already loaded: tell it now
        lib = cpu_kernels()
        if lib is not None:
            lib.set_threads(_threads)


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs this process may use by its cgroup's CPU quota, rounded up (a pod's
    `limits.cpu`), or None without one. Neither torch nor OpenMP reads it: on a 64-core node
    a pod limited to 4 CPUs would run 64 threads and spend its quota waiting to be scheduled."""
    try:  # cgroup v2: "max 100000" or "400000 100000"
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: -1 when unlimited
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
