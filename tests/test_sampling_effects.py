"""Sampling fields through a real server do what they say, checked against the model's own
(raw) logprobs, and each check is one that the field switched off would fail."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from conftest import API_KEY

pytestmark = pytest.mark.slow

MODEL = "smol"
PROMPT = "My favourite animal is the"
SEEDS = range(4)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


def _sample(client, k: int = 5, **kw):
    """A completion of PROMPT with logprobs k; Ember's own fields go in the extra body."""
    extra = {"ignore_eos": True}
    for key in ("top_k", "min_p", "min_tokens", "stop_token_ids", "ignore_eos"):
        if key in kw:
            extra[key] = kw.pop(key)
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "logprobs": k, **kw}
    return client.completions.create(**args, extra_body=extra).choices[0]


def test_best_of_keeps_the_best_scoring_sample(client):
    kw = dict(model=MODEL, prompt="The weather today is", max_tokens=5, temperature=1.0)
    singles = [
        client.completions.create(**kw, seed=10 + i, logprobs=0).choices[0] for i in range(4)
    ]
    scores = [sum(c.logprobs.token_logprobs) for c in singles]
    assert len({c.text for c in singles}) > 1  # the samples differ, so picking matters
    r = client.completions.create(**kw, seed=10, best_of=4, n=2, logprobs=0)
    ranked = sorted(range(4), key=lambda i: scores[i], reverse=True)
    assert [c.text for c in r.choices] == [singles[i].text for i in ranked[:2]]
    got = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert got == pytest.approx([scores[i] for i in ranked[:2]], abs=1e-4)


def test_top_k_samples_only_among_the_k_most_likely(client):
    def outside_top3(**kw) -> int:
        n = 0
        for seed in SEEDS:
            c = _sample(client, k=3, temperature=2.0, seed=seed, **kw)
            # A sampled token outside the top 3 comes as a 4th entry (OpenAI's legacy rule).
            n += sum(len(top) > 3 for top in c.logprobs.top_logprobs)
        return n

    assert outside_top3() > 0  # hot sampling strays beyond the top 3 ...
    assert outside_top3(top_k=3) == 0  # ... unless top_k holds it there
    greedy = _sample(client, temperature=0).text
    assert all(_sample(client, temperature=2.0, seed=s, top_k=1).text == greedy for s in SEEDS)


def test_min_p_drops_tokens_below_its_share_of_the_top_token(client):
    temperature, min_p = 1.5, 0.3
    floor = temperature * math.log(min_p)  # p_T(tok) / p_T(top) >= min_p, in raw logprobs

    def below(**kw) -> int:
        n = 0
        for seed in SEEDS:
            c = _sample(client, k=1, temperature=temperature, seed=seed, **kw)
            for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
                n += lp - max(top.values()) < floor - 1e-4
        return n

    assert below() > 0
    assert below(min_p=min_p) == 0


def test_min_tokens_holds_back_the_stop_token(client, server):
    first = _sample(client, k=0, temperature=0, max_tokens=1)
    body = {"prompt": first.text, "add_special_tokens": False}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    stop_id = httpx.post(server + "/tokenize", json=body, headers=headers).json()["tokens"][0]
    stopped = _sample(client, k=0, temperature=0, stop_token_ids=[stop_id], ignore_eos=False)
    assert stopped.finish_reason == "stop" and stopped.text == ""
    held = _sample(
        client, k=0, temperature=0, stop_token_ids=[stop_id], min_tokens=3, ignore_eos=False
    )
    assert len(held.logprobs.tokens) >= 3 and first.text not in held.logprobs.tokens[:3]


def test_repetition_penalty_steers_away_from_tokens_already_seen(client):
    prompt = "one two three one two three one two three one two three one two"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=0)
    plain = client.completions.create(**kw).choices[0].logprobs
    penalised = client.completions.create(**kw, extra_body={"repetition_penalty": 3.0})
    lp = penalised.choices[0].logprobs
    n_prompt = len(plain.tokens) - 8
    seen = set(plain.tokens[:n_prompt])

    def repeats(tokens: list[str]) -> int:
        return sum(t in seen for t in tokens)

    assert repeats(plain.tokens[n_prompt:]) >= 6  # the pattern goes on without a penalty
    assert repeats(lp.tokens[n_prompt:]) < repeats(plain.tokens[n_prompt:]) - 3
