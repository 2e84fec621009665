"""The soak's report: a text table for stdout and a JSON object for --json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from loadtests.soak_records import SoakResult
from loadtests.soak_verdict import Check, SoakSummary, failures


def _num(x: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none"


def table(summary: SoakSummary, found: Sequence[Check], header: str, warmup: float) -> str:
    s = summary
    lines = [f"== {header} ==",
             f"requests   {s.requests} sent, {s.admitted} admitted, {s.finished} finished, "
             f"{s.left_on_purpose} left on purpose by the client",
             f"statuses   {_counts(s.by_status)}   (none: no status, the client left first)"]
    for kind, counts in s.by_kind.items():
        lines.append(f"  {kind:<14} {_counts(counts)}")
    if s.errors:
        lines.append(f"client-side faults  {_counts(s.errors)}")
    lines += [
        f"bursts     {s.bursts} bursts, {s.burst_requests} requests, {s.burst_503} shed with 503",
        f"memory     RSS {_num(s.rss_start_mb, ' MB')} -> {_num(s.rss_end_mb, ' MB')} "
        f"(max {_num(s.rss_max_mb, ' MB')}); "
        f"slope {_num(s.rss_slope_mb_per_min, ' MB/min', 3)} (plain fit {_num(s.rss_slope_raw_mb_per_min, '', 3)}) "
        f"over {s.slope_window_s:g} s after {warmup:g} s warm-up",
        f"fds        {s.fds_start} -> {s.fds_end} (max {s.fds_max}); threads {s.threads_start} -> {s.threads_end}",
        f"kv blocks  peak {_num(s.kv_max_in_use, '', 0)} in use; {_num(s.kv_after_drain, '', 0)} after the drain "
        f"({s.drain_s:g} s)",
        f"loop lag   GET /health p50 {_num(s.lag.p50_ms, ' ms', 2)}  p99 {_num(s.lag.p99_ms, ' ms', 2)}  "
        f"max {_num(s.lag.max_ms, ' ms', 2)}  ({s.lag.count} probes, {s.lag.failed} failed)",
        "",
        f"{'invariant':<18} {'result':<6} detail",
    ]
    lines += [f"{c.name:<18} {c.status.upper():<6} {c.detail}" for c in found]
    failed = failures(found)
    lines += ["", "verdict: " + (f"FAIL ({', '.join(failed)})" if failed else "PASS")]
    return "\n".join(lines)


def timeline(result: SoakResult) -> list[dict[str, Any]]:
    return [{"t": round(x.t, 2), "rss_mb": None if x.rss_bytes is None else round(x.rss_bytes / 1e6, 3), "fds": x.fds,
             "threads": x.threads, "kv_blocks_in_use": x.kv_blocks_in_use, "running": x.running, "waiting": x.waiting}
            for x in result.samples]


def report_json(result: SoakResult, summary: SoakSummary, found: Sequence[Check], meta: Mapping[str, Any]) -> dict:
    return {
        **meta,
        "passed": not failures(found),
        "failed": failures(found),
        "checks": [dataclasses.asdict(c) for c in found],
        "summary": dataclasses.asdict(summary),
        "elapsed_s": round(result.elapsed, 2),
        "drain": dataclasses.asdict(result.drain),
        "server_exit": result.server_exit,
        "server_counters": result.counters,
        "problems": [dataclasses.asdict(o) for o in result.outcomes if o.error or o.expected is False][:200],
        "samples": timeline(result),
    }
