"""Pure judgement of a soak run: the numbers (SoakSummary) and the invariants (Checks).

Invariants (each a Check named here; "skip" when it could not be measured, which fails nothing):
    kv_blocks_leaked    0 KV blocks in use once the load has drained, nothing running or waiting
    status_codes        no status other than 2xx, 400, 413 and 503
    expected_answers    each kind got a status it should (invalid -> 400, over_body -> 413, ...)
    requests_finished   every admitted request the client read to the end finished (stop or
                        length on every choice, [DONE] on streams); none hung; no transport errors
    retry_after         every 503 carried Retry-After
    overload_shed       the bursts past the admission capacity got at least one 503
    rss_slope           RSS slope after the warm-up below the limit (MB/min): the least-squares
                        line through the medians of consecutive runs of 5 samples, so that a
                        one-sample dip (the allocator handing memory back) or spike (a large
                        body in flight) does not tilt it; the plain fit is reported beside it
    fd_growth           open descriptors at the end at most the limit above the start
    health              every GET /health probe answered 200
    server_alive        the server process outlived the load (and, when the soak launched it,
                        exited 0 on SIGTERM)
    coverage            every kind of the mix ran, and some requests finished
    lag_p99             /health latency p99 under the limit (only when a limit is given)
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loadtests.soak_records import Drain, Outcome, Probe, Sample, SoakResult, status_allowed
from server.latency import percentile

MB = 1e6  # RSS slopes and sizes are in MB (10^6 bytes), as the issue states its limit


@dataclass(frozen=True)
class Limits:
    max_rss_slope: float = 2.0       # MB/min
    warmup: float = 60.0             # seconds of load before the RSS slope is fitted
    min_slope_window: float = 20.0   # seconds of post-warm-up samples needed to judge the slope
    smooth: int = 5                  # samples per median before the fit (1: the plain fit)
                                     # (a shorter run reports it and skips the invariant)
    max_fd_growth: int = 10
    max_lag_p99_ms: float | None = None


@dataclass(frozen=True)
class Check:
    name: str
    status: str   # "pass", "fail" or "skip"
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(frozen=True)
class Lag:
    count: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True)
class SoakSummary:
    requests: int
    by_status: dict[str, int]               # "200", "400", ..., "none" (no status: left or failed)
    by_kind: dict[str, dict[str, int]]      # kind -> status -> count
    admitted: int
    finished: int
    left_on_purpose: int
    errors: dict[str, int]                  # client-side faults, by message
    bursts: int
    burst_requests: int
    burst_503: int
    rss_start_mb: float | None
    rss_end_mb: float | None
    rss_max_mb: float | None
    rss_slope_mb_per_min: float | None      # judged: fitted to the medians of `smooth` samples
    rss_slope_raw_mb_per_min: float | None  # fitted to every sample
    slope_window_s: float
    slope_points: int
    fds_start: int | None
    fds_end: int | None
    fds_max: int | None
    threads_start: int | None
    threads_end: int | None
    kv_max_in_use: float | None
    kv_after_drain: float | None
    drain_s: float
    lag: Lag


# ----------------------------------------------------------------------------- numbers
def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The slope of the least-squares line through (xs, ys); None with fewer than two distinct xs."""
    n = len(xs)
    if n != len(ys) or n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def medians(points: Sequence[tuple[float, float]], k: int) -> list[tuple[float, float]]:
    """(median t, median y) of each run of k consecutive points (a last, shorter run included
    when it has at least half of k)."""
    if k <= 1:
        return list(points)
    runs = [points[i:i + k] for i in range(0, len(points), k)]
    return [(statistics.median(t for t, _ in r), statistics.median(y for _, y in r)) for r in runs
            if 2 * len(r) >= k]


def rss_slope(samples: Iterable[Sample], warmup: float, until: float | None = None,
              smooth: int = 1) -> tuple[float | None, float, int]:
    """(MB per minute, seconds covered, samples) over the samples taken after `warmup` seconds
    (and before `until`, the end of the load, when given), fitted to the medians of runs of
    `smooth` samples."""
    pts = [(s.t, s.rss_bytes / MB) for s in samples
           if s.rss_bytes is not None and s.t >= warmup and (until is None or s.t <= until)]
    fit = medians(pts, smooth)
    if len(fit) < 2:
        return None, 0.0, len(pts)
    slope = least_squares_slope([t / 60.0 for t, _ in fit], [y for _, y in fit])
    return slope, pts[-1][0] - pts[0][0], len(pts)


def lag(probes: Sequence[Probe]) -> Lag:
    ms = sorted(p.latency * 1000.0 for p in probes if p.latency is not None)
    failed = sum(1 for p in probes if p.latency is None)
    if not ms:
        return Lag(len(probes), failed, None, None, None)
    return Lag(len(probes), failed, round(percentile(ms, 50), 3), round(percentile(ms, 99), 3), round(ms[-1], 3))


def _status(o: Outcome) -> str:
    return "none" if o.status is None else str(o.status)


def _mb(x: int | None) -> float | None:
    return None if x is None else round(x / MB, 2)


def _max(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return max(vs) if vs else None


def summarize(result: SoakResult, limits: Limits) -> SoakSummary:
    outs = result.outcomes
    by_kind: dict[str, Counter] = {}
    for o in outs:
        by_kind.setdefault(o.kind, Counter())[_status(o)] += 1
    slope, window, points = rss_slope(result.samples, limits.warmup, until=result.duration, smooth=limits.smooth)
    raw, _, _ = rss_slope(result.samples, limits.warmup, until=result.duration)
    burst_outs = [o for b in result.bursts for o in b]
    return SoakSummary(
        requests=len(outs),
        by_status=dict(sorted(Counter(_status(o) for o in outs).items())),
        by_kind={k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        admitted=sum(o.admitted for o in outs), finished=sum(o.finished is True for o in outs),
        left_on_purpose=sum(o.left_on_purpose for o in outs),
        errors=dict(Counter(_error_key(o.error) for o in outs if o.error).most_common()),
        bursts=len(result.bursts), burst_requests=len(burst_outs), burst_503=sum(o.status == 503 for o in burst_outs),
        rss_start_mb=_mb(result.start.rss_bytes), rss_end_mb=_mb(result.end.rss_bytes),
        rss_max_mb=_mb(_max(s.rss_bytes for s in (result.start, *result.samples, result.end))),
        rss_slope_mb_per_min=None if slope is None else round(slope, 3),
        rss_slope_raw_mb_per_min=None if raw is None else round(raw, 3), slope_window_s=round(window, 1),
        slope_points=points,
        fds_start=result.start.fds, fds_end=result.end.fds,
        fds_max=_max(s.fds for s in (result.start, *result.samples, result.end)),
        threads_start=result.start.threads, threads_end=result.end.threads,
        kv_max_in_use=_max(s.kv_blocks_in_use for s in result.samples),
        kv_after_drain=result.drain.kv_blocks_in_use, drain_s=round(result.drain.seconds, 2),
        lag=lag(result.probes),
    )


def _error_key(error: str) -> str:
    """Errors grouped by their kind, without the variable tail (timeouts, addresses)."""
    return error.split(": no end after")[0] if error.startswith("hung") else error[:120]


# ----------------------------------------------------------------------------- invariants
def _where(outs: Iterable[Outcome], limit: int = 4) -> str:
    c = Counter(f"{o.kind}/{o.variant}" for o in outs)
    return ", ".join(f"{k} x{n}" for k, n in c.most_common(limit))


def _check_statuses(outs: Sequence[Outcome]) -> Check:
    bad = [o for o in outs if o.status is not None and not status_allowed(o.status)]
    if not bad:
        return Check("status_codes", "pass", f"{len(outs)} requests, all 2xx, 400, 413 or 503")
    counts = Counter(o.status for o in bad)
    return Check("status_codes", "fail", "; ".join(
        f"{s} x{n} ({_where(o for o in bad if o.status == s)})" for s, n in sorted(counts.items())))


def _check_expected(outs: Sequence[Outcome]) -> Check:
    bad = [o for o in outs if o.expected is False]
    if not bad:
        return Check("expected_answers", "pass", "every kind answered as it should")
    groups = Counter((o.kind, o.variant, o.status) for o in bad)
    return Check("expected_answers", "fail", "; ".join(
        f"{k}/{v} got {s} x{n}" for (k, v, s), n in groups.most_common(6)))


def _check_finished(outs: Sequence[Outcome]) -> Check:
    admitted = [o for o in outs if o.admitted and not o.left_on_purpose]
    bad = [o for o in outs if o.error is not None]
    if not bad:
        return Check("requests_finished", "pass", f"{len(admitted)} admitted requests read to the end, all finished")
    groups = Counter((_error_key(o.error or ""), f"{o.kind}/{o.variant}") for o in bad)
    return Check("requests_finished", "fail", f"{len(bad)} request(s) did not finish: " + "; ".join(
        f"{e} ({w}) x{n}" for (e, w), n in groups.most_common(6)))


def _check_retry_after(outs: Sequence[Outcome]) -> Check:
    busy = [o for o in outs if o.status == 503]
    missing = [o for o in busy if not o.retry_after]
    if not busy:
        return Check("retry_after", "skip", "no 503 answers")
    if missing:
        return Check("retry_after", "fail", f"{len(missing)} of {len(busy)} 503 answers lacked Retry-After "
                                            f"({_where(missing)})")
    return Check("retry_after", "pass", f"{len(busy)} answers 503, all with Retry-After")


def _check_shed(s: SoakSummary) -> Check:
    if not s.bursts:
        return Check("overload_shed", "skip", "no burst ran")
    if s.burst_503:
        return Check("overload_shed", "pass",
                     f"{s.bursts} bursts, {s.burst_503} of {s.burst_requests} requests shed (503)")
    return Check("overload_shed", "fail", f"{s.bursts} bursts of {s.burst_requests} requests got no 503: the server "
                                          "admitted past its capacity, or --max-queue/--max-num-seqs do not match it")


def _check_slope(s: SoakSummary, limits: Limits) -> Check:
    if s.rss_slope_mb_per_min is None or s.slope_window_s < limits.min_slope_window:
        return Check("rss_slope", "skip", f"{s.slope_window_s:g} s of samples after the {limits.warmup:g} s warm-up "
                                          f"(needs {limits.min_slope_window:g} s)")
    ok = s.rss_slope_mb_per_min < limits.max_rss_slope
    return Check("rss_slope", "pass" if ok else "fail",
                 f"{s.rss_slope_mb_per_min:+.3f} MB/min (medians of {limits.smooth}; plain fit "
                 f"{s.rss_slope_raw_mb_per_min:+.3f}) over {s.slope_window_s:g} s ({s.slope_points} samples) "
                 f"after {limits.warmup:g} s warm-up; limit {limits.max_rss_slope:g}")


def _check_fds(s: SoakSummary, limits: Limits) -> Check:
    if s.fds_start is None or s.fds_end is None:
        return Check("fd_growth", "skip", "descriptors not readable")
    grew = s.fds_end - s.fds_start
    return Check("fd_growth", "pass" if grew <= limits.max_fd_growth else "fail",
                 f"{s.fds_start} -> {s.fds_end} (max {s.fds_max}); limit +{limits.max_fd_growth}")


def _check_kv(s: SoakSummary, drain: Drain) -> Check:
    if s.kv_after_drain is None:
        return Check("kv_blocks_leaked", "fail", "KV blocks in use unknown after the load (no readable /metrics)")
    if drain.running or drain.waiting:
        return Check("kv_blocks_leaked", "fail", f"{drain.running:g} requests running and {drain.waiting:g} waiting "
                                                 f"{s.drain_s:g} s after the load ({s.kv_after_drain:g} blocks in use)")
    if s.kv_after_drain == 0:
        peak = "" if s.kv_max_in_use is None else f" (peak {s.kv_max_in_use:g})"
        return Check("kv_blocks_leaked", "pass", f"0 blocks in use {s.drain_s:g} s after the load{peak}")
    return Check("kv_blocks_leaked", "fail", f"{s.kv_after_drain:g} blocks still in use {s.drain_s:g} s after the load")


def _check_health(s: SoakSummary) -> Check:
    if not s.lag.count:
        return Check("health", "skip", "no probe ran")
    if s.lag.failed:
        return Check("health", "fail", f"{s.lag.failed} of {s.lag.count} GET /health probes failed or timed out")
    return Check("health", "pass", f"{s.lag.count} probes, all 200")


def _check_alive(result: SoakResult) -> Check:
    if not result.server_alive:
        return Check("server_alive", "fail", "the server process was gone before the end of the soak")
    if result.server_exit not in (None, 0):
        return Check("server_alive", "fail", f"the launched server exited with {result.server_exit} on SIGTERM")
    extra = "" if result.server_exit is None else ", exited 0 on SIGTERM"
    return Check("server_alive", "pass", "alive through the soak" + extra)


def _check_coverage(s: SoakSummary, kinds: Iterable[str]) -> Check:
    missing = [k for k in kinds if not s.by_kind.get(k)]
    if missing or not s.finished:
        what = f"kinds never sent: {', '.join(missing)}" if missing else "no request finished"
        return Check("coverage", "fail", what)
    return Check("coverage", "pass", f"{len(s.by_kind)} kinds sent, {s.finished} requests finished")


def _check_lag(s: SoakSummary, limits: Limits) -> Check | None:
    if limits.max_lag_p99_ms is None:
        return None
    if s.lag.p99_ms is None:
        return Check("lag_p99", "fail", "no successful /health probe")
    ok = s.lag.p99_ms < limits.max_lag_p99_ms
    return Check("lag_p99", "pass" if ok else "fail", f"p99 {s.lag.p99_ms:g} ms; limit {limits.max_lag_p99_ms:g} ms")


def checks(result: SoakResult, summary: SoakSummary, limits: Limits, kinds: Iterable[str]) -> list[Check]:
    outs = result.outcomes
    found = [_check_kv(summary, result.drain), _check_statuses(outs), _check_expected(outs), _check_finished(outs),
             _check_retry_after(outs), _check_shed(summary), _check_slope(summary, limits),
             _check_fds(summary, limits), _check_health(summary), _check_alive(result),
             _check_coverage(summary, kinds), _check_lag(summary, limits)]
    return [c for c in found if c is not None]


def failures(found: Iterable[Check]) -> list[str]:
    return [c.name for c in found if c.failed]
