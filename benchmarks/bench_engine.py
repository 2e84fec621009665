"""Engine benchmark: headwise against transformers' generate on the same model, in one run.

    .venv/bin/python -m benchmarks.bench_engine [--new-tokens 128] [--json out.json]

Reports, side by side: single-stream decode tokens/s; prefill tokens/s (a 512-token prompt);
aggregate output tokens/s with 1, 4 and 16 concurrent sequences (transformers served one
request after another, as a server without batching would, and as one padded static batch);
and the cost of per-head telemetry (decode step time on vs off, interleaved runs).
Times vary by tens of percent on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from benchmarks.report import emit
from server.config import CacheConfig, EngineConfig, TelemetryConfig
from server.engine.engine import Engine
from server.engine.loader import default_model_path, load_model
from server.engine.request import SamplingParams

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some good habits for writing maintainable software and explain each.",
    "Describe the water cycle in detail.",
    "What are the main causes of the French Revolution?",
    "Give me a recipe for a simple vegetable soup.",
    "Why do cats purr? Give several hypotheses.",
    "Summarize the plot of a detective novel you invent.",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def chat_ids(engine: Engine, i: int) -> list[int]:
    return engine.chat_prompt([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])


def ours_concurrent(engine: Engine, batch: int, new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    t0 = time.monotonic()
    done = engine.generate([chat_ids(engine, i) for i in range(batch)], params)
    wall = time.monotonic() - t0
    out = sum(len(c.token_ids) for c in done)
    decode = statistics.median(c.stats.decode_tokens_per_s for c in done)
    return {"wall_s": wall, "output_tokens": out, "tokens_per_s": out / wall, "per_seq_decode_tokens_per_s": decode}


def hf_generate(hf, ids: list[list[int]], new_tokens: int, pad: int) -> float:
    width = max(len(x) for x in ids)
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t0 = time.monotonic()
    with torch.no_grad():
        hf.generate(inp, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=pad)
    return time.monotonic() - t0


TELEMETRY_AB = TelemetryConfig(sample_rate=0.5, attention_time_sample_rate=0.0)  # every other step samples


def telemetry_cost(engine: Engine, batch: int, new_tokens: int, repeats: int, prompt=None) -> dict:
    """Median decode step time of the steps that compute telemetry against those that do not,
    in ONE engine built with TELEMETRY_AB: its steps alternate (on, off, on, ...) over the same
    weights, cache and requests, so machine drift and memory placement hit both alike (two
    separate engines differ by a few percent in their matmuls alone, from where their weights
    landed in memory). The engine's step sampler is watched to label each step."""
    prompt = prompt or chat_ids   # prompt(engine, i) -> token ids of the i-th sequence
    sampler = engine._telemetry_sampler
    assert sampler.rate == 0.5, "build the engine with TelemetryConfig(sample_rate=0.5)"
    decisions: list[bool] = []
    due = sampler.due
    sampler.due = lambda: decisions.append(due()) or decisions[-1]
    times: dict[bool, list[float]] = {True: [], False: []}
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    try:
        for _ in range(repeats):
            for i in range(batch):
                engine.add_request(prompt(engine, i), params)
            steps: list[tuple[bool, float]] = []
            while engine.has_unfinished():
                t0 = time.monotonic()
                engine.step()
                steps.append((decisions[-1], time.monotonic() - t0))
            for sampled, dt in steps[2:-1]:  # drop the prefill steps and the last: every sequence decodes
                times[sampled].append(dt)
    finally:
        sampler.due = due
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"batch": batch, "step_ms_on": on * 1000, "step_ms_off": off * 1000, "overhead_pct": (on / off - 1) * 100,
            "steps_measured": len(times[True]) + len(times[False])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence (default 128)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--telemetry-repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--only-telemetry", action="store_true", help="measure only the telemetry cost")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from transformers import AutoModelForCausalLM

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    loaded = load_model(None, progress=log)
    mem = CacheConfig(memory_bytes=1 << 30)
    if args.only_telemetry:
        return _telemetry_only(loaded, mem, args)
    engine = Engine(EngineConfig(cache=mem), loaded=loaded)
    path = default_model_path()
    log("loading transformers' reference from the same GGUF")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    pad = loaded.config.eos_token_ids[0]
    res: dict = {"machine": f"{os.cpu_count()} cores, {platform.machine()}", "torch": torch.__version__,
                 "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d")}

    log("warm-up")
    engine.generate([chat_ids(engine, 0)], SamplingParams(max_tokens=8, temperature=0))
    hf_generate(hf, [chat_ids(engine, 0)], 8, pad)

    log("single stream decode")
    ours1 = ours_concurrent(engine, 1, args.new_tokens)
    ids0 = [chat_ids(engine, 0)]
    t1 = hf_generate(hf, ids0, 1, pad)
    tn = hf_generate(hf, ids0, args.new_tokens, pad)
    hf_decode = (args.new_tokens - 1) / (tn - t1)
    res["single_stream_decode_tokens_per_s"] = {"headwise": ours1["per_seq_decode_tokens_per_s"],
                                                "transformers": hf_decode,
                                                "ratio": ours1["per_seq_decode_tokens_per_s"] / hf_decode}
    log(f"  {res['single_stream_decode_tokens_per_s']}")

    log(f"prefill of {args.prefill_tokens} tokens")
    text = " ".join(PROMPTS) * 20
    long_ids = engine.tokenize(text)[:args.prefill_tokens]
    t0 = time.monotonic()
    engine.generate([long_ids], SamplingParams(max_tokens=1, temperature=0))
    ours_prefill = len(long_ids) / (time.monotonic() - t0)
    hf_prefill = len(long_ids) / hf_generate(hf, [long_ids], 1, pad)
    res["prefill_tokens_per_s"] = {"headwise": ours_prefill, "transformers": hf_prefill,
                                   "ratio": ours_prefill / hf_prefill}
    log(f"  {res['prefill_tokens_per_s']}")

    res["aggregate"] = []
    for b in batches:
        log(f"{b} concurrent sequences x {args.new_tokens} tokens")
        ours = ours_concurrent(engine, b, args.new_tokens)
        ids = [chat_ids(engine, i) for i in range(b)]
        seq_wall = sum(hf_generate(hf, [x], args.new_tokens, pad) for x in ids)
        static_wall = hf_generate(hf, ids, args.new_tokens, pad)
        row = {"sequences": b, "headwise_tokens_per_s": ours["tokens_per_s"],
               "transformers_one_at_a_time_tokens_per_s": b * args.new_tokens / seq_wall,
               "transformers_static_batch_tokens_per_s": b * args.new_tokens / static_wall}
        row["ratio_vs_one_at_a_time"] = row["headwise_tokens_per_s"] / row["transformers_one_at_a_time_tokens_per_s"]
        row["ratio_vs_static_batch"] = row["headwise_tokens_per_s"] / row["transformers_static_batch_tokens_per_s"]
        res["aggregate"].append(row)
        log(f"  {row}")

    log("telemetry cost (decode step time, on vs off, alternating steps of one engine)")
    ab = Engine(EngineConfig(cache=mem, telemetry=TELEMETRY_AB), loaded=loaded)
    res["telemetry"] = [telemetry_cost(ab, b, min(args.new_tokens, 48), args.telemetry_repeats) for b in (1, 16)]
    for row in res["telemetry"]:
        log(f"  {row}")
    emit(res, args.json)
    return 0


def _telemetry_only(loaded, mem: CacheConfig, args) -> int:
    ab = Engine(EngineConfig(cache=mem, telemetry=TELEMETRY_AB), loaded=loaded)
    rows = [telemetry_cost(ab, b, min(args.new_tokens, 48), args.telemetry_repeats) for b in (1, 16)]
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
