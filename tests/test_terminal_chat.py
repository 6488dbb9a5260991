"""`ember chat` driven as a user would: the real program in a pseudo-terminal (pexpect), against
the session's real `ember serve`, and once with the engine in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pexpect
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ember.terminal_chat import finished_length

from conftest import API_KEY, default_sigint

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = ">>> "
CHAT_ENV = ("URL", "MODEL", "API_KEY", "SYSTEM", "MAX_TOKENS", "TEMPERATURE")


def _spawn(*args: str, env: dict[str, str] | None = None) -> pexpect.spawn:
    clean = {k: v for k, v in os.environ.items() if k.removeprefix("EMBER_") not in CHAT_ENV}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ember.cli", "chat", *args],
        env={**clean, "TERM": "xterm-256color", **(env or {})},
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 120),
        preexec_fn=default_sigint,  # Ctrl-C reaches it as a terminal's does
    )
    child.logfile_read = io.StringIO()  # everything the terminal showed
    return child


def _plain(text: str) -> str:
    """Terminal output without colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def _screen(child: pexpect.spawn) -> str:
    return _plain(child.logfile_read.getvalue())


def _read(child: pexpect.spawn) -> str:
    """What the program wrote since the last read or expect (pexpect reads only when asked)."""
    got = ""
    with contextlib.suppress(pexpect.TIMEOUT):
        while True:
            got += child.read_nonblocking(65536, timeout=0.05)
    return _plain(got)


def _leave(child: pexpect.spawn) -> int:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def _save(child: pexpect.spawn, path: Path) -> list[dict[str, str]]:
    child.sendline(f"/save {path}")
    child.expect_exact(f"to {path}")
    child.expect_exact(PROMPT)
    return json.loads(path.read_text())["messages"]


def _usage(server: str) -> dict:
    return httpx.get(server + "/dashboard/billing/usage", headers=AUTH).json()


def _running(server: str) -> float:
    text = httpx.get(server + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "ember:num_requests_running":
            return sum(s.value for s in family.samples)
    raise AssertionError("no ember:num_requests_running in /metrics")


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{3,}", text)


@pytest.mark.slow
def test_two_turns_carry_the_history(server, tmp_path):
    chat = _spawn("--url", server, "--api-key", API_KEY, "--model", "smol", "--max-tokens", "12")
    chat.expect_exact(PROMPT)
    chat.sendline("My name is Ada. Greet me.")
    chat.expect_exact(PROMPT)
    before = _usage(server)
    chat.sendline("What is my name?")
    chat.expect_exact(PROMPT)
    after = _usage(server)
    messages = _save(chat, tmp_path / "chat.json")
    assert _leave(chat) == 0

    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "My name is Ada. Greet me."
    assert messages[2]["content"] == "What is my name?"
    assert messages[1]["content"] and messages[3]["content"]
    # The second request's prompt was the whole conversation so far, token for token.
    count = httpx.post(
        server + "/tokenize", json={"model": "smol", "messages": messages[:3]}, headers=AUTH
    ).json()["count"]
    assert after["prompt_tokens"] - before["prompt_tokens"] == count
    # Both replies were shown (rendered as Markdown, so compare words, not layout).
    screen = _screen(chat)
    for reply in (messages[1]["content"], messages[3]["content"]):
        assert all(w in screen for w in _words(reply)), (reply, screen)


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_frees_the_slot(server, tmp_path):
    # Env twins instead of flags, for once.
    env = {
        "EMBER_URL": server,
        "EMBER_API_KEY": API_KEY,
        "EMBER_MAX_TOKENS": "150",
        "EMBER_TEMPERATURE": "0",
    }
    chat = _spawn(env=env)
    chat.expect_exact(PROMPT)
    before = _usage(server)
    chat.sendline("Write a very long story about a dragon who learns to bake bread.")
    chat.expect_exact("bread.\r\n")  # the echoed question; what follows is the reply
    _wait_for(lambda: _running(server) == 1, 30, "the reply to start")
    shown = ""

    def reply_on_screen() -> bool:
        nonlocal shown
        shown += _read(chat)
        return len(_words(shown)) >= 3

    _wait_for(reply_on_screen, 30, "reply text")
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(PROMPT)
    # The request was closed, so the server aborted the sequence rather than finishing it.
    _wait_for(lambda: _running(server) == 0, 30, "the server to free the sequence")
    _wait_for(lambda: _usage(server) != before, 30, "the stopped request's usage")
    messages = _save(chat, tmp_path / "stopped.json")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    partial = messages[1]["content"]
    assert partial, "the stopped reply is kept as far as it got"
    # The server generated little beyond what was shown: a few tokens in flight, not the
    # rest of a 150-token story (far longer than what is shown before Ctrl-C).
    shown = httpx.post(
        server + "/tokenize",
        json={"model": "smol", "prompt": partial, "add_special_tokens": False},
        headers=AUTH,
    ).json()["count"]
    generated = _usage(server)["completion_tokens"] - before["completion_tokens"]
    assert shown <= generated + 2 and generated <= shown + 50, (shown, generated)

    chat.sendline("/reset")
    chat.expect_exact("Conversation cleared.")
    chat.sendline("Reply with the single word OK.")
    chat.expect_exact(PROMPT)
    messages = _save(chat, tmp_path / "after.json")
    assert _leave(chat) == 0
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"]
    assert "Traceback" not in chat.logfile_read.getvalue()


def _ends_before_the_first_question(chat: pexpect.spawn, message: str) -> None:
    """The chat says `message` and exits 1 before it ever prompts, with no traceback."""
    chat.expect_exact(message)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 1
    screen = _screen(chat)
    assert "Traceback" not in screen and PROMPT not in screen


@pytest.mark.slow
def test_refused_key_says_so_and_exits(server):
    chat = _spawn("--url", server, "--api-key", "not-the-key")
    _ends_before_the_first_question(chat, "refused the API key (401)")


@pytest.mark.slow
def test_a_refusal_is_one_line_when_piped(server):
    """Not a terminal (a pipe, a log): rich would wrap at 80 columns, splitting the line."""
    cmd = [sys.executable, "-m", "ember.cli", "chat", "--url", server]
    r = subprocess.run(
        [*cmd, "--api-key", "not-the-key"],
        input="hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("EMBER_API_KEY."), line


@pytest.mark.slow
def test_piped_questions_give_replies_alone_and_a_status_that_says_if_all_went_well(server):
    """From a pipe, ">>> " prompts and the banner went into the output among the replies, and
    the exit status was 0 even when a question failed."""
    cmd = [sys.executable, "-m", "ember.cli", "chat", "--url", server, "--api-key", API_KEY]
    cmd += ["--model", "smol", "--max-tokens", "3"]
    ok = subprocess.run(cmd, input="hi\n", capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ">>>" not in ok.stdout and "/help" not in ok.stdout and ok.stdout.strip()
    assert "/help for commands" in ok.stderr
    bad = subprocess.run(
        cmd, input="hi\n/model nope\n", capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "'nope'" in bad.stderr
    # Leaving with /exit says so too (it once answered 0 after a failure).
    bad = subprocess.run(
        cmd, input="/model nope\nhi\n/exit\n", capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "'nope'" in bad.stderr


@pytest.mark.slow
def test_at_a_terminal_a_mistake_seen_and_passed_does_not_fail_the_session(server):
    """The status of an interactive chat is 0 on Ctrl-D, as on /exit, after an unknown
    command: the user saw the error and went on."""
    for leave in ("/exit", None):
        chat = _spawn("--url", server, "--api-key", API_KEY, "--model", "smol")
        chat.expect_exact(PROMPT)
        chat.sendline("/bogus")
        chat.expect_exact("Unknown command /bogus")
        chat.expect_exact(PROMPT)
        if leave:
            chat.sendline(leave)
            chat.expect(pexpect.EOF)
            chat.close()
            assert chat.exitstatus == 0
        else:
            assert _leave(chat) == 0


@pytest.mark.slow
def test_a_model_the_server_does_not_serve_ends_the_chat_at_once(server):
    chat = _spawn("--url", server, "--api-key", API_KEY, "--model", "nope")
    _ends_before_the_first_question(chat, "'nope' is not served at")


@pytest.mark.slow
def test_in_process_engine_matches_the_server(server, tmp_path):
    """Without --url the default model runs in-process, and answers as the server does."""
    # The session server runs the float weights (--quantization none); so does this engine.
    chat = _spawn(
        "--max-tokens", "8", "--temperature", "0", "--system", "Be brief.", "--quantization", "none"
    )
    chat.expect_exact(PROMPT, timeout=180)
    chat.sendline("Name a colour.")
    chat.expect_exact(PROMPT)
    messages = _save(chat, tmp_path / "chat.json")
    assert _leave(chat) == 0
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    body = {"model": "smol", "messages": messages[:2], "max_tokens": 8, "temperature": 0}
    served = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert messages[2]["content"] == served.json()["choices"][0]["message"]["content"]


def test_finished_blocks_are_those_before_a_blank_line_outside_code():
    """What the reply view prints for good while the rest is still being written."""
    assert finished_length("Hello wor") == 0
    assert finished_length("# Title\n\nSome text") == len("# Title\n\n")
    fenced = "Code:\n\n```py\na = 1\n\nb = 2"
    assert finished_length(fenced) == len("Code:\n\n")  # the blank line inside stays open
    closed = fenced + "\n```\n\nAfter"
    assert finished_length(closed) == len(closed) - len("After")


@pytest.mark.slow
def test_triple_quotes_send_several_lines_as_one_message(server, tmp_path):
    chat = _spawn("--url", server, "--api-key", API_KEY, "--model", "smol", "--max-tokens", "4")
    chat.expect_exact(PROMPT)
    chat.sendline('"""Translate these lines:')
    chat.expect_exact("... ")
    chat.sendline("  one")
    chat.expect_exact("... ")
    chat.sendline('two"""')
    chat.expect_exact(PROMPT)
    chat.sendline('"""A single line."""')
    chat.expect_exact(PROMPT)
    chat.sendline('"""/usr/bin is where?"""')  # quoted: a message, never a /command
    chat.expect_exact(PROMPT)
    chat.sendline('"""')
    chat.expect_exact("... ")
    chat.sendline("    indented code")
    chat.expect_exact("... ")
    chat.sendline('"""')
    chat.expect_exact(PROMPT)
    chat.sendline('"""')  # Ctrl-C inside a block drops it
    chat.expect_exact("... ")
    chat.sendline("never sent")
    chat.expect_exact("... ")
    chat.sendintr()
    chat.expect_exact(PROMPT)
    messages = _save(chat, tmp_path / "chat.json")
    assert _leave(chat) == 0
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == [
        "Translate these lines:\n  one\ntwo",
        "A single line.",
        "/usr/bin is where?",
        "    indented code",
    ]


def test_a_reply_about_markup_shows_its_tags_as_text():
    """rich's Markdown drops raw HTML: `List<String>` showed as `List`, a <div> block vanished."""
    from rich.console import Console

    from ember.terminal_chat import Markdown

    console = Console(record=True, width=100, color_system=None)
    reply = "Use List<String> in Java; wrap it in <b> and </b>.\n\n<div>\nhello inside\n</div>\n"
    console.print(Markdown(reply + "\n`<code>` and **bold**"))
    shown = console.export_text()
    for part in ("List<String>", "<b> and </b>", "<div>", "hello inside", "<code>"):
        assert part in shown, shown
    assert "**" not in shown  # still Markdown


@pytest.mark.slow
def test_ctrl_c_in_generate_ends_it_without_a_traceback():
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ember.cli", "generate", "--prompt", "Tell a long story.", "--max-tokens", "500"],
        encoding="utf-8",
        timeout=90,
        preexec_fn=default_sigint,
    )
    time.sleep(3)  # loading or generating: either way Ctrl-C ends it
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130, child.before
    assert "Traceback" not in child.before
