"""The CPU's fused decode step (models/cpu_decode.py, native/decode_layers.c) against the
model's own layer-by-layer forward: the same kernels in the same order, so the same tokens and
the same logprobs, for Llama, Qwen2 (biases, tied output) and ChatGLM (half-dim GPT-J rotary,
QKV bias) at int8 and int4, alone and in batches that mix prefills with decodes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import ember
from ember.models.cpu_decode import CpuQuantDecoder
from ember.native import cpu_kernels

from chatglm_checkpoint import write_chatglm_checkpoint
from checkpoints import TINY_VOCAB, write_checkpoint, write_tokenizer

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="needs the C kernels")

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, TINY_VOCAB)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "chatglm"])
def checkpoint(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "chatglm":
        return write_chatglm_checkpoint(out, fmt="safetensors", seed=3)
    if request.param == "qwen2":
        return write_checkpoint(out, "qwen2", seed=5, tie_word_embeddings=True)
    return write_checkpoint(out, "llama", seed=4)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def _generate(llm: ember.LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = ember.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    out = []
    for r in llm.generate(prompts, params):
        o = r.outputs[0]
        out.append((o.token_ids, [lp.logprob for lp in o.logprobs]))
    return out


def _llm(checkpoint: Path, tokenizer_dir: Path, quantization: str) -> ember.LLM:
    mode, _, group = quantization.partition("-g")
    return ember.LLM(
        str(checkpoint),
        tokenizer=str(tokenizer_dir),
        quantization=mode,
        quantization_group_size=int(group or 32),
        block_size=4,
        max_num_batched_tokens=32,  # prefills are chunked and share steps with decodes
        kv_cache_memory="4MiB",
    )


@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g128"])
def test_fused_decode_equals_the_layer_by_layer_forward(
    checkpoint: Path, tokenizer_dir: Path, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two engines given the same requests in the same order, so their prefix caches agree.
    fused, layered = (_llm(checkpoint, tokenizer_dir, quantization) for _ in range(2))
    assert isinstance(fused.engine.runner.fused_decode, CpuQuantDecoder)
    layered.engine.runner.fused_decode = None
    calls = []
    real_call = CpuQuantDecoder.__call__

    def counting(self, input_ids, positions, meta):
        calls.append(len(input_ids))
        return real_call(self, input_ids, positions, meta)

    monkeypatch.setattr(CpuQuantDecoder, "__call__", counting)
    prompts = _prompts(7, seed=1)
    alone = _generate(fused, prompts[1:2])
    assert calls.count(1) >= NEW_TOKENS - 1  # the fused path ran, one sequence a step
    calls.clear()
    batched = _generate(fused, prompts)
    assert max(calls) > 1  # and several sequences a step
    assert alone == _generate(layered, prompts[1:2])
    assert batched == _generate(layered, prompts)


def test_float_weights_keep_the_model_forward(tokenizer_dir: Path, tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "m", "llama", seed=2)
    llm = ember.LLM(str(model), tokenizer=str(tokenizer_dir), quantization="none")
    assert llm.engine.runner.fused_decode is None


@pytest.mark.slow
def test_default_model_decodes_fused_at_its_gguf_precision() -> None:
    """The embedded default model (Q4_1 layers) takes the fused path, and its greedy tokens
    equal the layer-by-layer path's."""
    llm = ember.LLM(quantization="auto", kv_cache_memory="32MiB")
    runner = llm.engine.runner
    assert runner.fused_decode is not None
    params = ember.SamplingParams(temperature=0, max_tokens=16)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    fused = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    runner.fused_decode = None
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == fused
