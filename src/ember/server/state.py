"""What the route handlers share: the engine, the tokenizer, the served names, the counters.

It is built in the background at start-up (so /health can answer 503 while the model loads)
and stored on `app.state.ember`; handlers reach it through the `get_state` dependency.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ember.chat.templates import ChatFormatter
from ember.chat.tokenizer import BaseTokenizer
from ember.config import ServingLimits
from ember.engine.async_engine import AsyncEngine
from ember.server.errors import APIError
from ember.server.keys import KeyStore
from ember.server.lifecycle import Lifecycle


@dataclass
class ServerConfig:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    default_max_tokens: int | None = None  # None: up to the context length
    embedding_model: str | None = None  # a BERT-family encoder directory
    embedding_model_name: str | None = None
    chat_page: bool = True  # the chat page at `/` (off: the API alone)
    limits: ServingLimits = field(default_factory=ServingLimits)


@dataclass
class Usage:
    """Running token totals, for the billing endpoints NextChat reads."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.formatter: ChatFormatter | None = None
        self.generation_defaults: dict[str, Any] = {}
        self.load_error: BaseException | None = None
        self.ready = threading.Event()  # set once the model has produced a token
        self.started = time.time()
        self.usage = Usage()
        self.metrics: Any = None
        self.fingerprint: str | None = None  # model + settings digest, set once loaded
        self.encoder: Any = None  # SentenceEncoder when --embedding-model is given
        self.keys = KeyStore(config.api_keys, config.limits.api_key_file)
        self.lifecycle = Lifecycle(config.limits.shutdown_grace, config.limits.drain_timeout)

    @property
    def tokenizer(self) -> BaseTokenizer:
        assert self.engine is not None
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None
        return self.engine.core.max_model_len

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    @property
    def all_model_names(self) -> list[str]:
        extra = [self.config.embedding_model_name] if self.config.embedding_model_name else []
        return self.config.served_model_names + extra

    def check_model(self, name: str | None, allow_encoder: bool = False) -> str:
        """The served name to answer with; an unknown model is a 404 like OpenAI's."""
        if not name:
            return self.model_name
        if allow_encoder and name == self.config.embedding_model_name:
            return name
        if name not in self.config.served_model_names:
            raise APIError(
                f"The model `{name}` does not exist. Served: {', '.join(self.all_model_names)}.",
                404,
                "not_found_error",
                "model",
                "model_not_found",
            )
        return name


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.ember
    if state.load_error is not None:
        raise APIError(f"The model failed to load: {state.load_error}", 503, "server_error")
    if state.engine is None or not state.ready.is_set():
        raise APIError(
            "The model is still loading; try again shortly.",
            503,
            "server_error",
            code="loading",
            headers={"Retry-After": "5"},
        )
    if state.engine.error is not None:
        raise APIError("The engine has stopped after an internal error.", 503, "server_error")
    return state
