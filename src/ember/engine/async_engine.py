"""AsyncEngine: the engine loop on its own thread, one asyncio stream per request.

This is the seam between the server and the engine: `generate()` takes token ids and sampling
parameters and yields `RequestOutput`s; `abort()` frees everything a request holds within one
step. Only plain data crosses it, so the loop could move to another process unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ember.config import EngineConfig
from ember.engine.core import EngineCore
from ember.engine.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; the server should report unhealthy."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run fn(core) on the engine thread (which owns the model) and resolve a future."""

    fn: Callable[[EngineCore], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self.tokens_generated = 0  # read by /health and metrics; written by the loop only
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> AsyncEngine:
        return cls(EngineCore(cfg))

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError / SamplingParamsError now, before a stream is opened."""
        self.core.validate(prompt_token_ids, params)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        self.validate(prompt_token_ids, params)
        await self.prepare_structured(params)  # compiled off the engine thread (cached)
        stream: asyncio.Queue = asyncio.Queue()
        self._inbox.put(
            _Add(request_id, list(prompt_token_ids), params, stream, asyncio.get_running_loop())
        )
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the consumer went away (client disconnect, cancel)
                self.abort(request_id)

    async def prepare_structured(self, params: SamplingParams) -> None:
        """Compile params.structured_outputs on the grammar pool, so the engine thread only
        copies a cached matcher; raises StructuredOutputsError (a 400) if it cannot compile."""
        if params.structured_outputs is not None:
            await asyncio.wrap_future(self.core.structured.compile_async(params.structured_outputs))

    async def call(self, fn: Callable[[EngineCore], Any]) -> Any:
        """Run `fn(core)` between engine steps, e.g. an embedding forward pass."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(_Call(fn, future, loop))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Call):
                try:
                    result = msg.fn(self.core)
                    msg.loop.call_soon_threadsafe(_resolve, msg.future, result, None)
                except Exception as e:  # the caller gets the error, the loop goes on
                    msg.loop.call_soon_threadsafe(_resolve, msg.future, None, e)
                continue
            if isinstance(msg, _Add):
                try:
                    self.core.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                except Exception as e:  # validated before; report rather than die
                    msg.loop.call_soon_threadsafe(msg.stream.put_nowait, e)
                    continue
                self._streams[msg.request_id] = (msg.stream, msg.loop)
            else:
                self.core.abort(msg.request_id)
                self._streams.pop(msg.request_id, None)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.core.has_work():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.core.step()
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 (the loop must report, not vanish)
            log.exception("engine loop died")
            self.error = e
            for stream, loop in self._streams.values():
                loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(str(e)))
            self._streams.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            self.tokens_generated += len(out.new_token_ids)
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, loop = entry
            by_loop.setdefault(loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
        # One hop to each event loop per step, not one per token.
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, out in items:
        stream.put_nowait(out)
