"""Small random-weight checkpoints, written in the exact on-disk format of the real ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 384

_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Ember serves open language models behind an OpenAI-compatible API.",
    "Continuous batching keeps the accelerator busy while requests come and go.",
    "你好，世界！这是一个测试。 Emoji: 🙂🚀✨",
    "def add(a, b):\n    return a + b\n",
] * 20


def write_tokenizer(out: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A byte-level BPE tokenizer trained here, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(str(out))


def _config(arch: str, **overrides: Any):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(**common)


def write_checkpoint(
    out: Path,
    arch: str = "llama",
    seed: int = 0,
    shard: bool = False,
    bin_format: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a transformers model with random weights (std large enough for varied text)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    out.mkdir(parents=True, exist_ok=True)
    if bin_format:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(out))
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        model.save_pretrained(str(out), max_shard_size="150KB" if shard else "10GB")
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(gen))
    write_tokenizer(out)
    return out


def reference_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """What transformers' own generate() produces, greedily, without stopping early."""
    from transformers import AutoModelForCausalLM

    model = _reference_model(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    del AutoModelForCausalLM
    return out[0, len(prompt_ids) :].tolist()


_MODELS: dict[str, Any] = {}


def _reference_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    key = str(model_dir)
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
        # Generate past EOS without suppressing it, as the engine's ignore_eos does.
        model.generation_config.eos_token_id = None
        _MODELS[key] = model
    return _MODELS[key]
