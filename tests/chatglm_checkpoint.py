"""Small random-weight ChatGLM3 checkpoints in the exact on-disk layout of THUDM/chatglm3-6b,
and the same weights as a transformers `GlmForCausalLM` to check them against.

The ChatGLM3 layout: `config.json` with the model's own keys (`num_layers`, `kv_channels`,
`multi_query_group_num`, `padded_vocab_size`, `seq_length`, ...), `architectures:
["ChatGLMModel"]`, fp16 tensors named `transformer.…` with fused `query_key_value` and
`dense_h_to_4h`, shipped as shards with an index (safetensors or PyTorch .bin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# THUDM/chatglm3-6b config.json, key for key.
CHATGLM3_6B_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/chatglm3-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.30.2",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# The -32k variant differs only in these (the RoPE base becomes 10000 * 50).
CHATGLM3_6B_32K_OVERRIDES: dict[str, Any] = {"seq_length": 32768, "rope_ratio": 50}

TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,  # head dim: 8 rotary dims, 8 that pass through
    "multi_query_group_num": 2,
    "ffn_hidden_size": 96,
    "padded_vocab_size": 384,  # the test tokenizer's vocabulary (checkpoints.TINY_VOCAB)
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    return {**CHATGLM3_6B_CONFIG, **TINY_SHAPES, **overrides}


def chatglm_tensors(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as in the real checkpoint, in its fp16."""
    gen = torch.Generator().manual_seed(seed)
    hidden, ffn = cfg["hidden_size"], cfg["ffn_hidden_size"]
    head_dim, heads = cfg["kv_channels"], cfg["num_attention_heads"]
    kv_heads = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    qkv_rows = (heads + 2 * kv_heads) * head_dim

    def rand(*shape: int) -> torch.Tensor:
        # Wide enough that greedy text varies, small enough that fp16 holds it exactly.
        return (torch.randn(*shape, generator=gen) * 0.08).half()

    def norm(n: int) -> torch.Tensor:
        # Not all ones, so a norm weight loaded into the wrong place shows.
        return (1 + 0.1 * torch.randn(n, generator=gen)).half()

    t: dict[str, torch.Tensor] = {
        "transformer.embedding.word_embeddings.weight": rand(cfg["padded_vocab_size"], hidden),
        # A buffer the real checkpoint carries; loaders skip it.
        "transformer.rotary_pos_emb.inv_freq": 1.0
        / (
            10000 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
        ).half(),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "self_attention.query_key_value.weight"] = rand(qkv_rows, hidden)
        t[p + "self_attention.query_key_value.bias"] = rand(qkv_rows)
        t[p + "self_attention.dense.weight"] = rand(hidden, heads * head_dim)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, hidden)
        t[p + "mlp.dense_4h_to_h.weight"] = rand(hidden, ffn)
    t["transformer.encoder.final_layernorm.weight"] = norm(hidden)
    t["transformer.output_layer.weight"] = rand(cfg["padded_vocab_size"], hidden)
    return t


def _shards(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(tensors)
    step = -(-len(names) // n)
    return [{k: tensors[k] for k in names[i : i + step]} for i in range(0, len(names), step)]


def write_chatglm_checkpoint(
    out: Path, fmt: str = "sharded", seed: int = 0, **config_overrides: Any
) -> Path:
    """fmt: "sharded" (safetensors shards + index, as chatglm3-6b ships), "safetensors" (one
    model.safetensors), "bin" (pytorch_model-0000N-of-0000M.bin shards + index)."""
    from safetensors.torch import save_file

    cfg = tiny_config(**config_overrides)
    tensors = chatglm_tensors(cfg, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if fmt == "safetensors":
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    if fmt not in ("sharded", "bin"):
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    shards = _shards(tensors, 3)
    stem, ext = ("model", "safetensors") if fmt == "sharded" else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        if fmt == "sharded":
            save_file(shard, str(out / fname), metadata={"format": "pt"})
        else:
            torch.save(shard, out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return out


def read_chatglm_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read without Ember's loader."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in sorted(model_dir.glob("*.bin")):
        tensors.update(torch.load(f, weights_only=True))
    return tensors


def glm_config(cfg: dict[str, Any]):
    """ChatGLM config keys → transformers GlmConfig, every field set (its defaults are
    GLM-4-9B's, not ChatGLM3's)."""
    from transformers import GlmConfig

    heads = cfg["num_attention_heads"]
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads,
        head_dim=cfg["kv_channels"],
        hidden_act="silu",
        attention_dropout=0.0,
        max_position_embeddings=cfg["seq_length"],
        initializer_range=0.02,
        rms_norm_eps=cfg["layernorm_epsilon"],
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * cfg.get("rope_ratio", 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=cfg["pad_token_id"],
        eos_token_id=cfg["eos_token_id"],
        bos_token_id=None,
        attention_bias=True,
    )


def glm_state_dict(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    """Rename (and split) ChatGLM tensors the way transformers' convert_glm_weights_to_hf does."""
    heads, head_dim = cfg["num_attention_heads"], cfg["kv_channels"]
    kv_heads = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    q, kv = heads * head_dim, kv_heads * head_dim
    renames = {
        "transformer.output_layer.": "lm_head.",
        "transformer.embedding.word_embeddings.": "model.embed_tokens.",
        "transformer.encoder.final_layernorm.": "model.norm.",
        "transformer.encoder.layers.": "model.layers.",
        ".self_attention.dense.": ".self_attn.o_proj.",
        ".mlp.dense_h_to_4h.": ".mlp.gate_up_proj.",
        ".mlp.dense_4h_to_h.": ".mlp.down_proj.",
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        if ".self_attention.query_key_value." in name:
            parts = t.split([q, kv, kv], dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out[name.replace(".self_attention.query_key_value.", f".self_attn.{proj}.")] = part
        else:
            out[name] = t
    return out


def glm_reference(model_dir: Path):
    """transformers' GlmForCausalLM, fp32, holding exactly the checkpoint's weights."""
    from transformers import GlmForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    model = GlmForCausalLM(glm_config(cfg)).float().eval()
    state = {k: v.float() for k, v in glm_state_dict(read_chatglm_tensors(model_dir), cfg).items()}
    model.load_state_dict(state, strict=True)  # every GLM parameter comes from the checkpoint
    # Generate past EOS without suppressing it, as the engine's ignore_eos does.
    model.generation_config.eos_token_id = None
    return model


def reference_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()
