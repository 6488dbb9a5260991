"""Weight-only quantized linear layers: formats, round-to-nearest quantizers, GGUF repacking,
and the matmul that uses them.

A quantized weight is kept as codes plus a float32 scale (and optionally a float32 minimum) per
group of `group` weights along the input dimension: w = code * scale + min. Two layouts, both
[out_features, Kp] with Kp = in_features rounded up to a multiple of 64 and of the group (the
padding is zeros):

- bits 8: int8 codes. `--quantization int8` is symmetric per output channel (one group spans
  the row, no minimum); GGUF Q8_0 (group 32), Q5_K (32, with minimum) and Q6_K (16) land here.
- bits 4: codes 0..15, two per byte (in each 32-wide block, byte j holds element j low and
  element j + 16 high, GGUF's own order). `--quantization int4` uses groups of 32 or 128 with
  a minimum; GGUF Q4_0, Q4_1 and Q4_K land here with group 32.

On the CPU the matmul is Ember's C kernel (native/quant_kernels.c), over the codes re-laid
for it once at load (`tile`): activations are quantized per 32 columns to int8, the
products are integer, scales apply in float32. Elsewhere (a GPU, or no C compiler) the weight
is dequantized to the activation dtype for each call: correct and still small in memory,
though not a fast path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ember.native import cpu_kernels

log = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none", "int8", "int4")


@dataclass(frozen=True)
class QuantFormat:
    bits: int  # 8 or 4
    group: int  # weights per scale along K: 16, a multiple of 32, or 0 for the whole row
    has_min: bool

    def group_for(self, kp: int) -> int:
        return self.group or kp

    def padded(self, k: int) -> int:
        """Columns stored for K inputs: K rounded up to whole pairs of 32-wide blocks (the
        AVX-512 kernel takes two at a time) and whole groups."""
        step = max(64, self.group)
        return (k + step - 1) // step * step

    @property
    def name(self) -> str:
        g = "channel" if self.group == 0 else f"g{self.group}"
        return f"int{self.bits}-{g}" + ("-min" if self.has_min else "")


INT8_CHANNEL = QuantFormat(8, 0, False)


def int4_format(group: int) -> QuantFormat:
    if group % 32:
        raise ValueError(f"int4 groups must be a multiple of 32, not {group}")
    return QuantFormat(4, group, True)


def join(formats: Iterable[QuantFormat]) -> QuantFormat:
    """One layout that holds every format given without rounding any of them (for a fused
    weight whose GGUF parts differ): the wider codes, the finer groups, a minimum if any."""
    fs = list(formats)
    if len(set(fs)) == 1:
        return fs[0]
    groups = [f.group for f in fs if f.group]
    return QuantFormat(
        max(f.bits for f in fs), math.gcd(*groups) if groups else 0, any(f.has_min for f in fs)
    )


@dataclass
class QuantizedRows:
    """Rows of a quantized weight in one of the layouts above."""

    fmt: QuantFormat
    codes: torch.Tensor  # int8 [n, Kp] (bits 8) or uint8 [n, Kp / 2] (bits 4)
    scales: torch.Tensor  # float32 [n, Kp / group]
    mins: torch.Tensor | None  # float32 [n, Kp / group] when fmt.has_min
    in_features: int
    source: str = ""  # the GGUF type, for logs and describe()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.in_features)

    def int_codes(self) -> torch.Tensor:
        """[n, Kp] integer codes in int16 (unpacked for bits 4)."""
        if self.fmt.bits == 8:
            return self.codes.to(torch.int16)
        return unpack_q4(self.codes).to(torch.int16)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kp = self.codes.shape[1] * (2 if self.fmt.bits == 4 else 1)
        g = self.fmt.group_for(kp)
        q = self.int_codes().float().view(-1, kp // g, g)
        w = q * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.view(-1, kp)[:, : self.in_features].to(dtype)

    def rows(self, index: torch.Tensor | slice) -> QuantizedRows:
        return QuantizedRows(
            self.fmt,
            self.codes[index],
            self.scales[index],
            None if self.mins is None else self.mins[index],
            self.in_features,
            self.source,
        )

    def to_format(self, fmt: QuantFormat) -> QuantizedRows:
        """The same weights in a layout at least as wide (see `join`): exact, no rounding."""
        if fmt == self.fmt:
            return self
        kp = self.fmt.padded(self.in_features)
        if fmt.padded(self.in_features) != kp:
            raise ValueError(f"cannot hold {self.fmt.name} in {fmt.name}: padding differs")
        g_old, g_new = self.fmt.group_for(kp), fmt.group_for(kp)
        if fmt.bits < self.fmt.bits or g_old % g_new or (self.fmt.has_min and not fmt.has_min):
            raise ValueError(f"cannot hold {self.fmt.name} in {fmt.name} exactly")
        rep = g_old // g_new
        scales = self.scales.repeat_interleave(rep, dim=1)
        mins = None
        if fmt.has_min:
            mins = (
                torch.zeros_like(scales)
                if self.mins is None
                else self.mins.repeat_interleave(rep, dim=1)
            )
        codes = self.codes
        if fmt.bits == 8 and self.fmt.bits == 4:
            codes = unpack_q4(codes).to(torch.int8)
        return QuantizedRows(fmt, codes, scales.contiguous(), mins, self.in_features, self.source)


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [n, Kp] → [n, Kp / 2] in the nibble order described above."""
    n, kp = codes.shape
    c = codes.to(torch.uint8).view(n, kp // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    p = packed.view(n, half // 16, 1, 16)
    return torch.cat((p & 0x0F, p >> 4), dim=2).reshape(n, half * 2)


def _pad_cols(w: torch.Tensor, kp: int) -> torch.Tensor:
    return w if w.shape[1] == kp else torch.nn.functional.pad(w, (0, kp - w.shape[1]))


def quantize(w: torch.Tensor, fmt: QuantFormat) -> QuantizedRows:
    """Round-to-nearest quantization of float rows [n, K] into `fmt`."""
    n, k = w.shape
    kp = fmt.padded(k)
    g = fmt.group_for(kp)
    x = _pad_cols(w.detach().float(), kp).view(n, kp // g, g)
    if fmt.has_min:
        top = 15 if fmt.bits == 4 else 127  # codes stay within int8 when bits is 8
        lo, hi = x.amin(-1), x.amax(-1)
        scale = (hi - lo) / top
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = ((x - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp(0, top)
        mins: torch.Tensor | None = lo.contiguous()
    else:
        top = (1 << (fmt.bits - 1)) - 1
        scale = x.abs().amax(-1) / top
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = (x * inv.unsqueeze(-1)).round().clamp(-top, top)
        mins = None
    q = q.view(n, kp)
    if fmt.bits == 8:
        codes = q.to(torch.int8)
    else:
        if not fmt.has_min:
            raise ValueError("int4 needs a minimum (codes are 0..15)")
        codes = pack_q4(q.to(torch.uint8))
    return QuantizedRows(fmt, codes, scale.contiguous(), mins, k)


# ---------------------------------------------------------------- the matmul

TILE = 16  # output columns per tile of the CPU kernels' layout


@dataclass
class TiledRows:
    """A quantized weight in the CPU kernels' tiled layout (native/quant_kernels.c): 16 output
    columns x 4 inputs in each 64 bytes, so one vpdpbusd takes 64 products for 16 outputs.
    Made once at load by `tile`; `untile` gives the rows back exactly."""

    fmt: QuantFormat
    codes: torch.Tensor  # uint8, T * Kp * 16 bytes (bits 8) or T * Kp * 8 (bits 4)
    scales: torch.Tensor  # float32 [T, Kp / group, 16]
    mins: torch.Tensor | None
    out_features: int
    in_features: int

    @property
    def kp(self) -> int:
        return self.fmt.padded(self.in_features)


TILE_CHUNK = 64  # tiles (1,024 rows) re-laid at a time: the temporaries stay a few MiB


def tile(rows: QuantizedRows) -> TiledRows:
    """Rows [N, Kp] → the tiled layout (N padded to whole tiles with zero codes and scales).

    Done a chunk of tiles at a time into the final buffers: whole-matrix temporaries (the
    unpacked codes alone are twice the packed bytes) would raise a 7B model's peak memory at
    load by a fifth, through the heap holes they leave behind."""
    fmt, kp = rows.fmt, rows.fmt.padded(rows.in_features)
    n = rows.codes.shape[0]
    t = (n + TILE - 1) // TILE
    g = fmt.group_for(kp)
    tile_bytes = TILE * kp if fmt.bits == 8 else TILE * kp // 2
    codes = torch.empty(t * tile_bytes, dtype=torch.uint8)
    scales = torch.empty(t, kp // g, TILE, dtype=torch.float32)
    mins = None if rows.mins is None else torch.empty(t, kp // g, TILE, dtype=torch.float32)
    for t0 in range(0, t, TILE_CHUNK):
        t1 = min(t, t0 + TILE_CHUNK)
        r0, r1 = t0 * TILE, min(n, t1 * TILE)
        nt, pad_rows = t1 - t0, t1 * TILE - r1
        part = rows.codes[r0:r1]
        if fmt.bits == 8:
            u = (part.to(torch.int16) + 128).to(torch.uint8)
            u = torch.nn.functional.pad(u, (0, 0, 0, pad_rows), value=128)
            tiled = u.view(nt, TILE, kp // 4, 4).permute(0, 2, 1, 3)
        else:
            c = torch.nn.functional.pad(unpack_q4(part), (0, 0, 0, pad_rows))
            c = c.view(nt, TILE, kp // 32, 2, 4, 4).permute(
                0, 2, 4, 1, 5, 3
            )  # t, b, v, col, i, half
            tiled = c[..., 0] | (c[..., 1] << 4)
        codes[t0 * tile_bytes : t1 * tile_bytes].view(tiled.shape).copy_(tiled)
        for src, dst in ((rows.scales, scales), (rows.mins, mins)):
            if src is not None and dst is not None:
                v = torch.nn.functional.pad(src[r0:r1].float(), (0, 0, 0, pad_rows))
                dst[t0:t1].copy_(v.view(nt, TILE, kp // g).permute(0, 2, 1))
    return TiledRows(fmt, codes, scales, mins, n, rows.in_features)


def untile(t: TiledRows) -> QuantizedRows:
    fmt, kp, n = t.fmt, t.kp, t.out_features
    nt = t.scales.shape[0]
    if fmt.bits == 8:
        c = t.codes.view(nt, kp // 4, TILE, 4).permute(0, 2, 1, 3).reshape(nt * TILE, kp)
        codes = (c.to(torch.int16) - 128).to(torch.int8)[:n]
    else:
        b = t.codes.view(nt, kp // 32, 4, TILE, 4)
        both = torch.stack((b & 0x0F, b >> 4), dim=-1)  # t, b, v, col, i, half
        c = both.permute(0, 3, 1, 5, 2, 4).reshape(nt * TILE, kp)
        codes = pack_q4(c[:n])

    def rows_of(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else v.permute(0, 2, 1).reshape(nt * TILE, -1)[:n].contiguous()

    return QuantizedRows(fmt, codes, rows_of(t.scales), rows_of(t.mins), t.in_features)


def quant_matmul(
    x: torch.Tensor,
    w: TiledRows,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] float32 on the CPU @ W.T (+ bias) by the C kernel; `out`, if given, is
    [M, N] float32. Needs the kernels (`cpu_kernels()` not None)."""
    lib = cpu_kernels()
    assert lib is not None and x.dtype == torch.float32 and x.device.type == "cpu"
    k = w.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.out_features
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return out.view(*lead, n)
    kp = w.kp
    lib.linear_quant(
        x2.data_ptr(),
        m,
        k,
        x2.stride(0),
        w.codes.data_ptr(),
        w.fmt.bits,
        w.scales.data_ptr(),
        None if w.mins is None else w.mins.data_ptr(),
        n,
        kp,
        w.fmt.group_for(kp),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        n,
    )
    return out.view(*lead, n)


# ---------------------------------------------------------------- GGUF blocks


def _f16(a: np.ndarray) -> np.ndarray:
    return a.copy().view(np.float16).astype(np.float32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and minimums of a Q4_K/Q5_K super-block (12 bytes → 8 + 8)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_codes_32(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes of Q4_0/Q4_1 → [blocks, 32] codes (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def gguf_rows(data: np.ndarray, type_name: str, n: int, k: int) -> QuantizedRows | None:
    """Repack a GGUF tensor's raw blocks ([n, bytes per row], uint8) into Ember's layouts, with
    every group's scale and minimum carried over exactly (see `GGUF_FORMATS`); None for a type
    that has no such layout here (the caller dequantizes it)."""
    rows = _gguf_rows_unpadded(data, type_name, n, k)
    if rows is None:
        return None
    kp, have = rows.fmt.padded(k), rows.fmt.padded(k) - k
    if have == 0:
        return rows
    # Zero codes, scales and minimums in the padding columns: they add nothing.
    g = rows.fmt.group_for(kp)
    cols = kp if rows.fmt.bits == 8 else kp // 2
    pad = torch.nn.functional.pad
    return QuantizedRows(
        rows.fmt,
        pad(rows.codes, (0, cols - rows.codes.shape[1])),
        pad(rows.scales, (0, kp // g - rows.scales.shape[1])),
        None if rows.mins is None else pad(rows.mins, (0, kp // g - rows.mins.shape[1])),
        k,
        rows.source,
    )


def _gguf_rows_unpadded(data: np.ndarray, type_name: str, n: int, k: int) -> QuantizedRows | None:
    """`gguf_rows` before padding K to the layout's multiple."""
    if k % 32:
        return None
    raw = np.ascontiguousarray(data).reshape(n, -1)
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
        b = raw.reshape(n, k // 32, size)
        d = _f16(b[..., :2]).reshape(n, k // 32)
        if type_name == "Q8_0":
            codes = torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(n, k))
            return QuantizedRows(
                QuantFormat(8, 32, False), codes, torch.from_numpy(d), None, k, type_name
            )
        off = 2 if type_name == "Q4_0" else 4
        mins = -8.0 * d if type_name == "Q4_0" else _f16(b[..., 2:4]).reshape(n, k // 32)
        q = torch.from_numpy(_q4_codes_32(b[..., off:]).reshape(n, k))
        return QuantizedRows(
            QuantFormat(4, 32, True),
            pack_q4(q),
            torch.from_numpy(d),
            torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32)),
            k,
            type_name,
        )
    if type_name not in ("Q4_K", "Q5_K", "Q6_K") or k % 256:
        return None
    nsb = k // 256
    if type_name in ("Q4_K", "Q5_K"):
        size = 144 if type_name == "Q4_K" else 176
        b = raw.reshape(n * nsb, size)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        scales = (d * sc).reshape(n, k // 32)  # fp16 x 6-bit integer: exact in float32
        mins = (-(dmin * mn)).reshape(n, k // 32)
        if type_name == "Q4_K":
            qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
            q = (qs & 0x0F).reshape(n, k)
            return QuantizedRows(
                QuantFormat(4, 32, True),
                pack_q4(torch.from_numpy(q)),
                torch.from_numpy(scales),
                torch.from_numpy(mins),
                k,
                type_name,
            )
        qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        ql = b[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (ql & 0x0F).reshape(-1, 8, 32) | ((qh & 1).reshape(-1, 8, 32) << 4)
        return QuantizedRows(
            QuantFormat(8, 32, True),
            torch.from_numpy(q.reshape(n, k).astype(np.int8)),
            torch.from_numpy(scales),
            torch.from_numpy(mins),
            k,
            type_name,
        )
    b = raw.reshape(n * nsb, 210)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(-1, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    scales = (_f16(b[:, 208:210]) * sc).reshape(n, k // 16)  # fp16 x int8: exact in float32
    return QuantizedRows(
        QuantFormat(8, 16, False),
        torch.from_numpy(q.reshape(n, k)),
        torch.from_numpy(scales),
        None,
        k,
        type_name,
    )


# GGUF types repacked exactly, and the layout each lands in. GGUF keeps its scales and
# minimums in float16 (K-quants: a float16 super-block scale times a 6- or 8-bit integer);
# Ember holds every group's scale and minimum in float32, where those products are exact, so
# no weight rounds. What does round is the activation side: int8 per 32 columns, as in
# llama.cpp's own dot products, and float32 accumulation.
GGUF_FORMATS = {
    "Q8_0": QuantFormat(8, 32, False),
    "Q4_0": QuantFormat(4, 32, True),
    "Q4_1": QuantFormat(4, 32, True),
    "Q4_K": QuantFormat(4, 32, True),
    "Q5_K": QuantFormat(8, 32, True),
    "Q6_K": QuantFormat(8, 16, False),
}


def describe(model: torch.nn.Module) -> str:
    """A model's quantization in one short string, for /v1/models and `ember models`:
    "none", "int8-channel", "int4-g32-min", or for GGUF files "gguf:Q4_1,Q8_0" (the types
    kept quantized), with "+float" when some linear layers stay in full precision."""
    from ember.models.layers import Linear

    linears = [m for m in model.modules() if isinstance(m, Linear)]
    quantized = [m for m in linears if m.quant is not None]
    if not quantized:
        return "none"
    sources = sorted({s for m in quantized for s in m.quant_source.split(",") if s})
    if sources:
        text = "gguf:" + ",".join(sources)
    else:
        text = ",".join(sorted({m.quant.name for m in quantized if m.quant is not None}))
    return text + ("+float" if len(quantized) < len(linears) else "")


def init_dummy_quantized(model: torch.nn.Module, seed: int = 0) -> None:
    """Random codes and scales for every quantized linear layer, drawn straight into the
    quantized buffers (no float weight is made): weights spread like the float dummy ones
    (standard deviation about 0.02), for benchmarks on full-size shapes."""
    import zlib

    from ember.models.layers import Linear

    for name, m in model.named_modules():
        if not isinstance(m, Linear) or m.quant is None:
            continue
        dev = m.qweight.device  # the generator and the draws on it: CPU or CUDA alike
        gen = torch.Generator(device=dev).manual_seed(seed + zlib.crc32(name.encode()))
        with torch.no_grad():
            if m.quant.bits == 4:
                # Both nibbles uniform on 0..15: w uniform on ±7.5 * scale.
                m.qweight.copy_(
                    torch.randint(
                        0, 256, m.qweight.shape, generator=gen, dtype=torch.uint8, device=dev
                    )
                )
                m.qscale.fill_(0.02 * math.sqrt(3) / 7.5)
                m.qmin.fill_(-7.5 * 0.02 * math.sqrt(3) / 7.5)
            else:
                m.qweight.copy_(
                    torch.randint(
                        -127, 128, m.qweight.shape, generator=gen, dtype=torch.int8, device=dev
                    )
                )
                m.qscale.fill_(0.02 * math.sqrt(3) / 127)
                if m.qmin is not None:
                    m.qmin.zero_()
