"""`ember bench` against the real session server, through its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.bench import make_prompts, percentile, summarize

from conftest import API_KEY, default_sigint, metric

pytestmark = pytest.mark.slow

FIELDS = {
    "url",
    "model",
    "endpoint",
    "concurrency",
    "requests",
    "max_tokens",
    "completed",
    "errors",
    "error_samples",
    "duration_s",
    "requests_per_s",
    "output_tokens",
    "output_tokens_per_s",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "interrupted",
}
STATS = {"mean", "p50", "p90", "p99"}


def bench(url: str, *extra: str, expect_rc: int = 0) -> dict:
    cmd = [sys.executable, "-m", "ember.bench", "--url", url, "--api-key", API_KEY]
    cmd += ["--requests", "4", "--concurrency", "2", "--max-tokens", "8", "--no-progress"]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, proc.stderr
    return json.loads(proc.stdout)


def check_ok(report: dict, endpoint: str) -> None:
    assert report.keys() >= FIELDS
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert report[key].keys() >= STATS
        assert all(v is not None and v >= 0 for v in report[key].values()), report[key]
    assert report["endpoint"] == endpoint
    assert report["completed"] == report["requests"] == 4
    assert report["errors"] == 0 and report["error_samples"] == []
    # ignore_eos: every request runs to max_tokens.
    assert report["output_tokens"] == 4 * 8
    assert report["input_tokens"] >= 4 * 8  # the prompts, as the server counted them
    assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
    assert report["ttft_s"]["p50"] <= report["e2e_s"]["p50"]


def test_completions(server, tmp_path):
    out = tmp_path / "bench.json"
    report = bench(server, "--model", "smol", "--output", str(out))
    check_ok(report, "/v1/completions")
    assert report["model"] == "smol"
    assert json.loads(out.read_text()) == report


def test_chat_default_model(server):
    report = bench(server, "--chat", "--seed", "3")
    check_ok(report, "/v1/chat/completions")
    assert report["model"] in ("smol", "gpt-3.5-turbo")  # first of GET /v1/models


def test_wrong_model_counts_errors(server):
    report = bench(server, "--model", "no-such-model", expect_rc=1)
    assert report["completed"] == 0 and report["errors"] == 4
    assert report["output_tokens"] == 0
    assert report["error_samples"] and all("404" in s for s in report["error_samples"])
    assert report["ttft_s"]["p50"] is None


def test_wrong_api_key_counts_errors(server):
    report = bench(server, "--model", "smol", "--api-key", "wrong", expect_rc=1)
    assert report["errors"] == 4
    assert any("401" in s for s in report["error_samples"])


def test_timeout_bounds_a_whole_request_not_each_read(server):
    """A stream that keeps sending tokens used to run past --timeout (it bounded each read)."""
    report = bench(
        server, "--model", "smol", "--max-tokens", "400", "--timeout", "0.5", expect_rc=1
    )
    assert report["errors"] == 4
    assert all(s.startswith("timeout") for s in report["error_samples"]), report


def test_an_openai_base_url_works_too(server):
    report = bench(server + "/v1/", "--model", "smol")
    check_ok(report, "/v1/completions")
    assert report["url"] == server and report["interrupted"] is False


def test_ctrl_c_reports_what_finished_without_a_traceback(server):
    import signal
    import time

    cmd = [sys.executable, "-m", "ember.bench", "--url", server, "--api-key", API_KEY]
    cmd += ["--requests", "200", "--concurrency", "2", "--max-tokens", "64", "--no-progress"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        deadline = time.time() + 120
        while metric(server, "ember:num_requests_running") < 1 and time.time() < deadline:
            time.sleep(0.2)  # until its requests run
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never left running: the server is shared by later tests
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    report = json.loads(out)
    assert report["interrupted"] is True and report["completed"] < 200
    assert err.strip().splitlines()[-1].startswith("ember bench: interrupted")


def test_helpers():
    a = make_prompts(8, 32, seed=1)
    assert a == make_prompts(8, 32, seed=1) and a != make_prompts(8, 32, seed=2)
    assert len({p.split()[0] + p.split()[-1] for p in a}) > 1  # varied, not one prefix
    assert all(25 <= len(p.split()) <= 40 for p in a)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert summarize([1.0, 3.0])["mean"] == 2.0
