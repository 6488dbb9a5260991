"""The tutorial's two models as their Hugging Face repositories lay them out, with tiny weights.

* `write_chatglm3_6b`: THUDM/chatglm3-6b. config.json with the model's own keys
  (`ChatGLMModel`, `auto_map`, `padded_vocab_size` above the tokenizer's ids), fp16 safetensors
  shards named `transformer.…` with their index, `tokenizer.model` (SentencePiece, byte
  fallback, dummy prefix) and the remote-code `tokenizer_config.json` with the Jinja
  chat_template it carries as of revision 103caa4. No generation_config.json: the stop ids come
  from the tokenizer alone.
* `write_llama2_7b_chat_hf`: meta-llama/Llama-2-7b-chat-hf. config.json (`LlamaForCausalLM`,
  vocab_size equal to the SentencePiece size, as 32000 is for the real one), fp16 weights in
  two shards with their index, `tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`
  (with Meta's chat_template), `special_tokens_map.json` and its generation_config.json.

File names, tensor names, config keys and dtypes are the real ones'; sizes are tiny and the
weights random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from chatglm_checkpoint import write_chatglm_checkpoint
from sp_models import (
    CHATGLM3_TOKENIZER_CONFIG,
    LLAMA2_HF_CHAT_TEMPLATE,
    train_sentencepiece,
    write_llama2_tokenizer,
)

# The chat_template in THUDM/chatglm3-6b's tokenizer_config.json (revision 103caa4). It renders
# role tags as text, which only works with special-token splitting; Ember builds ids instead.
CHATGLM3_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n"
    " {{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ChatGLM3's nine special tokens follow the SentencePiece pieces (64789 + 9 = 64798 for the
# real model), and the embedding has more rows than that (65024).
CHATGLM3_NUM_SPECIAL = 9

# meta-llama/Llama-2-7b-chat-hf config.json, key for key, with these shapes made tiny.
LLAMA2_7B_CHAT_CONFIG: dict[str, Any] = {
    "_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA2_TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,  # MHA, as Llama-2-7b
}

# Its generation_config.json: Meta's sampling defaults, which the server applies.
LLAMA2_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 1,
    "do_sample": True,
    "eos_token_id": 2,
    "max_length": 4096,
    "pad_token_id": 0,
    "temperature": 0.6,
    "top_p": 0.9,
}


def sentencepiece_size(model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def write_chatglm3_6b(out: Path, seed: int = 0) -> Path:
    """A THUDM/chatglm3-6b directory; its vocabulary is SP + 9 specials, padded to 64 rows."""
    model = train_sentencepiece("bpe", vocab_size=400)
    padded = -(-(sentencepiece_size(model) + CHATGLM3_NUM_SPECIAL) // 64) * 64
    write_chatglm_checkpoint(out, "sharded", seed=seed, padded_vocab_size=padded)
    (out / "tokenizer.model").write_bytes(model)
    config = dict(CHATGLM3_TOKENIZER_CONFIG, chat_template=CHATGLM3_HF_CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def _llama_tensors(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random fp16 weights with Llama's Hugging Face names and shapes."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * hidden // cfg["num_attention_heads"]

    def rand(*shape: int) -> torch.Tensor:
        # Wide enough that the text varies from step to step.
        return (torch.randn(*shape, generator=gen) * 0.08).half()

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=gen)).half()

    t = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rand(hidden, hidden)
        t[p + "self_attn.k_proj.weight"] = rand(kv, hidden)
        t[p + "self_attn.v_proj.weight"] = rand(kv, hidden)
        t[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        t[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        t[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
    t["model.norm.weight"] = norm(hidden)
    t["lm_head.weight"] = rand(vocab, hidden)
    return t


def write_llama2_7b_chat_hf(out: Path, seed: int = 0) -> Path:
    """A meta-llama/Llama-2-7b-chat-hf directory, its weights as the repository first shipped
    them: pytorch_model-0000N-of-00002.bin with pytorch_model.bin.index.json."""
    model = train_sentencepiece("bpe", vocab_size=400)
    cfg = {**LLAMA2_7B_CHAT_CONFIG, **LLAMA2_TINY_SHAPES, "vocab_size": sentencepiece_size(model)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(LLAMA2_GENERATION_CONFIG, indent=2))

    tensors = _llama_tensors(cfg, seed)
    names = list(tensors)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: tensors[k] for k in part}, out / fname)
        weight_map.update(dict.fromkeys(part, fname))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))

    write_llama2_tokenizer(out, model, chat_template=LLAMA2_HF_CHAT_TEMPLATE)
    _write_tokenizer_json(out)
    return out


def _write_tokenizer_json(out: Path) -> None:
    """tokenizer.json beside tokenizer.model, as the repository ships it: transformers'
    conversion of the same SentencePiece model (the other tokenizer files stay as written)."""
    import tempfile

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        (out / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
