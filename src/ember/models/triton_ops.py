"""Fused Triton kernels for the layers around attention, used on CUDA in bfloat16/float16.

At batch 1 a decode step is a long row of small kernels; each eager op here (residual add,
the five steps of RMSNorm, two rotary halves, SiLU then multiply) becomes one kernel that
reads its inputs once. Rounding follows the torch code in `layers.py` step by step (the norm
in float32, the result rounded to the run dtype before the weight multiplies it), so the two
paths agree to the last bit or within one rounding of the run dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    x_stride,
    res_stride,
    out_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the run dtype first, as `x + residual` in torch would be; it
        # becomes the new residual stream, written back in place. Masked lanes must load 0:
        # on the GPU they are otherwise undefined, and the variance sums every lane.
        res = tl.load(res_ptr + row * res_stride + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * res_stride + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x, or of x + residual when given (residual then holds the sum)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    assert x2.stride(1) == 1
    out = torch.empty_like(x2)
    res2 = x2
    if residual is not None:
        res2 = residual.view(-1, n)
        assert res2.stride(1) == 1
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            res2,
            weight,
            out,
            x2.stride(0),
            res2.stride(0),
            out.stride(0),
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 4096 else 8,
        )
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    x_stride_t,
    x_stride_h,
    cs_stride,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    R_PAD: tl.constexpr,
    NEOX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < HALF
    mask = (offs_h[:, None] < HEADS) & r_mask[None, :]
    cos = tl.load(cos_ptr + t * cs_stride + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * cs_stride + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if NEOX:  # pairs (i, i + half)
        i1 = offs_r
        i2 = offs_r + HALF
    else:  # neighbours (2i, 2i + 1)
        i1 = 2 * offs_r
        i2 = 2 * offs_r + 1
    base = x_ptr + t * x_stride_t + offs_h[:, None] * x_stride_h
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(base + i1[None, :], (a * cos[None, :] - b * sin[None, :]).to(x1.dtype), mask=mask)
    tl.store(base + i2[None, :], (b * cos[None, :] + a * sin[None, :]).to(x1.dtype), mask=mask)


def rotary_(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, neox_style: bool
) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] in place (rows may be strided, as Q and K inside a
    fused QKV output are); cos, sin: [tokens, rotary_dim / 2]."""
    tokens, heads, _ = x.shape
    assert x.stride(2) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    half = rotary_dim // 2
    if tokens:
        _rotary_kernel[(tokens,)](
            x,
            cos,
            sin,
            x.stride(0),
            x.stride(1),
            cos.stride(0),
            HEADS=heads,
            HALF=half,
            H_PAD=triton.next_power_of_2(heads),
            R_PAD=triton.next_power_of_2(half),
            NEOX=neox_style,
        )
    return x


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + n + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu, rounded as torch's silu is
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_stride + offs, y.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    assert x2.stride(1) == 1
    out = x2.new_empty(x2.shape[0], n)
    if x2.shape[0]:
        block = min(block, triton.next_power_of_2(n))
        grid = (x2.shape[0], triton.cdiv(n, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)
