"""Typed settings, in one place. Every field is a `ember serve` flag with an EMBER_ twin.

`EngineConfig` holds what the engine needs; the server adds its own fields in `ServerConfig`.
`add_arguments` turns a dataclass into argparse flags whose defaults come from the environment,
so `--max-num-seqs 8` and `EMBER_MAX_NUM_SEQS=8` mean the same thing, and `--help` lists both.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default", None)
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineConfig:
    model: str | None = _opt(
        "Model directory (Hugging Face layout) or .gguf file; omitted: the embedded default model."
    )
    tokenizer: str | None = _opt("Tokenizer directory, when not the model's own.")
    dtype: str = _opt(
        "Weights and activations dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
        "bfloat16, float16.",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    device: str = _opt("cpu, cuda or auto (cuda when available).", default="auto")
    load_format: str = _opt(
        "auto reads the checkpoint; dummy makes random weights of the right shapes (benchmarks).",
        default="auto",
        choices=["auto", "dummy"],
    )
    max_model_len: int | None = _opt(
        "Longest prompt plus output, in tokens; default: the model's own, capped by the KV cache.",
        minimum=1,
    )
    block_size: int | None = _opt(
        "Tokens per KV cache block (the prefix cache shares whole blocks); default 8 on CPU, "
        "where every prompt token skipped saves compute, and 16 on GPU.",
        minimum=1,
    )
    kv_cache_memory: str | None = _opt(
        "Bytes for the KV cache, e.g. 512MiB or 4GiB; default 512MiB on CPU, and on GPU what "
        "--gpu-memory-utilization leaves after the weights.",
        size=True,
    )
    gpu_memory_utilization: float = _opt(
        "Fraction of GPU memory Ember may use for weights, activations and KV cache.",
        default=0.9,
        minimum=0.01,
        maximum=1.0,
    )
    max_num_seqs: int = _opt("Most sequences running in one step.", default=256, minimum=1)
    max_num_batched_tokens: int | None = _opt(
        "Token budget of one step (prefill chunks plus decodes); default 256 on CPU, where it "
        "bounds how long a burst of prompts stalls running streams, and 4096 on GPU.",
        minimum=1,
    )
    enable_prefix_caching: bool = _opt("Reuse KV blocks of shared prompt prefixes.", default=True)
    enable_chunked_prefill: bool = _opt(
        "Split long prompts across steps, mixed with decodes.", default=True
    )
    attention_backend: str = _opt(
        "Attention implementation: auto (triton on CUDA in bfloat16/float16 when Triton is "
        "installed; cpu for float32 on the CPU when the C kernels build; else torch), cpu, "
        "torch, or triton.",
        default="auto",
        choices=["auto", "cpu", "torch", "triton"],
    )
    enforce_eager: bool = _opt(
        "Run every step eagerly: no CUDA graphs for decode steps on the GPU (they are "
        "captured at start-up for batch sizes 1, 2, 4, 8, then every 16 up to --max-num-seqs).",
        default=False,
    )
    chat_template: str | None = _opt(
        "Chat template: a Jinja file, or a built-in name (chatml, chatml-tools, llama-2, "
        "chatglm3); "
        "default: the model's own."
    )
    tool_call_parser: str = _opt(
        "How tool calls are read from chat replies: auto (from the chat template: chatglm3, "
        "hermes or llama3_json; ChatML models without tools get a Hermes-style template), "
        "hermes, llama3_json, chatglm3, or none (requests with tools are refused).",
        default="auto",
        choices=["auto", "hermes", "llama3_json", "chatglm3", "none"],
    )
    num_threads: int | None = _opt(
        "CPU threads for torch and Ember's C kernels; default: all cores, or as many as the "
        "container's CPU quota (a pod's limits.cpu) when that is fewer.",
        minimum=1,
    )
    seed: int = _opt(
        "Seed for the random weights of --load-format dummy. Requests without a seed of their "
        "own are sampled from an unseeded generator; give `seed` in a request to reproduce it.",
        default=0,
    )
    structured_outputs_threads: int = _opt(
        "Threads that compile JSON Schemas and grammars for structured outputs, off the engine "
        "thread.",
        default=2,
        minimum=1,
    )
    structured_outputs_cache_size: int = _opt(
        "Compiled schemas and grammars kept for reuse (least recently used dropped).",
        default=256,
        minimum=0,
    )
    quantization: str = _opt(
        "Weights in compute: auto (a GGUF file keeps its own quantization, other checkpoints "
        "run in full precision), none (full precision), int8 (per output channel) or int4 "
        "(groups of --quantization-group-size with scale and minimum), rounded to nearest at "
        "load. Activations and the KV cache stay in --dtype.",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
    )
    quantization_group_size: int = _opt(
        "Weights per scale and minimum for --quantization int4: 32 or 128.",
        default=32,
        choices=[32, 128],
    )


@dataclass
class ServingLimits:
    """How `ember serve` holds up under load, faults and shutdown; each field is a flag."""

    max_waiting_requests: int | None = _opt(
        "Most sequences admitted but not yet generating (queued, or in the running batch "
        "before their first token); beyond it a request gets 503 with Retry-After at once. "
        "Default: --max-num-seqs (a full batch awaiting first tokens). 0: no bound.",
        minimum=0,
    )
    max_waiting_tokens: int | None = _opt(
        "Most prompt tokens admitted but not yet generating, so one huge prompt counts for what "
        "it costs. Default: what the KV cache holds, at most 64 steps of --max-num-batched-tokens. "
        "0: no bound.",
        minimum=0,
    )
    request_timeout: float = _opt(
        "Seconds after which a request is aborted (its KV blocks freed) with a 504 error; "
        "0: no limit.",
        default=0.0,
        minimum=0.0,
    )
    shutdown_grace: float = _opt(
        "Seconds after SIGTERM during which the server keeps accepting connections, /health is "
        "503 and new work gets 503, while endpoints drop the pod.",
        default=5.0,
        minimum=0.0,
    )
    drain_timeout: float = _opt(
        "Seconds, after the grace, that in-flight requests get to finish before the server exits.",
        default=30.0,
        minimum=0.0,
    )
    api_key_file: str | None = _opt(
        "File with API keys, one per line (a mounted Secret); re-read when it changes."
    )
    metrics_require_key: bool = _opt("Require an API key on /metrics too.", default=False)
    max_request_body: str = _opt(
        "Largest request body, e.g. 8MiB; a bigger one gets 413.", default="8MiB", size=True
    )


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512MiB or 4GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(number * scale)


# argparse types for hand-written flags: a bad value is a usage error that says what it needs.


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        whole = "whole " if kind is int else ""
        raise argparse.ArgumentTypeError(f"not a {whole}number: {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535, got {value}")
    return value


def origins(text: str) -> list[str]:
    """CORS origins, comma-separated, as a browser's Origin header writes them: an origin
    copied from the address bar ("https://Chat.Example.com/") is matched too, and one with a
    path, which no Origin header has, is refused rather than left never matching."""
    from urllib.parse import urlsplit

    out = []
    for raw in filter(None, (o.strip() for o in text.split(","))):
        if raw == "*":
            out.append(raw)
            continue
        url = urlsplit(raw)
        if url.scheme not in ("http", "https") or not url.netloc or url.path not in ("", "/"):
            raise argparse.ArgumentTypeError(
                f"{raw!r} is not an origin: scheme://host[:port], such as https://chat.example.com"
            )
        if url.query or url.fragment:
            raise argparse.ArgumentTypeError(
                f"{raw!r} is not an origin: it has a query or fragment"
            )
        out.append(f"{url.scheme}://{url.netloc.lower()}")
    return out


def env_name(field_name: str) -> str:
    return "EMBER_" + field_name.upper()


def _base_type(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(raw: str) -> bool:
    """An EMBER_ switch's value; anything but these words is refused, not read as off (or on):
    EMBER_METRICS_REQUIRE_KEY=enabled must not leave /metrics open."""
    word = raw.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"{raw!r} is not a switch: use 1, true, yes or on; 0, false, no or off")


@dataclass(frozen=True)
class BadEnvValue:
    """An environment twin's default that does not read, kept until the command runs (a bad
    EMBER_ variable of `serve` must not stop `ember bench`): `refuse_bad_env` reports it."""

    env: str
    raw: str
    problem: str

    def __repr__(self) -> str:  # as --help shows the default
        return f"{self.raw!r} (refused: not a switch)"

    def error(self) -> ConfigError:
        return ConfigError(f"{self.env}: {self.problem}")


def env_switch(env: str, default: bool) -> bool | BadEnvValue:
    """The default of a switch from its environment twin (unset or empty: `default`)."""
    raw = os.environ.get(env, "")
    if not raw.strip():
        return default
    try:
        return parse_bool(raw)
    except ValueError as e:
        return BadEnvValue(env, raw, str(e))


def refuse_bad_env(args: argparse.Namespace) -> None:
    """Raise ConfigError for the first setting whose environment twin did not read, unless its
    flag was given (the command line wins)."""
    for value in vars(args).values():
        if isinstance(value, BadEnvValue):
            raise value.error()


def _convert(tp: Any, raw: str) -> Any:
    base = _base_type(tp)
    if base is bool:
        return parse_bool(raw)
    return base(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field; the EMBER_ environment twin supplies the default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        env = env_name(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if _base_type(tp) is bool:
            default = env_switch(env, default)
        elif env in os.environ:
            try:
                default = _convert(tp, os.environ[env])
            except ValueError:  # argparse converts it when this command runs, and says why
                default = os.environ[env]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {default!r}]"
        if _base_type(tp) is bool:
            parser.add_argument(
                flag, default=default, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                default=default,
                type=_base_type(tp),
                choices=f.metadata.get("choices"),
                help=help_text,
            )


class ConfigError(ValueError):
    """A setting with a value it cannot take (from a flag, an EMBER_ variable or a keyword)."""


def check_values(config: Any) -> Any:
    """Refuse a value a field cannot take (outside its choices or bounds, or a size that does
    not read), wherever it came from: argparse checks only the command line's own values, not
    defaults read from EMBER_ variables, and `ember.LLM(...)` passes none of it. So a bad
    setting stops `ember serve` before it loads a model, with one line naming it."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        problem = None
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every bound
            problem = "must be a finite number"
        elif meta.get("choices") and value not in meta["choices"]:
            problem = f"must be one of {', '.join(map(str, meta['choices']))}"
        elif "minimum" in meta and value < meta["minimum"]:
            problem = f"must be at least {meta['minimum']}"
        elif "maximum" in meta and value > meta["maximum"]:
            problem = f"must be at most {meta['maximum']}"
        elif meta.get("size"):
            try:
                if parse_bytes(value) <= 0:
                    problem = "must be more than 0 bytes"
            except ValueError:
                problem = "must be a size such as 512MiB or 4GiB"
        if problem:
            raise ConfigError(
                f"{f.name} {problem}; got {value!r} "
                f"(flag --{f.name.replace('_', '-')}, env {env_name(f.name)})"
            )
    return config


def from_namespace(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return check_values(cls(**values))


def from_env(cls: type, **kwargs: Any) -> Any:
    """Build a config from keyword arguments, falling back to EMBER_ variables, then defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
    values = {}
    for name in names:
        # None for a field that cannot be None means its default, as `LLM(quantization=None)`
        # does in vLLM.
        if name in kwargs and (kwargs[name] is not None or _admits_none(hints[name])):
            values[name] = kwargs[name]
        elif env_name(name) in os.environ:
            raw = os.environ[env_name(name)]
            if not raw.strip() and _base_type(hints[name]) is bool:
                continue  # an empty switch: its default, as on the command line
            try:
                values[name] = _convert(hints[name], raw)
            except ValueError:
                kind = _base_type(hints[name]).__name__
                raise ConfigError(f"{env_name(name)} must be a {kind}; got {raw!r}") from None
    return check_values(cls(**values))


def _admits_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def add_env_twins(parser: argparse.ArgumentParser, prefix: str = "EMBER_") -> None:
    """Give every optional flag of a hand-written parser that has none an environment twin,
    PREFIX + its name (`--max-tokens` of `bench`: EMBER_BENCH_MAX_TOKENS), and say so in --help."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or "[env " in (action.help or ""):
            continue
        env = prefix + action.dest.upper()
        if env in os.environ:
            raw = os.environ[env]
            if action.nargs == 0:  # store_true / store_false
                action.default = env_switch(env, action.default)
            else:
                try:
                    action.default = action.type(raw) if callable(action.type) else raw
                except (ValueError, TypeError, argparse.ArgumentTypeError):
                    action.default = raw  # converted (and refused) when this command runs
            action.required = False
        action.help = f"{action.help or ''} [env {env}; default {action.default!r}]".lstrip()
