"""The chat page in headless Chromium (Debian's), against the real `ember serve` the tests share.

Screenshots (desktop and phone width, light and dark) go to test-artifacts/chat-page/.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "chat-page"
DESKTOP = {"width": 1200, "height": 800}
PHONE = {"width": 390, "height": 844}
# Generous: a loaded CI machine can be many times slower than an idle one.
STREAM_TIMEOUT_MS = 300_000

# A stored conversation whose reply holds Markdown, code, math and markup that must stay inert.
HOSTILE_REPLY = (
    "Here is **bold**, `code` and $e^{i\\pi}+1=0$.\n\n"
    "LaTeX's own delimiters: \\(a^2+b^2=c^2\\) and\n\\[ \\int_0^1 x\\,dx \\]\n"
    "but not in code: `\\(kept\\)`.\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "<img src=x onerror=\"document.title='pwned'\"> <script>document.title='pwned'</script>\n\n"
    "[a link](javascript:document.title='pwned') 你好 👋"
)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def _new_page(browser, server, **context_args):
    """A fresh browser profile on the page: it asks for the key first, as on a first visit."""
    # Reduced motion: the phone sidebar appears at once, so screenshots do not catch it sliding.
    defaults = {"viewport": DESKTOP, "locale": "en-US", "reduced_motion": "reduce"}
    ctx = browser.new_context(**{**defaults, **context_args})
    page = ctx.new_page()
    page.errors = []
    page.answers = []  # what to answer the page's next prompt()/confirm() dialogs
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("dialog", lambda d: _answer(page, d))
    page.goto(server + "/")
    return page


def _answer(page, dialog) -> None:
    if dialog.type == "alert" or not page.answers:
        page.errors.append(f"unexpected {dialog.type}: {dialog.message}")
        dialog.dismiss()
    else:
        answer = page.answers.pop(0)
        dialog.accept(answer) if isinstance(answer, str) else dialog.accept()


def _enter_key(page, key: str = API_KEY) -> None:
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")


def _ready_page(browser, server, **context_args):
    page = _new_page(browser, server, **context_args)
    _enter_key(page)
    page.wait_for_selector("#model option[value='smol']", state="attached")
    return page


def _set(page, selector: str, value: str) -> None:
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.fill(selector, value)
    page.press(selector, "Tab")  # the settings are saved on change


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _wait_done(page) -> None:
    page.wait_for_selector("#send.stop", timeout=5_000, state="attached")
    page.wait_for_selector("#send:not(.stop)", timeout=STREAM_TIMEOUT_MS, state="attached")


def _stored(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('ember.conversations')"))


def _shown_reply(browser, server, reply: str):
    """A ready page showing `reply` as the answer to "?" (imported): the page, the reply's box."""
    page = _ready_page(browser, server)
    conversation = {"id": "r", "title": "Reply", "system": "", "messages": []}
    conversation["messages"] = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": reply},
    ]
    _import(page, conversation)
    return page, page.locator(".msg.assistant .content")


def _import(page, conversation: dict) -> None:
    page.set_input_files(
        "#import-file",
        files=[
            {
                "name": "conversation.json",
                "mimeType": "application/json",
                "buffer": json.dumps(conversation).encode(),
            }
        ],
    )


def _running(server: str) -> float:
    text = httpx.get(server + "/metrics", timeout=10).text
    return float(re.search(r"^ember:num_requests_running\{[^}]*\} (\S+)", text, re.M).group(1))


@pytest.fixture(scope="module")
def page(browser, server):
    """One profile shared by the tests that build on each other's conversation."""
    p = _new_page(browser, server)
    yield p
    assert p.errors == []
    p.context.close()


def test_first_visit_asks_for_the_key_then_a_reply_streams(page, server):
    # The model list answers 401 without a key: the page asks for one; a wrong one is refused.
    page.wait_for_selector("#key-dialog[open]")
    assert page.is_hidden("#key-wrong")  # no key was refused yet: no such line
    _enter_key(page, "wrong-key")
    page.wait_for_selector("#key-wrong:not([hidden])")
    assert page.is_visible("#key-wrong")
    _enter_key(page)
    page.wait_for_selector("#key-dialog:not([open])", state="attached")
    # The form closes the dialog on submit; the model list is fetched with the key after that.
    page.wait_for_selector("#model option", state="attached")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [
        "smol",
        "gpt-3.5-turbo",
    ]
    assert page.evaluate("localStorage.getItem('ember.apiKey')") == API_KEY
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", "8")
    # Record every length the reply passes through while it streams.
    page.evaluate(
        """() => {
          window.lengths = [];
          new MutationObserver(() => {
            const c = document.querySelector('#messages .msg.assistant:last-of-type .content');
            if (c) window.lengths.push(c.textContent.length);
          }).observe(document.querySelector('#messages'),
                     {childList: true, subtree: true, characterData: true});
        }"""
    )
    _send(page, "Say hello. 你好 👋")
    _wait_done(page)
    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the reply did not arrive in pieces: {lengths}"

    user = page.inner_text(".msg.user .content")
    assert user == "Say hello. 你好 👋"
    [conv] = _stored(page)
    reply = conv["messages"][1]
    assert reply["role"] == "assistant" and reply["content"].strip()
    assert page.inner_text(".msg.assistant .content").strip() == reply["content"].strip()
    stats = page.inner_text(".msg.assistant .stats")
    cut = r"(?: · cut off at max tokens)?"
    assert re.fullmatch(rf"first token \d+ ms · [\d.]+ tokens/s · \d+ tokens{cut} · smol", stats)
    assert 1 <= reply["stats"]["completionTokens"] <= 8
    # A reply that ran into max tokens says so (and only then).
    assert ("cut off" in stats) == bool(reply.get("truncated"))
    assert not reply.get("truncated") or reply["stats"]["completionTokens"] == 8
    assert conv["title"] == "Say hello. 你好 👋"
    page.screenshot(path=str(ARTIFACTS / "desktop-light.png"))


def test_reload_finds_the_conversation(page):
    before = _stored(page)
    page.reload()
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text("#conv-list li.current .open") == "Say hello. 你好 👋"
    assert page.inner_text(".msg.user .content") == "Say hello. 你好 👋"
    assert page.inner_text(".msg.assistant .content").strip() == (
        before[0]["messages"][1]["content"].strip()
    )
    assert page.input_value("#max-tokens") == "8"


def test_switch_models(page):
    page.select_option("#model", "gpt-3.5-turbo")
    with page.expect_request("**/v1/chat/completions") as req:
        _send(page, "And goodbye?")
    _wait_done(page)
    assert req.value.headers["authorization"] == f"Bearer {API_KEY}"
    body = req.value.post_data_json
    assert body["model"] == "gpt-3.5-turbo"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert page.inner_text(".msg.assistant >> nth=-1 >> .stats").endswith("· gpt-3.5-turbo")
    page.reload()
    page.wait_for_selector("#model option[value='smol']", state="attached")
    assert page.input_value("#model") == "gpt-3.5-turbo"
    page.select_option("#model", "smol")


def test_edit_and_resend(page):
    first = page.locator(".msg.user").last
    first.locator("button.edit").click()
    page.fill(".edit-area", "And good night?")
    with page.expect_request("**/v1/chat/completions") as req:
        page.press(".edit-area", "Enter")
    _wait_done(page)
    body = req.value.post_data_json
    assert body["messages"][-1] == {"role": "user", "content": "And good night?"}
    assert len(body["messages"]) == 3
    msgs = _stored(page)[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "And good night?"


def test_rename_export_and_delete(page):
    page.answers.append("Greetings")
    page.click("#conv-list li.current >> text=Rename")
    page.wait_for_selector("#conv-list li.current >> text=Greetings")
    assert page.inner_text("#conv-title") == "Greetings"
    with page.expect_download() as dl:
        page.click("#conv-list li.current >> text=Export JSON")
    exported = json.loads(Path(dl.value.path()).read_text())
    assert exported == _stored(page)[0]
    with page.expect_download() as dl:
        page.click("#conv-list li.current >> text=Export Markdown")
    assert dl.value.suggested_filename == "Greetings.md"
    markdown = Path(dl.value.path()).read_text()
    assert markdown.startswith("# Greetings\n") and "## You\n\nSay hello. 你好 👋" in markdown
    # A copy to delete: import the export, then delete it.
    _import(page, exported)
    page.wait_for_selector("#conv-list li:nth-child(2) >> text=Greetings")
    assert len(_stored(page)) == 2
    page.answers.append(None)  # OK
    page.click("#conv-list li.current >> text=Delete")
    page.wait_for_selector("#conv-list li:nth-child(2)", state="detached")
    assert [c["title"] for c in _stored(page)] == ["Greetings"]


def test_server_refusal_is_shown(page):
    _set(page, "#max-tokens", "100000")  # more than the server's 2048-token context
    _send(page, "Hi")
    error = page.wait_for_selector(".msg.assistant >> nth=-1 >> .error")
    assert "The server answered with an error:" in error.inner_text()
    assert "maximum context length is 2048 tokens" in error.inner_text()
    assert error.query_selector("button.retry") is not None
    _set(page, "#max-tokens", "8")


def test_stop_mid_stream_frees_the_server_slot(page, server):
    page.click("#new-chat")
    _set(page, "#max-tokens", "1500")
    _send(page, "Count from 1 to 1000, one number per line.")
    page.wait_for_selector(
        "#messages .msg.assistant .content:not(:empty)", timeout=STREAM_TIMEOUT_MS
    )
    page.wait_for_selector("#send.stop", state="attached")
    assert _running(server) >= 1
    page.focus("#input")
    page.keyboard.press("Escape")
    page.wait_for_selector("#send:not(.stop)", state="attached", timeout=5_000)
    assert page.inner_text("#send") == "Send"
    assert page.inner_text(".msg.assistant .stats").endswith("stopped")
    deadline = time.time() + 20
    while _running(server) > 0 and time.time() < deadline:
        time.sleep(0.25)
    assert _running(server) == 0
    text = page.inner_text(".msg.assistant .content")
    time.sleep(1)
    assert page.inner_text(".msg.assistant .content") == text
    _set(page, "#max-tokens", "8")


def test_enter_while_a_reply_streams_keeps_the_draft_and_the_reply(page, server):
    """Enter sends; while a reply streams it does nothing (it used to stop the reply and drop
    nothing, leaving the draft unsent); Esc or the button stop."""
    page.click("#new-chat")
    _set(page, "#max-tokens", "1500")
    _send(page, "Count from 1 to 1000, one number per line.")
    page.wait_for_selector(
        "#messages .msg.assistant .content:not(:empty)", timeout=STREAM_TIMEOUT_MS
    )
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    time.sleep(0.5)
    assert page.is_visible("#send.stop") and page.input_value("#input") == "And then?"
    assert not page.inner_text(".msg.assistant .stats").endswith("stopped")
    page.keyboard.press("Escape")
    page.wait_for_selector("#send:not(.stop)", state="attached", timeout=5_000)
    page.fill("#input", "")
    _set(page, "#max-tokens", "8")


def test_an_imported_reply_with_odd_stats_cannot_break_the_page(page):
    bad = {
        "id": "x",
        "title": "Imported",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "stats": {}},
            {"role": "assistant", "content": "again", "stats": {"ttftMs": "12", "model": 5}},
        ],
    }
    _import(page, bad)
    page.wait_for_selector("#conv-list li.current >> text=Imported")
    assert page.inner_text(".msg.assistant >> nth=0 >> .content").strip() == "hello"
    page.reload()
    page.wait_for_selector(".msg.assistant >> nth=1")
    assert page.errors == []


def test_dropped_connection_offers_retry(page):
    page.click("#new-chat")
    page.context.set_offline(True)
    _send(page, "Hi")
    page.wait_for_selector(".msg.assistant .error button.retry")
    assert "connection was lost" in page.inner_text(".msg.assistant .error")
    page.context.set_offline(False)
    page.click(".msg.assistant .error button.retry")
    _wait_done(page)
    assert page.query_selector(".msg.assistant .error") is None
    assert page.inner_text(".msg.assistant .stats").endswith("· smol")


@pytest.mark.parametrize(
    "status, body, said, unsaid",
    [
        # A chunk that is no JSON object: the server's fault, not a lost connection.
        (
            200,
            'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: not json\n\n',
            "not a chat chunk",
            "connection was lost",
        ),
        # A proxy's HTML error page: its status line, not the page's markup.
        (
            503,
            "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
            "HTTP 503",
            "<html",
        ),
    ],
)
def test_a_reply_the_page_cannot_read_says_why(browser, server, status, body, said, unsaid):
    page = _ready_page(browser, server)
    kind = "text/event-stream" if status == 200 else "text/html"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=status, body=body, headers={"content-type": kind}),
    )
    _send(page, "Hi")
    error = page.wait_for_selector(".msg.assistant >> nth=-1 >> .error").inner_text()
    assert said in error and unsaid not in error, error
    assert page.errors == []
    page.context.close()


def test_a_title_keeps_whole_characters_and_safari_ime_enter_does_not_send(browser, server):
    """A title is cut at 40 characters as a reader counts them (a flag is one; it was cut to a
    lone regional indicator). Safari ends an IME composition before the keydown of the Enter
    that confirms it (isComposing false, keyCode 229): that Enter must not send."""
    page = _ready_page(browser, server)
    sent = []
    chunk = 'data: {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\n'

    def reply(route):
        sent.append(route.request.post_data)
        headers = {"content-type": "text/event-stream"}
        route.fulfill(status=200, body=chunk + "data: [DONE]\n\n", headers=headers)

    page.route("**/v1/chat/completions", reply)
    page.fill("#input", "你好")
    page.evaluate(
        """() => {
        const input = document.querySelector("#input");
        input.dispatchEvent(new CompositionEvent("compositionstart"));
        input.dispatchEvent(new CompositionEvent("compositionend", {data: "你好"}));
        input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", keyCode: 229,
            isComposing: false, bubbles: true, cancelable: true}));
    }"""
    )
    page.wait_for_timeout(300)
    assert sent == [] and page.input_value("#input") == "你好"
    _send(page, "a" * 39 + "🇨🇳 rest of the line")
    page.wait_for_selector(".msg.assistant .stats", state="attached")
    assert len(sent) == 1
    assert _stored(page)[0]["title"] == "a" * 39 + "🇨🇳"
    assert page.errors == []
    page.context.close()


def test_model_reply_with_markup_renders_as_text(browser, server):
    """A real reply from the model holding an <img onerror> and a <script>: the model is shown a
    conversation (imported, so it can hold an example turn) in which it repeats the user, so
    greedy decoding echoes the markup, which then streams through the page's renderer."""
    page = _ready_page(browser, server)
    _import(
        page,
        {
            "id": "x",
            "title": "Echo",
            "system": "You repeat the user's message exactly, character for character, and say nothing else.",
            "messages": [
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hello there"},
            ],
        },
    )
    page.wait_for_selector("#conv-list li.current >> text=Echo")
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", "24")  # the echo is 16 tokens
    payload = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    _send(page, payload)
    _wait_done(page)
    reply = page.locator(".msg.assistant").last
    content = _stored(page)[0]["messages"][-1]["content"]
    assert "<img src=x onerror=" in content and "<script>" in content, content
    shown = reply.locator(".content").inner_text()
    assert "<img src=x onerror=" in shown and "<script>" in shown
    assert reply.locator("img, script").count() == 0
    assert page.locator(".msg.user").last.locator(".content").inner_text() == payload
    assert page.title() != "pwned" and page.errors == []
    page.context.close()


def test_stored_reply_renders_markdown_code_and_math_but_no_script(browser, server):
    page = _ready_page(browser, server)
    _import(
        page,
        {
            "id": "x",
            "title": "Markup",
            "system": "",
            "messages": [
                {"role": "user", "content": "<b>not bold</b> and <script>x</script>"},
                {"role": "assistant", "content": HOSTILE_REPLY},
            ],
        },
    )
    reply = page.locator(".msg.assistant .content")
    reply.locator(".katex").first.wait_for()
    assert reply.locator("strong").inner_text() == "bold"
    # $…$, \(…\) and \[…\] are typeset (the last as a display block); code keeps its text.
    assert reply.locator(".katex").count() == 3
    assert reply.locator(".katex-display").count() == 1
    assert reply.locator("code", has_text="\\(kept\\)").count() == 1
    shown = reply.inner_text()
    assert shown.count("\\(") == 1 and "\\[" not in shown, shown  # only the code's
    assert reply.locator("pre code.hljs .hljs-keyword").first.inner_text() == "def"
    assert reply.locator("pre .copy-code").count() == 1
    # The copy button sits above the code, not over its first line.
    button, code = (reply.locator(s).first.bounding_box() for s in ("pre .copy-code", "pre code"))
    assert button["y"] + button["height"] <= code["y"] + 1
    assert reply.locator("img, script, [onerror]").count() == 0
    assert reply.locator("a[href^='javascript']").count() == 0
    text = reply.inner_text()
    assert "<img src=x onerror=" in text and "<script>" in text and "你好 👋" in text
    assert page.inner_text(".msg.user .content") == "<b>not bold</b> and <script>x</script>"
    assert page.title() != "pwned" and page.errors == []
    page.screenshot(path=str(ARTIFACTS / "desktop-markup-light.png"))
    page.context.close()


def test_display_math_after_a_line_of_text_is_typeset_and_code_keeps_its_delimiters(
    browser, server
):
    """Models write display math right after a line of text ("so:\n$$…$$", "is \\[…\\]."):
    Markdown read it as more of that paragraph and showed the $$. A ```` fence holding ```
    is still code, its \\[…\\] kept as written."""
    reply = (
        "The integral is:\n$$\n\\int_0^1 x\\,dx\n$$\nand the answer is \\[x+1\\].\n\n"
        "````\n```\n\\[kept\\]\n```\n````\n\n"
        "1. First:\n   $$\n   y^2\n   $$\n   more about it\n2. Second"
    )
    page, box = _shown_reply(browser, server, reply)
    box.locator(".katex-display").first.wait_for()
    assert box.locator(".katex-display").count() == 3
    assert box.locator(".katex-error").count() == 0
    # In a list item, the block stays in the item, and the list goes on.
    assert box.locator("ol > li").count() == 2
    assert box.locator("ol > li").first.locator(".katex-display").count() == 1
    text = box.inner_text()
    assert "$$" not in text and "The integral is:" in text and "and the answer is" in text
    assert box.locator("pre code").inner_text().strip() == "```\n\\[kept\\]\n```"
    assert page.errors == []
    page.context.close()


def test_a_reply_too_deep_to_render_is_shown_as_text_and_breaks_nothing(browser, server):
    """Thousands of ">" (or nested \\frac) overflow the Markdown and math parsers' stacks. The
    page once stopped rendering, then sending, and stayed broken after a reload."""
    deep = ">" * 3000 + " hi"
    page, box = _shown_reply(browser, server, deep)
    box.wait_for()
    assert box.inner_text().strip() == deep
    page.reload()
    page.wait_for_selector("#model option[value='smol']", state="attached")
    assert page.locator(".msg.assistant .content").inner_text().strip() == deep
    assert page.errors == []
    page.context.close()


def test_dollar_prices_stay_text_and_tilde_fences_keep_latex_delimiters(browser, server):
    """ "$5 and $x$" used to be read as one formula "5 and $x" (a red KaTeX error), and a ~~~
    fence had its \\( \\) rewritten to $ as if it were prose."""
    reply = (
        "It costs $5 and $x$ is the unknown; between $5 and $10, pay $$y^2$$.\n\n"
        "设$z$为未知数，花了$5和$3元，US$7.\n\n"
        "~~~latex\n\\(a+b\\) and $c$\n~~~\n\nand ``\\(d\\)`` stays."
    )
    page, box = _shown_reply(browser, server, reply)
    box.locator(".katex").first.wait_for()
    assert box.locator(".katex-error").count() == 0
    assert box.locator(".katex").count() == 3  # x, y² and z (in Chinese text)
    shown = box.locator(".katex-html").evaluate_all("a => a.map(e => e.textContent)")
    assert shown == ["x", "y2", "z"]
    text = box.inner_text()
    assert "costs $5 and" in text and "between $5 and $10, pay" in text
    assert "花了$5和$3元，US$7." in text
    assert box.locator("pre code").inner_text().strip() == "\\(a+b\\) and $c$"
    assert box.locator("p code").inner_text() == "\\(d\\)"
    assert page.errors == []
    page.context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_phone_width_in_chinese(browser, server, scheme):
    page = _ready_page(browser, server, viewport=PHONE, locale="zh-CN", color_scheme=scheme)
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.inner_text("#send") == "发送"
    _import(
        page,
        {
            "id": "x",
            "title": "手机上的对话",
            "system": "",
            "messages": [
                {"role": "user", "content": "用一句话介绍你自己 🙂"},
                {"role": "assistant", "content": HOSTILE_REPLY},
            ],
        },
    )
    page.wait_for_selector(".msg.assistant .katex")
    assert page.is_hidden("#sidebar")
    assert page.is_visible("#menu-toggle") and page.is_visible("#send")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the page scrolls sideways on a phone"
    page.screenshot(path=str(ARTIFACTS / f"phone-{scheme}.png"))
    page.click("#menu-toggle")
    page.wait_for_selector("#sidebar.open")
    page.screenshot(path=str(ARTIFACTS / f"phone-{scheme}-sidebar.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#sidebar:not(.open)", state="attached")
    if scheme == "dark":
        page.set_viewport_size(DESKTOP)
        page.screenshot(path=str(ARTIFACTS / "desktop-dark.png"))
    assert page.errors == []
    page.context.close()


def test_dismissing_the_key_dialog_says_a_key_is_needed(browser, server):
    for dismiss in ("Escape", "#key-cancel"):
        page = _new_page(browser, server)
        page.wait_for_selector("#key-dialog[open]")
        if dismiss.startswith("#"):
            page.click(dismiss)
        else:
            page.keyboard.press(dismiss)
        page.wait_for_selector("#key-dialog:not([open])", state="attached")
        page.wait_for_selector("#notice >> text=API key needed")
        page.click("#settings-toggle")
        page.click("#set-key")  # and the key can still be given
        _enter_key(page)
        page.wait_for_selector("#model option[value='smol']", state="attached")
        assert page.errors == []
        page.context.close()


def test_keyboard_only(browser, server):
    page = _ready_page(browser, server)
    # After the key dialog, focus is back in the message box.
    assert page.evaluate("document.activeElement.id") == "input"
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#input") == "first line\nsecond line"
    # Tab order: the composer's send button follows the message box.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    page.context.close()


def _long_reply(page) -> None:
    """Starts a reply long enough to act on while it streams (at temperature 0 this prompt
    runs past 400 tokens); waits for its first text."""
    _set(page, "#max-tokens", "1500")
    _set(page, "#temperature", "0")
    _send(page, "Write a very long story about a dragon, at least 2000 words.")
    page.wait_for_selector(
        "#messages .msg.assistant .content:not(:empty)", timeout=STREAM_TIMEOUT_MS
    )


def _reply_text(page) -> str:
    return page.inner_text(".msg.assistant >> nth=-1 >> .content")


def test_two_tabs_keep_each_others_conversations(browser, server):
    """Tabs of one profile share localStorage: each tab's save used to write its own list over
    the other's, losing the conversation the other tab had just had."""
    a = _ready_page(browser, server)
    _set(a, "#max-tokens", "4")
    b = a.context.new_page()
    b.errors = []
    b.on("pageerror", lambda e: b.errors.append(str(e)))
    b.goto(server + "/")
    b.wait_for_selector("#model option[value='smol']", state="attached")
    _send(a, "alpha")
    _wait_done(a)
    b.click("#new-chat")
    _send(b, "beta")
    _wait_done(b)
    a.wait_for_selector("#conv-list >> text=beta")  # shown in the other tab as it happens
    _send(a, "alpha again")
    _wait_done(a)
    b.reload()
    b.wait_for_selector("#conv-list >> text=alpha")
    stored = {c["title"]: c for c in _stored(b)}
    assert sorted(stored) == ["alpha", "beta"]
    assert [m["content"] for m in stored["alpha"]["messages"][::2]] == ["alpha", "alpha again"]
    assert len(stored["beta"]["messages"]) == 2
    # A deletion in one tab is not undone by the other's next save.
    b.click("#conv-list >> text=beta")
    b.on("dialog", lambda d: d.accept())
    b.click("#conv-list li.current >> text=Delete")
    a.wait_for_selector("#conv-list >> text=beta", state="detached")
    _send(a, "alpha three")
    _wait_done(a)
    assert [c["title"] for c in _stored(b)] == ["alpha"]
    assert a.errors == [] and b.errors == []
    a.context.close()


def test_a_conversation_streaming_in_one_tab_takes_no_new_message_in_another(browser, server):
    """The streaming tab saves its copy of the conversation when the reply ends: a message the
    other tab sent into it meanwhile was silently lost. Now the other tab says why it waits,
    keeps the draft, and sends once the reply is done."""
    a = _ready_page(browser, server)
    _long_reply(a)
    b = a.context.new_page()
    b.errors = []
    b.on("pageerror", lambda e: b.errors.append(str(e)))
    b.goto(server + "/")  # opens the conversation A is streaming into
    b.wait_for_selector("#model option[value='smol']", state="attached")
    before = len(_stored(b)[0]["messages"])
    _send(b, "question from B")
    b.wait_for_selector("#notice >> text=Another tab")
    assert b.input_value("#input") == "question from B"
    assert b.locator("#send.stop").count() == 0
    a.focus("#input")
    a.keyboard.press("Escape")  # A's reply ends
    a.wait_for_selector("#send:not(.stop)", state="attached", timeout=STREAM_TIMEOUT_MS)
    _set(b, "#max-tokens", "8")
    b.press("#input", "Enter")
    _wait_done(b)
    a.wait_for_selector("#messages >> text=question from B")
    messages = _stored(a)[0]["messages"]
    assert len(messages) == before + 2 and messages[before]["content"] == "question from B"
    assert a.errors == [] and b.errors == []
    a.context.close()


def test_a_reply_redrawn_mid_stream_keeps_streaming_and_reload_keeps_its_text(browser, server):
    page = _ready_page(browser, server)
    _long_reply(page)
    page.answers.append("Counting")
    page.click("#conv-list li.current >> text=Rename")  # redraws the conversation
    page.wait_for_selector("#conv-title >> text=Counting")
    renamed = _reply_text(page)
    deadline = time.time() + 60
    while _reply_text(page) == renamed and time.time() < deadline:
        time.sleep(0.2)
    assert _reply_text(page) != renamed and page.is_visible("#send.stop")  # still streaming
    page.reload()  # leaving mid-reply: the text so far stays, as a stopped reply
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text(".msg.assistant .stats").endswith("stopped")
    kept = _stored(page)[0]["messages"][-1]
    assert kept["stopped"] and kept["content"].startswith(renamed.split("\n")[0])
    assert "error" not in kept  # the page's own leaving cut the stream: no "connection lost"
    assert len(kept["content"]) >= len(renamed)
    assert page.errors == []
    page.context.close()


def test_a_message_refused_for_want_of_a_key_keeps_a_retry(browser, server):
    """Dismissing the key dialog after a refused message used to leave the message with no
    reply and no way to ask again; the banner stayed up after replies came through."""
    page = _new_page(browser, server)
    page.wait_for_selector("#key-dialog[open]")
    page.click("#key-cancel")
    _send(page, "hello")
    page.wait_for_selector("#key-dialog[open]")
    page.click("#key-cancel")
    page.wait_for_selector(".msg.assistant .error button.retry")
    assert "API key needed" in page.inner_text(".msg.assistant .error")
    assert page.is_visible("#notice")
    page.click("#settings-toggle")
    page.click("#set-key")
    _enter_key(page)
    page.wait_for_selector("#model option[value='smol']", state="attached")
    _set(page, "#max-tokens", "4")
    page.click(".msg.assistant .error button.retry")
    _wait_done(page)
    assert page.query_selector(".msg.assistant .error") is None
    assert len(page.query_selector_all(".msg")) == 2  # the refused reply was replaced
    assert page.is_hidden("#notice")
    assert page.errors == []
    page.context.close()


def test_settings_show_and_send_only_what_the_server_takes(browser, server):
    page = _ready_page(browser, server)
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: (
            bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    for selector, typed, shown in [
        ("#temperature", "5", "2"),
        ("#top-p", "0", "0.01"),
        ("#max-tokens", "0", ""),  # no limit of 0: empty, the server decides
        ("#max-tokens", "-5", ""),
        ("#max-tokens", "3.7", "3"),
    ]:
        _set(page, selector, typed)
        assert page.input_value(selector) == shown, selector
    _send(page, "hi")
    _wait_done(page)
    assert page.query_selector(".msg.assistant .error") is None
    assert bodies[-1]["temperature"] == 2 and bodies[-1]["top_p"] == 0.01
    assert bodies[-1]["max_tokens"] == 3
    assert page.errors == []
    page.context.close()


def test_a_double_click_on_send_does_not_stop_the_reply(browser, server):
    page = _ready_page(browser, server)
    _set(page, "#max-tokens", "8")
    page.fill("#input", "Say hello.")
    page.dblclick("#send")
    _wait_done(page)
    assert not page.inner_text(".msg.assistant .stats").endswith("stopped")
    assert _stored(page)[0]["messages"][-1]["content"]
    assert page.errors == []
    page.context.close()


def test_the_message_box_grows_with_its_text(browser, server):
    page = _ready_page(browser, server)
    empty = page.evaluate("document.getElementById('input').offsetHeight")
    page.fill("#input", "line\n" * 4)
    page.dispatch_event("#input", "input")
    four = page.evaluate("document.getElementById('input').offsetHeight")
    page.fill("#input", "line\n" * 40)
    page.dispatch_event("#input", "input")
    box = page.evaluate(
        "(() => { const e = document.getElementById('input');"
        " return [e.offsetHeight, e.scrollHeight > e.clientHeight,"
        " parseFloat(getComputedStyle(e).maxHeight)]; })()"
    )
    assert empty < four < box[0] <= box[2] + 1 and box[1]  # capped, then it scrolls
    page.keyboard.press("Enter")
    page.wait_for_selector("#send.stop", state="attached")
    page.click("#send")  # stop it: only the box's size matters here
    _wait_done(page)
    assert page.evaluate("document.getElementById('input').offsetHeight") == empty
    assert page.errors == []
    page.context.close()


def test_a_wide_table_scrolls_sideways_instead_of_breaking_words(browser, server):
    head = "| " + " | ".join(f"Column{i}" for i in range(10)) + " |"
    rule = "|" + "---|" * 10
    row = "| " + " | ".join(f"value{i}" for i in range(10)) + " |"
    for viewport in (PHONE, DESKTOP):
        page, box = _shown_reply(browser, server, f"{head}\n{rule}\n{row}\n")
        page.set_viewport_size(viewport)
        page.wait_for_selector(".msg.assistant table")
        table = page.evaluate(
            "(() => { const t = document.querySelector('.msg.assistant table');"
            " const th = t.querySelector('th'); const line = parseFloat(getComputedStyle(th)"
            ".lineHeight) || 24; return [t.scrollWidth, t.clientWidth, th.clientHeight, line]; })()"
        )
        scroll_width, client_width, cell_height, line = table
        assert cell_height < 2.5 * line, f"a header cell is {cell_height}px tall at {viewport}"
        if viewport is PHONE:
            assert scroll_width > client_width  # it scrolls
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"]  # the table, not the page
        page.context.close()


def test_a_hand_written_conversation_without_id_or_title_imports(browser, server):
    page = _ready_page(browser, server)
    page.fill("#input", "")
    _set(page, "#system", "Be brief.")  # an empty chat with a system prompt of its own stays
    _import(
        page,
        {
            "messages": [
                {"role": "user", "content": "Hi there\nsecond line"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
    )
    page.wait_for_selector("#conv-title >> text=Hi there")
    assert page.is_hidden("#notice")
    titles = [c["title"] for c in _stored(page)]
    assert titles[0] == "Hi there" and len(titles) == 2
    assert page.errors == []
    page.context.close()


def test_the_phone_sidebar_keeps_keyboard_focus_and_gives_it_back(browser, server):
    page = _ready_page(browser, server, viewport=PHONE)
    page.focus("#menu-toggle")
    page.keyboard.press("Enter")
    page.wait_for_selector("#sidebar.open")
    for _ in range(12):  # Tab never reaches the page behind the overlay
        page.keyboard.press("Tab")
        inside = page.evaluate(
            "document.getElementById('sidebar').contains(document.activeElement)"
            " || document.activeElement === document.body"
        )
        assert inside, page.evaluate("document.activeElement.outerHTML")
    page.focus("#new-chat")
    page.keyboard.press("Escape")
    page.wait_for_selector("#sidebar:not(.open)", state="attached")
    assert page.evaluate("document.activeElement.id") == "menu-toggle"
    page.keyboard.press("Tab")  # and the page is usable again
    assert page.evaluate("document.activeElement.id") != "menu-toggle"
    assert page.errors == []
    page.context.close()


def test_a_reader_scrolled_up_stays_there_when_the_reply_ends(browser, server):
    """The end of a reply redraws the conversation: it once jumped to the bottom, away from
    the earlier message being read."""
    page = _ready_page(browser, server, viewport={"width": 1000, "height": 600})
    earlier = [
        {"role": role, "content": f"Message {i}.\n\n" + "A line of earlier text.\n\n" * 6}
        for i, role in enumerate(["user", "assistant"] * 4)
    ]
    _import(page, {"title": "Long", "messages": earlier})
    page.wait_for_selector("#conv-title >> text=Long")
    # Long enough to be streaming still when it is stopped (Esc ends it as its end would).
    _set(page, "#max-tokens", "1500")
    _send(page, "Count from 1 to 1000, one number per line.")
    page.wait_for_selector(
        "#messages .msg.assistant >> nth=-1 >> .content:not(:empty)", timeout=STREAM_TIMEOUT_MS
    )
    page.evaluate("document.querySelector('#messages').scrollTop = 0")
    page.keyboard.press("Escape")
    page.wait_for_selector("#send:not(.stop)", state="attached", timeout=5_000)
    assert page.evaluate("document.querySelector('#messages').scrollTop") == 0
    # At the bottom, a reader follows the reply to its end, as before.
    page.evaluate("(m => m.scrollTop = m.scrollHeight)(document.querySelector('#messages'))")
    _set(page, "#max-tokens", "8")
    _send(page, "Again.")
    page.wait_for_selector("#messages .msg.assistant >> nth=5", timeout=STREAM_TIMEOUT_MS)
    page.wait_for_selector("#send:not(.stop)", state="attached", timeout=STREAM_TIMEOUT_MS)
    assert (
        page.evaluate(
            "(m => m.scrollHeight - m.scrollTop - m.clientHeight)(document.querySelector('#messages'))"
        )
        < 5
    )
    assert page.errors == []
    page.context.close()


def test_a_key_no_header_can_carry_is_refused_in_the_dialog(browser, server):
    """A typographic quote or a zero-width space pasted with the key: fetch cannot send it,
    and the page once saved it, then failed every request with a misleading error."""
    page = _new_page(browser, server)
    page.wait_for_selector("#key-dialog[open]")
    for bad in (API_KEY + "\u2019", API_KEY + "\u200b"):
        page.fill("#key-input", bad)
        page.press("#key-input", "Enter")
        assert page.is_visible("#key-dialog[open]")
        said = page.evaluate("document.querySelector('#key-input').validationMessage")
        assert "ASCII punctuation" in said, said
    assert page.evaluate("localStorage.getItem('ember.apiKey')") in (None, "")
    _enter_key(page, f"  {API_KEY} ")  # spaces around it are trimmed, as before
    page.wait_for_selector("#model option[value='smol']", state="attached")
    assert page.is_hidden("#notice")
    # A bad key typed and cancelled leaves no refusal behind on the saved one.
    if page.is_hidden("#settings"):
        page.click("#settings-toggle")
    page.click("#set-key")
    page.fill("#key-input", API_KEY + "\u2019")
    page.click("#key-cancel")
    page.click("#set-key")
    assert page.input_value("#key-input") == API_KEY
    page.press("#key-input", "Enter")
    page.wait_for_selector("#key-dialog:not([open])", state="attached")
    assert page.errors == []
    page.context.close()


def test_ember_chat_saves_and_exports_import_as_they_were(browser, server):
    """`ember chat`'s /save gives the system prompt as a message (the page refused such a
    file); an exported reply keeps how it ended (stopped, cut at max tokens, an error)."""
    page = _ready_page(browser, server)
    saved = {
        "model": "smol",
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Sky colour?"},
            {"role": "assistant", "content": "Blue."},
        ],
    }
    _import(page, saved)
    page.wait_for_selector("#conv-title >> text=Sky colour?")
    assert page.is_hidden("#notice")
    assert page.input_value("#system") == "Answer in one word."
    assert page.locator("#messages .msg").count() == 2
    marked = {
        "title": "Ends",
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "stopped": True},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "truncated": True},
            {"role": "user", "content": "e"},
            {"role": "assistant", "content": "", "error": "The connection was lost."},
        ],
    }
    _import(page, marked)
    page.wait_for_selector("#conv-title >> text=Ends")
    stats = page.locator(".msg.assistant .stats")
    assert stats.nth(0).inner_text().endswith("stopped")
    assert stats.nth(1).inner_text().endswith("cut off at max tokens")
    assert "The connection was lost." in page.inner_text(".msg.assistant >> nth=2")
    with page.expect_download() as dl:
        page.click("#conv-list li.current >> text=Export JSON")
    exported = json.loads(Path(dl.value.path()).read_text())
    ends = [{k: m.get(k) for k in ("stopped", "truncated", "error")} for m in exported["messages"]]
    assert ends[1]["stopped"] and ends[3]["truncated"] and ends[5]["error"]
    assert page.errors == []
    page.context.close()


def test_import_and_delete_while_a_reply_streams_say_to_wait(browser, server):
    page = _ready_page(browser, server)
    _set(page, "#max-tokens", "1500")
    _send(page, "Count from 1 to 1000, one number per line.")
    page.wait_for_selector(
        "#messages .msg.assistant .content:not(:empty)", timeout=STREAM_TIMEOUT_MS
    )
    page.click("#conv-list li.current >> text=Delete")
    page.wait_for_selector("#notice >> text=Wait for the reply to finish")
    page.evaluate("document.querySelector('#notice').hidden = true")
    _import(page, {"messages": [{"role": "user", "content": "x"}]})
    page.wait_for_selector("#notice >> text=Wait for the reply to finish")
    assert len(_stored(page)) == 1
    page.keyboard.press("Escape")
    page.wait_for_selector("#send:not(.stop)", state="attached", timeout=5_000)
    assert page.errors == []
    page.context.close()


def test_an_image_in_a_reply_is_a_link_and_the_console_stays_clean(browser, server):
    """The page's CSP loads no image from elsewhere: a Markdown image showed a broken icon
    and logged a CSP error; KaTeX's strict mode logged a warning for \\htmlData."""
    page = _ready_page(browser, server)
    console = []
    page.on("console", lambda m: console.append((m.type, m.text)) if m.type != "log" else None)
    reply = (
        "![a chart](https://example.invalid/x.png) and $\\htmlData{onclick=alert(1)}{x}$ and "
        "[![build <b>ok</b>](https://example.invalid/badge.svg)](https://ci.example.invalid/1)"
        " and [**![deep](https://example.invalid/d.png)**](https://ci.example.invalid/2)"
    )
    _import(
        page,
        {
            "title": "Img",
            "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}],
        },
    )
    page.wait_for_selector("#conv-title >> text=Img")
    box = page.locator(".msg.assistant .content")
    assert box.locator("img").count() == 0
    link = box.locator("a", has_text="a chart")
    assert link.get_attribute("href") == "https://example.invalid/x.png"
    assert link.get_attribute("rel") == "noopener noreferrer"
    # A linked image (a badge) is one link, to where it says, labelled with the alt text.
    badge = box.locator("a", has_text="build")
    assert badge.count() == 1 and badge.get_attribute("href") == "https://ci.example.invalid/1"
    assert badge.inner_text() == "build <b>ok</b>"
    assert box.locator("a").count() == 3 and box.locator("a a, b").count() == 0
    assert box.locator("a strong", has_text="deep").count() == 1
    time.sleep(0.5)
    assert console == [] and page.errors == []
    page.context.close()
