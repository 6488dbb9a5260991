"""Tiny GGUF files written as llama.cpp writes them (its tensor names, its q/k row order, a
GPT-2 style tokenizer), from a transformers model with random float32 weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoints import _config, write_tokenizer

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def tiny_model(seed: int = 0, **config: Any):
    """A transformers Llama with random weights (norms near 1, so the layers all matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config("llama", **config), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model.eval()


def _llama_cpp_rows(n: int, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q and k (weights and biases): file row i
    holds Hugging Face row rows[i]."""
    return np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(n)


def write_gguf(
    path: Path,
    model,
    extra_kv: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip_kv: tuple[str, ...] = (),
) -> Path:
    """`model` as a llama-architecture GGUF file (all tensors float32)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    fields = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    for key, value in fields.items():
        if key not in skip_kv:
            w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32("llama.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    _add_tokenizer(w)
    for name, t in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        a = t.detach().float().numpy()
        if name in _TOP:
            gname = _TOP[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
        if ".q_proj." in name:
            a = a[_llama_cpp_rows(a.shape[0], cfg.num_attention_heads)]
        elif ".k_proj." in name:
            a = a[_llama_cpp_rows(a.shape[0], cfg.num_key_value_heads)]
        w.add_tensor(gname, np.ascontiguousarray(a))
    for gname, a in (extra_tensors or {}).items():
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(added)
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])
    merges = tj["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
