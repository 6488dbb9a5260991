"""/health, /metrics, /tokenize, /detokenize, /version, and the billing pages NextChat reads."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ember
from ember.server import protocol as P
from ember.server.errors import APIError, error_body
from ember.server.routes.common import tokenize_off_loop
from ember.server.state import ServerState, get_state

router = APIRouter()

# NextChat shows usage in dollars; price tokens at a nominal rate so the numbers move.
CENTS_PER_1K_TOKENS = 0.2


# The fields of /tokenize that render messages as a chat request would.
_CHAT_FIELDS = frozenset(
    {
        "messages",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
    }
)


# HEAD too: load balancers and container health checks that send it get the same status.
# One route for both, so a 405 for another method lists both in its Allow header.
@router.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)  # see openapi.py
async def health(request: Request) -> Response:
    state: ServerState = request.app.state.ember
    if state.load_error is not None:
        body = error_body(f"model failed to load: {state.load_error}", "server_error")
        return JSONResponse(body, status_code=503)
    if not state.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    if state.engine is not None and state.engine.error is not None:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.ember
    if state.metrics is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version() -> dict:
    return {"version": ember.__version__}


@router.post("/tokenize")
async def tokenize(
    req: P.TokenizeRequest, request: Request, state: ServerState = Depends(get_state)
) -> dict:
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError("Give exactly one of prompt or messages.", param="prompt")
    if req.messages is not None:
        from ember.server.routes.chat import chat_prompt

        # Only the fields the client set, so unset ones keep the chat request's defaults.
        chat = P.ChatCompletionRequest(
            **{f: getattr(req, f) for f in req.model_fields_set & _CHAT_FIELDS}
        )
        # exactly the ids a chat request would run on
        _, tokens = await tokenize_off_loop(request, chat_prompt, chat, state)
    else:
        tokens = await tokenize_off_loop(
            request, state.tokenizer.encode, req.prompt, req.add_special_tokens
        )
    out: dict = {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}
    if req.return_token_strs:
        out["token_strs"] = state.tokenizer.convert_ids_to_tokens(tokens)
    return out


@router.post("/detokenize")
async def detokenize(req: P.DetokenizeRequest, state: ServerState = Depends(get_state)) -> dict:
    state.check_model(req.model)
    vocab = state.engine.core.runner.vocab_size if state.engine else 0
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"Token id {bad[0]} is outside the vocabulary of {vocab}.", param="tokens")
    return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}


def _usage_cents(state: ServerState) -> float:
    tokens = state.usage.prompt_tokens + state.usage.completion_tokens
    return round(tokens / 1000 * CENTS_PER_1K_TOKENS, 4)


@router.get("/dashboard/billing/usage")
@router.get("/v1/dashboard/billing/usage")
async def billing_usage(request: Request) -> dict:
    state: ServerState = request.app.state.ember
    today = dt.date.today().isoformat()
    cents = _usage_cents(state)
    return {
        "object": "list",
        "daily_costs": [
            {
                "timestamp": dt.datetime.now().timestamp(),
                "line_items": [{"name": state.model_name, "cost": cents}],
            }
        ],
        "total_usage": cents,
        "total_tokens": state.usage.prompt_tokens + state.usage.completion_tokens,
        "prompt_tokens": state.usage.prompt_tokens,
        "completion_tokens": state.usage.completion_tokens,
        "start_date": request.query_params.get("start_date", today),
        "end_date": request.query_params.get("end_date", today),
    }


@router.get("/dashboard/billing/subscription")
@router.get("/v1/dashboard/billing/subscription")
async def billing_subscription() -> dict:
    # A self-hosted server has no spending limit; report a generous one so NextChat shows usage.
    return {
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": 1000.0,
        "hard_limit_usd": 1000.0,
        "system_hard_limit_usd": 1000.0,
        "access_until": 4102444800,  # 2100-01-01
        "plan": {"title": "Ember self-hosted", "id": "ember"},
    }
