"""deploy/: the Kubernetes base validated against the Kubernetes schemas and checked for agreement between its
parts (labels, names, ports, grace periods, the Envoy config it ships), and the Envoy configs checked by Envoy."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lipsync.apps.cluster import kubernetes_envoy, render_envoy

KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"


def build_kustomization(folder: Path) -> list[dict]:
    """What `kubectl kustomize` makes of this base: its resources, the generated ConfigMaps (without the name
    hash suffix), common labels on metadata and the image override."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = [doc for name in spec["resources"] for doc in yaml.safe_load_all((folder / name).read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        data = {}
        for item in generator["files"]:
            key, _, file = item.partition("=")
            data[key] = (folder / (file or key)).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in spec.get("images", [])}
    for obj in objects:
        for pairs in spec.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(pairs["pairs"])
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            container["image"] = images.get(container["image"], container["image"])
    return objects


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in build_kustomization(KUBE)}


def test_every_object_is_valid_kubernetes(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra)")
    for (kind, name), obj in objects.items():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)  # raises with the path of the error
    assert {kind for kind, _ in objects} == {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap",
                                             "PersistentVolumeClaim", "HorizontalPodAutoscaler", "NetworkPolicy"}


def _args(container: dict) -> dict[str, str]:
    return dict(a.split("=", 1) for a in container["args"] if "=" in a)


def test_the_parts_agree(objects):
    worker = objects["Deployment", "lipsync-worker"]
    pod = worker["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = _args(container)
    labels = pod["metadata"]["labels"]
    assert worker["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # one GPU per worker; gRPC probes on the served port
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": int(args["server.port"]),
                                                                            "metrics": int(args["server.metrics_port"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == int(args["server.port"])
    # SIGTERM comes after preStop; then drain, then the grace for in-flight work: all inside the pod's grace
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    needed = pre_stop + float(args["server.drain_s"]) + float(args["server.shutdown_grace_s"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert args["server.worker_name"] == "$(POD_NAME)"
    # Prometheus scrapes the metrics port; the HPA scales this Deployment on a metric the worker exports
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == args["server.metrics_port"]
    hpa = objects["HorizontalPodAutoscaler", "lipsync-worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "lipsync-worker"
    from lipsync.api import metrics
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == metrics.LIVE_SESSIONS._name
    # volumes name objects of this base; the models file is a valid `models` group
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert ("PersistentVolumeClaim", volumes["models"]["persistentVolumeClaim"]["claimName"]) in objects
    assert ("ConfigMap", volumes["config"]["configMap"]["name"]) in objects
    from lipsync.model.pipeline import ModelSpec
    for name, model in yaml.safe_load(objects["ConfigMap", "lipsync-models"]["data"]["production.yaml"]).items():
        spec = ModelSpec.from_dict(name, model)
        assert str(spec.checkpoint).startswith("/models/")
    assert args["models"] == "production"
    # the headless Service selects the workers; Envoy resolves it and routes to its gRPC port
    service = objects["Service", "lipsync-worker"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()
    envoy_config = yaml.safe_load(objects["ConfigMap", "lipsync-envoy"]["data"]["envoy.yaml"])
    for cluster in envoy_config["static_resources"]["clusters"]:
        assert cluster["type"] == "STRICT_DNS"
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": "lipsync-worker", "port_value": int(args["server.port"])}
    envoy_pod = objects["Deployment", "lipsync-envoy"]["spec"]["template"]
    front = objects["Service", "lipsync"]
    assert front["spec"]["selector"].items() <= envoy_pod["metadata"]["labels"].items()
    listener = envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert envoy_pod["spec"]["containers"][0]["ports"][0]["containerPort"] == listener["port_value"] == 50051
    assert envoy_config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # safe defaults: the worker listens beyond loopback only because this file says so, with tokens from a Secret,
    # and only Envoy (gRPC) and Prometheus (metrics) may reach it
    assert args["server.host"] == "0.0.0.0" and args["server.metrics_host"] == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args["server.auth.tokens_file"].startswith(mounts["tokens"] + "/")
    assert volumes["tokens"]["secret"]["secretName"] == "lipsync-tokens"
    policy = objects["NetworkPolicy", "lipsync-worker"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
    (from_envoy, from_prometheus) = policy["ingress"]
    assert from_envoy["from"][0]["podSelector"]["matchLabels"].items() <= envoy_pod["metadata"]["labels"].items()
    assert [p["port"] for p in from_envoy["ports"]] == ["grpc"] and [p["port"] for p in from_prometheus["ports"]] \
        == ["metrics"]
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}


def test_the_shipped_envoy_config_is_the_rendered_template():
    assert (KUBE / "envoy-config.yaml").read_text() == kubernetes_envoy(), \
        "regenerate it: lipsync cluster --print-envoy-config kubernetes > deploy/kubernetes/envoy-config.yaml"


def test_envoy_accepts_both_renderings(tmp_path):
    from lipsync.apps.cluster import envoy_binary
    try:
        binary = envoy_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    local = tmp_path / "local.yaml"
    local.write_text(render_envoy(0, [("127.0.0.1", 50100), ("127.0.0.1", 50101)], listen_host="127.0.0.1"))
    for config in (local, KUBE / "envoy-config.yaml"):
        done = subprocess.run([str(binary), "--mode", "validate", "-c", str(config)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and f"configuration '{config}' OK" in done.stdout + done.stderr, done.stderr


def test_envoy_speaks_tls_to_the_workers(tmp_path, weights, tiny_avatar):
    """The template's upstream TLS, used for real: a worker serving TLS only, Envoy's health checks and a call
    through it over TLS (mutual: Envoy shows a client certificate the worker's client CA signed)."""
    import asyncio

    from lipsync._proto import lipsync_pb2 as pb
    from lipsync._proto import lipsync_pb2_grpc as pb_grpc
    from lipsync.apps.client import channel
    from lipsync.apps.cluster import Cluster, UpstreamTls, envoy_binary
    try:
        envoy_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    pki = tmp_path / "pki"
    subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(pki)], check=True, capture_output=True)
    tls = UpstreamTls(str(pki / "ca.pem"), "localhost", str(pki / "client.pem"), str(pki / "client.key"))
    cluster = Cluster(1, 0, ["models=none", "engine=eager", f"server.tls.cert={pki / 'server.pem'}",
                             f"server.tls.key={pki / 'server.key'}", f"server.tls.client_ca={pki / 'ca.pem'}"],
                      tmp_path / "logs", drain_s=0.5, upstream_tls=tls)
    try:
        cluster.start(timeout_s=120)  # returns once Envoy's health checks (over TLS) find the worker serving

        async def health():
            async with channel(f"127.0.0.1:{cluster.port}") as ch:
                return await pb_grpc.LipSyncStub(ch).Health(pb.HealthRequest(), timeout=20)
        assert asyncio.run(health()).healthy
        assert "mutual TLS" in cluster.workers[0].log_path.read_text()
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- the Docker image
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.replace("\\\n", " ").splitlines()
            if line.strip()]


def _ignored(path: str, patterns: list[str]) -> bool:
    import fnmatch
    parts = path.split("/")
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or
               (p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in parts)) for p in patterns)


def test_the_image_carries_what_its_default_command_serves():
    """No daemon builds images here (no registry to pull the base from), so the Dockerfile is read: its default
    command serves the configured models (the demo), whose weights must be copied; the server runs as a non-root
    user whose home (engine cache, the demo's drawn avatar) and out/ are its own; .dockerignore keeps the build
    context to the source (a .venv is ~6 GB) without hiding anything copied."""
    steps = _dockerfile()
    copied = {args.split()[0] for kind, args in steps if kind == "COPY"}
    env = dict(pair.split("=", 1) for kind, args in steps if kind == "ENV" for pair in args.split())
    user = next(args for kind, args in steps if kind == "USER")
    run = " ".join(args for kind, args in steps if kind == "RUN")
    assert {"lipsync", "clients/python", "conf", "assets", "pyproject.toml"} <= copied
    demo = yaml.safe_load((ROOT / "conf" / "models" / "demo.yaml").read_text())["demo"]
    for role in ("checkpoint", "audio_encoder"):  # ${lipsync.root:} is the source root the image installs
        shipped = demo[role].replace("${lipsync.root:}/", "")
        assert (ROOT / shipped).is_file() and shipped.split("/")[0] in copied, shipped
    assert not user.startswith("0") and user.split(":")[0] != "root"
    assert env["HOME"] == "/var/lib/lipsync" and env["LIPSYNC_DEMO_DIR"].startswith(env["HOME"])
    assert f"chown -R {user} {env['HOME']} /opt/lipsync/out" in run
    assert "ARG TORCH_INDEX" in DOCKERFILE.read_text() and '--index-url "$TORCH_INDEX"' in run  # CPU variant
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".venv", "out", ".git"} <= set(patterns)
    for path in copied:
        assert not _ignored(path, patterns), f"{path} is copied but .dockerignore hides it"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    context = sum((ROOT / f).stat().st_size for f in tracked if not _ignored(f, patterns) and (ROOT / f).is_file())
    assert context < 64 * 2**20, f"build context of {context / 2**20:.0f} MB"
