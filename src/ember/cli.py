"""`ember` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import NoReturn

from ember.config import (
    ConfigError,
    EngineConfig,
    ServingLimits,
    add_arguments,
    add_env_twins,
    env_switch,
    from_namespace,
    origins,
    port,
    positive_int,
    refuse_bad_env,
)

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _engine_parser(
    sub: argparse._SubParsersAction, name: str, help: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help=EngineConfig.__dataclass_fields__["model"].metadata["help"],
    )
    add_arguments(p, EngineConfig, skip=("model",))
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    import ember

    if args.prompt in (None, "-"):  # `echo "question" | ember generate`, as llm and ollama read it
        if args.prompt is None and sys.stdin.isatty():
            print("ember generate: give --prompt TEXT, or pipe the prompt in", file=sys.stderr)
            return 2
        args.prompt = sys.stdin.read().rstrip("\n")
    if not args.prompt.strip():  # `ember generate < /dev/null`, `-p "$UNSET"`: a mistake
        print("ember generate: the prompt is empty", file=sys.stderr)
        return 2

    cfg = from_namespace(EngineConfig, args)
    # Checked before the model loads, so a bad value fails at once.
    if cfg.chat_template:
        from ember.chat.templates import read_chat_template

        read_chat_template(cfg.chat_template)
    params = ember.SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    t0 = time.perf_counter()
    try:
        llm = ember.LLM(**vars(cfg))
        if args.raw:
            result = llm.generate([args.prompt], params)[0]
        else:
            result = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    except KeyboardInterrupt:  # Ctrl-C: a shell's exit status for it, not a traceback
        print("interrupted", file=sys.stderr)
        return 130
    out = result.outputs[0]
    print(out.text)
    if args.verbose:
        stats = {
            "seconds": round(time.perf_counter() - t0, 2),
            "prompt_tokens": len(result.prompt_token_ids),
            "output_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason,
        }
        print(json.dumps(stats), file=sys.stderr)
    return 0


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [v.strip() for v in raw.split(",") if v.strip()]


def _api_keys(args: argparse.Namespace) -> list[str]:
    """The keys to require. One set but empty is refused: it would serve with no keys at all,
    and an empty Kubernetes Secret is a mistake to catch, not a way to open the server."""
    if args.api_key is not None:
        keys = [k.strip() for k in args.api_key if k.strip()]
        if not keys:
            raise ConfigError("--api-key is empty; give a key, or leave it out to serve without")
        return keys
    if "EMBER_API_KEY" in os.environ and not _env_list("EMBER_API_KEY"):
        raise ConfigError(
            "EMBER_API_KEY is set but empty (a Secret without a value?); give a key, or unset "
            "it to serve without"
        )
    return _env_list("EMBER_API_KEY")


def _served_names(args: argparse.Namespace) -> list[str]:
    """The names given, if any; an empty one is refused (no client could name the model)."""
    if args.served_model_name is not None:
        names = [n.strip() for n in args.served_model_name]
        if not all(names):
            raise ConfigError("--served-model-name is empty; give a name, or leave it out")
        return names
    if "EMBER_SERVED_MODEL_NAME" in os.environ and not _env_list("EMBER_SERVED_MODEL_NAME"):
        raise ConfigError("EMBER_SERVED_MODEL_NAME is set but empty; give a name, or unset it")
    return _env_list("EMBER_SERVED_MODEL_NAME")


def _embedding_name(args: argparse.Namespace) -> str | None:
    if not args.embedding_model:
        return None
    if args.embedding_model_name:
        return args.embedding_model_name
    from pathlib import Path

    path = Path(args.embedding_model).resolve()
    # A model shipped inside a package sits in a folder named `model`: name it for the package.
    return path.parent.name if path.name == "model" else path.name


def _quit_mid_load(asked_to_stop: bool) -> None:
    """Stopped while the model loads: the loader thread is deep in torch, and finalizing the
    interpreter around it aborts the process. Nothing is served yet and every cache write is a
    rename, so leave at once: a clean stop when a signal asked for it (a pod deleted during its
    start), a failure when the server could not start (its port taken, its address wrong)."""
    if asked_to_stop:
        logging.getLogger("ember.server").info("stopped while the model was loading")
    else:
        print("ember serve: the server could not start (see the error above)", file=sys.stderr)
    _leave(0 if asked_to_stop else 1)


def _leave(code: int) -> NoReturn:
    """End the server's process now, its logs flushed. Threads may still be deep in torch (the
    engine mid-step, a loader, an encoder batch nobody waits for): finalizing the interpreter
    around them takes seconds and can abort the process ("terminate called ...", read by
    Kubernetes as a crash). Every reply has been sent and every cache write is a rename."""
    try:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # closed at launch (`>&-`)
                stream.flush()
    except Exception:  # a reader gone (a pipe broken): leave all the same
        pass
    os._exit(code)


def cmd_serve(args: argparse.Namespace) -> int:
    from ember.hub import HubError, model_for_serve

    # A hub id (ORG/NAME, not a local path) is pulled into the cache first and served under that
    # id, as vLLM does; a local directory is checked so a wrong one fails now, with its reason.
    model = model_for_serve(
        args.model, args.source, args.revision, args.load_format, args.tokenizer
    )
    for flag, path in (
        ("--tokenizer", args.tokenizer),
        ("--embedding-model", args.embedding_model),
    ):
        if path is not None and not os.path.isdir(path):
            raise HubError(f"{flag} {path}: no such directory")

    import uvicorn

    from ember.chat.templates import read_chat_template
    from ember.engine.runner import check_device
    from ember.models.loader import served_name
    from ember.server.app import build_app
    from ember.server.lifecycle import EmberServer
    from ember.server.state import ServerConfig

    cfg = from_namespace(EngineConfig, args, model=model)
    check_device(cfg.device)  # now, not after the port is bound and the model half loaded
    if cfg.chat_template:  # a missing file, an unknown name or a typo: refused now
        read_chat_template(cfg.chat_template)
    names = _served_names(args)
    server_cfg = ServerConfig(
        served_model_names=names or [args.model if model != args.model else served_name(cfg.model)],
        api_keys=_api_keys(args),
        allowed_origins=args.allowed_origins,
        default_max_tokens=args.default_max_tokens,
        embedding_model=args.embedding_model,
        embedding_model_name=_embedding_name(args),
        chat_page=args.chat_page,
        limits=from_namespace(ServingLimits, args),
    )
    server: uvicorn.Server | None = None

    def stop(_error: BaseException) -> None:
        # A model that cannot load must end the process (non-zero), not leave it unready forever.
        if server is not None:
            server.should_exit = True

    def quit_mid_load() -> None:
        # Only a signal begins the drain; a failed start (port in use) stops without one.
        _quit_mid_load(asked_to_stop=app.state.ember.lifecycle.draining)

    app = build_app(cfg, server_cfg, on_load_error=stop, on_stop_while_loading=quit_mid_load)
    # The engine thread takes the GIL back after every torch op; with the default 5 ms switch
    # interval a busy event loop (a burst of requests, 32 streams writing) makes it wait that
    # long each time. 0.5 ms measured 3-5% more tokens/s at 32 streams on 2 cores.
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_keep_alive=30,
        timeout_graceful_shutdown=max(server_cfg.limits.drain_timeout, 0.1),
    )
    lifecycle = app.state.ember.lifecycle
    server = EmberServer(config, lifecycle)
    server.run()
    error = app.state.ember.load_error
    if error is not None:
        print(f"ember serve: model failed to load: {_one_line(error)}", file=sys.stderr)
        _leave(1)
    if lifecycle.exit_code:
        print(
            "ember serve: the engine loop died; exiting so the process is restarted",
            file=sys.stderr,
        )
    _leave(lifecycle.exit_code)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {text}"


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert a GGUF model (default: the embedded one) into the cache ahead of time."""
    from ember.models.loader import resolve_model_dir

    t0 = time.perf_counter()
    path = resolve_model_dir(args.model)
    print(f"{path} ({time.perf_counter() - t0:.1f}s)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag told in one line as Ember's own setting checks tell theirs:
    the usage it prints first is forty lines for `ember serve`. Subcommands use it too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ember", description="Serve open LLMs, fast.")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="Log verbosity."
    )
    add_env_twins(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    g = _engine_parser(sub, "generate", "Generate one reply from the command line.")
    g.add_argument(
        "--prompt",
        "-p",
        help="The user message (or raw text with --raw); without it, or with -, read from stdin.",
    )
    g.add_argument("--raw", action="store_true", help="Complete the text as is, no chat template.")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--verbose", "-v", action="store_true", help="Print timing as JSON on stderr.")
    add_env_twins(g, "EMBER_GENERATE_")
    g.set_defaults(func=cmd_generate)

    s = _engine_parser(sub, "serve", "Serve a model behind an OpenAI-compatible HTTP API.")
    s.add_argument(
        "--host", default=os.environ.get("EMBER_HOST", "0.0.0.0"), help="[env EMBER_HOST]"
    )
    s.add_argument(
        "--port",
        type=port,
        default=os.environ.get("EMBER_PORT", "8000"),  # a string: argparse converts and checks
        help="[env EMBER_PORT]",
    )
    # Repeatable flags: given on the command line they replace the environment's list, as every
    # other flag replaces its EMBER_ twin (see cmd_serve), rather than adding to it.
    s.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="Name(s) clients use in `model` (repeatable); default: the directory or file name. "
        "[env EMBER_SERVED_MODEL_NAME, comma-separated]",
    )
    s.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="Require `Authorization: Bearer KEY` on /v1/* (repeatable). "
        "[env EMBER_API_KEY, comma-separated]",
    )
    s.add_argument(
        "--allowed-origins",
        type=origins,
        default=os.environ.get("EMBER_ALLOWED_ORIGINS", "*"),
        help="CORS origins, comma-separated. [env EMBER_ALLOWED_ORIGINS; default *]",
    )
    s.add_argument(
        "--default-max-tokens",
        type=positive_int,
        default=os.environ.get("EMBER_DEFAULT_MAX_TOKENS") or None,
        help="max_tokens when a request sets none; default: up to the context length. "
        "[env EMBER_DEFAULT_MAX_TOKENS]",
    )
    s.add_argument(
        "--embedding-model",
        default=os.environ.get("EMBER_EMBEDDING_MODEL"),
        help="A BERT-family sentence encoder directory served on /v1/embeddings. "
        "[env EMBER_EMBEDDING_MODEL]",
    )
    s.add_argument(
        "--embedding-model-name",
        default=os.environ.get("EMBER_EMBEDDING_MODEL_NAME"),
        help="Its name in `model`; default: the directory name. [env EMBER_EMBEDDING_MODEL_NAME]",
    )
    s.add_argument(
        "--chat-page",
        action=argparse.BooleanOptionalAction,
        default=env_switch("EMBER_CHAT_PAGE", True),
        help="Serve the chat page at `/`; --no-chat-page serves the API alone. "
        "[env EMBER_CHAT_PAGE; default on]",
    )
    add_arguments(s, ServingLimits)
    from ember import hub

    hub.add_source_arguments(s)
    s.set_defaults(func=cmd_serve)
    hub.add_parsers(sub)

    from ember import bench

    add_env_twins(bench.add_parser(sub), "EMBER_BENCH_")

    from ember import terminal_chat

    terminal_chat.add_parser(sub)

    p = sub.add_parser("prepare", help="Convert a GGUF model into the cache ahead of time.")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # from EMBER_LOG_LEVEL, which argparse does not check
        parser.error(f"EMBER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Per-request client logs would drown the bench's progress bar and the server's own log.
    for noisy in ("httpx", "httpcore", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from ember.hub import HubError

    try:
        refuse_bad_env(args)
        return args.func(args)
    except HubError as e:
        print(f"ember {args.command}: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # as argparse reports a bad flag: usage error, status 2
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # a missing path, a bad prompt or sampling value: one line
        print(f"ember {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
