"""The app factory: routes, middleware (auth, CORS, request ids) and the lifespan that loads
the model in the background, so /health answers 503 until the first token has been produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ember.chat.templates import ChatFormatter, resolve_chat_template
from ember.config import EngineConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.core import EngineCore
from ember.engine.request import SamplingParams
from ember.server.errors import error_response, install_error_handlers
from ember.server.metrics import ServerMetrics
from ember.server.routes import admin, chat, completions, embeddings, models
from ember.server.state import ServerConfig, ServerState

log = logging.getLogger(__name__)

# Keys a client may not override in generation_config.json: only sampling defaults are taken.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
PROTECTED_PREFIXES = ("/v1/", "/dashboard/", "/tokenize", "/detokenize")


def load_engine(state: ServerState, engine_cfg: EngineConfig) -> None:
    """Build the engine, then produce one token so that "ready" means it really works."""
    try:
        core = EngineCore(engine_cfg)
        state.engine = AsyncEngine(core)
        template = resolve_chat_template(engine_cfg.chat_template, core.tokenizer, core.hf_config)
        state.formatter = ChatFormatter(core.tokenizer, template)
        gen = core.generation_config
        if gen.get("do_sample") is not False:
            state.generation_defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if k in gen}
        digest = hashlib.sha256(repr(sorted(asdict(engine_cfg).items())).encode()).hexdigest()
        state.fingerprint = "fp_" + digest[:10]
        state.metrics = ServerMetrics(state)
        if state.config.embedding_model:
            from ember.models.encoder import SentenceEncoder

            state.encoder = SentenceEncoder(state.config.embedding_model)
        asyncio.run(_warm_up(state.engine, core.tokenizer))
        state.ready.set()
        log.info("model ready: %s (loaded in %.1fs)", state.model_name, core.load_seconds)
    except BaseException as e:  # noqa: BLE001 (reported by /health and every route)
        log.exception("model failed to load")
        state.load_error = e


async def _warm_up(engine: AsyncEngine, tokenizer) -> None:
    ids = tokenizer.encode("Hello") or [0]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    async for _ in engine.generate(ids, params, f"warmup-{uuid.uuid4().hex}"):
        pass


class AuthAndRequestId:
    """Pure ASGI middleware (streams and disconnects pass through untouched): Bearer auth on
    the API paths when keys are set, and an x-request-id header on every response."""

    def __init__(self, app, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        if (
            self.api_keys
            and scope["method"] != "OPTIONS"
            and scope["path"].startswith(PROTECTED_PREFIXES)
        ):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not any(secrets.compare_digest(token.encode(), k.encode()) for k in self.api_keys):
                resp = error_response(
                    401,
                    "Incorrect API key provided." if token else "Missing API key (Bearer).",
                    "authentication_error",
                    code="invalid_api_key",
                )
                resp.headers["x-request-id"] = request_id
                await resp(scope, receive, send)
                return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode())
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(
    engine_cfg: EngineConfig, server_cfg: ServerConfig, load_in_background: bool = True
) -> FastAPI:
    state = ServerState(server_cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(
            target=load_engine, args=(state, engine_cfg), name="ember-load", daemon=True
        )
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="Ember", version=_version(), lifespan=lifespan)
    app.state.ember = state
    install_error_handlers(app)
    app.add_middleware(AuthAndRequestId, api_keys=server_cfg.api_keys)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=server_cfg.allowed_origins,
        allow_credentials="*" not in server_cfg.allowed_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["x-request-id"],
    )
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(embeddings.router)
    app.include_router(admin.router)
    return app


def _version() -> str:
    import ember

    return ember.__version__
