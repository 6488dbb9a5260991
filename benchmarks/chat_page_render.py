"""How busy a long streamed reply keeps the chat page's main thread.

Serves the built page (default: src/ember/server/webui) with a stand-in API that streams a
1,500-line code block, one line per event every 4 ms, drives it in Debian's chromium, and prints
JSON: the stream's length and the browser's long tasks (main-thread work over 50 ms) meanwhile.
Compare two builds by pointing it at each:

    python benchmarks/chat_page_render.py [BUILT_PAGE_DIR]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import sync_playwright

LINES, EVERY_S = 1500, 0.004
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def handler(page_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, body: bytes, kind: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/v1/models":
                models = {"data": [{"id": "m", "root": "m"}]}
                return self._send(json.dumps(models).encode(), "application/json")
            f = page_dir / ("index.html" if path == "/" else path.lstrip("/"))
            if not f.is_file():
                return self._send(b"", "text/plain", 404)
            self._send(f.read_bytes(), TYPES.get(f.suffix, "application/octet-stream"))

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()

            def event(text: str) -> None:
                chunk = {"choices": [{"delta": {"content": text}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event("```python\n")
            for i in range(LINES):
                event(f"x_{i} = compute(value_{i}, other={i} * 2)  # a comment\n")
                time.sleep(EVERY_S)
            event("```\n")
            self.wfile.write(b"data: [DONE]\n\n")

    return Handler


def main() -> None:
    page_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "src/ember/server/webui")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(page_dir))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        page.wait_for_selector("#model option[value='m']", state="attached")
        page.evaluate(
            """() => { window.longTasks = [];
            new PerformanceObserver((list) => {
                for (const e of list.getEntries()) window.longTasks.push(e.duration);
            }).observe({type: "longtask"}); }"""
        )
        start = time.monotonic()
        page.fill("#input", "go")
        page.press("#input", "Enter")
        page.wait_for_selector("#send.stop", state="attached")
        page.wait_for_selector("#send:not(.stop)", state="attached", timeout=120_000)
        took = time.monotonic() - start
        tasks = page.evaluate("window.longTasks")
        browser.close()
    print(
        json.dumps(
            {
                "page": str(page_dir),
                "stream_s": round(took, 2),
                "long_tasks": len(tasks),
                "long_task_ms_total": round(sum(tasks)),
                "longest_task_ms": round(max(tasks, default=0)),
            }
        )
    )


if __name__ == "__main__":
    main()
