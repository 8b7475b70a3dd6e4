"""deploy/kubernetes/ is checked without a cluster: every manifest validates against the
Kubernetes schemas (kubernetes-validate, strict), every container's command parses with
its service's own flags, and the layouts are wired: scheduler addresses resolve to a
Service (or to the same pod), Service ports reach container ports, frontends probe the
health endpoints and are annotated for Prometheus, shared memory is where the layout says."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from despina.services.backend_host.__main__ import add_arguments as backend_arguments
from despina.services.frontend.__main__ import add_arguments as frontend_arguments
from despina.services.scheduler.__main__ import add_arguments as scheduler_arguments
from despina.services.supervisor import frameworks_needed

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
LAYOUTS = sorted(p.name for p in KUBE.iterdir() if (p / "kustomization.yaml").is_file())
PARSERS = {
    "scheduler": scheduler_arguments,
    "frontend": frontend_arguments,
    "backend-host": backend_arguments,
}
POD_IP = "10.1.2.3"


def parse(args: list[str], env: dict[str, str]) -> tuple[str, argparse.Namespace]:
    """A container's args as its service parses them, $(VAR) expanded as the kubelet does."""
    name, *rest = args
    for var, value in env.items():
        rest = [a.replace(f"$({var})", value) for a in rest]
    parser = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    PARSERS[name](parser)
    return name, parser.parse_args(rest)


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def host_of(endpoint: str) -> str:
    return endpoint.split("://", 1)[1].rsplit(":", 1)[0]


def load(layout: str) -> list[dict]:
    kustomization = yaml.safe_load((KUBE / layout / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((KUBE / layout / name).read_text()) if d]
    return docs


def containers(docs: list[dict]) -> list[tuple[dict, dict, str, argparse.Namespace]]:
    """(deployment, container, service kind, parsed args) for every Despina container."""
    out = []
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            env = {
                e["name"]: POD_IP for e in c.get("env", []) if "fieldRef" in e.get("valueFrom", {})
            }
            kind, args = parse(c["args"], env)
            out.append((dep, c, kind, args))
    return out


def test_layouts_exist():
    assert LAYOUTS == ["node-local", "tcp"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kustomization_lists_every_manifest(layout):
    kustomization = yaml.safe_load((KUBE / layout / "kustomization.yaml").read_text())
    files = {p.name for p in (KUBE / layout).glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_manifests_validate_against_the_kubernetes_schemas(layout):
    version = kubernetes_validate.latest_version()
    docs = load(layout)
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    for doc in docs:
        # Raises ValidationError (with the path of the offending field) on any mistake.
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_mistake():
    doc = load("tcp")[0]
    doc["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_command_parses_and_the_services_are_there(layout):
    kinds = [kind for _, _, kind, _ in containers(load(layout))]
    assert kinds.count("scheduler") == 1
    assert "frontend" in kinds
    frameworks = {
        args.framework for _, _, kind, args in containers(load(layout)) if kind == "backend-host"
    }
    assert set(frameworks_needed([ROOT / "model_repository"])) <= frameworks


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scheduler_addresses_resolve(layout):
    """Every frontend's and host's --scheduler names the scheduler's stream port: through a
    Service whose port reaches it, or on 127.0.0.1 when the scheduler shares the pod."""
    docs = load(layout)
    found = containers(docs)
    dep, sched_c, _, sched = next(f for f in found if f[2] == "scheduler")
    stream_port = port_of(sched.host_endpoint)
    named = {p.get("name"): p["containerPort"] for p in sched_c.get("ports", [])}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for other_dep, c, kind, args in found:
        if kind == "scheduler":
            continue
        host, port = host_of(args.scheduler), port_of(args.scheduler)
        if host == "127.0.0.1":
            assert other_dep is dep, (layout, c["name"])
            assert port == stream_port
            continue
        service = services[host]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == port)
        assert named.get(target, target) == stream_port, (layout, c["name"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frontend_ports_probes_and_metrics(layout):
    docs = load(layout)
    services = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "despina"]
    assert len(services) == 1
    service_ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    assert {n: p["port"] for n, p in service_ports.items()} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    for dep, c, kind, args in containers(docs):
        if kind != "frontend":
            continue
        assert (
            services[0]["spec"]["selector"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == args.http_port == 8000
        assert ports["grpc"] == args.grpc_port == 8001
        assert ports["metrics"] == 8002
        for p in service_ports.values():
            assert p["targetPort"] in ports
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_tcp_layout_rides_the_sockets_and_authenticates():
    """Pods of the TCP layout share no /dev/shm: frontends send every tensor inline,
    advertise their own pod IP for replies, and every link takes DESPINA_CLUSTER_SECRET."""
    for dep, c, kind, args in containers(load("tcp")):
        spec = dep["spec"]["template"]["spec"]
        assert "volumes" not in spec, dep["metadata"]["name"]
        secret = {e["name"]: e for e in c["env"]}["DESPINA_CLUSTER_SECRET"]
        assert secret["valueFrom"]["secretKeyRef"]["key"] == "secret"
        if kind == "frontend":
            assert args.inline_threshold >= 2**32
            assert args.advertise_endpoint == f"tcp://{POD_IP}:{port_of(args.reply_endpoint)}"
        if kind == "backend-host":
            assert dep["metadata"]["name"] == f"despina-backend-{args.framework}"


def test_node_local_layout_shares_dev_shm_in_memory():
    docs = load("node-local")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 1
    spec = deployments[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    for _, _, kind, args in containers(docs):
        if kind == "frontend":
            assert host_of(args.advertise_endpoint) == "127.0.0.1"
