"""Structured outputs: decoding constrained by a JSON Schema, a regex, a choice or a grammar.

The backend is llguidance (one abi3 wheel, no runtime dependencies, JSON Schema + regex +
Lark-style grammars, fast on the CPU). Its use sits behind a small interface:

* `GrammarBackend.compile(spec)` turns a `StructuredOutputsParams` into a compiled grammar, or
  raises `StructuredOutputsError` naming the problem. Results are cached by spec, and the
  server compiles on a small thread pool (`compile_async`), so a slow schema never stalls the
  engine thread.
* `GrammarBackend.matcher(spec)` gives a request its own `GrammarMatcher` (a copy of the
  compiled one): `fill_bitmask` (one int32 row of allowed-token bits), `accept`, `rollback`,
  `is_terminated`.
* `GrammarBackend.fill_bitmasks` fills the rows of every constrained sequence of a step at once
  (on llguidance's own threads), and `apply_bitmask` sets the logits of disallowed tokens to
  -inf, only on those rows.

A sequence's matcher follows its output tokens. Preemption recomputes the KV cache of tokens
already chosen, and prefix caching only skips computing KV, so neither touches the matcher.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ember.engine.json_schema import (
    COMPACT_JSON,
    close_objects,
    schema_problem,
    unenforced_keywords,
)
from ember.engine.request import SamplingParamsError

log = logging.getLogger(__name__)

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def readable_error(error: str, limit: int = 500) -> str:
    """llguidance's message without the parser state and grammar text it appends (kilobytes,
    megabytes for a large grammar), on one line, cut at `limit` characters."""
    text = re.sub(r"<(state|grammar)>.*?(</\1>|$)", " ", error, flags=re.DOTALL)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class StructuredOutputsError(SamplingParamsError):
    """A schema or grammar a client sent cannot be compiled (a 400 naming the problem)."""


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match; exactly one field is set (as vLLM names them).

    json: a JSON Schema (dict or its JSON text); json_object: any JSON object; regex: a
    regular expression; choice: one of these strings; grammar: a Lark-style grammar (llguidance
    dialect) or GBNF.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # Which request field it came from, for error messages (e.g. "response_format").
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputsError(
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                f"json_object; got {', '.join(given) or 'none'}.",
                self.param,
            )
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple)
            or not self.choice
            or not all(isinstance(c, str) for c in self.choice)
        ):
            raise StructuredOutputsError(
                "structured_outputs.choice must be a non-empty list of strings.", self.param
            )

    @classmethod
    def of(cls, value: StructuredOutputsParams | dict[str, Any]) -> StructuredOutputsParams:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise StructuredOutputsError(
                "structured_outputs must be an object with one of json, regex, choice, "
                "grammar or json_object.",
                "structured_outputs",
            )
        unknown = set(value) - {*_KINDS, "param"}
        if unknown:
            raise StructuredOutputsError(
                f"structured_outputs has unknown field(s): {', '.join(sorted(unknown))}.",
                "structured_outputs",
            )
        return cls(**value)

    @property
    def key(self) -> str:
        """Cache key. Key order is kept: it is the order a schema's properties are written."""
        kind = next(k for k in _KINDS if getattr(self, k) not in (None, False))
        value = getattr(self, kind)
        return kind + ":" + (value if isinstance(value, str) else json.dumps(value))

    def to_grammar(self) -> str:
        """The llguidance grammar (its JSON form) for this spec."""
        import llguidance as llg
        from llguidance import LLMatcher

        try:
            if self.json_object:
                return LLMatcher.grammar_from_json_schema({"type": "object"}, COMPACT_JSON)
            if self.json is not None:
                schema = json.loads(self.json) if isinstance(self.json, str) else self.json
                # llguidance would take an unending recursion, then fail on its first token.
                if problem := schema_problem(schema):
                    raise StructuredOutputsError(f"Invalid JSON Schema: {problem}.", self.param)
                return LLMatcher.grammar_from_json_schema(close_objects(schema), COMPACT_JSON)
            if self.regex is not None:
                return LLMatcher.grammar_from_regex(ascii_digits(self.regex))
            if self.choice is not None:
                # One lexer terminal, not a rule of alternatives: llguidance's parser takes at
                # most 2,000 items at one point, its lexer any number of strings.
                return LLMatcher.grammar_from_lark(
                    "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in self.choice)
                )
            assert self.grammar is not None
            return llg.grammar_from("grammar", self.grammar)
        except StructuredOutputsError:
            raise
        except RecursionError:  # JSON text nested past what json.loads takes
            raise StructuredOutputsError(
                f"Invalid {self._what()}: nested too deeply.", self.param
            ) from None
        except (ValueError, TypeError) as e:
            raise StructuredOutputsError(f"Invalid {self._what()}: {e}", self.param) from e

    def _what(self) -> str:
        if self.json is not None:
            return "JSON Schema"
        return "regex" if self.regex is not None else "grammar" if self.grammar else "choice"


def lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly (llguidance reads JSON-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarMatcher:
    """One sequence's position in its grammar."""

    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar forbids it (then in error)."""
        return bool(self._m.consume_token(token_id))

    def rollback(self, num_tokens: int) -> bool:
        return bool(self._m.rollback(num_tokens))

    def is_terminated(self) -> bool:
        """Nothing more may follow: the output is complete (or the matcher is in error)."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """The output so far is complete, though the grammar may allow more."""
        return bool(self._m.is_accepting())

    def is_error(self) -> bool:
        return bool(self._m.is_error())

    def error(self) -> str:
        return readable_error(str(self._m.get_error()))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits for the next token into `bitmask[row]` (CPU int32)."""
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


@dataclass
class _Compiled:
    grammar: str
    template: Any  # an LLMatcher at the start of the grammar; each request gets a deep copy


class GrammarBackend:
    """Compiles specs for one tokenizer and fills the bitmask rows of a batch."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        compile_threads: int = 2,
        cache_size: int = 256,
    ) -> None:
        self._tokenizer_source = tokenizer
        self.vocab_size = vocab_size  # logits width (may exceed the tokenizer's vocabulary)
        self.words = (vocab_size + 31) // 32
        self._lltok: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Compiled] = OrderedDict()
        self._cache_size = max(cache_size, 1)
        self._pool = ThreadPoolExecutor(max(compile_threads, 1), "ember-grammar")
        self._executor: Any = None
        self._shifts: dict[torch.device, torch.Tensor] = {}
        # Totals for metrics and benchmarks: time spent computing masks, and rows masked.
        self.mask_seconds = 0.0
        self.masked_rows = 0

    # ---------------------------------------------------------------- compiling

    @property
    def lltokenizer(self) -> Any:
        """Built on first use (about a second for a 50k vocabulary), then shared."""
        with self._lock:
            if self._lltok is None:
                self._lltok = lltokenizer(self._tokenizer_source, self.vocab_size)
                # Masks have one bit per id llguidance knows; ids past those stay banned.
                self.words = (self._lltok.vocab_size + 31) // 32
                self.vocab_size = min(self.vocab_size, self._lltok.vocab_size)
            return self._lltok

    def compile(self, spec: StructuredOutputsParams) -> _Compiled:
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from llguidance import LLMatcher

        tok = self.lltokenizer
        grammar = spec.to_grammar()
        # One check gives the errors and the warnings (a JSON Schema keyword it would skip).
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if failed:
            error = readable_error("\n".join(messages))
            raise StructuredOutputsError(f"Invalid {spec._what()}: {error}", spec.param)
        if spec.json is not None and (problem := unenforced_keywords(messages)):
            raise StructuredOutputsError(f"Invalid JSON Schema: {problem}.", spec.param)
        template = LLMatcher(tok, grammar, log_level=0)
        if template.is_error():
            raise StructuredOutputsError(
                f"Invalid {spec._what()}: {readable_error(template.get_error())}", spec.param
            )
        error = self._first_steps_error(GrammarMatcher(template.deep_copy()))
        if error:
            raise StructuredOutputsError(f"Invalid {spec._what()}: {error}", spec.param)
        compiled = _Compiled(grammar, template)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _first_steps_error(self, matcher: GrammarMatcher, steps: int = 4) -> str | None:
        """Some limits (a lexer row of over 2,000 alternatives) show only when the grammar
        runs: walk its first few tokens (each time the lowest allowed id) so such a grammar
        is refused up front, not failed mid-reply."""
        mask = self.allocate_bitmask(1)
        for _ in range(steps):
            matcher.fill_bitmask(mask, 0)
            words = torch.nonzero(mask[0])
            if matcher.is_error() or not len(words):
                break
            word = int(words[0])
            bits = int(mask[0, word]) & 0xFFFFFFFF
            if not matcher.accept(word * 32 + (bits & -bits).bit_length() - 1):
                break
            if matcher.is_terminated():
                break
        return matcher.error() if matcher.is_error() else None

    def compile_async(self, spec: StructuredOutputsParams) -> Future[_Compiled]:
        """Compile on the backend's thread pool (llguidance drops the GIL while it works)."""
        return self._pool.submit(self.compile, spec)

    def matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec).template.deep_copy())

    # ---------------------------------------------------------------- each step

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, self.words), -1, dtype=torch.int32)

    def fill_bitmasks(
        self, matchers: list[GrammarMatcher], extra_ids: list[Iterable[int]]
    ) -> torch.Tensor:
        """One bitmask row per matcher. `extra_ids[i]` are also allowed wherever matcher i
        accepts the output as complete (the engine's stop tokens: eos, <|user|>, ...)."""
        # Not llguidance.torch: importing it runs torch.compile's set-up (seconds).
        from llguidance import LLExecutor

        t0 = time.perf_counter()
        bitmask = self.allocate_bitmask(len(matchers))
        if len(matchers) == 1:
            matchers[0].fill_bitmask(bitmask, 0)
        else:
            if self._executor is None:
                self._executor = LLExecutor()
            self._executor.unsafe_compute_mask_ptr(
                [(m._m, i) for i, m in enumerate(matchers)],
                bitmask.data_ptr(),
                self.words * 4,
                len(matchers),
            )
        for i, m in enumerate(matchers):
            if m.is_accepting():
                for t in extra_ids[i]:
                    if 0 <= t < self.vocab_size:
                        bitmask[i, t // 32] |= _bit(t % 32)
        self.mask_seconds += time.perf_counter() - t0
        self.masked_rows += len(matchers)
        return bitmask

    @torch.inference_mode()
    def apply_bitmask(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """logits[rows] = -inf wherever the row's bit is 0 (in place, only those rows)."""
        t0 = time.perf_counter()
        width = logits.shape[1]
        n = min(self.vocab_size, width)  # ids past the grammar's vocabulary are always banned
        words = (n + 31) // 32
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy, one row at a time: unpacking the bits and a masked write cost ~0.1 ms a
            # row of 49k, where torch's small ops cost 10x that waking its thread pool.
            out = logits.numpy()
            banned = np.unpackbits(
                np.invert(bitmask[:, :words].numpy()).view(np.uint8), axis=1, bitorder="little"
            ).view(np.bool_)[:, :n]
            for i, row in enumerate(rows):
                np.copyto(out[row, :n], -np.inf, where=banned[i])
                out[row, n:] = -np.inf
        else:
            device = logits.device
            shifts = self._shifts.get(device)
            if shifts is None:
                shifts = torch.arange(32, dtype=torch.int32, device=device)
                self._shifts[device] = shifts
            bits = bitmask[:, :words].to(device, non_blocking=True)
            banned = (((bits.unsqueeze(-1) >> shifts) & 1) == 0).view(len(rows), -1)[:, :n]
            if n < width:
                pad = torch.ones(len(rows), width - n, dtype=torch.bool, device=device)
                banned = torch.cat([banned, pad], dim=1)
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            logits[idx] = logits[idx].masked_fill(banned, float("-inf"))
        self.mask_seconds += time.perf_counter() - t0

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def ascii_digits(regex: str) -> str:
    """`regex` with \\d as [0-9] and \\D as [^0-9]. llguidance reads regexes as Rust does, where
    \\d is any Unicode digit (so a phone number could come out in Arabic-Indic or segmented
    digits); users of vLLM's regex and of JSON Schema patterns expect ASCII digits."""
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(c + nxt)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _bit(k: int) -> int:
    """Bit k of an int32 word, as the signed value torch stores (bit 31 is negative)."""
    return -(1 << 31) if k == 31 else 1 << k


# ------------------------------------------------------------------ tokenizer bridges


def lltokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """An llguidance tokenizer for one of Ember's tokenizers (chat/tokenizer.py), or "byte"."""
    import llguidance as llg

    if isinstance(tokenizer, llg.LLTokenizer):
        return tokenizer
    if tokenizer == "byte":
        return llg.LLTokenizer("byte")
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:  # ChatGLM3: SentencePiece pieces plus special tokens after them
        return llg.LLTokenizer(
            llg.TokenizerWrapper(_SentencePieceVocab(tokenizer, vocab_size)), n_vocab=vocab_size
        )
    hf = getattr(tokenizer, "hf", tokenizer)
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf, n_vocab=max(vocab_size, len(hf)))


class _SentencePieceVocab:
    """The face llguidance.TokenizerWrapper reads: each id's bytes, specials, eos, encode."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        sp = tokenizer.sp
        tokens: list[bytes] = []
        special: list[int] = []
        for i in range(tokenizer.vocab_size):
            if i >= tokenizer.sp_size:  # ChatGLM3's own specials ([gMASK], <|user|>, ...)
                tokens.append(tokenizer.convert_ids_to_tokens([i])[0].encode())
                special.append(i)
                continue
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                tokens.append(piece.encode())
                special.append(i)
            elif sp.is_byte(i):  # <0x0A> and the like
                tokens.append(bytes([int(piece[3:-1], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        for i in range(len(tokens), vocab_size):  # the model's padded logit rows: never allowed
            tokens.append(f"<|unused_{i}|>".encode())
            special.append(i)
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        banned = set(special)
        self._ids = {t: i for i, t in enumerate(tokens) if i not in banned and t}
        self._longest = max(len(t) for t in self._ids)

    def __call__(self, text: str | bytes) -> list[int]:
        """Greedy longest-match ids of exactly these bytes. SentencePiece's own encode would
        put its dummy-prefix space first, which llguidance would take for part of the text."""
        data = text.encode() if isinstance(text, str) else text
        ids, i = [], 0
        while i < len(data):
            for k in range(min(self._longest, len(data) - i), 0, -1):
                token_id = self._ids.get(data[i : i + k])
                if token_id is not None:
                    ids.append(token_id)
                    i += k
                    break
            else:  # no byte piece for it (a model trained without byte fallback): skip
                i += 1
        return ids
