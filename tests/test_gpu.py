"""The GPU path on CUDA: Triton attention and fused layers, CUDA graphs, against references.

Skipped without CUDA (conftest.py). The kernels alone are also checked on the CPU under the
Triton interpreter (test_triton_kernels.py, which on a CUDA machine runs them compiled).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 9, 23, 7, 100, 3, 44], list(range(30, 71)), [17, 2, 8], [200, 201]]


def _llm(model_dir, **kw):
    import ember

    args = dict(device="cuda", block_size=16, kv_cache_memory="64MiB", max_num_seqs=8)
    args.update(kw)
    return ember.LLM(str(model_dir), **args)


def _step_logits(llm, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of one prefill step of `prompts` plus one decode step, from the runner."""
    import ember

    params = ember.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    rows = []
    runner = llm.engine.runner
    execute = runner.execute

    def spy(batch, prompt_logits_for=frozenset()):
        logits, prompt = execute(batch, prompt_logits_for)
        rows.append(logits.float().cpu())
        return logits, prompt

    runner.execute = spy
    try:
        llm.generate(prompts, params)
    finally:
        runner.execute = execute
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_backend_logits_match_the_torch_backend(tiny_llama, dtype: str) -> None:
    torch_llm = _llm(tiny_llama, dtype=dtype, attention_backend="torch", enforce_eager=True)
    ref = _step_logits(torch_llm, PROMPTS)
    del torch_llm
    triton_llm = _llm(tiny_llama, dtype=dtype, attention_backend="triton")
    assert triton_llm.engine.runner.graphs is not None
    ours = _step_logits(triton_llm, PROMPTS)
    # Fused norms and rotary round differently from the torch ops in 16-bit floats.
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05)


def test_auto_backend_on_cuda_is_triton_with_graphs(tiny_llama) -> None:
    llm = _llm(tiny_llama)
    runner = llm.engine.runner
    assert runner.dtype == torch.bfloat16
    assert runner.block_size == 16
    assert runner.backend.name == "triton"
    assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4, 8]


def test_greedy_tokens_equal_transformers(tiny_llama) -> None:
    """float32 (exact products in the kernels), Triton attention, CUDA graphs for decodes."""
    import ember

    from checkpoints import reference_greedy

    llm = _llm(tiny_llama, dtype="float32", attention_backend="triton")
    assert llm.engine.runner.graphs is not None
    params = ember.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params)]
    assert got == [reference_greedy(tiny_llama, p, 12) for p in PROMPTS]


def test_chatglm_greedy_tokens_equal_transformers(tmp_path) -> None:
    """ChatGLM3's layout: GQA with 2 KV groups, rotary on half of each head, GPT-J style."""
    import ember

    from chatglm_checkpoint import glm_reference, reference_greedy, write_chatglm_checkpoint
    from checkpoints import TINY_VOCAB, write_tokenizer

    model_dir = write_chatglm_checkpoint(tmp_path / "glm")
    write_tokenizer(tmp_path / "tok", TINY_VOCAB)
    llm = _llm(model_dir, tokenizer=str(tmp_path / "tok"), dtype="float32")
    assert llm.engine.runner.backend.name == "torch"  # auto picks Triton for 16-bit only
    llm = _llm(
        model_dir, tokenizer=str(tmp_path / "tok"), dtype="float32", attention_backend="triton"
    )
    params = ember.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 9, 23, 7, 100], [17, 2, 8, 30, 31, 32]]
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    reference = glm_reference(model_dir)
    assert got == [reference_greedy(reference, p, 10) for p in prompts]


def test_cuda_graph_replay_equals_eager(tiny_llama) -> None:
    """The same decode batches through the graphs (padded to buckets) and eagerly."""
    graph_llm = _llm(tiny_llama, dtype="bfloat16")
    assert graph_llm.engine.runner.graphs is not None
    eager_llm = _llm(tiny_llama, dtype="bfloat16", enforce_eager=True)
    assert eager_llm.engine.runner.graphs is None
    for n in (1, 3):  # bucket 1 exactly, bucket 4 with a padding row
        torch.testing.assert_close(
            _step_logits(graph_llm, PROMPTS[:n]),
            _step_logits(eager_llm, PROMPTS[:n]),
            rtol=1e-2,
            atol=1e-2,
        )


_BROKEN_CAPTURE = """
import json, sys, torch, ember
from ember.engine.cuda_graphs import DecodeGraphs

def broken(self, backend, kv_caches):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            torch.ones(4, device="cuda").sum().item()  # a host sync: not capturable

DecodeGraphs._capture = broken
llm = ember.LLM(sys.argv[1], device="cuda", dtype="bfloat16", block_size=16,
                kv_cache_memory="64MiB", max_num_seqs=8)
params = ember.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
out = llm.generate(json.loads(sys.argv[2]), params)
print(json.dumps([llm.engine.runner.graphs is None, [o.outputs[0].token_ids for o in out]]))
"""


def test_a_failed_graph_capture_falls_back_to_eager_steps(tiny_llama) -> None:
    """A capture that raises (an op that cannot be captured) leaves a working eager engine.
    In its own process, so a CUDA context it might spoil is not the other tests'."""
    import json
    import subprocess
    import sys

    import ember

    run = subprocess.run(
        [sys.executable, "-c", _BROKEN_CAPTURE, str(tiny_llama), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CUDA graph capture failed" in run.stderr
    eager_only, got = json.loads(run.stdout.strip().splitlines()[-1])
    assert eager_only
    eager = _llm(tiny_llama, dtype="bfloat16", enforce_eager=True)
    params = ember.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert got == [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_on_cuda_match_their_dequantized_weights(
    tiny_llama, quantization: str
) -> None:
    """The Triton quantized matmul inside the engine (CUDA graphs included) against the same
    quantized weights dequantized into plain linear layers, in float32 for a tight bound."""
    from ember.models import layers

    quant = _llm(tiny_llama, dtype="float32", quantization=quantization)
    ours = _step_logits(quant, PROMPTS)
    assert "quant_linear" in dir(layers.quant_ops(torch.zeros(1, device="cuda")))
    for module in quant.engine.runner.model.modules():
        if isinstance(module, layers.Linear) and module.quant is not None:
            weight = module.dequantized_weight(torch.float32)
            module.quant = None
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
    quant.engine.runner.graphs = None
    ref = _step_logits(quant, PROMPTS)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
