"""Building blocks shared by the model families: norms, rotary embeddings, activations."""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember.models.quant import (
    QuantFormat,
    QuantizedRows,
    TiledRows,
    quant_matmul,
    quantize,
    tile,
    untile,
)
from ember.native import cpu_kernels

if TYPE_CHECKING:
    from ember.engine.attention import AttentionBackend, AttentionMetadata


def _onednn_linear_works() -> bool:
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.equal(out, torch.full((2, 4), 4.0))
    except (AttributeError, RuntimeError):
        return False


# On x86 CPUs, oneDNN's float32 GEMM is 2-3x faster than the default BLAS call for the shapes a
# decode step makes (few rows, wide weights), most of all on AMD processors; measured in
# benchmarks/RESULTS.md. Elsewhere (GPU, other dtypes) the plain linear is used.
_ONEDNN_CPU_LINEAR = torch.backends.mkldnn.is_available() and _onednn_linear_works()


class Linear(nn.Linear):
    """nn.Linear over a flat [tokens, features] batch, on the fastest CPU GEMM available.

    `quantize_(fmt)` turns it into a weight-only quantized layer (models/quant.py): the float
    weight is dropped and `qweight`/`qscale`/`qmin` buffers take its place."""

    _packed: torch.Tensor | None = None
    _tiled: TiledRows | None = None  # a quantized weight in the CPU kernels' layout
    quant: QuantFormat | None = None
    quant_source: str = ""  # GGUF types the weight came from, when it came from a GGUF file

    def quantize_(self, fmt: QuantFormat) -> None:
        """Swap the float weight for empty quantized buffers on the same device (use it on a
        `meta` model, before `to_empty`, so the float weight never exists)."""
        dev = self.weight.device
        n, kp = self.out_features, fmt.padded(self.in_features)
        groups = kp // fmt.group_for(kp)
        self.register_parameter("weight", None)
        dtype = torch.int8 if fmt.bits == 8 else torch.uint8
        cols = kp if fmt.bits == 8 else kp // 2
        self.register_buffer("qweight", torch.empty(n, cols, dtype=dtype, device=dev))
        self.register_buffer("qscale", torch.empty(n, groups, device=dev))
        qmin = torch.empty(n, groups, device=dev) if fmt.has_min else None
        self.register_buffer("qmin", qmin)
        self.quant = fmt

    def load_rows(self, start: int, src: torch.Tensor | QuantizedRows) -> None:
        """Fill output rows start.. of a quantized layer from float rows (quantized here,
        round to nearest) or from rows already quantized (a GGUF tensor; carried over)."""
        assert self.quant is not None and self._tiled is None, "load before pack_for_cpu"
        if isinstance(src, QuantizedRows):
            q = src.to_format(self.quant)
            if q.shape[1] != self.in_features:
                raise ValueError(
                    f"quantized rows have {q.shape[1]} columns, not {self.in_features}"
                )
        else:
            if src.shape[1] != self.in_features:
                raise ValueError(f"weight has {src.shape[1]} columns, not {self.in_features}")
            q = quantize(src, self.quant)
        rows = q.codes.shape[0]
        if start + rows > self.out_features:
            raise ValueError(f"rows {start}..{start + rows} exceed {self.out_features}")
        with torch.no_grad():
            self.qweight[start : start + rows].copy_(q.codes)
            self.qscale[start : start + rows].copy_(q.scales)
            if self.qmin is not None:
                self.qmin[start : start + rows].copy_(q.mins)
        if q.source and q.source not in self.quant_source.split(","):
            self.quant_source = ",".join(filter(None, [self.quant_source, q.source]))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_rows().dequantize(dtype)

    def quantized_rows(self) -> QuantizedRows:
        assert self.quant is not None
        if self._tiled is not None:
            return untile(self._tiled)
        return QuantizedRows(self.quant, self.qweight, self.qscale, self.qmin, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels() is not None:
                if self._tiled is None:
                    self.pack_for_cpu(0)
                assert self._tiled is not None
                return quant_matmul(x, self._tiled, self.bias)
            ops = quant_ops(x)
            if ops is not None:  # CUDA: dequantized tile by tile in registers, never whole
                return ops.quant_linear(x, self.quantized_rows(), self.bias)
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if _ONEDNN_CPU_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return nn.functional.linear(x, self.weight, self.bias)

    def pack_for_cpu(self, batch_hint: int, shared: bool = False) -> bool:
        """Reorder the weight once into oneDNN's blocked layout instead of on every call
        (15-25% off each decode GEMM at 32 rows, never slower at 1 or 512; benchmarks/
        RESULTS.md). The plain copy is dropped, so memory stays the same, unless the weight
        is `shared` with another module: a tied output layer keeps it for the embedding
        lookup and spends one more copy's memory, which pays for itself many times over
        (oneDNN would otherwise reorder the whole vocabulary matrix on every step)."""
        if self.quant is not None:
            return self._tile_quantized()
        w = self.weight
        if (
            w is None
            or not _ONEDNN_CPU_LINEAR
            or w.device.type != "cpu"
            or w.dtype != torch.float32
        ):
            return False
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        if not shared:
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        return True

    def _tile_quantized(self) -> bool:
        """Re-lay a quantized weight for the CPU kernels, in place of its row layout (same
        bytes, no second copy kept)."""
        if self._tiled is not None:
            return True
        if self.qweight.device.type != "cpu" or cpu_kernels() is None:
            return False
        t = tile(self.quantized_rows())
        self.register_buffer("qweight", t.codes)
        self.register_buffer("qscale", t.scales)
        self.register_buffer("qmin", t.mins)
        self._tiled = t
        return True


_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_triton_modules: dict[str, Any] = {}


def _triton_module(name: str) -> Any:
    """`ember.models.<name>`, imported on first use; None where Triton is not installed."""
    if name not in _triton_modules:
        try:
            _triton_modules[name] = importlib.import_module(f"ember.models.{name}")
        except ImportError:
            _triton_modules[name] = None
    return _triton_modules[name]


def fused_ops(x: torch.Tensor) -> Any:
    """The Triton kernels of `triton_ops` when x is a CUDA tensor in bfloat16/float16 and
    Triton is installed, else None (the torch code below runs)."""
    if not x.is_cuda or x.dtype not in _FUSED_DTYPES:
        return None
    return _triton_module("triton_ops")


def quant_ops(x: torch.Tensor) -> Any:
    """`triton_quant` when x is a CUDA tensor and Triton is installed, else None."""
    return _triton_module("triton_quant") if x.is_cuda else None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add fused into the norm on CUDA,
        where the sum is written back into `residual`."""
        ops = fused_ops(x)
        if ops is not None and x.is_contiguous() and residual.is_contiguous():
            return ops.rms_norm(x, self.weight, self.eps, residual), residual
        s = x + residual
        return self(s), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None and x.stride(-1) == 1:
            return ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:
            lib = cpu_kernels() if x.device.type == "cpu" and x.is_contiguous() else None
            if lib is not None and self.weight.dtype == torch.float32:
                # One pass over each row; torch's CPU rms_norm makes five, 10x slower here.
                out = torch.empty_like(x)
                dim = self.weight.shape[0]
                lib.rms_norm(
                    x.data_ptr(),
                    self.weight.data_ptr(),
                    out.data_ptr(),
                    x.numel() // dim,
                    dim,
                    self.eps,
                )
                return out
            return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # The variance is taken in float32 whatever the run dtype, as the reference models do.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    n = x.shape[-1] // 2
    ops = fused_ops(x)
    if ops is not None and x.stride(-1) == 1:
        return ops.silu_and_mul(x)
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        lib = cpu_kernels()
        if lib is not None:  # one pass over x instead of three, and no temporaries
            out = x.new_empty(*x.shape[:-1], n)
            lib.silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // (2 * n), n)
            return out
    gate, up = x.split(n, dim=-1)
    return nn.functional.silu(gate) * up


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies for RoPE, with the `rope_scaling` types Llama-family configs use."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "freq_factors":
        # Each frequency divided by its own factor, as llama.cpp applies a GGUF's rope_freqs
        # tensor (written for Llama 3.1: the llama3 scaling, computed in advance).
        factors = torch.tensor(scaling["factors"], dtype=torch.float64)
        if factors.numel() != inv_freq.numel():
            raise ValueError(
                f"rope_scaling needs {inv_freq.numel()} factors, not {factors.numel()}"
            )
        inv_freq = inv_freq / factors
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first `rotary_dim` dims of each head.

    `neox_style` rotates pairs (i, i + rotary_dim/2), as Hugging Face Llama weights expect;
    otherwise neighbours (2i, 2i+1) rotate together (GPT-J style, used by ChatGLM).
    """

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_positions: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        neox_style: bool = True,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.neox_style = neox_style
        self._spec = (max_positions, base, scaling)
        self.register_buffer("cos", torch.empty(max_positions, rotary_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, rotary_dim // 2), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the cos/sin tables in place, e.g. after the model moved off `meta`."""
        if self.cos.device.type == "meta":
            return
        max_positions, base, scaling = self._spec
        inv_freq = rope_inv_freq(self.rotary_dim, base, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, rotary_dim / 2]
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for a step's positions, looked up once and shared by every layer."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),  # [T, 1, rot/2]
            self.sin[positions].unsqueeze(1).to(dtype),
        )

    def rotate(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`forward` for x: [tokens, heads, head_dim], whose rows may be strided (Q and K inside
        a fused QKV output). The CPU kernel and the Triton one (CUDA, bf16/fp16) rotate x in
        place and return it, so no copy is made; elsewhere the result is a new tensor and x
        is left as it was."""
        cos, sin = cos_sin
        ops = fused_ops(x)
        if ops is not None and x.stride(2) == 1 and cos.dtype == x.dtype:
            tokens = x.shape[0]
            return ops.rotary_(
                x, cos.view(tokens, -1), sin.view(tokens, -1), self.rotary_dim, self.neox_style
            )
        lib = cpu_kernels() if x.device.type == "cpu" else None
        if (
            lib is not None
            and x.dtype == cos.dtype == torch.float32
            and x.stride(2) == 1
            and x.stride(1) == x.shape[2]
            and cos.is_contiguous()
            and sin.is_contiguous()
        ):
            tokens, heads, head_dim = x.shape
            lib.rotary(
                x.data_ptr(),
                tokens,
                x.stride(0),
                heads,
                head_dim,
                self.rotary_dim,
                cos.data_ptr(),
                sin.data_ptr(),
                int(self.neox_style),
            )
            return x
        return self.forward(x, cos_sin)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [tokens, heads, head_dim]."""
        cos, sin = cos_sin
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class FusedQKVAttention(nn.Module):
    """The attention every model family here shares: one fused QKV projection, rotary on Q and
    K, the paged-cache backend. Subclasses add the two projections under their checkpoint's
    names and call `attend` between them."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer: int,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim

    def attend(
        self,
        qkv: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rotary: RotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """[tokens, q + 2 kv] projections → [tokens, q_size] attention output."""
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        # Q and K rotate by the same positions: one rotary call over all their heads.
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads + kv_heads, d)
        q, k = rotary.rotate(qk, cos_sin).split([heads, kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, kv_heads, d)
        out = self.backend.forward(self.layer, q, k, v, meta)
        return out.reshape(-1, self.q_size)


def weight_targets(model: nn.Module) -> dict[str, torch.Tensor | Linear]:
    """Checkpoint names → where they load: a parameter, or a quantized Linear (which takes the
    tensor through `load_rows`)."""
    targets: dict[str, torch.Tensor | Linear] = dict(model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.quant is not None:
            targets[f"{name}.weight"] = module
    return targets


def load_into(
    target: torch.Tensor | Linear,
    tensor: torch.Tensor | QuantizedRows,
    name: str,
    start: int = 0,
    rows: int | None = None,
) -> None:
    """Copy a checkpoint tensor (float, or GGUF rows still quantized) into rows start.. of a
    parameter or a quantized Linear, refusing a shape that does not fit."""
    shape = tuple(tensor.shape)
    if isinstance(target, Linear):
        full = (rows if rows is not None else target.out_features, target.in_features)
        if shape != full:
            raise ValueError(f"weight {name!r} has shape {list(shape)}, expected {list(full)}")
        target.load_rows(start, tensor)
        return
    dest = target.data if rows is None else target.data[start : start + rows]
    # copy_ would broadcast a wrongly shaped tensor without a word.
    if shape != tuple(dest.shape):
        raise ValueError(f"weight {name!r} has shape {list(shape)}, expected {list(dest.shape)}")
    if isinstance(tensor, QuantizedRows):
        tensor = tensor.dequantize(dest.dtype)
    with torch.no_grad():
        dest.copy_(tensor)
