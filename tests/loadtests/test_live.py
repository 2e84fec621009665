"""The client against a live headwise (tiny random model) on loopback: the report is complete,
its counts agree with the server's own /metrics counters, and runs stop by themselves."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import ROOT

pytestmark = pytest.mark.slow

INPUT_LEN, OUTPUT_LEN, REQUESTS = 24, 12, 12


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-model-len", "512", "--kv-cache-memory", "0.05", name="loadtests")


def run_cli(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "loadtests", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_report_is_complete_and_agrees_with_the_servers_counters(server, tmp_path):
    out = tmp_path / "report.json"
    p = run_cli("--base-url", server.base_url, "--concurrency", "4", "--num-requests", str(REQUESTS),
                "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--goodput", "ttft:60000",
                "--json", str(out))
    assert p.returncode == 0, p.stderr + p.stdout
    report = json.loads(out.read_text())
    assert report["target"]["kind"] == "headwise" and report["machine"]["load_average_before"]
    (run,) = report["runs"]
    assert run["requests"] == {"sent": REQUESTS, "completed": REQUESTS, "failed": 0, "stopped_early": False,
                               "errors": {}}
    assert 1 <= run["peak_concurrency"] <= 4
    assert run["goodput_requests_per_s"] == pytest.approx(run["throughput"]["requests_per_s"])
    # exact lengths: the server counted every synthetic prompt at INPUT_LEN tokens, and ignore_eos held
    assert {(r["prompt_tokens"], r["output_tokens"]) for r in run["per_request"]} == {(INPUT_LEN, OUTPUT_LEN)}
    assert run["tokens"] == {"input": REQUESTS * INPUT_LEN, "output": REQUESTS * OUTPUT_LEN}
    for key in ("ttft", "tpot", "itl", "e2e"):
        lat = run["latency_ms"][key]
        assert lat["count"] and lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        h = run["histograms"][key]
        assert h["count"] == lat["count"] == h["cumulative"][-1]
    assert run["latency_ms"]["itl"]["count"] == REQUESTS * (OUTPUT_LEN - 1)

    # the server's own view of the same window (after warm-up): same requests, same tokens
    srv = run["server"]
    assert srv["counters"]["generation_tokens"] == run["tokens"]["output"]
    assert srv["counters"]["prompt_tokens"] == run["tokens"]["input"]
    assert srv["counters"]["request_success"] == REQUESTS
    assert srv["success_by_reason"] == {"length": REQUESTS}
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert srv["histograms"][key]["count"] == run["histograms"][key]["count"], key
        assert srv["histograms"][key]["bounds_s"] == run["histograms"][key]["bounds_s"], key
    # the server's intervals lie inside the client's (arrival is after send; finish before [DONE])
    for key in ("ttft", "e2e"):
        assert srv["histograms"][key]["sum_s"] <= run["histograms"][key]["sum_s"] + 1e-3, key
    assert "server" in p.stdout and "TTFT" in p.stdout and "n/a" not in p.stdout.split("queue")[0]
    # the per-head view: each request's rows are its generated tokens (the last prompt position,
    # then each token fed back), on every (layer, head)
    heads = srv["heads"]
    assert heads["telemetry_up"] is None  # headwise serve has no plugin gauge
    assert {n for row in heads["rows"] for n in row} == {REQUESTS * OUTPUT_LEN}
    assert 0.0 <= heads["overall_means"]["normalized_entropy"] <= 1.0
    assert f"{heads['layers']} layers x {heads['heads']} heads" in p.stdout


def test_rate_sweep_writes_a_plot_and_a_sweep_table(server, tmp_path):
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    p = run_cli("--base-url", server.base_url, "--request-rate", "40,inf", "--concurrency", "3",
                "--num-requests", "6", "--input-len", "8", "--output-len", "4", "--endpoint", "chat",
                "--plot", str(png), "--json", str(out), "--no-per-request")
    assert p.returncode == 0, p.stderr + p.stdout
    runs = json.loads(out.read_text())["runs"]
    assert [r["point"] for r in runs] == [{"concurrency": 3, "request_rate": 40.0},
                                          {"concurrency": 3, "request_rate": None}]
    assert all(r["requests"]["completed"] == 6 and "per_request" not in r for r in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "out tok/s" in p.stdout and "rate 40/s" in p.stdout


def test_jsonl_prompts_through_chat(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in (
        {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5},
        {"prompt": "The capital of France is", "max_tokens": 3})) + "\n")
    out = tmp_path / "r.json"
    p = run_cli("--base-url", server.base_url, "--endpoint", "chat", "--dataset-path", str(data),
                "--num-requests", "4", "--concurrency", "2", "--warmup", "0", "--json", str(out))
    assert p.returncode == 0, p.stderr + p.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert [r["output_tokens"] for r in run["per_request"]] == [5, 3, 5, 3]
    assert run["server"]["counters"]["generation_tokens"] == 16


def test_time_limit_stops_the_run(server, tmp_path):
    out = tmp_path / "r.json"
    t0 = time.monotonic()
    p = run_cli("--base-url", server.base_url, "--concurrency", "1", "--num-requests", "50", "--input-len", "8",
                "--output-len", "400", "--max-duration", "1", "--warmup", "0", "--json", str(out), "--no-progress")
    assert time.monotonic() - t0 < 30
    assert p.returncode == 1  # the cut-off request counts as failed
    (run,) = json.loads(out.read_text())["runs"]
    assert run["requests"]["stopped_early"] and run["requests"]["sent"] < 50
    assert any("time limit" in e for e in run["requests"]["errors"])
    assert httpx.get(server.url("/health")).status_code == 200


def test_locustfile_runs_headless(server, tmp_path):
    if importlib.util.find_spec("locust") is None:  # never import it here: it monkey-patches the process (gevent)
        pytest.skip("locust is not installed")
    prefix = tmp_path / "locust"
    p = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--host", server.base_url,
                        "--headless", "-u", "2", "-r", "2", "-t", "3s", "--input-len", "8", "--output-len", "4",
                        "--num-prompts", "16", "--only-summary", "--csv", str(prefix)],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(f"{prefix}_stats.csv"))}
    for name in ("TTFT", "TPOT", "E2E", "/v1/completions"):
        assert int(rows[name]["Request Count"]) > 0 and int(rows[name]["Failure Count"]) == 0, name
