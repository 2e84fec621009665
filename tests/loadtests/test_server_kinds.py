"""Server kinds without a live server: detection (vLLM carrying the headwise plugin is vLLM),
each server's /tokenize dialect through httpx.MockTransport fakes that answer as the real servers
do, the flag named when no tokenizer is usable, and the per-head view from what the plugin
serves on vLLM's /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import pytest

from loadtests import dataset, server_metrics, table
from loadtests.records import LoadPoint, RequestRecord, RunRecord
from loadtests.report import PointResult, report_json
from loadtests.stats import summarize
from loadtests.target import detect_kind, probe
from loadtests.tokens import ServerTokenizer, TokenizerError, server_or_model_tokenizer


def words(text: str) -> list[int]:
    """The fakes' tokenizer: a BOS, then one token per word."""
    return [1] + [100 + i for i, _ in enumerate(text.split())]


def llamacpp(request: httpx.Request) -> httpx.Response:
    """llama-server: /tokenize reads "content" (a body without it tokenizes "": an empty list)."""
    if request.url.path == "/props":
        return httpx.Response(200, json={"default_generation_settings": {}})
    if request.url.path == "/tokenize":
        body = json.loads(request.content)
        content = body.get("content", "")
        ids = words(content) if content else []
        if not body.get("add_special"):
            ids = ids[1:]
        return httpx.Response(200, json={"tokens": ids})
    return httpx.Response(404, json={"error": {"message": "File Not Found"}})


def vllm(request: httpx.Request) -> httpx.Response:
    """vLLM's /tokenize: {"prompt"} or {"model", "prompt"} (the model must be a served name)."""
    if request.url.path == "/tokenize":
        body = json.loads(request.content)
        if "prompt" not in body or set(body) - {"model", "prompt", "add_special_tokens"}:
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        if body.get("model", "m") != "m":
            return httpx.Response(404, json={"error": {"message": "model not found"}})
        ids = words(body["prompt"])
        return httpx.Response(200, json={"count": len(ids), "max_model_len": 8192, "tokens": ids})
    return httpx.Response(404)


def headwise(request: httpx.Request) -> httpx.Response:
    """headwise serve's /tokenize, validated against its own request schema (strict: unknown fields fail)."""
    from server.api.schemas import TokenizeRequest

    if request.url.path != "/tokenize":
        return httpx.Response(404)
    try:
        body = TokenizeRequest.model_validate_json(request.content)
    except ValueError:
        return httpx.Response(400, json={"error": {"message": "invalid request"}})
    ids = words(body.prompt or "")
    return httpx.Response(200, json={"count": len(ids), "max_model_len": 8192, "tokens": ids})


def no_tokenize(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json={"error": {"message": "Not Found"}})


def client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://test")


# ----------------------------------------------------------------------------- /tokenize dialects
@pytest.mark.parametrize("kind, handler, dialect", [("llamacpp", llamacpp, "content"), ("vllm", vllm, "prompt"),
                                                    ("headwise", headwise, "prompt")])
def test_each_server_is_asked_in_its_own_dialect(kind, handler, dialect):
    sent = []

    def spy(request):
        sent.append(json.loads(request.content))
        return handler(request)

    with client(spy) as c:
        tok = ServerTokenizer(c, "http://test", kind=kind, model="m")
        assert tok.count("one two three") == 4
        assert tok.dialect == dialect and len(sent) == 1  # right the first time
        assert tok.count("one") == 2 and len(sent) == 2


def test_llama_server_without_tokenizer_flag_gets_exact_prompt_lengths():
    """The bug: llama-server answers the {"prompt"} form with 200 and no tokens, so every text
    counted 0 and synthetic prompts stopped with "random words never reached 64 tokens"."""
    with client(llamacpp) as c:
        for kind in ("llamacpp", "openai"):  # detected, or unknown: the plausibility check finds it
            tok = ServerTokenizer(c, "http://test", kind=kind)
            prompts = dataset.synthetic(3, 64, 8, tok, seed=0)
            assert [len(words(p.text)) for p in prompts] == [64, 64, 64]
            assert tok.dialect == "content"


def test_vllm_gets_the_served_model_name_and_a_wrong_one_is_not_trusted():
    with client(vllm) as c:
        assert ServerTokenizer(c, "http://test", kind="vllm", model="m").count("a b") == 3
        with pytest.raises(TokenizerError, match="HTTP 404"):
            ServerTokenizer(c, "http://test", kind="vllm", model="other").count("a b")


def test_headwise_accepts_the_body_it_is_sent():
    with client(headwise) as c:
        assert ServerTokenizer(c, "http://test", kind="headwise", model="m").count("x y z") == 4
        assert ServerTokenizer(c, "http://test", kind="headwise", model=None).count("x") == 2


def test_no_usable_tokenize_names_the_flag():
    with client(no_tokenize) as c:
        with pytest.raises(TokenizerError, match="--tokenizer") as e:
            server_or_model_tokenizer(c, "http://test", "openai", "some-model")
    assert "HTTP 404" in str(e.value)


def test_answers_without_tokens_are_not_counts():
    def odd(request):
        return httpx.Response(200, json={"ok": True})

    with client(odd) as c, pytest.raises(TokenizerError, match="no token list or count"):
        ServerTokenizer(c, "http://test", kind="vllm").count("a b")


def test_a_server_without_tokenize_serving_a_local_folder_uses_its_tokenizer(tiny_llama_dir):
    """vLLM serves a folder path as the model id unless --served-model-name: its tokenizer files
    are then right here."""
    with client(no_tokenize) as c:
        counter = server_or_model_tokenizer(c, "http://test", "vllm", str(tiny_llama_dir))
    assert type(counter).__name__ == "LocalTokenizer"
    assert counter.count("hello world") > 1


def test_a_server_tokenizer_that_works_is_returned_as_is():
    with client(llamacpp) as c:
        counter = server_or_model_tokenizer(c, "http://test", "llamacpp", None)
        assert isinstance(counter, ServerTokenizer) and counter.dialect == "content"


# ----------------------------------------------------------------------------- detection
def plugin_source(counts: int, scale: float = 1.0, up: bool = True):
    """The plugin's TelemetrySource (export.py) holding merged reports of a 2-layer, 3-head model:
    layer l has counts * (l + 1) rows per head; head (l, h)'s means are 0.1 * (3l + h + 1) x scale."""
    from server.exposition import ModelDescription
    from server.vllm_plugin.export import TelemetrySource
    from server.vllm_plugin.snapshot import MergedTelemetry, empty_head_stats
    from server.vllm_plugin.settings import PluginSettings

    model = ModelDescription(name="m", num_layers=2, num_heads=3, num_kv_heads=1)
    buckets = PluginSettings().buckets

    async def fetch():
        return []

    source = TelemetrySource(model, buckets, fetch)
    hs = empty_head_stats(model, buckets)
    for layer in range(2):
        for head in range(3):
            n = counts * (1 + layer)
            hs.counts[layer, head] = n
            hs.sums[layer, head] = scale * n * (0.1 * (layer * 3 + head + 1))  # mean 0.1, 0.2, ... 0.6 (x scale)
    hs = dataclasses.replace(hs, rows=counts * 2)
    source.latest = MergedTelemetry(head_stats=hs, disabled={}, up=up, problem=None if up else "GPU", sample_rate=1.0)
    return source


def plugin_metrics(counts: int, scale: float = 1.0, up: bool = True) -> str:
    """What vLLM's /metrics serves with the headwise plugin: the plugin's collector (export.py)
    rendered by prometheus_client, beside some vllm: families."""
    from prometheus_client import CollectorRegistry, generate_latest

    from server.vllm_plugin.export import PluginCollector

    registry = CollectorRegistry()
    registry.register(PluginCollector(plugin_source(counts, scale, up)))
    vllm_lines = ("# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                  "# TYPE vllm:num_requests_running gauge\n"
                  'vllm:num_requests_running{engine="0",model_name="m"} 0.0\n'
                  "# TYPE vllm:generation_tokens_total counter\n"
                  f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {10.0 * counts}\n'
                  "# TYPE vllm:request_success_total counter\n"
                  f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {float(counts)}\n'
                  "# TYPE vllm:kv_cache_usage_perc gauge\n"
                  'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    return vllm_lines + generate_latest(registry).decode()


def test_vllm_with_the_plugin_is_detected_as_vllm():
    text = plugin_metrics(5)
    assert "headwise_head_entropy_nats_count" in text and "headwise_telemetry_up" in text
    assert detect_kind(text, False) == "vllm"
    # headwise serve's own families only; a help text that mentions vllm: is not a vLLM family
    assert detect_kind("# HELP headwise_x like vllm:x\n# TYPE headwise_x gauge\nheadwise_x 1\n", False) == "headwise"
    assert detect_kind("# TYPE llamacpp:prompt_tokens_total counter\n", True) == "llamacpp"


def test_probe_of_a_vllm_server_with_the_plugin():
    text = plugin_metrics(5)

    def handler(request):
        if request.url.path == "/metrics":
            return httpx.Response(200, text=text)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        return httpx.Response(404)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await probe(c, "http://test", {})

    assert asyncio.run(go()) == ("vllm", "m")


# ----------------------------------------------------------------------------- the per-head view
def test_vllm_server_view_and_per_head_view():
    before = server_metrics.parse(plugin_metrics(5))
    after = server_metrics.parse(plugin_metrics(12))
    view = server_metrics.server_view(before, after, "vllm")
    assert view.counters["generation_tokens"] == 70 and view.counters["request_success"] == 7
    assert view.success_by_reason == {"length": 7}
    assert view.gauges_after["kv_cache_usage"] == 0.25 and view.gauges_after["running"] == 0
    heads = view.heads
    assert (heads.layers, heads.heads, heads.telemetry_up) == (2, 3, 1.0)
    assert heads.rows == [[7, 7, 7], [14, 14, 14]] and heads.total_rows == 63
    assert heads.means["entropy"][1][2] == pytest.approx(0.6)
    assert heads.overall("entropy") == pytest.approx((7 * (0.1 + 0.2 + 0.3) + 14 * (0.4 + 0.5 + 0.6)) / 63)
    low, high = heads.extremes("normalized_entropy", k=2)
    assert [(l, h) for l, h, _ in low] == [(0, 0), (0, 1)] and [(l, h) for l, h, _ in high] == [(1, 2), (1, 1)]
    # the same families read as headwise's find no vllm: latency or counters, but the same heads
    as_headwise = server_metrics.server_view(before, after, "headwise")
    assert as_headwise.counters["generation_tokens"] is None and as_headwise.heads.rows == heads.rows


def test_per_head_table_and_report():
    r = RequestRecord(True, 0.0, 0.5, (), 2, 4, "length")
    run = RunRecord(LoadPoint(1, None), (r,), 0.0, 1.0, False)
    view = server_metrics.server_view(server_metrics.parse(plugin_metrics(5)),
                                      server_metrics.parse(plugin_metrics(12)), "vllm")
    result = PointResult(run, summarize(run, {"ttft": (0.1,), "tpot": (0.1,), "itl": (0.1,), "e2e": (1.0,)}), view)
    text = table.point_table(result)
    assert "2 layers x 3 heads, 63 rows" in text and "L0.H0 0.100" in text and "L1.H2 0.600" in text
    assert "telemetry_up 0" not in text
    heads = report_json([result], {})["runs"][0]["server"]["heads"]
    json.dumps(heads)
    assert heads["rows"] == view.heads.rows and heads["means"]["sink_mass"][0][0] == pytest.approx(0.1)


def test_per_head_view_of_a_plugin_that_is_down():
    """On a GPU the plugin registers no backend yet: headwise_telemetry_up 0 and no rows."""
    view = server_metrics.server_view(server_metrics.parse(plugin_metrics(0, up=False)),
                                      server_metrics.parse(plugin_metrics(0, up=False)), "vllm")
    assert view.heads.telemetry_up == 0.0 and view.heads.total_rows == 0
    assert view.heads.overall("entropy") is None
    lines = "\n".join(table.head_lines(view.heads))
    assert "headwise_telemetry_up 0" in lines and "no telemetry rows" in lines


def test_a_server_without_per_head_families_has_no_head_view():
    text = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
    snap = server_metrics.parse(text)
    assert server_metrics.server_view(snap, snap, "vllm").heads is None


def telemetry_route(source) -> dict:
    """The plugin's GET /v1/telemetry?window=all answer over `source` (its feed, with no vLLM metrics)."""
    from server.vllm_plugin.feed import VllmFeed
    from server.vllm_plugin.vllm_metrics import empty_counters

    return json.loads(json.dumps(VllmFeed(source, empty_counters).snapshot("all")))


def test_per_head_view_from_the_plugins_telemetry_route_equals_the_metrics_one():
    """vLLM with several API server processes has no per-head families on /metrics; the
    plugin's GET /v1/telemetry?window=all (feed.py) gives the same view."""
    before, after = telemetry_route(plugin_source(5)), telemetry_route(plugin_source(12, scale=1.5))
    from_route = server_metrics.head_view_from_telemetry(before, after)
    from_metrics = server_metrics.head_view(server_metrics.parse(plugin_metrics(5)),
                                            server_metrics.parse(plugin_metrics(12, scale=1.5)))
    assert from_route.rows == from_metrics.rows == [[7, 7, 7], [14, 14, 14]]
    assert from_route.telemetry_up == from_metrics.telemetry_up == 1.0
    for stat in server_metrics.HEAD_FAMILIES:
        for got, want in zip(sum(from_route.means[stat], []), sum(from_metrics.means[stat], [])):
            assert got == pytest.approx(want, rel=1e-9)
    # (12 * 1.5 - 5) / 7 x the head's base mean: the run's own mean, not the cumulative one
    assert from_route.means["entropy"][0][0] == pytest.approx(0.1 * (12 * 1.5 - 5) / 7)
    down = telemetry_route(plugin_source(0, up=False))
    view = server_metrics.head_view_from_telemetry(down, down)
    assert view.telemetry_up == 0.0 and view.total_rows == 0
    assert server_metrics.head_view_from_telemetry({"heads": {}}, {"heads": {}}) is None


def test_telemetry_route_reader_tolerates_servers_without_it():
    async def go(handler):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
            return await server_metrics.telemetry(c, "http://test", {})

    assert asyncio.run(go(lambda r: httpx.Response(404))) is None
    assert asyncio.run(go(lambda r: httpx.Response(200, text="not json"))) is None
    assert asyncio.run(go(lambda r: httpx.Response(200, json={"heads": {"counts": []}}))) == {"heads": {"counts": []}}
