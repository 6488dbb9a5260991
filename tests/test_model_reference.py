"""Greedy output equals transformers' generate(), token for token, for each architecture."""

from __future__ import annotations

import random

import pytest

import ember

from checkpoints import TINY_VOCAB, reference_greedy, write_checkpoint

NEW_TOKENS = 12


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(n)]


VARIANTS = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "mistral": dict(arch="mistral"),
    "llama3-rope-scaling": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-sharded": dict(arch="llama", shard=True),
    "llama-bin": dict(arch="llama", bin_format=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    kw = dict(VARIANTS[request.param])
    return write_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **kw)


def test_greedy_matches_transformers_alone_and_in_a_batch(checkpoint):
    llm = ember.LLM(str(checkpoint), dtype="float32", block_size=8, max_num_batched_tokens=64)
    prompts = _prompts(16, seed=3)
    params = ember.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [reference_greedy(checkpoint, p, NEW_TOKENS) for p in prompts]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:3]]
    assert alone == expected[:3]
    # All 16 at once, with a small token budget so prefills are chunked and mixed with decodes.
    batched = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert batched == expected


def test_sharded_and_bin_checkpoints_are_really_in_those_formats(tmp_path):
    sharded = write_checkpoint(tmp_path / "s", "llama", shard=True)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    binary = write_checkpoint(tmp_path / "b", "llama", bin_format=True)
    assert (binary / "pytorch_model.bin").exists() and not list(binary.glob("*.safetensors"))


def test_a_sliding_window_bounds_the_context(tmp_path):
    """Attention here sees the whole context, which matches the model only within its window:
    a Mistral window caps max_model_len (a longer prompt is refused, not answered wrongly);
    Qwen2's window is off unless use_sliding_window says so."""
    from ember.engine.core import PromptError

    mistral = write_checkpoint(tmp_path / "m", arch="mistral", sliding_window=24)
    llm = ember.LLM(str(mistral), dtype="float32", block_size=8, max_model_len=100)
    assert llm.engine.max_model_len == 24
    params = ember.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (prompt,) = _prompts(1, seed=5)
    prompt = prompt[:18]
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == reference_greedy(
        mistral, prompt, 6
    )
    # Generation stops at the window; a prompt past it is refused.
    (out,) = llm.generate([prompt], ember.SamplingParams(max_tokens=20, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 24 - len(prompt)
    with pytest.raises(PromptError):
        llm.generate([list(range(3, 28))], params)
    del llm
    qwen = write_checkpoint(tmp_path / "q", arch="qwen2", sliding_window=24)
    assert ember.LLM(str(qwen), dtype="float32", block_size=8).engine.max_model_len == 512
