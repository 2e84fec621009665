"""GPU benchmark for issue 14 (the Triton attention backend): every figure it asks for, in one run.

    python -m benchmarks.bench_gpu_triton [--json gpu.json] [--new-tokens 128] [--repeats 3]

On one CUDA GPU, with randomly initialized models (no weights travel), --dtype bfloat16 (weights,
activations and KV cache; --dtype changes it):

  1. SmolLM2-135M shape: decode tokens/s at batch 1 and at a static batch of 128, for
     --attention-backend triton (decode through CUDA graphs), triton with --enforce-eager (what
     the graphs save), torch (the reference) and transformers' generate
     (targets: >= 1,500 tok/s single-stream; >= 20x transformers at batch 1, >= 10x at 128);
  2. Llama-3.2-1B shape: the decode step at batch 1 against the weight-read floor, a
     device-to-device copy of the weights' size (target: within 3x);
  3. telemetry on vs off at batch 1, 16 and 128, the engines stepping alternately
     (target: at most 2% of the decode step).

A decode step is timed only when every sequence of the batch decodes (prompts are prefilled
first, untimed); engines that are compared step alternately, so drift hits them alike.
transformers' decode step is (generate(n) - generate(1)) / (n - 1), the same batch, bf16.
Writes a table to stdout and the JSON (also printed) to --json. Refuses to run without CUDA;
--device cpu --smoke runs the same code on tiny shapes, to check the script itself (the triton
backend then needs TRITON_INTERPRET=1; without it only torch and transformers run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from benchmarks.bench_gpu import SMOLLM2_135M, random_llama
from benchmarks.report import emit

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5)
TARGETS = {"single_stream_tok_s": 1500.0, "vs_transformers_batch1": 20.0, "vs_transformers_batch128": 10.0,
           "floor_ratio_max": 3.0, "telemetry_pct_max": 2.0}


@dataclass(frozen=True)
class Plan:
    """What one run measures (the issue's sizes, or tiny ones for --smoke)."""

    small: dict                        # LlamaConfig fields of the "SmolLM2-135M" model
    large: dict                        # of the "Llama-3.2-1B" model
    batches: tuple[int, ...] = (1, 128)          # decode throughput batches
    telemetry_batches: tuple[int, ...] = (1, 16, 128)
    prompt_tokens: int = 100
    new_tokens: int = 128              # transformers' generate length; engine decode steps timed per repeat
    repeats: int = 3
    backends: tuple[str, ...] = ("triton", "torch")


def log(msg: str) -> None:
    print(f"[bench_gpu_triton] {msg}", file=sys.stderr, flush=True)


def sync_time(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def engine_for(path: str, loaded, device: str, backend: str, max_seqs: int, max_len: int, dtype: str,
               telemetry: bool = True, eager: bool = False):
    """An engine over the loaded model: weights, activations and KV cache in dtype (--dtype);
    decode steps through CUDA graphs unless eager (--enforce-eager; the torch backend has no
    graph plan and always runs eagerly). Attention time sampling off (its per-layer
    synchronization would be timed)."""
    from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
    from server.engine.engine import Engine

    cfg = EngineConfig(model=path, device=device, attention_backend=backend, dtype=dtype, enforce_eager=eager,
                       cache=CacheConfig(memory_bytes=4 << 30),
                       scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max(2048, max_seqs),
                                                 max_model_len=max_len),
                       telemetry=TelemetryConfig(enabled=telemetry, attention_time_sample_rate=0.0))
    return Engine(cfg, loaded=loaded)


def engines_for(path: str, loaded, device: str, backends: tuple[str, ...], max_seqs: int, max_len: int,
                dtype: str) -> dict:
    """The engines compared side by side: each backend, and the triton one also with --enforce-eager
    (what the CUDA graphs save)."""
    engines = {b: engine_for(path, loaded, device, b, max_seqs, max_len, dtype) for b in backends}
    if "triton" in backends:
        engines["triton_eager"] = engine_for(path, loaded, device, "triton", max_seqs, max_len, dtype, eager=True)
    return engines


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[(5 + i + j) % (vocab - 5) + 5 for j in range(length)] for i in range(batch)]


def decode_step_s(engines: dict, prompts: list[list[int]], steps: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per decode step of each engine with every sequence decoding: the prompts
    are prefilled first (untimed), then steps steps are timed, the engines stepping alternately."""
    from server.engine.request import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        ids = {}
        for name, eng in engines.items():
            ids[name] = [eng.add_request(p, params) for p in prompts]
            started: set[str] = set()
            while len(started) < len(prompts):
                started.update(ev.request_id for ev in eng.step())
        for _ in range(steps):
            for name, eng in engines.items():
                t0 = sync_time(device)
                eng.step()
                times[name].append(sync_time(device) - t0)
        for name, eng in engines.items():
            for rid in ids[name]:
                eng.abort(rid)
            while eng.has_unfinished():
                eng.step()
    return {name: statistics.median(t) for name, t in times.items()}


def hf_decode_step_s(hf, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """transformers' generate: seconds per decode step of a static batch, (t(n) - t(1)) / (n - 1)."""
    ids = torch.tensor(prompts, device=device)                       # [B, P]

    def gen(n: int) -> float:
        t0 = sync_time(device)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
        return sync_time(device) - t0

    gen(4)  # warm-up
    return (gen(new_tokens) - gen(1)) / (new_tokens - 1)


def copy_floor_s(nbytes: int, device: str, repeats: int = 20) -> float:
    """Median seconds of one device-to-device copy of nbytes (the weight-read floor)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)      # [nbytes]
    dst = torch.empty_like(src)                                      # [nbytes]
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = sync_time(device)
        dst.copy_(src)
        times.append(sync_time(device) - t0)
    return statistics.median(times)


def available_backends(plan: Plan, device: str) -> tuple[str, ...]:
    from server.engine.attention import BACKENDS

    return tuple(b for b in plan.backends if BACKENDS[b].supports(torch.device(device)))


def bench_small(plan: Plan, device: str, dtype: str, workdir: str) -> dict:
    """Figures 1 and 3 on the SmolLM2-135M-shaped model."""
    from transformers import AutoModelForCausalLM

    from server.engine.loader import load_model

    path = os.path.join(workdir, "small")
    random_llama(path, torch.bfloat16, device, **plan.small)
    loaded = load_model(path)
    vocab = plan.small["vocab_size"]
    max_len = plan.prompt_tokens + plan.new_tokens + 32
    backends = available_backends(plan, device)
    biggest = max(plan.batches + plan.telemetry_batches)
    engines = engines_for(path, loaded, device, backends, biggest, max_len, dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    res: dict = {"backends": list(engines), "decode": []}
    for batch in plan.batches:
        prompts = prompts_for(batch, plan.prompt_tokens, vocab)
        log(f"decode, batch {batch}: {', '.join(engines)} (alternating), transformers")
        step = decode_step_s(engines, prompts, min(plan.new_tokens, 64), plan.repeats, device)
        hf_step = hf_decode_step_s(hf, prompts, plan.new_tokens, device)
        row = {"batch": batch, "transformers_tok_s": batch / hf_step, "transformers_step_ms": hf_step * 1e3}
        for b, s in step.items():
            row[f"{b}_tok_s"] = batch / s
            row[f"{b}_step_ms"] = s * 1e3
            row[f"{b}_vs_transformers"] = hf_step / s
        res["decode"].append(row)
        log(f"  {row}")
    del hf
    if "triton" in engines:
        off = engine_for(path, loaded, device, "triton", biggest, max_len, dtype, telemetry=False)
        res["telemetry"] = []
        for batch in plan.telemetry_batches:
            log(f"telemetry on vs off, batch {batch} (triton, alternating)")
            step = decode_step_s({"on": engines["triton"], "off": off}, prompts_for(batch, plan.prompt_tokens, vocab),
                                 min(plan.new_tokens, 64), plan.repeats, device)
            row = {"batch": batch, "step_ms_on": step["on"] * 1e3, "step_ms_off": step["off"] * 1e3,
                   "overhead_pct": (step["on"] / step["off"] - 1) * 100}
            res["telemetry"].append(row)
            log(f"  {row}")
    return res


def bench_large(plan: Plan, device: str, dtype: str, workdir: str) -> dict:
    """Figure 2: the 1B-shaped model's decode step at batch 1 against a copy of its weights."""
    from server.engine.loader import load_model

    path = os.path.join(workdir, "large")
    params = random_llama(path, torch.bfloat16, device, **plan.large)
    loaded = load_model(path)
    nbytes = params * 2                                              # bf16 weights
    floor = copy_floor_s(nbytes, device)
    max_len = plan.prompt_tokens + plan.new_tokens + 32
    backends = available_backends(plan, device)
    engines = engines_for(path, loaded, device, backends, 1, max_len, dtype)
    log(f"1B-shaped decode at batch 1: {', '.join(engines)}; floor {floor * 1e3:.3f} ms for {nbytes / 2**30:.2f} GiB")
    step = decode_step_s(engines, prompts_for(1, plan.prompt_tokens, plan.large["vocab_size"]),
                         min(plan.new_tokens, 64), plan.repeats, device)
    res = {"params": params, "weight_bytes": nbytes, "copy_floor_ms": floor * 1e3,
           "copy_gb_s": 2 * nbytes / floor / 1e9}
    for b, s in step.items():
        res[f"{b}_step_ms"] = s * 1e3
        res[f"{b}_floor_ratio"] = s / floor
    log(f"  {res}")
    return res


def table(res: dict) -> str:
    """The figures against the issue's targets, one line each."""
    t = TARGETS
    lines = [f"{'figure':<58} {'value':>12} {'target':>10}  met"]

    def add(name: str, value: float, target: str = "", met: bool | None = None) -> None:
        mark = "" if met is None else "yes" if met else "NO"
        lines.append(f"{name:<58} {value:>12.2f} {target:>10}  {mark}")

    for row in res["small"]["decode"]:
        b = row["batch"]
        for key in ("triton", "triton_eager", "torch"):
            if f"{key}_tok_s" in row and b == 1 and key == "triton":
                add(f"135M batch 1: {key} decode tok/s", row[f"{key}_tok_s"], f">={t['single_stream_tok_s']:.0f}",
                    row[f"{key}_tok_s"] >= t["single_stream_tok_s"])
            elif f"{key}_tok_s" in row:
                add(f"135M batch {b}: {key} decode tok/s", row[f"{key}_tok_s"])
        add(f"135M batch {b}: transformers decode tok/s", row["transformers_tok_s"])
        if "triton_vs_transformers" in row:
            goal = t["vs_transformers_batch1"] if b == 1 else t["vs_transformers_batch128"]
            add(f"135M batch {b}: triton / transformers (x)", row["triton_vs_transformers"], f">={goal:.0f}",
                row["triton_vs_transformers"] >= goal)
    large = res.get("large")
    if large:
        add("1B batch 1: weight-copy floor (ms)", large["copy_floor_ms"])
        for key in ("triton", "triton_eager", "torch"):
            if f"{key}_step_ms" in large:
                add(f"1B batch 1: {key} decode step (ms)", large[f"{key}_step_ms"])
                add(f"1B batch 1: {key} step / floor (x)", large[f"{key}_floor_ratio"],
                    f"<={t['floor_ratio_max']:.0f}", large[f"{key}_floor_ratio"] <= t["floor_ratio_max"])
    for row in res["small"].get("telemetry", []):
        add(f"135M telemetry on vs off, batch {row['batch']} (%)", row["overhead_pct"],
            f"<={t['telemetry_pct_max']:.0f}", row["overhead_pct"] <= t["telemetry_pct_max"])
    return "\n".join(lines)


def versions(device: str) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu (smoke run)"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--new-tokens", type=int, default=128, help="transformers' generate length (default 128)")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="prompt length of every sequence (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per figure (default 3)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="the engines' --dtype: weights, activations and KV cache (default bfloat16)")
    ap.add_argument("--skip-large", action="store_true", help="skip the Llama-3.2-1B-shaped figure")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --smoke")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and batches: checks the script, not the GPU")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu_triton: needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
              "the figures of issue 14 are taken on a GPU. --device cpu --smoke checks the script itself.",
              file=sys.stderr)
        return 2
    if not args.device.startswith("cuda") and not args.smoke:
        print("bench_gpu_triton: --device cpu runs only with --smoke (tiny shapes; no figure of issue 14)",
              file=sys.stderr)
        return 2
    plan = Plan(small=SMOLLM2_135M, large=LLAMA_32_1B, prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, repeats=args.repeats)
    if args.smoke:
        plan = Plan(small=TINY, large=TINY, batches=(1, 4), telemetry_batches=(1, 2), prompt_tokens=8,
                    new_tokens=6, repeats=1)
    res: dict = {**versions(args.device), "dtype": args.dtype, "prompt_tokens": plan.prompt_tokens,
                 "new_tokens": plan.new_tokens, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as workdir:
        res["small"] = bench_small(plan, args.device, args.dtype, workdir)
        if not args.skip_large:
            res["large"] = bench_large(plan, args.device, args.dtype, workdir)
    print(table(res))
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
