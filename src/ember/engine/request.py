"""Requests, sequences and sampling parameters: the plain data that crosses the engine seam."""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter a client chose is out of range; `param` names it."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated once, on construction.

    Field names and meanings follow vLLM's so its users are at home.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # A ChatGLM3 reply opens with a metadata line: blank, or the name of one of these tools.
    # Stop strings do not look into that line (its "\n" is no content); a first line that can
    # be no such line is content, and they do. None: the reply has no metadata line.
    metadata_line_names: list[str] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token plus top-k alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Special tokens still written out when the others are skipped (ChatGLM3's <|assistant|>,
    # which separates the segments of a reply that a tool-call parser has to see).
    keep_special_token_ids: list[int] | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: list[int] | None = None
    # vLLM's bad_words as token ids: a sequence's last id is banned right after the others.
    bad_words_token_ids: list[list[int]] | None = None
    # Constrained decoding: a StructuredOutputsParams (engine/structured.py) or a dict with one
    # of json, regex, choice, grammar, json_object, as vLLM takes it.
    structured_outputs: Any = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            from ember.engine.structured import StructuredOutputsParams

            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]  # an empty stop string would stop at once
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is not None and self.top_k < -1:
            raise SamplingParamsError(
                f"top_k must be at least 1, or 0 or -1 for all tokens; got {self.top_k}.", "top_k"
            )
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if self.seed == -1:  # vLLM's rule (and many front ends' "random"): no seed
            self.seed = None
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(message, param)

        need(isinstance(self.n, int) and self.n >= 1, "n", f"n must be at least 1, got {self.n}.")
        need(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"temperature must be non-negative, got {self.temperature}.",
        )
        # 0, as OpenAI and FastChat take it: the nucleus is the top token alone.
        need(0 <= self.top_p <= 1, "top_p", f"top_p must be in [0, 1], got {self.top_p}.")
        need(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        need(
            self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
            "repetition_penalty",
            f"repetition_penalty must be a finite number greater than zero, got "
            f"{self.repetition_penalty}.",
        )
        need(
            -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.",
        )
        need(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.",
        )
        need(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            f"max_tokens must be at least 1, got {self.max_tokens}.",
        )
        need(self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative.")
        need(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).",
        )
        need(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            "logprobs",
            f"logprobs must be in [0, 20], got {self.logprobs}.",
        )
        need(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            "prompt_logprobs",
            "prompt_logprobs must be in [0, 20].",
        )
        for token_id, bias in (self.logit_bias or {}).items():
            need(
                isinstance(token_id, int) and token_id >= 0,
                "logit_bias",
                f"logit_bias keys must be token ids, got {token_id!r}.",
            )
            need(
                -100 <= bias <= 100,
                "logit_bias",
                f"logit_bias values must be in [-100, 100], got {bias}.",
            )
        for token_id in self.stop_token_ids or []:
            need(
                isinstance(token_id, int) and token_id >= 0,
                "stop_token_ids",
                "stop_token_ids must be token ids.",
            )
        if self.allowed_token_ids is not None:
            need(
                bool(self.allowed_token_ids)
                and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids),
                "allowed_token_ids",
                "allowed_token_ids must be a non-empty list of token ids.",
            )
        for word in self.bad_words_token_ids or []:
            need(
                bool(word) and all(isinstance(t, int) and t >= 0 for t in word),
                "bad_words",
                "bad_words must be non-empty token id sequences.",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids a client passes must exist in the model's vocabulary."""
        for name, ids in (
            ("logit_bias", list((self.logit_bias or {}).keys())),
            ("stop_token_ids", self.stop_token_ids or []),
            ("allowed_token_ids", self.allowed_token_ids or []),
        ):
            for token_id in ids:
                if token_id >= vocab_size:
                    raise SamplingParamsError(
                        f"{name} has token id {token_id}, outside the vocabulary of {vocab_size}.",
                        name,
                    )


def _nth_seed(seed: int, i: int) -> int:
    """The seed of a request's i-th sample: seed + i, but never -1 (which means no seed):
    2**64 - 1 in its place is the same 64 bits to the generator."""
    return 2**64 - 1 if seed + i == -1 else seed + i


def fan_out(params: SamplingParams, count: int) -> list[SamplingParams]:
    """`count` sequences of one prompt (each with n=1); with a seed, each gets its own
    reproducible stream.

    Prompt logprobs are the same for every sample of a prompt, and computing them takes the
    logits of every prompt position: only the first sequence computes them.
    """
    if count == 1:
        return [params]
    return [
        dataclasses.replace(
            params,
            n=1,
            seed=None if params.seed is None else _nth_seed(params.seed, i),
            prompt_logprobs=None if i else params.prompt_logprobs,
        )
        for i in range(count)
    ]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """The log-probability of one token, with the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Sequence:
    """One generated continuation of a prompt, as the scheduler and KV cache see it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already published in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class RequestOutput:
    """What the engine hands out after each step for one sequence: plain data only."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[Logprob] | None = None
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    queue_seconds: float | None = None  # arrival to first schedule; set on the first output
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first),
    # on the first output only.
    prompt_logprobs: list[Logprob | None] | None = None
    # Set (with finished and finish_reason "error") when handling this sequence failed; the
    # other sequences of the step are not affected.
    error: str | None = None
    # The failure was the request's own (constraints no output can meet): raised to its
    # caller as it is (a 400), not as a server error.
    rejection: SamplingParamsError | None = None
