"""The load-test client stays a client: importing its modules pulls in neither prometheus_client
(server/metrics.py's dependency; the histogram boundaries come from the pure-Python
server/latency.py) nor the engine. Each import runs in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(f"loadtests.{p.stem}" for p in (ROOT / "loadtests").glob("*.py")
                 if p.stem not in ("__init__", "__main__", "locustfile"))
FORBIDDEN = ("prometheus_client", "server.metrics", "server.exposition", "server.engine", "torch", "fastapi")


def imported(module: str) -> list[str]:
    """The FORBIDDEN modules (and their submodules) in sys.modules after importing `module`."""
    code = (f"import sys, {module}; forbidden = {FORBIDDEN!r}; "
            "print(' '.join(m for m in sys.modules if m in forbidden or m.startswith(tuple(f + '.' for f in forbidden))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_the_entry_module_is_among_those_checked():
    assert "loadtests.cli" in MODULES and "loadtests.stats" in MODULES


@pytest.mark.parametrize("module", ["loadtests", *MODULES])
def test_client_modules_import_no_server_side_dependency(module):
    assert imported(module) == []


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_locustfile_imports_no_server_side_dependency():
    assert imported("loadtests.locustfile") == []
