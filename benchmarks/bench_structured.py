"""What a grammar costs a decode step, and what requests without one pay: engines side by side.

    .venv/bin/python -m benchmarks.bench_structured [--steps 30] [--batches 1,16] [--json out.json]

Default model, greedy, min_tokens = max_tokens (so no request ends early). Two engines over the
same weights run the same batch at once and step alternately (so machine drift hits both alike):
one whose requests carry a grammar (a regex any line of text satisfies: an llguidance mask per
row, filled by the runner and applied in the sampler), one whose requests carry none. Reported: the median decode step time of each and the difference. What a request without
a grammar pays is the runner's per-step check for constrained rows, a list comprehension over
the batch, which BENCHMARKS.md's step anatomy (bench_step) covers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks.report import emit
from server.config import CacheConfig, EngineConfig
from server.engine.engine import Engine
from server.engine.loader import load_model
from server.engine.request import GrammarSpec, SamplingParams


def log(msg: str) -> None:
    print(f"[bench_structured] {msg}", file=sys.stderr, flush=True)


def step_times(engines: dict[str, Engine], params: dict[str, SamplingParams], batch: int, steps: int) -> dict:
    for name, eng in engines.items():
        for i in range(batch):
            eng.add_request(eng.chat_prompt([{"role": "user", "content": f"Describe item {i} as JSON."}]), params[name])
    for _ in range(3):                                  # prefill
        for eng in engines.values():
            eng.step()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, eng in engines.items():
            t0 = time.perf_counter()
            eng.step()
            times[name].append(time.perf_counter() - t0)
    for eng in engines.values():
        while eng.has_unfinished():
            eng.step()
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"batch": batch, "step_ms_grammar": med["grammar"], "step_ms_plain": med["plain"],
            "grammar_overhead_ms": med["grammar"] - med["plain"],
            "grammar_overhead_pct": 100 * (med["grammar"] / med["plain"] - 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="decode steps measured per engine and batch size")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    loaded = load_model(None, progress=log)
    engines = {name: Engine(EngineConfig(cache=CacheConfig(memory_bytes=512 << 20)), loaded=loaded)
               for name in ("grammar", "plain")}
    grammar = GrammarSpec("regex", "[^\\n]{0,4000}")
    engines["grammar"].compile_grammar(grammar)         # the tokenizer build and compile happen before timing
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        n = args.steps + 8
        params = {"grammar": SamplingParams(max_tokens=n, min_tokens=n, temperature=0, grammar=grammar),
                  "plain": SamplingParams(max_tokens=n, min_tokens=n, temperature=0)}
        log(f"batch {b}")
        rows.append(step_times(engines, params, b, args.steps))
        log(f"  {rows[-1]}")
    emit({"date": time.strftime("%Y-%m-%d"), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
