"""Incremental detokenization with stop strings, for streaming one sequence's output.

Two things make streaming text harder than decoding once at the end:

* A token need not end on a character boundary: byte-level BPE and byte-fallback SentencePiece
  split multi-byte UTF-8 characters (CJK, emoji) across tokens, and decoding such a token alone
  gives U+FFFD. We decode a short sliding window of ids and hold the text back until the
  character is complete (the prefix_offset/read_offset technique of TGI and vLLM).
* Stop strings must never reach the client, not even their first few characters, so the text
  that could still grow into a stop string is held back until it either does (we cut there) or
  can no longer (we release it).
"""

from __future__ import annotations

from ember.chat.chatglm3 import is_tool_name, may_be_metadata
from ember.chat.tokenizer import BaseTokenizer
from ember.engine.request import SamplingParams

# How many prompt tokens the first window starts with: enough context that the first output
# token decodes with its leading space (SentencePiece strips it at the start of a decode).
INITIAL_PROMPT_CONTEXT = 5

# A window whose text still ends in U+FFFD after this many unread tokens is not a character
# still being spelled out (UTF-8 needs at most 4 bytes) but genuinely invalid output: release it
# so the window, and so the cost of a step, stays bounded.
MAX_UNREAD_TOKENS = 8

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text, a step at a time, applying stop strings.

    Each step decodes only `ids[prefix_offset:]` (a few tokens), so its cost does not grow with
    the length of the sequence.
    """

    def __init__(
        self, tokenizer: BaseTokenizer, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        # Skipping all specials but a few: drop the others from the ids, decode what remains.
        keep = set(params.keep_special_token_ids or ())
        self._drop: frozenset[int] = frozenset()
        if keep and params.skip_special_tokens:
            self._drop = tokenizer.all_special_ids - keep
            self._skip_special_tokens = False
            prompt_token_ids = [t for t in prompt_token_ids if t not in self._drop]
        self._include_stop = params.include_stop_str_in_output
        stop = params.stop if isinstance(params.stop, list) else [params.stop or ""]
        self._stops: list[str] = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # ChatGLM3's metadata line: the names it may hold while undecided, then None.
        names = params.metadata_line_names
        self._metadata_names = None if names is None else frozenset(names)
        self._metadata_held = ""  # the first line so far, while it may be metadata
        self._metadata_under = 0  # of it, the characters that came within min_tokens
        # vLLM's rule: stop strings, like eos, count only after min_tokens tokens.
        self._min_tokens = params.min_tokens
        self._num_tokens = 0

        # Only the prompt's tail is kept: it is context for the first window, never emitted.
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_PROMPT_CONTEXT:])
        self._prefix_offset = 0  # the window's context starts here (already emitted)
        self._read_offset = len(self._ids)  # ids from here on are not yet turned into text

        self._pending = ""  # decoded text held back as a possible start of a stop string
        self._chunks: list[str] = []  # emitted text, joined lazily by `output_text`
        self._joined: str | None = ""
        self._finished = False

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        if self._joined is None:
            self._joined = "".join(self._chunks)
            self._chunks = [self._joined]
        return self._joined

    @property
    def finished(self) -> bool:
        """True once a stop string matched or `flush` was called; later tokens are ignored."""
        return self._finished

    def add_tokens(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Feed newly generated ids; return (text now safe to emit, matched stop string or None).

        Once a stop string matched, the text ends just before it (or includes it with
        include_stop_str_in_output) and the caller finishes the sequence.
        """
        under = self._min_tokens - self._num_tokens
        if 0 < under < len(new_token_ids):  # the ids cross min_tokens: their head is unchecked
            head, _ = self.add_tokens(new_token_ids[:under])
            tail, stop = self.add_tokens(new_token_ids[under:])
            return head + tail, stop
        self._num_tokens += len(new_token_ids)
        if self._drop:
            new_token_ids = [t for t in new_token_ids if t not in self._drop]
        if self._finished or not new_token_ids:
            return "", None
        self._ids.extend(new_token_ids)
        new_text = self._decode_step(final=False)
        if not new_text:
            return "", None
        return self._apply_stops(new_text)

    def flush(self) -> tuple[str, str | None]:
        """The sequence ended for another reason (eos, length, abort): return the held-back
        text, and the stop string it holds, if any.

        Two kinds of held text can hold one, and are checked now: a first line held as
        possible ChatGLM3 metadata (ended undecided, it is content), and the text of tokens
        held while a character was incomplete (a stop string may sit before the cut
        character). A character left incomplete at the end is emitted as U+FFFD, as a full
        decode gives it.
        """
        if self._finished:
            return "", None
        held, under = self._metadata_held, self._metadata_under
        self._metadata_names, self._metadata_held, self._metadata_under = None, "", 0
        rest = self._decode_step(final=True)
        stop = None
        if (held or rest) and self._stops:  # nothing is pending before a first line is decided
            if self._num_tokens <= self._min_tokens:
                under += len(rest)
            text, stop = self._check_stops(held + rest, under)
            if stop is None:  # no stop string can complete now
                text += self._emit(self._pending)
        else:
            text = self._emit(held + self._pending + rest)
        self._pending = ""
        self._finished = True
        return text, stop

    def _decode_step(self, final: bool) -> str:
        """Decode the window and return the text the unread ids add, or "" to wait for more."""
        if self._read_offset >= len(self._ids):
            return ""
        skip = self._skip_special_tokens
        prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip
        )
        window_text = self._tokenizer.decode(
            self._ids[self._prefix_offset :], skip_special_tokens=skip
        )
        unread = len(self._ids) - self._read_offset
        if window_text.endswith(_REPLACEMENT_CHAR) and not final and unread < MAX_UNREAD_TOKENS:
            return ""  # a multi-byte character is split across tokens: wait for the rest
        if not (
            window_text.startswith(prefix_text) or len(window_text) > len(prefix_text) or final
        ):
            # The decoder rewrote the context (e.g. cleanup of spaces) and added nothing yet.
            return ""
        # When the context was rewritten, cutting at its length is vLLM's fallback.
        new_text = window_text[len(prefix_text) :]
        # Slide the window: the ids just read become the next step's context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > 4 * MAX_UNREAD_TOKENS:
            # Drop ids that no window will see again, so memory stays bounded too.
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text

    def _apply_stops(self, new_text: str) -> tuple[str, str | None]:
        if not self._stops:
            return self._emit(new_text), None
        head, under = "", 0
        if self._metadata_names is not None:
            head, new_text, under = self._past_metadata_line(new_text)
            if not new_text:
                return head, None
        if self._num_tokens <= self._min_tokens:
            under = len(new_text)
        text, stop = self._check_stops(new_text, under)
        return head + text, stop

    def _check_stops(self, new_text: str, under: int) -> tuple[str, str | None]:
        """Emit `new_text` up to the first stop string it completes (of its first `under`
        characters, from within min_tokens, none counts); hold back a possible start of one."""
        head = ""
        if under:
            # No stop counts in text from within min_tokens, but one may begin there and end
            # after them: hold back what could be its start, as later.
            head += self._hold_possible_stop(self._pending + new_text[:under])
            new_text = new_text[under:]
            if not new_text:
                return head, None
        text = self._pending + new_text
        # Held text holds no whole stop string, so a match must end inside the new text.
        start = max(0, len(self._pending) - self._max_stop_len + 1)
        match = self._find_stop(text, start)
        if match is not None:
            pos, stop = match
            self._pending = ""
            self._finished = True
            end = pos + len(stop) if self._include_stop else pos
            return head + self._emit(text[:end]), stop
        return head + self._hold_possible_stop(text), None

    def _past_metadata_line(self, new_text: str) -> tuple[str, str, int]:
        """(the metadata line, emitted unchecked; the text after it, for stop strings; how
        many of its first characters came within min_tokens). The first line is held while
        it may still be metadata; one that cannot be is content, and all of it is checked.
        ("", "", 0) while undecided."""
        seen = self._metadata_held + new_text
        under = self._metadata_under
        if self._num_tokens <= self._min_tokens:
            under += len(new_text)
        nl = seen.find("\n")
        line = seen if nl < 0 else seen[:nl]
        names = self._metadata_names
        if nl < 0 and may_be_metadata(line, names):
            self._metadata_held, self._metadata_under = seen, under
            return "", "", 0
        self._metadata_names, self._metadata_held, self._metadata_under = None, "", 0
        name = line.strip()
        if nl >= 0 and (not name or is_tool_name(name, names)):
            return self._emit(seen[: nl + 1]), seen[nl + 1 :], max(0, under - nl - 1)
        return "", seen, under

    def _hold_possible_stop(self, text: str) -> str:
        """Emit `text` but for an end that may be the start of a stop string, kept pending."""
        hold = self._partial_stop_len(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return self._emit(text[: len(text) - hold])

    def _find_stop(self, text: str, start: int) -> tuple[int, str] | None:
        """The stop string that completes first in `text` (a streamed text would reach it
        first); among those ending at the same place, the one starting earliest."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            pos = text.find(stop, start)
            if pos < 0:
                continue
            key = (pos + len(stop), pos, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._max_stop_len - 1), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._joined = None
        return text
