"""What the manifests promise, checked against real Ember processes.

- Every metric the rendered chart tells the endpoint picker and the HPA to read is on a real
  server's /metrics, with the semantics the picker expects.
- The image's way of installing Ember (a wheel built from the checkout, installed into its own
  venv) and the exact command line the rendered Deployment gives the container serve a chat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, _free_port
from deploy_manifests import ROOT, container, dockerfile, one, render

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def scrape(base: str) -> dict[str, tuple[str, list]]:
    """{family name: (type, samples)} from /metrics."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def metrics_the_chart_reads() -> dict[str, str]:
    """{flag or HPA: metric name} from a chart rendered with the HPA and the pool on."""
    # With the flags a newer picker also takes, so that their metrics are checked too.
    newer_picker = {
        "metrics": {"running": "ember:num_requests_running", "cacheInfo": "ember:cache_config_info"}
    }
    docs = render(
        {
            "autoscaling": {"enabled": True},
            "inferencePool": {"enabled": True, "endpointPicker": newer_picker},
        }
    )
    hpa = one(docs, "HorizontalPodAutoscaler")
    wanted = {"hpa": hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]}
    epp = one(docs, "Deployment", "endpoint-picker")
    for arg in container(epp["spec"]["template"]["spec"], "epp")["args"]:
        flag, _, value = arg.partition("=")
        if flag.endswith("-metric") and value:
            wanted[flag] = value
    return wanted


def test_every_metric_the_chart_reads_is_served(server):
    wanted = metrics_the_chart_reads()
    assert set(wanted) >= {
        "hpa",
        "--total-queued-requests-metric",
        "--total-running-requests-metric",
        "--kv-cache-usage-percentage-metric",
    }
    families = scrape(server)
    for source, name in wanted.items():
        assert name in families, f"{source} reads {name}, which /metrics does not have"
        kind, samples = families[name]
        assert kind == "gauge", f"{name} is a {kind}; the picker and the HPA read gauges"
        assert samples, name
    _, info = families[wanted["--cache-info-metric"]]
    assert int(info[0].labels["block_size"]) > 0


def gauge(families, name: str) -> float:
    return sum(s.value for s in families[name][1])


def test_gauges_have_the_picker_semantics_under_load(server):
    """Running counts sequences in flight; KV usage is a fraction in [0, 1] that rises with them."""
    wanted = metrics_the_chart_reads()
    running = wanted["--total-running-requests-metric"]
    waiting = wanted["--total-queued-requests-metric"]
    kv = wanted["--kv-cache-usage-percentage-metric"]
    wait_idle(server, running, kv)  # nothing left over from earlier tests
    body = {
        "model": "smol",
        "prompt": "Count slowly to one thousand: one, two,",
        # Long enough that the sequence is still running when the gauges are read, even if
        # the first chunk reaches this client late on a loaded machine (the stream is closed,
        # and so aborted, right after).
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read().decode()
        lines = r.iter_lines()
        first = next((line for line in lines if line.startswith("data: ")), "")
        assert '"text"' in first, f"no token streamed first: {first!r}"  # generating now
        # A request an earlier test gave up on can still be on its way out of the engine: read
        # again (for up to 5 s, while this stream runs) until this stream is the only one.
        reads = []
        deadline = time.time() + 5
        while True:
            busy = scrape(server)
            seen = {name: gauge(busy, name) for name in (running, waiting, kv)}
            reads.append(seen)
            if (seen[running], seen[waiting]) == (1, 0) or time.time() > deadline:
                break
            time.sleep(0.1)
        assert seen[running] == 1, f"{reads} after {first!r}, then {list(zip(range(3), lines))}"
        assert seen[waiting] == 0, reads
        assert 0 < seen[kv] <= 1, reads
    wait_idle(server, running, kv)


def wait_idle(server: str, running: str, kv: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        idle = scrape(server)
        if gauge(idle, running) == 0 and gauge(idle, kv) == 0:
            return
        time.sleep(0.2)
    pytest.fail("the gauges did not return to idle (running 0, KV usage 0)")


# ---------------------------------------------------------------- the image's install, the pod's command


def build_wheel(work: Path) -> Path:
    """As the Dockerfile's first stage: copy pyproject.toml, README.md and src/, `pip wheel`."""
    import shutil

    src = work / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__"))
    dist = work / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("ember-*.whl")
    return wheel


def make_venv(work: Path, wheel: Path) -> Path:
    """A fresh venv holding Ember from the wheel, as the image's /opt/ember.

    To stay fast it borrows the project's third-party packages (torch, transformers, ...)
    through a path entry instead of downloading them again, and installs the wheel with
    --no-deps; the `ember` package itself must come from the wheel, which the test checks.
    """
    import site

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # A plain path line: the project's packages, but not its editable `ember` (that needs .pth
    # hooks, which a path line does not run).
    (site_dir / "zz_project_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    return venv


def test_the_rendered_deployment_command_serves_a_chat_from_the_wheel(tmp_path, tiny_llama):
    wheel = build_wheel(tmp_path)
    venv = make_venv(tmp_path, wheel)
    bin_dir = venv / "bin"
    where = subprocess.run(
        [bin_dir / "python", "-c", "import ember; print(ember.__file__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(venv)), f"ember came from {where}, not the wheel"

    # The CPU deployment, its volume mounted where the test model lies.
    port = _free_port()
    docs = render(
        {
            "gpu": 0,
            "model": {"preset": "custom", "name": "tiny-chat", "dir": tiny_llama.name},
            "pull": {"mode": "none"},
            "storage": {"existingClaim": "models", "mountPath": str(tiny_llama.parent)},
            "server": {"port": port, "extraArgs": ["--kv-cache-memory", "16MiB"]},
            "apiKey": {"value": "deploy-key"},
        }
    )
    pod = one(docs, "Deployment", "server")["spec"]["template"]["spec"]
    server = container(pod, "server")
    assert "command" not in server, "the image's ENTRYPOINT must be what runs"
    secret = one(docs, "Secret")
    env = {}
    for e in server["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[e["name"]] = secret["stringData"][ref["key"]]

    image = dockerfile("Dockerfile.cpu")
    argv = image["entrypoint"] + server["args"]
    argv[0] = str(bin_dir / argv[0])  # PATH=/opt/ember/bin:... in the image
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "never became healthy:\n" + log.read_text()[-3000:]
            time.sleep(0.5)

        # The image's HEALTHCHECK command, run as Docker would (exec form, the image's PATH).
        health = subprocess.run(image["healthcheck"], env=run_env, timeout=10)
        assert health.returncode == 0

        chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello!"}]}
        denied = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60)
        assert denied.status_code == 401  # the key from the Secret is in force
        r = httpx.post(
            base + "/v1/chat/completions",
            json={**chat, "max_tokens": 8},
            headers={"Authorization": "Bearer deploy-key"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["model"] == "tiny-chat"
        assert reply["usage"]["completion_tokens"] > 0
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer deploy-key"})
        assert [m["id"] for m in models.json()["data"]] == ["tiny-chat"]

        # What the kubelet does at the end: SIGTERM, then the process must leave within the
        # pod's grace period (exit 0, or by the signal uvicorn re-raises after its shutdown).
        proc.send_signal(signal.SIGTERM)
        grace = pod["terminationGracePeriodSeconds"]
        assert proc.wait(timeout=grace) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
