"""/v1/chat/completions, /v1/completions, /v1/models: OpenAI's API over the AsyncEngine."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ember.chat.templates import ChatFormatter
from ember.chat.tool_parsers import PARSERS, ToolParser, chatml_tools_template, make_parser
from ember.chat.tool_parsers import parser_for_template as template_parser
from ember.engine.core import PromptError
from ember.engine.request import Logprob, RequestOutput, SamplingParams
from ember.server import protocol as P
from ember.server.errors import APIError, error_body, to_api_error
from ember.server.state import ServerState, get_state

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------ shared machinery


@dataclass
class SeqResult:
    """One finished sequence, gathered from its stream."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


def sampling_params(
    req: P.SamplingFields,
    state: ServerState,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """Request values, else the model's generation_config, else OpenAI's defaults."""
    gen = state.generation_defaults
    room = state.max_model_len - prompt_len
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if room <= 0:
        raise APIError(
            f"This model's maximum context length is {state.max_model_len} tokens. However, "
            f"your messages resulted in {prompt_len} tokens. Please reduce their length.",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, state.config.default_max_tokens or room)
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError as e:
            raise APIError("logit_bias keys must be token ids.", param="logit_bias") from e

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
    )


def fan_out(params: SamplingParams, count: int) -> list[SamplingParams]:
    """`count` sequences of one prompt; with a seed, each gets its own reproducible stream."""
    if count == 1:
        return [params]
    return [
        dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)
        for i in range(count)
    ]


async def tracked(
    state: ServerState, ids: list[int], params: SamplingParams, request_id: str
) -> AsyncIterator[RequestOutput]:
    """engine.generate(), observed for the Prometheus histograms and counters."""
    assert state.engine is not None
    m, model = state.metrics, state.model_name
    start = time.monotonic()
    first: float | None = None
    n_out = 0
    async for out in state.engine.generate(ids, params, request_id):
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
            m.e2e.labels(model).observe(now - start)
            m.request_success.labels(model, out.finish_reason or "stop").inc()
            if first is not None and n_out > 1:
                m.tpot.labels(model).observe((now - first) / (n_out - 1))
        yield out


async def merged_streams(
    state: ServerState, jobs: list[tuple[list[int], SamplingParams]], base_id: str
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run several sequences at once and yield (index, output) as each step arrives."""
    if len(jobs) == 1:
        async for out in tracked(state, jobs[0][0], jobs[0][1], base_id):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int], params: SamplingParams) -> None:
        try:
            async for out in tracked(state, ids, params, f"{base_id}-{i}"):
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
    state: ServerState, jobs: list[tuple[list[int], SamplingParams]], base_id: str
) -> list[SeqResult]:
    results = [SeqResult() for _ in jobs]
    async for i, out in merged_streams(state, jobs, base_id):
        r = results[i]
        r.token_ids += out.new_token_ids
        r.text += out.new_text
        r.logprobs += out.new_logprobs or []
        if out.prompt_logprobs is not None:
            r.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            r.finish_reason, r.stop_reason = out.finish_reason, out.stop_reason
    return results


async def until_disconnected(request: Request, coro: Any) -> Any:
    """Await `coro`, cancelling it (and so aborting its sequences) if the client goes away."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError("Client disconnected.", 499, "client_closed_request")


def validate_jobs(state: ServerState, jobs: list[tuple[list[int], SamplingParams]]) -> None:
    """Refuse bad input with a 4xx before any response (or stream) starts."""
    assert state.engine is not None
    for ids, params in jobs:
        state.engine.validate(ids, params)


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


def token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> P.UsageInfo:
    return P.UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details={"cached_tokens": cached} if cached else None,
    )


def record(state: ServerState, prompt_tokens: int, completion_tokens: int) -> None:
    state.usage.add(prompt_tokens, completion_tokens)


# ------------------------------------------------------------------ /v1/models


@router.get("/v1/models")
async def list_models(request: Request) -> P.ModelList:
    state: ServerState = request.app.state.ember
    ready = state.engine is not None
    cards = [
        P.ModelCard(
            id=name,
            created=int(state.started),
            root=state.config.served_model_names[0],
            max_model_len=state.max_model_len if ready else None,
        )
        for name in state.config.served_model_names
    ]
    if state.config.embedding_model_name:
        cards.append(P.ModelCard(id=state.config.embedding_model_name, created=int(state.started)))
    return P.ModelList(data=cards)


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> P.ModelCard:
    state: ServerState = request.app.state.ember
    name = state.check_model(model_id, allow_encoder=True)
    return P.ModelCard(
        id=name,
        created=int(state.started),
        root=state.config.served_model_names[0],
        max_model_len=state.max_model_len if state.engine is not None else None,
    )


# ------------------------------------------------------------------ chat


def _message_dicts(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        f"Content parts of type {part.type!r} are not supported by this model; "
                        "send text parts.",
                        param=f"messages.{i}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        role = "system" if m.role == "developer" else m.role
        d: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_or_text(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return s


def _chat_logprobs(state: ServerState, lps: list[Logprob]) -> P.ChoiceLogprobs:
    content = []
    for lp in lps:
        text = token_text(state, lp.token_id)
        content.append(
            P.TokenLogprob(
                token=text,
                logprob=lp.logprob,
                bytes=list(text.encode()),
                top_logprobs=[
                    P.TopLogprob(
                        token=(t := token_text(state, tid)), logprob=v, bytes=list(t.encode())
                    )
                    for tid, v in lp.top
                ],
            )
        )
    return P.ChoiceLogprobs(content=content)


# ------------------------------------------------------------------ tools


@dataclass(frozen=True)
class ToolSupport:
    """How the served model does tool calling, worked out once per chat template and flag."""

    parser: str | None  # the parser of replies to requests with tools; None: tools refused
    formatter: ChatFormatter | None  # renders tools and tool history; None: the model's own
    chatglm3: bool  # replies start with a metadata line, read with special tokens kept
    refusal: str = ""  # why tools are refused


def _is_chatglm3(formatter: ChatFormatter) -> bool:
    """ChatGLM3's built-in format (chat/chatglm3.py), which builds the prompt in ids."""
    return getattr(formatter, "name", None) == "chatglm3"


@functools.lru_cache(maxsize=8)
def tool_support(formatter: ChatFormatter, flag: str) -> ToolSupport:
    template = formatter.template or ""
    off = "Tool calling is turned off on this server (--tool-call-parser none)."
    if _is_chatglm3(formatter):
        parser = "chatglm3" if flag == "auto" else flag
        if parser == "none":
            return ToolSupport(None, None, True, off)
        return ToolSupport(parser, formatter, True)
    if flag == "none":
        return ToolSupport(None, None, False, off)
    if "tools" in template:  # the model's own template renders tools
        parser = template_parser(template) if flag == "auto" else flag
        if parser is not None:
            return ToolSupport(parser, formatter, False)
        return ToolSupport(
            None,
            None,
            False,
            "This model's chat template renders tools in a format Ember cannot read calls "
            "from; start the server with --tool-call-parser (hermes, llama3_json or chatglm3).",
        )
    if "<|im_start|>" in template and flag in ("auto", "hermes"):
        # A ChatML model whose template ignores tools: Qwen2.5's Hermes-style convention.
        return ToolSupport(
            "hermes", ChatFormatter(formatter.tokenizer, chatml_tools_template()), False
        )
    return ToolSupport(
        None,
        None,
        False,
        "This model's chat template does not support tools; start the server with a "
        "--chat-template that renders them, or send the request without tools.",
    )


@dataclass
class ChatPlan:
    """How one chat request is rendered and how its replies are read."""

    formatter: ChatFormatter
    tools: list[dict[str, Any]] | None = None  # rendered into the prompt
    parser: str | None = None  # None: the reply is content as generated
    tool_names: list[str] = field(default_factory=list)  # empty: no calls, only content
    prefix: str = ""  # forced call opener: appended to the prompt, read before the reply
    max_calls: int | None = None

    def new_parser(self) -> ToolParser | None:
        """A parser per choice: each keeps its own streaming state."""
        if self.parser is None:
            return None
        return make_parser(self.parser, self.tool_names, self.max_calls)


def _tool_choice(req: P.ChatCompletionRequest) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", function name), checked against the tools."""
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(
                "tool_choice must be 'none', 'auto', 'required' or "
                f'{{"type": "function", "function": {{"name": ...}}}}; got {choice!r}.',
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise APIError("tool_choice 'required' needs tools.", param="tool_choice")
        return (choice if names else "none"), None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str) or not name:
        raise APIError(
            'A named tool_choice is {"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in names:
        known = f" ({', '.join(names)})" if names else ""
        raise APIError(
            f"tool_choice names the function {name!r}, which is not among the tools{known}.",
            param="tool_choice",
        )
    return "named", name


def _chat_plan(req: P.ChatCompletionRequest, state: ServerState) -> ChatPlan:
    assert state.formatter is not None and state.engine is not None
    support = tool_support(state.formatter, state.engine.core.cfg.tool_call_parser)
    mode, function = _tool_choice(req)
    history = any(m.role == "tool" or m.tool_calls for m in req.messages)
    formatter = state.formatter
    if (mode != "none" or history) and support.formatter is not None:
        formatter = support.formatter
    if mode != "none":
        if support.parser is None:
            raise APIError(support.refusal, param="tools")
        forced = mode in ("required", "named")
        return ChatPlan(
            formatter,
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            parser=support.parser,
            tool_names=[t.function.name for t in req.tools or []],
            prefix=PARSERS[support.parser].forced_prefix(function) if forced else "",
            max_calls=1 if req.parallel_tool_calls is False else None,
        )
    if support.chatglm3:  # no tools, but the metadata line still has to go
        return ChatPlan(formatter, parser="chatglm3")
    return ChatPlan(formatter)


def _chat_message(plan: ChatPlan, r: SeqResult) -> tuple[P.ChatResponseMessage, str | None]:
    """The reply as an OpenAI message (content and tool calls), and its finish reason."""
    parser = plan.new_parser()
    if parser is None:
        return P.ChatResponseMessage(content=r.text), r.finish_reason
    res = parser.parse(plan.prefix + r.text)
    if not res.tool_calls:
        return P.ChatResponseMessage(content=res.content), r.finish_reason
    calls = [
        P.ToolCall(id=c.id, function=P.FunctionCall(name=c.name, arguments=c.arguments))
        for c in res.tool_calls
    ]
    return P.ChatResponseMessage(content=res.content or None, tool_calls=calls), "tool_calls"


def chat_prompt(req: P.ChatCompletionRequest, state: ServerState) -> tuple[ChatPlan, list[int]]:
    """The prompt ids a chat request runs on (shared with /tokenize), and how to read replies."""
    plan = _chat_plan(req, state)
    prompt_ids = plan.formatter.encode(
        _message_dicts(req),
        add_generation_prompt=req.add_generation_prompt,
        tools=plan.tools,
        **(req.chat_template_kwargs or {}),
    )
    if plan.prefix:  # tool_choice required or named: the reply starts inside a call
        prompt_ids = prompt_ids + state.tokenizer.encode(plan.prefix, add_special_tokens=False)
    return plan, prompt_ids


@router.post("/v1/chat/completions")
async def chat_completions(
    req: P.ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
):
    model = state.check_model(req.model)
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(
            f"response_format {req.response_format.type!r} is not supported yet; use 'text'.",
            param="response_format",
        )
    plan, prompt_ids = chat_prompt(req, state)
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = sampling_params(
        req, state, len(prompt_ids), max_tokens, (top or 0) if req.logprobs else None
    )
    if plan.parser == "chatglm3":
        # Its segments are separated by <|assistant|>: the parser must see it (and drops it).
        # Stop tokens (<|user|>, <|observation|>, eos) never reach the text either way.
        # Stop strings belong to the content, not to the metadata line before the first "\n".
        gate = None if plan.prefix else "\n"  # a forced prefix already closed that line
        keep = [state.tokenizer.token_to_id("<|assistant|>")]
        params = dataclasses.replace(
            params,
            keep_special_token_ids=[t for t in keep if t is not None],
            stop_strings_after=gate,
        )
    jobs = [(prompt_ids, p) for p in fan_out(params, req.n)]
    validate_jobs(state, jobs)
    request_id = P.random_id("chatcmpl")
    created = int(time.time())

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = _chat_stream(
            state, plan, jobs, request_id, created, model, include_usage, req.logprobs
        )
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await until_disconnected(request, collect(state, jobs, request_id))
    completion_tokens = sum(len(r.token_ids) for r in results)
    record(state, len(prompt_ids), completion_tokens)
    choices = []
    for i, r in enumerate(results):
        message, finish_reason = _chat_message(plan, r)
        choices.append(
            P.ChatChoice(
                index=i,
                message=message,
                logprobs=_chat_logprobs(state, r.logprobs) if req.logprobs else None,
                finish_reason=finish_reason,
                stop_reason=r.stop_reason,
            )
        )
    return P.ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        system_fingerprint=state.fingerprint,
        choices=choices,
        usage=usage(len(prompt_ids), completion_tokens),
    )


async def _chat_stream(
    state: ServerState,
    plan: ChatPlan,
    jobs: list[tuple[list[int], SamplingParams]],
    request_id: str,
    created: int,
    model: str,
    include_usage: bool,
    want_logprobs: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[P.ChatChunkChoice], usage_info: P.UsageInfo | None = None) -> str:
        return sse_chunk(
            P.ChatCompletionChunk, state, request_id, created, model, choices, usage_info
        )

    prompt_len = len(jobs[0][0])
    completion_tokens = 0
    parsers = [plan.new_parser() for _ in jobs]
    started = [False] * len(jobs)
    num_calls = [0] * len(jobs)  # tool calls streamed so far, per choice
    try:
        for i in range(len(jobs)):
            yield chunk(
                [P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))]
            )
        async for i, out in merged_streams(state, jobs, request_id):
            completion_tokens += len(out.new_token_ids)
            text, calls = out.new_text, []
            parser = parsers[i]
            if parser is not None:
                # The forced opener was part of the prompt; the parser reads it first.
                res = parser.feed(out.new_text if started[i] else plan.prefix + out.new_text)
                if out.finished:
                    res.merge(parser.finish())
                text, calls = res.content, res.tool_calls
            started[i] = True
            if not text and not calls and not out.finished and not want_logprobs:
                continue  # held back (partial character, possible stop string or call)
            choices = []
            if text or not calls or want_logprobs:
                choices.append(
                    P.ChatChunkChoice(
                        index=i,
                        delta=P.DeltaMessage(content=text) if text else P.DeltaMessage(),
                        logprobs=_chat_logprobs(state, out.new_logprobs or [])
                        if want_logprobs
                        else None,
                    )
                )
            for call in calls:
                delta = P.DeltaToolCall(
                    index=num_calls[i],
                    id=call.id,
                    type="function",
                    function=P.DeltaFunctionCall(name=call.name, arguments=call.arguments),
                )
                choices.append(P.ChatChunkChoice(index=i, delta=P.DeltaMessage(tool_calls=[delta])))
                num_calls[i] += 1
            if out.finished:
                choices[-1].finish_reason = "tool_calls" if num_calls[i] else out.finish_reason
            for choice in choices:
                yield chunk([choice])
        if include_usage:
            yield chunk([], usage(prompt_len, completion_tokens))
    except Exception as e:  # noqa: BLE001 (a stream that fails midway reports, then ends)
        yield sse_error(e)
    finally:
        record(state, prompt_len, completion_tokens)
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------ completions


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


def _completion_logprobs(
    state: ServerState, lps: list[Logprob], offset: int
) -> P.CompletionLogprobs:
    out = P.CompletionLogprobs()
    for lp in lps:
        text = token_text(state, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        out.top_logprobs.append({token_text(state, t): v for t, v in lp.top})
        offset += len(text)
    return out


def _echo_logprobs(
    state: ServerState, prompt_ids: list[int], lps: list[Logprob | None] | None
) -> P.CompletionLogprobs:
    """The prompt's part of an echoed completion: the first token has no logprob."""
    out = P.CompletionLogprobs()
    offset = 0
    for i, token_id in enumerate(prompt_ids):
        lp = lps[i] if lps and i < len(lps) else None
        text = token_text(state, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(
            None if lp is None else {token_text(state, t): v for t, v in lp.top}
        )
        offset += len(text)
    return out


def _join(a: P.CompletionLogprobs, b: P.CompletionLogprobs) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(
        text_offset=a.text_offset + b.text_offset,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        tokens=a.tokens + b.tokens,
        top_logprobs=a.top_logprobs + b.top_logprobs,
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
    given = _prompt_list(state, req.prompt)
    prompts = [ids for ids, _ in given]
    # best_of ranks by cumulative logprob, so each token's logprob is needed.
    lp = req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None)
    jobs, owners = [], []
    echo_logprobs = req.echo and req.logprobs is not None
    for pi, ids in enumerate(prompts):
        params = sampling_params(req, state, len(ids), req.max_tokens, lp)
        if echo_logprobs:  # the echoed prompt comes with its own logprobs
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        for p in fan_out(params, best_of):
            jobs.append((ids, p))
            owners.append(pi)
    validate_jobs(state, jobs)
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
        )
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await until_disconnected(request, collect(state, jobs, request_id))
    choices = []
    for pi in range(len(prompts)):
        mine = [r for r, o in zip(results, owners) if o == pi]
        if best_of > req.n:
            mine = sorted(mine, key=lambda r: r.cumulative_logprob, reverse=True)[: req.n]
        for j, r in enumerate(mine):
            prefix = prompt_texts[pi]
            logprobs = None
            if req.logprobs is not None:
                logprobs = _completion_logprobs(state, r.logprobs, len(prefix))
                if echo_logprobs:
                    echoed = _echo_logprobs(state, prompts[pi], r.prompt_logprobs)
                    logprobs = _join(echoed, logprobs)
            choices.append(
                P.CompletionChoice(
                    index=pi * req.n + j,
                    text=prefix + r.text,
                    logprobs=logprobs,
                    finish_reason=r.finish_reason,
                    stop_reason=r.stop_reason,
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
        usage=usage(prompt_tokens, completion_tokens),
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
) -> AsyncIterator[str]:
    def chunk(choices: list[P.CompletionChoice], usage_info: P.UsageInfo | None = None) -> str:
        return sse_chunk(
            P.CompletionResponse, state, request_id, created, model, choices, usage_info
        )

    completion_tokens = 0
    offsets = [len(prompt_texts[o]) for o in owners]
    echoed = [False] * len(jobs)
    try:
        async for i, out in merged_streams(state, jobs, request_id):
            completion_tokens += len(out.new_token_ids)
            text = out.new_text
            if not echoed[i]:
                text, echoed[i] = prompt_texts[owners[i]] + text, True
            if not text and not out.finished and not want_logprobs:
                continue
            logprobs = None
            if want_logprobs:
                logprobs = _completion_logprobs(state, out.new_logprobs or [], offsets[i])
                offsets[i] += sum(len(t) for t in logprobs.tokens)
                if out.prompt_logprobs is not None:
                    echoed = _echo_logprobs(state, jobs[i][0], out.prompt_logprobs)
                    logprobs = _join(echoed, logprobs)
            yield chunk(
                [
                    P.CompletionChoice(
                        index=owners[i] * n + i % n,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason if out.finished else None,
                    )
                ]
            )
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens))
    except Exception as e:  # noqa: BLE001
        yield sse_error(e)
    finally:
        record(state, prompt_tokens, completion_tokens)
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------ embeddings


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise APIError("input must not be empty.", param="input")
    if all(isinstance(t, int) for t in raw):
        return [list(raw)]
    return list(raw)


@router.post("/v1/embeddings")
async def embeddings(
    req: P.EmbeddingRequest, request: Request, state: ServerState = Depends(get_state)
) -> P.EmbeddingResponse:
    import base64
    import struct

    model = state.check_model(req.model, allow_encoder=True)
    inputs = _embedding_inputs(req.input)
    if any(isinstance(x, str) and not x for x in inputs):
        raise APIError("input strings must not be empty.", param="input")
    use_encoder = state.encoder is not None and model == state.config.embedding_model_name
    if use_encoder:
        enc = state.encoder
        ids = [enc.tokenize([x])[0] if isinstance(x, str) else list(x) for x in inputs]
        vocab = len(enc.tokenizer)
        if any(not 0 <= t < vocab for seq in ids for t in seq):
            raise APIError(f"Token ids must be below {vocab} for this model.", param="input")
        dims = enc.dimensions
        vectors = (await asyncio.to_thread(enc.encode, ids)).tolist()
    else:
        ids = [state.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
        dims = None
        vectors = []
        for seq in ids:
            try:
                vectors.append(await state.engine.call(lambda core, seq=seq: core.embed(seq)))
            except PromptError as e:
                raise APIError(str(e), param="input") from e
        dims = len(vectors[0])
    if req.dimensions is not None and req.dimensions != dims:
        raise APIError(
            f"This model gives {dims}-dimensional embeddings; dimensions cannot change that.",
            param="dimensions",
        )
    data = []
    for i, vec in enumerate(vectors):
        if req.encoding_format == "base64":
            packed = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append(P.EmbeddingData(index=i, embedding=packed))
        else:
            data.append(P.EmbeddingData(index=i, embedding=vec))
    n_tokens = sum(len(x) for x in ids)
    return P.EmbeddingResponse(data=data, model=model, usage=usage(n_tokens, 0))
