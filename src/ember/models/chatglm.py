"""ChatGLM family as stored on disk: ChatGLM2, ChatGLM3 (6B, -32k, -128k, -base), GLM-4-9B.

These checkpoints ship their own modeling code (`architectures: ["ChatGLMModel"]`) with their
own config keys and tensor names, read here as they are. What sets the family apart from Llama:
- one fused `query_key_value` projection (Q rows, then K, then V) with a bias, and grouped
  K/V heads (`multi_query_group_num`);
- rotary embedding on only the first half of each head's dims, rotating interleaved
  neighbours (GPT-J style), with base `10000 * rope_ratio`;
- `dense_h_to_4h` already fuses SwiGLU's [gate | up], and the LM head is a separate,
  untied `output_layer`.
Both fused tensors have exactly the layout of Ember's fused parameters, so loading is a plain
copy by name; the module tree mirrors the checkpoint's names for that reason.
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

# Tensors in real checkpoints that Ember recomputes rather than loads.
_SKIPPED_SUFFIXES = ("rotary_pos_emb.inv_freq",)


@dataclass
class ChatGLMArgs:
    vocab_size: int  # padded_vocab_size: the embedding and output rows, above the tokenizer's
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool
    linear_bias: bool
    torch_dtype: str | None  # the checkpoint's dtype; the runner decides the run dtype
    tie_word_embeddings: bool = False  # the output layer is always its own tensor

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ChatGLMArgs:
        # Variants of the original code that no ChatGLM2/3 or GLM-4 checkpoint uses; refuse
        # them rather than run different math silently.
        unsupported = {
            "rmsnorm": (False, "LayerNorm"),
            "post_layer_norm": (False, "no final norm"),
            "apply_residual_connection_post_layernorm": (True, "post-norm residuals"),
            "tie_word_embeddings": (True, "tied output layer"),
        }
        for key, (bad, what) in unsupported.items():
            if cfg.get(key, not bad) == bad:
                raise ValueError(f"ChatGLM config with {key}={bad} ({what}) is not supported")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
        mqa = cfg.get("multi_query_attention", False)
        linear_bias = bool(cfg.get("add_bias_linear", False))
        return cls(
            vocab_size=cfg.get("padded_vocab_size") or cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["ffn_hidden_size"],
            num_layers=cfg["num_layers"],
            num_heads=heads,
            num_kv_heads=cfg["multi_query_group_num"] if mqa else heads,
            head_dim=head_dim,
            rotary_dim=head_dim // 2,
            rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            # -32k/-128k/GLM-4 stretch the context by raising the base, not the positions.
            rope_theta=10000.0 * float(cfg.get("rope_ratio", 1)),
            max_position_embeddings=cfg.get("seq_length", 2048),
            # The original code gives query_key_value a bias when either flag is set.
            qkv_bias=linear_bias or bool(cfg.get("add_qkv_bias", False)),
            linear_bias=linear_bias,
            torch_dtype=cfg.get("torch_dtype"),
        )


class SelfAttention(FusedQKVAttention):
    def __init__(self, args: ChatGLMArgs, layer: int, backend: AttentionBackend) -> None:
        super().__init__(args.num_heads, args.num_kv_heads, args.head_dim, layer, backend)
        self.query_key_value = Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias
        )
        self.dense = Linear(self.q_size, args.hidden_size, bias=args.linear_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.dense(self.attend(self.query_key_value(x), cos_sin, rotary, meta))


class MLP(nn.Module):
    def __init__(self, args: ChatGLMArgs) -> None:
        super().__init__()
        # [gate | up] in one matrix, the order silu_and_mul expects.
        self.dense_h_to_4h = Linear(
            args.hidden_size, 2 * args.intermediate_size, bias=args.linear_bias
        )
        self.dense_4h_to_h = Linear(args.intermediate_size, args.hidden_size, bias=args.linear_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(silu_and_mul(self.dense_h_to_4h(x)))


class GLMBlock(nn.Module):
    def __init__(self, args: ChatGLMArgs, layer: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attention = SelfAttention(args, layer, backend)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's MLP output, the residual stream before it is added): the
        add happens in the next norm, fused with it on the GPU."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attention(h, cos_sin, rotary, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class Embedding(nn.Module):
    def __init__(self, args: ChatGLMArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)


class Encoder(nn.Module):
    def __init__(self, args: ChatGLMArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(args, i, backend) for i in range(args.num_layers))
        self.final_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class ChatGLMTransformer(nn.Module):
    def __init__(self, args: ChatGLMArgs, backend: AttentionBackend) -> None:
        super().__init__()
        self.embedding = Embedding(args)
        self.encoder = Encoder(args, backend)
        self.output_layer = Linear(args.hidden_size, args.vocab_size, bias=False)


class ChatGLMForCausalLM(nn.Module):
    """Serves both `ChatGLMModel` and `ChatGLMForConditionalGeneration` checkpoints."""

    def __init__(self, config: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.args = args = ChatGLMArgs.from_config(config)
        self.transformer = ChatGLMTransformer(args, backend)
        self.rotary = RotaryEmbedding(
            args.head_dim,
            args.rotary_dim,
            args.max_position_embeddings,
            args.rope_theta,
            None,
            neox_style=False,
        )

    @property
    def attention_shape(self) -> tuple[int, int, int, int]:
        a = self.args
        return a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # Embeddings are not scaled; positions run 0..n-1 from the first token ([gMASK]).
        x = self.transformer.embedding.word_embeddings(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.transformer.encoder.layers:
            x, residual = layer(x, residual, cos_sin, self.rotary, meta)
        return self.transformer.encoder.final_layernorm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transformer.output_layer(hidden)

    def decoder_parts(self) -> DecoderParts:
        """The blocks by role, for the CPU's fused decode step (models/cpu_decode.py)."""
        a = self.args
        layers = [
            LayerParts(
                block.input_layernorm,
                block.self_attention.query_key_value,
                block.self_attention.dense,
                block.post_attention_layernorm,
                block.mlp.dense_h_to_4h,
                block.mlp.dense_4h_to_h,
            )
            for block in self.transformer.encoder.layers
        ]
        return DecoderParts(
            self.transformer.embedding.word_embeddings,
            layers,
            self.transformer.encoder.final_layernorm,
            self.rotary,
            a.hidden_size,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into parameters; returns the parameter names filled."""
        params = weight_targets(self)
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            if name not in params:
                raise KeyError(f"unexpected weight {name!r} in checkpoint")
            load_into(params[name], tensor, name)  # refuses a wrongly shaped tensor
            loaded.add(name)
        return loaded
