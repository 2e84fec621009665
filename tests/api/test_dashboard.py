"""GET /dashboard, its assets and GET /v1/telemetry[/requests/{id}] on a live tiny-model server;
then real headless Chromium loads the page and the DOM must hold the layer x head heatmap with
finite values and latency numbers (skipped where the `chromium` binary is missing, failed under CI)."""

from __future__ import annotations

import math
import re

import httpx
import pytest

from server.api.dashboard_page import ASSETS, STATIC_DIR
from tests.api.dashboard_dom import chromium_binary, finite, load_dashboard, run_chromium

STATS = ("entropy", "normalized_entropy", "max_weight", "sink_mass", "lookback_distance")


def traffic(server, n: int = 3, max_tokens: int = 8) -> None:
    for i in range(n):
        r = httpx.post(server.url("/v1/chat/completions"), timeout=60,
                       json={"messages": [{"role": "user", "content": f"Hello number {i}"}],
                             "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
        assert r.status_code == 200, r.text


def get_json(server, path: str, status: int = 200, **kw) -> dict:
    r = httpx.get(server.url(path), timeout=30, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def assert_grid(grid, layers: int, heads: int) -> None:
    assert len(grid) == layers and all(len(row) == heads for row in grid)
    assert all(v is not None and math.isfinite(v) for row in grid for v in row)


@pytest.fixture(scope="module")
def served(server):
    traffic(server)
    return server


def test_telemetry_json(served):
    snap = get_json(served, "/v1/telemetry")
    model = snap["model"]
    layers, heads = model["layers"], model["heads"]
    assert (layers, heads, model["kv_heads"]) == (3, 4, 2)  # the tiny model
    assert snap["window"] == "1m" and snap["window_seconds"] == 60
    for name in STATS:
        assert_grid(snap["heads"][name], layers, heads)
    assert all(0 <= v <= 1 for row in snap["heads"]["normalized_entropy"] for v in row)
    assert snap["heads"]["rows"] > 0
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "queue_time"):
        lat = snap["latency"][name]
        assert lat["count"] > 0 and 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (name, lat)
    assert snap["throughput"]["generation_tokens_per_s"] > 0
    assert snap["counters"]["generation_tokens"] >= 3 * 8 - 3  # greedy runs may stop early at EOS
    assert set(snap["load"]) >= {"num_running", "num_waiting", "kv_cache_usage", "api_requests_in_flight"}

    recent = snap["recent_requests"]
    assert recent and recent[0]["telemetry_rows"] > 0
    one = get_json(served, f"/v1/telemetry/requests/{recent[0]['id']}")
    assert one["id"] == recent[0]["id"] and one["output_tokens"] >= 1
    tel = one["head_telemetry"]
    assert (tel["layers"], tel["heads"]) == (layers, heads)
    for name in STATS:
        assert_grid(tel[name], layers, heads)

    for window in ("5m", "all"):
        other = get_json(served, f"/v1/telemetry?window={window}&recent=1")
        assert other["window"] == window and len(other["recent_requests"]) == 1
        assert other["heads"]["rows"] >= snap["heads"]["rows"]


@pytest.mark.parametrize("query, param", [("window=2m", "window"), ("window=", "window"), ("recent=abc", "recent"),
                                          ("recent=-1", "recent"), ("recent=101", "recent")])
def test_bad_query_is_a_400_error_object(served, query, param):
    body = get_json(served, f"/v1/telemetry?{query}", 400)
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == "invalid_value"


def test_unknown_request_is_a_404_error_object(served):
    err = get_json(served, "/v1/telemetry/requests/req-doesnotexist", 404)["error"]
    assert err["code"] == "request_not_found" and err["param"] == "request_id"
    assert httpx.post(served.url("/v1/telemetry")).status_code == 405


def test_page_and_assets(served):
    page = httpx.get(served.url("/dashboard"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media in ASSETS.items():
        assert f"dashboard/static/{name}" in page.text
        r = httpx.get(served.url(f"/dashboard/static/{name}"))
        assert r.status_code == 200 and r.headers["content-type"] == media and r.content
        again = httpx.get(served.url(f"/dashboard/static/{name}"), headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304
    assert (STATIC_DIR / "uPlot.LICENSE").read_text().startswith("The MIT License")
    assert httpx.get(served.url("/dashboard/static/uPlot.LICENSE")).status_code == 404  # only listed assets
    assert httpx.get(served.url("/dashboard/static/..%2Fapp.py")).status_code == 404
    paths = httpx.get(served.url("/openapi.json")).json()["paths"]
    assert "/v1/telemetry" in paths and "/v1/telemetry/requests/{request_id}" in paths and "/dashboard" not in paths


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server("--api-key", "sekret", "--max-model-len", "256", name="dashboard-key")


def test_api_key_guards_the_data_not_the_page(keyed):
    srv = keyed
    assert httpx.get(srv.url("/dashboard")).status_code == 200
    for name in ASSETS:
        assert httpx.get(srv.url(f"/dashboard/static/{name}")).status_code == 200
    for path in ("/v1/telemetry", "/v1/telemetry/requests/x"):
        r = httpx.get(srv.url(path))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(srv.url("/v1/telemetry"), headers={"authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json()["object"] == "telemetry"


# --------------------------------------------------------------------------- real Chromium
def test_chromium_renders_heatmap_and_latency(served, tmp_path):
    chromium_binary()
    traffic(served, n=2)
    snap = get_json(served, "/v1/telemetry")
    layers, heads = snap["model"]["layers"], snap["model"]["heads"]

    dom = load_dashboard(served.url("/dashboard"), tmp_path)
    assert int(dom.body["data-updates"]) >= 1
    heat = dom.heatmaps["heatmap"]
    assert (int(heat["data-layers"]), int(heat["data-heads"])) == (layers, heads)
    assert heat["data-stat"] == "normalized_entropy"
    cells = dom.cells["heatmap"]
    assert len(cells) == layers * heads
    assert {(int(c["data-layer"]), int(c["data-head"])) for c in cells} == {(l, h) for l in range(layers)
                                                                            for h in range(heads)}
    assert all(0.0 <= finite(c["data-value"]) <= 1.0 for c in cells)
    assert all(int(c["data-kv-head"]) == int(c["data-head"]) // (heads // snap["model"]["kv_heads"]) for c in cells)

    for metric in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        for q in ("p50", "p95", "p99"):
            cell = dom.latency[(metric, q)]
            assert finite(cell["data-value"]) > 0, (metric, q, cell)
            shown = cell["text"].replace("ms", "").replace("s", "").strip()
            assert finite(shown) > 0, (metric, q, cell["text"])
    assert finite(dom.texts["tile-tps"]) >= 0
    assert dom.texts["tile-kv"].endswith("%")

    # a request's own heatmap: the page opens it from ?request=<id>
    rid = snap["recent_requests"][0]["id"]
    dom = load_dashboard(served.url(f"/dashboard?request={rid}"), tmp_path)
    cells = dom.cells["modal-heatmap"]
    assert len(cells) == layers * heads
    assert all(math.isfinite(finite(c["data-value"])) for c in cells)


def test_chromium_asks_for_the_key(keyed, tmp_path):
    dom = run_chromium(keyed.url("/dashboard"), tmp_path, "--dump-dom", budget_ms=3000)
    assert 'data-state="error"' in dom
    assert re.search(r'<form class="keybar" id="keybar">', dom), "the key form must be shown (not hidden)"
