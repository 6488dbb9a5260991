"""Turns a scheduled batch into tensors, runs the model, returns logits for sampling rows.

Owns the model, the device, the dtype and the KV cache tensors; the scheduler and the block
allocator only ever see block numbers. On CUDA, decode-only steps replay a captured CUDA graph
(`cuda_graphs.py`) unless --enforce-eager; prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember import native
from ember.config import EngineConfig, parse_bytes
from ember.engine.attention import AttentionBackend, SeqSpan, get_backend
from ember.engine.cuda_graphs import DecodeGraphs, fill_decode_rows
from ember.engine.scheduler import ScheduledSeq
from ember.models import loader, quant
from ember.models.cpu_decode import CpuQuantDecoder
from ember.models.registry import model_class

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_BYTES = 512 << 20
CPU_PACK_BATCH_HINT = 32
_OUTPUT_LAYERS = (
    "lm_head",
    "transformer.output_layer",
)  # rows oneDNN lays packed weights out for: a busy decode step


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available. A CUDA device always carries its index (`cuda:1` stays 1)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_device(name: str) -> None:
    """Refuse a --device that cannot run here, with a line that says why."""
    try:
        device = pick_device(name)
    except RuntimeError as e:  # torch's own words list every device type it knows
        raise ValueError(f"--device {name!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device {name}: no CUDA GPU is visible (torch is {build})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    # On the CPU float32 is the faster one on this class of hardware (no native bf16 matmul
    # on AVX2; measured in benchmarks/RESULTS.md) and it is exact against references.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    sample_rows: torch.Tensor  # flat index of the last token of each sampling sequence


def _visible_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_cpu_threads(requested: int | None) -> None:
    """Threads for torch and Ember's C kernels: `--num-threads`, else no more than the
    container's CPU quota (a pod's `limits.cpu`), which neither torch nor OpenMP reads."""
    threads = requested
    if threads is None:
        quota = native.cpu_quota()
        if quota is None or quota >= _visible_cpus():
            return
        threads = min(quota, torch.get_num_threads())  # OMP_NUM_THREADS may ask fewer
        log.info("%d CPU threads, by the container's CPU quota of %d", threads, quota)
    torch.set_num_threads(threads)
    native.set_threads(threads)


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_dir: Path, hf_config: dict) -> None:
        self.cfg = cfg
        check_device(cfg.device)
        self.device = pick_device(cfg.device)
        self.bind_thread()
        self.dtype = pick_dtype(cfg.dtype, self.device)
        # Small blocks on the CPU: the prefix cache then covers more of a shared system prompt
        # (prefill is compute there); on GPU, 16-token blocks keep block tables short.
        self.block_size = cfg.block_size or (16 if self.device.type == "cuda" else 8)
        set_cpu_threads(cfg.num_threads)
        cls = model_class(hf_config)
        t0 = time.perf_counter()
        with torch.device("meta"):
            probe = cls(hf_config, backend=None)  # only to read the attention shape
        num_layers, num_heads, num_kv_heads, head_dim = probe.attention_shape
        del probe
        backend_name = cfg.attention_backend
        if backend_name == "auto":
            backend_name = self._auto_backend(num_heads, num_kv_heads, head_dim)
        self.backend: AttentionBackend = get_backend(backend_name)(
            num_heads, num_kv_heads, head_dim, self.block_size
        )
        # Build on `meta` and materialise uninitialised, already in the run dtype: the weights
        # are overwritten anyway, and a 7B model never exists in float32 (28 GB) on the way.
        with torch.device("meta"):
            model = cls(hf_config, self.backend).to(self.dtype)
        # Quantized layers swap their float weight for quantized buffers while still on
        # `meta`, so a 7B model at int4 never holds its float weights either.
        self._gguf_keep = self._plan_quantization(model)
        self.model = model.to_empty(device=self.device)
        for module in self.model.modules():
            if hasattr(module, "reset") and module is not self.model:
                module.reset()
        lm_head = getattr(self.model, "lm_head", None)
        if getattr(self.model.args, "tie_word_embeddings", False) and lm_head.quant is None:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        if cfg.load_format == "dummy":
            loader.init_dummy_weights(self.model, cfg.seed)
            quant.init_dummy_quantized(self.model, cfg.seed)
        else:
            self._load(model_dir)
        self.model.eval()
        self._pack_linears()
        self.quantization = quant.describe(self.model)
        log.info(
            "model loaded in %.1fs (%s, %s, quantization %s)",
            time.perf_counter() - t0,
            self.dtype,
            self.device,
            self.quantization,
        )

        self.num_layers = num_layers
        kv_bytes_per_block = 2 * num_layers * self.block_size * num_kv_heads * head_dim
        kv_bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        budget = self._kv_budget()
        self.num_blocks = budget // kv_bytes_per_block
        if self.num_blocks < 1:
            where = (
                "--kv-cache-memory"
                if self.cfg.kv_cache_memory or self.device.type != "cuda"
                else f"--gpu-memory-utilization {self.cfg.gpu_memory_utilization} of the GPU, "
                "after the weights and one step's activations,"
            )
            raise ValueError(
                f"no room for the KV cache: {where} leaves {max(budget, 0) / 2**20:.1f} MiB, and "
                f"one block of {self.block_size} tokens takes {kv_bytes_per_block / 2**20:.2f} MiB"
            )
        self.kv_caches = self.backend.allocate_cache(
            num_layers, self.num_blocks, self.dtype, self.device
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%.0f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * kv_bytes_per_block / 2**20,
        )
        model_len, capacity = self._model_len(cfg), self.num_blocks * self.block_size
        if model_len > capacity:
            log.warning("max_model_len %d capped to the KV cache's %d tokens", model_len, capacity)
        self.max_model_len = min(model_len, capacity)
        # Quantized models on the CPU run decode steps through every layer in one C call.
        self.fused_decode = CpuQuantDecoder.build(self.model, self.backend, self.kv_caches)
        self.graphs: DecodeGraphs | None = None
        if (
            self.device.type == "cuda"
            and not cfg.enforce_eager
            and getattr(self.backend, "supports_cuda_graphs", False)
        ):
            try:
                self.graphs = DecodeGraphs(
                    self.model,
                    self.backend,
                    self.kv_caches,
                    max(1, cfg.max_num_seqs),
                    self.max_model_len,
                    self.block_size,
                    self.device,
                )
            except RuntimeError as e:
                # Serving slower beats not serving; a broken device fails the sync below.
                log.warning(
                    "CUDA graph capture failed, so decode steps run eagerly "
                    "(as with --enforce-eager): %s",
                    e,
                )
                torch.cuda.synchronize(self.device)

    def bind_thread(self) -> None:
        """Make this runner's GPU the calling thread's current CUDA device. CUDA's current
        device is per thread, and Triton launches, new streams and synchronize() all use it:
        with `--device cuda:1` they would otherwise go to GPU 0."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _auto_backend(self, num_heads: int, num_kv_heads: int, head_dim: int) -> str:
        from ember.engine.attention.cpu_backend import CpuAttentionBackend

        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            from ember.engine.attention.triton_backend import triton_available

            if triton_available():
                return "triton"

        on_cpu = self.device.type == "cpu" and self.dtype == torch.float32
        if on_cpu and CpuAttentionBackend.available(num_heads, num_kv_heads, head_dim):
            return "cpu"
        return "torch"

    def _model_len(self, cfg: EngineConfig) -> int:
        """--max-model-len, or the model's own; never past its positions or a sliding window.

        Ember's attention sees the whole context, which is exact only while the context fits
        in the window the model was trained with (Mistral-7B-v0.1: 4096 tokens)."""
        own = self.model.max_model_len
        want = cfg.max_model_len or own
        if want > own:
            # Past the positions the model was trained on its rotary table ends (on CUDA an
            # out-of-range index is a device assert that poisons every later request).
            raise ValueError(
                f"--max-model-len {want} is longer than the {own} positions the model was "
                "trained with (max_position_embeddings / seq_length in its config.json)"
            )
        window = getattr(self.model, "sliding_window", None)
        if window is not None and want > window:
            log.warning(
                "max_model_len %d capped to the model's sliding attention window of %d tokens "
                "(attention over a longer context would not match the model)",
                want,
                window,
            )
            want = window
        return want

    def _plan_quantization(self, model: torch.nn.Module) -> set[str] | None:
        """Turn the model's linear layers quantized as --quantization says; returns, for a GGUF
        file kept in its own precision, the checkpoint names to read still quantized."""
        from ember.models.layers import Linear

        mode = self.cfg.quantization
        gguf = loader.gguf_source(self.cfg.model) if self.cfg.load_format != "dummy" else None
        if mode == "auto":
            mode = "gguf" if gguf is not None else "none"
        if mode == "none":
            return None
        linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
        if mode in ("int8", "int4"):
            fmt = (
                quant.INT8_CHANNEL
                if mode == "int8"
                else quant.int4_format(self.cfg.quantization_group_size)
            )
            for name, m in linears.items():
                # The output layer keeps 8 bits under int4, as llama.cpp's 4-bit files keep it
                # at 6-8: at 4 bits SmolLM2's tied output moved its logits by 13% of their
                # largest value, against 0.6% at 8.
                m.quantize_(quant.INT8_CHANNEL if name in _OUTPUT_LAYERS else fmt)
            return None
        # A GGUF file: each linear layer takes the layout of the tensors it is made of.
        types = loader.gguf_tensor_types(gguf)
        sources: dict[str, list[str]] = {}
        stacked = getattr(model, "stacked", {})
        tied = getattr(model.args, "tie_word_embeddings", False)
        for name in types:
            target = name
            for part, (fused, _) in stacked.items():
                target = target.replace(f".{part}.", f".{fused}.")
            if name == "model.embed_tokens.weight" and tied:
                target = "lm_head.weight"
            sources.setdefault(target.removesuffix(".weight"), []).append(name)
        keep: set[str] = set()
        for mod_name, module in linears.items():
            names = sources.get(mod_name, [])
            fmts = [quant.GGUF_FORMATS.get(types[n]) for n in names]
            if not names or None in fmts:
                kinds = sorted({types[n] for n in names})
                log.info("%s (%s) runs dequantized: no exact layout", mod_name, ",".join(kinds))
                continue
            module.quantize_(quant.join(f for f in fmts if f is not None))
            keep.update(names)
        return keep

    def _pack_linears(self) -> None:
        """On the CPU, pre-pack every linear weight (a tied one keeps its plain copy too)."""
        from ember.models.layers import Linear

        if self.device.type != "cpu" or self.dtype != torch.float32:
            return
        owners: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        for module in self.model.modules():
            if isinstance(module, Linear):
                module.pack_for_cpu(CPU_PACK_BATCH_HINT, shared=owners.get(id(module.weight)) != 1)

    def _load(self, model_dir: Path) -> None:
        from ember.models.layers import weight_targets

        if self._gguf_keep is not None:
            path = loader.gguf_source(self.cfg.model)
            weights = loader.iter_gguf_weights(path, self._gguf_keep)
        else:
            weights = loader.iter_weights(model_dir)
        loaded = self.model.load_weights(weights)
        missing = set(weight_targets(self.model)) - loaded
        if getattr(self.model.args, "tie_word_embeddings", False):
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")

    def _kv_budget(self) -> int:
        if self.cfg.kv_cache_memory:
            return parse_bytes(self.cfg.kv_cache_memory)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            # Blocks the allocator keeps from loading are free for the cache, not "used".
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # Leave room for activations of one full step (logits dominate).
            budget = self.cfg.max_num_batched_tokens or self.default_token_budget
            headroom = 2 * budget * self.model.args.vocab_size * 4
            return max(0, int(total * self.cfg.gpu_memory_utilization) - used - headroom)
        return CPU_DEFAULT_KV_BYTES

    @property
    def default_token_budget(self) -> int:
        return 4096 if self.device.type == "cuda" else 256

    @property
    def vocab_size(self) -> int:
        return self.model.args.vocab_size

    def _prepare(self, batch: list[ScheduledSeq]) -> tuple[StepInputs, list[SeqSpan], int]:
        ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        sample_rows: list[int] = []
        num_decodes = 0
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            spans.append(SeqSpan(len(ids), n, start + n, seq.block_table))
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if item.samples:
                sample_rows.append(len(ids) - 1)
            if n == 1 and start > 0:
                num_decodes += 1
        dev = self.device
        inputs = StepInputs(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        return inputs, spans, num_decodes

    @torch.inference_mode()
    def execute(
        self, batch: list[ScheduledSeq], prompt_logits_for: frozenset[int] = frozenset()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run one step. `batch` must list decodes (one new token, some context) first.

        Returns float32 logits, one row per sequence that samples, in batch order; and, for
        the batch positions in `prompt_logits_for`, the logits at each of their new prompt
        tokens that predict a later prompt token (for prompt logprobs).
        """
        if (
            self.graphs is not None
            and not prompt_logits_for
            and all(
                item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0 and item.samples
                for item in batch
            )
            and self.graphs.can_run(batch)
        ):
            logits = self.graphs.run(batch, self._fill_decode_rows)
            return logits.float(), {}
        inputs, spans, num_decodes = self._prepare(batch)
        meta = self.backend.build_metadata(spans, num_decodes, self.kv_caches, self.device)
        if self.fused_decode is not None and self.fused_decode.applies(meta):
            hidden = self.fused_decode(inputs.input_ids, inputs.positions, meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, meta)
        sample = self.model.compute_logits(hidden[inputs.sample_rows]).float()
        prompt: dict[int, torch.Tensor] = {}
        for i in prompt_logits_for:
            span, seq = spans[i], batch[i].seq
            start = seq.num_computed_tokens
            # Positions p whose next token p + 1 is still part of the prompt.
            n = min(span.query_len, seq.num_prompt_tokens - 1 - start)
            if n > 0:
                rows = hidden[span.query_start : span.query_start + n]
                prompt[i] = self.model.compute_logits(rows).float()
        return sample, prompt

    def _fill_decode_rows(self, rows, batch: list[ScheduledSeq]) -> None:
        fill_decode_rows(rows, batch, self.block_size)

    @torch.inference_mode()
    def embed_chunks(
        self, parts: list[tuple[list[int], list[int], int, int]]
    ) -> list[torch.Tensor]:
        """One forward pass over several inputs' chunks, each `(token_ids, blocks, start,
        end)`: tokens [start, end) attend to [0, start) through the KV cache as chunked
        prefill does. Returns each chunk's sum of last hidden states (float32)."""
        ids: list[int] = []
        positions: list[int] = []
        spans: list[SeqSpan] = []
        for token_ids, blocks, start, end in parts:
            spans.append(SeqSpan(len(ids), end - start, end, blocks))
            ids.extend(token_ids[start:end])
            positions.extend(range(start, end))
        meta = self.backend.build_metadata(spans, 0, self.kv_caches, self.device)
        dev = self.device
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
        ).float()
        return [hidden[s.query_start : s.query_start + s.query_len].sum(0) for s in spans]
