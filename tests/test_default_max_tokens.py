"""--default-max-tokens: the output bound of every request that sets none, on every endpoint."""

from __future__ import annotations

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from ember.config import EngineConfig
from ember.server.app import build_app
from ember.server.state import ServerConfig


@pytest.fixture(scope="module")
def client(tiny_llama):
    threads = torch.get_num_threads()
    cfg = EngineConfig(
        model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="8MiB", block_size=4
    )
    app = build_app(cfg, ServerConfig(["tiny"], default_max_tokens=3), load_in_background=False)
    with TestClient(app) as http:
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
    torch.set_num_threads(threads)


def test_requests_without_max_tokens_get_the_servers_default(client):
    never_stop = {"ignore_eos": True}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body=never_stop
    )
    # Completions once kept OpenAI's fixed 16 whatever the server said.
    text = client.completions.create(model="tiny", prompt="hi", extra_body=never_stop)
    reply = client.responses.create(model="tiny", input="hi")
    assert chat.usage.completion_tokens == text.usage.completion_tokens == 3
    assert reply.usage.output_tokens <= 3
    given = client.completions.create(
        model="tiny", prompt="hi", max_tokens=5, extra_body=never_stop
    )
    assert given.usage.completion_tokens == 5
