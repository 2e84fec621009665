"""Prometheus scrape cost: how long one /metrics render takes with all 30 x 9 heads of the default
model, and how much scraping slows decoding under load.

    .venv/bin/python -m benchmarks.bench_scrape [--phases 20] [--phase-seconds 3] [--json out.json]

Decode slowdown: the engine runs its background loop with 16 sequences always in flight (a
feeder replaces each finished one). Short phases with a scraper (one render every --interval
seconds on its own thread, as the /metrics route does off the event loop) alternate with phases
without; generated tokens per second are counted per phase from the engine's own step
observer. Alternating every few seconds cancels the machine's drift. The same is repeated at
10 scrapes per second, which magnifies the cost tenfold above the noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import torch

from benchmarks.bench_engine import PROMPTS
from benchmarks.report import emit
from server import __version__
from server.config import CacheConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.request import SamplingParams
from server.metrics import Metrics


def log(msg: str) -> None:
    print(f"[bench_scrape] {msg}", file=sys.stderr, flush=True)


class Load:
    """Keeps `batch` greedy sequences decoding on a started engine until stopped."""

    def __init__(self, engine: Engine, batch: int, new_tokens: int) -> None:
        self.engine, self.batch = engine, batch
        self.params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        self.ids = [engine.chat_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(batch)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(batch)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            self.engine.collect(self.engine.add_request(self.ids[i], self.params))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


class TokenClock:
    """Engine observer: (time, tokens sampled) of every step."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []

    def __call__(self, step) -> None:
        self.steps.append((time.monotonic(), step.num_sampled))

    def rate(self, start: float, end: float) -> float:
        return sum(n for t, n in self.steps if start <= t < end) / (end - start)


def alternate(metrics: Metrics, clock: TokenClock, interval: float, phases: int, seconds: float) -> dict:
    """Phases without and with scraping, alternating; tokens/s of each pair and their ratio."""
    pairs, renders = [], []
    for _ in range(phases // 2):
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        with Scraper(metrics, interval) as scraper:
            time.sleep(seconds)
        t2 = time.monotonic()
        renders.extend(scraper.times)
        pairs.append((clock.rate(t0, t1), clock.rate(t1, t2)))
    without = statistics.mean(p[0] for p in pairs)
    with_ = statistics.mean(p[1] for p in pairs)
    ratios = [b / a for a, b in pairs]
    return {"interval_s": interval, "pairs": len(pairs), "tokens_per_s_without": without, "tokens_per_s_with": with_,
            "slowdown_pct": (1 - with_ / without) * 100, "pair_ratio_median": statistics.median(ratios),
            "pair_ratio_range": [min(ratios), max(ratios)], "scrapes": len(renders),
            "render_ms_under_load_median": statistics.median(renders) * 1000 if renders else None}


class Scraper:
    """Renders the exposition every `interval` seconds on its own thread; records render times."""

    def __init__(self, metrics: Metrics, interval: float) -> None:
        self.metrics, self.interval = metrics, interval
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t0 = time.perf_counter()
            self.metrics.render()
            self.times.append(time.perf_counter() - t0)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", type=int, default=20, help="phases per scrape rate, half with scraping (default 20)")
    ap.add_argument("--phase-seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--intervals", default="1.0,0.1", help="seconds between scrapes, one run each (default 1.0,0.1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the engine (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=1 << 30), num_threads=args.threads),
                    loaded=load_model(None, progress=log))
    metrics = Metrics(engine, "SmolLM2-135M-Instruct", __version__)
    clock = TokenClock()
    engine.add_observer(clock)
    engine.start()
    try:
        log("warm-up (fills the accumulators of all 270 heads)")
        engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
        renders = []
        for _ in range(20):
            t0 = time.perf_counter()
            body = metrics.render()
            renders.append(time.perf_counter() - t0)
        res: dict = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
                     "load_average_before": os.getloadavg(),
                     "render_ms_idle": {"median": statistics.median(renders) * 1000, "max": max(renders) * 1000},
                     "scrape_bytes": len(body),
                     "series": sum(1 for line in body.splitlines() if not line.startswith(b"#")),
                     "batch": args.batch, "torch_threads": torch.get_num_threads(), "runs": []}
        log(f"render idle: {res['render_ms_idle']}, {res['series']} series, {len(body)} bytes")
        with Load(engine, args.batch, args.new_tokens):
            time.sleep(args.phase_seconds)                              # reach a steady batch
            for interval in (float(x) for x in args.intervals.split(",")):
                run = alternate(metrics, clock, interval, args.phases, args.phase_seconds)
                res["runs"].append(run)
                log(str(run))
        res["load_average_after"] = os.getloadavg()
    finally:
        engine.shutdown()
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
