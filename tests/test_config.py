"""Settings come from flags, EMBER_ variables or keywords, and each is checked the same way."""

from __future__ import annotations

import argparse
import json
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


def _ember(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,env,message",
    [
        # Each of these once started a server that never became ready (or answered 500 forever).
        (["--max-request-body", "12XB"], {}, "max_request_body must be a size"),
        (["--max-num-seqs", "0"], {}, "max_num_seqs must be at least 1"),
        ([], {"EMBER_MAX_NUM_SEQS": "-3"}, "max_num_seqs must be at least 1"),
        (["--kv-cache-memory", "12XB"], {}, "kv_cache_memory must be a size"),
        (["--block-size", "0"], {}, "block_size must be at least 1"),
        (["--gpu-memory-utilization", "1.5"], {}, "gpu_memory_utilization must be at most 1.0"),
        (["--drain-timeout", "-1"], {}, "drain_timeout must be at least 0.0"),
        # An origin with a path never matches a browser's Origin header: refused, not silent.
        (["--allowed-origins", "https://chat.example/app"], {}, "is not an origin"),
        # nan passes every bound, inf none: a shutdown that hung or died with a traceback.
        (["--shutdown-grace", "inf"], {}, "shutdown_grace must be a finite number"),
        ([], {"EMBER_DRAIN_TIMEOUT": "nan"}, "drain_timeout must be a finite number"),
        (["--request-timeout", "nan"], {}, "request_timeout must be a finite number"),
        (["--gpu-memory-utilization", "nan"], {}, "gpu_memory_utilization must be a finite"),
        # Once a listener on port 70000 - 65536, and a traceback for any command at all.
        (["--port", "70000"], {}, "argument --port: a TCP port is 0 to 65535, got 70000"),
        ([], {"EMBER_PORT": "abc"}, "argument --port: not a whole number: 'abc'"),
        ([], {"EMBER_MAX_NUM_SEQS": "abc"}, "argument --max-num-seqs: invalid int value: 'abc'"),
        ([], {"EMBER_LOG_LEVEL": "verbose"}, "EMBER_LOG_LEVEL must be one of DEBUG, INFO"),
        # A switch's variable once read any other word as off (on, for the chat page): a
        # typo left /metrics open or the prefix cache off, without a word.
        ([], {"EMBER_METRICS_REQUIRE_KEY": "enabled"}, "EMBER_METRICS_REQUIRE_KEY: 'enabled' is"),
        ([], {"EMBER_ENABLE_PREFIX_CACHING": "maybe"}, "EMBER_ENABLE_PREFIX_CACHING: 'maybe' is"),
        ([], {"EMBER_CHAT_PAGE": "disabled"}, "EMBER_CHAT_PAGE: 'disabled' is not a switch: use"),
    ],
)
def test_serve_refuses_a_bad_setting_at_once_with_one_line(args, env, message) -> None:
    done = _ember("serve", *args, env=env)
    assert done.returncode == 2, done.stderr
    # One line, argparse's own errors too (its usage of `serve` alone was forty lines).
    [line] = done.stderr.strip().splitlines()
    assert message in line
    assert "Traceback" not in done.stderr


def test_a_bad_variable_of_one_command_does_not_break_the_others() -> None:
    done = _ember("pull", "--help", env={"EMBER_PORT": "abc", "EMBER_MAX_TOKENS": "x"})
    assert done.returncode == 0 and "usage: ember pull" in done.stdout
    bad_switches = {"EMBER_CHAT_PAGE": "x", "EMBER_ENABLE_PREFIX_CACHING": "x"}
    done = _ember("models", "--json", env=bad_switches)
    assert done.returncode == 0, done.stderr


def test_switch_words_and_the_flag_over_a_bad_variable(monkeypatch) -> None:
    from ember.cli import build_parser
    from ember.config import refuse_bad_env

    for word, value in [("1", True), (" Yes", True), ("ON", True), ("off", False), ("0", False)]:
        monkeypatch.setenv("EMBER_ENABLE_PREFIX_CACHING", word)
        assert from_env(EngineConfig).enable_prefix_caching is value, word
    monkeypatch.setenv("EMBER_ENABLE_PREFIX_CACHING", "")  # empty: the default
    assert from_env(EngineConfig).enable_prefix_caching is True
    monkeypatch.setenv("EMBER_ENABLE_PREFIX_CACHING", "maybe")
    with pytest.raises(ConfigError, match="EMBER_ENABLE_PREFIX_CACHING must be a bool; got"):
        from_env(EngineConfig)
    args = build_parser().parse_args(["serve", "--no-enable-prefix-caching"])
    refuse_bad_env(args)  # the command line wins over the variable
    assert args.enable_prefix_caching is False
    with pytest.raises(ConfigError, match="EMBER_ENABLE_PREFIX_CACHING: 'maybe' is not a switch"):
        refuse_bad_env(build_parser().parse_args(["serve"]))


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "/nonexistent", "-p", "hi"], "ember generate: no model at /nonexistent"),
        (["prepare", "/nonexistent"], "ember prepare: no model at /nonexistent"),
        (["serve", "--device", "cuda:7"], "ember serve: --device cuda:7: "),
        (
            ["serve", "--tokenizer", "/nonexistent"],
            "ember serve: --tokenizer /nonexistent: no such",
        ),
        (
            ["serve", "--chat-template", "nosuch"],
            "ember serve: chat template 'nosuch' is neither a file nor a built-in (built-ins: "
            "chatglm3, chatml",
        ),
        (
            ["serve", "--chat-template", "/nonexistent/chat.jinja"],
            "ember serve: chat template '/nonexistent/chat.jinja' is neither a file nor",
        ),
        # Once accepted: the server went ready, and every chat request was a 400.
        (
            ["serve", "--chat-template", "{tmp}/typo.jinja"],
            "ember serve: chat template {tmp}/typo.jinja (line 2): unexpected '}'",
        ),
        (
            ["generate", "-p", "hi", "--chat-template", "{tmp}/typo.jinja"],
            "ember generate: chat template {tmp}/typo.jinja (line 2): unexpected '}'",
        ),
    ],
)
def test_a_missing_path_or_device_is_one_line_not_a_traceback(args, message, tmp_path) -> None:
    (tmp_path / "typo.jinja").write_text("{% for m in messages %}\n{{ m.content }{% endfor %}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    done = _ember(*args)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert "Traceback" not in done.stderr


def test_serve_exits_1_when_it_cannot_listen() -> None:
    """A port already taken fails the start while the model loads: the process says so and
    exits 1 (it once exited 0, as a stop asked for, and restart-on-failure never came)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = _ember("serve", "--host", "127.0.0.1", "--port", port)
    assert done.returncode == 1, done.stderr
    assert "address already in use" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "ember serve: the server could not start (see the error above)"
    )


def test_bench_checks_its_output_path_before_the_run() -> None:
    done = _ember("bench", "--url", "http://127.0.0.1:9", "--output", "/nonexistent/x.json")
    assert done.returncode == 2
    assert done.stderr.strip() == "ember bench: --output /nonexistent/x.json: no such directory"


def test_api_key_flags_replace_the_environment_list(monkeypatch) -> None:
    """Every flag replaces its EMBER_ twin; the repeatable ones did not (the key left in the
    shell stayed valid beside the one given)."""
    import ember.server.app
    from ember import cli

    seen = {}

    def capture(engine_cfg, server_cfg, **kw):
        seen["server"] = server_cfg
        raise SystemExit(0)

    monkeypatch.setattr(ember.server.app, "build_app", capture)
    monkeypatch.setenv("EMBER_API_KEY", "envkey")
    monkeypatch.setenv("EMBER_SERVED_MODEL_NAME", "env-name")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--api-key", "sk-1", "--served-model-name", "given"])
    assert seen["server"].api_keys == ["sk-1"]
    assert seen["server"].served_model_names == ["given"]
    with pytest.raises(SystemExit):
        cli.main(["serve"])
    assert seen["server"].api_keys == ["envkey"]
    assert seen["server"].served_model_names == ["env-name"]


@pytest.mark.parametrize(
    "argv, env, named",
    [
        (["serve", "--api-key", ""], None, "--api-key"),
        (["serve", "--api-key", " "], None, "--api-key"),
        (["serve"], {"EMBER_API_KEY": ""}, "EMBER_API_KEY"),
        (["serve"], {"EMBER_API_KEY": " , "}, "EMBER_API_KEY"),
        (["serve", "--served-model-name", ""], None, "--served-model-name"),
        (["serve", "--served-model-name", "a", "--served-model-name", " "], None, "--served"),
        (["serve"], {"EMBER_SERVED_MODEL_NAME": ","}, "EMBER_SERVED_MODEL_NAME"),
    ],
)
def test_an_empty_api_key_or_name_is_refused_not_read_as_none(
    monkeypatch, capsys, argv, env, named
):
    """An empty key (say, a Kubernetes Secret without a value) would open the server to all;
    a model served under an empty name could be named by no client."""
    import ember.server.app
    from ember import cli

    def never(*args, **kw):
        raise AssertionError("the server was built")

    monkeypatch.setattr(ember.server.app, "build_app", never)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    monkeypatch.delenv("EMBER_SERVED_MODEL_NAME", raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "empty" in err


@pytest.mark.parametrize("flag, value", [("--max-tokens", "0"), ("--temperature", "-1")])
def test_ember_generate_refuses_a_bad_sampling_value_before_loading(
    monkeypatch, capsys, flag, value
):
    import ember
    from ember import cli

    def never(**kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ember, "LLM", never)
    assert cli.main(["generate", "-p", "hi", flag, value]) == 1
    assert flag[2:].replace("-", "_") in capsys.readouterr().err


def test_ember_generate_reads_its_prompt_from_stdin(monkeypatch, capsys):
    """`echo question | ember generate`, as llm and ollama take it; with no prompt at all on a
    terminal, one line says what to give (before any model loads)."""
    import io
    import subprocess
    import sys

    from ember import cli

    for argv in (["generate"], ["generate", "-p", "-"]):
        run = subprocess.run(
            [sys.executable, "-m", "ember.cli", *argv, "--raw", "--max-tokens", "3", "-v"],
            input="The capital of France is",
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        stats = json.loads(run.stderr.strip().splitlines()[-1])
        assert stats["prompt_tokens"] == 5 and stats["output_tokens"] == 3  # the piped text

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    assert cli.main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err
    # Nothing piped in, or an empty -p (an unset variable): refused, not answered.
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for argv in (["generate"], ["generate", "-p", " \n"]):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == "ember generate: the prompt is empty\n"


def test_allowed_origins_are_written_as_browsers_send_them() -> None:
    """An origin copied from the address bar (a trailing slash, capitals) matched nothing:
    CORS compares the Origin header as the browser writes it."""
    from ember.config import origins

    got = origins(" https://Chat.Example.com/ ,http://localhost:3000,, *")
    assert got == ["https://chat.example.com", "http://localhost:3000", "*"]
    assert origins("") == []
    for bad in ("chat.example.com", "ftp://x.example", "https://x.example/?a=1", "https://"):
        with pytest.raises(argparse.ArgumentTypeError):
            origins(bad)


@pytest.mark.parametrize("redirect", [">&-", "| true"])
def test_the_server_leaves_with_its_status_when_stdout_is_closed_or_its_reader_gone(redirect):
    """`ember serve` ends with os._exit after flushing its streams; a closed stdout (None in
    Python) or a pipe whose reader has gone made that flush raise, so a clean stop exited 1
    with a traceback instead of 0."""
    code = (
        "import time; from ember.cli import _leave; time.sleep(0.3); print('buffered'); _leave(0)"
    )
    # pipefail: a pipeline's status is its first command's (`true` exits 0, reading nothing)
    script = f'set -o pipefail; {sys.executable} -c "{code}" {redirect}; echo "status=$?" >&2'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a buffer to flush
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.stderr.strip().endswith("status=0"), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
