"""AsyncEngine: the engine loop on its own thread, one asyncio stream per request.

This is the seam between the server and the engine: `generate()` takes token ids and sampling
parameters and yields `RequestOutput`s; `abort()` frees everything a request holds within one
step. Only plain data crosses it, so the loop could move to another process unchanged.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ember.engine.core import EmbeddingBatch, EngineCore, KVCacheFullError
from ember.engine.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; the server should report unhealthy."""


class EngineOverloadedError(RuntimeError):
    """Admitting the request would exceed the bound on waiting work; retry after a while."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(RuntimeError):
    """The request ran past its deadline and was aborted; its KV blocks are free."""


class ServerShuttingDownError(RuntimeError):
    """The server is going away and its drain time ran out before this request finished."""


class RequestFailedError(RuntimeError):
    """Handling this one request failed inside the engine (the others go on)."""


@dataclass
class Admission:
    """Bounds on work admitted but not yet generating (0: no bound)."""

    max_waiting_requests: int = 0
    max_waiting_tokens: int = 0

    @classmethod
    def sized_for(
        cls, core: EngineCore, max_waiting_requests: int | None, max_waiting_tokens: int | None
    ) -> Admission:
        """Defaults from the engine's shape: a full batch of sequences awaiting their first
        tokens (an idle server takes a burst of one batch), and no more
        prompt tokens than the KV cache holds or 64 steps of the token budget prefill."""
        if max_waiting_requests is None:
            max_waiting_requests = core.scheduler.max_num_seqs
        if max_waiting_tokens is None:
            capacity = core.allocator.num_blocks * core.allocator.block_size
            max_waiting_tokens = min(capacity, 64 * core.scheduler.max_num_batched_tokens)
        return cls(max(max_waiting_requests, 0), max(max_waiting_tokens, 0))


class AdmissionTicket:
    """Work admitted by `check_admission`, counted as waiting from that moment (so a burst of
    requests cannot all pass the check before any of them is counted) until `generate()` takes
    its share over. What no generate() takes is given back when the ticket is dropped."""

    def __init__(self, engine: AsyncEngine, seqs: int, tokens: int) -> None:
        self._left = [seqs, tokens]  # already counted by the engine
        weakref.finalize(self, engine._give_back, self._left)

    def release(self, engine: AsyncEngine) -> None:
        """Give back now what no generate() took (work done without one: embeddings)."""
        engine._give_back(self._left)

    def take(self, engine: AsyncEngine, tokens: int) -> int | None:
        """One sequence's share: up to `tokens` of the ticket's (None when its sequences are
        all taken). Siblings that share a prompt were admitted for less than their lengths
        add up to, and the later ones get what the first left."""
        with engine._admit_lock:
            if self._left[0] <= 0:
                return None
            granted = min(tokens, self._left[1])
            self._left[0] -= 1
            self._left[1] -= granted
            return granted


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which the request is aborted


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AbortAll:
    error: BaseException  # what every stream in flight is told


@dataclass
class _Call:
    """Run fn(core) on the engine thread (which owns the model) and resolve a future."""

    fn: Callable[[EngineCore], Any]
    future: asyncio.Future | None  # None: nobody waits for the result (see `post`)
    loop: asyncio.AbstractEventLoop | None


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        admission: Admission | None = None,
        request_timeout: float = 0.0,
        on_death: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.core = core
        self.admission = admission or Admission()
        self.request_timeout = request_timeout  # seconds; 0: none
        self.on_death = on_death  # called on the engine thread once the loop has died
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap, engine thread only
        self._stopping = False
        self.error: BaseException | None = None
        # Admitted sequences that have not produced their first token yet, and their prompt
        # tokens: the work a newcomer waits behind.
        self._admit_lock = threading.Lock()
        self.waiting_seqs = 0
        self.waiting_tokens = 0
        # Measured, for Retry-After: prompt tokens prefilled and engine seconds spent while work
        # waited (decayed sums). Decode-only steps while work waits lower the rate (nothing
        # drains then); steps with nothing waiting leave it alone.
        self._drained_tokens = 0.0
        self._drain_seconds = 0.0
        self._embed_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._embedding: set[EmbeddingBatch] = set()  # embedding requests in progress
        # Every request in flight (generation streams and embeddings), by a key of its own:
        # how to tell it, on its event loop, that it has been ended (abort_all). Told from the
        # caller's thread, so that a long engine step cannot keep the news from it.
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, Callable[..., Any]]] = {}
        self._listeners_lock = threading.Lock()
        self._listener_keys = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise PromptError / SamplingParamsError now, before a stream is opened."""
        self.core.validate(prompt_token_ids, params)

    def check_admission(self, num_seqs: int, num_tokens: int) -> AdmissionTicket:
        """Admit this much work (pass the ticket to each generate() of it), or raise
        EngineOverloadedError if that would exceed a bound.

        A request alone in an empty queue is always admitted, however big, so that no
        request the engine can run is refused forever.
        """
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        a = self.admission
        with self._admit_lock:
            seqs, tokens = self.waiting_seqs, self.waiting_tokens
            over = None
            if a.max_waiting_requests and seqs and seqs + num_seqs > a.max_waiting_requests:
                over = f"{seqs} sequences are waiting (bound {a.max_waiting_requests})"
            elif a.max_waiting_tokens and tokens and tokens + num_tokens > a.max_waiting_tokens:
                over = f"{tokens} prompt tokens are waiting (bound {a.max_waiting_tokens})"
            if not over:
                self.waiting_seqs += num_seqs  # counted now, under the same lock as the check
                self.waiting_tokens += num_tokens
                return AdmissionTicket(self, num_seqs, num_tokens)
        raise EngineOverloadedError(
            f"The server is overloaded: {over}. Retry after a short wait.",
            self.retry_after(tokens),
        )

    def prompt_work(self, jobs: list[tuple[list[int], SamplingParams]]) -> int:
        """Prompt tokens these sequences will compute. With prefix caching, a prompt repeated
        (the n samples of one request) costs only its last block after the first copy: the
        scheduler publishes each block as it is filled, and the copies start from them.

        What the prefix cache holds now is not subtracted: under the pressure where the bound
        matters, waiting prompts evict each other's cached blocks before they run."""
        allocator = self.core.allocator
        seen: set[tuple[int, ...]] = set()
        total = 0
        for ids, params in jobs:
            key = tuple(ids)
            if key in seen and allocator.enable_prefix_caching and params.prompt_logprobs is None:
                total += len(ids) - (len(ids) - 1) // allocator.block_size * allocator.block_size
            else:
                total += len(ids)
            seen.add(key)
        return total

    def retry_after(self, waiting_tokens: int) -> int:
        """Seconds until the work waiting now has likely started, from the rate at which
        waiting prompt tokens have been prefilled."""
        if self._drained_tokens <= 0 or self._drain_seconds <= 0:
            return 1
        rate = self._drained_tokens / self._drain_seconds
        return max(1, min(60, math.ceil(waiting_tokens / rate)))

    def _count_waiting(self, seqs: int, tokens: int) -> None:
        with self._admit_lock:
            self.waiting_seqs += seqs
            self.waiting_tokens += tokens

    def _listen(self, tell: Callable[[BaseException], Any]) -> int:
        key = next(self._listener_keys)
        with self._listeners_lock:
            self._listeners[key] = (asyncio.get_running_loop(), tell)
        return key

    def _unlisten(self, key: int) -> None:
        with self._listeners_lock:
            self._listeners.pop(key, None)

    def _give_back(self, left: list[int]) -> None:
        with self._admit_lock:
            self.waiting_seqs -= left[0]
            self.waiting_tokens -= left[1]
            left[0] = left[1] = 0

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        ticket: AdmissionTicket | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        self.validate(prompt_token_ids, params)
        await self.prepare_structured(params)  # compiled off the engine thread (cached)
        stream: asyncio.Queue = asyncio.Queue()
        listener = self._listen(stream.put_nowait)
        deadline = time.monotonic() + self.request_timeout if self.request_timeout > 0 else None
        # Tokens counted as waiting while this sequence waits: its ticket's share, else its own.
        counted = None if ticket is None else ticket.take(self, len(prompt_token_ids))
        if counted is None:
            counted = len(prompt_token_ids)
            self._count_waiting(1, counted)
        waiting = True
        self._inbox.put(
            _Add(
                request_id,
                list(prompt_token_ids),
                params,
                stream,
                asyncio.get_running_loop(),
                deadline,
            )
        )
        self._wake.set()
        finished = False
        try:
            if self.error is not None:  # the loop died before it could take the request
                raise EngineDeadError(str(self.error))
            while True:
                item = await stream.get()
                if waiting:
                    waiting = False
                    self._count_waiting(-1, -counted)
                if isinstance(item, BaseException):
                    # Not marked finished: one told by abort_all may reach the engine after
                    # it (a request queued behind the _AbortAll), and an abort of a request
                    # the engine has let go of costs nothing.
                    raise item
                if item.error is not None:
                    finished = True
                    if item.rejection is not None:
                        raise item.rejection
                    raise RequestFailedError(item.error)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._unlisten(listener)
            if waiting:
                self._count_waiting(-1, -counted)
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
        if self.error is not None:  # the loop died before it could take the call
            raise EngineDeadError(str(self.error))
        return await future

    async def embed_all(self, inputs: list[list[int]]) -> list[list[float]]:
        """The served model's embeddings of a request's inputs: refused with PromptError
        before anything runs if one is bad, admitted under the same bounds as generation
        (EngineOverloadedError), and cut off at the request timeout (RequestTimeoutError)."""
        for ids in inputs:
            self.core.validate_embedding(ids)
        # One waiting unit (its inputs run one after another) and all of its tokens.
        ticket = self.check_admission(1, sum(len(ids) for ids in inputs))
        try:
            timeout = self.request_timeout if self.request_timeout > 0 else None
            return await self.unless_ended(self._embed_each(inputs), timeout)
        finally:
            ticket.release(self)

    async def unless_ended(self, work: Awaitable[T], timeout: float | None = None) -> T:
        """`work`'s result, unless abort_all ends every request first (its error is raised
        at once, even mid-step) or `timeout` seconds pass (RequestTimeoutError); `work` is
        then cancelled, and its clean-up has run when this returns."""
        ended: asyncio.Future = asyncio.get_running_loop().create_future()
        listener = self._listen(lambda e: ended.done() or ended.set_result(e))
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            if ended.done():
                raise ended.result()
            raise self._timeout_error()
        finally:
            self._unlisten(listener)
            if not task.done():  # e.g. an embedding's KV blocks go back as it is cancelled
                task.cancel()
                await asyncio.wait({task})

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """`embed_all` of one input."""
        return (await self.embed_all([prompt_token_ids]))[0]

    async def _embed_each(self, inputs: list[list[int]]) -> list[list[float]]:
        """A forward pass (one token budget) per engine call, so that generation steps run in
        between; concurrent embedding requests take turns pass by pass. The KV blocks go back
        even if cancelled."""
        lock = self._embed_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        batch = EmbeddingBatch(inputs)
        self._embedding.add(batch)
        try:
            while True:
                async with lock:
                    try:
                        if await self.call(lambda core: core.embed_step(batch)):
                            return batch.vectors  # type: ignore[return-value]
                    except KVCacheFullError as e:
                        # Other embedding requests hold blocks they give back as they finish
                        # their inputs: wait for their passes rather than refuse.
                        if not any(b.running for b in self._embedding if b is not batch):
                            n = len(inputs[batch.next])
                            raise EngineOverloadedError(str(e), self.retry_after(n)) from e
        finally:
            self._embedding.discard(batch)
            self.post(lambda core: core.embed_end(batch))

    def post(self, fn: Callable[[EngineCore], Any]) -> None:
        """Run `fn(core)` between engine steps without waiting for it: clean-up that must
        happen even when the caller is being cancelled (an error is logged)."""
        self._inbox.put(_Call(fn, None, None))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    def abort_all(self, error: BaseException) -> None:
        """End every request in flight with `error` (each stream then says why, as at its
        timeout, rather than being cut); their KV blocks are freed. Each request hears of it
        now, even while a long engine step runs; the engine lets go of them after the step."""
        with self._listeners_lock:
            listeners = list(self._listeners.values())
        for loop, tell in listeners:
            _send(loop, tell, error)
        self._inbox.put(_AbortAll(error))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop after its current step; wait for it at most `timeout` seconds (the
        thread is a daemon: a step still running then does not keep the process up)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=timeout)

    # ------------------------------------------------------------------ engine thread

    def _drain_inbox(self) -> None:
        # Only what is queued now: a call sent in reply to one run here (the next chunk of an
        # embedding) waits for the next step, so the running streams step in between.
        for _ in range(self._inbox.qsize()):
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Call):
                try:
                    result = msg.fn(self.core)
                    if msg.future is not None:
                        _send(msg.loop, _resolve, msg.future, result, None)
                except Exception as e:  # the caller gets the error, the loop goes on
                    if msg.future is None:
                        log.exception("an engine call failed")
                    else:
                        _send(msg.loop, _resolve, msg.future, None, e)
                continue
            if isinstance(msg, _Add):
                try:
                    self.core.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                except Exception as e:  # validated before; report rather than die
                    _send(msg.loop, msg.stream.put_nowait, e)
                    continue
                self._streams[msg.request_id] = (msg.stream, msg.loop)
                if msg.deadline is not None:
                    heapq.heappush(self._deadlines, (msg.deadline, msg.request_id))
            elif isinstance(msg, _AbortAll):
                for rid, (stream, loop) in self._streams.items():
                    self.core.abort(rid)
                    _send(loop, stream.put_nowait, msg.error)
                self._streams.clear()
            else:
                self.core.abort(msg.request_id)
                self._streams.pop(msg.request_id, None)

    def _expire(self) -> None:
        """Abort requests past their deadline and tell their streams why."""
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            entry = self._streams.pop(rid, None)
            if entry is None:
                continue  # finished or aborted already
            self.core.abort(rid)
            stream, loop = entry
            _send(loop, stream.put_nowait, self._timeout_error())

    def _timeout_error(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"The request ran past the server's request timeout of {self.request_timeout:g} "
            "seconds and was aborted."
        )

    def _run(self) -> None:
        try:
            self.core.runner.bind_thread()  # the engine thread's CUDA device is the model's
            while not self._stopping:
                self._drain_inbox()
                self._expire()
                if not self.core.has_work():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                waited = self.waiting_tokens > 0
                t0 = time.perf_counter()
                outputs = self.core.step()
                if waited:
                    self._measure(time.perf_counter() - t0)
                self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 (the loop must report, not vanish)
            log.exception("engine loop died")
            self._die(e)

    def _measure(self, seconds: float) -> None:
        """One step taken while work waited: track how fast waiting work drains."""
        if not self.core.last_step_tokens or seconds <= 0:
            return  # nothing was scheduled: an idle turn, not a step
        self._drained_tokens = 0.9 * self._drained_tokens + self.core.last_step_prompt_tokens
        self._drain_seconds = 0.9 * self._drain_seconds + seconds

    def _die(self, e: BaseException) -> None:
        """Every open and queued request gets an error (never a hang); then tell the owner."""
        self.error = e  # first: a generate() that enqueues after the drain below sees it
        dead = EngineDeadError(f"The engine stopped after an internal error: {e}")
        for stream, loop in self._streams.values():
            _send(loop, stream.put_nowait, dead)
        self._streams.clear()
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, _Add):
                _send(msg.loop, msg.stream.put_nowait, dead)
            elif isinstance(msg, _Call) and msg.future is not None:
                _send(msg.loop, _resolve, msg.future, None, dead)
        if self.on_death is not None:
            try:
                self.on_death(e)
            except Exception:  # noqa: BLE001
                log.exception("engine death handler failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            stream, loop = entry
            by_loop.setdefault(loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                if out.error is not None:
                    log.warning("request %s failed: %s", out.request_id, out.error)
        # One hop to each event loop per step, not one per token.
        for loop, items in by_loop.items():
            _send(loop, _put_all, items)


def _send(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand `fn(*args)` to the caller's event loop. A loop closed since (an `asyncio.run()`
    that ended with the call still in flight) has nobody left to tell; that must not stop
    the engine for everyone else."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():  # closed between the check and the call: fine
            raise


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
