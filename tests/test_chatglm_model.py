"""ChatGLM3 checkpoints in their own on-disk layout run exactly like transformers' GlmForCausalLM
(the same math: fused QKV with bias, grouped KV heads, half-dim GPT-J rotary, SwiGLU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import ember
from ember.config import EngineConfig
from ember.engine.attention import SeqSpan
from ember.engine.runner import ModelRunner
from ember.models import loader
from ember.models.chatglm import ChatGLMForCausalLM
from ember.models.registry import model_class

from chatglm_checkpoint import (
    CHATGLM3_6B_32K_OVERRIDES,
    CHATGLM3_6B_CONFIG,
    glm_reference,
    reference_greedy,
    tiny_config,
    write_chatglm_checkpoint,
)
from checkpoints import TINY_VOCAB, write_tokenizer

NEW_TOKENS = 10
BLOCK = 8

VARIANTS = {
    # Sharded safetensors with an index, as THUDM/chatglm3-6b ships.
    "chatglm3": dict(fmt="sharded"),
    "single-safetensors": dict(fmt="safetensors"),
    "bin-shards": dict(fmt="bin"),
    # -32k style base (10000 * 50), with a head dim that is not hidden / heads, no MQA groups.
    "rope-ratio-50": dict(
        fmt="safetensors", rope_ratio=50, kv_channels=32, multi_query_attention=False
    ),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    # ChatGLM3's own tokenizer is SentencePiece; the model tests only need ids, so any
    # tokenizer with the right vocabulary size drives the engine.
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, TINY_VOCAB)
    return out


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory) -> Path:
    return write_chatglm_checkpoint(
        tmp_path_factory.mktemp(request.param), seed=11, **VARIANTS[request.param]
    )


def _runner(model_dir: Path) -> ModelRunner:
    cfg = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        block_size=BLOCK,
        kv_cache_memory="2MiB",
    )
    return ModelRunner(cfg, model_dir, loader.load_config(model_dir))


def _engine_logits(runner: ModelRunner, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every prompt position, prefilled in `chunks` steps through the paged cache."""
    blocks = list(range(-(-len(ids) // BLOCK)))
    rows, done = [], 0
    for n in chunks:
        span = SeqSpan(0, n, done + n, blocks)
        meta = runner.backend.build_metadata([span], 0, runner.kv_caches, runner.device)
        with torch.inference_mode():
            hidden = runner.model(
                torch.tensor(ids[done : done + n]), torch.arange(done, done + n), meta
            )
            rows.append(runner.model.compute_logits(hidden))
        done += n
    assert done == len(ids)
    return torch.cat(rows)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def test_logits_match_transformers_glm(checkpoint):
    ids = _prompts(1, seed=5)[0] + _prompts(1, seed=6)[0] + [7] * 9
    runner = _runner(checkpoint)
    with torch.no_grad():
        expected = glm_reference(checkpoint)(torch.tensor([ids])).logits[0]
    whole = _engine_logits(runner, ids, [len(ids)])
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)
    # The same prompt in three chunks, later ones attending over the cached prefix.
    a, b = 5, 13
    chunked = _engine_logits(runner, ids, [a, b, len(ids) - a - b])
    torch.testing.assert_close(chunked, expected, rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_alone_and_in_a_chunked_batch(checkpoint, tokenizer_dir):
    llm = ember.LLM(
        str(checkpoint),
        tokenizer=str(tokenizer_dir),
        dtype="float32",
        device="cpu",
        block_size=BLOCK,
        max_num_batched_tokens=32,
        kv_cache_memory="8MiB",
    )
    reference = glm_reference(checkpoint)
    prompts = _prompts(8, seed=3)
    params = ember.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in prompts]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:2]]
    assert alone == expected[:2]
    # All at once, with a 32-token step budget: prefills are chunked and mixed with decodes.
    batched = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert batched == expected


def test_rope_ratio_changes_the_model(tmp_path):
    # Same weights; only the config's rope_ratio differs.
    plain = _runner(write_chatglm_checkpoint(tmp_path / "plain", "safetensors", seed=2))
    scaled_dir = write_chatglm_checkpoint(tmp_path / "x50", "safetensors", seed=2, rope_ratio=50)
    scaled = _runner(scaled_dir)
    assert plain.model.rotary._spec[1] == 10000.0
    assert scaled.model.rotary._spec[1] == 500000.0
    ids = _prompts(1, seed=9)[0] + [5] * 30
    diff = (_engine_logits(plain, ids, [len(ids)]) - _engine_logits(scaled, ids, [len(ids)])).abs()
    assert diff[0].max() < 1e-5  # position 0 does not rotate
    assert diff[1:].max(dim=-1).values.min() > 1e-3  # every later position does


def test_loading_checks_names_and_shapes(tmp_path):
    ckpt = write_chatglm_checkpoint(tmp_path / "m", "safetensors", seed=1)
    cfg = loader.load_config(ckpt)
    model = ChatGLMForCausalLM(cfg, backend=None)
    loaded = model.load_weights(loader.iter_weights(ckpt))
    assert loaded == {n for n, _ in model.named_parameters()}
    with pytest.raises(KeyError, match="unexpected weight"):
        model.load_weights([("transformer.prefix_encoder.embedding.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        name = "transformer.encoder.layers.0.self_attention.query_key_value.bias"
        model.load_weights([(name, torch.zeros(1))])
    # A checkpoint short of a tensor fails at start-up, not with garbage output.
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="checkpoint lacks weights"):
        _runner(ckpt)


@pytest.mark.parametrize(
    "bad", [{"rmsnorm": False}, {"apply_residual_connection_post_layernorm": True}]
)
def test_unsupported_variants_are_refused(bad):
    with pytest.raises(ValueError, match="not supported"):
        ChatGLMForCausalLM(tiny_config(**bad), backend=None)


def test_full_size_chatglm3_6b_shapes():
    """The real config gives the real checkpoint's tensors (FACTS.md), 6.24B parameters."""
    assert model_class(CHATGLM3_6B_CONFIG) is ChatGLMForCausalLM
    for arch in ("ChatGLMModel", "ChatGLMForConditionalGeneration"):
        assert model_class({"architectures": [arch]}) is ChatGLMForCausalLM
    with torch.device("meta"):
        model = ChatGLMForCausalLM(CHATGLM3_6B_CONFIG, backend=None)
    assert model.attention_shape == (28, 32, 2, 128)
    assert model.max_model_len == 8192
    assert model.args.vocab_size == 65024 and model.args.tie_word_embeddings is False
    assert (model.rotary.rotary_dim, model.rotary.neox_style) == (64, False)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layer = "transformer.encoder.layers.27."
    assert shapes["transformer.embedding.word_embeddings.weight"] == (65024, 4096)
    assert shapes[layer + "input_layernorm.weight"] == (4096,)
    assert shapes[layer + "self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes[layer + "self_attention.query_key_value.bias"] == (4608,)
    assert shapes[layer + "self_attention.dense.weight"] == (4096, 4096)
    assert layer + "self_attention.dense.bias" not in shapes
    assert shapes[layer + "post_attention_layernorm.weight"] == (4096,)
    assert shapes[layer + "mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes[layer + "mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.encoder.final_layernorm.weight"] == (4096,)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)
    assert len(shapes) == 3 + 28 * 7
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000

    with torch.device("meta"):
        long = ChatGLMForCausalLM({**CHATGLM3_6B_CONFIG, **CHATGLM3_6B_32K_OVERRIDES}, None)
    assert long.max_model_len == 32768
    assert long.args.rope_theta == 500000.0


@pytest.mark.parametrize("seq_length", [8192, 32768])
def test_dummy_weights_and_max_model_len(tmp_path, tokenizer_dir, seq_length):
    # A config alone, no weight files: --load-format dummy runs it.
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(seq_length=seq_length)))
    llm = ember.LLM(str(tmp_path), tokenizer=str(tokenizer_dir), load_format="dummy", device="cpu")
    assert llm.engine.max_model_len == seq_length
    params = ember.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert len(out) == 4 and all(0 <= t < TINY_VOCAB for t in out)
