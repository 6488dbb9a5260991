"""Ember's C kernels: built once into the cache, used by the model's MLP, and optional."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from ember.models import layers
from ember.native import cpu_kernels


def torch_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.fixture
def kernels():
    lib = cpu_kernels()
    if lib is None:
        assert shutil.which("cc") is None and shutil.which("gcc") is None, "C kernels failed"
        pytest.skip("no C compiler on this machine")
    return lib


@pytest.mark.parametrize("shape", [(1, 2), (7, 96), (300, 3072), (2, 3, 10)])
def test_silu_and_mul_matches_torch(kernels, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 6
    x[..., 0] = -100.0  # exp overflow territory: silu(-100) is -0, not NaN
    out = layers.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, torch_silu_and_mul(x), rtol=1e-5, atol=1e-6)


def test_silu_and_mul_takes_views_and_other_dtypes(kernels) -> None:
    x = torch.randn(6, 16)
    view = x[::2]  # not contiguous: the torch path
    torch.testing.assert_close(layers.silu_and_mul(view), torch_silu_and_mul(view))
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(layers.silu_and_mul(half), torch_silu_and_mul(half))


@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_matches_torch(kernels, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g) * 3
    norm = layers.RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=g)
    want = torch.nn.functional.rms_norm(x, (576,), norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    wide = torch.cat([x, x], dim=1)[:, :576]  # a strided view takes the torch path
    torch.testing.assert_close(norm(wide), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_in_place_matches_out_of_place(kernels, neox: bool, rotary_dim: int) -> None:
    """Q and K heads rotated inside a fused QKV row (strided), full and partial rotary dims."""
    rope = layers.RotaryEmbedding(64, rotary_dim, 4096, 10000.0, neox_style=neox)
    g = torch.Generator().manual_seed(rotary_dim + neox)
    tokens, heads = 37, 5
    qkv = torch.randn(tokens, (heads + 2) * 64, generator=g)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    cos_sin = rope.cos_sin(positions, torch.float32)
    qk = qkv[:, : heads * 64].view(tokens, heads, 64)
    want = rope(qk.clone(), cos_sin)
    v_before = qkv[:, heads * 64 :].clone()
    assert rope.rotate(qk, cos_sin).data_ptr() == qkv.data_ptr()  # in place
    torch.testing.assert_close(qk, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, heads * 64 :], v_before)  # the rest of the row is untouched
    if rotary_dim < 64:
        torch.testing.assert_close(qk[..., rotary_dim:], want[..., rotary_dim:], rtol=0, atol=0)


def test_kernels_build_into_the_cache_and_can_be_turned_off(tmp_path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    code = (
        "from ember.native import cpu_kernels; "
        "from ember.engine.attention.cpu_backend import CpuAttentionBackend as B; "
        "print(cpu_kernels() is not None, B.available(9, 3, 64))"
    )
    env = {"EMBER_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def run(**extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run() == "True True"
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert run() == "True True"  # the second start loads the same file
    assert built[0].stat().st_mtime_ns == mtime
    assert run(EMBER_NATIVE="0") == "False False"
    # Another word is refused, as every EMBER_ switch refuses it (it once meant "on").
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "EMBER_NATIVE": "disabled"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "EMBER_NATIVE: 'disabled' is not a switch" in proc.stderr
    assert run(CC="/nonexistent/cc") == "False False"  # a broken compiler is not fatal


def test_set_threads_sizes_every_parallel_loop(kernels) -> None:
    """The kernels run on the threads Ember sets (not OpenMP's one per core), from any thread:
    in a fresh process, the pool OpenMP starts for a kernel is the size asked for."""
    script = """
import os, threading, torch
from ember import native
from ember.models import layers
torch.set_num_threads(1)  # no threads of torch's own
native.set_threads({n})
lib = native.cpu_kernels()
assert lib.ember_num_threads() == {n}, lib.ember_num_threads()
x = torch.randn(64, 2048)
counts = []
def call():
    counts.append(len(os.listdir("/proc/self/task")))
    layers.silu_and_mul(x)
    # OpenMP's pool lives as long as the thread that started it: counted before it exits
    counts.append(len(os.listdir("/proc/self/task")))
# from another thread, as the engine calls them
t = threading.Thread(target=call)
t.start(); t.join()
print(counts[1] - counts[0])
"""
    started = {}
    for n in (1, 5):
        out = subprocess.run(
            [sys.executable, "-c", script.format(n=n)], capture_output=True, text=True, check=True
        )
        started[n] = int(out.stdout.split()[-1])
    # Five threads start (and OpenMP keeps) four workers more than one thread does; OpenMP's
    # default here would start as many for both.
    assert started[5] - started[1] >= 3, started


def test_set_threads_zero_is_openmp_default(kernels) -> None:
    from ember import native

    native.set_threads(3)
    assert kernels.ember_num_threads() == 3
    native.set_threads(0)
    assert kernels.ember_num_threads() >= 1


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
        ({"cpu.max": "400000 100000\n"}, 4),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: round up
        ({"cpu.max": "10000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
        ({}, None),
    ],
)
def test_cpu_quota_reads_cgroup_v1_and_v2(tmp_path, files: dict[str, str], expected) -> None:
    from ember.native import cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


def test_cpu_quota_caps_torch_and_kernel_threads(kernels, monkeypatch) -> None:
    """A pod limited to fewer CPUs than it sees runs that many threads, unless told otherwise."""
    from ember import native
    from ember.engine import runner

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(native, "cpu_quota", lambda: 1)
        monkeypatch.setattr(runner, "_visible_cpus", lambda: 64)
        runner.set_cpu_threads(None)
        assert (torch.get_num_threads(), kernels.ember_num_threads()) == (1, 1)
        runner.set_cpu_threads(3)  # --num-threads wins
        assert (torch.get_num_threads(), kernels.ember_num_threads()) == (3, 3)
        monkeypatch.setattr(native, "cpu_quota", lambda: None)
        native.set_threads(0)
        torch.set_num_threads(2)
        default = kernels.ember_num_threads()
        runner.set_cpu_threads(None)  # no quota: the defaults stay
        assert (torch.get_num_threads(), kernels.ember_num_threads()) == (2, default)
    finally:
        torch.set_num_threads(before)
        native.set_threads(0)
