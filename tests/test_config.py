"""Settings come from flags, EMBER_ variables or keywords, and each is checked the same way."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ember.config import ConfigError, EngineConfig, from_env


def test_a_keyword_outside_the_choices_is_refused_with_its_flag_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"dtype must be one of .*'fp16'.*--dtype.*EMBER_DTYPE"):
        from_env(EngineConfig, dtype="fp16")


def test_an_environment_value_outside_the_choices_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("EMBER_QUANTIZATION", "q4")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        from_env(EngineConfig)


def test_none_for_a_setting_that_cannot_be_none_means_its_default() -> None:
    cfg = from_env(EngineConfig, quantization=None, dtype=None, max_model_len=None)
    assert (cfg.quantization, cfg.dtype, cfg.max_model_len) == ("auto", "auto", None)


def test_serve_with_a_bad_environment_value_exits_2_with_one_line() -> None:
    # argparse checks only the values given on the command line, not its defaults
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "serve", "--port", "1"],
        env={**os.environ, "EMBER_ATTENTION_BACKEND": "flash"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "ember serve: error: attention_backend must be one of auto, cpu, torch, triton; "
        "got 'flash' (flag --attention-backend, env EMBER_ATTENTION_BACKEND)"
    ]
