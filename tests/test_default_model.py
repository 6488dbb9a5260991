"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers."""

from __future__ import annotations

import pytest
import torch

import ember
from ember.models.loader import default_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a short tip for learning to code.",
    "What is 12 times 7?",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def reference():
    """transformers reading the same GGUF file on its own (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # Generate past EOS without suppressing it, as the engine's ignore_eos does.
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def llm():
    # Full precision: this checks the model's math against transformers' float32 reading of
    # the same file (the quantized default is checked against it in test_quant.py).
    return ember.LLM(dtype="float32", quantization="none")


def _chat_ids(llm, prompt: str) -> list[int]:
    text = llm.chat_formatter.render([{"role": "user", "content": prompt}])
    return llm.tokenizer.encode(text, add_special_tokens=False)


def _reference_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),  # pad id 2 is also <|im_end|>
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=2,
        )
    return out[0, len(ids) :].tolist()


def test_default_model_greedy_matches_transformers(llm, reference):
    params = ember.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [_chat_ids(llm, p) for p in PROMPTS]
    expected = [_reference_greedy(reference, ids) for ids in prompts]
    for ids, want in zip(prompts[:3], expected[:3]):
        assert llm.generate([ids], params)[0].outputs[0].token_ids == want
    # A batch of 16 requests of mixed lengths: the 8 chat prompts plus raw-text continuations.
    raw = [llm.tokenizer.encode("Once upon a time " * k) for k in range(1, 9)]
    expected += [_reference_greedy(reference, ids) for ids in raw]
    batch = prompts + raw
    got = [r.outputs[0].token_ids for r in llm.generate(batch, params)]
    assert got == expected


def test_default_model_answers_a_chat_question(llm):
    params = ember.SamplingParams(temperature=0, max_tokens=20)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_offline_chat_continues_a_begun_answer(llm):
    """LLM.chat(continue_final_message=True): the prompt ends inside the assistant's message."""
    params = ember.SamplingParams(temperature=0, max_tokens=6)
    begun = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    out = llm.chat(begun, params, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt.endswith("assistant\nThe capital of France is")
    assert "Paris" in out.outputs[0].text
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(begun, params, continue_final_message=True)


def test_greedy_matches_transformers_on_a_prompt_of_thousands_of_tokens(llm, reference):
    """Chunked prefill over many steps, hundreds of KV blocks, positions deep into RoPE."""
    words = [
        "the",
        "river",
        "carries",
        "stones",
        "from",
        "the",
        "mountains",
        "down",
        "to",
        "the",
        "quiet",
        "sea",
        "and",
    ]
    text = " ".join(words[i % len(words)] + (f" {i}" if i % 7 == 0 else "") for i in range(2200))
    ids = llm.tokenizer.encode(text)
    assert len(ids) > 2500
    params = ember.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = llm.generate([ids], params)[0].outputs[0].token_ids
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=2,
        )
    assert got == out[0, len(ids) :].tolist()


@pytest.mark.parametrize("size", [3_000_000, 50_000_000])  # cut in the header; in the weights
def test_a_cut_gguf_file_is_named_as_such_and_leaves_nothing_in_the_cache(
    tmp_path, monkeypatch, size
):
    """A download that stopped midway: the error says so (gguf's own is numpy's, about
    reshaping an array), and the conversion leaves no half-written directory behind."""
    from ember.models.loader import converted_gguf_dir

    cut = tmp_path / "model.gguf"
    with open(default_model_path(), "rb") as f:
        cut.write_bytes(f.read(size))
    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(cache))
    with pytest.raises(ValueError, match="cannot be read as a GGUF file.*fetch it again"):
        converted_gguf_dir(cut)
    assert not list((cache / "gguf").iterdir())
