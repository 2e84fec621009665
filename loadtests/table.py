"""The readable tables: per load point, the client's numbers with the server's own beside them
(headwise's or vLLM's /metrics) and its per-head view where it exports one; for a sweep, one
summary line per point."""

from __future__ import annotations

from collections.abc import Sequence

from loadtests.report import PointResult
from loadtests.server_metrics import HeadView
from loadtests.stats import METRICS, Histogram, Slo, histogram_quantile

NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E", "queue": "queue", "prefill": "prefill",
         "decode": "decode"}


def _f(x: float | None, scale: float = 1000.0, width: int = 8, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x * scale:>{width}.{digits}f}"


def _n(x: float | None, width: int = 7) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.0f}"


def _bucket_cells(h: Histogram | None) -> str:
    return "".join(_f(histogram_quantile(q, h) if h is not None else None) for q in (0.5, 0.9, 0.99))


def point_table(result: PointResult, slo: Slo = Slo()) -> str:
    s, run, view = result.summary, result.run, result.server
    lines = [f"== {run.point.label}: {s.completed}/{len(run.requests)} requests completed in {s.duration:.2f} s"
             + (" (stopped at the time limit)" if run.stopped_early else "") + " =="]
    lines.append(f"throughput  {s.request_throughput:.3f} req/s   output {s.output_throughput:.1f} tok/s   "
                 f"total {s.total_token_throughput:.1f} tok/s   peak output {s.peak_output_throughput:.0f} tok/s")
    good = "" if s.goodput is None else f"   goodput {s.goodput:.3f} req/s ({_slo_text(slo)})"
    lines.append(f"peak concurrency {s.peak_concurrency}{good}")
    counters = view.counters if view else {}
    lines.append(f"tokens      input {s.total_input_tokens} (server {_n(counters.get('prompt_tokens'), 0)})   "
                 f"output {s.total_output_tokens} (server {_n(counters.get('generation_tokens'), 0)})   "
                 f"requests ok {s.completed} (server {_n(counters.get('request_success'), 0)})")
    lines.append("")
    lines.append(f"{'latency ms':<10}|{'client':>8}{'mean':>8}{'median':>8}{'p90':>8}{'p99':>8}"
                 f" | {'buckets':>7}{'p50':>8}{'p90':>8}{'p99':>8}"
                 f" | {'server':>7}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}")
    for key in METRICS + ("queue", "prefill", "decode"):
        d = s.latency.get(key)
        h = view.histograms.get(key) if view else None
        client = (f"{d.count:>8}{_f(d.mean)}{_f(d.median)}{_f(d.percentiles.get(90.0))}{_f(d.percentiles.get(99.0))}"
                  if d is not None else f"{'-':>8}" + f"{'':>32}")
        buckets = f"{'':>7}" + (_bucket_cells(s.histograms[key]) if key in s.histograms else f"{'':>24}")
        server = (f"{h.count:>7}{_f(h.sum / h.count if h.count else None)}{_bucket_cells(h)}" if h is not None
                  else f"{'n/a':>7}{'':>32}")
        lines.append(f"{NAMES[key]:<10}|{client} | {buckets} | {server}")
    lines.append("(client: exact over its observations; buckets: the client's observations binned like the "
                 "server's histograms, estimated as Prometheus does; server: /metrics after minus before)")
    if view is not None and view.heads is not None:
        lines.extend(head_lines(view.heads))
    if run.requests and s.failed:
        errors = sorted({r.error for r in run.requests if r.error})
        lines.append(f"failed: {s.failed}; " + "; ".join(errors[:3]))
    return "\n".join(lines)


STAT_LABELS = (("entropy", "entropy", "nats"), ("normalized_entropy", "normalized entropy", ""),
               ("max_weight", "max weight", ""), ("sink_mass", "sink mass", ""),
               ("lookback_distance", "look-back", ""))


def head_lines(heads: HeadView) -> list[str]:
    """The per-head view: rows, row-weighted means over all heads, the extreme heads by
    normalized entropy, and the vLLM plugin's health where it reports one."""
    n_heads = heads.layers * heads.heads
    total = heads.total_rows
    lines = ["", f"per-head attention (server /metrics, this run): {heads.layers} layers x {heads.heads} heads, "
                 f"{total} rows ({total / n_heads:.1f} per head)"]
    if heads.telemetry_up is not None and heads.telemetry_up < 1:
        lines.append("  headwise_telemetry_up 0: the vLLM plugin computes no per-head statistics on some rank "
                     "(the server's log says why)")
    if total == 0:
        lines.append("  no telemetry rows in this run (a sampled server may have skipped every step)")
        return lines
    means = []
    for stat, label, unit in STAT_LABELS:
        v = heads.overall(stat)
        means.append(f"{label} {'n/a' if v is None else f'{v:.3f}'}{' ' + unit if unit and v is not None else ''}")
    lines.append("  mean " + "   ".join(means))
    low, high = heads.extremes("normalized_entropy")
    cell = lambda l, h, m: f"L{l}.H{h} {m:.3f}"  # noqa: E731
    lines.append("  normalized entropy, lowest: " + ", ".join(cell(*c) for c in low)
                 + "; highest: " + ", ".join(cell(*c) for c in high))
    return lines


def sweep_table(results: Sequence[PointResult]) -> str:
    head = (f"{'load point':<28}{'ok':>5}{'req/s':>8}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'ITL p50':>9}{'TPOT mean':>10}{'E2E p99':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        s = r.summary
        lat = s.latency
        rows.append(f"{r.run.point.label:<28}{s.completed:>5}{s.request_throughput:>8.3f}{s.output_throughput:>10.1f}"
                    f"{_f(lat['ttft'].median, width=10)}{_f(lat['ttft'].percentiles.get(99.0), width=10)}"
                    f"{_f(lat['itl'].median, width=9)}{_f(lat['tpot'].mean, width=10)}"
                    f"{_f(lat['e2e'].percentiles.get(99.0), width=9)}")
    rows.append("(latencies in ms)")
    return "\n".join(rows)


def _slo_text(slo: Slo) -> str:
    parts = [f"{name}<={v * 1000:g}ms" for name, v in (("ttft", slo.ttft), ("tpot", slo.tpot), ("e2e", slo.e2e))
             if v is not None]
    return ", ".join(parts)
