"""The JSON report: one object per load point, client and server views side by side.
Latencies are in milliseconds except histogram boundaries and sums (seconds, as Prometheus)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from loadtests.records import RunRecord
from loadtests.server_metrics import HeadView, ServerView
from loadtests.stats import METRICS, Distribution, Histogram, RunSummary, histogram_quantile, request_metrics

QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class PointResult:
    run: RunRecord
    summary: RunSummary
    server: ServerView | None  # None when the target's /metrics is not read (not headwise or vLLM)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


def distribution_json(d: Distribution) -> dict[str, Any]:
    out = {"count": d.count, "mean": _ms(d.mean), "median": _ms(d.median), "std": _ms(d.std),
           "min": _ms(d.min), "max": _ms(d.max)}
    out.update({f"p{q:g}": _ms(v) for q, v in d.percentiles.items()})
    return out


def estimated_ms(h: Histogram) -> dict[str, float | None]:
    """Prometheus-style quantile estimates from buckets (what a dashboard would show)."""
    return {f"p{q * 100:g}": _ms(histogram_quantile(q, h)) for q in QUANTILES}


def histogram_json(h: Histogram | None) -> dict[str, Any] | None:
    if h is None:
        return None
    return {"bounds_s": list(h.bounds), "cumulative": list(h.cumulative), "sum_s": h.sum, "count": h.count,
            "mean_ms": _ms(h.sum / h.count) if h.count else None, "estimated_ms": estimated_ms(h)}


def server_json(view: ServerView | None) -> dict[str, Any] | None:
    if view is None:
        return None
    return {"histograms": {k: histogram_json(h) for k, h in view.histograms.items()},
            "counters": view.counters, "success_by_reason": view.success_by_reason,
            "gauges_after": view.gauges_after, "heads": heads_json(view.heads)}


def heads_json(heads: HeadView | None) -> dict[str, Any] | None:
    """The run's per-(layer, head) rows and means ([layer][head], null where a head had no rows)."""
    if heads is None:
        return None
    return {"layers": heads.layers, "heads": heads.heads, "telemetry_up": heads.telemetry_up,
            "total_rows": heads.total_rows, "rows": heads.rows,
            "overall_means": {k: heads.overall(k) for k in heads.means}, "means": heads.means}


def per_request_json(run: RunRecord) -> list[dict[str, Any]]:
    rows = []
    for r in run.requests:
        m = request_metrics(r)
        rows.append({"ok": r.ok and m is not None, "error": r.error, "finish_reason": r.finish_reason,
                     "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                     "ttft_ms": _ms(m.ttft) if m else None, "tpot_ms": _ms(m.tpot) if m else None,
                     "e2e_ms": _ms(m.e2e) if m else None, "chunks": len(r.chunks)})
    return rows


def point_json(result: PointResult, *, include_requests: bool = True) -> dict[str, Any]:
    s, run = result.summary, result.run
    errors = Counter(r.error for r in run.requests if r.error)
    out = {
        "point": {"concurrency": run.point.concurrency, "request_rate": run.point.request_rate},
        "label": run.point.label,
        "requests": {"sent": len(run.requests), "completed": s.completed, "failed": s.failed,
                     "stopped_early": run.stopped_early, "errors": dict(errors)},
        "duration_s": s.duration,
        "tokens": {"input": s.total_input_tokens, "output": s.total_output_tokens},
        "throughput": {"requests_per_s": s.request_throughput, "output_tokens_per_s": s.output_throughput,
                       "total_tokens_per_s": s.total_token_throughput,
                       "peak_output_tokens_per_s": s.peak_output_throughput},
        "goodput_requests_per_s": s.goodput,
        "peak_concurrency": s.peak_concurrency,
        "latency_ms": {k: distribution_json(s.latency[k]) for k in METRICS},
        "histograms": {k: histogram_json(s.histograms[k]) for k in METRICS},
        "server": server_json(result.server),
    }
    if include_requests:
        out["per_request"] = per_request_json(run)
    return out


def report_json(results: list[PointResult], meta: dict[str, Any], *, include_requests: bool = True) -> dict[str, Any]:
    return {**meta, "runs": [point_json(r, include_requests=include_requests) for r in results]}
