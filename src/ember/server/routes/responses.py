"""/v1/responses: OpenAI's Responses API, stateless (nothing is stored, as with store=false).

A request becomes a chat request (input items → messages, instructions → a system message,
function tools and tool_choice → their chat forms, text.format → response_format) and runs
through the chat route's own prompt, tool-call and sampling code; its reply comes back as
output items (a message with output_text, function_call items), streamed as the Responses
events when asked.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from ember.chat.tool_parsers import ParsedToolCall
from ember.engine.async_engine import AdmissionTicket
from ember.engine.request import Logprob, SamplingParams
from ember.server import protocol as P
from ember.server.errors import APIError, error_body, to_api_error, validation_message
from ember.server.routes.chat import chat_logprobs, chat_params, chat_prompt
from ember.server.routes.chat_tools import ChatPlan, end_reply, read_reply
from ember.server.routes.common import (
    SSE_HEADERS,
    collect,
    compile_structured,
    merged_streams,
    record,
    tokenize_off_loop,
    until_disconnected,
    validate_jobs,
)
from ember.server.state import ServerState, get_state

router = APIRouter()


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------ request → chat request


def _text_of(content: Any, param: str) -> str:
    """A message's content: a string, or parts of type input_text / output_text / text."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError("Message content must be a string or a list of parts.", param=param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(
                f"Content parts of type {kind!r} are not supported; send input_text.", param=param
            )
        if not isinstance(part.get("text"), str):
            raise APIError(f"A {kind} part needs its text, a string.", param=f"{param}.{j}.text")
        texts.append(part["text"])
    return "".join(texts)


def _messages(req: P.ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    for i, item in enumerate(req.input):
        param = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"Unknown message role {role!r}.", param=param + ".role")
            if item.get("content") is None:  # as OpenAI: a message without it is a 400
                raise APIError(f"A {role} message needs its content.", param=param + ".content")
            content = _text_of(item["content"], param + ".content")
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            # As OpenAI (and vLLM's item model): the name, call_id and arguments are required.
            for key in ("name", "call_id"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise APIError(
                        f"A function_call item needs its {key}, a string.", param=f"{param}.{key}"
                    )
            if not isinstance(item.get("arguments"), str):
                raise APIError(
                    "A function_call item needs its arguments, a JSON string.",
                    param=param + ".arguments",
                )
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise APIError(
                    "A function_call_output item needs the call_id of its function_call.",
                    param=param + ".call_id",
                )
            output = item.get("output")
            if output is None:
                raise APIError("A function_call_output item needs its output.", param=param)
            text = output if isinstance(output, str) else _text_of(output, param + ".output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue  # nothing of it reaches the model
        else:
            raise APIError(f"Input items of type {kind!r} are not supported.", param=param)
    if not messages:
        raise APIError("input is empty.", param="input")
    return messages


def _chat_request(req: P.ResponsesRequest) -> P.ChatCompletionRequest:
    if req.previous_response_id:
        raise APIError(
            "previous_response_id is not supported: this server stores no responses. Send the "
            "whole conversation in input instead.",
            param="previous_response_id",
        )
    if req.conversation is not None:
        raise APIError(
            "conversation is not supported: this server stores no conversations. Send the "
            "whole conversation in input instead.",
            param="conversation",
        )
    tools = []
    for i, tool in enumerate(req.tools or []):
        if tool.get("type") != "function":
            raise APIError(
                f"Only function tools are supported; tools[{i}] is {tool.get('type')!r}.",
                param=f"tools.{i}",
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        if not isinstance(choice.get("tools"), list):
            raise APIError(
                "tool_choice of type allowed_tools needs its tools, a list.",
                param="tool_choice.tools",
            )
        allowed = [
            {"type": t.get("type"), "function": {"name": t.get("name")}}
            if isinstance(t, dict)
            else t
            for t in choice.get("tools") or []
        ]
        spec = {"mode": choice.get("mode"), "tools": allowed}
        choice = {"type": "allowed_tools", "allowed_tools": spec}
    elif isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise APIError(
                'A named tool_choice is {"type": "function", "name": ...}.', param="tool_choice"
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    fmt = (req.text or {}).get("format")
    response_format = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        if "name" in fmt and "schema" not in fmt:  # optional in Chat Completions, not here
            raise APIError(
                "text.format of type json_schema needs its schema.", param="text.format.schema"
            )
        schema = {k: fmt.get(k) for k in ("name", "schema", "strict", "description")}
        response_format = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") in ("json_object", "text"):
        response_format = {"type": fmt["type"]}
    elif fmt is not None:
        raise APIError("text.format must be text, json_object or json_schema.", param="text")
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req),
        "tools": tools or None,
        # Without tools, "auto" and "none" mean nothing; "required" or a name is refused.
        "tool_choice": choice if tools or choice not in (None, "auto", "none") else None,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stream": req.stream,
    }
    try:
        return P.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise _responses_error(*validation_message(e.errors())) from e


# Where a chat request's field came from in the Responses request, for error messages.
_FIELD_ORIGINS = (
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("max_tokens", "max_output_tokens"),
)


def _responses_param(param: str) -> str:
    """A chat request's field as the Responses request names it."""
    if param == "messages" or param.startswith("messages."):
        return "input"  # input items and messages do not pair up one to one
    if re.fullmatch(r"tools\.\d+\.function\..+", param):  # its tools are flat
        return param.replace(".function.", ".", 1)
    for chat_name, name in _FIELD_ORIGINS:
        if param == chat_name or param.startswith(chat_name + "."):
            return name + param.removeprefix(chat_name)
    return param


def _responses_error(message: str, param: str | None) -> APIError:
    """The chat request's validation error, naming the field as the Responses request has it."""
    if param is None:
        return APIError(message)
    detail = message.removeprefix(param)  # ": what is wrong"
    if param == "messages" or param.startswith("messages."):
        field = param.split(".", 2)[2:]  # name the item's field instead
        return APIError("input" + (f" ({field[0]})" if field else "") + detail, param="input")
    name = _responses_param(param)
    return APIError(message if name == param else name + detail, param=name)


# ------------------------------------------------------------------ output items


def _message_item(
    item_id: str, text: str, status: str = "completed", logprobs: list[dict] | None = None
) -> dict[str, Any]:
    """A message item; "incomplete" (cut off by max_output_tokens) keeps its text."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    content = [part]
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [] if status == "in_progress" else content,
    }


def _call_item(call: ParsedToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": "" if status == "in_progress" else call.arguments,
        "status": status,
    }


def _usage(prompt_tokens: int, output_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        # The openai SDK's types require cache_write_tokens; writing to the prefix cache
        # costs nothing here, so none are billed.
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


class _Shell:
    """The response object around the output: what every event that carries it repeats."""

    def __init__(self, req: P.ResponsesRequest, model: str, params: SamplingParams) -> None:
        self.req, self.model = req, model
        # Echoed as sampled, as OpenAI does: unset ones at their defaults, not null.
        self.temperature, self.top_p = params.temperature, params.top_p
        self.id = _item_id("resp")
        self.created = int(time.time())

    def build(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage_info: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        req = self.req
        incomplete = status == "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "truncation": req.truncation or "disabled",
            "usage": usage_info,
            "user": req.user,
        }


LOGPROBS = "message.output_text.logprobs"


def _logprobs(state: ServerState, lps: list[Logprob] | None) -> list[dict[str, Any]]:
    """Output tokens' logprobs as output_text carries them (the shape chat completions use)."""
    content = chat_logprobs(state, lps or []).content or []
    return [t.model_dump() for t in content]


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _without_oldest_turn(messages: list[P.ChatMessage]) -> list[P.ChatMessage] | None:
    """The conversation less its oldest turn: the first message after the instructions, and
    what follows it up to the next user message (its calls' outputs must not lose their
    calls). None when nothing of the conversation would be left."""
    start = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), 0)
    end = start + 1
    while end < len(messages) and messages[end].role != "user":
        end += 1
    if end >= len(messages):
        return None
    return messages[:start] + messages[end:]


def _prompt_that_fits(
    req: P.ResponsesRequest, chat: P.ChatCompletionRequest, state: ServerState, top: int | None
) -> tuple[ChatPlan, list[int], SamplingParams]:
    """The prompt and its sampling; with truncation "auto", as OpenAI does, an input past the
    context window first drops the conversation's oldest turns until it fits."""
    while True:
        try:
            plan, prompt_ids = chat_prompt(chat, state)
            params = chat_params(chat, state, plan, len(prompt_ids), chat.max_tokens, top)
            return plan, prompt_ids, params
        except APIError as e:
            if req.truncation != "auto" or e.code != "context_length_exceeded":
                raise
            shorter = _without_oldest_turn(chat.messages)
            if shorter is None:
                raise
            chat = chat.model_copy(update={"messages": shorter})


@router.post("/v1/responses")
async def create_response(
    req: P.ResponsesRequest, request: Request, state: ServerState = Depends(get_state)
):
    model = state.check_model(req.model)
    chat = _chat_request(req)
    want_logprobs = LOGPROBS in (req.include or [])
    try:
        top = (req.top_logprobs or 0) if want_logprobs else None
        plan, prompt_ids, params = await tokenize_off_loop(
            request, _prompt_that_fits, req, chat, state, top
        )
        jobs = [(prompt_ids, params)]
        ticket = validate_jobs(state, jobs)
        await compile_structured(state, jobs)
    except Exception as e:  # a client's mistake names its field as this request has it
        err = to_api_error(e)
        if err.status >= 500 or err.param is None:
            raise
        name = _responses_param(err.param)
        if name != err.param:  # and in the message, where it names the field
            err.message = err.message.replace(err.param, name)
            err.param = name
        if err is e:
            raise
        raise err from e
    shell = _Shell(req, model, params)
    if req.stream:
        gen = _stream(state, plan, jobs, shell, ticket, want_logprobs)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)

    [r] = await until_disconnected(request, collect(state, jobs, shell.id, ticket))
    record(state, len(prompt_ids), len(r.token_ids))
    reply = read_reply(plan, r)
    status = _status(r.finish_reason)
    output = []
    if reply.content:
        lps = _logprobs(state, r.logprobs) if want_logprobs else None
        output.append(_message_item(_item_id("msg"), reply.content, status, lps))
    for call in reply.tool_calls:  # incomplete: cut inside it by max_output_tokens
        output.append(_call_item(call, "completed" if call.complete else "incomplete"))
    usage_info = _usage(len(prompt_ids), len(r.token_ids), r.num_cached_tokens)
    return shell.build(status, output, usage_info)


@router.get("/v1/responses/{response_id}", include_in_schema=False)
async def retrieve_response(response_id: str) -> None:
    """The SDK's responses.retrieve: a 404 that says why, rather than a bare Not Found."""
    raise APIError(
        f"No response {response_id!r}: this server stores no responses (store is always false).",
        status=404,
        type="not_found_error",
        param="response_id",
    )


async def _stream(
    state: ServerState,
    plan: ChatPlan,
    jobs: list,
    shell: _Shell,
    ticket: AdmissionTicket | None = None,
    want_logprobs: bool = False,
) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        body = {"type": kind, "sequence_number": seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    prompt_len = len(jobs[0][0])
    output: list[dict[str, Any]] = []
    text_item: dict[str, Any] | None = None  # the message being written, once text arrives
    text = ""
    completion_tokens = cached = 0
    parser = plan.new_parser()
    started = False
    finish_reason = None
    logprobs: list[dict[str, Any]] = []  # the message's, so far
    unsent: list[dict[str, Any]] = []  # tokens whose text is still held back

    def close_text(status: str = "completed") -> list[str]:
        nonlocal text_item
        if text_item is None:
            return []
        done = _message_item(text_item["id"], text, status, logprobs)
        index = output.index(text_item)
        output[index] = done
        part = done["content"][0]
        ids = {"item_id": done["id"], "output_index": index}
        text_item = None
        return [
            event(
                "response.output_text.done", **ids, content_index=0, text=text, logprobs=logprobs
            ),
            event("response.content_part.done", **ids, content_index=0, part=part),
            event("response.output_item.done", output_index=index, item=done),
        ]

    try:
        yield event("response.created", response=shell.build("in_progress", []))
        yield event("response.in_progress", response=shell.build("in_progress", []))
        async for _, out in merged_streams(state, jobs, shell.id, ticket):
            completion_tokens += len(out.new_token_ids)
            cached = out.num_cached_tokens
            delta, calls = out.new_text, []
            if parser is not None:
                # The forced opener was part of the prompt; the parser reads it first.
                res = parser.feed(out.new_text if started else plan.prefix + out.new_text)
                if out.finished:
                    res.merge(end_reply(parser, out.finish_reason, out.stop_reason))
                delta, calls = res.content, res.tool_calls
            started = True
            if want_logprobs:
                unsent += _logprobs(state, out.new_logprobs)
            if delta:
                if text_item is None:
                    text_item = _message_item(_item_id("msg"), "", "in_progress")
                    output.append(text_item)
                    index = len(output) - 1
                    yield event("response.output_item.added", output_index=index, item=text_item)
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    ids = {"item_id": text_item["id"], "output_index": index}
                    yield event("response.content_part.added", **ids, content_index=0, part=part)
                text += delta
                ids = {"item_id": text_item["id"], "output_index": output.index(text_item)}
                sent, unsent = unsent, []
                logprobs += sent
                yield event(
                    "response.output_text.delta", **ids, content_index=0, delta=delta, logprobs=sent
                )
            for call in calls:
                for e in close_text():
                    yield e
                index = len(output)
                added = _call_item(call, "in_progress")
                output.append(added)
                ids = {"item_id": added["id"], "output_index": index}
                yield event("response.output_item.added", output_index=index, item=added)
                yield event("response.function_call_arguments.delta", **ids, delta=call.arguments)
                yield event(
                    "response.function_call_arguments.done", **ids, arguments=call.arguments
                )
                output[index] = _call_item(call, "completed" if call.complete else "incomplete")
                yield event("response.output_item.done", output_index=index, item=output[index])
            if out.finished:
                finish_reason = out.finish_reason
        status = _status(finish_reason)
        for e in close_text(status):
            yield e
        final = shell.build(status, output, _usage(prompt_len, completion_tokens, cached))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield event(kind, response=final)
    except Exception as e:  # noqa: BLE001 (a stream that fails midway reports, then ends)
        err = to_api_error(e)
        body = error_body(err.message, err.type, err.param, err.code)["error"]
        yield event("error", code=body["code"], message=body["message"], param=body["param"])
    finally:
        record(state, prompt_len, completion_tokens)
