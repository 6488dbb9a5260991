"""The chat page at `/`: the built files of webui/ (kept in src/ember/server/webui/), served with
a Content-Security-Policy that runs script only from this origin. The page itself is public; its
API calls carry the key the user enters, like any other client's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles

log = logging.getLogger(__name__)

WEBUI_DIR = Path(__file__).resolve().parents[1] / "webui"

# No inline or remote script, whatever a reply contains. Styles may be inline because KaTeX
# sizes its boxes with style attributes; images only from here (a reply's remote image would
# otherwise tell a third party who is reading it).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Built asset names carry a content hash, so they never change; the page itself is revalidated
# on every load so that a new build is picked up at once.
ASSET_CACHE = "public, max-age=31536000, immutable"
PAGE_CACHE = "no-cache"


class _Assets(StaticFiles):
    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = ASSET_CACHE
        return response


def _static_file(app: FastAPI, url: str, path: Path, media_type: str) -> None:
    """GET/HEAD `url` → the file's bytes (read once), with an ETag for revalidation."""
    body = path.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {**SECURITY_HEADERS, "Cache-Control": PAGE_CACHE, "ETag": etag}

    async def serve(request: Request) -> Response:
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    app.add_api_route(url, serve, methods=["GET", "HEAD"], include_in_schema=False)


def install_chat_page(app: FastAPI, webui_dir: Path = WEBUI_DIR) -> None:
    index = webui_dir / "index.html"
    if not index.is_file():
        log.warning("chat page not found in %s (run `make webui`); serving the API only", webui_dir)
        return
    _static_file(app, "/", index, "text/html; charset=utf-8")
    favicon = webui_dir / "favicon.svg"
    if favicon.is_file():
        _static_file(app, "/favicon.svg", favicon, "image/svg+xml")
    app.mount("/assets", _Assets(directory=webui_dir / "assets"), name="webui-assets")
