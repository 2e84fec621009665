"""Runs a soak: the mixed load for a fixed time, overload bursts on a timer, the server sampled
every second, /health probed on its own thread; then the drain and the last look.

Every loop is bounded twice: by time (the load stops at `duration`; a request at
`request_timeout`; the drain at `drain_timeout`) and by count (`max_actions` per worker, and
sample, probe and burst counts derived from the duration).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from loadtests import server_metrics, soak_mix, soak_proc
from loadtests.soak_client import execute
from loadtests.soak_metrics import KvState, read_kv
from loadtests.soak_probe import HealthProber
from loadtests.soak_records import Action, Drain, Outcome, Sample, SoakResult
from server.latency import percentile


@dataclass(frozen=True)
class RunConfig:
    base_url: str
    duration: float                    # seconds of load
    headers: Mapping[str, str] = field(default_factory=dict)
    concurrency: int = 4               # workers of the mix, each one request at a time
    rate: float | None = None          # requests/s of the mix, all workers together (None: each
                                       # worker sends its next request as soon as one ends)
    seed: int = 0
    request_timeout: float = 120.0     # a request still open after this is hung
    sample_interval: float = 1.0
    probe_interval: float = 0.25
    probe_timeout: float = 10.0
    drain_timeout: float = 30.0        # after the load, how long KV blocks may take to come back
    burst_every: float | None = 30.0   # seconds between overload bursts (None: no bursts)
    burst_size: int = 0                # requests per burst (past the server's admission capacity)
    burst_max_tokens: int = 16
    busy_wait: float = 1.0             # seconds a worker waits after a 503 (as Retry-After asks),
                                       # so that it does not spin while a burst holds the server
    max_actions: int = 1_000_000       # per worker
    progress_every: float = 10.0       # seconds between progress lines (0: none)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


def _sample(t: float, pid: int, kv: KvState | None) -> Sample:
    stat = soak_proc.read(pid)
    return Sample(t=t, rss_bytes=stat.rss_bytes if stat else None, fds=stat.fds if stat else None,
                  threads=stat.threads if stat else None, kv_blocks_in_use=kv.in_use if kv else None,
                  running=kv.running if kv else None, waiting=kv.waiting if kv else None)


def progress_line(t: float, duration: float, outcomes: Sequence[Outcome], sample: Sample,
                  lags_ms: Sequence[float]) -> str:
    """One quiet key=value line for stderr."""
    busy = sum(o.status == 503 for o in outcomes)
    errors = sum(o.error is not None for o in outcomes)
    bad = sum(o.status is not None and o.status >= 500 and o.status != 503 for o in outcomes)
    lag = f"{percentile(sorted(lags_ms), 99):.1f}ms" if lags_ms else "n/a"
    rss = "n/a" if sample.rss_bytes is None else f"{sample.rss_bytes / 1e6:.1f}MB"
    kv = "n/a" if sample.kv_blocks_in_use is None else f"{sample.kv_blocks_in_use:g}"
    return (f"soak t={t:.0f}/{duration:g}s sent={len(outcomes)} admitted={sum(o.admitted for o in outcomes)} "
            f"shed503={busy} 5xx={bad} client_errors={errors} rss={rss} fds={sample.fds} kv_in_use={kv} "
            f"health_p99={lag}")


class Soak:
    """One soak run's state; run() returns the SoakResult."""

    def __init__(self, cfg: RunConfig, spec: soak_mix.MixSpec, pid: int,
                 progress: Callable[[str], None] | None = None) -> None:
        self.cfg, self.spec, self.pid, self.progress = cfg, spec, pid, progress
        self.clock = _Clock()
        self.outcomes: list[Outcome] = []
        self.bursts: list[tuple[Outcome, ...]] = []
        self.samples: list[Sample] = []
        self.load_over = asyncio.Event()

    # ------------------------------------------------------------------ the load
    async def _worker(self, client: httpx.AsyncClient, index: int) -> None:
        actions = soak_mix.plan(self.spec, self.cfg.seed, index)
        interval = self.cfg.concurrency / self.cfg.rate if self.cfg.rate else 0.0
        next_at = index * interval / self.cfg.concurrency  # workers staggered over one interval
        for _ in range(self.cfg.max_actions):
            if interval:
                wait = next_at - self.clock()
                if wait > 0:
                    await asyncio.sleep(min(wait, self.cfg.duration))
                next_at = max(next_at + interval, self.clock())  # a late worker does not catch up in a rush
            if self.clock() >= self.cfg.duration:
                return
            out = await execute(client, self.cfg.base_url, self.cfg.headers, next(actions),
                                timeout=self.cfg.request_timeout, clock=self.clock)
            self.outcomes.append(out)
            left = self.cfg.duration - self.clock()
            if out.status == 503:
                await asyncio.sleep(max(0.0, min(self.cfg.busy_wait, left)))
            elif out.status is None and out.error is not None:
                await asyncio.sleep(max(0.0, min(0.2, left)))  # the server is not answering: do not spin

    async def _burst(self, actions: Sequence[Action]) -> tuple[Outcome, ...]:
        """Every request of the burst at once; the admitted ones are held (unread) until all have
        an answer, so they keep their admission slots while the rest arrive, then read to the end."""
        answered: set[int] = set()
        everyone = asyncio.Event()
        hold = min(30.0, self.cfg.request_timeout / 2)

        def mark(i: int) -> None:
            answered.add(i)
            if len(answered) >= len(actions):
                everyone.set()

        async def one(client: httpx.AsyncClient, i: int, action: Action) -> Outcome:
            async def on_status(status: int) -> None:
                mark(i)
                if 200 <= status < 300:
                    try:
                        await asyncio.wait_for(everyone.wait(), hold)
                    except asyncio.TimeoutError:
                        pass
            try:
                return await execute(client, self.cfg.base_url, self.cfg.headers, action,
                                     timeout=self.cfg.request_timeout, clock=self.clock, on_status=on_status)
            finally:
                mark(i)

        limits = httpx.Limits(max_connections=len(actions), max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.request_timeout, connect=10.0),
                                     limits=limits) as client:
            return tuple(await asyncio.gather(*(one(client, i, a) for i, a in enumerate(actions))))

    async def _bursts(self) -> None:
        every = self.cfg.burst_every
        if not every or self.cfg.burst_size <= 0:
            return
        rng = random.Random(f"soak-burst:{self.cfg.seed}")
        for k in range(1, max(1, math.ceil(self.cfg.duration / every))):
            wait = k * every - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.clock() >= self.cfg.duration:
                return
            outs = await self._burst(soak_mix.burst(rng, self.spec, self.cfg.burst_size, self.cfg.burst_max_tokens))
            self.bursts.append(outs)
            self.outcomes.extend(outs)

    # ------------------------------------------------------------------ watching
    async def _sampler(self, scraper: httpx.AsyncClient, prober: HealthProber) -> None:
        cfg = self.cfg
        next_line = cfg.progress_every
        count = math.ceil((cfg.duration + cfg.request_timeout + 60) / cfg.sample_interval) + 1
        for _ in range(count):
            sample = _sample(self.clock(), self.pid, await read_kv(scraper, cfg.base_url, cfg.headers))
            self.samples.append(sample)
            if self.progress and cfg.progress_every and sample.t >= next_line:
                next_line += cfg.progress_every
                lags = [p.latency * 1000 for p in list(prober.probes)[-400:] if p.latency is not None]
                self.progress(progress_line(sample.t, cfg.duration, self.outcomes, sample, lags))
            try:
                await asyncio.wait_for(self.load_over.wait(), cfg.sample_interval)
                return
            except asyncio.TimeoutError:
                pass

    async def _drain(self, scraper: httpx.AsyncClient) -> Drain:
        t0, last = time.monotonic(), None
        while True:
            state = await read_kv(scraper, self.cfg.base_url, self.cfg.headers)
            last = state or last
            waited = time.monotonic() - t0
            if (state is not None and state.idle) or waited >= self.cfg.drain_timeout:
                break
            await asyncio.sleep(0.25)
        return Drain(seconds=waited, kv_blocks_in_use=last.in_use if last else None,
                     running=last.running if last else None, waiting=last.waiting if last else None)

    # ------------------------------------------------------------------ all of it
    async def run(self) -> SoakResult:
        cfg = self.cfg
        limits = httpx.Limits(max_connections=2 * cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        async with httpx.AsyncClient(timeout=30.0) as scraper:
            before = await server_metrics.scrape(scraper, cfg.base_url, cfg.headers)
            start = _sample(0.0, self.pid, await read_kv(scraper, cfg.base_url, cfg.headers))
            self.clock = _Clock()
            prober = HealthProber(cfg.base_url, cfg.headers, interval=cfg.probe_interval, timeout=cfg.probe_timeout,
                                  clock=self.clock,
                                  max_probes=math.ceil((cfg.duration + cfg.request_timeout + cfg.drain_timeout + 60)
                                                       / cfg.probe_interval)).start()
            sampler = asyncio.create_task(self._sampler(scraper, prober))
            try:
                async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout, connect=10.0),
                                             limits=limits) as client:
                    tasks = [asyncio.create_task(self._worker(client, i)) for i in range(cfg.concurrency)]
                    tasks.append(asyncio.create_task(self._bursts()))
                    _, pending = await asyncio.wait(tasks, timeout=cfg.duration + 2 * cfg.request_timeout + 30)
                    for task in pending:  # cannot happen with bounded requests; never wait forever
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                load_end = self.clock()
                drain = await self._drain(scraper)
            finally:
                self.load_over.set()
                await asyncio.gather(sampler, return_exceptions=True)
                probes = await asyncio.to_thread(prober.stop)
            await asyncio.sleep(1.0)  # let the server close the load's connections
            end = _sample(self.clock(), self.pid, await read_kv(scraper, cfg.base_url, cfg.headers))
            after = await server_metrics.scrape(scraper, cfg.base_url, cfg.headers)
        if self.progress:
            self.progress(f"soak load stopped at t={load_end:.1f}s; drained in {drain.seconds:.1f}s")
        return SoakResult(duration=cfg.duration, elapsed=self.clock(), outcomes=tuple(self.outcomes),
                          bursts=tuple(self.bursts), samples=tuple(self.samples), probes=probes, start=start,
                          end=end, drain=drain, server_alive=soak_proc.alive(self.pid),
                          counters=counter_deltas(before, after))


def counter_deltas(before, after) -> dict:
    """The server's own counts over the soak (None where it has no /metrics)."""
    if before is None or after is None:
        return {}
    view = server_metrics.server_view(before, after)
    rejected = server_metrics.COUNTERS["requests_rejected"]
    reasons = after.label_values(rejected, "reason")
    return {"counters": view.counters, "success_by_reason": view.success_by_reason,
            "rejected_by_reason": {r: d for r in sorted(reasons)
                                   if (d := server_metrics.counter_delta(before, after, rejected, {"reason": r}))}}
