"""The client's parts without a server: arrivals, prompts, SSE chunks, request bodies, the
/metrics reader, flags, report and table."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from loadtests import cli, dataset, server_metrics, table
from loadtests.driver import chunk_tokens
from loadtests.records import Chunk, LoadPoint, Prompt, RequestRecord, RunRecord
from loadtests.report import PointResult, report_json
from loadtests.schedule import arrival_offsets
from loadtests.stats import Histogram, summarize
from loadtests.target import Target, detect_kind, request_body


# ----------------------------------------------------------------------------- arrivals
def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = arrival_offsets(4000, 8.0, seed=3)
    assert a == arrival_offsets(4000, 8.0, seed=3) and a != arrival_offsets(4000, 8.0, seed=4)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8.0, rel=0.08)  # exponential: std = mean


def test_unbounded_rate_sends_everything_at_once():
    assert arrival_offsets(3, None) == [0.0, 0.0, 0.0] == arrival_offsets(3, math.inf)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


# ----------------------------------------------------------------------------- prompts
class WordCounter:
    """A stand-in tokenizer: one token per 3 characters, rounded up, plus a BOS."""

    def count(self, text: str) -> int:
        return 1 + math.ceil(len(text) / 3)


def test_synthetic_prompts_have_exact_lengths_and_distinct_prefixes():
    counter = WordCounter()
    prompts = dataset.synthetic(20, 50, 7, counter, seed=1)
    assert [counter.count(p.text) for p in prompts] == [50] * 20
    assert len({p.text.split()[0] for p in prompts}) == 20  # unique tags: no shared cached prefix
    assert all(p.max_tokens == 7 and p.input_tokens == 50 and p.messages is None for p in prompts)
    chat = dataset.synthetic(2, 50, 7, counter, seed=1, chat=True)
    assert chat[0].text is None and chat[0].messages[0]["content"] == prompts[0].text


def test_synthetic_prompts_with_a_real_tokenizer(tiny_llama_dir):
    from loadtests.tokens import load_local

    counter = load_local(tiny_llama_dir)
    for p in dataset.synthetic(10, 40, 4, counter, seed=2):
        assert counter.count(p.text) == 40


def test_impossible_length_is_a_clear_error():
    with pytest.raises(dataset.DatasetError, match="exactly 1 tokens|--input-len"):
        dataset.synthetic(1, 1, 4, WordCounter())


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 3}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    got = dataset.from_jsonl(str(path), 5, 9, chat=True)
    assert [p.max_tokens for p in got] == [3, 9, 3, 9, 3]
    assert got[0].messages == ({"role": "user", "content": "hello"},)
    with pytest.raises(dataset.DatasetError, match="need --endpoint chat"):
        dataset.from_jsonl(str(path), 5, 9)
    path.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(dataset.DatasetError, match=":2: not JSON"):
        dataset.from_jsonl(str(path), 5, 9)
    with pytest.raises(dataset.DatasetError, match="cannot read"):
        dataset.from_jsonl(str(tmp_path / "missing.jsonl"), 1, 1)


# ----------------------------------------------------------------------------- wire format
def test_chunk_tokens_prefers_token_ids_and_counts_text_otherwise():
    assert chunk_tokens({"choices": [{"text": "ab", "token_ids": [1, 2, 3]}]}, chat=False) == (3, None)
    assert chunk_tokens({"choices": [{"text": "a", "finish_reason": "length"}]}, chat=False) == (1, "length")
    assert chunk_tokens({"choices": [{"text": ""}]}, chat=False) == (0, None)
    assert chunk_tokens({"choices": [{"delta": {"role": "assistant"}}]}, chat=True) == (0, None)
    assert chunk_tokens({"choices": [{"delta": {"content": "x"}}]}, chat=True) == (1, None)
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 4}}, chat=False) == (0, None)


def test_a_token_with_a_unicode_line_separator_does_not_break_its_sse_chunk():
    """U+2028 and U+0085 are plain characters in an SSE data line (the server writes non-ASCII as
    is); only a line feed ends the line."""
    import asyncio

    import httpx

    from loadtests.driver import _InFlight, send

    chunks = [{"choices": [{"index": 0, "text": t, "token_ids": [i], "finish_reason": None}]}
              for i, t in enumerate(("a\u2028b", "c\x85d", "e"))]
    body = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    body += b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\ndata: [DONE]\n\n'

    async def go():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await send(client, Target(base_url="http://test", model=None), Prompt("hi", None, 3),
                              _InFlight(send_time=0.0))

    record = asyncio.run(go())
    assert record.ok and record.error is None and record.output_tokens == 3 and len(record.chunks) == 3


def test_request_body_per_server_kind():
    prompt = Prompt(text="hi", messages=None, max_tokens=5)
    hw = request_body(Target("http://x", "m", kind="headwise"), prompt)
    assert hw["stream"] and hw["stream_options"] == {"include_usage": True}
    assert hw["ignore_eos"] and hw["return_token_ids"] and hw["prompt"] == "hi" and hw["max_tokens"] == 5
    lc = request_body(Target("http://x", None, kind="llamacpp", extra_body={"cache_prompt": False}), prompt)
    assert lc["ignore_eos"] and "return_token_ids" not in lc and "model" not in lc and lc["cache_prompt"] is False
    oa = request_body(Target("http://x", "m", kind="openai", endpoint="chat"), prompt)
    assert "ignore_eos" not in oa and oa["messages"] == [{"role": "user", "content": "hi"}]
    assert Target("http://x/", None, endpoint="chat").url == "http://x/v1/chat/completions"


def test_detect_kind():
    assert detect_kind("# TYPE headwise_num_requests_running gauge", False) == "headwise"
    assert detect_kind("vllm:num_requests_running 0", False) == "vllm"
    assert detect_kind(None, True) == "llamacpp"
    assert detect_kind("", False) == "openai"


# ----------------------------------------------------------------------------- /metrics
def metrics_text(ttft_buckets, gen, ok_length, ok_stop=None):
    lines = ["# TYPE headwise_time_to_first_token_seconds histogram"]
    for le, v in zip(("0.1", "0.5", "+Inf"), ttft_buckets):
        lines.append(f'headwise_time_to_first_token_seconds_bucket{{le="{le}",model="m"}} {v}')
    lines += [f'headwise_time_to_first_token_seconds_count{{model="m"}} {ttft_buckets[-1]}',
              f'headwise_time_to_first_token_seconds_sum{{model="m"}} {0.2 * ttft_buckets[-1]}',
              "# TYPE headwise_generation_tokens counter", f'headwise_generation_tokens_total{{model="m"}} {gen}',
              "# TYPE headwise_request_success counter",
              f'headwise_request_success_total{{finished_reason="length",model="m"}} {ok_length}']
    if ok_stop is not None:
        lines.append(f'headwise_request_success_total{{finished_reason="stop",model="m"}} {ok_stop}')
    lines += ["# TYPE headwise_num_requests_running gauge", 'headwise_num_requests_running{model="m"} 0']
    return "\n".join(lines) + "\n"


def test_server_view_is_the_difference_of_two_scrapes():
    before = server_metrics.parse(metrics_text((1, 2, 2), gen=10, ok_length=2))
    after = server_metrics.parse(metrics_text((2, 6, 7), gen=45, ok_length=6, ok_stop=1))
    view = server_metrics.server_view(before, after)
    h = view.histograms["ttft"]
    assert h == Histogram(bounds=(0.1, 0.5), cumulative=(1, 4, 5), sum=pytest.approx(1.0), count=5)
    assert view.counters["generation_tokens"] == 35
    assert view.counters["request_success"] == 5
    assert view.success_by_reason == {"length": 4, "stop": 1}
    assert view.histograms["itl"] is None and view.counters["prompt_tokens"] is None  # not exported: n/a
    assert view.gauges_after["running"] == 0


# ----------------------------------------------------------------------------- flags
def test_load_points():
    ns = cli.build_parser().parse_args(["--concurrency", "1,4"])
    assert cli.load_points(ns) == [LoadPoint(1, None), LoadPoint(4, None)]
    ns = cli.build_parser().parse_args(["--request-rate", "0.5,inf", "--concurrency", "8"])
    assert cli.load_points(ns) == [LoadPoint(8, 0.5), LoadPoint(8, None)]
    ns = cli.build_parser().parse_args([])
    assert cli.load_points(ns) == [LoadPoint(1, None)]
    ns = cli.build_parser().parse_args(["--request-rate", "1,2", "--concurrency", "1,2"])
    with pytest.raises(cli.UsageError):
        cli.load_points(ns)


def test_goodput_flags():
    slo = cli.parse_slo(["ttft:500", "tpot:50", "e2el:10000"])
    assert (slo.ttft, slo.tpot, slo.e2e) == (0.5, 0.05, 10.0)
    with pytest.raises(cli.UsageError, match="ttft, tpot or e2e"):
        cli.parse_slo(["itl:5"])
    with pytest.raises(cli.UsageError, match="METRIC:MILLISECONDS"):
        cli.parse_slo(["ttft:fast"])


@pytest.mark.parametrize("flags", [["--concurrency", "0"], ["--concurrency", "x"], ["--num-requests", "-1"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(flags)
    assert e.value.code == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--concurrency" in out and "--request-rate" in out and "--goodput" in out and "Exit status" in out


def test_unreachable_server_is_a_clear_error(capsys):
    from tests.api.conftest import free_port

    code = cli.main(["--base-url", f"http://127.0.0.1:{free_port()}", "--no-progress"])
    assert code == 2
    assert "cannot reach" in capsys.readouterr().err


def test_histogram_bounds_are_the_servers():
    from server import latency

    b = cli.histogram_bounds()
    assert b["ttft"] == latency.TTFT_BUCKETS and b["itl"] == b["tpot"] == latency.TOKEN_LATENCY_BUCKETS
    assert b["e2e"] == latency.REQUEST_LATENCY_BUCKETS


# ----------------------------------------------------------------------------- report and table
def test_report_and_table_without_server_view():
    r = RequestRecord(True, 0.0, 0.5, (Chunk(0.25, 1), Chunk(0.5, 1)), 2, 4, "length")
    bad = RequestRecord(False, 0.0, 0.1, (), 0, None, error="HTTP 503: busy")
    run = RunRecord(LoadPoint(1, None), (r, bad), 0.0, 1.0, False)
    result = PointResult(run, summarize(run, cli.histogram_bounds()), None)
    rep = report_json([result], {"tool": "t"})
    json.dumps(rep)  # serializable
    point = rep["runs"][0]
    assert point["requests"] == {"sent": 2, "completed": 1, "failed": 1, "stopped_early": False,
                                 "errors": {"HTTP 503: busy": 1}}
    assert point["latency_ms"]["ttft"]["median"] == 250.0 and point["latency_ms"]["itl"]["p99"] == 250.0
    assert point["histograms"]["itl"]["count"] == 1 and point["server"] is None
    assert point["per_request"][0]["tpot_ms"] == 250.0 and point["per_request"][1]["ok"] is False
    text = table.point_table(result)
    assert "TTFT" in text and "n/a" in text and "HTTP 503: busy" in text
    assert "concurrency 1" in table.sweep_table([result, result])
