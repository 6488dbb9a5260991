"""What every OpenAI-style route shares: sampling parameters from a request, fan-out of n
sequences, streams merged and collected, client disconnects, SSE events and usage."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from ember.engine.async_engine import (
    AdmissionTicket,
    EngineDeadError,
    RequestFailedError,
    RequestTimeoutError,
    ServerShuttingDownError,
)
from ember.engine.request import Logprob, RequestOutput, SamplingParams
from ember.engine.structured import StructuredOutputsParams
from ember.server import protocol as P
from ember.server.errors import APIError, error_body, to_api_error
from ember.server.state import ServerState

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# A request body this large (bytes) is tokenized off the event loop. Tokenizing takes about
# 2.5 s per megabyte here, and the tokenizer lets go of the GIL meanwhile, so health probes and
# other streams go on. Smaller prompts take a millisecond or less: on the loop, no thread hop.
OFF_LOOP_BYTES = 64 * 1024


async def tokenize_off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, in a worker thread when the request is large (or its size unknown)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) < OFF_LOOP_BYTES:
        return fn(*args)
    return await off_loop(fn, *args)


# Blocking work for requests. Not the event loop's default pool: the loop's close waits for
# that one's threads, so a batch of embeddings or a large tokenization still running when the
# drain ends held the process's exit for seconds. (`ember serve` ends with os._exit, which
# does not wait for these either.)
_POOL = ThreadPoolExecutor(thread_name_prefix="ember-off-loop")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread of `_POOL`, which the event loop's close does not wait for."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, fn, *args)


@dataclass
class SeqResult:
    """One finished sequence, gathered from its stream."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def sampling_params(
    req: P.SamplingFields,
    state: ServerState,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_name: str = "messages",
) -> SamplingParams:
    """Request values, else the model's generation_config, else OpenAI's defaults.
    `prompt_name`: the request's field that holds the prompt, for context-length errors."""
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(
            "prompt_logprobs come with the whole response, not in a stream.",
            param="prompt_logprobs",
        )
    if req.stream_options is not None and not req.stream:
        # As OpenAI and vLLM answer it: the options only shape a stream.
        raise APIError(
            "stream_options is only allowed when stream is true.", param="stream_options"
        )
    gen = state.generation_defaults
    room = state.max_model_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_name}, "
            f"{max_tokens} in the completion). Please reduce the length of the {prompt_name} "
            "or completion.",
            # The prompt alone fills the context: no max_tokens would do.
            param=prompt_name if room <= 0 else "max_tokens",
            code="context_length_exceeded",
        )
    if room <= 0:
        raise APIError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, "
            f"your {prompt_name} resulted in {prompt_len} tokens. Please reduce its length.",
            param=prompt_name,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, state.config.default_max_tokens or room)
    bias = None
    if req.logit_bias:
        # Digits only: int() would also read "1_0" as 10 and " 7" as 7.
        if not all(re.fullmatch(r"[0-9]{1,10}", k) for k in req.logit_bias):
            raise APIError("logit_bias keys must be token ids.", param="logit_bias")
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}

    def pick(name: str, default: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else gen.get(name, default)

    return SamplingParams(
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0),
        min_p=pick("min_p", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=structured_outputs(req),
        prompt_logprobs=req.prompt_logprobs,
        allowed_token_ids=req.allowed_token_ids,
        bad_words_token_ids=bad_words_token_ids(state, req.bad_words),
    )


def bad_words_token_ids(state: ServerState, words: list[str] | None) -> list[list[int]] | None:
    """Each bad word's token ids, as vLLM finds them: the word as written (a text's start),
    and after a space (mid-text) where that spells it in as many tokens, starting elsewhere."""
    if not words:
        return None
    out: list[list[int]] = []
    for word in words:
        spellings = _bad_word_spellings(state.tokenizer, word.lstrip())
        if not spellings:
            raise APIError("bad_words must not be empty or blank.", param="bad_words")
        out += [list(ids) for ids in spellings]
    return out


# A completion request asks this once per prompt, with the same words: tokenize them once.
@functools.lru_cache(maxsize=256)
def _bad_word_spellings(tokenizer: Any, word: str) -> tuple[tuple[int, ...], ...]:
    plain = tuple(tokenizer.encode(word, add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" " + word, add_special_tokens=False))
    if not plain:
        return ()
    if len(spaced) == len(plain) and spaced[0] != plain[0]:
        return plain, spaced
    return (plain,)


def prompt_logprobs(
    state: ServerState, prompt_ids: list[int], lps: list[Logprob | None] | None, k: int
) -> P.PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token (None for the first, which nothing predicts),
    the token's own logprob and rank, then the k likeliest there."""
    out: P.PromptLogprobs = []
    for i, token_id in enumerate(prompt_ids):
        lp = lps[i] if lps and i < len(lps) else None
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(token_id): P.PromptLogprob(
                logprob=lp.logprob, rank=lp.rank, decoded_token=token_text(state, token_id)
            )
        }
        for rank, (t, v) in enumerate(lp.top[:k], start=1):
            entry.setdefault(
                str(t), P.PromptLogprob(logprob=v, rank=rank, decoded_token=token_text(state, t))
            )
        out.append(entry)
    return out


def kept_tokens(k: int | None, limit: int) -> int | None:
    """vLLM's truncate_prompt_tokens against a model's limit: None (keep every token), or how
    many of the last tokens to keep (-1: the limit)."""
    if k is None:
        return None
    if k == -1:
        return limit
    if not 1 <= k <= limit:
        raise APIError(
            f"truncate_prompt_tokens must be -1 or from 1 to the model's limit ({limit}); got {k}.",
            param="truncate_prompt_tokens",
        )
    return k


def truncate_prompt(req: Any, state: ServerState, ids: list[int]) -> list[int]:
    """The prompt's last truncate_prompt_tokens tokens (all of them when it is unset)."""
    k = kept_tokens(req.truncate_prompt_tokens, state.max_model_len)
    return ids if k is None else ids[-k:]


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# vLLM's options of its structured_outputs field that pick among its backends: nothing to pick.
_BACKEND_OPTIONS = {"backend", "disable_fallback", "disable_any_whitespace", "whitespace_pattern"}
_BACKEND_OPTIONS |= {"disable_additional_properties"}


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """The constraint a request asks for: `structured_outputs` (or vLLM's older `guided_*`
    fields), else `response_format`."""
    extra = getattr(req, "structured_outputs", None)
    if isinstance(extra, dict) and extra and set(extra) <= _BACKEND_OPTIONS:
        extra = None  # vLLM's backend options alone: no constraint of their own
    guided = [f for f in _GUIDED if getattr(req, f, None) is not None]
    given = [*guided, *(["structured_outputs"] if extra is not None else [])]
    fmt = getattr(req, "response_format", None)
    if given and fmt is not None and fmt.type != "text":
        given.append("response_format")
    if len(given) > 1:
        raise APIError(f"Give one constraint, not several: {', '.join(given)}.", param=given[0])
    if guided:
        kind = guided[0].removeprefix("guided_")
        return StructuredOutputsParams(**{kind: getattr(req, guided[0])}, param=guided[0])
    if extra is not None:
        spec = {k: v for k, v in extra.items() if k not in _BACKEND_OPTIONS}
        return StructuredOutputsParams.of(spec)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, param="response_format")
    js = fmt.json_schema
    if js is None:
        raise APIError(
            "response_format of type json_schema needs json_schema: {name, schema, strict}.",
            param="response_format.json_schema",
        )
    if not _SCHEMA_NAME.fullmatch(js.name):
        raise APIError(
            "response_format.json_schema.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -; "
            f"got {js.name!r}.",
            param="response_format.json_schema.name",
        )
    # strict or not, the schema is enforced (as vLLM does): a guarantee costs nothing extra.
    schema = js.schema_ if js.schema_ is not None else {"type": "object"}
    return StructuredOutputsParams(json=schema, param="response_format")


async def compile_structured(
    state: ServerState, jobs: list[tuple[list[int], SamplingParams]]
) -> None:
    """Compile each job's schema or grammar off the engine thread, before any response (or
    stream) starts, so one that cannot compile is a 400 naming the problem."""
    assert state.engine is not None
    seen: set[str] = set()
    for _, params in jobs:
        spec = params.structured_outputs
        if spec is not None and spec.key not in seen:
            seen.add(spec.key)
            await state.engine.prepare_structured(params)


async def tracked(
    state: ServerState,
    ids: list[int],
    params: SamplingParams,
    request_id: str,
    ticket: AdmissionTicket | None = None,
) -> AsyncIterator[RequestOutput]:
    """engine.generate(), observed for the Prometheus histograms and counters."""
    assert state.engine is not None
    m, model = state.metrics, state.model_name
    start = time.monotonic()
    first: float | None = None
    n_out = 0
    finished = False
    try:
        async for out in state.engine.generate(ids, params, request_id, ticket):
            now = time.monotonic()
            if first is None and out.new_token_ids:
                first = now
                m.ttft.labels(model).observe(now - start)
                m.prompt_tokens.labels(model).inc(len(ids))
            if out.queue_seconds is not None:
                m.queue_time.labels(model).observe(out.queue_seconds)
            n_out += len(out.new_token_ids)
            m.generation_tokens.labels(model).inc(len(out.new_token_ids))
            if out.finished:
                finished = True
                m.e2e.labels(model).observe(now - start)
                m.request_success.labels(model, out.finish_reason or "stop").inc()
                if first is not None and n_out > 1:
                    m.tpot.labels(model).observe((now - first) / (n_out - 1))
            yield out
    except (GeneratorExit, asyncio.CancelledError, RequestTimeoutError, ServerShuttingDownError):
        # Ended from outside before it finished: the client left, --request-timeout, or the
        # drain's deadline. Counted as vLLM counts it, so the sum of reasons is every sequence.
        if not finished:
            m.request_success.labels(model, "abort").inc()
        raise
    except (RequestFailedError, EngineDeadError):  # failed in the engine (a 500)
        m.request_success.labels(model, "error").inc()
        raise


async def merged_streams(
    state: ServerState,
    jobs: list[tuple[list[int], SamplingParams]],
    base_id: str,
    ticket: AdmissionTicket | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run several sequences at once and yield (index, output) as each step arrives."""
    if len(jobs) == 1:
        async for out in tracked(state, jobs[0][0], jobs[0][1], base_id, ticket):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for out in tracked(state, ids, params, f"{base_id}-{i}", ticket):
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    try:
        done = 0
        while done < len(jobs):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                done += 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def collect(
    state: ServerState,
    jobs: list[tuple[list[int], SamplingParams]],
    base_id: str,
    ticket: AdmissionTicket | None = None,
) -> list[SeqResult]:
    results = [SeqResult() for _ in jobs]
    async for i, out in merged_streams(state, jobs, base_id, ticket):
        r = results[i]
        r.token_ids += out.new_token_ids
        r.text += out.new_text
        r.logprobs += out.new_logprobs or []
        r.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            r.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            r.finish_reason, r.stop_reason = out.finish_reason, out.stop_reason
    return results


async def until_disconnected(request: Request, coro: Any) -> Any:
    """Await `coro`, cancelling it (and so aborting its sequences) if the client goes away,
    or if this is cancelled itself (a shutdown's drain deadline)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError("Client disconnected.", 499, "client_closed_request")
    finally:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # seen, even when this was cancelled just as it ended


def validate_jobs(
    state: ServerState, jobs: list[tuple[list[int], SamplingParams]]
) -> AdmissionTicket:
    """Refuse bad input with a 4xx, and work beyond the admission bounds with a 503, before
    any response (or stream) starts."""
    assert state.engine is not None
    for ids, params in jobs:
        state.engine.validate(ids, params)
    return state.engine.check_admission(len(jobs), state.engine.prompt_work(jobs))


def sse(data: Any) -> str:
    payload = (
        data.model_dump_json(exclude_none=False)
        if hasattr(data, "model_dump_json")
        else json.dumps(data)
    )
    return f"data: {payload}\n\n"


def sse_chunk(
    cls: type,
    state: ServerState,
    request_id: str,
    created: int,
    model: str,
    choices: list,
    usage_info: P.UsageInfo | None,
) -> str:
    """One streamed event: every chunk of a response repeats its id, creation time and model."""
    return sse(
        cls(
            id=request_id,
            created=created,
            model=model,
            system_fingerprint=state.fingerprint,
            choices=choices,
            usage=usage_info,
        )
    )


def sse_error(exc: BaseException) -> str:
    err = to_api_error(exc) if isinstance(exc, Exception) else APIError("Server error.", 500)
    return "data: " + json.dumps(error_body(err.message, err.type, err.param, err.code)) + "\n\n"


def token_text(state: ServerState, token_id: int, as_id: bool = False) -> str:
    """A token's name in logprobs: its text, or with vLLM's `return_tokens_as_token_ids`
    "token_id:N" (the only name that tells apart tokens holding parts of characters)."""
    return f"token_id:{token_id}" if as_id else state.tokenizer.token_text(token_id)


def token_bytes(state: ServerState, token_id: int, text: str) -> list[int]:
    """A token's own UTF-8 bytes (OpenAI's logprobs `bytes`). A token that holds part of a
    character decodes to U+FFFD, so its bytes come from the vocabulary instead (llguidance's
    reading of it, the one structured outputs use)."""
    if "\ufffd" not in text or state.engine is None:
        return list(text.encode())
    return list(state.engine.core.structured.lltokenizer.decode_bytes([token_id]))


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> P.UsageInfo:
    return P.UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached},  # as OpenAI: present, even when 0
    )


def record(state: ServerState, prompt_tokens: int, completion_tokens: int) -> None:
    state.usage.add(prompt_tokens, completion_tokens)
