"""EngineCore: one synchronous step of the engine (schedule → run → sample → stop checks).

Both front ends drive it: `AsyncEngine` calls `step()` in a loop on its own thread, and the
offline `LLM` calls it until its requests finish. Everything in and out is plain data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.chat.detokenizer import IncrementalDetokenizer
from ember.chat.tokenizer import Tokenizer
from ember.config import EngineConfig
from ember.engine.faults import Faults
from ember.engine.kv_cache import BlockAllocator
from ember.engine.request import (
    Logprob,
    RequestOutput,
    SamplingParams,
    SamplingParamsError,
    Sequence,
)
from ember.engine.runner import ModelRunner
from ember.engine.sampler import Sampler, SamplingRow
from ember.engine.scheduler import ScheduledSeq, Scheduler
from ember.engine.structured import GrammarBackend, GrammarMatcher, StructuredOutputsError
from ember.models import loader

log = logging.getLogger(__name__)


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, too long, unknown token ids)."""

    def __init__(self, message: str, param: str = "prompt") -> None:
        super().__init__(message)
        self.param = param


class KVCacheFullError(RuntimeError):
    """No room in the KV cache for this work right now (retry once running requests finish)."""


@dataclass
class _Live:
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_logprobs_sent: bool = False
    matcher: GrammarMatcher | None = None  # with structured_outputs: where the output stands


@dataclass(eq=False)
class EmbeddingJob:
    """One served-model embedding input in progress: its place in the request, its tokens,
    its borrowed KV blocks, and the sum of the hidden states computed so far."""

    index: int
    token_ids: list[int]
    blocks: list[int]
    done_tokens: int = 0
    total: torch.Tensor | None = None


@dataclass(eq=False)  # hashed by identity: the engine keeps a set of those in progress
class EmbeddingBatch:
    """One request's served-model embeddings: its inputs, those running, and the vectors."""

    inputs: list[list[int]]
    next: int = 0  # the next input to start
    running: list[EmbeddingJob] = field(default_factory=list)
    vectors: list[list[float] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


def _param(item: Sequence | SamplingRow) -> str:
    spec = item.params.structured_outputs
    return (spec.param if spec is not None else None) or "structured_outputs"


def _grammar_failed(matcher: GrammarMatcher) -> str:
    return f"The structured output's grammar cannot go on here: {matcher.error()}"


def _unmeetable(seq: Sequence) -> str:
    return (
        "No token the structured output allows here is allowed by the request's other "
        "constraints (allowed_token_ids, bad_words, logit_bias, min_tokens), so no output "
        f"can meet them all; it stopped after {seq.num_output_tokens} tokens."
    )


def _allowed(mask_row: torch.Tensor, token: int) -> bool:
    """Whether a grammar mask row (int32 words, one bit per token id) allows `token`."""
    word = token // 32
    return 0 <= word < mask_row.numel() and bool((int(mask_row[word]) >> (token % 32)) & 1)


def _is_decode(s: ScheduledSeq) -> bool:
    """One new token for a sequence already in the cache: a decode, not prefill work."""
    return s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0


def _as_id_set(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}  # type: ignore[union-attr]


# What a model's generation_config.json may set as the sampling defaults (vLLM's set).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class EngineCore:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        t0 = time.perf_counter()
        self.model_dir = loader.resolve_model_dir(cfg.model)
        self.hf_config = loader.load_config(self.model_dir)
        self.generation_config = loader.load_generation_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(cfg.tokenizer or self.model_dir)
        self.runner = ModelRunner(cfg, self.model_dir, self.hf_config)
        self.eos_token_ids = frozenset(
            _as_id_set(self.generation_config.get("eos_token_id"))
            | _as_id_set(self.hf_config.get("eos_token_id"))
            | _as_id_set(self.tokenizer.eos_token_id)
            | self.tokenizer.stop_token_ids  # e.g. ChatGLM3's <|user|> and <|observation|>
        )
        self.allocator = BlockAllocator(
            self.runner.num_blocks, self.runner.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.allocator,
            cfg.max_num_seqs,
            max(cfg.max_num_batched_tokens or self.runner.default_token_budget, 1),
            cfg.enable_chunked_prefill,
        )
        self.sampler = Sampler()
        self.structured = GrammarBackend(
            self.tokenizer,
            self.runner.vocab_size,
            cfg.structured_outputs_threads,
            cfg.structured_outputs_cache_size,
        )
        self.live: dict[str, _Live] = {}
        self.faults = Faults.from_env()
        self.last_step_tokens = 0  # tokens the model processed in the last step
        self.last_step_prompt_tokens = 0  # of them, prefill (prompts, recomputed sequences)
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ requests

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The sampling values the model's generation_config.json sets, for what a request
        leaves unset, as vLLM applies them; none when it says do_sample false (greedy models
        get their defaults from the request)."""
        gen = self.generation_config
        if gen.get("do_sample") is False:
            return {}
        return {k: gen[k] for k in GENERATION_DEFAULT_KEYS if k in gen}

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise PromptError("The prompt is empty.")
        self._check_vocab(prompt_token_ids, "Prompt")
        params.check_vocab(self.runner.vocab_size)
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise PromptError(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n} tokens, which leaves no room to generate."
            )

    def _check_vocab(self, token_ids: list[int], what: str) -> None:
        vocab = self.runner.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"{what} token id {bad[0]} is outside the vocabulary of {vocab}.")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self.live:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        generator = None
        if params.seed is not None:
            # On the model's device, where the sampler draws the noise.
            # Any integer a client sends is a valid seed: fold it into the generator's 64 bits.
            seed = params.seed & 0xFFFF_FFFF_FFFF_FFFF
            if self.runner.device.type == "cpu":
                # The CPU generator (mt19937) keeps only 32 bits: fold the high half in, so
                # seeds that differ there (1 and 2**32 + 1) do not draw alike. Adding it times
                # a large odd constant (not xor-ing it) keeps the n consecutive seeds of one
                # request apart where they cross zero (-1 and 0) or a multiple of 2**32.
                seed = ((seed & 0xFFFF_FFFF) + (seed >> 32) * 0x9E37_79B9) & 0xFFFF_FFFF
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        stop_ids = frozenset(params.stop_token_ids or ()) | self.eos_token_ids
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params)
        live = _Live(seq, detok, generator, stop_ids)
        if params.structured_outputs is not None:
            # The server compiled it already (off this thread); offline callers compile here.
            live.matcher = self.structured.matcher(params.structured_outputs)
        if params.prompt_logprobs is not None:
            live.prompt_logprobs = [None]  # nothing predicts the first prompt token
        self.live[request_id] = live
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        live = self.live.pop(request_id, None)
        if live is None:
            return False
        self.scheduler.finish(live.seq, "abort")
        return True

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output: the runner's (model, window and KV cache bounds)."""
        return self.runner.max_model_len

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        a = self.allocator
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            a.usage(),
            a.prefix_queries,
            a.prefix_hits,
            self.scheduler.num_preemptions,
        )

    def validate_embedding(self, prompt_token_ids: list[int]) -> None:
        """Raise PromptError for an input the model cannot embed (empty, too long, bad ids)."""
        if not prompt_token_ids:
            raise PromptError("An embedding input must have at least one token.", "input")
        self._check_vocab(prompt_token_ids, "Input")
        n = len(prompt_token_ids)
        if n > self.max_model_len:  # no token to generate, so the whole context is the input's
            raise PromptError(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the input has {n} tokens."
            )

    def embed_step(self, batch: EmbeddingBatch) -> bool:
        """One forward pass of a request's served-model embeddings, batched as prefill is:
        start inputs while the pass's token budget has room and the KV pool has blocks for
        them (borrowed, never published to the prefix cache), prefill the started ones' next
        chunks in order, and give a finished input's blocks back at once. True when every
        input has its vector. KVCacheFullError if an input cannot start while none runs."""
        allocator, budget = self.allocator, self.scheduler.max_num_batched_tokens
        planned = sum(len(job.token_ids) - job.done_tokens for job in batch.running)
        while batch.next < len(batch.inputs) and planned < budget:
            ids = batch.inputs[batch.next]
            need = allocator.blocks_needed(len(ids))
            if not allocator.can_allocate(need):
                if batch.running:
                    break  # the ones running make room as they finish
                raise KVCacheFullError(
                    f"The KV cache has no room for this {len(ids)}-token input right now; "
                    "retry the embedding request."
                )
            batch.running.append(EmbeddingJob(batch.next, list(ids), allocator.allocate(need)))
            batch.next += 1
            planned += len(ids)
        parts: list[tuple[EmbeddingJob, int]] = []  # (job, end of its chunk)
        for job in batch.running:
            take = min(len(job.token_ids) - job.done_tokens, budget)
            if take <= 0:
                break
            parts.append((job, job.done_tokens + take))
            budget -= take
        sums = self.runner.embed_chunks(
            [(job.token_ids, job.blocks, job.done_tokens, end) for job, end in parts]
        )
        for (job, end), part in zip(parts, sums):
            job.total = part if job.total is None else job.total + part
            job.done_tokens = end
            if end == len(job.token_ids):
                mean = job.total / end
                batch.vectors[job.index] = torch.nn.functional.normalize(mean, dim=-1).tolist()
                allocator.free_blocks(job.blocks)
                batch.running.remove(job)
        return batch.next == len(batch.inputs) and not batch.running

    def embed_end(self, batch: EmbeddingBatch) -> None:
        """Give back the blocks of the batch's unfinished inputs (safe to call again)."""
        for job in batch.running:
            self.allocator.free_blocks(job.blocks)
        batch.running.clear()

    def embed_many(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised last hidden state of the served model for each input,
        as many inputs per forward pass as a token budget holds."""
        for ids in inputs:  # every input checked before any runs
            self.validate_embedding(ids)
        batch = EmbeddingBatch(inputs)
        try:
            while not self.embed_step(batch):
                pass
        finally:
            self.embed_end(batch)
        return batch.vectors  # type: ignore[return-value]

    def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """`embed_many` of one input."""
        return self.embed_many([prompt_token_ids])[0]

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        for s in out.scheduled:
            (decodes if _is_decode(s) else prefills).append(s)
        self.last_step_prompt_tokens = sum(s.num_new_tokens for s in prefills)
        self.last_step_tokens = len(decodes) + self.last_step_prompt_tokens
        if not out.scheduled:
            return []
        # Decodes first (each in scheduling order), as the runner's attention metadata expects.
        batch = decodes + prefills
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        wants_prompt = frozenset(
            i
            for i, item in enumerate(batch)
            if (pl := self.live[item.seq.request_id].prompt_logprobs) is not None
            # A chunk that holds where scoring left off: the first pass's chunks start there;
            # a recompute after preemption is chunked anew, and its rows before it are dropped.
            and item.seq.num_computed_tokens
            <= len(pl) - 1
            < min(
                item.seq.num_computed_tokens + item.num_new_tokens, item.seq.num_prompt_tokens - 1
            )
        )
        self.faults.on_step([item.seq.prompt_token_ids for item in batch])
        logits, prompt_logits = self.runner.execute(batch, wants_prompt)
        for i, rows in prompt_logits.items():
            self._add_prompt_logprobs(batch[i].seq, rows)

        sampling = [item for item in batch if item.samples]
        rows = []
        for item in sampling:
            live = self.live[item.seq.request_id]
            rows.append(
                SamplingRow(
                    params=item.seq.params,
                    prompt_token_ids=item.seq.prompt_token_ids,
                    output_token_ids=item.seq.output_token_ids,
                    generator=live.generator,
                    stop_ids=live.stop_ids,
                )
            )
        constrained = [
            (j, m)
            for j, item in enumerate(sampling)
            if (m := self.live[item.seq.request_id].matcher) is not None
        ]
        if constrained:  # only these rows pay: fill their bitmask rows, mask their logits
            bitmask = self.structured.fill_bitmasks(
                [m for _, m in constrained], [rows[j].stop_ids for j, _ in constrained]
            )
            self.structured.apply_bitmask(logits, [j for j, _ in constrained], bitmask)
        token_ids, logprobs, failed = self._sample(logits, rows)
        outside = set()  # rows whose token the grammar's mask did not allow
        for k, (j, m) in enumerate(constrained):
            if m.is_error():  # the grammar could not say what may come next (a limit of it)
                failed.setdefault(j, StructuredOutputsError(_grammar_failed(m), _param(rows[j])))
            elif not _allowed(bitmask[k], token_ids[j]):
                outside.add(j)

        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens

        outputs = []
        now = time.monotonic()
        for i, (item, token, logprob) in enumerate(zip(sampling, token_ids, logprobs)):
            if i in failed:
                outputs.append(self._fail(item.seq, failed[i]))
                continue
            try:
                outputs.append(self._emit(item.seq, token, logprob, now, i in outside))
            except Exception as e:  # noqa: BLE001 (one request's fault fails that request only)
                log.exception("request %s failed after sampling", item.seq.request_id)
                outputs.append(self._fail(item.seq, e))
        return outputs

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[Logprob | None], dict[int, Exception]]:
        """The batch's tokens; if sampling the batch fails, each row alone, so one request's
        corner case fails that request only. Failed rows get token -1 and their exception."""
        if not rows:
            return [], [], {}
        try:
            token_ids, logprobs = self.sampler(logits, rows)
            return list(token_ids), list(logprobs), {}
        except Exception:  # noqa: BLE001 (find the row at fault below)
            log.exception("batched sampling failed; sampling row by row")
        token_ids, logprobs, failed = [], [], {}
        for i, row in enumerate(rows):
            try:
                t, lp = self.sampler(logits[i : i + 1], [row])
                token_ids.append(t[0])
                logprobs.append(lp[0])
            except Exception as e:  # noqa: BLE001
                token_ids.append(-1)
                logprobs.append(None)
                failed[i] = e
        return token_ids, logprobs, failed

    def _emit(
        self,
        seq: Sequence,
        token: int,
        logprob: Logprob | None,
        now: float,
        outside_mask: bool = False,
    ) -> RequestOutput:
        """Append a sampled token, detokenize it, check the stops: one sequence's share.
        `outside_mask`: the grammar's mask did not allow the token (other rules banned all
        it did)."""
        live = self.live[seq.request_id]
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason, stop_reason = self._check_stop(seq, token)
        self.faults.on_detokenize(token)
        kept = True
        matcher = live.matcher
        grammar_bound = matcher is not None and reason is None and token not in live.stop_ids
        if grammar_bound and (outside_mask or not matcher.accept(token)):
            seq.token_ids.pop()  # outside the grammar: not part of the output
            kept = False
            if not outside_mask:  # allowed, yet the grammar failed on it (a limit of it)
                return self._fail(
                    seq, StructuredOutputsError(_grammar_failed(matcher), _param(seq))
                )
            if not matcher.is_accepting():
                return self._fail(seq, StructuredOutputsError(_unmeetable(seq), _param(seq)))
            reason = "stop"  # complete as it is: min_tokens or a ban kept its end away
        if reason == "stop":  # a stop token: its text is not part of the output
            text, stop_str = live.detok.flush()
            stop_reason = stop_str or stop_reason
        else:
            if reason is None and matcher is not None and matcher.is_terminated():
                reason = "stop"  # the grammar allows nothing more: the output is complete
            text, stop_str = live.detok.add_tokens([token])
            if stop_str is not None:
                reason, stop_reason = "stop", stop_str
            elif reason is not None:
                rest, stop_str = live.detok.flush()
                text += rest
                if stop_str is not None:  # in a held first line, decided only now
                    reason, stop_reason = "stop", stop_str
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
            del self.live[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            new_token_ids=[token] if kept else [],
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            new_logprobs=None if logprob is None or not kept else [logprob],
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            prompt_logprobs=self._take_prompt_logprobs(live),
            queue_seconds=(
                seq.first_scheduled_time - seq.arrival_time
                if seq.num_output_tokens == 1 and seq.first_scheduled_time
                else None
            ),
        )

    def _fail(self, seq: Sequence, exc: BaseException) -> RequestOutput:
        """End one sequence with an error and free its blocks; the step goes on. A
        SamplingParamsError is the request's own fault (a 400), any other the server's."""
        self.live.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            new_token_ids=[],
            new_text="",
            finished=True,
            finish_reason="error",
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            error=f"{type(exc).__name__}: {exc}",
            rejection=exc if isinstance(exc, SamplingParamsError) else None,
        )

    def _add_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens start+1 .. start+n from the logits at start .. start+n-1
        (`logits` begin at the step's first new position, at or before start)."""
        live = self.live[seq.request_id]
        assert live.prompt_logprobs is not None
        k = seq.params.prompt_logprobs or 0
        start = len(live.prompt_logprobs) - 1  # position whose logits come first
        logits = logits[start - seq.num_computed_tokens :]  # rows scored before a preemption
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = seq.prompt_token_ids[start + 1 : start + 1 + len(logprobs)]
        # On the logits' device (the GPU's, there), then one copy of each small result to the
        # host, not one synchronising read per prompt token.
        index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        chosen_t = logprobs.gather(1, index)
        chosen = chosen_t.squeeze(1).tolist()
        ranks = ((logprobs > chosen_t).sum(dim=1) + 1).tolist()
        top_ids: list[list[int]] = [[] for _ in targets]
        top_lps: list[list[float]] = [[] for _ in targets]
        if k:
            top = torch.topk(logprobs, k, dim=-1)
            top_ids, top_lps = top.indices.tolist(), top.values.tolist()
        for j, token in enumerate(targets):
            alternatives = list(zip(top_ids[j], top_lps[j]))
            live.prompt_logprobs.append(Logprob(token, chosen[j], ranks[j], alternatives))

    @staticmethod
    def _take_prompt_logprobs(live: _Live) -> list[Logprob | None] | None:
        if live.prompt_logprobs is None or live.prompt_logprobs_sent:
            return None
        live.prompt_logprobs_sent = True
        return live.prompt_logprobs

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        params = seq.params
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if token in (params.stop_token_ids or ()):
                return "stop", token
            if not params.ignore_eos and token in self.eos_token_ids:
                # As vLLM: the model's own end of text is no stop_reason; another end token
                # (generation_config's, like ChatGLM3's <|user|>) is named by its id.
                return "stop", None if token == self.tokenizer.eos_token_id else token
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None, None
