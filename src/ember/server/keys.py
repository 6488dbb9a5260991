"""API keys: from flags, EMBER_API_KEY, or a file (a mounted Kubernetes Secret) re-read when it
changes. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

# How often the key file's modification time is looked at, in seconds: a stat per request
# would be cheap too, but a Secret update takes a minute or so to reach the pod anyway.
RECHECK_SECONDS = 1.0


def _read_keys(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


class KeyStore:
    def __init__(self, keys: list[str], path: str | None = None) -> None:
        self._static = [k for k in keys if k]
        self._path = path
        self._file_keys: list[str] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if path:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return bool(self._static or self._path)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            assert self._path is not None
            try:
                st = os.stat(self._path)
            except OSError as e:
                if force:
                    raise ValueError(f"--api-key-file {self._path}: {e.strerror}") from e
                log.warning("API key file unreadable (%s); keeping the keys read before", e)
                return
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            try:
                keys = _read_keys(self._path)
            except OSError as e:
                log.warning("API key file unreadable (%s); keeping the keys read before", e)
                return
            self._file_keys, self._stamp = keys, stamp
            log.info("API key file read: %d key(s)", len(keys))  # the count, never the keys

    def keys(self) -> list[str]:
        if self._path:
            self._reload()
        return self._static + self._file_keys

    def check(self, token: str) -> bool:
        """Constant time in the token's content: every key is compared, with no early exit."""
        given = token.encode()
        ok = False
        for key in self.keys():
            ok |= hmac.compare_digest(given, key.encode())
        return ok and bool(token)
