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
