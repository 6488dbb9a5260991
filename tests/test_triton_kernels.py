"""Every Triton kernel against the torch code it replaces, on the CPU under TRITON_INTERPRET=1.

The interpreter runs the kernels' own code (masks, strides, block-table lookups, the online
softmax, the split merge) on CPU tensors; shapes are tiny because it is slow. The same
kernels compiled for a GPU are checked by the `gpu`-marked tests in test_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # found, not imported: see `interpreted`
    pytest.skip("triton is not installed", allow_module_level=True)

from ember.engine.attention import torch_backend  # noqa: E402
from test_attention import BLOCK, HEAD_DIM, HEADS, KV_HEADS, STEPS, reference, run_step  # noqa: E402

# On a machine with CUDA the kernels are compiled and run there; elsewhere interpreted.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    """Without CUDA the kernels must run interpreted: conftest.py sets TRITON_INTERPRET=1
    before anything imports triton."""
    if DEVICE.type == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton"
    yield


def kernels_on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def kernels():
    from ember.engine.attention import triton_kernels

    return triton_kernels


def ops():
    from ember.models import triton_ops

    return triton_ops


def _paged(ctx_lens: list[int], kv_heads: int, head_dim: int, block: int, gen: torch.Generator):
    """A cache holding each sequence's keys/values in scrambled blocks; the rest is NaN."""
    num_blocks = sum(-(-n // block) for n in ctx_lens) + 3
    cache = torch.full((num_blocks * block, 2, kv_heads, head_dim), float("nan"))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, kvs = [], []
    for n in ctx_lens:
        blocks = [free.pop() for _ in range(-(-n // block))]
        kv = torch.randn(n, 2, kv_heads, head_dim, generator=gen)
        for pos in range(n):
            cache[blocks[pos // block] * block + pos % block] = kv[pos]
        tables.append(blocks)
        kvs.append(kv)
    width = max(max(len(t) for t in tables), 1)
    table = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return cache, table, kvs


def test_write_kv_scatters_each_token_to_its_slot_and_skips_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, kvh, d = 5, 2, 8
    qkv = torch.randn(tokens, (4 + 2 * kvh) * d, generator=gen)  # k, v strided as in a QKV
    k = qkv[:, 4 * d : (4 + kvh) * d].view(tokens, kvh, d)
    v = qkv[:, (4 + kvh) * d :].view(tokens, kvh, d)
    cache = torch.zeros(12, 2, kvh, d)
    slots = torch.tensor([7, 0, -1, 11, 3])
    dev = kernels_on_device(qkv, cache, slots)
    kernels().write_kv(
        dev[0][:, 4 * d : (4 + kvh) * d].view(tokens, kvh, d),
        dev[0][:, (4 + kvh) * d :].view(tokens, kvh, d),
        dev[1],
        dev[2],
    )
    cache = dev[1].cpu()
    expected = torch.zeros_like(cache)
    keep = slots >= 0
    expected[slots[keep], 0] = k[keep]
    expected[slots[keep], 1] = v[keep]
    torch.testing.assert_close(cache, expected, rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_attention_over_the_context(heads: int, kv_heads: int, splits: int) -> None:
    gen = torch.Generator().manual_seed(heads * 10 + splits)
    d, block = 16, 4
    ctx = [1, 23, 40, 0]  # the last is a CUDA-graph padding row: no context, zero output
    cache, tables, kvs = _paged([max(n, 1) for n in ctx], kv_heads, d, block, gen)
    lens = torch.tensor(ctx, dtype=torch.int32)
    # q rows are strided, as they are inside a fused QKV output
    qd, cache_d, tables_d, lens_d = kernels_on_device(
        torch.randn(len(ctx), heads * 2, d, generator=gen), cache, tables, lens
    )
    q = qd[:, :heads]
    out = torch.empty(len(ctx), heads, d, device=DEVICE)
    ws = kernels().decode_workspace(len(ctx), heads, d, splits, DEVICE)
    kernels().decode_attention(
        q, cache_d, tables_d, lens_d, out, d**-0.5, block, splits, ws, block_n=16
    )
    q, out = q.cpu(), out.cpu()
    for i, n in enumerate(ctx):
        if n == 0:
            assert torch.equal(out[i], torch.zeros(heads, d))
            continue
        kv = kvs[i]
        ref = reference(q[i : i + 1], kv[:n, 0], kv[:n, 1], cached=n - 1)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_prefill_attends_over_cached_prefix_and_new_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, d, block = 4, 2, 16, 4
    chunks = [(0, 9), (13, 5), (3, 20)]  # (cached, new)
    ctx = [c + n for c, n in chunks]
    cache, tables, kvs = _paged(ctx, kv_heads, d, block, gen)
    total = sum(n for _, n in chunks)
    q = torch.randn(total, heads, d, generator=gen)
    starts = torch.tensor([0, 9, 14], dtype=torch.int32)
    q_lens = torch.tensor([n for _, n in chunks], dtype=torch.int32)
    out = torch.full((total, heads, d), float("nan"), device=DEVICE)
    args = kernels_on_device(q, cache, tables, starts, q_lens, torch.tensor(ctx, dtype=torch.int32))
    kernels().prefill_attention(*args, 20, out, d**-0.5, block, block_m=16, block_n=16)
    out = out.cpu()
    for (c, n), s, kv in zip(chunks, starts.tolist(), kvs):
        ref = reference(q[s : s + n], kv[:, 0], kv[:, 1], cached=c)
        torch.testing.assert_close(out[s : s + n], ref, rtol=1e-5, atol=1e-5)


cpu_only = pytest.mark.skipif(DEVICE.type == "cuda", reason="whole steps on CUDA: test_gpu.py")


@cpu_only
@pytest.mark.parametrize("case", list(STEPS))
def test_backend_step_matches_the_reference(case: str, monkeypatch) -> None:
    """Whole steps (decodes, fresh and cached prefills, mixed) through the backend, against
    the same plain causal attention the torch backend is tested on; decodes split in three."""
    from ember.engine.attention.triton_backend import TritonAttentionBackend

    monkeypatch.setattr(torch_backend, "PREFILL_BATCH_MAX_PADDING", 0.0)
    backend = TritonAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    backend.num_sms = 3 * 64  # asks for splits: contexts here span up to 3 tiles
    seqs, num_decodes = STEPS[case]
    ours, ref = run_step(backend, seqs, num_decodes)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@cpu_only
def test_graph_metadata_decodes_like_the_eager_metadata() -> None:
    from ember.engine.attention.base import SeqSpan
    from ember.engine.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator().manual_seed(5)
    backend = TritonAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, BLOCK)
    cache, tables, _ = _paged([6, 11], KV_HEADS, HEAD_DIM, BLOCK, gen)
    caches = [cache]
    q = torch.randn(2, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(2, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(2, KV_HEADS, HEAD_DIM, generator=gen)
    lens = [6, 11]
    blocks = [tables[i].tolist()[: -(-n // BLOCK)] for i, n in enumerate(lens)]
    spans = [SeqSpan(i, 1, n, b) for i, (n, b) in enumerate(zip(lens, blocks))]
    eager = backend.forward(0, q, k, v, backend.build_metadata(spans, 2, caches, cache.device))
    # The graph's fixed rows: the two decodes, then a padding row (slot -1, length 0).
    slots = [b[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for n, b in zip(lens, blocks)]
    meta = backend.graph_metadata(
        torch.tensor(slots + [-1]),
        torch.cat([tables.long(), torch.zeros(1, tables.shape[1], dtype=torch.long)]),
        torch.tensor(lens + [0]),
        64,
        caches,
    )
    pad = torch.zeros(1, HEADS, HEAD_DIM)
    graph = backend.forward(
        0,
        torch.cat([q, pad]),
        torch.cat([k, pad[:, :KV_HEADS]]),
        torch.cat([v, pad[:, :KV_HEADS]]),
        meta,
    )
    torch.testing.assert_close(graph[:2], eager, rtol=0, atol=0)
    assert torch.equal(graph[2], torch.zeros(HEADS, HEAD_DIM))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_path(dtype: torch.dtype, with_residual: bool) -> None:
    from ember.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(5, 48, generator=gen).to(dtype)
    residual = torch.randn(5, 48, generator=gen).to(dtype)
    # bfloat16: within one rounding (the interpreter's float32 -> bfloat16 conversion
    # need not round to nearest as the GPU does)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if with_residual:
        ref_out, ref_res = norm.add_forward(x.clone(), residual.clone())  # torch on the CPU
        x_d, res, w = kernels_on_device(x, residual, norm.weight.detach())
        out = ops().rms_norm(x_d, w, 1e-5, res)
        torch.testing.assert_close(res.cpu(), ref_res, rtol=tol, atol=tol)
    else:
        ref_out = norm(x)
        x_d, w = kernels_on_device(x, norm.weight.detach())
        out = ops().rms_norm(x_d, w, 1e-5)
    torch.testing.assert_close(out.cpu(), ref_out, rtol=tol, atol=tol)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_rotary_rotates_q_and_k_in_place_like_the_torch_path(neox: bool) -> None:
    from ember.models.layers import RotaryEmbedding

    gen = torch.Generator().manual_seed(2)
    heads, kv_heads, d = 3, 1, 16
    rot_dim = d if neox else d // 2  # ChatGLM rotates half of each head, GPT-J style
    rope = RotaryEmbedding(d, rot_dim, 64, 10000.0, None, neox_style=neox)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d, generator=gen)
    qk = qkv[:, : (heads + kv_heads) * d].view(4, heads + kv_heads, d)
    positions = torch.tensor([0, 5, 17, 63])
    cos, sin = rope.cos_sin(positions, torch.float32)
    expected = rope.forward(qk.clone(), (cos, sin))
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    qkv_d, cos_d, sin_d = kernels_on_device(qkv, cos.view(4, -1), sin.view(4, -1))
    qk_d = qkv_d[:, : (heads + kv_heads) * d].view(4, heads + kv_heads, d)
    ops().rotary_(qk_d, cos_d, sin_d, rot_dim, neox)
    torch.testing.assert_close(qk_d.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv_d[:, (heads + kv_heads) * d :].cpu(), v_before)  # V untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_the_torch_path(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2 * 40, generator=gen).to(dtype)
    gate, up = x.split(40, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    out = ops().silu_and_mul(x.to(DEVICE), block=16).cpu()
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@cpu_only
def test_engine_on_the_triton_backend_generates_what_transformers_does(tiny_llama) -> None:
    """The backend inside the engine (slots, block tables, chunked and cached prefills), then
    the fixed-buffer decode steps that CUDA graphs replay on a GPU (here run without graphs),
    padded up to their batch bucket: greedy tokens equal transformers' own."""
    import ember
    from ember.engine.cuda_graphs import DecodeGraphs

    from checkpoints import reference_greedy

    llm = ember.LLM(
        str(tiny_llama),
        device="cpu",
        dtype="float32",
        attention_backend="triton",
        block_size=4,
        kv_cache_memory="2MiB",
        max_num_batched_tokens=16,  # the 21-token prompt is prefilled in two chunks
    )
    prompts = [[5, 9, 23, 7, 100, 3, 44], list(range(30, 51)), [17, 2, 8]]
    params = ember.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = [reference_greedy(tiny_llama, p, 5) for p in prompts]
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == expected

    runner = llm.engine.runner
    graphs = DecodeGraphs(
        runner.model, runner.backend, runner.kv_caches, 4, 64, 4, runner.device, capture=False
    )
    assert graphs.buckets == [1, 2, 4]
    runner.graphs = graphs
    calls = []
    run = graphs.run
    graphs.run = lambda batch, fill: calls.append(len(batch)) or run(batch, fill)  # type: ignore[method-assign]
    # Three sequences decode in bucket 4 with a padding row; prompts now hit the prefix cache.
    assert [r.outputs[0].token_ids for r in llm.generate(prompts, params)] == expected
    assert 3 in calls


def quant_ops():
    from ember.models import triton_quant

    return triton_quant


def on_device(rows):
    """Quantized rows with their tensors where the kernels run."""
    import dataclasses

    mins = None if rows.mins is None else rows.mins.to(DEVICE)
    return dataclasses.replace(
        rows, codes=rows.codes.to(DEVICE), scales=rows.scales.to(DEVICE), mins=mins
    )


@pytest.mark.parametrize("fmt_name", ["int8-channel", "int4-g32", "int4-g128", "q8-g32", "q8-g16"])
@pytest.mark.parametrize("m, n, k", [(1, 37, 100), (5, 64, 256), (19, 80, 64)])
def test_quant_linear_matches_the_dequantized_weight(fmt_name: str, m: int, n: int, k: int) -> None:
    """x @ W.T (+ bias) with W's rows still quantized equals the product with W dequantized:
    odd widths (K padded to whole groups), partial column and row tiles, every layout."""
    from ember.models import quant

    fmt = {
        "int8-channel": quant.INT8_CHANNEL,
        "int4-g32": quant.int4_format(32),
        "int4-g128": quant.int4_format(128),
        "q8-g32": quant.QuantFormat(8, 32, False),  # GGUF Q8_0
        "q8-g16": quant.QuantFormat(8, 16, False),  # Q6_K's layout
    }[fmt_name]
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    rows = quant.quantize(w, fmt)
    expected = x @ rows.dequantize().T + bias
    rows_d = on_device(rows)
    x_d, bias_d = kernels_on_device(x, bias)
    out = quant_ops().quant_linear(x_d, rows_d, bias_d).cpu()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    no_bias = quant_ops().quant_linear(x_d.view(m, 1, k), rows_d).cpu()
    assert no_bias.shape == (m, 1, n)
    torch.testing.assert_close(no_bias.view(m, n), expected - bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_linear_in_half_precision_is_within_its_rounding(dtype: torch.dtype) -> None:
    """The tensor-core path: the dequantized tile rounded to the activations' dtype."""
    from ember.models import quant

    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the interpreter's bfloat16 tl.dot is wrong: checked where CUDA is")
    gen = torch.Generator().manual_seed(9)
    w, x = torch.randn(48, 128, generator=gen), torch.randn(3, 128, generator=gen)
    rows = quant.quantize(w, quant.int4_format(32))
    expected = x.to(dtype).float() @ rows.dequantize().T
    out = quant_ops().quant_linear(kernels_on_device(x.to(dtype))[0], on_device(rows))
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2e-2, atol=5e-2)


def test_quantized_linear_layer_runs_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized `Linear` on CUDA (here: float16 activations, the kernel interpreted) takes
    the Triton path with its own rows and bias, and answers as its dequantized weight does."""
    from ember.models import layers, quant

    linear = layers.Linear(100, 40, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 100, generator=gen)
    linear.quantize_(quant.int4_format(32))
    linear.load_rows(0, w)
    linear.to(DEVICE)
    calls = []
    real = quant_ops()

    class Spy:
        @staticmethod
        def quant_linear(x, rows, bias):
            calls.append(rows.fmt)
            return real.quant_linear(x, rows, bias)

    monkeypatch.setattr(layers, "quant_ops", lambda x: Spy)
    x = torch.randn(2, 100, generator=gen).half()
    out = linear(kernels_on_device(x)[0])
    assert calls == [quant.int4_format(32)]
    expected = x.float() @ linear.dequantized_weight().cpu().T + linear.bias.detach().cpu()
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2e-2, atol=5e-2)


@cpu_only
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_engine_with_triton_quantized_layers_generates_what_dequantized_weights_do(
    tiny_llama, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole engine with every linear layer on the Triton quantized matmul (the CUDA path,
    here interpreted on float32 CPU tensors) against the same quantized weights dequantized
    into plain float layers: the same greedy tokens."""
    import ember
    from ember.models import layers

    monkeypatch.setattr(layers, "cpu_kernels", lambda: None)  # no C kernels, no tiled layout
    monkeypatch.setattr("ember.engine.runner.CpuQuantDecoder.build", lambda *a: None)
    calls = []
    real = quant_ops()

    class Spy:
        @staticmethod
        def quant_linear(x, rows, bias):
            calls.append(rows.fmt.bits)
            return real.quant_linear(x, rows, bias)

    monkeypatch.setattr(layers, "quant_ops", lambda x: Spy)
    kw = dict(device="cpu", dtype="float32", block_size=4, kv_cache_memory="2MiB")
    llm = ember.LLM(str(tiny_llama), quantization=quantization, **kw)
    prompts = [[5, 9, 23, 7, 100, 3, 44], [17, 2, 8]]
    params = ember.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ours = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert calls and set(calls) <= {4, 8}

    reference = ember.LLM(str(tiny_llama), quantization=quantization, **kw)
    for module in reference.engine.runner.model.modules():
        if isinstance(module, layers.Linear) and module.quant is not None:
            weight = module.dequantized_weight(torch.float32)
            module.quant = None
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
    calls.clear()
    assert [r.outputs[0].token_ids for r in reference.generate(prompts, params)] == ours
    assert not calls
