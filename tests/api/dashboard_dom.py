"""Headless Chromium and the dashboard's DOM: load /dashboard in real Chromium (the `chromium`
binary; a test is skipped where it is missing, and fails under CI) and read back the body's
state, the heatmaps' cells and the latency table. Used by the page's tests on headwise serve
(tests/api/test_dashboard.py) and on vLLM with the plugin (tests/vllm_plugin/test_real_vllm.py)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium not found: Debian package 'chromium' (installed by scripts/ci-apt.sh)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def run_chromium(url: str, tmp_path, *args: str, budget_ms: int = 8000) -> str:
    cmd = [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={tmp_path / 'profile'}",
           f"--virtual-time-budget={budget_ms}", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class DashboardDOM(HTMLParser):
    """Collects the body's state, heatmap cells (by heatmap id), the latency table's cells, the
    tiles' texts and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict = {}
        self.cells: dict[str, list[dict]] = {}
        self.heatmaps: dict[str, dict] = {}
        self.latency: dict[tuple[str, str], dict] = {}
        self.texts: dict[str, str] = {}
        self.ids: set[str] = set()
        self._heatmap: str | None = None
        self._metric: str | None = None
        self._capture: tuple | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        if "heatmap" in classes:
            self._heatmap = a.get("id")
            self.heatmaps[self._heatmap] = a
            self.cells[self._heatmap] = []
        if "cell" in classes and self._heatmap:
            self.cells[self._heatmap].append(a)
        if tag == "tr" and "data-metric" in a:
            self._metric = a["data-metric"]
        if tag == "td" and self._metric and "data-q" in a:
            self._capture = ("lat", self._metric, a["data-q"], a)
            self.latency[(self._metric, a["data-q"])] = {**a, "text": ""}
        elif a.get("id", "").startswith("tile-"):
            self._capture = ("tile", a["id"])
            self.texts[a["id"]] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._metric = None
        if tag in ("td", "div") and self._capture and self._capture[0] == "tile" and tag == "div":
            self._capture = None
        if tag == "td" and self._capture and self._capture[0] == "lat":
            self._capture = None

    def handle_data(self, data):
        if not self._capture:
            return
        if self._capture[0] == "lat":
            self.latency[(self._capture[1], self._capture[2])]["text"] += data
        else:
            self.texts[self._capture[1]] += data


def load_dashboard(url: str, tmp_path, attempts: int = 4) -> DashboardDOM:
    for _ in range(attempts):
        dom = DashboardDOM()
        dom.feed(run_chromium(url, tmp_path, "--dump-dom"))
        if dom.body.get("data-state") == "ready" and any(c.get("data-value") for c in dom.cells.get("heatmap", [])):
            return dom
    pytest.fail(f"the dashboard showed no data after {attempts} loads: body {dom.body}")


def finite(text: str) -> float:
    value = float(text)
    assert math.isfinite(value)
    return value
