"""Isolation (issue 12), the API's part: no request can stall the event loop, hold the server's
memory or a shared pool, or be dropped by another's shutdown timing.

Live servers (subprocesses on loopback) for the storm, the stalled reader and the start-up; an
engine in this process for what needs a hand on its timing (a tokenizer that waits)."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from server.api.dashboard import dashboard_router
from server.api.errors import APIError
from server.api.schemas import CompletionRequest, ascii_uint
from server.api.serving import OpenAIServing, max_chars_per_token, parse_body
from server.api.streaming import dumps, encode
from server.api.telemetry_feed import TelemetryFeed
from server.config import EngineConfig, SchedulerConfig, ServerConfig
from server.engine.engine import FinishedRequest
from server.engine.request import FinishReason, RequestStats
from server.engine.telemetry import RequestHeadTelemetry
from tests.api.conftest import ROOT, free_port, metric
from tests.api.test_bad_input import assert_error_shape
from tests.api.test_reliability import wait_idle
from tests.api.test_telemetry_feed import FakeEngine

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@pytest.fixture(scope="module")
def isolation_server(start_server):
    """16 sequences per request allowed (a large legal response), a 2048-token window and a
    64-event stream buffer (a stalled reader is found quickly)."""
    return start_server("--max-model-len", "2048", "--max-num-seqs", "16", "--max-request-seqs", "16",
                        "--stream-buffer-events", "64", "--kv-cache-memory", "0.1", name="isolation")


# ------------------------------------------------------------------------------ defect 4
@pytest.fixture
def null_server():
    """The control of latency tests (tests/api/null_server.py): its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.api.null_server", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def probe(urls: list[str], keep_going, limit: int = 5000) -> list[list[float]]:
    """Latencies (s) of GET each url in turn, every 10 ms, one connection each, while keep_going().
    Python's cyclic collector is paused meanwhile: in the whole suite this process holds enough
    objects that one full collection takes tens of milliseconds, and one landing inside a timed
    GET would count as the server's latency."""
    latencies: list[list[float]] = [[] for _ in urls]
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(timeout=5) as c:
            while keep_going() and len(latencies[0]) < limit:
                for url, out in zip(urls, latencies):
                    t0 = time.perf_counter()
                    assert c.get(url).status_code == 200
                    out.append(time.perf_counter() - t0)
                time.sleep(0.01)
    finally:
        if collecting:
            gc.enable()
    return latencies


def test_health_p99_under_a_storm_of_large_bodies_and_responses(isolation_server, null_server):
    """~3.9 MiB prompts (token ids and text) two at a time, and a large legal non-streaming
    response (16 choices x 400 tokens x logprobs 20, about 9 MB) at the same time, from another
    process: /health p99 stays under 50 ms.

    These cores are shared: /health is probed beside a server that does nothing (the control),
    and what the machine alone adds at p99 beyond 10 ms (the control's p99 minus 10 ms) is
    allowed on top. On a quiet machine that is nothing."""
    srv = isolation_server
    wait_idle(srv, 10)
    storm = subprocess.Popen([sys.executable, "-m", "tests.api.load_storm", srv.base_url, "16", "400", "24"],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert storm.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 240
        health, control = probe([srv.url("/health"), null_server + "/health"],
                                lambda: storm.poll() is None and time.monotonic() < deadline)
        out, _ = storm.communicate(timeout=240)
    finally:
        if storm.poll() is None:
            storm.kill()
    summary = json.loads(out)
    assert summary["large"]["status"] == 200
    assert (summary["large"]["choices"], summary["large"]["tokens"]) == (16, 16 * 400)
    assert summary["large"]["bytes"] > 4_000_000
    assert len(summary["big"]) >= 4 and all(code == [400, "context_length_exceeded"] for code in summary["big"])
    assert len(health) >= 50, len(health)
    noise = max(0.0, p99(control) - 0.010)
    print(f"/health during the storm: n={len(health)} median {statistics.median(health) * 1000:.1f} ms, "
          f"p99 {p99(health) * 1000:.1f} ms, max {max(health) * 1000:.1f} ms (control: p99 "
          f"{p99(control) * 1000:.1f} ms); {len(summary['big'])} big bodies, "
          f"response {summary['large']['bytes'] / 1e6:.1f} MB")
    assert p99(health) < 0.050 + noise


def test_an_invalid_array_costs_one_error_not_one_per_element():
    """A 4 MiB body of bad token ids is refused after its first bad element, quickly."""
    body = json.dumps({"prompt": [-1] * 800_000}).encode()
    t0 = time.perf_counter()
    with pytest.raises(APIError) as refused:
        parse_body(CompletionRequest, body)
    assert time.perf_counter() - t0 < 1.0
    assert refused.value.status == 400 and refused.value.param == "prompt[0]" and "more" not in refused.value.message
    mixed = json.dumps({"prompt": [1] * 100_000 + ["x"]}).encode()
    with pytest.raises(APIError) as refused:
        parse_body(CompletionRequest, mixed)
    assert refused.value.param == "prompt"


def test_encode_equals_dumps():
    entry = {"token": "h\u00e9\"llo", "logprob": -1.5, "bytes": [104, 195, 169]}
    body = {"id": "x", "choices": [{"index": i, "logprobs": {"content": [{**entry, "top_logprobs": [entry] * 3}] * 5},
                                    "text": "ab", "stop_reason": None} for i in range(3)],
            "usage": {"prompt_tokens": 1}, "empty": {}, "none": [], "timings": None}
    assert encode(body) == dumps(body)


# ------------------------------------------------------------------------------ in-process engine
@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from server.engine.engine import Engine

    eng = Engine(EngineConfig(model=tiny_llama_dir, scheduler=SchedulerConfig(max_model_len=256)))
    eng.start()
    yield eng
    eng.shutdown()


async def _never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


# ------------------------------------------------------------------------------ defect 5
def test_text_too_long_for_the_context_is_refused_before_tokenizing(engine, monkeypatch):
    serving = OpenAIServing(engine, ServerConfig(warmup=False))
    tokenized = []
    monkeypatch.setattr(engine, "tokenize", lambda text: tokenized.append(len(text)) or [1])
    monkeypatch.setattr(engine, "chat_prompt", lambda *a, **k: tokenized.append("chat") or [1])
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: tokenized.append("encode") or [1])
    limit = serving.max_prompt_chars
    assert limit == 256 * max_chars_per_token(engine.tokenizer)
    text = "x" * (limit + 1)
    calls = (lambda: serving.completions(_body(prompt=text), _never_disconnects),
             lambda: serving.completions(_body(prompt=["Hi", text]), _never_disconnects),
             lambda: serving.chat(_body(messages=[{"role": "user", "content": text}]), _never_disconnects),
             lambda: serving.tokenize(_body(prompt=text)))
    try:
        for call in calls:
            with pytest.raises(APIError) as refused:
                asyncio.run(call())
            assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")
        assert tokenized == []
    finally:
        serving.close()


def test_the_character_bound_never_refuses_text_that_fits(engine):
    """The bound is an upper bound: no text has more characters than its tokens times it."""
    from tests.conftest import CORPUS

    tok = engine.tokenizer
    per_token = max_chars_per_token(tok)
    for text in [*set(CORPUS), "".join(set(CORPUS)), " " * 300, "日本語😀" * 50, "\x00\x01\n\t" * 40]:
        assert len(text) <= len(tok.encode(text, add_special_tokens=False)) * per_token


# ------------------------------------------------------------------------------ defect 12
def _gated_tokenizer(engine, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """engine.tokenize waits for `release` after setting `entered`."""
    entered, release = threading.Event(), threading.Event()
    real = engine.tokenize

    def tokenize(text: str) -> list[int]:
        entered.set()
        release.wait(30)
        return real(text)

    monkeypatch.setattr(engine, "tokenize", tokenize)
    return entered, release


def test_request_admitted_before_sigterm_finishes_while_being_tokenized(engine, monkeypatch):
    serving = OpenAIServing(engine, ServerConfig(warmup=False))
    entered, release = _gated_tokenizer(engine, monkeypatch)

    async def scenario():
        first = asyncio.ensure_future(serving.completions(_body(prompt="Hello", max_tokens=3, ignore_eos=True),
                                                           _never_disconnects))
        assert await asyncio.to_thread(entered.wait, 30)
        drain = asyncio.ensure_future(serving.drain(30))
        await asyncio.sleep(0)
        with pytest.raises(APIError) as refused:  # new requests are refused from now on
            await serving.completions(_body(prompt="Hi"), _never_disconnects)
        assert (refused.value.status, refused.value.code) == (503, "server_shutting_down")
        release.set()
        kind, payload, _ = await first
        await asyncio.wait_for(drain, 30)
        return kind, json.loads(payload)

    try:
        kind, out = asyncio.run(scenario())
    finally:
        serving.close()
    assert kind == "json" and out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["finish_reason"] == "length"


def test_request_still_tokenized_when_the_drain_times_out_is_refused(engine, monkeypatch):
    serving = OpenAIServing(engine, ServerConfig(warmup=False))
    entered, release = _gated_tokenizer(engine, monkeypatch)

    async def scenario():
        first = asyncio.ensure_future(serving.completions(_body(prompt="Hello", max_tokens=3), _never_disconnects))
        assert await asyncio.to_thread(entered.wait, 30)
        await serving.drain(0.05, grace=0.05)
        release.set()
        with pytest.raises(APIError) as refused:
            await first
        return refused.value

    try:
        err = asyncio.run(scenario())
    finally:
        serving.close()
    assert (err.status, err.code) == (503, "server_shutting_down")
    assert serving.state.in_flight == 0 and not serving.state.live


# ------------------------------------------------------------------------------ defect 6
def test_integers_in_queries_are_ascii_digits(server):
    assert [ascii_uint(s) for s in ("0", "20", "²", "١٢", "", "-1", "1" * 19, "+5", " 5")] == \
        [0, 20, None, None, None, None, None, None, None]
    for raw in ("²", "١", "1.5", "-1", "101"):
        r = httpx.get(server.url("/v1/telemetry"), params={"recent": raw})
        err = assert_error_shape(r, 400)
        assert (err["param"], err["code"]) == ("recent", "invalid_value")
    assert httpx.get(server.url("/v1/telemetry"), params={"recent": "3"}).status_code == 200


# ------------------------------------------------------------------------------ defect 7
def test_completions_max_tokens_null_means_16_and_chat_the_rest_of_the_window(server):
    r = httpx.post(server.url(COMP), json={"prompt": "Hello", "max_tokens": None, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    r = httpx.post(server.url(CHAT), json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": None,
                                           "max_completion_tokens": None, "ignore_eos": True}, timeout=120)
    usage = r.json()["usage"]
    assert r.status_code == 200 and usage["prompt_tokens"] + usage["completion_tokens"] == 512  # the whole window


# ------------------------------------------------------------------------------ defect 8
def test_telemetry_request_with_non_finite_means_is_null():
    engine = FakeEngine()
    feed = TelemetryFeed(engine, model="fake")
    nan = float("nan")
    grid = [[0.5, nan, math.inf, 0.25]] * 3
    head = RequestHeadTelemetry(layers=3, heads=4, kv_heads=2, rows=1, entropy=grid, normalized_entropy=grid,
                                max_weight=grid, sink_mass=grid, lookback_distance=grid)
    stats = RequestStats(num_prompt_tokens=1, num_output_tokens=1, num_cached_tokens=0, num_preemptions=0,
                         queue_time=0.0, time_to_first_token=0.1, prefill_time=0.1, decode_time=None, e2e_latency=0.1)
    engine.step(finished=[FinishedRequest("req-nan", FinishReason.LENGTH, stats, head)])
    app = FastAPI()
    app.include_router(dashboard_router(feed))
    r = TestClient(app, raise_server_exceptions=False).get("/v1/telemetry/requests/req-nan")
    assert r.status_code == 200, r.text
    out = r.json()["head_telemetry"]
    assert all(out[name][0] == [0.5, None, None, 0.25] for name in ("entropy", "lookback_distance"))


# ------------------------------------------------------------------------------ defect 3 (API half)
def test_one_request_may_not_ask_for_more_than_max_request_seqs(server):
    """The shared server runs 16 sequences; one request may ask for 8 (n x prompts)."""
    for body, param in (({"prompt": "Hi", "n": 9}, "n"), ({"prompt": ["a", "b", "c"], "n": 3}, "n"),
                        ({"prompt": ["a"] * 9}, "prompt")):
        r = httpx.post(server.url(COMP), json={**body, "max_tokens": 1})
        err = assert_error_shape(r, 400)
        assert err["param"] == param and "at most 8" in err["message"], err
    r = httpx.post(server.url(CHAT), json={"messages": [{"role": "user", "content": "Hi"}], "n": 9, "max_tokens": 1})
    assert assert_error_shape(r, 400)["param"] == "n"
    for body in ({"prompt": "Hi", "n": 8}, {"prompt": ["a", "b"], "n": 4}):
        r = httpx.post(server.url(COMP), json={**body, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_max_request_seqs_is_checked():
    with pytest.raises(ValueError):
        ServerConfig(max_request_seqs=0)
    with pytest.raises(ValueError):
        ServerConfig(stream_buffer_events=0)


# ------------------------------------------------------------------------------ defect 11
def _raw_stream(port: int, body: dict) -> socket.socket:
    """A streaming POST on a socket with a small receive buffer, nothing read yet."""
    data = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def _read_to_end(sock: socket.socket, limit: int = 200_000_000) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def test_a_stalled_stream_is_aborted_counted_and_ended(isolation_server):
    """A client that stops reading: past 64 unread events its request is aborted, its KV blocks
    are freed and the stall counted; when it reads again, its stream ends with an error event."""
    srv = isolation_server
    wait_idle(srv, 10)
    before = metric(srv, "headwise_requests_rejected_total", reason="slow_consumer")
    sock = _raw_stream(srv.port, {"messages": [{"role": "user", "content": "Hi"}], "n": 8, "max_tokens": 2000,
                                  "ignore_eos": True, "stream": True, "logprobs": True, "top_logprobs": 20,
                                  "temperature": 1.0})
    try:
        deadline = time.monotonic() + 90
        while metric(srv, "headwise_requests_rejected_total", reason="slow_consumer") == before:
            assert time.monotonic() < deadline, "the stall was never noticed"
            time.sleep(0.1)
        wait_idle(srv, 5)  # aborted: nothing runs, every KV block is free, while the client still reads nothing
        assert metric(srv, "headwise_requests_rejected_total", reason="slow_consumer") == before + 1
        raw = _read_to_end(sock)
    finally:
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "slow_consumer" and err["type"] == "server_error"
    tokens = sum(len(json.loads(e)["choices"][0]["logprobs"]["content"]) for e in events[:-2]
                 if json.loads(e)["choices"] and json.loads(e)["choices"][0]["logprobs"])
    assert 0 < tokens < 8 * 2000  # stopped early
    r = httpx.post(srv.url(COMP), json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


# ------------------------------------------------------------------------------ start-up
def test_the_port_answers_while_the_model_loads(start_server):
    """`headwise serve` binds first: /health 200 while /ready and the API answer 503 with
    Retry-After, until the model is loaded; then everything answers."""
    srv = start_server("--max-model-len", "256", name="startup", wait=False)
    seen = []  # (health, ready, models, models' error code, retry-after) as they change
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=5) as c:
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                health, ready = c.get(srv.url("/health")), c.get(srv.url("/ready"))
                models = c.get(srv.url("/v1/models"))
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            code = models.json()["error"]["code"] if models.status_code != 200 else None
            state = (health.status_code, ready.status_code, models.status_code, code, models.headers.get("retry-after"))
            if not seen or seen[-1] != state:
                seen.append(state)
                if models.status_code == 503:
                    assert_error_shape(models, 503)
                    assert_error_shape(ready, 503)
            if ready.status_code == 200:
                break
            time.sleep(0.02)
    assert seen and seen[0] == (200, 503, 503, "model_loading", "1"), (seen, srv.log())
    assert seen[-1][:3] == (200, 200, 200), (seen, srv.log())
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0


def test_a_model_that_cannot_load_stops_the_server_with_its_error(tiny_llama_dir, capsys):
    """A load that fails once the port is bound stops the server and exits 2 with the message."""
    from server.cli import main

    assert main(["serve", "--port", "0", "--model", tiny_llama_dir, "--attention-backend", "flash9"]) == 2
    err = capsys.readouterr().err
    assert "headwise: error: unknown --attention-backend 'flash9'" in err and "Traceback" not in err
