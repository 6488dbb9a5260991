from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama):
    """One engine on the tiny Llama, shared by tests that only read its outputs."""
    import ember

    return ember.LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory="8MiB")
