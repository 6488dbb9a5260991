"""`ember bench`: an async load generator for any OpenAI-compatible server; prints JSON.

Sends N streaming requests with at most C in flight and reports throughput plus time to
first token (TTFT), time per output token (TPOT) and end-to-end latency percentiles.

    ember bench --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-tokens 64
    python -m ember.bench --url http://127.0.0.1:8000 --chat --no-progress
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ember.config import positive_float, positive_int

# Prompts differ from their first words on, so a prefix cache cannot serve them for free.
_OPENERS = [
    "Write a short story about",
    "Explain to a child",
    "Give three facts about",
    "Describe",
    "Summarize what you know about",
    "Compose a poem on",
    "List the pros and cons of",
    "Tell me a joke involving",
    "Write a news headline about",
    "Argue for and against",
]
_TOPICS = [
    "the ocean", "volcanoes", "honey bees", "the moon", "chess", "bread", "rainforests",
    "the Roman empire", "jazz", "glaciers", "electric cars", "coffee", "owls", "the internet",
    "deserts", "tea", "trains", "lighthouses", "octopuses", "mountains", "bicycles", "libraries",
    "comets", "gardening", "penguins", "music theory", "bridges", "clouds", "ancient Egypt",
    "photography", "whales", "paper",
]  # fmt: skip
_WORDS = [
    "river", "stone", "bright", "quiet", "garden", "lantern", "copper", "window", "thunder",
    "maple", "silver", "harbor", "whisper", "meadow", "candle", "orbit", "velvet", "crystal",
    "engine", "feather", "canyon", "ember", "signal", "marble", "forest", "compass", "harvest",
    "island", "journey", "kettle", "ladder", "mirror", "needle", "orchard", "pepper", "quartz",
    "ribbon", "saddle", "timber", "umbrella", "valley", "wander", "yellow", "zephyr", "anchor",
    "basket", "cobalt", "dragon", "echo", "falcon", "glacier", "horizon", "ivory", "jungle",
    "kingdom", "lemon", "mosaic", "nectar", "oyster", "prism", "rocket", "summit", "tundra",
    "violet", "willow",
]  # fmt: skip

_PERCENTILES = (50, 90, 99)


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    """`n` varied prompts of about `words` words each, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        head = f"{rng.choice(_OPENERS)} {rng.choice(_TOPICS)}"
        need = max(0, words - len(head.split()) - 2)
        filler = " ".join(rng.choice(_WORDS) for _ in range(need))
        out.append(f"{head}, using these words: {filler}." if filler else f"{head}.")
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on sorted input."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in _PERCENTILES}}
    s = sorted(values)
    out: dict[str, float | None] = {"mean": round(sum(s) / len(s), 6)}
    for q in _PERCENTILES:
        out[f"p{q}"] = round(percentile(s, q), 6)
    return out


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    input_tokens: int = 0  # the prompt's, as the server's usage counts them
    # Seconds since the request was sent at which each non-empty content chunk arrived.
    token_times: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(body: bytes | str) -> str:
    """The `error.message` of an OpenAI error body, else the body itself."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return text


def _content(chunk: dict[str, Any], chat: bool) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if chat:
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def timed_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], chat: bool, timeout: float
) -> Result:
    """`one_request`, failed as a timeout once it has run `timeout` seconds in all (the
    client's own timeouts bound each read, and a stream that keeps trickling never ends)."""
    try:
        return await asyncio.wait_for(one_request(client, path, body, chat), timeout)
    except asyncio.TimeoutError:
        res = Result()
        res.error = f"timeout: over {timeout:g} s"
        return res


async def one_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], chat: bool
) -> Result:
    res = Result()
    content_chunks = 0
    usage_tokens: int | None = None
    done = False
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                res.error = _short(f"HTTP {resp.status_code}: {_error_message(await resp.aread())}")
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = _short(f"stream error: {_error_message(data)}")
                    return res
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    res.input_tokens = chunk["usage"].get("prompt_tokens") or 0
                if _content(chunk, chat):
                    now = time.perf_counter() - t0
                    if res.ttft is None:
                        res.ttft = now
                    res.token_times.append(now)
                    content_chunks += 1
        res.e2e = time.perf_counter() - t0
    except httpx.TimeoutException as e:
        res.error = _short(f"timeout: {type(e).__name__}")
        return res
    except Exception as e:  # noqa: BLE001 (any failure is one error sample, not a crash)
        res.error = _short(f"{type(e).__name__}: {e}")
        return res
    if not done:
        res.error = "stream ended without [DONE]"
        return res
    # A server may hold back text (partial characters), so chunks undercount; usage is exact.
    res.output_tokens = usage_tokens if usage_tokens is not None else content_chunks
    res.ok = True
    return res


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def default_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise RuntimeError(
            f"GET /v1/models: HTTP {resp.status_code}: {_short(_error_message(resp.content))}"
        )
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models lists no models; pass --model")
    return str(data[0]["id"])


def _request_body(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension: every request then yields max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/").removesuffix("/v1")  # an OpenAI base URL names the server too
    api_key = args.api_key or os.environ.get("EMBER_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if api_key and "," in api_key:
        api_key = api_key.split(",")[0].strip()  # EMBER_API_KEY may list several for serve
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 30.0))
    # One connection per in-flight request: pooling limits must not throttle concurrency.
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(
        base_url=url, headers=_auth_headers(api_key), timeout=timeout, limits=limits
    ) as client:
        model = args.model or await default_model(client)
        path = "/v1/chat/completions" if args.chat else "/v1/completions"
        prompts = make_prompts(args.requests, args.prompt_len, args.seed)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        results: list[Result | None] = [None] * args.requests
        progress = _progress(args)
        task_id = progress.add_task("bench", total=args.requests) if progress else None

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results[i] = await timed_request(
                    client, path, _request_body(args, model, prompts[i]), args.chat, args.timeout
                )
                if progress is not None:
                    progress.advance(task_id)

        t0 = time.perf_counter()
        if progress is not None:
            progress.start()
        interrupted = False
        try:
            await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.requests))))
        except asyncio.CancelledError:  # Ctrl-C: the report of what finished
            interrupted = True
        finally:
            if progress is not None:
                progress.stop()
        duration = time.perf_counter() - t0

    done = [r for r in results if r is not None]
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    samples: list[str] = []
    for r in failed:  # distinct reasons, in order of first appearance
        if r.error and r.error not in samples and len(samples) < 5:
            samples.append(r.error)
    out_tokens = sum(r.output_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    return {
        "url": url,
        "model": model,
        "endpoint": path,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "completed": len(ok),
        "errors": len(failed),
        "error_samples": samples,
        "duration_s": round(duration, 4),
        "requests_per_s": round(len(ok) / duration, 4) if duration > 0 else None,
        "input_tokens": sum(r.input_tokens for r in ok),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / duration, 4) if duration > 0 else None,
        "ttft_s": summarize([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": summarize([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": summarize(itl),
        "e2e_s": summarize([r.e2e for r in ok if r.e2e is not None]),
        "interrupted": interrupted,
    }


def _progress(args: argparse.Namespace) -> Any:
    if args.no_progress:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    # stderr, so stdout stays pure JSON for pipes.
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("EMBER_BENCH_URL", "http://127.0.0.1:8000"),
        help="Server base URL. [env EMBER_BENCH_URL; default http://127.0.0.1:8000]",
    )
    p.add_argument("--model", default=None, help="Model name; default: first of GET /v1/models.")
    p.add_argument("--concurrency", "-c", type=positive_int, default=1, help="Requests in flight.")
    p.add_argument("--requests", "-n", type=positive_int, default=16, help="Requests in total.")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="Tokens per request.")
    p.add_argument("--chat", action="store_true", help="Use /v1/chat/completions.")
    p.add_argument(
        "--api-key", default=None, help="Bearer token. [env EMBER_API_KEY or OPENAI_API_KEY]"
    )
    p.add_argument(
        "--prompt-len", type=positive_int, default=32, help="Approximate words per prompt."
    )
    p.add_argument("--seed", type=int, default=0, help="Seed for the prompts.")
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Send ignore_eos so every request yields --max-tokens tokens (default: on).",
    )
    p.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature; default: server's."
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="Seconds a request may take in all (its stream included) before it is an error.",
    )
    p.add_argument("--output", "-o", default=None, help="Also write the JSON to this file.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        print(f"ember bench: --output {args.output}: no such directory", file=sys.stderr)
        return 2  # said before the run, not after it
    try:
        report = asyncio.run(run_bench(args))
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"ember bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any request ran
        print("ember bench: interrupted", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            print(f"ember bench: --output {args.output}: {e.strerror}", file=sys.stderr)
            return 2
    if report["interrupted"]:
        print("ember bench: interrupted; the report covers what finished", file=sys.stderr)
        return 130
    # Nothing finished: fail, so scripts notice; the JSON above still says why.
    return 1 if report["completed"] == 0 else 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` on the `ember` command line."""
    help = "Load-test an OpenAI-compatible server with streaming requests; prints JSON."
    p = subparsers.add_parser("bench", help=help, description=help)
    _configure(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench", description=__doc__.splitlines()[0])
    _configure(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
