"""Decode attention by backend, KV cache dtype and context length, in alternating steps.

    nice -n 10 .venv/bin/python -m benchmarks.bench_decode_attention [--contexts 100,1000] [--batches 1]
        [--steps 30] [--threads N] [--variants torch,cpu] [--json out.json]

Default model, one engine per variant over the same loaded weights (telemetry on, every step). A
variant is an attention backend, optionally with a KV cache dtype: `cpu:float32,cpu:bfloat16`
compares the two caches on the C++ path (default: the backends at --kv-cache-dtype auto). For
each batch size, one engine per (variant, context length) prefills `batch` prompts of that many
tokens, then the decode steps of all engines alternate, so every variant and context length
shares the machine's drift; the log also gives each variant's step time at every context over
its time at the shortest. Reported per variant and context, medians over the measured steps:
  - step_ms: the whole engine step (schedule, run, sample, update, detokenize);
  - attention_ms: the attention backend's forward summed over the 30 layers (write the new K/V,
    attend, telemetry accumulators), i.e. what the backend choice changes;
  - prepare_ms: the backend's per-step prepare (its indices from the metadata);
  - step_cpu_ms, attention_cpu_ms: the same as CPU time of the calling thread, which a busy
    machine inflates far less than wall time; the work of every thread only with --threads 1.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_decode_attention] {msg}", file=sys.stderr, flush=True)


def _timed(record: list[tuple[float, float]], fn):
    """fn, appending each call's (wall, this thread's CPU) duration in seconds to record."""
    @functools.wraps(fn)
    def inner(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            record.append((time.perf_counter() - t0, time.thread_time() - c0))
    return inner


def _all_decoding(engine, batch: int) -> bool:
    """Every request admitted and past its prompt (added requests reach the scheduler in step())."""
    running = engine.scheduler.running
    return len(running) == batch and all(r.num_computed_tokens >= r.num_prompt_tokens for r in running)


def measure(contexts: list[int], batches: list[int], steps: int, variants: tuple[str, ...],
            threads: int | None) -> dict:
    """One engine per (variant, context); the decode steps of all of them alternate, so every
    variant and every context length shares the machine's drift (contexts measured one after
    the other differed by 10-20 % from drift alone)."""
    from server.config import CacheConfig, EngineConfig
    from server.engine.engine import Engine
    from server.engine.loader import load_model
    from server.engine.request import SamplingParams

    loaded = load_model(None)
    text = " ".join(f"Sentence {i} of a long document about attention heads and their statistics." for i in range(400))
    rows = []
    for batch in batches:
        engines, attn, prep = {}, {}, {}
        for name in variants:
            backend_name, _, kv_dtype = name.partition(":")
            for n in contexts:
                engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=1 << 30, dtype=kv_dtype or "auto"),
                                             attention_backend=backend_name, num_threads=threads), loaded=loaded)
                backend = engine.runner.attention
                assert backend.name == backend_name, (backend.name, backend_name)
                key = (name, n)
                attn[key], prep[key] = [], []
                backend.forward = _timed(attn[key], backend.forward)
                backend.prepare = _timed(prep[key], backend.prepare)
                # requests admitted first decode while later ones prefill: room for that head start
                params = SamplingParams(max_tokens=steps + 8 + -(-batch * n // 256), temperature=0, ignore_eos=True)
                ids = engine.tokenize(text)
                for b in range(batch):
                    engine.add_request(ids[b * 7:b * 7 + n], params)
                while not _all_decoding(engine, batch):
                    engine.step()                                            # prefill
                engine.step()                                                # first decode step, not measured
                engines[key] = engine
        wall = {key: [] for key in engines}
        cpu = {key: [] for key in engines}
        per_attn = {key: [] for key in engines}
        per_attn_cpu = {key: [] for key in engines}
        per_prep = {key: [] for key in engines}
        for _ in range(steps):
            for key, engine in engines.items():
                attn[key].clear()
                prep[key].clear()
                t0, c0 = time.perf_counter(), time.thread_time()
                engine.step()
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.thread_time() - c0)
                per_attn[key].append(sum(w for w, _ in attn[key]))
                per_attn_cpu[key].append(sum(c for _, c in attn[key]))
                per_prep[key].append(sum(w for w, _ in prep[key]))
        for engine in engines.values():
            assert _all_decoding(engine, batch), "a request finished or went back to prefill during the measured steps"
        for n in contexts:
            row = {"batch": batch, "context": n}
            for name in variants:
                key = (name, n)
                row[name] = {"step_ms": round(statistics.median(wall[key]) * 1e3, 3),
                             "attention_ms": round(statistics.median(per_attn[key]) * 1e3, 3),
                             "prepare_ms": round(statistics.median(per_prep[key]) * 1e3, 3),
                             "step_cpu_ms": round(statistics.median(cpu[key]) * 1e3, 3),
                             "attention_cpu_ms": round(statistics.median(per_attn_cpu[key]) * 1e3, 3)}
            log(str(row))
            rows.append(row)
        if len(contexts) > 1:
            base = min(contexts)
            for name in variants:
                for n in contexts:
                    if n != base:
                        log(f"{name}: step at {n} / at {base} tokens = "
                            f"{statistics.median(wall[(name, n)]) / statistics.median(wall[(name, base)]):.2f}x")
        del engines
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": steps, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="100,1000", help="prompt lengths in tokens (default 100,1000)")
    ap.add_argument("--batches", default="1", help="sequences decoding together (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="decode steps measured per backend (default 30)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's default)")
    ap.add_argument("--variants", default="torch,cpu",
                    help="backends to compare, each optionally :float32 or :bfloat16 for its KV cache (default torch,cpu)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    res = measure([int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")],
                  args.steps, tuple(args.variants.split(",")), args.threads)
    res["threads"] = torch.get_num_threads()
    from benchmarks.report import emit

    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
