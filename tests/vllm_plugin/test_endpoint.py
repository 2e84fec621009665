"""The endpoint plugin's routes on a bare FastAPI app (what vLLM's build_app hands attach_router):
headwise's page and assets, /v1/telemetry from the feed with OpenAI-style errors, and the
per-request route's 404. Runs without vLLM; tests/vllm_plugin/test_real_vllm.py does it live."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.dashboard_page import ASSETS
from server.vllm_plugin.endpoint import HeadwiseEndpoint
from tests.vllm_plugin.feed_fakes import Setup


@pytest.fixture
def served():
    app = FastAPI()
    endpoint = HeadwiseEndpoint()
    endpoint.attach_router(app)
    with TestClient(app) as client:
        yield client, endpoint


def test_the_page_and_its_assets_are_headwise_serves(served):
    client, _ = served
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media in ASSETS.items():
        r = client.get(f"/dashboard/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media
    assert client.get("/dashboard/static/uPlot.LICENSE").status_code == 404


def test_telemetry_routes(served):
    client, endpoint = served
    r = client.get("/v1/telemetry")
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"  # before init_state
    s = Setup()
    endpoint.source, endpoint.feed = s.source, s.feed
    s.rows(4, 0.5)
    s.tick(10)
    r = client.get("/v1/telemetry?window=5m&recent=12")
    body = r.json()
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert body["server"] == "vllm" and body["window"] == "5m" and body["heads"]["rows"] == 4
    assert client.get("/v1/telemetry").json()["window"] == "1m"
    for bad in ("2m", ""):
        r = client.get(f"/v1/telemetry?window={bad}")
        err = r.json()["error"]
        assert r.status_code == 400 and (err["param"], err["code"]) == ("window", "invalid_value")
    r = client.get("/v1/telemetry/requests/cmpl-123")
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "request_not_found" and "no per-request telemetry" in err["message"]


def test_the_plugin_imports_no_engine_loop_and_no_engine_bound_api_module():
    code = ("import sys, server.vllm_plugin.endpoint, server.vllm_plugin.feed; "
            "print(sorted(m for m in sys.modules if m.startswith(('server.api', 'server.engine'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(eval(out.stdout))
    assert {m for m in loaded if m.startswith("server.api")} == {"server.api", "server.api.dashboard_page"}
    loop = {"server.engine.engine", "server.engine.runner", "server.engine.scheduler", "server.engine.output"}
    assert not loaded & loop, loaded & loop
