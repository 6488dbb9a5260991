"""/v1/completions: raw prompts (text or token ids), echo, best_of and logprobs."""

from __future__ import annotations

import codecs
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ember.engine.async_engine import AdmissionTicket
from ember.engine.request import Logprob, RequestOutput, SamplingParams, fan_out
from ember.server import protocol as P
from ember.server.errors import APIError
from ember.server.routes.common import (
    SSE_HEADERS,
    SeqResult,
    collect,
    compile_structured,
    merged_streams,
    prompt_logprobs,
    record,
    sampling_params,
    sse_chunk,
    sse_error,
    token_bytes,
    token_text,
    tokenize_off_loop,
    truncate_prompt,
    until_disconnected,
    usage,
    validate_jobs,
)
from ember.server.state import ServerState, get_state

router = APIRouter()


def _prompt_list(state: ServerState, prompt: Any) -> list[tuple[list[int], str | None]]:
    """Each prompt's token ids, with its text when it came as a string."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError("prompt must not be empty.", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [(list(prompt), None)]
    out: list[tuple[list[int], str | None]] = []
    for p in prompt:
        if isinstance(p, str):
            out.append((state.tokenizer.encode(p), p))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            out.append((list(p), None))
        else:
            raise APIError(
                "prompt must be a string, a list of strings, or token ids.", param="prompt"
            )
    return out


class TokenTrail:
    """A sequence's tokens as its returned text spells them, and where each starts in it.

    A token's text is read where it stands, after the few tokens before it: decoded alone it
    can be wrong there (SentencePiece drops the space of a text's first word, ChatGLM3 that of
    the first word after each special token, which Llama's <s> keeps). Offsets are characters
    of the text: a token holding part of a character (an emoji's first bytes) adds nothing
    until the character is whole, so offsets never run past the text nor go back; with
    `skip_special`, special tokens are not in the text and add nothing either."""

    WINDOW = 4  # tokens of context: enough for a character's bytes and a word's space

    def __init__(
        self,
        state: ServerState,
        context: list[int] = (),
        start: int = 0,
        skip_special: bool = False,
    ) -> None:
        self.state, self.chars, self.skip_special = state, start, skip_special
        self._recent = list(context[-self.WINDOW :])
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, token_id: int) -> tuple[str, int]:
        """The token's text here, and its offset."""
        tokenizer = self.state.tokenizer
        text = token_text(self.state, token_id)
        if "\ufffd" not in text:  # a whole token: its text in context
            head = tokenizer.decode(self._recent, skip_special_tokens=False)
            both = tokenizer.decode(self._recent + [token_id], skip_special_tokens=False)
            if both.startswith(head):
                text = both[len(head) :]
        self._recent = (self._recent + [token_id])[-self.WINDOW :]
        if self.skip_special and token_id in tokenizer.all_special_ids:
            return text, self.chars
        data = bytes(token_bytes(self.state, token_id, text))
        if self._utf8.getstate()[0] and data and not 0x80 <= data[0] <= 0xBF:
            # The character the bytes before began never completes: its U+FFFD in the text
            # comes before this token, which starts after it.
            self.chars += len(self._utf8.decode(b"", final=True))
        at = self.chars
        self.chars += len(self._utf8.decode(data))
        return text, at


def _completion_logprobs(
    state: ServerState, lps: list[Logprob], trail: TokenTrail, as_ids: bool = False
) -> P.CompletionLogprobs:
    """`as_ids`: tokens named "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    out = P.CompletionLogprobs()
    for lp in lps:
        text, offset = trail.take(lp.token_id)
        name = token_text(state, lp.token_id, as_id=True) if as_ids else text
        out.tokens.append(name)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        top = {token_text(state, t, as_ids): v for t, v in lp.top}
        # As OpenAI's legacy API and vLLM: the sampled token is always among them (so up to
        # logprobs + 1 entries), that a client can read top_logprobs[i][tokens[i]].
        top.setdefault(name, lp.logprob)
        out.top_logprobs.append(top)
    return out


def _echo_logprobs(
    state: ServerState,
    prompt_ids: list[int],
    lps: list[Logprob | None] | None,
    k: int,
    as_ids: bool = False,
) -> P.CompletionLogprobs:
    """The prompt's part of an echoed completion: the first token has no logprob."""
    out = P.CompletionLogprobs()
    trail = TokenTrail(state)
    for i, token_id in enumerate(prompt_ids):
        lp = lps[i] if lps and i < len(lps) else None
        text, offset = trail.take(token_id)
        name = token_text(state, token_id, as_id=True) if as_ids else text
        out.tokens.append(name)
        out.text_offset.append(offset)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        top = None if lp is None else {token_text(state, t, as_ids): v for t, v in lp.top[:k]}
        if top is not None:
            top.setdefault(name, lp.logprob)  # the prompt's own token, as for a sampled one
        out.top_logprobs.append(top)
    return out


def _join(a: P.CompletionLogprobs, b: P.CompletionLogprobs) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )


# With max_tokens 0 the one token run for the prompt's logprobs is not part of the reply.


def _scored(r: SeqResult) -> SeqResult:
    return dataclasses.replace(
        r, token_ids=[], text="", logprobs=[], finish_reason="length", stop_reason=None
    )


def _scored_output(out: RequestOutput) -> RequestOutput:
    return dataclasses.replace(
        out,
        new_token_ids=[],
        new_text="",
        new_logprobs=[],
        finish_reason="length" if out.finished else None,
        stop_reason=None,
    )


@router.post("/v1/completions")
async def completions(
    req: P.CompletionRequest, request: Request, state: ServerState = Depends(get_state)
):
    model = state.check_model(req.model)
    if req.suffix:
        raise APIError("suffix is not supported by this model.", param="suffix")
    best_of = req.best_of or req.n
    if best_of < req.n:
        raise APIError(f"best_of ({best_of}) must be at least n ({req.n}).", param="best_of")
    if req.stream and best_of > req.n:
        raise APIError("best_of greater than n cannot be streamed.", param="best_of")
    # max_tokens 0 with echo scores the prompt (as OpenAI's legacy API and vLLM allow): the
    # engine runs one token for the prompt's logprobs, and that token is left out of the reply.
    score_only = req.max_tokens == 0
    if score_only and not req.echo:
        raise APIError(
            "max_tokens must be at least 1; 0 is only for echo, to score the prompt.",
            param="max_tokens",
        )
    given = []
    for ids, text in await tokenize_off_loop(request, _prompt_list, state, req.prompt):
        kept = truncate_prompt(req, state, ids)
        given.append((kept, text if len(kept) == len(ids) else None))  # echo gives what ran
    prompts = [ids for ids, _ in given]
    if len(prompts) * best_of > P.MAX_SEQUENCES:
        raise APIError(
            f"{len(prompts)} prompts x {best_of} samples each is more than the "
            f"{P.MAX_SEQUENCES} sequences one request may run.",
            param="best_of" if req.best_of else "n",
        )
    # best_of ranks by cumulative logprob, so each token's logprob is needed.
    lp = req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None)
    jobs, owners = [], []
    default_max_tokens = state.config.default_max_tokens or 16
    echo_logprobs = req.echo and req.logprobs is not None
    as_ids = req.return_tokens_as_token_ids
    for pi, ids in enumerate(prompts):
        wanted = req.max_tokens if req.max_tokens is not None else default_max_tokens
        if score_only and len(ids) >= state.max_model_len:
            raise APIError(
                f"This model's maximum context length is {state.max_model_len} tokens, and "
                f"scoring a prompt takes one position more than its length; your prompt has "
                f"{len(ids)} tokens. Please reduce its length.",
                param="prompt",
                code="context_length_exceeded",
            )
        params = sampling_params(
            req, state, len(ids), 1 if score_only else wanted, lp, prompt_name="prompt"
        )
        if echo_logprobs:  # the echoed prompt comes with its own logprobs
            k = max(req.logprobs or 0, req.prompt_logprobs or 0)
            params = dataclasses.replace(params, prompt_logprobs=k)
        for p in fan_out(params, best_of):
            jobs.append((ids, p))
            owners.append(pi)
    ticket = validate_jobs(state, jobs)
    await compile_structured(state, jobs)
    # Echo gives a text prompt back as sent. Token ids come back decoded, and so does every
    # prompt echoed with logprobs, whose tokens and text offsets must spell the echoed text.
    prompt_texts = [
        ""
        if not req.echo
        else text
        if text is not None and not echo_logprobs
        else state.tokenizer.decode(ids, skip_special_tokens=False)
        for ids, text in given
    ]
    request_id = P.random_id("cmpl")
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats
        gen = _completion_stream(
            state,
            jobs,
            request_id,
            created,
            model,
            prompt_tokens,
            prompt_texts,
            owners,
            req.n,
            include_usage,
            req.logprobs is not None,
            ticket,
            score_only,
            continuous,
            as_ids,
        )
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await until_disconnected(request, collect(state, jobs, request_id, ticket))
    if score_only:
        results = [_scored(r) for r in results]
    choices = []
    cached = 0
    for pi in range(len(prompts)):
        mine = [r for r, o in zip(results, owners) if o == pi]
        scored_prompt = mine[0].prompt_logprobs  # the first sample of each prompt scores it
        cached += mine[0].num_cached_tokens  # and its cache hits count, as its tokens do once
        if best_of > req.n:
            mine = sorted(mine, key=lambda r: r.cumulative_logprob, reverse=True)[: req.n]
        for j, r in enumerate(mine):
            prefix = prompt_texts[pi]
            logprobs = None
            if req.logprobs is not None:
                trail = TokenTrail(state, prompts[pi], len(prefix), req.skip_special_tokens)
                logprobs = _completion_logprobs(state, r.logprobs, trail, as_ids)
                if echo_logprobs:
                    echoed = _echo_logprobs(state, prompts[pi], scored_prompt, req.logprobs, as_ids)
                    logprobs = _join(echoed, logprobs)
            choices.append(
                P.CompletionChoice(
                    index=pi * req.n + j,
                    text=prefix + r.text,
                    logprobs=logprobs,
                    finish_reason=r.finish_reason,
                    stop_reason=r.stop_reason,
                    prompt_logprobs=None
                    if req.prompt_logprobs is None
                    else prompt_logprobs(state, prompts[pi], scored_prompt, req.prompt_logprobs),
                )
            )
    completion_tokens = sum(len(r.token_ids) for r in results)
    record(state, prompt_tokens, completion_tokens)
    return P.CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        system_fingerprint=state.fingerprint,
        choices=choices,
        usage=usage(prompt_tokens, completion_tokens, cached),
    )


async def _completion_stream(
    state: ServerState,
    jobs: list[tuple[list[int], SamplingParams]],
    request_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    prompt_texts: list[str],
    owners: list[int],
    n: int,
    include_usage: bool,
    want_logprobs: bool,
    ticket: AdmissionTicket | None = None,
    score_only: bool = False,
    continuous_usage: bool = False,
    as_ids: bool = False,
) -> AsyncIterator[str]:
    def chunk(choices: list[P.CompletionChoice], usage_info: P.UsageInfo | None = None) -> str:
        if usage_info is None and continuous_usage:
            usage_info = usage(prompt_tokens, completion_tokens, sum(cached.values()))
        return sse_chunk(
            P.CompletionResponse, state, request_id, created, model, choices, usage_info
        )

    completion_tokens = 0
    first_of = {o: j for j, o in reversed(list(enumerate(owners)))}  # each prompt's first job
    cached: dict[int, int] = {}  # prompt -> its first job's prefix-cache hits
    trails = [
        TokenTrail(state, ids, len(prompt_texts[o]), p.skip_special_tokens)
        for (ids, p), o in zip(jobs, owners)
    ]
    echoed = [False] * len(jobs)
    # Echo with logprobs: the first sample of each prompt scores it (fan_out), and each
    # sample's first chunk carries those scores; a sample that gets there first waits for them.
    scored = {
        owners[j]: p.prompt_logprobs or 0
        for j, (_, p) in enumerate(jobs)
        if p.prompt_logprobs is not None
    }
    scores: dict[int, list] = {}
    held: dict[int, list[RequestOutput]] = {}

    def render(i: int, out: RequestOutput) -> str | None:
        nonlocal completion_tokens
        if score_only:
            out = _scored_output(out)
        completion_tokens += len(out.new_token_ids)
        text = out.new_text
        first = not echoed[i]
        if first:
            text, echoed[i] = prompt_texts[owners[i]] + text, True
        if not text and not out.finished and not want_logprobs:
            return None
        logprobs = None
        if want_logprobs:
            logprobs = _completion_logprobs(state, out.new_logprobs or [], trails[i], as_ids)
            if first and owners[i] in scored:
                k = scored[owners[i]]  # logprobs: nothing else streams
                prompt_part = _echo_logprobs(state, jobs[i][0], scores[owners[i]], k, as_ids)
                logprobs = _join(prompt_part, logprobs)
        return chunk(
            [
                P.CompletionChoice(
                    index=owners[i] * n + i % n,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=out.finish_reason if out.finished else None,
                    stop_reason=out.stop_reason if out.finished else None,
                )
            ]
        )

    try:
        async for i, out in merged_streams(state, jobs, request_id, ticket):
            pi = owners[i]
            if first_of[pi] == i:
                cached[pi] = out.num_cached_tokens
            ready = [(i, out)]
            if out.prompt_logprobs is not None and pi not in scores:
                scores[pi] = out.prompt_logprobs
                for j in [j for j in held if owners[j] == pi]:
                    ready += [(j, o) for o in held.pop(j)]
            elif pi in scored and pi not in scores:
                held.setdefault(i, []).append(out)
                continue
            for j, o in ready:
                if (line := render(j, o)) is not None:
                    yield line
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens, sum(cached.values())))
    except Exception as e:  # noqa: BLE001
        yield sse_error(e)
    finally:
        record(state, prompt_tokens, completion_tokens)
    yield "data: [DONE]\n\n"
