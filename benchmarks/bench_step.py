"""Engine step anatomy, and two checkouts of headwise side by side (alternating runs).

    .venv/bin/python -m benchmarks.bench_step                          # this checkout
    .venv/bin/python -m benchmarks.bench_step --tree /tmp/old --tree . --rounds 3 [--json out.json]

For batch 1 and batch 16 (default model, chat prompts, greedy, telemetry on), the median over
decode steps (every sequence decoding) of:
  - step_ms: the whole engine step (schedule, run, sample, update, detokenize);
  - host_ms: the runner's own work per step: runner.execute minus the model's forward and the
    sampler, i.e. turning the batch into input tensors and metadata, the backend's per-step
    preparation and turning telemetry accumulators into statistics;
  - detok_us_per_token: incremental detokenization and stop-string matching per generated token
    (IncrementalDetokenizer.add_token), and its share of a decode step.
With several --tree, each round runs every tree once in a fresh process (PYTHONPATH=tree), in
order, so the trees share the machine's drift; the report gives each tree's median over rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_step] {msg}", file=sys.stderr, flush=True)


def _timed(record: list[float]):
    """Decorator factory: append each call's duration (s) to record."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                record.append(time.perf_counter() - t0)
        return inner
    return wrap


def measure(batches: list[int], steps: int) -> dict:
    """Run in the checkout that is first on sys.path."""
    import server
    import server.engine.runner as runner_mod
    from server.config import CacheConfig, EngineConfig
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.engine import Engine
    from server.engine.loader import load_model
    from server.engine.request import SamplingParams

    from benchmarks.bench_engine import chat_ids

    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=1 << 30)), loaded=load_model(None))
    runner = engine.runner
    t_exec: list[float] = []
    t_fwd: list[float] = []
    t_sample: list[float] = []
    t_detok: list[float] = []
    runner.execute = _timed(t_exec)(runner.execute)
    runner.model.forward = _timed(t_fwd)(runner.model.forward)
    runner_mod.sample = _timed(t_sample)(runner_mod.sample)
    IncrementalDetokenizer.add_token = _timed(t_detok)(IncrementalDetokenizer.add_token)
    engine.generate([chat_ids(engine, 0)], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    out = {"server": os.path.dirname(os.path.dirname(server.__file__)), "batches": []}
    for b in batches:
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
        for i in range(b):
            engine.add_request(chat_ids(engine, i), params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running + list(engine.scheduler.waiting)):
            engine.step()                                    # prefill
        for record in (t_exec, t_fwd, t_sample, t_detok):
            record.clear()
        wall = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            wall.append(time.perf_counter() - t0)
        host = [e - f - s for e, f, s in zip(t_exec, t_fwd, t_sample)]
        step = statistics.median(wall)
        detok = statistics.median(t_detok)
        out["batches"].append({
            "batch": b, "steps": steps, "step_ms": step * 1e3, "forward_ms": statistics.median(t_fwd) * 1e3,
            "sample_ms": statistics.median(t_sample) * 1e3, "host_ms": statistics.median(host) * 1e3,
            "detok_us_per_token": detok * 1e6, "detok_share_of_step_pct": 100 * detok * b / step})
        while engine.has_unfinished():
            engine.step()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="a headwise checkout (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every tree, alternating (default 1)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=40, help="decode steps measured per batch size (default 40)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.child or not args.tree:
        res = measure(batches, args.steps)
        print(json.dumps(res))
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict]] = {os.path.abspath(t): [] for t in args.tree}
    for r in range(args.rounds):
        for tree in runs:
            log(f"round {r + 1}/{args.rounds}: {tree}")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, here]))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--batches", args.batches,
                                   "--steps", str(args.steps)], env=env, cwd=tree, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                return proc.returncode
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if os.path.abspath(res["server"]) != tree:
                raise SystemExit(f"ran {res['server']} instead of {tree}")
            runs[tree].append(res)
    keys = ("step_ms", "forward_ms", "sample_ms", "host_ms", "detok_us_per_token", "detok_share_of_step_pct")
    summary = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "cores": os.cpu_count(), "trees": {}}
    for tree, results in runs.items():
        summary["trees"][tree] = [
            {"batch": b, **{k: statistics.median(res["batches"][i][k] for res in results) for k in keys},
             "step_ms_by_round": [round(res["batches"][i]["step_ms"], 2) for res in results],
             "host_ms_by_round": [round(res["batches"][i]["host_ms"], 3) for res in results]}
            for i, b in enumerate(batches)]
    from benchmarks.report import emit

    emit(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
