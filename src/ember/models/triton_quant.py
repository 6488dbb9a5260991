"""Weight-only quantized matmul for CUDA in Triton: int8 per channel and 4-bit groups.

The weight stays in the row layout of `quant.QuantizedRows` on the GPU (int8 codes [N, Kp], or
two 4-bit codes a byte [N, Kp / 2], with float32 scales and minimums per group of inputs), so
a 7B model at int4 holds about 4 GB of weights instead of 13.5. Each program dequantizes a
[BLOCK_K, BLOCK_N] tile of the weight in registers (w = code * scale + min) and multiplies it
by the activations on the tensor cores, accumulating in float32. A decode step reads each
weight byte once, so at batch 1 the step is bound by the quantized bytes, not the float ones.

Rounding: the dequantized tile is rounded to the activations' dtype (bfloat16/float16) for
the tensor-core product, as Marlin-style kernels do; with float32 activations (and in the
Triton interpreter on the CPU) the product is exact float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.models.quant import QuantizedRows


# M (rows: the step's token count) varies from step to step: not specialised on, so a
# batch of one token or of a multiple of 16 compiles no variant of its own mid-serving.
@triton.jit(do_not_specialize=["M"])
def _quant_linear_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    Kp,
    x_stride,
    codes_stride,
    scales_stride,
    out_stride,
    group,
    BITS: tl.constexpr,
    HAS_MIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rows = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
            mask=m_ok[:, None] & (rk[None, :] < K),
            other=0.0,
        )
        w_mask = n_ok[None, :] & (rk[:, None] < Kp)
        if BITS == 8:
            codes = tl.load(
                codes_ptr + rows[None, :] * codes_stride + rk[:, None], mask=w_mask, other=0
            ).to(tl.float32)
        else:
            # Within each 32 inputs, byte i holds input i in its low nibble, 16 + i in its high.
            byte = (rk // 32) * 16 + (rk % 16)
            shift = ((rk % 32) // 16) * 4
            packed = tl.load(
                codes_ptr + rows[None, :] * codes_stride + byte[:, None], mask=w_mask, other=0
            ).to(tl.int32)
            codes = ((packed >> shift[:, None]) & 0xF).to(tl.float32)
        g = rk // group
        s = tl.load(scales_ptr + rows[None, :] * scales_stride + g[:, None], mask=w_mask, other=0.0)
        w = codes * s
        if HAS_MIN:
            w += tl.load(
                mins_ptr + rows[None, :] * scales_stride + g[:, None], mask=w_mask, other=0.0
            )
        if x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * out_stride + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_linear(
    x: torch.Tensor, w: QuantizedRows, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) for W in quantized rows on x's device; out in x's dtype."""
    k = w.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.codes.shape[0]
    kp = w.codes.shape[1] * (2 if w.fmt.bits == 4 else 1)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    # Decode steps (a few rows) get thin row tiles and narrower column tiles, so even a
    # 4096-wide output spreads over 128 programs; prefill chunks get wide tiles.
    block_m, block_n = (16, 32) if m <= 16 else (64, 64)
    block_k = 64  # Kp is a multiple of 64 (QuantFormat.padded)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    scales = w.scales
    mins = w.mins if w.mins is not None else scales
    _quant_linear_kernel[grid](
        x2,
        w.codes,
        scales,
        mins,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        kp,
        x2.stride(0),
        w.codes.stride(0),
        scales.stride(0),
        out.stride(0),
        w.fmt.group_for(kp),
        BITS=w.fmt.bits,
        HAS_MIN=w.mins is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.view(*lead, n)
