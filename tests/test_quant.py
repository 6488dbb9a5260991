"""Quantized weights: the C kernels against float64, GGUF blocks repacked without rounding,
and the default model run quantized (greedy tokens, perplexity) against its float weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.models import quant
from ember.models.layers import Linear
from ember.models.quant import (
    QuantFormat,
    QuantizedRows,
    gguf_rows,
    quant_matmul,
    quantize,
    tile,
    untile,
)
from ember.native import cpu_kernels

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="no C compiler")

FORMATS = [
    quant.INT8_CHANNEL,
    quant.int4_format(32),
    quant.int4_format(128),
    QuantFormat(8, 16, False),  # Q6_K's layout
    QuantFormat(8, 32, True),  # Q5_K's layout
    QuantFormat(8, 16, True),  # a fused weight mixing both
]
# M, N, K: odd widths, partial tiles of 16 columns, every register-tile shape (1-4 rows, 1-4 tiles)
SHAPES = [
    (1, 5, 40),
    (3, 7, 128),
    (33, 9, 300),
    (2, 64, 576),
    (1, 70, 256),
    (6, 100, 512),
    (4, 48, 64),
]


def quantized_activations(x: torch.Tensor, kp: int) -> torch.Tensor:
    """The kernel's int8 activations, dequantized: per 32 columns, scale max|x| / 127, round
    half to even (float32 arithmetic, as in quantize_rows_q8)."""
    m, k = x.shape
    xb = torch.nn.functional.pad(x, (0, kp - k)).view(m, kp // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q.double() * (amax.double() / 127.0)).view(m, kp)[:, :k]


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_reference(fmt: QuantFormat, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    rows = quantize(w, fmt)
    out = torch.full((m, n), float("nan"))  # poisoned: every element must be written
    quant_matmul(x, tile(rows), bias, out=out)
    wd = rows.dequantize().double()
    ref = quantized_activations(x, fmt.padded(k)) @ wd.T + bias.double()
    # float32 rounding of sums of k products: bounded by k * eps * sum |x||w|.
    bound = (x.double().abs() @ wd.abs().T) * k * 2**-23 + 1e-6
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() <= bound).all()
    # And close to the float matmul: int8 activations lose ~0.4% per 32-wide block.
    plain = x.double() @ wd.T + bias.double()
    assert (out.double() - plain).abs().max() <= 0.02 * plain.abs().max()


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.name)
def test_round_to_nearest_error_is_within_half_a_step(fmt: QuantFormat) -> None:
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(1))
    rows = quantize(w, fmt)
    kp = fmt.padded(200)
    g = fmt.group_for(kp)
    step = rows.scales.repeat_interleave(g, dim=1)[:, :200]
    assert ((rows.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("n", [1, 16, 37, 85])
@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_tiled_layout_gives_the_rows_back(
    fmt: QuantFormat, n: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the chunks the re-lay goes by (the last one partial, its last tile padded)."""
    monkeypatch.setattr(quant, "TILE_CHUNK", chunk)
    rows = quantize(torch.randn(n, 200, generator=torch.Generator().manual_seed(n)), fmt)
    back = untile(tile(rows))
    assert torch.equal(back.codes, rows.codes) and torch.equal(back.scales, rows.scales)
    assert (back.mins is None) == (rows.mins is None)
    if rows.mins is not None:
        assert torch.equal(back.mins, rows.mins)


@needs_kernels
def test_m_zero_and_no_kernel_path_agree() -> None:
    w, x = torch.randn(6, 64), torch.randn(3, 64)
    rows = quantize(w, quant.int4_format(32))
    assert quant_matmul(x[:0], tile(rows)).shape == (0, 6)
    layer = Linear(64, 6, bias=False, device="meta")
    layer.quantize_(rows.fmt)
    layer.to_empty(device="cpu")
    layer.load_rows(0, rows)
    # bfloat16 activations take the dequantizing path; both stay near the float product.
    ref = x @ rows.dequantize().T
    slow = layer(x.bfloat16()).float()
    fast = layer(x)
    assert (fast - ref).abs().max() < 0.02 * ref.abs().max()
    assert (slow - ref).abs().max() < 0.02 * ref.abs().max()
    assert torch.equal(layer.dequantized_weight(), rows.dequantize())  # tiled by now


# ---------------------------------------------------------------- GGUF blocks


def _raw_blocks(type_name: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF blocks for [n, k]: quantized by gguf itself where it can, else random bytes with
    sane float16 scales (K-quant bit fields take any value)."""
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import quantize as gguf_quantize

    qtype = GGMLQuantizationType[type_name]
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf_quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    halves = rng.uniform(0.001, 0.02, (n, k // block, 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        raw[..., 208:210] = halves[..., 0:2]
    else:  # Q4_K, Q5_K: d and dmin first
        raw[..., 0:2] = halves[..., 0:2]
        raw[..., 2:4] = halves[..., 2:4] // 2
    return raw.reshape(n, -1)


@pytest.mark.parametrize("type_name", list(quant.GGUF_FORMATS))
def test_gguf_blocks_repack_without_rounding(type_name: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, k = 5, 512
    raw = _raw_blocks(type_name, n, k, np.random.default_rng(7))
    rows = gguf_rows(raw, type_name, n, k)
    assert rows is not None and rows.fmt == quant.GGUF_FORMATS[type_name]
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).copy())
    assert torch.equal(rows.dequantize(), expected.reshape(n, k).float())


@needs_kernels
@pytest.mark.parametrize("type_name", list(quant.GGUF_FORMATS))
def test_repacked_gguf_layer_matches_dequantized_layer(type_name: str) -> None:
    n, k = 33, 512
    rows = gguf_rows(_raw_blocks(type_name, n, k, np.random.default_rng(3)), type_name, n, k)
    layer = Linear(k, n, bias=False, device="meta")
    layer.quantize_(rows.fmt)
    layer.to_empty(device="cpu")
    layer.load_rows(0, rows)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    wd = rows.dequantize().double()
    ref = quantized_activations(x, rows.fmt.padded(k)) @ wd.T
    bound = (x.double().abs() @ wd.abs().T) * k * 2**-23 + 1e-6
    assert ((layer(x).double() - ref).abs() <= bound).all()


def test_fused_layer_holds_mixed_gguf_types_exactly() -> None:
    rng = np.random.default_rng(5)
    parts = [gguf_rows(_raw_blocks(t, 3, 256, rng), t, 3, 256) for t in ("Q4_1", "Q6_K", "Q5_K")]
    fmt = quant.join(p.fmt for p in parts)
    assert fmt == QuantFormat(8, 16, True)
    layer = Linear(256, 9, bias=False, device="meta")
    layer.quantize_(fmt)
    layer.to_empty(device="cpu")
    for i, p in enumerate(parts):
        layer.load_rows(3 * i, p)
    expected = torch.cat([p.dequantize() for p in parts])
    assert torch.equal(layer.dequantized_weight(), expected)


def test_unknown_gguf_type_and_odd_width_are_left_to_dequantize() -> None:
    raw = np.zeros((2, 40 * 2), np.uint8)
    assert gguf_rows(raw, "F16", 2, 40) is None
    assert gguf_rows(np.zeros((2, 18 * 3), np.uint8), "Q4_K", 2, 96) is None  # not 256-wide
    assert isinstance(gguf_rows(np.zeros((2, 18 * 3), np.uint8), "Q4_0", 2, 96), QuantizedRows)


# ---------------------------------------------------------------- the default model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at",
    "def fibonacci(n):",
    "The largest planet in the solar system",
    "My favourite season is autumn because",
    "To make a cup of tea, first",
]
GREEDY_TOKENS = 24
TEXT = (Path(__file__).parent / "data" / "perplexity_text.txt").read_text()


@pytest.fixture(scope="module")
def runs() -> dict:
    """Greedy tokens (with the top-5 logprobs) and the fixed text's perplexity, for the
    default model as float32 (its Q4_1 weights dequantized: "none"), as the GGUF's own
    precision ("auto": Q4_1 layers, the Q8_0 tied output layer), and rounded to nearest from
    those float weights to int8 per channel and to int4 in groups of 32."""
    from ember.engine.request import SamplingParams
    from ember.offline import LLM

    greedy = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, logprobs=5)
    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = {}
    for mode in ("none", "auto", "int8", "int4"):
        llm = LLM(quantization=mode, max_num_seqs=16, kv_cache_memory="64MiB")
        res = llm.generate(PROMPTS, greedy)
        (scored,) = llm.generate([TEXT], score)
        nll = [-lp.logprob for lp in scored.prompt_logprobs if lp is not None]
        out[mode] = {
            "tokens": [r.outputs[0].token_ids for r in res],
            "logprobs": [r.outputs[0].logprobs for r in res],
            "ppl": math.exp(sum(nll) / len(nll)),
            "n_scored": len(nll),
            "quantization": llm.engine.runner.quantization,
        }
        del llm
    return out


@pytest.mark.slow
def test_quantization_is_described(runs: dict) -> None:
    assert runs["none"]["quantization"] == "none"
    assert runs["auto"]["quantization"] == "gguf:Q4_1,Q8_0"
    assert runs["int8"]["quantization"] == "int8-channel"
    assert runs["int4"]["quantization"] == "int4-g32-min,int8-channel"


@pytest.mark.slow
def test_gguf_precision_greedy_tokens_match_dequantized_weights(runs: dict) -> None:
    """Same weights, so tokens differ only where the float run's top two logits were close
    enough for the int8 activations' rounding to swap them; report how many prompts do."""
    diverged = []
    for p, (ref, got, lps) in enumerate(
        zip(runs["none"]["tokens"], runs["auto"]["tokens"], runs["none"]["logprobs"])
    ):
        i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if i is None:
            continue
        top = dict(lps[i].top)
        gap = lps[i].logprob - top.get(got[i], -math.inf)
        diverged.append((p, i, round(gap, 3)))
    print(f"\nprompts diverging (prompt, token, float logit gap to the token taken): {diverged}")
    # A swap needs the quantized token to be the float run's runner-up, by a small margin
    # (measured: 6 of 8 prompts swap somewhere in 24 tokens, every gap 0.005-0.22).
    assert all(gap < 0.5 for _, _, gap in diverged), diverged


@pytest.mark.slow
def test_perplexity_increase_is_bounded(runs: dict) -> None:
    base = runs["none"]["ppl"]
    rise = {m: runs[m]["ppl"] / base - 1 for m in ("auto", "int8", "int4")}
    print(
        f"\nperplexity over {runs['none']['n_scored']} tokens: float32 {base:.3f}, "
        + ", ".join(f"{m} {runs[m]['ppl']:.3f} ({100 * r:+.2f}%)" for m, r in rise.items())
    )
    assert runs["none"]["n_scored"] > 300
    assert rise["int8"] < 0.01
    assert rise["int4"] < 0.05
    assert rise["auto"] < 0.01  # the same weights: only the activations' rounding differs


@pytest.mark.slow
def test_models_route_shows_quantization(server: str) -> None:
    """The session server runs --quantization none; a server with no flag serves the GGUF
    file in its own precision and says so."""
    import httpx

    from conftest import ember_serve

    auth = {"Authorization": "Bearer test-key"}
    assert httpx.get(server + "/v1/models/smol", headers=auth).json()["quantization"] == "none"
    with ember_serve(["--api-key", "k", "--served-model-name", "smol"]) as base:
        auth = {"Authorization": "Bearer k"}
        listed = httpx.get(base + "/v1/models", headers=auth).json()["data"]
        assert [card["quantization"] for card in listed] == ["gguf:Q4_1,Q8_0"]
        card = httpx.get(base + "/v1/models/smol", headers=auth).json()
        assert card["quantization"] == "gguf:Q4_1,Q8_0"
        reply = httpx.post(
            base + "/v1/chat/completions",
            headers=auth,
            json={
                "model": "smol",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            },
            timeout=120,
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_default_model_quantization_is_described_without_loading() -> None:
    from ember.models.loader import describe_quantization

    assert describe_quantization(None) == "gguf:Q4_1,Q8_0"
    assert describe_quantization(None, "none") == "none"
    assert describe_quantization(None, "int4") == "int4-g32-min,int8-channel"


@pytest.mark.parametrize("march", ["haswell", "x86-64"], ids=["avx2", "plain-c"])
def test_other_cpu_paths_match_float64_reference(
    march: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AVX2 and plain-C kernels (this machine builds the AVX-512 one), built here."""
    import ctypes
    import shutil
    import subprocess

    from ember import native

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or (march == "haswell" and "avx2" not in native._cpu_features()):
        pytest.skip("no compiler, or no AVX2 to run it")
    so = tmp_path / f"quant-{march}.so"
    # With cpu_kernels.c, which holds the thread count the loops read.
    src = [str(Path(native.__file__).with_name("quant_kernels.c")), str(native.SOURCE)]
    flags = ["-O3", f"-march={march}", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
    subprocess.run([cc, *flags, "-o", str(so), *src, "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.linear_quant.argtypes = native.SIGNATURES["linear_quant"]
    lib.linear_quant.restype = None
    monkeypatch.setattr(quant, "cpu_kernels", lambda: lib)
    for fmt in FORMATS:
        for m, n, k in SHAPES[:3]:
            gen = torch.Generator().manual_seed(m + n + k)
            w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
            rows = quantize(w, fmt)
            out = torch.full((m, n), float("nan"))
            quant_matmul(x, tile(rows), out=out)
            wd = rows.dequantize().double()
            ref = quantized_activations(x, fmt.padded(k)) @ wd.T
            bound = (x.double().abs() @ wd.abs().T) * k * 2**-23 + 1e-6
            assert ((out.double() - ref).abs() <= bound).all(), (fmt.name, m, n, k)


@pytest.mark.slow
def test_a_gguf_file_is_parsed_once_and_its_index_gives_the_readers_arrays(
    monkeypatch, tmp_path
) -> None:
    """gguf's reader parses the whole vocabulary to open a file (seconds); a load reads the
    tensors through an index kept in the cache instead, which must give the very arrays the
    reader gives, and no reader at all once the index is there."""
    import gguf
    import numpy as np

    from ember.models import loader

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    path = loader.default_model_path()
    reader = gguf.GGUFReader(str(path))
    opened = []
    real = gguf.GGUFReader

    def counting(*args, **kwargs):
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    index = loader.gguf_index(path)
    assert len(opened) == 1 and list(tmp_path.glob("gguf/*.index.json"))
    assert loader.gguf_index(path) == index and len(opened) == 1  # from the cache now
    arrays = list(loader.gguf_tensor_data(path, index))
    assert len(arrays) == len(reader.tensors)
    for (entry, got), t in zip(arrays, reader.tensors):
        assert entry["name"] == t.name and entry["type"] == t.tensor_type.name
        assert got.dtype == t.data.dtype and got.shape == t.data.shape, t.name
        assert np.array_equal(got, t.data), t.name
    names = dict(loader.iter_gguf_weights(path, set(loader.gguf_tensor_types(path))))
    assert len(opened) == 1 and "model.layers.0.self_attn.q_proj.weight" in names
    # A stale or foreign index is rebuilt.
    stale = next(tmp_path.glob("gguf/*.index.json"))
    stale.write_text('{"version": 0}')
    assert loader.gguf_index(path) == index and len(opened) == 2
