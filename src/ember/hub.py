"""`ember pull` and `ember models`: models from the Hugging Face Hub and ModelScope, and what is
on disk already.

Downloads go through the hubs' own clients: `huggingface_hub`, and `modelscope-hub` (the client
the `modelscope` package delegates its downloads to), so their settings apply unchanged:
HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE for Hugging Face, and MODELSCOPE_ENDPOINT (or the
older MODELSCOPE_DOMAIN), MODELSCOPE_API_TOKEN and MODELSCOPE_CACHE for ModelScope. A dropped
connection is resumed with an HTTP Range request within the run. A rerun after an interrupted
`ember pull` keeps every finished file; ModelScope also continues the unfinished one, while
huggingface_hub 2 fetches that one again (it downloads into a fresh temporary file per process).

Only what the server reads is fetched: config, tokenizer and weight files, with safetensors
preferred over `.bin`/`.pt` copies of the same weights. Python files are skipped too: Ember never
runs a checkpoint's remote code (it has its own model and tokenizer classes).

Every failure a user can cause or fix is a `HubError` whose message fits on one line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import glob
import json
import logging
import math
import os
import re
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCES = ("huggingface", "modelscope")

# Files no Ember server reads: other frameworks' weights, exports, images, repository plumbing,
# remote code, and the duplicate original-format checkpoints some repositories carry.
_SKIP = (
    ".git*",
    "*/.git*",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.mlmodel",
    "*.mlpackage/*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "original/*",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.gif",
    "*.webp",
    "*.svg",
    "*.py",
    "*.gguf",  # one of many quantizations: taken only when asked for with --include
    "*.ggml",
)
# PyTorch pickles duplicate the safetensors weights whenever both are present.
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# ORG/NAME:QUANT, one GGUF file of a repository (as Ollama and llama.cpp's -hf name them).
_GGUF_REF = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+):([\w.-]+)")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _split_ref(model: str) -> tuple[str, str | None]:
    """ORG/NAME:QUANT as its repository id and quantization; anything else as it is."""
    ref = _GGUF_REF.fullmatch(model)
    return (ref.group(1), ref.group(2)) if ref else (model, None)


def _any_case(text: str) -> str:
    """A glob pattern matching `text` in any letter case (q4_k_m finds Q4_K_M)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else glob.escape(c) for c in text)


def quant_patterns(quant: str) -> list[str]:
    """Globs for the GGUF files of one quantization, its tag a whole word of the path in any
    case: Q4_K is not Q4_K_M and F16 is not BF16; split files (-00001-of-00003), a suffix
    (-imat) and a folder named by the tag count."""
    q = _any_case(quant)
    # After the tag, only the end, "-" or ".": never "_" (Q4_K_M is not Q4_K).
    names = [f"{q}.gguf", f"{q}[-.]*.gguf", f"*[-._/]{q}.gguf", f"*[-._/]{q}[-.]*.gguf"]
    return [*names, f"{q}/*.gguf", f"*/{q}/*.gguf"]


def _gguf_files(path: Path, patterns: list[str]) -> list[Path]:
    """The GGUF files under `path` whose path there matches one of `patterns`, in order."""
    return [
        f
        for f in sorted(path.rglob("*.gguf"))
        if _matches(f.relative_to(path).as_posix(), patterns)
    ]


class HubError(Exception):
    """A problem the user can fix, said in one line."""


# ---------------------------------------------------------------- file selection


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def select_files(
    files: list[str],
    include: list[str] | None = None,
    repo_id: str = "ORG/NAME",
    quant: str | None = None,
) -> list[str]:
    """The files of a repository that a server reads (see the module docstring).

    `include` patterns are always taken (e.g. one GGUF quantization out of many, `quant`).
    """
    include = include or []
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    # Mistral-style repositories hold both sharded HF weights and one consolidated file.
    has_hf_safetensors = any(
        f.endswith(".safetensors") and not Path(f).name.startswith("consolidated") for f in files
    )
    chosen = []
    for f in files:
        if _matches(f, include):
            chosen.append(f)
        elif (
            _matches(f, _SKIP)
            or has_safetensors
            and _matches(f, _PICKLE_WEIGHTS)
            or has_hf_safetensors
            and fnmatch.fnmatch(Path(f).name, "consolidated*")
        ):
            continue
        else:
            chosen.append(f)
    if not any(_is_weight(f) for f in chosen):
        ggufs = [f for f in files if f.endswith(".gguf")]
        if ggufs and include and not any(_matches(f, include) for f in files):
            shown = ", ".join(sorted(ggufs)[:8]) + (", ..." if len(ggufs) > 8 else "")
            if quant is not None:
                raise HubError(
                    f"{repo_id}:{quant} matches no file of the repository (no GGUF file of "
                    f"quantization {quant}); its GGUF files: {shown}"
                )
            raise HubError(
                f"--include {' '.join(include)} matches no file of the repository; its GGUF "
                f"files: {shown}"
            )
        if ggufs:
            hint = _quant_hint(ggufs)
            raise HubError(
                f"the repository holds only GGUF files ({len(ggufs)}); choose one with "
                f"{repo_id}:{hint} or --include, e.g. --include '*{hint}.gguf'"
            )
    return chosen


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))


def _quant_hint(ggufs: list[str]) -> str:
    for q in ("Q4_K_M", "Q4_0", "Q8_0"):
        if any(q in f for f in ggufs):
            return q
    return Path(sorted(ggufs)[0]).stem.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- errors


def _causes(e: BaseException | None) -> Iterator[BaseException]:
    """The error, what caused it, and (ModelScope) the per-file errors it collects."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        for inner in (getattr(e, "failed_files", None) or {}).values():
            yield from _causes(inner)
        e = e.__cause__ or e.__context__


def _disk_full(e: BaseException, target: str) -> HubError | None:
    """The disk's fault, if it is one: full, or not writable (a read-only volume)."""
    for c in _causes(e):
        if isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT):
            return HubError(f"no space left on the device holding {target}")
        if isinstance(c, OSError) and c.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return HubError(f"cannot write {c.filename or target}: {c.strerror}")
    return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx", "httpx2"):  # huggingface_hub 2 speaks httpx2
        try:
            mod = __import__(module)
            kinds += [mod.ConnectError, mod.TimeoutException]
        except (ImportError, AttributeError):
            pass
    try:
        import requests  # the ModelScope client

        kinds += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(kinds)


def _connection_error(e: BaseException, endpoint: str) -> HubError | None:
    kinds = _connection_errors()
    for c in _causes(e):
        if isinstance(c, kinds):
            return HubError(f"cannot reach {endpoint}: {_first_line(c)}")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------- Hugging Face


def _hf_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hf_local_copy(
    repo_id: str, revision: str | None, local_dir: str | None, include: list[str]
) -> Path | None:
    """A whole copy pulled before (into the cache, or into `local_dir` with no download left
    unfinished there) that Ember can serve, or None. Read from disk: huggingface_hub's own
    offline lookup wants every file of the repository, and a pull skips some."""
    if local_dir is not None:
        return _whole_copy(Path(local_dir), include)
    commit = revision or "main"
    if not _COMMIT.fullmatch(commit):
        try:
            commit = (_hf_repo_cache(repo_id) / "refs" / commit).read_text().strip()
        except OSError:
            return None
    path = _hf_repo_cache(repo_id) / "snapshots" / commit
    if not path.is_dir():
        return None
    return path if _servable(path, include) else None


def _servable(path: Path, include: list[str]) -> bool:
    """Whether a copy serves: as a model, or (a GGUF repository, several quantizations pulled
    into one snapshot) by a GGUF file the `include` patterns pick."""
    if unservable_reason(path) is None:
        return True
    return bool(include) and bool(_gguf_files(path, include))


def _hf_repo_cache(repo_id: str) -> Path:
    """A repository's folder in the Hugging Face cache (blobs, refs, snapshots)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type="model"))


def _pulled_mark(path: Path) -> Path:
    """Written where a pull has finished (always in a --dir); removed from a --dir when
    another pull begins, so a pull that broke off there leaves none."""
    return path / ".cache" / "ember-pulled"


def _whole_copy(path: Path, include: list[str]) -> Path | None:
    """`path`, if a pull finished there and Ember can serve what it holds."""
    if not _pulled_mark(path).is_file():
        return None  # not pulled here, or a pull broke off
    return path if _servable(path, include) else None


def _failed_mark(path: Path) -> Path:
    """Written in a --dir where `ember pull` failed: what it pulled, then why, for the pods
    that wait on the folder to show (a pull Job's pod logs are not where one looks first)."""
    return path / ".cache" / "ember-pull-failed"


def _mark_failed(path: Path, what: str, error: BaseException) -> None:
    mark = _failed_mark(path)
    with contextlib.suppress(OSError):  # a folder it could not write is the failure itself
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(f"{what}\n{error}\n")


def _mark_pulled(path: Path, what: str) -> None:
    mark = _pulled_mark(path)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(what + "\n")


def _hf_remember_revision(repo_id: str, revision: str | None, commit: str | None) -> None:
    """Record in the cache which commit `revision` named (refs/main), as huggingface_hub does
    when it resolves a branch: offline, it and transformers find the snapshot by that name."""
    name = revision or "main"
    if commit is None or _COMMIT.fullmatch(name):
        return
    ref = _hf_repo_cache(repo_id) / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def _hf_pull(
    repo_id: str,
    revision: str | None,
    local_dir: str | None,
    include: list[str],
    quant: str | None = None,
) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    endpoint = _hf_endpoint()
    if not endpoint.startswith(("https://", "http://")):
        raise HubError(f"HF_ENDPOINT must be a URL such as https://hf-mirror.com; got {endpoint!r}")
    if constants.HF_HUB_OFFLINE:
        local = _hf_local_copy(repo_id, revision, local_dir, include)
        if local is None:
            where = local_dir or _hf_cache()
            raise HubError(f"HF_HUB_OFFLINE is set and {where} holds no whole copy of {repo_id}")
        return local
    token = huggingface_hub.get_token()
    try:
        api = huggingface_hub.HfApi()
        info = api.model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        chosen = set(select_files(files, include, repo_id, quant))
        skipped = [glob.escape(f) for f in files if f not in chosen]
        if local_dir is not None:
            _pulled_mark(Path(local_dir)).unlink(missing_ok=True)
        path = huggingface_hub.snapshot_download(
            repo_id,
            revision=info.sha or revision,
            local_dir=local_dir,
            ignore_patterns=skipped or None,
        )
        if local_dir is None:
            _hf_remember_revision(repo_id, revision, info.sha)
        else:
            _mark_pulled(Path(local_dir), f"{repo_id}@{info.sha}")
    except hf_errors.GatedRepoError as e:
        if token:
            raise HubError(
                f"{repo_id} is gated and the token in HF_TOKEN has no access: accept the "
                f"model's terms on its page at {endpoint}/{repo_id}"
            ) from e
        raise HubError(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then set HF_TOKEN"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        hint = "" if token else " (if it is private, set HF_TOKEN)"
        raise HubError(f"no model {repo_id} on {endpoint}{hint}") from e
    except hf_errors.RevisionNotFoundError as e:
        raise HubError(f"{repo_id} has no revision {revision!r} on {endpoint}") from e
    except hf_errors.HfHubHTTPError as e:
        raise _disk_full(e, local_dir or _hf_cache()) or HubError(
            f"{endpoint} answered: {_first_line(e)}"
        ) from e
    except Exception as e:
        unreachable = _connection_error(e, endpoint)
        err = _disk_full(e, local_dir or _hf_cache()) or unreachable
        if err is None:
            raise
        if err is unreachable:
            local = _hf_local_copy(repo_id, revision, local_dir, include)
            return _copy_pulled_before(err, local)
        raise err from e
    return Path(path)


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# ---------------------------------------------------------------- ModelScope


def _ms_endpoint() -> str:
    from modelscope_hub import get_default_config

    return get_default_config().endpoint


def _ms_cache() -> str:
    from modelscope_hub import get_default_config

    return str(get_default_config().cache_dir)


def _ms_pull(
    repo_id: str,
    revision: str | None,
    local_dir: str | None,
    include: list[str],
    quant: str | None = None,
) -> Path:
    try:
        # ModelScope's hub client; the `modelscope` package delegates its downloads to it, and
        # takes seconds to import besides.
        from modelscope_hub import HubApi
        from modelscope_hub import errors as ms_errors
        from modelscope_hub.compat.snapshot_download import snapshot_download
    except ImportError as e:
        raise HubError(
            "pulling from ModelScope needs its client: pip install 'ember[modelscope]'"
        ) from e

    endpoint = _ms_endpoint()
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    try:
        listing = HubApi().list_repo_files(repo_id, "model", revision=revision, recursive=True)
        files = [f.path for f in listing if f.type != "tree"]
        chosen = set(select_files(files, include, repo_id, quant))
        skipped = [glob.escape(f) for f in files if f not in chosen]
        if local_dir is not None:
            _pulled_mark(Path(local_dir)).unlink(missing_ok=True)
        path = snapshot_download(
            repo_id, revision=revision, local_dir=local_dir, ignore_patterns=skipped or None
        )
        _mark_pulled(Path(path), f"{repo_id}@{revision or 'master'}")
    except HubError:
        raise
    except Exception as e:
        for c in _causes(e):
            if isinstance(c, ms_errors.NotExistError):
                raise HubError(
                    f"no model {repo_id} (revision {revision or 'master'}) on {endpoint}"
                ) from e
            if isinstance(c, ms_errors.AuthenticationError | ms_errors.PermissionDeniedError):
                who = (
                    "the token in MODELSCOPE_API_TOKEN has no access"
                    if token
                    else "set MODELSCOPE_API_TOKEN"
                )
                raise HubError(f"{repo_id} needs authorisation on {endpoint}: {who}") from e
        unreachable = _connection_error(e, endpoint)
        err = _disk_full(e, local_dir or _ms_cache()) or unreachable
        if err is None and isinstance(e, ms_errors.HubError):
            err = HubError(f"{endpoint}: {_first_line(e)}")
        if err is None:
            raise
        if err is unreachable:
            local = _ms_local_copy(repo_id, revision, local_dir, include)
            return _copy_pulled_before(err, local)
        raise err from e
    return Path(path)


def _ms_local_copy(
    repo_id: str, revision: str | None, local_dir: str | None, include: list[str]
) -> Path | None:
    """A whole copy pulled before from ModelScope that Ember can serve, or None."""
    from modelscope_hub.compat.snapshot_download import snapshot_download

    if local_dir is not None:
        return _whole_copy(Path(local_dir), include)
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 (not in the cache, in whatever way)
        return None
    return _whole_copy(Path(path), include)


def _copy_pulled_before(unreachable: HubError, local: Path | None) -> Path:
    """The hub is out of reach (an outage, no egress): a copy pulled before still serves, as a
    restarted pod's initContainer needs; without one, the hub's absence is the answer."""
    if local is None:
        raise unreachable
    log.warning("%s; using the copy already at %s", unreachable, local)
    return local


# ---------------------------------------------------------------- pull


def pull(
    repo_id: str,
    source: str = "huggingface",
    revision: str | None = None,
    local_dir: str | None = None,
    include: list[str] | None = None,
) -> Path:
    """Download a snapshot (or finish an interrupted one); returns its local directory, or
    for ORG/NAME:QUANT the one GGUF file of that quantization."""
    if source not in SOURCES:
        raise HubError(f"unknown source {source!r}: use {' or '.join(SOURCES)}")
    repo_id, quant = _split_ref(repo_id)
    wanted = quant_patterns(quant) if quant is not None else []
    include = [*(include or []), *wanted]
    if not _REPO_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a repository id (ORG/NAME)")
    fetch = _hf_pull if source == "huggingface" else _ms_pull
    created = local_dir is not None and not Path(local_dir).exists()
    try:
        if local_dir is not None:
            try:
                Path(local_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise HubError(f"cannot create {local_dir}: {e.strerror}") from e
        path = fetch(repo_id, revision, local_dir, include, quant)
    except OSError as e:  # a read-only volume, no permission, ...
        _remove_if_empty(local_dir if created else None)
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or local_dir or "the cache"
        raise HubError(f"cannot write {where}: {e.strerror}") from e
    except HubError:
        _remove_if_empty(local_dir if created else None)  # a failed pull leaves no empty folder
        raise
    path = path.absolute()  # the same from any working directory: MODEL=$(ember pull ...)
    if quant is not None:  # its file: the snapshot may hold other quantizations pulled before
        found = _gguf_files(path, wanted)
        if not found:
            raise HubError(f"{repo_id} has no GGUF file of quantization {quant}")
        return found[0]
    reason = unservable_reason(path)
    if reason is not None and not any(f.endswith(".gguf") for f in include or []):
        raise HubError(f"downloaded {repo_id} to {path}, but Ember cannot serve it: {reason}")
    return path


def _remove_if_empty(directory: str | None) -> None:
    """Remove a folder this pull created, if nothing came into it (a partial download stays)."""
    if directory is not None:
        with contextlib.suppress(OSError):  # not empty, or gone: leave it
            Path(directory).rmdir()


def is_hub_id(model: str) -> bool:
    """ORG/NAME (or ORG/NAME:QUANT) that is not a path on this machine (as vLLM decides it)."""
    return bool(_REPO_ID.fullmatch(_split_ref(model)[0])) and not Path(model).exists()


def model_for_serve(
    model: str | None,
    source: str,
    revision: str | None,
    load_format: str = "auto",
    tokenizer: str | None = None,
) -> str | None:
    """The local model `ember serve MODEL` runs: a hub id is pulled first; a directory is
    checked, so that a wrong one fails at once with its reason."""
    if model is None:
        return None
    if is_hub_id(model):
        try:
            return str(pull(model, source, revision))
        except HubError as e:
            raise HubError(f"{model} is no local path, and pulling it failed: {e}") from e
    path = Path(model)
    if not path.exists():
        raise HubError(f"no model at {model}: give a model directory, a .gguf file or ORG/NAME")
    if path.is_dir():
        reason = unservable_reason(
            path, need_weights=load_format != "dummy", need_tokenizer=tokenizer is None
        )
        if reason is not None:
            raise HubError(f"cannot serve {model}: {reason}")
    return model


# ---------------------------------------------------------------- local models


@dataclass
class LocalModel:
    name: str
    path: Path
    architecture: str
    parameters: int | None
    dtype: str
    size_bytes: int
    reason: str | None  # why Ember cannot serve it; None when it can
    quantization: str = "none"  # weights in compute at --quantization auto (loader's wording)

    @property
    def servable(self) -> bool:
        return self.reason is None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's contents; {} when it is missing, unreadable or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def weight_files(path: Path) -> list[Path]:
    """The weight files of the checkpoint at `path`, as the loader reads them and the listing
    checks them: those its shard index names, else those it holds; safetensors first (a LoRA
    adapter beside them is not the model), then the .bin shards of the original Llama-2
    layout."""
    for index_name, own, other in (
        ("model.safetensors.index.json", "model*.safetensors", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin", "*.bin"),
    ):
        index = read_json_object(path / index_name)
        if index.get("weight_map"):
            return [path / n for n in sorted(set(index["weight_map"].values()))]
        found = sorted(path.glob(own)) or [
            f for f in sorted(path.glob(other)) if not f.name.startswith(("adapter_", "training_"))
        ]
        if found:
            return found
    return []


def unservable_reason(
    path: Path, need_weights: bool = True, need_tokenizer: bool = True
) -> str | None:
    """Why Ember cannot serve the model at `path`, or None when it can (from file headers)."""
    from ember.models.registry import supported_architectures

    if path.is_file():
        return None if path.suffix == ".gguf" else "not a model directory or .gguf file"
    if not path.is_dir():
        return "no such directory"
    if not (path / "config.json").exists():
        ggufs = list(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return None
        if ggufs:
            return f"{len(ggufs)} .gguf files and no config.json: name one file"
        return "no config.json (not a model directory)"
    config = read_json_object(path / "config.json")
    archs = config.get("architectures") or []
    if not any(a in supported_architectures() for a in archs):
        return f"architecture {','.join(archs) or 'unknown'} is not one Ember runs"
    if need_weights:
        weights = weight_files(path)
        if not weights:
            return "no weights (*.safetensors or *.bin)"
        missing = [w.name for w in weights if not w.exists()]
        if missing:
            return f"missing weight file {missing[0]} (an unfinished download?)"
    if need_tokenizer and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return "no tokenizer files"
    return None


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: names, dtypes, shapes (no tensor data read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _count(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= int(d)
    return total


def _dir_size(path: Path) -> int:
    # Hugging Face cache snapshots are symlinks into blobs/: count the files they point to.
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def describe(path: Path, name: str | None = None) -> LocalModel:
    """What `ember models` shows for one model directory or .gguf file."""
    reason = unservable_reason(path)
    name = name or (path.stem if path.suffix == ".gguf" else path.name)
    if path.is_file() or not (path / "config.json").exists():
        ggufs = [path] if path.is_file() else list(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _describe_gguf(ggufs[0], name, reason)
        return LocalModel(name, path, "?", None, "?", _dir_size(path), reason)
    config = read_json_object(path / "config.json")
    arch = ",".join(config.get("architectures") or []) or "?"
    params: int | None = None
    dtypes: dict[str, int] = {}
    files = [w for w in weight_files(path) if w.exists()]
    if files and all(w.suffix == ".safetensors" for w in files):
        params = 0
        for w in files:
            try:
                header = _safetensors_header(w)
            except (OSError, ValueError, struct.error):
                params = None
                break
            for key, t in header.items():
                if key == "__metadata__":
                    continue
                n = _count(t["shape"])
                params += n
                dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + n
    dtype = max(dtypes, key=dtypes.get).lower() if dtypes else None
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "?")
    dtype = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}.get(dtype, dtype)
    return LocalModel(name, path, arch, params, dtype, _dir_size(path), reason)


def _describe_gguf(path: Path, name: str, reason: str | None) -> LocalModel:
    try:
        from ember.models.loader import gguf_index

        index = gguf_index(path)  # parsed once, then kept in the cache
        arch = index["architecture"] or "?"
        types: dict[str, int] = {}
        for t in index["tensors"]:
            types[t["type"]] = types.get(t["type"], 0) + math.prod(t["shape"])
        params = sum(types.values())
        dtype = max(types, key=types.get) if types else "?"
    except Exception as e:  # noqa: BLE001 (a broken file is listed, with its reason)
        return LocalModel(name, path, "?", None, "?", path.stat().st_size, f"unreadable GGUF: {e}")
    if reason is None and arch not in ("llama", "qwen2", "mistral"):
        reason = f"GGUF architecture {arch} is not one Ember converts (llama, qwen2, mistral)"
    from ember.models.loader import describe_quantization

    quant = describe_quantization(str(path)) if reason is None else "?"
    return LocalModel(name, path, f"gguf:{arch}", params, dtype, path.stat().st_size, reason, quant)


def default_model_dirs() -> list[Path]:
    """Where `ember models` looks without --dir: /models, then the hubs' caches."""
    dirs = [Path("/models"), Path(_hf_cache())]
    with contextlib.suppress(ImportError):  # the ModelScope client is an optional extra
        dirs.append(Path(_ms_cache()))
    return [d for d in dirs if d.is_dir()]


def find_models(root: Path) -> Iterator[tuple[str, Path]]:
    """(name, path) of each model under `root`: the directory itself, its children, a Hugging
    Face cache (models--ORG--NAME/snapshots/REV) or a ModelScope cache (models/...)."""
    if root.is_file() or (root / "config.json").exists():
        yield (root.stem if root.is_file() else root.name), root
        return
    hf_repos = sorted(root.glob("models--*--*"))
    for repo in hf_repos:
        repo_id = repo.name[len("models--") :].replace("--", "/")
        for snap in sorted((repo / "snapshots").glob("*")):
            yield from _each_gguf(repo_id, snap)
    ms_root = root / "models" if (root / "models").is_dir() else None
    for repo in sorted(ms_root.iterdir()) if ms_root is not None else []:
        if (repo / "snapshots").is_dir():  # modelscope-hub: models/ORG--NAME/snapshots/REV
            for snap in sorted((repo / "snapshots").iterdir()):
                yield from _each_gguf(repo.name.replace("--", "/", 1), snap)
        elif repo.is_dir():  # older clients: models/ORG/NAME holds the files
            for sub in sorted(p for p in repo.iterdir() if p.is_dir()):
                yield from _each_gguf(f"{repo.name}/{sub.name}", sub)
    if hf_repos or ms_root is not None:
        return
    for child in sorted(root.iterdir()):
        if child.suffix == ".gguf" and child.is_file():
            yield child.stem, child
        elif child.is_dir() and not child.name.startswith(".") and _looks_like_model(child):
            yield from _each_gguf(child.name, child)


def _later_part(name: str) -> bool:
    """Whether `name` is a split GGUF file's second part or later (-00002-of-00003.gguf)."""
    part = re.search(r"-(\d+)-of-\d+\.gguf$", name)
    return part is not None and int(part.group(1)) > 1


def _each_gguf(name: str, path: Path) -> Iterator[tuple[str, Path]]:
    """A folder of several GGUF files and no config.json (a GGUF repository with more than one
    quantization pulled) as one model per file, NAME/FILE; any other folder as it is."""
    ggufs = [] if (path / "config.json").exists() else sorted(path.rglob("*.gguf"))
    # One line for a file split in parts (its first names it); a vision projector is no model.
    ggufs = [f for f in ggufs if not _later_part(f.name) and not f.name.startswith("mmproj")]
    if len(ggufs) < 2:
        yield name, path
        return
    for f in ggufs:
        yield f"{name}/{f.relative_to(path).as_posix()}", f


def _looks_like_model(path: Path) -> bool:
    """A model, or one on its way (a download into it has begun): worth a line, servable or not."""
    return (
        (path / "config.json").exists()
        or (path / ".cache" / "huggingface").is_dir()
        or any(next(path.glob(g), None) for g in ("*.gguf", "*.safetensors", "*.bin"))
    )


# ---------------------------------------------------------------- command line


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default=os.environ.get("EMBER_SOURCE", "huggingface"),
        choices=SOURCES,
        help="The hub a repository id is pulled from. [env EMBER_SOURCE; default huggingface]",
    )
    p.add_argument(
        "--revision",
        default=os.environ.get("EMBER_REVISION"),
        help="Branch, tag or commit of the repository; default: the hub's main branch. "
        "[env EMBER_REVISION]",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="Download a model from the Hugging Face Hub or ModelScope.",
        description="Download a model snapshot (config, tokenizer, safetensors weights; resumes "
        "an interrupted download) and print its local directory last. Hugging Face honours "
        "HF_ENDPOINT, HF_TOKEN and HF_HOME; ModelScope honours MODELSCOPE_ENDPOINT, "
        "MODELSCOPE_API_TOKEN and MODELSCOPE_CACHE.",
    )
    p.add_argument("repo_id", help="ORG/NAME, e.g. THUDM/chatglm3-6b")
    add_source_arguments(p)
    p.add_argument(
        "--dir",
        default=None,
        help="Put the files in this directory (e.g. /models/chatglm3-6b); default: the hub's "
        "cache, where `ember serve ORG/NAME` finds them.",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        help="Also download files matching this glob (repeatable), e.g. one '*Q4_K_M.gguf'.",
    )
    p.add_argument(
        "--mark-failure",
        action="store_true",
        help="With --dir: when the pull fails, leave why in DIR/.cache/ember-pull-failed for "
        "pods that wait on the folder (the Helm chart's pull Job sets it); the next pull "
        "removes it.",
    )
    p.set_defaults(func=cmd_pull)

    m = sub.add_parser(
        "models",
        help="List local models and whether Ember can serve them.",
        description="List the models in a directory (default: /models and the Hugging Face and "
        "ModelScope caches), with architecture, parameters, dtype, size and servability.",
    )
    m.add_argument(
        "--dir",
        action="append",
        default=None,
        help="A models directory, a cache or one model (repeatable). [env EMBER_MODELS_DIR, "
        "comma-separated]",
    )
    m.add_argument("--json", action="store_true", help="One JSON object per model.")
    m.set_defaults(func=cmd_models)


# Where an interrupted Hugging Face pull leaves its unfinished files: huggingface_hub 2 writes
# each into a temporary file of its own process, which no later run continues.
_unfinished: list[Path] = []


def _stop_now(signum: int, _frame: Any) -> None:
    # Stop at once rather than let the download threads finish (Ctrl-C, a Job's pod deleted).
    # ModelScope's partial files stay where the next run resumes them; huggingface_hub's would
    # only take space (up to a shard's size each time), as its own clean-up is skipped here.
    for root in _unfinished:
        for partial in root.rglob("*.incomplete"):
            with contextlib.suppress(OSError):
                partial.unlink()
    # (on a line of its own: a progress bar may be half drawn)
    print("\nember pull: interrupted; run it again to resume", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def cmd_pull(args: argparse.Namespace) -> int:
    repo_id = _split_ref(args.repo_id)[0]
    if args.source == "huggingface" and _REPO_ID.fullmatch(repo_id):
        download = Path(args.dir, ".cache", "huggingface") if args.dir else None
        _unfinished.append(download or _hf_repo_cache(repo_id))
    signal.signal(signal.SIGINT, _stop_now)
    signal.signal(signal.SIGTERM, _stop_now)
    if args.dir:  # a new attempt: the pods wait for it again
        with contextlib.suppress(OSError):
            _failed_mark(Path(args.dir)).unlink(missing_ok=True)
    try:
        path = pull(args.repo_id, args.source, args.revision, args.dir, args.include)
    except HubError as e:
        if args.dir and args.mark_failure:  # named as the pulled mark is: one pattern matches
            default = "master" if args.source == "modelscope" else "main"
            _mark_failed(Path(args.dir), f"{repo_id}@{args.revision or default}", e)
        raise
    print(path, flush=True)
    return 0


def _human(n: float, units: tuple[str, ...], step: float) -> str:
    for unit in units[:-1]:
        if abs(n) < step:
            return f"{n:.1f}{unit}" if unit != units[0] else f"{int(n)}{unit}"
        n /= step
    return f"{n:.1f}{units[-1]}"


def cmd_models(args: argparse.Namespace) -> int:
    env_dirs = [d for d in os.environ.get("EMBER_MODELS_DIR", "").split(",") if d.strip()]
    dirs = [Path(d) for d in (args.dir or env_dirs)] or default_model_dirs()
    for d in dirs:
        if not d.exists():
            raise HubError(f"no such directory: {d}")
    rows = [describe(path, name) for d in dirs for name, path in find_models(d)]
    if args.json:
        for r in rows:
            print(
                json.dumps(
                    {
                        "name": r.name,
                        "path": str(r.path),
                        "architecture": r.architecture,
                        "parameters": r.parameters,
                        "dtype": r.dtype,
                        "size_bytes": r.size_bytes,
                        "quantization": r.quantization,
                        "servable": r.servable,
                        "reason": r.reason,
                    }
                )
            )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ARCHITECTURE", "PARAMS", "DTYPE", "QUANT", "SIZE", "SERVABLE", "PATH"):
        table.add_column(col, justify="right" if col in ("PARAMS", "SIZE") else "left")
    for r in rows:
        table.add_row(
            r.name,
            r.architecture,
            "?" if r.parameters is None else _human(r.parameters, ("", "K", "M", "B"), 1000),
            r.dtype,
            r.quantization,
            _human(r.size_bytes, ("B", "KiB", "MiB", "GiB", "TiB"), 1024),
            "yes" if r.servable else f"no: {r.reason}",
            str(r.path),
        )
    if not rows:
        print(f"no models in {', '.join(str(d) for d in dirs) or 'the default places'}")
        return 0
    Console(width=max(120, os.get_terminal_size(1).columns if os.isatty(1) else 200)).print(table)
    return 0
