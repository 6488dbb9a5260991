"""Raw HTTP against a real `ember serve`: SSE framing, errors, admin routes, NextChat, disconnects."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_sse_stream_framing(server):
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert {"id", "object", "created", "model"} <= c.keys()
        assert c["object"] == "chat.completion.chunk" and c["model"] == "smol"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_reason = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(with_reason) == 1 and with_reason[0] is chunks[-2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_nextchat_request_shape_streams(server):
    """NextChat sends no max_tokens, and penalties and top_p, with a custom model name."""
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "model": "gpt-3.5-turbo",
        "temperature": 0.5,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
    }
    headers = {**AUTH, "Accept": "application/json"}
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        events = _events(r)
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text.strip()


def test_nextchat_billing_pages(server):
    usage = httpx.get(
        server + "/dashboard/billing/usage?start_date=2026-11-01&end_date=2026-11-27", headers=AUTH
    )
    sub = httpx.get(server + "/dashboard/billing/subscription", headers=AUTH)
    assert usage.status_code == sub.status_code == 200
    assert usage.json()["total_usage"] >= 0 and usage.json()["total_tokens"] > 0
    assert sub.json()["hard_limit_usd"] > 0


def test_cors_preflight_is_answered(server):
    r = httpx.options(
        server + "/v1/chat/completions",
        headers={
            "Origin": "http://nextchat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://nextchat.example")


def test_a_page_elsewhere_may_read_the_request_id_and_retry_after(server):
    """A browser client (NextChat) reads only the response headers CORS exposes: an
    overloaded server's Retry-After is one it needs."""
    r = httpx.get(server + "/v1/models", headers={**AUTH, "Origin": "http://nextchat.example"})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after"} <= exposed


def test_auth_guards_v1_but_not_health(server):
    assert httpx.get(server + "/health").status_code == 200
    head = httpx.head(server + "/health")  # as some load balancers probe
    assert head.status_code == 200 and head.content == b""
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/v1/models", headers=AUTH).status_code == 200


def test_errors_have_the_openai_shape(server):
    cases = [
        ({"model": "smol", "messages": "not a list"}, 400),
        ({"model": "smol"}, 400),
        ({"model": "smol", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    ]
    for body, status in cases:
        r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == status, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = httpx.post(
        server + "/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400


def test_admin_routes(server):
    assert httpx.get(server + "/version").json()["version"]
    assert httpx.get(server + "/openapi.json").status_code == 200
    tok = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=AUTH).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and "token_strs" not in tok
    strs = httpx.post(
        server + "/tokenize",
        json={"prompt": "Hello world", "return_token_strs": True},
        headers=AUTH,
    ).json()
    assert strs["tokens"] == tok["tokens"] and strs["token_strs"] == ["Hello", "Ġworld"]
    text = httpx.post(server + "/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH).json()
    assert text["prompt"] == "Hello world"
    chat = httpx.post(
        server + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=AUTH
    ).json()
    assert chat["count"] > 5
    bad = httpx.post(server + "/detokenize", json={"tokens": [10**9]}, headers=AUTH)
    assert bad.status_code == 400


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_and_tokens(server):
    before = httpx.get(server + "/metrics").text
    httpx.post(
        server + "/v1/completions",
        json={"model": "smol", "prompt": "One two three", "max_tokens": 5, "ignore_eos": True},
        headers=AUTH,
        timeout=60,
    )
    after = httpx.get(server + "/metrics").text
    for name in (
        "ember:num_requests_running",
        "ember:num_requests_waiting",
        "ember:kv_cache_usage_perc",
        "ember:prefix_cache_queries",
        "ember:prefix_cache_hits",
        "ember:time_to_first_token_seconds_bucket",
        "ember:time_per_output_token_seconds_bucket",
        "ember:e2e_request_latency_seconds_bucket",
        "ember:request_queue_time_seconds_bucket",
    ):
        assert name in after, name
    gen = "ember:generation_tokens_total"
    assert _metric(after, gen) - _metric(before, gen) == 5
    done = 'ember:request_success_total{finished_reason="length"'
    assert _metric(after, done) - _metric(before, done) == 1
    aborted = 'ember:request_success_total{finished_reason="abort"'
    assert _metric(after, aborted) == _metric(before, aborted)  # a finished one is no abort
    # Each series is there from the start, so an alert on its rate sees it before it moves.
    for series in (
        'ember:request_success_total{finished_reason="abort"',
        'ember:request_success_total{finished_reason="error"',
        'ember:num_requests_rejected_total{model_name="smol",reason="overloaded"}',
        'ember:num_requests_rejected_total{model_name="smol",reason="shutting_down"}',
    ):
        assert series in after, series
    assert "_created" not in after  # no timestamp gauge beside each counter and histogram


def _tiny_app(model_dir, **limits):
    """An in-process server of the tiny model, named "tiny", with these ServingLimits."""
    from ember.config import EngineConfig, ServingLimits
    from ember.server.app import build_app
    from ember.server.state import ServerConfig

    cfg = EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", kv_cache_memory="8MiB", block_size=4
    )
    config = ServerConfig(["tiny"], limits=ServingLimits(**limits))
    return build_app(cfg, config, load_in_background=False)


def test_prefix_cache_counters_start_at_the_first_request(tiny_llama):
    """The warm-up prefill before "ready" is no client's lookup: a fresh server's counters
    are 0, and one request's prompt adds its own tokens."""
    from fastapi.testclient import TestClient

    with TestClient(_tiny_app(tiny_llama)) as http:
        queries = "ember:prefix_cache_queries_total"
        assert _metric(http.get("/metrics").text, queries) == 0
        body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 1}
        assert http.post("/v1/completions", json=body).status_code == 200
        assert _metric(http.get("/metrics").text, queries) == 7


def test_a_request_timeout_counts_as_an_abort(tiny_llama):
    from fastapi.testclient import TestClient

    app = _tiny_app(tiny_llama, request_timeout=0.02)
    aborted = 'ember:request_success_total{finished_reason="abort"'
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True}
    with TestClient(app) as http:
        assert http.post("/v1/completions", json=body).status_code == 504
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"timeout"' in events[-2] and events[-1] == "data: [DONE]"
        text = http.get("/metrics").text
        assert _metric(text, aborted) == 2
        assert _metric(text, "ember:request_success_total") == 2  # nothing else


def test_client_disconnect_mid_stream_frees_the_request(server):
    aborted = 'ember:request_success_total{finished_reason="abort"'
    before = _metric(httpx.get(server + "/metrics").text, aborted)
    body = {
        "model": "smol",
        "prompt": "Tell me a very long story.",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.time() + 30
    while time.time() < deadline:
        m = httpx.get(server + "/metrics").text
        if (
            _metric(m, "ember:num_requests_running") == 0
            and _metric(m, "ember:kv_cache_usage_perc") == 0
        ):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request kept running")
    assert _metric(m, aborted) - before == 1  # counted, as vLLM counts an abort


def test_bad_request_does_not_disturb_others(server):
    import concurrent.futures as cf

    def good(i: int) -> int:
        r = httpx.post(
            server + "/v1/completions",
            json={"model": "smol", "prompt": f"Item {i}:", "max_tokens": 8, "ignore_eos": True},
            headers=AUTH,
            timeout=120,
        )
        return r.json()["usage"]["completion_tokens"]

    def bad() -> int:
        r = httpx.post(
            server + "/v1/completions",
            json={"model": "smol", "prompt": [10**8], "max_tokens": 8},
            headers=AUTH,
        )
        return r.status_code

    with cf.ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good, i) for i in range(4)]
        bads = [pool.submit(bad) for _ in range(2)]
        assert [f.result() for f in bads] == [400, 400]
        assert [f.result() for f in goods] == [8, 8, 8, 8]
    assert httpx.get(server + "/health").status_code == 200


def test_lone_surrogates_are_a_400_and_pairs_are_text(server):
    """JSON can escape half of a UTF-16 pair on its own ("\\ud800"); no tokenizer can read it,
    so it is the client's error, wherever it sits."""

    def post(path: str, raw: str) -> httpx.Response:
        headers = {**AUTH, "Content-Type": "application/json"}
        return httpx.post(server + path, content=raw.encode(), headers=headers, timeout=120)

    user = '{"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "%s"}]}'
    # Named by its field and the place in it (once: by its place in the templated prompt).
    for raw, param, where in (
        (user % "a\\ud800b", "messages.0.content", "at character 1"),
        ((user % "a\\udc00b")[:-1] + ', "stream": true}', "messages.0.content", "character 1"),
        (
            '{"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],'
            ' "tools": [{"type": "function", "function": {"name": "f", "description": "\\ud800"}}]}',
            "tools.0.function.description",
            "character 0",
        ),
        (  # a forced call's schema: checked before the grammar is built from it
            '{"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],'
            ' "tool_choice": {"type": "function", "function": {"name": "f"}},'
            ' "tools": [{"type": "function", "function": {"name": "f", "parameters":'
            ' {"type": "object", "properties": {"a": {"type": "string", "description": "x\\udc00"}}}}}]}',
            "tools.0.function.parameters.properties.a.description",
            "character 1",
        ),
    ):
        r = post("/v1/chat/completions", raw)
        assert r.status_code == 400, (raw, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_unicode" and "surrogate" in err["message"], err
        assert err["param"] == param and where in err["message"], err
    assert post("/tokenize", '{"model": "smol", "prompt": "\\ud800"}').status_code == 400
    r = post("/v1/completions", '{"model": "smol", "prompt": "a\\ud800", "max_tokens": 2}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    # An error that quotes the input still goes out (the surrogate as its escape).
    r = post("/v1/chat/completions", (user % "hi").replace('"smol"', '"\\ud800"'))
    assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", user % "smile \\ud83d\\ude00")
    assert r.status_code == 200, r.text
    assert httpx.get(server + "/health").status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/octet-stream",
        "*/*",
        "application/xml",
    ],
)
def test_a_json_body_is_read_whatever_its_label(server, content_type):
    """`curl -d '{...}'` labels its body a form: it is still read as JSON, as llama.cpp does
    (other labels once got "Input should be a valid dictionary")."""
    headers = {**AUTH, **({} if content_type is None else {"Content-Type": content_type})}
    body = b'{"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
    r = httpx.post(server + "/v1/chat/completions", content=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_an_empty_body_says_so(server):
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "The request body is empty: send a JSON object."


def test_optional_fields_sent_as_null_take_their_defaults(server):
    """Clients that write every field send null for the unset ones; OpenAI reads that as unset."""
    nulls = dict.fromkeys(
        ["n", "stream", "stream_options", "temperature", "top_p", "stop", "logprobs",
         "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user",
         "tools", "tool_choice", "response_format", "min_tokens", "ignore_eos", "echo"]
    )  # fmt: skip
    message = {"role": "user", "content": "Hi", "name": None, "tool_calls": None}
    body = {"model": "smol", "messages": [message], "max_tokens": 3, **nulls}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")  # stream: null is not a stream
    assert len(r.json()["choices"]) == 1  # n: null is one choice
    body = {"model": "smol", "prompt": "Hi", "max_tokens": 3, **nulls, "temperature": 0}
    r = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert not r.json()["choices"][0]["text"].startswith("Hi")  # echo: null does not echo
    r = httpx.post(server + "/v1/chat/completions", json={"messages": None}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_a_browser_form_post_is_not_read_as_json(server):
    """A page's form or text/plain POST skips CORS preflight; it gets no JSON reading."""
    body = b'{"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
    for label in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        headers = {**AUTH, "Content-Type": label, "Origin": "http://elsewhere.example"}
        r = httpx.post(server + "/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415, r.text
        assert "application/json" in r.json()["error"]["message"]
    headers = {**AUTH, "Content-Type": "application/json", "Origin": "http://elsewhere.example"}
    r = httpx.post(server + "/v1/chat/completions", content=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text


CONTINUED = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is"},
]


def test_continue_final_message_leaves_the_last_message_open(server):
    """As vLLM's field: the prompt ends inside the assistant's message, and the reply goes on
    from there (the prompt is the rendered conversation cut after that message's text)."""
    tok = httpx.post(
        server + "/tokenize",
        json={"messages": CONTINUED, "continue_final_message": True},
        headers=AUTH,
    ).json()["tokens"]
    text = httpx.post(server + "/detokenize", json={"tokens": tok}, headers=AUTH).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    closed = httpx.post(server + "/tokenize", json={"messages": CONTINUED}, headers=AUTH).json()
    assert closed["tokens"][: len(tok)] == tok and len(closed["tokens"]) > len(tok)

    body = {"model": "smol", "messages": CONTINUED, "max_tokens": 4, "temperature": 0}
    r = httpx.post(
        server + "/v1/chat/completions",
        json={**body, "continue_final_message": True, "add_generation_prompt": False},
        headers=AUTH,
    )
    assert r.status_code == 200
    reply = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in reply, reply
    assert r.json()["usage"]["prompt_tokens"] == len(tok)
    # Unset, add_generation_prompt counts as false; set true beside it, a 400 naming the field.
    same = httpx.post(
        server + "/v1/chat/completions", json={**body, "continue_final_message": True}, headers=AUTH
    )
    assert same.json()["choices"][0]["message"]["content"] == reply
    both = {**body, "continue_final_message": True, "add_generation_prompt": True}
    r = httpx.post(server + "/v1/chat/completions", json=both, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_echo_starts_the_reply_with_the_assistants_last_message(server):
    """vLLM's chat echo: with continue_final_message, the whole answer comes back."""
    body = {
        "model": "smol",
        "messages": CONTINUED,
        "max_tokens": 4,
        "temperature": 0,
        "continue_final_message": True,
        "echo": True,
    }
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH).json()
    whole = r["choices"][0]["message"]["content"]
    assert whole.startswith("The capital of France is") and "Paris" in whole, whole
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH
    ) as resp:
        chunks = [json.loads(e) for e in _events(resp)[:-1]]
    assert chunks[1]["choices"][0]["delta"]["content"] == "The capital of France is"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    # A last message from the user is not echoed.
    ask = {**body, "messages": CONTINUED[:1], "continue_final_message": False}
    r = httpx.post(server + "/v1/chat/completions", json=ask, headers=AUTH).json()
    assert not r["choices"][0]["message"]["content"].startswith("What is the capital")


@pytest.mark.parametrize("key", ["add_generation_prompt", "tools", "messages", "tokenize", "self"])
def test_chat_template_kwargs_cannot_set_the_renderers_own_arguments(server, key):
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "chat_template_kwargs": {key: False},
    }
    for route in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(server + route, json=body, headers=AUTH)
        assert r.status_code == 400, (route, r.text)
        assert r.json()["error"]["param"] == "chat_template_kwargs" and key in r.text
    body["chat_template_kwargs"] = {"enable_thinking": False}  # a template variable: fine
    assert httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    "message",
    [{"role": "user"}, {"role": "user", "content": None}, {"role": "system", "content": None}],
)
def test_a_user_or_system_message_without_content_is_a_400(server, message):
    """As OpenAI's API: only an assistant message with calls (or a tool result) may leave its
    content out; an empty user turn would otherwise generate from nothing."""
    messages = (
        [message] if message["role"] == "user" else [message, {"role": "user", "content": "Hi"}]
    )
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": "smol", "messages": messages, "max_tokens": 4},
        headers=AUTH,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages.0.content" and "needs content" in error["message"]


@pytest.mark.parametrize("call_id", [None, ""])
def test_a_tool_result_without_its_call_id_is_a_400(server, call_id):
    """As OpenAI's API: a tool message names the call it answers. The legacy `function` role
    (which names its function instead) is still taken."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = {"role": "tool", "content": "21C"}
    if call_id is not None:
        result["tool_call_id"] = call_id
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [call]}]
    body = {"model": "smol", "messages": [*history, result], "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.2.tool_call_id" and "tool_call_id" in error["message"]
    legacy = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "21C"},
    ]
    body["messages"] = legacy
    assert httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH).status_code == 200


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_tokenizing_a_huge_prompt_does_not_stall_the_server(server, route):
    """Megabytes of prompt take seconds to tokenize; that happens off the event loop, so
    health probes (and streams) are answered meanwhile, and the prompt then gets its 400."""
    import concurrent.futures as cf

    text = "hello world, " * 400_000  # 5.2 MB, about 1.2M tokens
    body = {"model": "smol", "max_tokens": 4}
    if route == "/v1/completions":
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]

    def huge() -> tuple[httpx.Response, float]:
        start = time.monotonic()
        r = httpx.post(server + route, json=body, headers=AUTH, timeout=120)
        return r, time.monotonic() - start

    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(huge)
        waits = []
        while not pending.done():
            start = time.monotonic()
            assert httpx.get(server + "/health", timeout=60).status_code == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.05)
        r, took = pending.result()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert took > 1.0, "too quick to tell; make the prompt longer"
    # Tokenized on the loop, a probe would wait for nearly all of it; a busy machine's own
    # stalls (0.64 s seen while another test suite ran) stay well under a third of it.
    assert max(waits) < max(0.5, took / 3), (max(waits), took)
