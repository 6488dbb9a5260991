"""/v1/models: the served names (and the embedding model's)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.server import protocol as P
from ember.server.state import ServerState

router = APIRouter()


def _quantization(state: ServerState) -> str | None:
    """The served model's quantization (a plain string the engine keeps), once loaded."""
    return state.engine.core.runner.quantization if state.engine is not None else None


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
            quantization=_quantization(state),
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
        quantization=_quantization(state) if name != state.config.embedding_model_name else None,
    )
