"""A request's greedy reply does not depend on what else the engine is doing.

The default model runs 8-bit quantized weights against 8-bit quantized activations, where a
change in the last bit of one attention output can move an activation across a rounding step
and change a token a few layers on. So the CPU attention kernel computes each token the same
way whether it is a decode, part of a prefill, a prompt's last token after a prefix-cache hit,
or one of many sequences in a step. These tests hold the engine to that, bit for bit: the
same tokens and the same logprobs alone, beside other requests (whose prefill chunks share
its steps), after a prefix-cache hit, and as scored by `prompt_logprobs`.
"""

from __future__ import annotations

import pytest

import ember
from ember.native import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs the C kernels")

PROMPTS = [
    "Item 4: the blue tree is",
    "The history of the Roman empire",
    "Once upon a time",
    "def fibonacci(n):",
]
NEW_TOKENS = 12


def greedy(max_tokens: int = NEW_TOKENS) -> ember.SamplingParams:
    return ember.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)


def reply(result) -> tuple[list[int], list[float]]:
    out = result.outputs[0]
    return list(out.token_ids), [lp.logprob for lp in out.logprobs]


def engine(prefix_caching: bool) -> ember.LLM:
    # A small token budget makes a long prompt's prefill run in chunks beside other decodes.
    return ember.LLM(
        enable_prefix_caching=prefix_caching, max_num_batched_tokens=64, kv_cache_memory="64MiB"
    )


@pytest.fixture(scope="module")
def llm() -> ember.LLM:
    return engine(prefix_caching=False)


@pytest.fixture(scope="module")
def cached() -> ember.LLM:
    return engine(prefix_caching=True)


@pytest.fixture(scope="module")
def alone(llm) -> dict[str, tuple[list[int], list[float]]]:
    return {p: reply(llm.generate([p], greedy())[0]) for p in PROMPTS}


def test_the_default_model_runs_on_the_cpu_attention_kernel(llm) -> None:
    assert llm.engine.runner.backend.name == "cpu"


def test_a_reply_is_the_same_beside_other_requests(llm, alone) -> None:
    long_prompt = "alpha beta gamma delta epsilon zeta eta theta " * 40  # ~320 tokens, 5 chunks
    for p in PROMPTS:  # its prefill in one step with a chunk of the long one, then its decodes
        assert reply(llm.generate([p, long_prompt], greedy())[0]) == alone[p], p
    # All at once: a burst of short prefills, then decodes beside the long prompt's chunks.
    results = llm.generate([*PROMPTS, long_prompt, "Write a poem."], greedy())
    for p, r in zip(PROMPTS, results):
        assert reply(r) == alone[p], p


def test_a_reply_is_the_same_after_a_prefix_cache_hit(cached, alone) -> None:
    for p in PROMPTS:
        first = reply(cached.generate([p], greedy())[0])
        again = reply(cached.generate([p], greedy())[0])  # all but its last block cached
        assert first == again == alone[p], p
    # A prompt one token past a block boundary: the hit leaves a single token to compute,
    # which runs as a decode would.
    block = cached.engine.runner.block_size
    ids = cached.tokenizer.encode("A long walk through the quiet forest at dawn, " * 4)
    ids = ids[: 3 * block + 1]
    first = reply(cached.generate([ids], greedy())[0])
    assert reply(cached.generate([ids], greedy())[0]) == first
    hits = cached.engine.stats().prefix_cache_hits
    assert hits >= 3 * block, hits


def test_generated_logprobs_equal_the_same_text_scored_as_a_prompt(llm, alone) -> None:
    for p in PROMPTS:
        tokens, logprobs = alone[p]
        prompt_ids = llm.generate([p], greedy(1))[0].prompt_token_ids
        scored = llm.generate(
            [prompt_ids + tokens],
            ember.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
        )[0]
        assert [lp.logprob for lp in scored.prompt_logprobs[-len(tokens) :]] == logprobs, p


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_n_greedy_samples_of_a_prompt_are_identical(
    prefix_caching: bool, llm, cached, alone
) -> None:
    params = ember.SamplingParams(
        temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, n=3
    )
    # The samples share the prompt's cached blocks, so all but the first begin after a hit.
    prompt = "Q: Name three colours of the rainbow and say why the sky is blue.\nA:"
    want = reply(llm.generate([prompt], greedy())[0])
    result = (cached if prefix_caching else llm).generate([prompt], params)[0]
    replies = [(list(o.token_ids), [lp.logprob for lp in o.logprobs]) for o in result.outputs]
    assert replies == [want] * 3
