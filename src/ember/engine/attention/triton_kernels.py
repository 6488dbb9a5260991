"""Triton kernels for attention over the paged KV cache (GPU; the CPU runs them interpreted).

The cache has the torch backend's layout: per layer one tensor [slots, 2, kv_heads, head_dim],
slot = block * block_size + offset, a token's key and value side by side. Three kernels:

- `write_kv`: each new token's K and V into its slot (slot -1 writes nothing: a padding row
  of a CUDA-graph batch).
- `decode_attention`: one query token per sequence. One program per (sequence, KV head, split)
  loads the whole GQA group of query heads that shares the KV head, so each key and value is
  read once per group. Long contexts are split along the KV length (flash-decoding); a second
  kernel merges the splits by their log-sum-exp. With one split, the first kernel writes the
  output itself.
- `prefill_attention`: variable-length query chunks, each attending causally over its whole
  context (a cached prefix plus its own new tokens, already written) through its block table.

Numbers the kernels depend on (tile sizes, split count) are chosen by the callers: the
backend on the GPU, the tests with tiny tiles under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Most KV splits a decode step uses (the backend's choice); the merge kernel is compiled once
# for this many.
MAX_SPLITS = 16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _precision(cache: torch.Tensor) -> str:
    # float32 caches get exact products (TF32 would cost ~3 digits); 16-bit ones need none.
    return "ieee" if cache.dtype == torch.float32 else "tf32"


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    slot_stride,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    # slot -1: nothing to write (the comparison is broadcast first: a scalar bool and-ed
    # into a block mask loses its type under the interpreter)
    live = (offs_h[:, None] * 0 + slot) >= 0
    mask = (offs_h[:, None] < KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & live
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * k_stride_t + offs_h[:, None] * k_stride_h + offs_d[None, :], mask)
    v = tl.load(v_ptr + t64 * v_stride_t + offs_h[:, None] * v_stride_h + offs_d[None, :], mask)
    dest = (
        cache_ptr + slot * (2 * KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    )
    tl.store(dest, k, mask)
    tl.store(dest + KV_HEADS * HEAD_DIM, v, mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim] (rows may be strided); slots: [tokens] (strided ok)."""
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and cache.is_contiguous()
    _write_kv_kernel[(tokens,)](
        k,
        v,
        cache,
        slots,
        slots.stride(0),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        H_PAD=_pow2(kv_heads),
        D_PAD=_pow2(head_dim),
    )


# Numbers that vary from step to step (a batch's block-table width, its split count, a
# matmul's row count) are not specialised on: Triton would compile a new variant of the kernel
# the first time one is 1 or a multiple of 16, stalling every stream mid-serving.
@triton.jit(do_not_specialize=["table_stride", "num_splits"])
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    table_stride,
    lens_stride,
    scale,
    num_splits,
    NUM_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b * lens_stride).to(tl.int32)  # int64 in the graphs' rows
    # Each split takes a whole number of key tiles; trailing splits of a short context are
    # empty and report a log-sum-exp of -inf, which the merge ignores.
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(
        q_ptr + b64 * q_stride_t + heads[:, None] * q_stride_h + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(tables_ptr + b64 * table_stride + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        slot = page.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_off = slot[:, None] * (2 * KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + kv_off + KV_HEADS * HEAD_DIM, mask=kv_mask, other=0.0)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)  # [G, N]
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(n_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m = m_new

    has = l_sum > 0
    o = acc / tl.where(has, l_sum, 1.0)[:, None]
    if ONE_SPLIT:
        dest = out_ptr + b64 * out_stride_t + heads[:, None] * out_stride_h + offs_d[None, :]
        tl.store(dest, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row = (b64 * NUM_HEADS + heads) * num_splits + split  # [G_PAD]
        tl.store(
            part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
            o,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        lse = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    out_stride_t,
    out_stride_h,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    row = (b * NUM_HEADS + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a padding row: every split empty
    w = tl.exp(lse - m)
    total = tl.sum(w, axis=0)
    parts = tl.load(
        part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    o = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + b * out_stride_t + h * out_stride_h + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def decode_workspace(
    num_seqs: int, num_heads: int, head_dim: int, splits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partial outputs and log-sum-exps; shared by every layer of a step."""
    return (
        torch.empty(num_seqs * num_heads * splits * head_dim, dtype=torch.float32, device=device),
        torch.empty(num_seqs * num_heads * splits, dtype=torch.float32, device=device),
    )


def decode_attention(
    q: torch.Tensor,  # [seqs, heads, head_dim], rows may be strided
    cache: torch.Tensor,
    tables: torch.Tensor,  # [seqs, max_blocks] int32/int64, rows may be strided
    lens: torch.Tensor,  # [seqs] context lengths (0: a padding row, output zeros)
    out: torch.Tensor,  # [seqs, heads, head_dim]
    scale: float,
    block_size: int,
    splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
    block_n: int = 32,
    num_warps: int = 4,
) -> None:
    seqs, num_heads, head_dim = q.shape
    kv_heads = cache.shape[2]
    group = num_heads // kv_heads
    # tl.dot needs 16 rows: a GQA group is padded up to 16; plain multi-head attention (one
    # query row per KV head) reduces on the vector units instead.
    use_dot = group > 1
    g_pad = max(16, _pow2(group)) if use_dot else 1
    assert q.stride(2) == 1 and out.stride(2) == 1 and tables.stride(1) == 1
    if seqs == 0:
        return
    if splits > 1:
        assert workspace is not None
        part_out, part_lse = workspace
        assert part_lse.numel() >= seqs * num_heads * splits
    else:
        part_out = part_lse = out  # unused
    _decode_split_kernel[(seqs, kv_heads, splits)](
        q,
        cache,
        tables,
        lens,
        out,
        part_out,
        part_lse,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        lens.stride(0),
        scale,
        splits,
        NUM_HEADS=num_heads,
        KV_HEADS=kv_heads,
        GROUP=group,
        G_PAD=g_pad,
        HEAD_DIM=head_dim,
        D_PAD=_pow2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        ONE_SPLIT=splits == 1,
        USE_DOT=use_dot,
        PRECISION=_precision(cache),
        num_warps=num_warps,
    )
    if splits > 1:
        _decode_merge_kernel[(seqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            D_PAD=_pow2(head_dim),
            S_PAD=max(MAX_SPLITS, _pow2(splits)),  # one variant for every split count
        )


@triton.jit(do_not_specialize=["table_stride"])
def _prefill_kernel(
    q_ptr,
    cache_ptr,
    tables_ptr,
    q_starts_ptr,
    q_lens_ptr,
    ctx_lens_ptr,
    out_ptr,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    table_stride,
    scale,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + seq)
    q_start = tl.load(q_starts_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_lens_ptr + seq)
    cached = ctx - q_len
    kvh = h // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * q_stride_t + h * q_stride_h + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Keys up to the tile's last query position; a tile past the chunk's end does no work.
    hi = tl.minimum(ctx, cached + (tile + 1) * BLOCK_M)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)
    seq64 = seq.to(tl.int64)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(
            tables_ptr + seq64 * table_stride + offs_n // BLOCK_SIZE, mask=n_mask, other=0
        )
        slot = page.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_off = slot[:, None] * (2 * KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + kv_off + KV_HEADS * HEAD_DIM, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
        # Query i (absolute position cached + i) sees keys 0..cached + i; key 0 is in the
        # first tile, so every row's maximum is finite from then on.
        visible = (offs_n[None, :] <= cached + offs_m[:, None]) & n_mask[None, :]
        s = tl.where(visible, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv.to(tl.float32)
        m = m_new

    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * out_stride_t + h * out_stride_h + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    q: torch.Tensor,  # [tokens, heads, head_dim] (the whole flat batch)
    cache: torch.Tensor,
    tables: torch.Tensor,  # [chunks, max_blocks]
    q_starts: torch.Tensor,  # [chunks] flat offset of each chunk's first token
    q_lens: torch.Tensor,  # [chunks]
    ctx_lens: torch.Tensor,  # [chunks] cached + new tokens
    max_q_len: int,
    out: torch.Tensor,
    scale: float,
    block_size: int,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> None:
    chunks = q_lens.shape[0]
    assert q_starts.stride(0) == q_lens.stride(0) == ctx_lens.stride(0) == 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = cache.shape[2]
    if chunks == 0:
        return
    assert q.stride(2) == 1 and out.stride(2) == 1 and tables.stride(1) == 1
    grid = (chunks, num_heads, triton.cdiv(max_q_len, block_m))
    _prefill_kernel[grid](
        q,
        cache,
        tables,
        q_starts,
        q_lens,
        ctx_lens,
        out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        scale,
        KV_HEADS=kv_heads,
        GROUP=num_heads // kv_heads,
        HEAD_DIM=head_dim,
        D_PAD=_pow2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=_precision(cache),
        num_warps=num_warps,
    )
