"""`ember chat`: a terminal chat with any OpenAI-compatible server, or with the engine in-process.

Replies stream as they arrive and render as Markdown (rich). Finished blocks are printed for good
and only the block still being written is redrawn, so long replies never fight the scrollback.
Ctrl-C stops the reply, closing its request so that the server (or the in-process engine) frees
the sequence at once; Ctrl-D exits.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.text import Text

HELP = """\
Commands:
  /reset          forget the conversation (the system prompt stays)
  /system [TEXT]  show the system prompt, or set it (`/system -` clears it)
  /model [NAME]   show the model, or switch to another served model
  /save FILE      write the conversation as JSON (or Markdown when FILE ends in .md)
  /exit           leave (Ctrl-D too); Ctrl-C stops a reply
A message of several lines goes between triple quotes: start with \"\"\" and end with \"\"\"."""


class ChatError(Exception):
    """A request failed in a way the user can act on; `fatal` ends the program."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Backend(Protocol):
    model: str

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """The reply's text as it arrives; closing the iterator ends the request."""

    def switch_model(self, name: str) -> None: ...


# ------------------------------------------------------------------ OpenAI-compatible server


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteBackend:
    """Chat completions over HTTP with the `openai` client."""

    def __init__(self, url: str, api_key: str | None, model: str | None, args: Any) -> None:
        import openai

        self._openai = openai
        self.url = url
        self.key_given = bool(api_key)
        # Never fall back to OPENAI_API_KEY: that key must not travel to some other server.
        self.client = openai.OpenAI(
            base_url=_api_base(url), api_key=api_key or "none", max_retries=0, timeout=600
        )
        self.extra = {
            k: v
            for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
            if v is not None
        }
        names = self._served_models(required=model is None)
        if model is not None and names and model not in names:  # said now, not every turn
            raise ChatError(
                f"{model!r} is not served at {url}; try one of: {', '.join(names)}", fatal=True
            )
        self.model = model or names[0]

    def _served_models(self, required: bool) -> list[str]:
        """The served names; a refused key fails here, before the first question."""
        try:
            names = [m.id for m in self.client.models.list()]
        except self._openai.APIError as e:
            err = self._error(e)
            if err.fatal or required:
                raise err from e
            return []  # a server without /v1/models still chats with --model
        if not names and required:
            raise ChatError(f"{self.url} serves no models.", fatal=True)
        return names

    def switch_model(self, name: str) -> None:
        names = self._served_models(required=False)
        if names and name not in names:
            raise ChatError(f"{name!r} is not served here; try one of: {', '.join(names)}")
        self.model = name

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        try:
            with self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, **self.extra
            ) as chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except self._openai.APIError as e:
            raise self._error(e) from e

    def _error(self, e: Exception) -> ChatError:
        o = self._openai
        if isinstance(e, o.AuthenticationError):
            how = "pass --api-key or set EMBER_API_KEY"
            if self.key_given:
                return ChatError(f"{self.url} refused the API key (401); {how}.", fatal=True)
            return ChatError(f"{self.url} needs an API key (401); {how}.", fatal=True)
        if isinstance(e, o.APIConnectionError):
            return ChatError(f"Cannot reach {self.url}: {e.__cause__ or e}", fatal=False)
        if isinstance(e, o.APIStatusError):
            said = f"The server answered {e.status_code}: {_message(e.body, e)}"
            if getattr(e, "code", None) == "context_length_exceeded":
                said += " /reset starts afresh (or /save first)."
            return ChatError(said)
        return ChatError(f"The server reported an error: {_message(getattr(e, 'body', None), e)}")


def _message(body: Any, e: Exception) -> str:
    """The message of an OpenAI-shaped error body, else the exception's own text."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))


# ------------------------------------------------------------------ in-process engine


class LocalBackend:
    """The engine in this process: AsyncEngine on its own thread, prompts by the chat template."""

    def __init__(self, args: Any) -> None:
        from ember.chat.templates import ChatFormatter, resolve_chat_template
        from ember.config import EngineConfig, from_namespace
        from ember.engine.async_engine import AsyncEngine
        from ember.engine.core import EngineCore
        from ember.models.loader import served_name

        cfg = from_namespace(EngineConfig, args)
        core = EngineCore(cfg)
        self.engine = AsyncEngine(core)
        template = resolve_chat_template(cfg.chat_template, core.tokenizer, core.hf_config)
        self.formatter = ChatFormatter(core.tokenizer, template)
        self.model = served_name(cfg.model)
        self.max_model_len = core.max_model_len
        # Sampling as the server does it: the request's values, else generation_config's.
        self.defaults = core.sampling_defaults
        if args.temperature is not None:
            self.defaults["temperature"] = args.temperature
        self.max_tokens = args.max_tokens
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="ember-chat", daemon=True).start()

    def switch_model(self, name: str) -> None:
        raise ChatError(
            f"The in-process engine runs {self.model} only; start `ember chat --model PATH` "
            "for another model, or chat with a server (--url)."
        )

    def stream(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from ember.engine.core import PromptError
        from ember.engine.request import SamplingParams, SamplingParamsError

        try:
            ids = self.formatter.encode(messages, add_generation_prompt=True)
        except ValueError as e:  # the chat template refused the conversation
            raise ChatError(str(e)) from e
        room = self.max_model_len - len(ids)
        max_tokens = min(self.max_tokens or room, room)
        if max_tokens <= 0:
            raise ChatError(
                f"The conversation ({len(ids)} tokens) fills the model's context of "
                f"{self.max_model_len}; /reset to start afresh."
            )
        params = SamplingParams(max_tokens=max_tokens, **self.defaults)
        try:
            self.engine.validate(ids, params)
        except (PromptError, SamplingParamsError) as e:
            raise ChatError(str(e)) from e
        pieces: queue.SimpleQueue = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for out in self.engine.generate(ids, params, f"chat-{uuid.uuid4().hex}"):
                    pieces.put(out.new_text)
                pieces.put(None)
            except Exception as e:  # noqa: BLE001 (handed to the reading thread)
                pieces.put(e)

        task = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                try:
                    item = pieces.get(timeout=0.1)  # short waits: Ctrl-C lands promptly
                except queue.Empty:
                    continue
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise ChatError(f"The engine failed: {item}") from item
                if item:
                    yield item
        finally:
            # Cancelling the task ends engine.generate(), which aborts the sequence.
            task.cancel()
            concurrent.futures.wait([task], timeout=5)


# ------------------------------------------------------------------ rendering


def finished_length(text: str) -> int:
    """Length of the leading part of `text` made of finished Markdown blocks: everything up to
    its last blank line outside a code fence (0 when there is none)."""
    cut, pos, fenced = 0, 0, False
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.strip() == "" and line.endswith("\n"):
            cut = pos
    return cut


class _Tail:
    """The last screenful of a renderable, so the block being written stays in view."""

    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-max(console.height - 1, 1) :]:
            yield from line
            yield Segment.line()


class ReplyView:
    """Shows a streamed reply: Markdown on a terminal, the raw text otherwise (pipes, files)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.text = ""
        self.shown = 0  # characters already printed for good
        self.live: Live | None = None

    def __enter__(self) -> ReplyView:
        if self.console.is_terminal:
            self.live = Live(console=self.console, transient=True, refresh_per_second=12)
            self.live.start()
        return self

    def add(self, delta: str) -> None:
        self.text += delta
        if self.live is None:
            self.console.file.write(delta)
            self.console.file.flush()
            return
        cut = self.shown + finished_length(self.text[self.shown :])
        if cut > self.shown:
            self.live.console.print(Markdown(self.text[self.shown : cut]))
            self.console.print()
            self.shown = cut
        self.live.update(_Tail(Markdown(self.text[self.shown :])))

    def __exit__(self, *exc: Any) -> None:
        if self.live is None:
            self.console.file.write("\n")
            return
        self.live.stop()
        if self.text[self.shown :].strip():
            self.console.print(Markdown(self.text[self.shown :]))


# ------------------------------------------------------------------ the conversation


class Chat:
    def __init__(self, backend: Backend, system: str | None, console: Console) -> None:
        self.backend = backend
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self.console = console

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, question: str) -> None:
        """One turn; a reply stopped by Ctrl-C is kept as far as it got."""
        self.history.append({"role": "user", "content": question})
        view = ReplyView(self.console)
        stopped = False
        with view:
            replies = self.backend.stream(self.messages())
            try:
                for delta in replies:
                    view.add(delta)
            except KeyboardInterrupt:
                stopped = True
            except ChatError:
                self.history.pop()
                raise
            finally:
                replies.close()  # on Ctrl-C this closes the request
        if stopped:
            self.console.print("[dim]\\[stopped][/dim]")
        if view.text:
            self.history.append({"role": "assistant", "content": view.text})
        else:
            self.history.pop()  # nothing came back: forget the question too

    def save(self, path: str) -> str:
        messages = self.messages()
        file = Path(path).expanduser()
        if file.suffix.lower() == ".md":
            text = "".join(f"## {m['role']}\n\n{m['content']}\n\n" for m in messages)
        else:
            text = json.dumps(
                {"model": self.backend.model, "messages": messages}, ensure_ascii=False, indent=2
            )
        file.write_text(text + "\n", encoding="utf-8")
        return f"Saved {len(messages)} messages to {file}."

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()

        def say(text: str) -> None:
            self.console.print(text, markup=False, highlight=False)  # names, paths, prompts

        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            say("Conversation cleared.")
        elif name == "/system":
            if arg:
                self.system = None if arg == "-" else arg
                say("System prompt cleared." if self.system is None else "System prompt set.")
            else:
                say(f"System prompt: {self.system!r}" if self.system else "No system prompt.")
        elif name == "/model":
            if arg:
                self.backend.switch_model(arg)
            say(f"Model: {self.backend.model}")
        elif name == "/save":
            if not arg:
                raise ChatError("Usage: /save FILE")
            try:
                say(self.save(arg))
            except OSError as e:
                raise ChatError(f"Cannot write {arg}: {e.strerror or e}") from e
        elif name == "/help":
            say(HELP)
        else:
            raise ChatError(f"Unknown command {name}; /help lists them.")
        return True


class Markdown(RichMarkdown):
    """rich's Markdown, with raw HTML kept as text: rich drops HTML, so a reply's `List<String>`
    lost its `<String>` and a `<div>` block vanished (the chat page shows them as text too)."""

    # Built once: a streaming reply is rendered again at each update.
    _parser = MarkdownIt("commonmark", {"html": False}).enable("strikethrough").enable("table")

    def __init__(self, markup: str, **kwargs: Any) -> None:
        super().__init__("", **kwargs)  # rich's own parse of the text would be thrown away
        self.markup = markup
        self.parsed = self._parser.parse(markup)


QUOTES = '"""'


def _read_line(prompt: str) -> str | None:
    """The next input line; None at end of input (Ctrl-D). Ctrl-C propagates."""
    try:
        return input(prompt)
    except EOFError:
        return None


def _read_message(prompts: bool = True) -> tuple[str, bool] | None:
    """The next message and whether it came between triple quotes (as Ollama reads them:
    never a /command); None at end of input. Ctrl-C drops what was typed, as in a shell.
    Without `prompts` (input from a pipe), no ">>> " goes into the output among the replies."""
    first, more_prompt = (">>> ", "... ") if prompts else ("", "")
    try:
        line = _read_line(first)
        if line is None or not line.lstrip().startswith(QUOTES):
            return None if line is None else (line, False)
        rest = line.lstrip()[len(QUOTES) :]
        if rest.rstrip().endswith(QUOTES) and rest.strip() != "":
            return rest.rstrip()[: -len(QUOTES)], True  # """one line"""
        lines = [rest] if rest.strip() else []
        while True:
            more = _read_line(more_prompt)
            if more is None:  # Ctrl-D ends the block
                break
            if more.rstrip().endswith(QUOTES):
                lines.append(more.rstrip()[: -len(QUOTES)])
                break
            lines.append(more)
        return "\n".join(lines), True
    except KeyboardInterrupt:
        print()
        return "", False


def _report(console: Console, e: ChatError) -> None:
    # Plain text (no markup inside), one line whatever the width: logs and pipes read it whole.
    console.print(Text.assemble(("error: ", "red"), str(e)), soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    try:
        if args.url:
            backend: Backend = RemoteBackend(args.url, args.api_key, args.model, args)
        else:
            with err.status("Loading the model…"):
                backend = LocalBackend(args)
    except ChatError as e:
        _report(err, e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading or connecting
        return 130
    chat = Chat(backend, args.system, console)
    where = f"at {args.url}" if args.url else "in this process"
    # From a pipe, the output is the replies alone (the banner goes to stderr), and the exit
    # status says whether every question was answered.
    interactive = sys.stdin.isatty()
    (console if interactive else err).print(
        Text(f"{backend.model} {where}. /help for commands, Ctrl-D to leave.", style="dim"),
        soft_wrap=True,
    )
    failed = False  # a piped question or command failed: the status says so at the end
    while True:
        message = _read_message(prompts=interactive)
        if message is None:
            if interactive:
                console.print()
            return 1 if failed else 0
        line, quoted = message
        several = "\n" in line
        # A block between triple quotes keeps its indentation (code); a line is trimmed.
        text = line.strip("\n") if several else line.strip()
        if not text.strip():
            continue
        try:
            if text.startswith("/") and not quoted:
                if not chat.command(text):
                    return 1 if failed else 0
            else:
                chat.ask(text)
        except ChatError as e:
            _report(err, e)
            failed = not interactive  # at a terminal, the user has seen it and goes on
            if e.fatal:
                return 1


# ------------------------------------------------------------------ command line


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _first_key(raw: str | None) -> str | None:
    # EMBER_API_KEY may list several keys for `ember serve`; a client sends the first.
    keys = [k.strip() for k in (raw or "").split(",") if k.strip()]
    return keys[0] if keys else None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ember.config import EngineConfig, add_arguments, non_negative_float, positive_int

    help = "Chat in the terminal with a server (--url) or with the engine in-process."
    p = sub.add_parser("chat", help=help, description=help + "\n\n" + HELP)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--url",
        default=_env("EMBER_URL"),
        help="An OpenAI-compatible server, e.g. http://localhost:8000; omitted: load the model "
        "in this process. [env EMBER_URL]",
    )
    p.add_argument(
        "--model",
        default=_env("EMBER_MODEL"),
        help="With --url: the served model name (default: the first listed). Without: a model "
        "directory or .gguf file (default: the embedded model). [env EMBER_MODEL]",
    )
    p.add_argument(
        "--api-key",
        type=_first_key,
        default=_first_key(_env("EMBER_API_KEY")),
        help="Bearer key for the server. [env EMBER_API_KEY]",
    )
    p.add_argument(
        "--system", default=_env("EMBER_SYSTEM"), help="A system prompt. [env EMBER_SYSTEM]"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=_env("EMBER_MAX_TOKENS") or None,  # a string: argparse converts and checks it
        help="Longest reply in tokens; default: the server's (in-process: the context left). "
        "[env EMBER_MAX_TOKENS]",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=_env("EMBER_TEMPERATURE") or None,
        help="Sampling temperature; default: the model's generation_config, else 1. "
        "[env EMBER_TEMPERATURE]",
    )
    engine = p.add_argument_group("in-process engine (without --url)")
    add_arguments(engine, EngineConfig, skip=("model",))
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    import logging

    # Engine and client logs would break into the conversation; --log-level DEBUG keeps them.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)
    return run(args)
