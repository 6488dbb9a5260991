"""The hash of the chat page's source, by content: every file under webui/ except node_modules/,
dist/ and dotfiles, in sorted path order. `make webui` writes it beside the built files
(src/ember/server/webui/source.sha256); tests/test_chat_page.py checks that the two agree."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SKIPPED_DIRS = {"node_modules", "dist"}


def source_files(root: Path = ROOT) -> list[Path]:
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] in SKIPPED_DIRS:
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for path in source_files(root):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        h.update(f"{path.relative_to(root).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()


if __name__ == "__main__":
    sys.stdout.write(source_hash() + "\n")
