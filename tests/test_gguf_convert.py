"""GGUF files as llama.cpp writes them, read into the model transformers would build from the
same weights: RoPE scaling, q/k biases, end-of-turn stops, and files Ember must refuse."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import torch

import ember

from gguf_files import tiny_model, write_gguf


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))


def _ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 384) for _ in range(n - 1)]


def _max_logprob_gap(path, model, ids: list[int]) -> float:
    """Largest difference between Ember's prompt logprobs for the file and transformers'."""
    llm = ember.LLM(str(path), kv_cache_memory="16MiB")
    params = ember.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    (result,) = llm.generate([ids], params)
    got = torch.tensor([lp.logprob for lp in result.prompt_logprobs[1:]])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    want = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((got - want).abs().max())


def _llama3_factors(head_dim: int, base: float, scaling: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for a llama3 rope_scaling."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama_3_1_rope_scaling_comes_from_the_rope_freqs_tensor(tmp_path):
    """llama.cpp writes a Llama 3.1's RoPE scaling as per-frequency factors; Ember once
    dropped them (a warning in the log) and ran unscaled, far from the model's logits."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,  # tiny, so 120 positions go well past it
    }
    model = tiny_model(seed=2, rope_scaling=scaling)
    factors = _llama3_factors(16, 10000.0, scaling)
    path = write_gguf(tmp_path / "l31.gguf", model, extra_tensors={"rope_freqs.weight": factors})
    assert _max_logprob_gap(path, model, _ids(120)) < 1e-3


def test_linear_rope_scaling_is_read_and_yarn_is_refused(tmp_path):
    model = tiny_model(seed=3, rope_scaling={"rope_type": "linear", "factor": 4.0})
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    path = write_gguf(tmp_path / "linear.gguf", model, extra_kv=linear)
    assert _max_logprob_gap(path, model, _ids(120)) < 1e-3
    yarn = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    path = write_gguf(tmp_path / "yarn.gguf", model, extra_kv=yarn)
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        ember.LLM(str(path), kv_cache_memory="16MiB")


def test_q_and_k_biases_are_put_back_in_order_as_their_weights_are(tmp_path):
    """llama.cpp reorders the rows of q and k biases as it does their weights; only the
    weights were put back, so a llama GGUF with biases ran wrong."""
    model = tiny_model(seed=4, attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:  # GGUF has no o_proj bias, nor Ember's Llama
            layer.self_attn.o_proj.bias.zero_()
    state = model.state_dict()
    keep = {k: v for k, v in state.items() if not k.endswith("o_proj.bias")}
    model.state_dict = lambda: keep  # the file holds q/k/v biases only
    path = write_gguf(tmp_path / "bias.gguf", model)
    assert _max_logprob_gap(path, model, _ids(40)) < 1e-3


def test_end_of_turn_and_end_of_message_tokens_stop_as_eos_does(tmp_path):
    """Early Llama 3 Instruct GGUFs say eos <|end_of_text|> and eot <|eot_id|>: the chat
    template ends each turn with eot, so a reply ran on past it to max_tokens."""
    stops = {"tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.eom_token_id": 6}
    path = write_gguf(tmp_path / "eot.gguf", tiny_model(seed=5), extra_kv=stops)
    llm = ember.LLM(str(path), kv_cache_memory="16MiB")
    assert {2, 5, 6} <= llm.engine.eos_token_ids
    for token in (5, 6):
        params = ember.SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[token])
        out = llm.generate([[1, 50, 60]], params)[0].outputs[0]
        assert out.finish_reason == "stop" and out.token_ids == [token]


@pytest.mark.parametrize(
    "case, said",
    [
        ("unknown_tensor", "GGUF tensor blk.0.attn_q_norm.weight is not supported"),
        ("missing_field", "is not a GGUF file Ember can read"),
    ],
)
def test_a_gguf_file_ember_cannot_read_is_refused_in_one_line(tmp_path, case, said):
    """A part Ember's model does not have was left out with a warning (a wrong model); a
    missing field was a TypeError's traceback."""
    model = tiny_model(seed=6)
    if case == "unknown_tensor":
        norm = {"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)}
        path = write_gguf(tmp_path / "f.gguf", model, extra_tensors=norm)
    else:
        path = write_gguf(tmp_path / "f.gguf", model, skip_kv=("feed_forward_length",))
    with pytest.raises(ValueError, match=said):
        ember.LLM(str(path), kv_cache_memory="16MiB")


def test_two_processes_converting_one_file_never_delete_each_others_copy(tmp_path, monkeypatch):
    """The later of two conversions of one file deleted the copy the first was reading."""
    from ember.models import loader

    path = write_gguf(tmp_path / "m.gguf", tiny_model(seed=7))
    real = loader.convert_gguf

    def raced(src, tmp):  # another process finishes the same conversion meanwhile
        real(src, tmp)
        theirs = tmp.with_name(tmp.name.split(".tmp")[0])
        shutil.copytree(tmp, theirs)
        (theirs / "theirs").write_text("")

    monkeypatch.setattr(loader, "convert_gguf", raced)
    out = loader.converted_gguf_dir(path)
    assert (out / "theirs").exists()  # the first copy stayed, and in use
    assert [p.name for p in out.parent.iterdir() if ".tmp" in p.name] == []


# Spaces and newlines before digits, numbered lists, aligned columns: where a split that does
# not put digits first gives ids the model never saw in training.
TOKENIZER_TEXTS = [
    "  42",
    "\n  1. item",
    "a \n1",
    "price:   5",
    "| 1 |  22 |",
    "x=1234567890;",
    "v1.2.3 and 3.14159",
    "١٢٣ ½ Ⅻ",
    "Hello world, it's  two  spaces\tand\ttabs",
    "naïve café 你好，世界！ 🙂",
    "    def f():\n        return 10",
]


@pytest.mark.slow
def test_the_default_models_tokenizer_splits_digits_first_as_its_own_does():
    """SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split every digit off
    before the byte-level split; transformers' GGUF reader wrote a plain byte-level one. The
    reference is built here from the file's own vocabulary and merges with that pipeline."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ember.chat.tokenizer import Tokenizer as EmberTokenizer
    from ember.models.loader import converted_gguf_dir, default_model_path

    path = default_model_path()
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    reference = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    ember_tok = EmberTokenizer.from_dir(converted_gguf_dir(path))
    for text in TOKENIZER_TEXTS:
        want = reference.encode(text, add_special_tokens=False).ids
        assert ember_tok.encode(text, add_special_tokens=False) == want, text
        assert ember_tok.decode(want) == text
    assert ember_tok.encode("  42", add_special_tokens=False) == [256, 36, 34]  # "ĠĠ" "4" "2"


def test_a_conversion_no_load_will_use_again_is_removed(tmp_path):
    """Each conversion is a full float copy of the model: one made before the file changed,
    or of a file that is gone, is deleted when a new one is made; another file's stays."""
    import os

    from ember.models import loader

    path = write_gguf(tmp_path / "m.gguf", tiny_model(seed=2))
    first = loader.converted_gguf_dir(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept = loader.converted_gguf_dir(shutil.copy(path, elsewhere / "m.gguf"))
    (tmp_path / "gone").mkdir()
    gone = loader.converted_gguf_dir(shutil.copy(path, tmp_path / "gone" / "m.gguf"))
    (tmp_path / "gone" / "m.gguf").unlink()
    assert len({first, kept, gone}) == 3
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    second = loader.converted_gguf_dir(path)
    assert second != first and (second / "config.json").exists()
    assert not first.exists() and not gone.exists()
    assert not first.with_name(first.name + ".index.json").exists()
    assert (kept / "config.json").exists()  # a file that is still there keeps its copy
    llm = ember.LLM(str(path), dtype="float32", kv_cache_memory="4MiB")
    assert llm.generate([[1, 2, 3]], ember.SamplingParams(max_tokens=2))[0].outputs[0].token_ids
