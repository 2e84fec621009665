"""In-process checks of the API's small parts: the API-key middleware (both /metrics modes, the
Host-header bypass), error sanitizing and engine-error mapping, timings, telemetry aggregation and
choice folding."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.api.app import PUBLIC_PATHS, APIKeyMiddleware
from server.config import ServerConfig
from server.api.errors import APIError, error_body, from_engine_error, sanitize
from server.api.streaming import ChoiceState, coalesce, head_telemetry, timings
from server.engine.errors import ContextLengthExceededError, InvalidRequestError
from server.engine.output import TokenEvent
from server.engine.request import FinishReason, RequestStats
from server.engine.telemetry import RequestHeadTelemetry


def _app(public):
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in
                            ("/health", "/ready", "/metrics", "/v1/completions", "/tokenize")])
    return TestClient(APIKeyMiddleware(app, api_key="k3y", public=public))


@pytest.mark.parametrize("metrics_public", [True, False])
def test_api_key_scope(metrics_public):
    c = _app(PUBLIC_PATHS | ({"/metrics"} if metrics_public else set()))
    assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    assert c.get("/metrics").status_code == (200 if metrics_public else 401)
    assert c.get("/metrics", headers={"authorization": "Bearer k3y"}).status_code == 200
    for path in ("/v1/completions", "/tokenize", "/nonexistent"):
        r = c.post(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.post("/v1/completions", headers={"x-api-key": "k3y"}).status_code == 200
    assert c.post("/v1/completions", headers={"authorization": "bearer k3y"}).status_code == 200
    # CVE-2026-48746 shape: the Host header must not change the authorized path
    assert c.post("/v1/completions", headers={"host": "x/health?"}).status_code == 401


def test_sanitize_scrubs_paths_addresses_tracebacks():
    msg = sanitize('Traceback (most recent call last): File "/work/main/server/x.py", line 3 at 0x7f00deadbeef '
                   "in /usr/lib/python3.11/site-packages/foo/bar.py")
    assert "/work" not in msg and "0x7f00deadbeef" not in msg and "Traceback" not in msg and "site-packages" not in msg
    body = error_body(APIError(400, "x" * 10_000))
    assert len(body) < 700


def test_engine_refusals_map_to_the_openai_400():
    err = from_engine_error(ContextLengthExceededError("prompt is too long"))
    assert err.status == 400 and err.headers == {}
    assert error_body(err) == (b'{"error": {"message": "prompt is too long", "type": "invalid_request_error", '
                               b'"param": "messages", "code": "context_length_exceeded"}}')
    err = from_engine_error(InvalidRequestError("top_p must be in (0, 1], got 2", param="top_p"))
    assert (err.status, err.param, err.code) == (400, "top_p", None)


def test_server_config_validation():
    with pytest.raises(ValueError):
        ServerConfig(max_queue=-1)
    with pytest.raises(ValueError):
        ServerConfig(drain_timeout=float("nan"))
    with pytest.raises(ValueError):
        ServerConfig(api_key="")


def _stats(queue, ttft, decode, out, e2e):
    return RequestStats(num_prompt_tokens=3, num_output_tokens=out, num_cached_tokens=0, num_preemptions=0,
                        queue_time=queue, time_to_first_token=ttft, prefill_time=ttft - queue, decode_time=decode,
                        e2e_latency=e2e)


def test_timings_single_and_aggregate():
    one = timings([_stats(0.1, 0.3, 1.0, 11, 1.3)])
    assert one["decode_tokens_per_s"] == pytest.approx(10.0) and one["queue_time"] == 0.1
    agg = timings([_stats(0.1, 0.3, 1.0, 11, 1.3), _stats(0.2, 0.4, 2.0, 21, 2.4)])
    assert agg["queue_time"] == 0.1 and agg["time_to_first_token"] == 0.3 and agg["e2e_latency"] == 2.4
    assert agg["decode_tokens_per_s"] == pytest.approx(30 / 2.0)
    assert timings([]) is None


def _tel(rows, value):
    m = [[value, value], [value, value]]
    return RequestHeadTelemetry(layers=2, heads=2, kv_heads=1, rows=rows, entropy=m, normalized_entropy=m,
                                max_weight=m, sink_mass=m, lookback_distance=[[float("nan"), value], [value, value]])


def test_head_telemetry_row_weighted_mean_and_no_nan():
    ev = lambda t: TokenEvent("r", (), "", finished=True, finish_reason=FinishReason.STOP, head_telemetry=t)  # noqa: E731
    out = head_telemetry([ev(_tel(1, 1.0)), ev(_tel(3, 3.0))])
    assert out["rows"] == 4 and out["entropy"][0][0] == pytest.approx(2.5)
    assert out["lookback_distance"][0][0] is None  # NaN never reaches the JSON
    assert head_telemetry([ev(None)]) is None
    single = head_telemetry([ev(_tel(2, 0.5)), None])
    assert single["rows"] == 2 and single["lookback_distance"] == [[None, 0.5], [0.5, 0.5]]


def test_choices_and_coalesced_deltas_fold_the_same_events():
    events = [(0, TokenEvent("a", (1,), "x")), (1, TokenEvent("b", (2,), "y")), (0, TokenEvent("a", (3,), "")),
              (0, TokenEvent("a", (4,), "z", finished=True, finish_reason=FinishReason.STOP))]
    deltas = coalesce(events)
    assert list(deltas) == [0, 1]
    assert (deltas[0].text, deltas[0].token_ids, deltas[0].finished) == ("xz", [1, 3, 4], True)
    assert (deltas[1].text, deltas[1].token_ids, deltas[1].final) == ("y", [2], None)
    choice = ChoiceState(index=0)
    for index, ev in events:
        if index == 0:
            choice.add(ev)
    assert (choice.text, choice.num_tokens, choice.final) == ("xz", 3, events[-1][1])


@pytest.mark.parametrize("argv,needle", [
    (["serve", "--port", "70000"], "port"),
    (["serve", "--max-queue", "-1"], "max_queue"),
    (["serve", "--drain-timeout", "-2"], "drain_timeout"),
    (["serve", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
])
def test_serve_bad_flags_fail_with_a_clear_message(argv, needle, capsys):
    from server.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("headwise: error:") and needle in err and "Traceback" not in err


class _FakeGeneration:
    """Stands in for serving.Generation: hands out prepared batches."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.closed = False

    async def next_batch(self):
        return self.batches.pop(0)

    def close(self):
        self.closed = True


def _collect_sse(batches, n=1, include_usage=False):
    import asyncio
    import json

    from server.api.streaming import ChatFormat, TokenStrings, sse_events

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i % 26) for i in ids)

    gen = _FakeGeneration(batches)
    fmt = ChatFormat(TokenStrings(Tok()), logprobs=False, top_logprobs=0)

    async def run():
        return [chunk async for chunk in sse_events(fmt, gen, rid="chatcmpl-x", created=0, model="m",
                                                     choices=[ChoiceState(index=i) for i in range(n)],
                                                     prompt_lengths=[3], include_usage=include_usage,
                                                     want_telemetry=False)]

    raw = b"".join(asyncio.run(run())).decode()
    events = [e[6:] for e in raw.split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in events], gen


def test_sse_error_after_the_stream_started_is_an_error_event():
    ok = TokenEvent("r", (1,), "a")
    boom = TokenEvent("r", (), "", finished=True, finish_reason=FinishReason.ERROR, error="engine step failed")
    events, gen = _collect_sse([[(0, ok)], [(0, boom)]])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"] == {"content": "a"}
    assert set(events[2]) == {"error"} and "engine step failed" in events[2]["error"]["message"]
    assert events[2]["error"]["type"] == "server_error" and events[-1] == "[DONE]" and gen.closed


def test_sse_coalesces_queued_events_per_choice():
    st = _stats(0.0, 0.1, 0.2, 3, 0.3)
    batch = [(0, TokenEvent("a", (1,), "x")), (1, TokenEvent("b", (2,), "y")), (0, TokenEvent("a", (3,), "z")),
             (0, TokenEvent("a", (4,), "w", finished=True, finish_reason=FinishReason.LENGTH, stats=st))]
    last = [(1, TokenEvent("b", (5,), "v", finished=True, finish_reason=FinishReason.STOP, stats=st))]
    events, _ = _collect_sse([batch, last], n=2, include_usage=True)
    body = [e for e in events[2:] if e != "[DONE]"]  # after the two role chunks
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content"), c["choices"][0]["finish_reason"])
            for c in body[:3]] == [(0, "xzw", "length"), (1, "y", None), (1, "v", "stop")]
    usage = body[3]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5 and "timings" in usage
    assert events[-1] == "[DONE]"
