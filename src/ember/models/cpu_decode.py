"""Decode steps of a quantized model on the CPU through every layer in one C call.

At a few sequences, a decode step of a small quantized model spends more time going back and
forth between Python, torch and the C kernels (about twenty trips a layer) than in the kernels.
`CpuQuantDecoder` hands the whole stack of decoder layers to `decode_layers`
(native/decode_layers.c), which runs the same kernels in the same order with the same
arithmetic, so its hidden states equal the layer-by-layer path's. The embedding lookup and the
output layer stay in torch.

It applies to a model whose `decoder_parts()` describes pre-norm layers (RMSNorm, fused QKV,
rotary, gated SiLU MLP) with every linear layer quantized in the CPU kernels' tiled layout, on
the `cpu` attention backend in float32, and to steps made only of decodes; anything else runs
the model's own forward.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.engine.attention.base import AttentionMetadata
from ember.native import cpu_kernels

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _QLinear(ctypes.Structure):
    _fields_ = [
        ("codes", _ptr),
        ("scales", _ptr),
        ("mins", _ptr),
        ("bias", _ptr),
        ("bits", _i64),
        ("n", _i64),
        ("k", _i64),
        ("kp", _i64),
        ("group", _i64),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("qkv", _QLinear),
        ("o", _QLinear),
        ("gate_up", _QLinear),
        ("down", _QLinear),
        ("cache", _ptr),
    ]


class _Dims(ctypes.Structure):
    _fields_ = [
        ("hidden", _i64),
        ("heads", _i64),
        ("kv_heads", _i64),
        ("head_dim", _i64),
        ("rot_dim", _i64),
        ("neox", _i64),
        ("block_size", _i64),
        ("eps", _f32),
        ("scale", _f32),
    ]


@dataclass
class LayerParts:
    """One pre-norm decoder layer, by role."""

    input_norm: nn.Module  # RMSNorm
    qkv: nn.Module  # Linear: [q | k | v] outputs
    o: nn.Module
    post_norm: nn.Module
    gate_up: nn.Module  # Linear: [gate | up] outputs
    down: nn.Module


@dataclass
class DecoderParts:
    """What `decode_layers` needs of a model: its layers, final norm, rotary and shapes."""

    embed: nn.Embedding
    layers: list[LayerParts]
    final_norm: nn.Module
    rotary: nn.Module  # RotaryEmbedding
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _tiled(linear: Any) -> Any:
    """The TiledRows of a quantized Linear packed for the CPU kernels, else None."""
    return getattr(linear, "_tiled", None) if getattr(linear, "quant", None) is not None else None


def _qlinear(linear: Any) -> _QLinear:
    t = _tiled(linear)
    bias = linear.bias
    return _QLinear(
        t.codes.data_ptr(),
        t.scales.data_ptr(),
        None if t.mins is None else t.mins.data_ptr(),
        None if bias is None else bias.data_ptr(),
        t.fmt.bits,
        t.out_features,
        t.in_features,
        t.kp,
        t.fmt.group_for(t.kp),
    )


class CpuQuantDecoder:
    """`__call__(input_ids, positions, meta)` → the final-norm hidden states of a decode step,
    as the model's forward returns them."""

    def __init__(self, parts: DecoderParts, backend: Any, kv_caches: list[torch.Tensor]) -> None:
        self.parts = parts
        self.backend = backend
        self.kv_caches = kv_caches
        lib = cpu_kernels()
        assert lib is not None
        self._fn = lib.decode_layers
        rotary = parts.rotary
        self._dims = _Dims(
            parts.hidden_size,
            parts.num_heads,
            parts.num_kv_heads,
            parts.head_dim,
            rotary.rotary_dim,
            int(rotary.neox_style),
            backend.block_size,
            parts.final_norm.eps,  # `build` checked every norm has the same
            backend.scale,
        )
        self._layers = (_Layer * len(parts.layers))(
            *(
                _Layer(
                    p.input_norm.weight.data_ptr(),
                    p.post_norm.weight.data_ptr(),
                    _qlinear(p.qkv),
                    _qlinear(p.o),
                    _qlinear(p.gate_up),
                    _qlinear(p.down),
                    cache.data_ptr(),
                )
                for p, cache in zip(parts.layers, kv_caches)
            )
        )
        self._final_norm = parts.final_norm.weight.data_ptr()

    @classmethod
    def build(
        cls, model: nn.Module, backend: Any, kv_caches: list[torch.Tensor]
    ) -> CpuQuantDecoder | None:
        """The fused decoder for this model, or None where it does not apply."""
        spec = getattr(model, "decoder_parts", None)
        if spec is None or getattr(backend, "name", "") != "cpu":
            return None  # before cpu_kernels(), which compiles the C kernels on first use
        lib = cpu_kernels()
        if lib is None:
            return None
        parts: DecoderParts = spec()
        if not parts.layers or len(parts.layers) != len(kv_caches):
            return None
        linears = [m for p in parts.layers for m in (p.qkv, p.o, p.gate_up, p.down)]
        if any(_tiled(m) is None for m in linears):
            return None
        norms = [n for p in parts.layers for n in (p.input_norm, p.post_norm)] + [parts.final_norm]
        if len({n.eps for n in norms}) != 1:
            return None
        tensors = [n.weight for n in norms] + [parts.embed.weight, *kv_caches]
        tensors += [m.bias for m in linears if m.bias is not None]
        if any(
            t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
            for t in tensors
        ):
            return None
        return cls(parts, backend, kv_caches)

    def applies(self, meta: AttentionMetadata) -> bool:
        """Only steps of decodes alone, on the caches this decoder was built for."""
        return (
            meta.num_decode_seqs == len(meta.spans)
            and meta.num_decode_seqs > 0
            and meta.kv_caches is self.kv_caches
        )

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        p = self.parts
        x = p.embed(input_ids)
        if not x.is_contiguous():
            x = x.contiguous()
        cos, sin = p.rotary.cos_sin(positions, torch.float32)
        cos, sin = cos.contiguous(), sin.contiguous()
        m = x.shape[0]
        residual = torch.empty_like(x)
        out = torch.empty_like(x)
        slots = meta.slot_mapping
        assert slots.dtype == torch.int64 and slots.is_contiguous()
        tables, lens = meta.extra["decode_tables"], meta.extra["decode_lens"]
        self._fn(
            ctypes.addressof(self._layers),
            len(p.layers),
            ctypes.addressof(self._dims),
            self._final_norm,
            m,
            x.data_ptr(),
            residual.data_ptr(),
            out.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            lens.data_ptr(),
            tables.shape[1],
        )
        return out
