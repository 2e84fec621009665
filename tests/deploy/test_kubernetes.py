"""deploy/k8s: each overlay renders with kustomize (kubectl's), every resource validates against
the Kubernetes API schemas (kubernetes-validate ships them, so this runs offline), and the pieces
agree with each other and with the server: flags, ports, probes, drain timing, labels, metric."""

from __future__ import annotations

import re
import tempfile

import pytest
import yaml

import server
from server.cli import build_parser
from tests.deploy import dockerfile as df
from tests.deploy.conftest import DEPLOY, K8S, REPO, run

OVERLAYS = ("cpu", "gpu")
WAITING = "headwise_num_requests_waiting"
SCHEMA_VERSIONS = ("1.28.0", None)  # the oldest Kubernetes we claim, and the newest schemas shipped
ADAPTER = K8S / "prometheus-adapter" / "values.yaml"


def one(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(resources: list[dict]) -> dict:
    (c,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(overlay: str, resources: list[dict]):
    """The overlay's container args parsed by headwise's own parser, after the image's ENTRYPOINT."""
    image = DEPLOY / ("Dockerfile.cuda" if overlay == "gpu" else "Dockerfile")
    command = df.start_command(df.stages(image)[-1])
    assert command[:2] == ["headwise", "serve"]
    return build_parser().parse_args(command[1:] + container(resources).get("args", []))


def test_every_resource_validates_against_kubernetes_schemas(rendered):
    from kubernetes_validate import utils as kv

    versions = [v or kv.latest_version() for v in SCHEMA_VERSIONS]
    for name, resources in rendered.items():
        for resource in resources:
            if resource["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: no schema ships with Kubernetes; checked in test_service_monitor
            for version in versions:
                try:
                    kv.validate(resource, version, strict=True)  # strict: unknown fields fail too
                except kv.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    pytest.fail(f"{name}: {resource['kind']}/{resource['metadata']['name']} "
                                f"(Kubernetes {version}): {path}: {e.message}")


def test_overlays_hold_the_expected_resources(rendered):
    for overlay in OVERLAYS:
        kinds = sorted(r["kind"] for r in rendered[overlay])
        assert kinds == sorted(["Namespace", "Deployment", "Service", "ServiceMonitor",
                                "PodDisruptionBudget", "HorizontalPodAutoscaler"]), overlay
        for r in rendered[overlay]:
            if r["kind"] != "Namespace":
                assert r["metadata"]["namespace"] == "headwise", r["kind"]


def test_container_args_are_real_headwise_flags(rendered):
    for overlay in OVERLAYS:
        args = serve_args(overlay, rendered[overlay])  # argparse exits on an unknown flag
        assert args.func.__name__ == "cmd_serve"
    cpu, gpu = serve_args("cpu", rendered["cpu"]), serve_args("gpu", rendered["gpu"])
    assert cpu.device == "cpu" and gpu.device == "cuda"


def test_probes_ports_and_scrape_annotations_agree(rendered):
    for overlay in OVERLAYS:
        resources = rendered[overlay]
        c = container(resources)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        image_env = df.stage_env(df.stages(DEPLOY / "Dockerfile")[-1], {})
        listen = int(env.get("HEADWISE_PORT") or image_env["HEADWISE_PORT"])
        assert ports["http"] == listen
        assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loading needs minutes"
        pod = one(resources, "Deployment")["spec"]["template"]["metadata"]
        assert pod["annotations"]["prometheus.io/scrape"] == "true"
        assert int(pod["annotations"]["prometheus.io/port"]) == listen
        assert pod["annotations"]["prometheus.io/path"] == "/metrics"
        service = one(resources, "Service")
        assert service["spec"]["selector"].items() <= pod["labels"].items()
        assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["http"] == "http"


def test_grace_period_covers_prestop_and_drain(rendered):
    """terminationGracePeriodSeconds = preStop sleep + --drain-timeout + 10 s to close."""
    for overlay in OVERLAYS:
        resources = rendered[overlay]
        spec = one(resources, "Deployment")["spec"]["template"]["spec"]
        command = container(resources)["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", command
        drain = serve_args(overlay, resources).drain_timeout
        assert spec["terminationGracePeriodSeconds"] == int(command[1]) + drain + 10, overlay


def test_resources_security_and_gpu_request(rendered):
    image_uid = int(df.stages(DEPLOY / "Dockerfile")[-1].last("USER").args.split(":")[0])
    for overlay in OVERLAYS:
        resources = rendered[overlay]
        c = container(resources)
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][side].keys(), (overlay, side)
        pod = one(resources, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == image_uid
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]  # the image's HOME
        gpu = c["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu is not None) == (overlay == "gpu"), overlay
        assert "replicas" not in one(resources, "Deployment")["spec"], "the HPA owns the replica count"
    cpu = rendered["cpu"]
    assert serve_args("cpu", cpu).threads == int(container(cpu)["resources"]["limits"]["cpu"])


def test_images_match_the_package_version(rendered):
    assert container(rendered["cpu"])["image"] == f"headwise:{server.__version__}-cpu"
    assert container(rendered["gpu"])["image"] == f"headwise:{server.__version__}-cuda"


def test_service_monitor(rendered):
    for overlay in OVERLAYS:
        resources = rendered[overlay]
        monitor, service = one(resources, "ServiceMonitor"), one(resources, "Service")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_pdb_and_hpa(rendered):
    for overlay in OVERLAYS:
        resources = rendered[overlay]
        deployment = one(resources, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdb, hpa = one(resources, "PodDisruptionBudget"), one(resources, "HorizontalPodAutoscaler")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain must leave a pod serving"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == WAITING


def test_waiting_metric_exists_on_the_server():
    sources = "".join(p.read_text() for p in (REPO / "server").rglob("*.py"))
    assert WAITING in sources, f"the HPA scales on {WAITING}, which the server no longer exports"


def test_adapter_rule_exposes_the_hpa_metric():
    values = yaml.safe_load(ADAPTER.read_text())
    rules = values["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == WAITING]
    assert WAITING in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], WAITING)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


def test_adapter_queries_are_valid_promql(tool):
    """promtool parses the rule's series query and its metrics query as the adapter fills it in."""
    promtool = tool("promtool")
    rule = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"][0]
    filled = (rule["metricsQuery"].replace("<<.Series>>", WAITING)
              .replace("<<.LabelMatchers>>", 'namespace="headwise",pod=~"headwise-a|headwise-b"')
              .replace("<<.GroupBy>>", "pod"))
    groups = {"groups": [{"name": "adapter", "rules": [{"record": "adapter:series", "expr": rule["seriesQuery"]},
                                                       {"record": "adapter:metric", "expr": filled}]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(groups, f)
        f.flush()
        result = run([promtool, "check", "rules", f.name])
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint(tool):
    yamllint = tool("yamllint")
    result = run([yamllint, "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable", str(DEPLOY)])
    assert result.returncode == 0, result.stdout + result.stderr

