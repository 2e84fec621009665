"""Prometheus scrape cost: how long one /metrics render takes with all 30 x 9 heads of the default
model, and how much scraping slows decoding under load.

    .venv/bin/python -m benchmarks.bench_scrape [--rounds 4] [--interval 1.0] [--json out.json]

Decode slowdown: the engine runs its background loop with 16 concurrent sequences; phases with
a scraper (one render every --interval seconds on its own thread, as the /metrics route does off
the event loop) alternate with phases without, and each pair gives a ratio of aggregate decode
tokens/s. Alternation cancels the machine's drift; read the median ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

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


def decode_rate(engine: Engine, batch: int, new_tokens: int) -> float:
    """Aggregate decode tokens/s of `batch` concurrent sequences (prefill excluded)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [engine.chat_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(batch)]
    rids = [engine.add_request(x, params) for x in ids]
    done = [engine.collect(r) for r in rids]
    start = max(d.stats.time_to_first_token for d in done)          # every sequence decoding from here
    end = max(d.stats.e2e_latency for d in done)
    tokens = sum(len(d.token_ids) - 1 for d in done)
    return tokens / (end - start)


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
    ap.add_argument("--rounds", type=int, default=4, help="pairs of phases, without and with scraping (default 4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=1 << 30)), loaded=load_model(None, progress=log))
    metrics = Metrics(engine, "SmolLM2-135M-Instruct", __version__)
    engine.start()
    try:
        log("warm-up (fills the accumulators of all 270 heads)")
        decode_rate(engine, 2, 8)
        renders = []
        for _ in range(20):
            t0 = time.perf_counter()
            body = metrics.render()
            renders.append(time.perf_counter() - t0)
        res: dict = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
                     "render_ms_idle": {"median": statistics.median(renders) * 1000, "max": max(renders) * 1000},
                     "scrape_bytes": len(body), "series": sum(1 for line in body.splitlines() if not line.startswith(b"#")),
                     "interval_s": args.interval, "batch": args.batch, "pairs": []}
        log(f"render idle: {res['render_ms_idle']}, {res['series']} series, {len(body)} bytes")
        busy_renders: list[float] = []
        for r in range(args.rounds):
            plain = decode_rate(engine, args.batch, args.new_tokens)
            with Scraper(metrics, args.interval) as scraper:
                scraped = decode_rate(engine, args.batch, args.new_tokens)
            busy_renders.extend(scraper.times)
            res["pairs"].append({"without": plain, "with": scraped, "ratio": scraped / plain,
                                 "scrapes": len(scraper.times)})
            log(f"round {r + 1}: {res['pairs'][-1]}")
        ratios = [p["ratio"] for p in res["pairs"]]
        res["decode_ratio_median"] = statistics.median(ratios)
        res["decode_slowdown_pct_median"] = (1 - statistics.median(ratios)) * 100
        if busy_renders:
            res["render_ms_under_load"] = {"median": statistics.median(busy_renders) * 1000,
                                           "max": max(busy_renders) * 1000, "n": len(busy_renders)}
    finally:
        engine.shutdown()
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
