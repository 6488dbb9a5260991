"""A local model hub for tests: answers in the URL layouts of the Hugging Face Hub and of
ModelScope, so that their real client libraries download from it.

Hugging Face (HF_ENDPOINT=base):
  GET  /api/models/{repo}[/revision/{rev}]          model info with `sha` and `siblings`
  GET  /api/models/{repo}/tree/{rev}?recursive=...  file listing (size, oid, lfs)
  HEAD|GET /{repo}/resolve/{rev}/{file}             the file; X-Repo-Commit, ETag, Range
ModelScope (MODELSCOPE_ENDPOINT=base):
  GET  /api/v1/models/{repo}                         repository info
  GET  /api/v1/models/{repo}/revisions               branches and tags
  GET  /api/v1/models/{repo}/repo/files?Revision=..  file listing (Path, Type, Size, Sha256)
  HEAD|GET /api/v1/models/{repo}/repo?Revision=..&FilePath=..   the file, with Range

Errors follow each hub: Hugging Face's X-Error-Code headers (RepoNotFound, GatedRepo) and
ModelScope's {"Code", "Message", "Success"} bodies. `drop_after` makes the first GET of a file
stop after N bytes by closing the connection, as a flaky network does; `stall_after` makes it
hang there, so that a test can interrupt the client mid-file.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    root: Path  # the files, laid out as in the repository
    gated: bool = False  # answers 401 (no token) / 403 (wrong token) to file and info requests

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    token: str = "hf_test_token"
    drop_after: dict[str, int] = field(default_factory=dict)  # file name -> bytes, first GET
    # file name -> bytes: the first GET sends that much, sets `stalled`, then waits for `release`
    stall_after: dict[str, int] = field(default_factory=dict)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, name: str, method: str = "GET") -> list[dict[str, str]]:
        with self._lock:
            return [h for m, p, h in self.log if m == method and unquote(p).endswith(name)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_oid(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------ plumbing

    def _record(self) -> None:
        with self.hub._lock:
            self.hub.log.append(
                (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )

    def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _authorised(self, repo: Repo) -> int:
        """0 when allowed, else the status a hub gives: 401 without a token, 403 with a wrong one."""
        if not repo.gated:
            return 0
        auth = self.headers.get("Authorization", "")
        cookie = self.headers.get("Cookie", "")
        if auth == f"Bearer {self.hub.token}" or self.hub.token in cookie:
            return 0
        return 403 if auth else 401

    def _file(self, repo: Repo, name: str, extra: dict[str, str]) -> None:
        path = repo.root / name
        if not path.is_file():
            self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
            return
        data = path.read_bytes()
        etag = f'"{_sha256(path)}"'
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                status = 206
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.hub._lock:
            cut = self.hub.drop_after.pop(name, None)
            stall = self.hub.stall_after.pop(name, None)
        if stall is not None:
            self.wfile.write(body[:stall])
            self.wfile.flush()
            self.hub.stalled.set()
            self.hub.release.wait(60)
            self.close_connection = True
            return
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees the body end early
            return
        self.wfile.write(body)

    # ------------------------------------------------------------ routes

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = unquote(url.path)
        if path.startswith("/api/v1/"):
            self._modelscope(path[len("/api/v1/") :], query)
        else:
            self._huggingface(path, query)

    def _repo(self, repo_id: str) -> Repo | None:
        return self.hub.repos.get(repo_id)

    def _huggingface(self, path: str, query: dict[str, str]) -> None:
        not_found = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        t = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        r = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id = (m or t or r).group(1) if (m or t or r) else None
        repo = self._repo(repo_id) if repo_id else None
        if repo is None:
            self._json(404, {"error": "Repository not found"}, not_found)
            return
        denied = self._authorised(repo)
        if denied and not m:  # the Hub shows a gated model's card and listing to anyone
            msg = f"Access to model {repo_id} is restricted. You must have access to it."
            self._json(
                denied,
                {"error": msg},
                {"X-Error-Code": "GatedRepo", "X-Error-Message": msg},
            )
            return
        files = repo.files()
        if m:
            info = {
                "_id": "0" * 24,
                "id": repo_id,
                "modelId": repo_id,
                "sha": COMMIT,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": f} for f in files],
            }
            self._json(200, info)
        elif t:
            entries = []
            for f in files:
                p = repo.root / f
                entry = {"type": "file", "oid": _git_oid(p), "size": p.stat().st_size, "path": f}
                if f.endswith((".safetensors", ".bin", ".gguf")):
                    sha = _sha256(p)
                    entry["lfs"] = {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}
                entries.append(entry)
            self._json(200, entries)
        else:
            self._file(repo, r.group(3), {"X-Repo-Commit": COMMIT})

    def _modelscope(self, path: str, query: dict[str, str]) -> None:
        m = re.fullmatch(r"models/([^/]+/[^/]+)(/.*)?", path)
        repo = self._repo(m.group(1)) if m else None
        if repo is None:
            body = {
                "Code": 10010205001,
                "Message": "模型不存在 (model not found)",
                "RequestId": "test",
                "Success": False,
            }
            self._json(404, body)
            return
        repo_id, rest = m.group(1), m.group(2) or ""
        denied = self._authorised(repo)
        if denied:
            body = {
                "Code": 10010205002 if denied == 401 else 10010205003,
                "Message": "no permission to access this model",
                "RequestId": "test",
                "Success": False,
            }
            self._json(denied, body)
            return
        files = repo.files()
        if rest == "":
            data = {"Id": 1, "Path": repo_id.split("/")[0], "Name": repo_id.split("/")[1]}
            self._json(200, {"Code": 200, "Data": data, "Success": True})
        elif rest == "/revisions":
            data = {
                "RevisionMap": {
                    "Branches": [{"Revision": "master", "CommitId": COMMIT}],
                    "Tags": [],
                }
            }
            self._json(200, {"Code": 200, "Data": data, "Success": True})
        elif rest == "/repo/files":
            entries = []
            for f in files:
                p = repo.root / f
                entries.append(
                    {
                        "Name": Path(f).name,
                        "Path": f,
                        "Type": "blob",
                        "Size": p.stat().st_size,
                        "Sha256": _sha256(p),
                        "Revision": COMMIT,
                        "IsLFS": f.endswith((".safetensors", ".bin")),
                    }
                )
            self._json(200, {"Code": 200, "Data": {"Files": entries}, "Success": True})
        elif rest == "/repo":
            self._file(repo, query.get("FilePath", ""), {})
        else:
            self._json(404, {"Code": 404, "Message": "not found", "Success": False})


class HubServer:
    """Runs a `Hub` on 127.0.0.1 in a thread; `base` is the endpoint URL."""

    def __init__(self, hub: Hub) -> None:
        handler = type("Handler", (_Handler,), {"hub": hub})
        self.hub = hub
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
