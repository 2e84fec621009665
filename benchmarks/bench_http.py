"""HTTP overhead: the same prompts through `headwise serve` (SSE streaming, the official wire
format) and through the engine called directly, in one run.

    .venv/bin/python -m benchmarks.bench_http [--model PATH] [--new-tokens 64] [--concurrency 8]
                                              [--threads N] [--json out.json]

Measured on the client side in both cases, greedy, ignore_eos, same prompts (the chat template
applied the same way):
- time to first token: request sent (add_request called) -> first token's text received;
- decode tokens/s per stream: (tokens - 1) / (last token - first token);
- aggregate output tokens/s with `--concurrency` streams at once.
The engine is run first in this process, then released; the server runs in a subprocess with
the same engine flags. Times vary by tens of percent on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

from benchmarks.bench_engine import PROMPTS  # the same prompts as the engine benchmark


def log(msg: str) -> None:
    print(f"[bench-http] {msg}", file=sys.stderr, flush=True)


def summarize(runs: list[dict]) -> dict:
    """Client-side medians, and the same quantities as the engine measured them (inside the
    server for HTTP): the difference is what the path between engine and client costs."""
    def med(key, scale=1.0):
        values = [r[key] for r in runs if r.get(key)]
        return scale * statistics.median(values) if values else None
    return {"ttft_ms_median": med("ttft", 1000), "decode_tokens_per_s_median": med("rate"),
            "engine_ttft_ms_median": med("engine_ttft", 1000), "engine_decode_tokens_per_s_median": med("engine_rate"),
            "runs": len(runs)}


# ------------------------------------------------------------------------------ engine directly
async def engine_stream(engine, prompt: str, new_tokens: int) -> dict:
    from server.engine.request import SamplingParams

    t0 = time.perf_counter()
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])  # the chat template, as the API applies it
    rid = engine.add_request(ids, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    first = last = None
    tokens = 0
    async for ev in engine.astream(rid):
        now = time.perf_counter()
        if ev.token_ids:
            tokens += len(ev.token_ids)
            first = first or now
            last = now
    return {"ttft": first - t0, "rate": (tokens - 1) / (last - first) if last > first else None,
            "tokens": tokens, "engine_ttft": ev.stats.time_to_first_token, "engine_rate": ev.stats.decode_tokens_per_s}


async def engine_runs(engine, new_tokens: int, concurrency: int) -> tuple[list[dict], float]:
    single = [await engine_stream(engine, p, new_tokens) for p in PROMPTS]
    t0 = time.perf_counter()
    conc = await asyncio.gather(*(engine_stream(engine, PROMPTS[i % len(PROMPTS)], new_tokens)
                                  for i in range(concurrency)))
    wall = time.perf_counter() - t0
    return single, sum(r["tokens"] for r in conc) / wall


# ------------------------------------------------------------------------------ through HTTP
async def http_stream(client, url: str, model: str, prompt: str, new_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    server = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            server = chunk.get("timings") or server
            if not chunk["choices"]:
                continue
            n = len(chunk["choices"][0].get("token_ids") or ())
            if n:
                now = time.perf_counter()
                tokens += n
                first = first or now
                last = now
    return {"ttft": first - t0, "rate": (tokens - 1) / (last - first) if last > first else None, "tokens": tokens,
            "engine_ttft": server.get("time_to_first_token"), "engine_rate": server.get("decode_tokens_per_s")}


async def http_runs(url: str, model: str, new_tokens: int, concurrency: int) -> tuple[list[dict], float]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await http_stream(client, url, model, "Hello", 4)  # connection set-up out of the measurement
        single = [await http_stream(client, url, model, p, new_tokens) for p in PROMPTS]
        t0 = time.perf_counter()
        conc = await asyncio.gather(*(http_stream(client, url, model, PROMPTS[i % len(PROMPTS)], new_tokens)
                                      for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return single, sum(r["tokens"] for r in conc) / wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads, both sides (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    from server.config import CacheConfig, EngineConfig, SchedulerConfig
    from server.engine.engine import Engine

    engine_flags = ["--kv-cache-memory", "0.25", "--max-model-len", "2048"]
    if args.threads:
        engine_flags += ["--threads", str(args.threads)]
    log("loading the engine")
    engine = Engine(EngineConfig(model=args.model, cache=CacheConfig(memory_bytes=int(0.25 * 2**30)),
                                 scheduler=SchedulerConfig(max_model_len=2048), num_threads=args.threads))
    engine.start()

    async def direct():
        await engine_stream(engine, "Hello", 4)  # warm-up
        return await engine_runs(engine, args.new_tokens, args.concurrency)

    log("engine called directly")
    eng_single, eng_agg = asyncio.run(direct())
    engine.shutdown()
    del engine

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *engine_flags]
    if args.model:
        cmd += ["--model", args.model]
    log("starting " + " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        import httpx
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        log("through HTTP")
        http_single, http_agg = asyncio.run(http_runs(url, model, args.new_tokens, args.concurrency))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    e, h = summarize(eng_single), summarize(http_single)
    result = {
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "new_tokens": args.new_tokens, "prompts": len(PROMPTS), "concurrency": args.concurrency,
        "threads": args.threads,
        "engine": {**e, "aggregate_tokens_per_s": eng_agg},
        "http": {**h, "aggregate_tokens_per_s": http_agg},
        "overhead": {"ttft_ms_median": h["ttft_ms_median"] - e["ttft_ms_median"],
                     "decode_rate_ratio": (h["decode_tokens_per_s_median"] / e["decode_tokens_per_s_median"]),
                     "aggregate_rate_ratio": http_agg / eng_agg},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
