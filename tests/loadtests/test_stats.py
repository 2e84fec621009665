"""The statistics against values computed by hand (and numpy's percentile, which vLLM uses)."""

from __future__ import annotations

import math
import random

import pytest

from loadtests.records import Chunk, LoadPoint, RequestRecord, RunRecord
from loadtests.stats import (Histogram, Slo, distribution, histogram, histogram_quantile, peak_concurrency,
                             peak_window_rate, request_metrics, summarize, token_times)
from server.latency import percentile

BOUNDS = {"ttft": (0.1, 0.5, 1.0), "tpot": (0.05, 0.1, 0.2), "itl": (0.05, 0.1, 0.2), "e2e": (0.5, 1.0, 2.0)}


def rec(send, chunks, end, out=None, ok=True, prompt=10):
    chunks = tuple(Chunk(t, n) for t, n in chunks)
    return RequestRecord(ok=ok, send_time=send, end_time=end, chunks=chunks,
                         output_tokens=sum(c.tokens for c in chunks) if out is None else out, prompt_tokens=prompt)


def test_percentile_interpolates_between_ranks():
    v = sorted([4.0, 1.0, 3.0, 2.0])  # the caller sorts (server/latency.py)
    assert percentile(v, 0) == 1.0
    assert percentile(v, 100) == 4.0
    assert percentile(v, 50) == pytest.approx(2.5)   # rank 1.5
    assert percentile(v, 90) == pytest.approx(3.7)   # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(v, 99) == pytest.approx(3.97)  # rank 2.97
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    values = sorted(rng.expovariate(3.0) for _ in range(257))
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_rejects_q_outside_0_100():
    for q in (-1, 100.5):
        with pytest.raises(ValueError):
            percentile([1.0, 2.0], q)


def test_distribution_sorts_before_taking_percentiles():
    d = distribution([10.0, 3.0, 1.0, 4.0, 2.0])
    assert d.percentiles == distribution([1.0, 2.0, 3.0, 4.0, 10.0]).percentiles
    assert d.median == 3.0 and d.min == 1.0 and d.max == 10.0


def test_one_percentile_for_client_and_server():
    from loadtests import stats
    from server import latency
    from server.api import telemetry_feed

    assert stats.percentile is latency.percentile and telemetry_feed.percentile is latency.percentile


def test_distribution_by_hand():
    d = distribution([1.0, 2.0, 3.0, 4.0, 10.0])
    assert d.count == 5 and d.mean == pytest.approx(4.0) and d.min == 1.0 and d.max == 10.0
    assert d.std == pytest.approx(math.sqrt((9 + 4 + 1 + 0 + 36) / 5))  # population std, as numpy
    assert d.median == 3.0
    assert d.percentiles[90.0] == pytest.approx(7.6)  # rank 3.6: 4 + 0.6 * 6
    empty = distribution([])
    assert empty.count == 0 and empty.mean is None and empty.median is None


def test_request_metrics_by_hand():
    # sent at 0; tokens at 0.5, 0.7, then a chunk of two at 1.0 (spread: 0.85, 1.0); stream ends 1.1
    m = request_metrics(rec(0.0, [(0.5, 1), (0.7, 1), (1.0, 2)], end=1.1))
    assert m.ttft == pytest.approx(0.5)
    assert m.e2e == pytest.approx(1.1)
    assert m.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert m.itls == pytest.approx((0.2, 0.15, 0.15))
    assert sum(m.itls) == pytest.approx(1.0 - 0.5)  # last token - first token
    assert m.output_tokens == 4 and m.prompt_tokens == 10


def test_token_times_first_chunk_with_several_tokens():
    assert token_times([Chunk(1.0, 3), Chunk(1.6, 2), Chunk(2.0, 0)]) == pytest.approx([1.0, 1.0, 1.0, 1.3, 1.6])


def test_request_metrics_single_token_and_failures():
    one = request_metrics(rec(0.0, [(0.3, 1)], end=0.4))
    assert one.tpot is None and one.itls == () and one.ttft == pytest.approx(0.3)
    assert request_metrics(rec(0.0, [(0.3, 1)], end=0.4, ok=False)) is None
    assert request_metrics(rec(0.0, [], end=0.4)) is None


def test_usage_count_overrides_counted_tokens_for_tpot():
    # two text chunks seen, but the server's usage says 5 tokens (e.g. empty-text tokens)
    m = request_metrics(rec(0.0, [(0.2, 1), (1.0, 1)], end=1.0, out=5))
    assert m.tpot == pytest.approx(0.8 / 4)
    assert m.itls == pytest.approx((0.8,))


def test_histogram_is_prometheus_cumulative_with_inclusive_bounds():
    h = histogram([0.05, 0.1, 0.3, 0.5, 0.7, 5.0], (0.1, 0.5, 1.0))
    assert h.bounds == (0.1, 0.5, 1.0)
    assert h.cumulative == (2, 4, 5, 6)  # <= 0.1: 0.05, 0.1; <= 0.5: +0.3, 0.5; <= 1: +0.7; +Inf: +5
    assert h.count == 6 and h.sum == pytest.approx(6.65)


def test_histogram_quantile_like_prometheus():
    h = Histogram(bounds=(1.0, 2.0, 4.0), cumulative=(2, 6, 8, 10), sum=0.0, count=10)
    assert histogram_quantile(0.5, h) == pytest.approx(1.75)  # rank 5 in (1, 2]: 1 + (5 - 2) / 4
    assert histogram_quantile(0.1, h) == pytest.approx(0.5)   # rank 1 in (0, 1]: 0 + 1 / 2
    assert histogram_quantile(0.7, h) == pytest.approx(3.0)   # rank 7 in (2, 4]: 2 + 2 * (7 - 6) / 2
    assert histogram_quantile(0.95, h) == 4.0                 # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, Histogram((1.0,), (0, 0), 0.0, 0)) is None


def test_peak_concurrency():
    assert peak_concurrency([(0, 2), (1, 3), (2, 4)]) == 2  # touching intervals do not overlap
    assert peak_concurrency([(0, 10), (1, 2), (1.5, 3), (1.8, 1.9)]) == 4
    assert peak_concurrency([]) == 0


def test_peak_window_rate():
    assert peak_window_rate([0.0, 0.2, 0.4, 0.99, 1.0, 3.0]) == 4.0  # [0, 1) holds 4; 1.0 starts a new window
    assert peak_window_rate([0.0, 0.1, 0.2], window=0.5) == 6.0
    assert peak_window_rate([]) == 0.0


def test_summarize_by_hand():
    # dyadic times, so that bucket edges compare exactly
    requests = (
        rec(0.0, [(0.25, 1), (0.375, 1), (0.5, 1)], end=0.5, prompt=8),    # ttft .25, itl .125 .125, tpot .125, e2e .5
        rec(0.5, [(1.125, 1), (1.375, 1), (1.625, 1)], end=1.75, prompt=8),  # ttft .625, itl .25 .25, tpot .3125, e2e 1.25
        rec(1.0, [(1.25, 1)], end=1.25, ok=False, prompt=None),             # failed
    )
    run = RunRecord(LoadPoint(2, None), requests, start_time=0.0, end_time=2.0, stopped_early=False)
    s = summarize(run, BOUNDS, Slo(ttft=0.5, tpot=0.2))
    assert (s.completed, s.failed) == (2, 1)
    assert s.duration == 2.0
    assert s.total_input_tokens == 16 and s.total_output_tokens == 6
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.total_token_throughput == pytest.approx(11.0)
    assert s.goodput == pytest.approx(0.5)  # only the first meets ttft <= .5 and tpot <= .2
    assert s.peak_concurrency == 2  # [0, .5] touches [.5, 1.75]; [1, 1.25] overlaps the latter
    assert s.peak_output_throughput == 4.0  # [.25, 1.25) holds .25 .375 .5 1.125 (failed requests not counted)
    assert s.latency["ttft"].mean == pytest.approx(0.4375)
    assert s.latency["tpot"].median == pytest.approx((0.125 + 0.3125) / 2)
    assert s.latency["e2e"].percentiles[99.0] == pytest.approx(0.5 + 0.99 * 0.75)
    assert s.latency["itl"].count == 4 and s.latency["itl"].mean == pytest.approx(0.1875)
    assert s.histograms["ttft"].cumulative == (0, 1, 2, 2)
    assert s.histograms["itl"].cumulative == (0, 0, 2, 4)  # .125 .125 <= .2; .25 .25 in +Inf
    assert s.histograms["e2e"].cumulative == (1, 1, 2, 2)  # .5 <= .5 (upper bounds are inclusive)
    assert s.histograms["e2e"].sum == pytest.approx(1.75)


def test_goodput_absent_without_slo_and_tpot_slo_ignores_single_token_requests():
    run = RunRecord(LoadPoint(1, None), (rec(0.0, [(0.1, 1)], end=0.1),), 0.0, 1.0, False)
    assert summarize(run, BOUNDS).goodput is None
    assert summarize(run, BOUNDS, Slo(tpot=0.001)).goodput == pytest.approx(1.0)
