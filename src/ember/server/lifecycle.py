"""Shutdown as Kubernetes expects it, and a process that exits when its engine has died.

On SIGTERM (or SIGINT) the pod is being removed from its Service's endpoints, which takes a
few seconds to reach every proxy. So: /health turns 503 at once; for `--shutdown-grace` seconds
the listener keeps accepting and answers new work with 503 (a refused connection would be an
error for the client; a 503 is retried elsewhere); then it stops listening and in-flight
requests get up to `--drain-timeout` seconds to finish (those still running just before it
ends are ended with a `shutting_down` error, so that each stream says why instead of being
cut); then the process exits 0. A second Ctrl-C ends them so at once, and quits.

If the engine loop dies, the same path runs without waiting for anything to drain, and the
process exits 1 so that Kubernetes restarts it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)

# After a second Ctrl-C, how long the requests it ended get to send their last event (seconds).
QUIT_MARGIN = 0.5


def _after(seconds: float, fn: Callable[[], None]) -> None:
    """Run `fn` on a daemon thread after `seconds`: a timer never keeps the process up."""
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()


class Lifecycle:
    """What the middleware and /health read: is the server going away, and why."""

    def __init__(self, shutdown_grace: float, drain_timeout: float) -> None:
        self.shutdown_grace = max(shutdown_grace, 0.0)
        self.drain_timeout = max(drain_timeout, 0.0)
        self.draining = False  # set on SIGTERM or engine death: /health 503, new work 503
        self.exit_code = 0
        self.began: float | None = None
        self._server: uvicorn.Server | None = None
        self._lock = threading.Lock()
        # Called just before the drain timeout (or at a second Ctrl-C): end what is still
        # running, with the reason given.
        self.on_drain_deadline: Callable[[str], None] | None = None

    def attach(self, server: uvicorn.Server) -> None:
        self._server = server

    def begin(self, reason: str, exit_code: int = 0, grace: float | None = None) -> None:
        """Start going away (once): 503 for new work now, stop listening after the grace."""
        with self._lock:
            if self.draining:
                self.exit_code = max(self.exit_code, exit_code)
                return
            self.draining, self.exit_code, self.began = True, exit_code, time.monotonic()
        grace = self.shutdown_grace if grace is None else grace
        log.warning(
            "%s: /health is 503 and new requests get 503; stopping in %.1fs, then up to %.1fs "
            "for requests in flight",
            reason,
            grace,
            self.drain_timeout,
        )
        _after(grace, self._stop)

    def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        # uvicorn cancels what is left when the drain timeout ends, mid-stream and without a
        # word; a moment before, the engine ends each request with an error it can send.
        margin = min(1.0, self.drain_timeout / 2)
        _after(self.drain_timeout - margin, self._drain_deadline)

    def time_left(self, default: float = 10.0) -> float:
        """Seconds until the process should be gone (the grace and the drain timeout after
        it began going away; at least a moment); `default` if it has not begun."""
        if self.began is None:
            return default
        end = self.began + self.shutdown_grace + self.drain_timeout
        return max(end - time.monotonic(), 0.5)

    def _drain_deadline(self) -> None:
        if self.on_drain_deadline is not None:
            self.on_drain_deadline(f"its drain timeout of {self.drain_timeout:g} seconds ran out")

    def quit_now(self) -> None:
        """A second Ctrl-C: end every request now, each told why, then close at once. Called
        in a signal handler, which may have interrupted a holder of the engine's locks: the
        work runs on a thread of its own."""
        _after(0.0, self._quit)

    def _quit(self) -> None:
        log.warning("interrupted again: ending the requests in flight and quitting")
        if self.on_drain_deadline is not None:
            self.on_drain_deadline("it was stopped by a second interrupt")
        if self._server is not None:
            self._server.should_exit = True
        # What the ended requests still have to write goes out in a moment; then close.
        _after(QUIT_MARGIN, self._force_exit)

    def _force_exit(self) -> None:
        if self._server is not None:
            self._server.force_exit = True

    def engine_died(self, exc: BaseException) -> None:
        """Called on the engine thread: every open request has had its error by now."""
        self.begin(f"engine loop died ({type(exc).__name__})", exit_code=1)


class EmberServer(uvicorn.Server):
    """uvicorn, with SIGTERM handled by the Lifecycle instead of an immediate close."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.attach(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn would re-raise the signal after shutting down (exit status -15): not added to
        # _captured_signals, so the process exits with the Lifecycle's status instead.
        if self.lifecycle.draining:
            if sig == signal.SIGINT:  # a second Ctrl-C: quit now
                self.lifecycle.quit_now()
            return
        self.lifecycle.begin(f"received {signal.Signals(sig).name}")
