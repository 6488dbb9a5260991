"""/v1/embeddings: the sentence encoder (--embedding-model) or the served model itself."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, Request

from ember.engine.core import PromptError
from ember.server import protocol as P
from ember.server.errors import APIError
from ember.server.routes.common import (
    kept_tokens,
    off_loop,
    tokenize_off_loop,
    truncate_prompt,
    until_disconnected,
    usage,
)
from ember.server.state import ServerState, get_state

router = APIRouter()


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
    # Checked before any work: a wrong one once waited for every vector to be computed.
    dims = (
        state.encoder.dimensions if use_encoder else state.engine.core.hf_config.get("hidden_size")
    )
    _check_dimensions(req, dims)
    # The whole of it, tokenizing included, hears of a shutdown's drain deadline as the
    # engine's own requests do (a 503 that says so, not a cut connection).
    if use_encoder:
        work = _encode(req, state, inputs)
    else:
        work = _embed_on_served_model(req, request, state, inputs)
    ids, vectors = await state.engine.unless_ended(work)
    data = []
    for i, vec in enumerate(vectors):
        if req.encoding_format == "base64":
            packed = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append(P.EmbeddingData(index=i, embedding=packed))
        else:
            data.append(P.EmbeddingData(index=i, embedding=vec))
    n_tokens = sum(len(x) for x in ids)
    return P.EmbeddingResponse(data=data, model=model, usage=usage(n_tokens, 0))


def _check_lengths(ids: list[list[int]], limit: int, says: str) -> None:
    """A 400 naming the first input longer than `limit` tokens, as the other endpoints say it."""
    for i, seq in enumerate(ids):
        if len(seq) > limit:
            which = "the input" if len(ids) == 1 else f"input {i}"
            raise APIError(
                f"{says.format(limit=limit)}; {which} has {len(seq)} tokens. Shorten it or "
                "set truncate_prompt_tokens.",
                param="input",
                code="context_length_exceeded",
            )


def _check_dimensions(req: P.EmbeddingRequest, dims: int | None) -> None:
    if dims is not None and req.dimensions is not None and req.dimensions != dims:
        raise APIError(
            f"This model gives {dims}-dimensional embeddings; dimensions cannot change that.",
            param="dimensions",
        )


async def _encode(
    req: P.EmbeddingRequest, state: ServerState, inputs: list[str | list[int]]
) -> tuple[list[list[int]], list[list[float]]]:
    """The sentence encoder's token ids and vectors for `inputs`."""
    enc = state.encoder
    keep = kept_tokens(req.truncate_prompt_tokens, enc.max_length)
    # Always on a thread: the encoder's tokenizer takes one call at a time (a lock the
    # event loop must never wait on).
    ids = await off_loop(
        lambda: [enc.tokenize([x], keep)[0] if isinstance(x, str) else list(x) for x in inputs]
    )
    if keep is not None:
        ids = [seq[-keep:] for seq in ids]
    vocab = len(enc.tokenizer)
    if any(not 0 <= t < vocab for seq in ids for t in seq):
        raise APIError(f"Token ids must be below {vocab} for this model.", param="input")
    _check_lengths(ids, enc.max_length, "This model embeds at most {limit} tokens")
    # A thread cannot be cancelled: once this request has ended, the encoder stops between
    # batches (else its thread would go on encoding for nobody).
    stop = threading.Event()
    try:
        return ids, (await off_loop(enc.encode, ids, stop)).tolist()
    finally:
        stop.set()


async def _embed_on_served_model(
    req: P.EmbeddingRequest, request: Request, state: ServerState, inputs: list[str | list[int]]
) -> tuple[list[list[int]], list[list[float]]]:
    """The served model's token ids and vectors for `inputs`."""
    ids = await tokenize_off_loop(
        request,
        lambda: [state.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs],
    )
    ids = [truncate_prompt(req, state, seq) for seq in ids]
    limit = "This model's maximum context length is {limit} tokens"
    _check_lengths(ids, state.max_model_len, limit)
    # Long or many inputs take many forward passes: stop if the client went away.
    try:
        vectors = await until_disconnected(request, state.engine.embed_all(ids))
    except PromptError as e:
        raise APIError(str(e), param="input") from e
    _check_dimensions(req, len(vectors[0]))  # where the config does not say
    return ids, vectors
