"""/v1/chat/completions: messages through the chat template, replies read for tool calls."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ember.chat.tokenizer import non_unicode_field
from ember.engine.async_engine import AdmissionTicket
from ember.engine.request import Logprob, SamplingParams, fan_out
from ember.engine.structured import StructuredOutputsParams
from ember.server import protocol as P
from ember.server.errors import APIError
from ember.server.routes.chat_tools import (
    ChatPlan,
    answer_or_call,
    call_finish_reason,
    chat_message,
    chat_plan,
    end_reply,
)
from ember.server.routes.common import (
    SSE_HEADERS,
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


def message_dicts(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    legacy_call_id = ""  # a legacy "function" message answers the latest function_call
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                refusal = (part.model_extra or {}).get("refusal")
                if part.type == "refusal" and m.role == "assistant" and isinstance(refusal, str):
                    texts.append(refusal)  # OpenAI's assistant parts are text or refusal
                    continue
                if part.type == "text" and not isinstance(part.text, str):
                    raise APIError(
                        "A content part of type 'text' needs its text.",
                        param=f"messages.{i}.content",
                    )
                if part.type != "text":
                    raise APIError(
                        f"Content parts of type {part.type!r} are not supported by this model; "
                        "send text parts.",
                        param=f"messages.{i}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        d: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        if m.name:
            d["name"] = m.name
        calls = list(m.tool_calls or [])
        if m.function_call is not None:
            legacy_call_id = f"call_{i}"
            calls.append(P.ToolCall(id=legacy_call_id, function=m.function_call))
        if calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _json_or_text(c.function.arguments),
                    },
                }
                for c in calls
            ]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        elif m.role == "function" and legacy_call_id:
            d["tool_call_id"] = legacy_call_id
        out.append(d)
    return out


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except (TypeError, ValueError, RecursionError):  # RecursionError: nested past json's limit
        return s


def chat_logprobs(state: ServerState, lps: list[Logprob], as_ids: bool = False) -> P.ChoiceLogprobs:
    """OpenAI's logprobs content; `as_ids`: tokens named "token_id:N", their bytes still the
    token's own."""

    def entry(token_id: int) -> tuple[str, list[int]]:
        text = token_text(state, token_id)
        return token_text(state, token_id, as_ids), token_bytes(state, token_id, text)

    content = []
    for lp in lps:
        token, data = entry(lp.token_id)
        top = []
        for tid, v in lp.top:
            t, b = entry(tid)
            top.append(P.TopLogprob(token=t, logprob=v, bytes=b))
        content.append(
            P.TokenLogprob(token=token, logprob=lp.logprob, bytes=data, top_logprobs=top)
        )
    return P.ChoiceLogprobs(content=content)


def _echo_text(req: P.ChatCompletionRequest) -> str:
    """With echo, the text of a last message that is the assistant's (the reply follows it)."""
    if not req.echo or req.messages[-1].role != "assistant":
        return ""
    return message_dicts(req)[-1].get("content") or ""


# apply_chat_template's own arguments, and the template variables the request's fields set:
# chat_template_kwargs passes variables to the template and may not set these.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "add_generation_prompt",
        "continue_final_message",
        "messages",
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "self",
    }
)


def _template_kwargs(req: P.ChatCompletionRequest) -> dict[str, Any]:
    kwargs = req.chat_template_kwargs or {}
    taken = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if taken:
        raise APIError(
            f"chat_template_kwargs cannot set {', '.join(taken)}: these are request fields or "
            "arguments of the template's renderer, not template variables.",
            param="chat_template_kwargs",
        )
    return kwargs


def chat_prompt(req: P.ChatCompletionRequest, state: ServerState) -> tuple[ChatPlan, list[int]]:
    """The prompt ids a chat request runs on (shared with /tokenize), and how to read replies."""
    messages = message_dicts(req)
    tools = [t.model_dump(exclude_unset=True) for t in req.tools or []]
    for name, value in (("messages", messages), ("tools", tools)):
        if bad := non_unicode_field(value, name):  # named here, not by its place in the prompt
            raise APIError(
                f"{bad[0]} has a lone UTF-16 surrogate ({bad[1]}), which is not a Unicode "
                "character: escape each astral character as a surrogate pair, or send it as "
                "UTF-8.",
                param=bad[0],
                code="invalid_unicode",
            )
    plan = chat_plan(req, state)
    plan.continuing = req.continue_final_message
    add_generation_prompt = req.add_generation_prompt
    if req.continue_final_message:
        if plan.prefix:
            raise APIError(
                "continue_final_message cannot be used with a forced tool call "
                "(tool_choice 'required' or a named function).",
                param="continue_final_message",
            )
        if "add_generation_prompt" in req.model_fields_set and add_generation_prompt:
            raise APIError(
                "continue_final_message continues the last message, and add_generation_prompt "
                "starts a new one: set at most one of them.",
                param="continue_final_message",
            )
        add_generation_prompt = False  # unset, it counts as false (vLLM makes clients say it)
    prompt_ids = plan.formatter.encode(
        messages,
        add_generation_prompt=add_generation_prompt,
        tools=plan.tools,
        continue_final_message=req.continue_final_message,
        **_template_kwargs(req),
    )
    if plan.prefix:  # tool_choice required or named: the reply starts inside a call
        prompt_ids = prompt_ids + state.tokenizer.encode(plan.prefix, add_special_tokens=False)
    return plan, prompt_ids


def chat_params(
    req: P.ChatCompletionRequest,
    state: ServerState,
    plan: ChatPlan,
    prompt_len: int,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """A chat request's sampling parameters, as its plan reads replies (shared with
    /v1/responses)."""
    params = sampling_params(req, state, prompt_len, max_tokens, logprobs)
    if plan.parser == "chatglm3":
        # Its segments are separated by <|assistant|>: the parser must see it (and drops it).
        # Stop tokens (<|user|>, <|observation|>, eos) never reach the text either way.
        # Stop strings belong to the content, not to the metadata line that opens a reply; a
        # forced prefix already closed that line, and a continued message has none.
        names = None if plan.prefix or plan.continuing else plan.tool_names
        keep = [state.tokenizer.token_to_id("<|assistant|>")]
        params = dataclasses.replace(
            params,
            keep_special_token_ids=[t for t in keep if t is not None],
            metadata_line_names=names,
        )
    if plan.call_grammar is not None:  # a forced call outranks any response_format
        forced = StructuredOutputsParams(grammar=plan.call_grammar, param="tools")
        # The reply is the call and nothing else: its grammar says where it ends, and a stop
        # string (meant for text) would only break it off.
        params = dataclasses.replace(params, structured_outputs=forced, stop=None)
    elif (either := answer_or_call(plan, params.structured_outputs)) is not None:
        params = dataclasses.replace(params, structured_outputs=either)
    return params


@router.post("/v1/chat/completions")
async def chat_completions(
    req: P.ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
):
    model = state.check_model(req.model)
    if set(req.modalities or []) - {"text"}:
        raise APIError(
            f"This model writes text only; modalities {req.modalities} cannot be served.",
            param="modalities",
        )
    plan, prompt_ids = await tokenize_off_loop(request, chat_prompt, req, state)
    prompt_ids = truncate_prompt(req, state, prompt_ids)
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true.", param="top_logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = chat_params(
        req, state, plan, len(prompt_ids), max_tokens, (top or 0) if req.logprobs else None
    )
    jobs = [(prompt_ids, p) for p in fan_out(params, req.n)]
    ticket = validate_jobs(state, jobs)
    await compile_structured(state, jobs)
    request_id = P.random_id("chatcmpl")
    created = int(time.time())
    echo = _echo_text(req)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and req.stream_options.continuous_usage_stats
        gen = _chat_stream(
            state,
            plan,
            jobs,
            request_id,
            created,
            model,
            include_usage,
            req.logprobs,
            ticket,
            echo,
            continuous,
            req.return_tokens_as_token_ids,
        )
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    results = await until_disconnected(request, collect(state, jobs, request_id, ticket))
    completion_tokens = sum(len(r.token_ids) for r in results)
    record(state, len(prompt_ids), completion_tokens)
    choices = []
    for i, r in enumerate(results):
        message, finish_reason = chat_message(plan, r)
        if echo:
            message.content = echo + (message.content or "")
        choices.append(
            P.ChatChoice(
                index=i,
                message=message,
                logprobs=(
                    chat_logprobs(state, r.logprobs, req.return_tokens_as_token_ids)
                    if req.logprobs
                    else None
                ),
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
        # The prompt is counted once, so are its cached tokens: the first choice's.
        usage=usage(len(prompt_ids), completion_tokens, results[0].num_cached_tokens),
        prompt_logprobs=None
        if req.prompt_logprobs is None
        else prompt_logprobs(state, prompt_ids, results[0].prompt_logprobs, req.prompt_logprobs),
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
    ticket: AdmissionTicket | None = None,
    echo: str = "",
    continuous_usage: bool = False,
    as_ids: bool = False,
) -> AsyncIterator[str]:
    def chunk(choices: list[P.ChatChunkChoice], usage_info: P.UsageInfo | None = None) -> str:
        if usage_info is None and continuous_usage:
            usage_info = usage(prompt_len, completion_tokens, cached)
        return sse_chunk(
            P.ChatCompletionChunk, state, request_id, created, model, choices, usage_info
        )

    prompt_len = len(jobs[0][0])
    completion_tokens = cached = 0
    parsers = [plan.new_parser() for _ in jobs]
    started = [False] * len(jobs)
    num_calls = [0] * len(jobs)  # tool calls streamed so far, per choice
    try:
        for i in range(len(jobs)):
            yield chunk(
                [P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))]
            )
            if echo:
                yield chunk([P.ChatChunkChoice(index=i, delta=P.DeltaMessage(content=echo))])
        async for i, out in merged_streams(state, jobs, request_id, ticket):
            completion_tokens += len(out.new_token_ids)
            if i == 0:
                cached = out.num_cached_tokens
            text, calls = out.new_text, []
            parser = parsers[i]
            if parser is not None:
                # The forced opener was part of the prompt; the parser reads it first.
                res = parser.feed(out.new_text if started[i] else plan.prefix + out.new_text)
                if out.finished:
                    res.merge(end_reply(parser, out.finish_reason, out.stop_reason))
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
                        logprobs=chat_logprobs(state, out.new_logprobs or [], as_ids)
                        if want_logprobs
                        else None,
                    )
                )
            for call in calls:
                function = P.DeltaFunctionCall(name=call.name, arguments=call.arguments)
                if plan.legacy_functions:
                    delta = P.DeltaMessage(function_call=function)
                else:
                    tool_call = P.DeltaToolCall(
                        index=num_calls[i], id=call.id, type="function", function=function
                    )
                    delta = P.DeltaMessage(tool_calls=[tool_call])
                choices.append(P.ChatChunkChoice(index=i, delta=delta))
                num_calls[i] += 1
            if out.finished:
                reason = (
                    call_finish_reason(plan, out.finish_reason)
                    if num_calls[i]
                    else out.finish_reason
                )
                # As OpenAI streams it: the finish reason in a chunk of its own, after the
                # last text or call (the SDK's stream helpers close a tool call only then).
                stop = out.stop_reason  # vLLM's: the stop string or token id that ended it
                if choices and choices[-1].delta == P.DeltaMessage():
                    choices[-1].finish_reason, choices[-1].stop_reason = reason, stop
                else:
                    end = P.DeltaMessage()
                    choices.append(
                        P.ChatChunkChoice(
                            index=i, delta=end, finish_reason=reason, stop_reason=stop
                        )
                    )
            for choice in choices:
                yield chunk([choice])
        if include_usage:
            yield chunk([], usage(prompt_len, completion_tokens, cached))
    except Exception as e:  # noqa: BLE001 (a stream that fails midway reports, then ends)
        yield sse_error(e)
    finally:
        record(state, prompt_len, completion_tokens)
    yield "data: [DONE]\n\n"
