"""The chat page's build and how the server serves it (no model, no Node, no browser)."""

from __future__ import annotations

import importlib.util
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ember.config import EngineConfig
from ember.server.app import build_app
from ember.server.routes.chat_page import WEBUI_DIR
from ember.server.state import ServerConfig

REPO = Path(__file__).resolve().parents[1]


def _source_hash_module():
    spec = importlib.util.spec_from_file_location("source_hash", REPO / "webui" / "source_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_built_page_matches_its_source():
    """`make webui` records the source hash beside the build; a source edit without a rebuild
    (or a rebuild from other source) shows up here."""
    if not (REPO / "webui" / "package.json").is_file():
        pytest.skip("not a source checkout")
    recorded = (WEBUI_DIR / "source.sha256").read_text().strip()
    assert _source_hash_module().source_hash() == recorded, (
        "src/ember/server/webui/ was not built from the current webui/ source: run `make webui`"
    )


def test_source_hash_follows_content_not_file_times(tmp_path):
    sh = _source_hash_module()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.ts").write_text("export const a = 1;\n")
    (tmp_path / "package.json").write_text("{}\n")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.js").write_text("ignored")
    before = sh.source_hash(tmp_path)
    (tmp_path / "package.json").touch()
    (tmp_path / "node_modules" / "x.js").write_text("still ignored")
    assert sh.source_hash(tmp_path) == before
    (tmp_path / "src" / "a.ts").write_text("export const a = 2;\n")
    assert sh.source_hash(tmp_path) != before
    (tmp_path / "src" / "a.ts").write_text("export const a = 1;\n")
    (tmp_path / "src" / "b.ts").write_text("")
    assert sh.source_hash(tmp_path) != before


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            if a.get("src"):
                self.refs.append(a["src"])
            else:
                self._in_script = True
        if tag == "link" and a.get("href"):
            self.refs.append(a["href"])

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1


def test_built_page_loads_only_its_own_files():
    page = _Refs()
    page.feed((WEBUI_DIR / "index.html").read_text())
    assert page.inline_scripts == 0
    assert any(r.endswith(".js") for r in page.refs)
    for ref in page.refs:
        assert ref.startswith("./"), ref
        assert (WEBUI_DIR / ref).is_file(), ref
    for css in (WEBUI_DIR / "assets").glob("*.css"):
        urls = re.findall(r"url\(([^)]+)\)", css.read_text())
        assert urls  # KaTeX's fonts
        for url in urls:
            url = url.strip("'\"")
            assert not re.match(r"^[a-z]+:", url) or url.startswith("data:"), url
            if not url.startswith("data:"):
                assert (css.parent / url).is_file(), url


@pytest.fixture(scope="module")
def client():
    # No `with`: the lifespan (which loads the model) does not run; the page needs none.
    app = build_app(EngineConfig(), ServerConfig(["smol"], api_keys=["k"]))
    return TestClient(app)


def test_page_is_public_with_a_script_policy(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>" in r.text
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert csp["script-src"] == "'self'"
    assert csp["object-src"] == "'none'"
    assert "'unsafe-inline'" not in csp["default-src"]
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_page_revalidates_with_its_etag(client):
    etag = client.get("/").headers["etag"]
    r = client.get("/", headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert r.content == b""


def test_assets_are_cached_for_good(client):
    script = re.search(r'src="\./(assets/[^"]+\.js)"', client.get("/").text).group(1)
    r = client.get("/" + script)
    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    assert "immutable" in r.headers["cache-control"]
    assert client.get("/assets/missing.js").status_code == 404
    assert client.get("/favicon.svg").headers["content-type"].startswith("image/svg+xml")


def test_api_still_needs_the_key_and_docs_still_work(client):
    assert client.get("/v1/models").status_code == 401
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/v1/chat/completions" in paths


def test_no_chat_page_serves_the_api_alone(monkeypatch):
    from ember.cli import build_parser

    assert build_parser().parse_args(["serve"]).chat_page is True
    assert build_parser().parse_args(["serve", "--no-chat-page"]).chat_page is False
    monkeypatch.setenv("EMBER_CHAT_PAGE", "0")
    assert build_parser().parse_args(["serve"]).chat_page is False
    app = build_app(EngineConfig(), ServerConfig(["smol"], api_keys=["k"], chat_page=False))
    off = TestClient(app)
    for path in ("/", "/favicon.svg", "/assets/index.js"):
        r = off.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["type"] == "not_found_error"
    assert off.get("/v1/models").status_code == 401
    assert off.get("/health").status_code in (200, 503)
