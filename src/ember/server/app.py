"""The app factory: routes, middleware (auth, CORS, request ids) and the lifespan that loads
the model in the background, so /health answers 503 until the first token has been produced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from ember.chat.templates import ChatFormatter, resolve_chat_template
from ember.config import EngineConfig, parse_bytes
from ember.engine.async_engine import Admission, AsyncEngine, ServerShuttingDownError
from ember.engine.core import EngineCore
from ember.engine.request import SamplingParams
from ember.server.errors import count_rejected, error_response, install_error_handlers
from ember.server.metrics import ServerMetrics
from ember.server.openapi import install_openapi
from ember.server.routes import admin, chat, completions, embeddings, models, responses
from ember.server.routes.chat_page import install_chat_page
from ember.server.state import ServerConfig, ServerState

log = logging.getLogger(__name__)

# Keys a client may not override in generation_config.json: only sampling defaults are taken.
PROTECTED_PREFIXES = ("/v1/", "/dashboard/", "/tokenize", "/detokenize")


def load_engine(
    state: ServerState,
    engine_cfg: EngineConfig,
    on_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Build the engine, then produce one token so that "ready" means it really works."""
    try:
        core = EngineCore(engine_cfg)
        limits = state.config.limits
        admission = Admission.sized_for(
            core, limits.max_waiting_requests, limits.max_waiting_tokens
        )
        state.engine = AsyncEngine(
            core, admission, limits.request_timeout, on_death=state.lifecycle.engine_died
        )
        state.lifecycle.on_drain_deadline = _ending_in_flight(state.engine)
        log.info(
            "admission: at most %s waiting sequences and %s waiting prompt tokens (0: no bound)",
            admission.max_waiting_requests,
            admission.max_waiting_tokens,
        )
        template = resolve_chat_template(engine_cfg.chat_template, core.tokenizer, core.hf_config)
        state.formatter = ChatFormatter(core.tokenizer, template)
        state.generation_defaults = core.sampling_defaults
        digest = hashlib.sha256(repr(sorted(asdict(engine_cfg).items())).encode()).hexdigest()
        state.fingerprint = "fp_" + digest[:10]
        state.metrics = ServerMetrics(state)
        if state.config.embedding_model:
            from ember.models.encoder import SentenceEncoder

            state.encoder = SentenceEncoder(state.config.embedding_model)
        asyncio.run(_warm_up(state.engine, core.tokenizer))
        # The warm-up is no client's: its prompt does not count as prefix-cache lookups.
        core.allocator.prefix_queries = core.allocator.prefix_hits = 0
        state.ready.set()
        log.info("model ready: %s (loaded in %.1fs)", state.model_name, core.load_seconds)
    except BaseException as e:  # noqa: BLE001 (reported by /health and every route)
        # One line for the log; the traceback only when asked for (--log-level DEBUG).
        log.error("model failed to load: %s: %s", type(e).__name__, " ".join(str(e).split()))
        log.debug("model load traceback", exc_info=True)
        state.load_error = e
        if on_error is not None:
            on_error(e)


def _ending_in_flight(engine: AsyncEngine) -> Callable[[str], None]:
    def end(why: str) -> None:
        engine.abort_all(
            ServerShuttingDownError(
                f"The server shut down before this request finished ({why}); send it again."
            )
        )

    return end


async def _warm_up(engine: AsyncEngine, tokenizer) -> None:
    """A prefill of up to 32 tokens and one decode step: both paths run before "ready", and on
    a GPU the kernels a first request needs (a prefill past 16 rows takes the wide matmul
    tiles) are compiled here, not while it waits."""
    hello = tokenizer.encode("Hello") or [0]
    room = max(1, min(32, engine.core.max_model_len - 2))
    ids = (hello * (room // len(hello) + 1))[:room]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    async for _ in engine.generate(ids, params, f"warmup-{uuid.uuid4().hex}"):
        pass


class AuthAndRequestId:
    """Pure ASGI middleware (streams and disconnects pass through untouched): Bearer auth on
    the API paths when keys are set, 503 for new work while shutting down, 413 for a body over
    the limit, and an x-request-id header on every response."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.max_body = parse_bytes(state.config.limits.max_request_body)

    def _protected(self, path: str) -> bool:
        if path == "/metrics":
            return self.state.config.limits.metrics_require_key
        return path.startswith(PROTECTED_PREFIXES)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        path = scope["path"]

        async def reply(resp) -> None:
            resp.headers["x-request-id"] = request_id
            await resp(scope, receive, send)

        if self.state.lifecycle.draining and path != "/metrics":
            if path == "/health":
                await reply(JSONResponse({"status": "shutting down"}, status_code=503))
                return
            count_rejected(self.state, "shutting_down")
            resp = error_response(
                503,
                "The server is shutting down; send the request again (to another replica).",
                "server_error",
                code="shutting_down",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await reply(resp)
            return
        keys = self.state.keys
        if keys.enabled and scope["method"] != "OPTIONS" and self._protected(path):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not keys.check(token):
                await reply(
                    error_response(
                        401,
                        "Incorrect API key provided." if token else "Missing API key (Bearer).",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                )
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await reply(self._too_large())
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A chunked body: read it here, up to the limit, and hand it on as one piece.
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    await reply(self._too_large())
                    return
            receive = _replay(body, receive)

        if scope["method"] == "POST" and _not_json(headers.get("content-type", "")):
            if "origin" in headers:
                # A page in a browser: a form or text/plain POST skips CORS preflight, so it
                # gets no JSON reading.
                await reply(
                    error_response(
                        415,
                        "Send the request body as JSON, with Content-Type: application/json.",
                        "invalid_request_error",
                        code="unsupported_media_type",
                    )
                )
                return
            # Every POST route reads JSON, and `curl -d '{...}'` labels it a form: read it as
            # JSON whatever the label, as llama.cpp's and Ollama's servers do.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", request_id.encode())
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)

    def _too_large(self):
        return error_response(
            413,
            f"The request body is larger than this server's limit of {self.max_body} bytes.",
            "invalid_request_error",
            code="request_too_large",
        )


def _not_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind != "application/json" and not kind.endswith("+json")


def _replay(body: bytes, receive):
    """A receive() that gives the already-read body once, then waits on the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def build_app(
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
    load_in_background: bool = True,
    on_load_error: Callable[[BaseException], None] | None = None,
    on_stop_while_loading: Callable[[], None] | None = None,
) -> FastAPI:
    """The app; its lifespan loads the model (on a thread unless `load_in_background` is
    false). `on_load_error`: called when the load fails; `on_stop_while_loading`: called when
    the server stops before the load is done (the CLI ends the process there)."""
    state = ServerState(server_cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(
            target=load_engine,
            args=(state, engine_cfg, on_load_error),
            name="ember-load",
            daemon=True,
        )
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
        yield
        if loader.is_alive() and on_stop_while_loading is not None:
            on_stop_while_loading()
        if state.engine is not None:
            # Off the event loop, so a long step still running cannot hold back the last
            # bytes of what was ended; and not past the drain's end.
            await asyncio.to_thread(state.engine.shutdown, state.lifecycle.time_left())

    app = FastAPI(title="Ember", version=_version(), lifespan=lifespan)
    app.state.ember = state
    install_error_handlers(app)
    install_openapi(app, state)
    app.add_middleware(AuthAndRequestId, state=state)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=server_cfg.allowed_origins,
        allow_credentials="*" not in server_cfg.allowed_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        # Pages elsewhere (NextChat) may read these; Retry-After says when to come back.
        expose_headers=["x-request-id", "retry-after"],
    )
    app.include_router(models.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(responses.router)
    app.include_router(embeddings.router)
    app.include_router(admin.router)
    if server_cfg.chat_page:
        install_chat_page(app)
    return app


def _version() -> str:
    import ember

    return ember.__version__
