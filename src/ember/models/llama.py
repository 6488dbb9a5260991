"""Llama family: Llama, Llama-2, Llama-3 (RoPE scaling), Mistral, Qwen2 (QKV bias), SmolLM2.

Takes a flat batch of tokens (all sequences of a step, concatenated) plus attention metadata;
the KV cache lives in the metadata, never in the model. Q/K/V and gate/up are fused into one
matmul each; `load_weights` maps Hugging Face tensor names onto the fused parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.engine.attention import AttentionBackend, AttentionMetadata
from ember.models.cpu_decode import DecoderParts, LayerParts
from ember.models.layers import (
    FusedQKVAttention,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    load_into,
    silu_and_mul,
    weight_targets,
)


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    # Llama's `attention_bias` puts a bias on o_proj too (Qwen2's q/k/v biases have none);
    # `mlp_bias` on gate, up and down.
    o_proj_bias: bool = False
    mlp_bias: bool = False
    # Tokens each position attends back over (Mistral-7B-v0.1: 4096), or None: all of them.
    sliding_window: int | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> LlamaArgs:
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or None
        params = cfg.get("rope_parameters") or {}  # newer transformers write RoPE here
        if rope is None and params.get("rope_type", "default") != "default":
            rope = params
        if cfg.get("rope_freq_factors"):  # from a GGUF's rope_freqs (see loader.convert_gguf)
            rope = {"rope_type": "freq_factors", "factors": cfg["rope_freq_factors"]}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", params.get("rope_theta", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 has biases on q/k/v; Llama may say so with `attention_bias`.
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            o_proj_bias=cfg.get(
                "o_proj_bias", bool(cfg.get("attention_bias")) and cfg.get("model_type") == "llama"
            ),
            mlp_bias=bool(cfg.get("mlp_bias")),
            sliding_window=_sliding_window(cfg),
        )


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window the config applies, if any. Qwen2 configs carry a window that
    `use_sliding_window: false` turns off; windows at least as long as the model's context
    change nothing."""
    window = cfg.get("sliding_window")
    applied = cfg.get("use_sliding_window", cfg.get("model_type") != "qwen2")
    if not isinstance(window, int) or window <= 0 or not applied:
        return None
    if window >= cfg.get("max_position_embeddings", 4096):
        return None
    return window


class LlamaAttention(FusedQKVAttention):
    def __init__(self, args: LlamaArgs, layer: int, backend: AttentionBackend) -> None:
        super().__init__(args.num_heads, args.num_kv_heads, args.head_dim, layer, backend)
        self.qkv_proj = Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias
        )
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=args.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), cos_sin, rotary, meta))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer, backend)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, residual, cos_sin, rotary, meta):
        """Returns (this layer's MLP output, the residual stream before it is added): the
        add happens in the next norm, fused with it on the GPU."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos_sin, rotary, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, i, backend) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # q/k/v and gate/up arrive as separate tensors and land in one fused parameter each.
    stacked = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.args = args = LlamaArgs.from_config(config)
        self.model = LlamaModel(args, backend)
        self.rotary = RotaryEmbedding(
            args.head_dim,
            args.head_dim,
            args.max_position_embeddings,
            args.rope_theta,
            args.rope_scaling,
            neox_style=True,
        )
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attention_shape(self) -> tuple[int, int, int, int]:
        a = self.args
        return a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings

    @property
    def sliding_window(self) -> int | None:
        return self.args.sliding_window

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos_sin, self.rotary, meta)
        return self.model.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def decoder_parts(self) -> DecoderParts:
        """The layers by role, for the CPU's fused decode step (models/cpu_decode.py)."""
        a = self.args
        layers = [
            LayerParts(
                layer.input_layernorm,
                layer.self_attn.qkv_proj,
                layer.self_attn.o_proj,
                layer.post_attention_layernorm,
                layer.mlp.gate_up_proj,
                layer.mlp.down_proj,
            )
            for layer in self.model.layers
        ]
        return DecoderParts(
            self.model.embed_tokens,
            layers,
            self.model.norm,
            self.rotary,
            a.hidden_size,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters (or quantized layers); returns the names
        filled. A quantized output layer tied to the embeddings loads from the embedding."""
        params = weight_targets(self)
        a = self.args
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        shard_rows = {
            "qkv_proj": [(0, q), (q, kv), (q + kv, kv)],
            "gate_up_proj": [(0, a.intermediate_size), (a.intermediate_size, a.intermediate_size)],
        }
        tied_quant = a.tie_word_embeddings and self.lm_head.quant is not None
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and a.tie_word_embeddings:
                continue
            if name == "model.embed_tokens.weight" and tied_quant:
                load_into(self.lm_head, tensor, name)
                loaded.add("lm_head.weight")
            for part, (fused, idx) in self.stacked.items():
                if f".{part}." in name:
                    target = name.replace(f".{part}.", f".{fused}.")
                    start, rows = shard_rows[fused][idx]
                    load_into(params[target], tensor, name, start, rows)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r} in checkpoint")
                load_into(params[name], tensor, name)
                loaded.add(name)
        return loaded
