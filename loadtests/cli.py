"""Load-test an OpenAI-compatible server with streaming requests: time to first token, time per output token, inter-token and end-to-end latency, throughput, goodput (definitions and histogram boundaries: headwise's; against headwise, or vLLM, its /metrics view is shown beside the client's, with the per-head attention statistics where the server exports them: headwise serve, or vLLM carrying the headwise plugin).

Examples
    python -m loadtests --concurrency 4 --num-requests 32
    python -m loadtests --concurrency 1,4,8,16 --num-requests 32 --json sweep.json --plot sweep.png
    python -m loadtests --request-rate 0.5 --concurrency 16 --num-requests 50 --goodput ttft:2000 tpot:200
    python -m loadtests --base-url http://127.0.0.1:8080          # llama-server (its own /tokenize)
    python -m loadtests --base-url http://127.0.0.1:8000 --tokenizer path/to/model.gguf   # a server without /tokenize
    python -m loadtests --dataset-path prompts.jsonl --endpoint chat

Soak mode: python -m loadtests --soak SECONDS runs a mixed load (streams, disconnects, invalid and
oversize bodies, overload bursts) against a live server for a fixed time and checks that nothing
leaks (KV blocks, memory, descriptors) and nothing hangs; python -m loadtests --soak --help.

Every run is bounded: --num-requests per load point, --max-duration seconds per load point
(then in-flight requests are cut off and counted as failed), --request-timeout per request.
Exit status: 0 when every request completed, 1 when any failed, 2 for bad flags or set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence

from loadtests import dataset, plot, server_metrics, table
from loadtests.flags import positive
from loadtests.driver import run_point
from loadtests.records import LoadPoint, Prompt, RequestRecord
from loadtests.report import PointResult, report_json
from loadtests.stats import PERCENTILES, Slo, summarize
from loadtests.target import KINDS, Target, probe
from loadtests.tokens import TokenizerError, load_local, server_or_model_tokenizer
from server.latency import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS


METRICS_KINDS = ("headwise", "vllm")  # servers whose /metrics the report reads (server_metrics.family)


class UsageError(Exception):
    """A flag combination or set-up problem, reported as one line and exit status 2."""


def histogram_bounds() -> dict[str, tuple[float, ...]]:
    """The server's histogram boundaries (server/latency.py), per latency metric."""
    return {"ttft": TTFT_BUCKETS, "tpot": TOKEN_LATENCY_BUCKETS, "itl": TOKEN_LATENCY_BUCKETS,
            "e2e": REQUEST_LATENCY_BUCKETS}


# ----------------------------------------------------------------------------- flags
def _numbers(kind: type, name: str):
    def parse(text: str) -> list:
        try:
            values = [kind(math.inf if kind is float and v.strip() == "inf" else v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected comma-separated numbers, got {text!r}") from None
        if any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name}: values must be > 0")
        return values
    return parse


def parse_slo(items: Sequence[str] | None) -> Slo:
    """["ttft:500", "tpot:50", "e2e:10000"] (milliseconds, vLLM's --goodput form) -> Slo (seconds)."""
    values: dict[str, float] = {}
    for item in items or ():
        key, _, ms = item.partition(":")
        key = {"e2el": "e2e"}.get(key.strip().lower(), key.strip().lower())
        if key not in ("ttft", "tpot", "e2e"):
            raise UsageError(f"--goodput {item!r}: the metric must be ttft, tpot or e2e")
        try:
            values[key] = float(ms) / 1000.0
        except ValueError:
            raise UsageError(f"--goodput {item!r}: expected METRIC:MILLISECONDS") from None
    return Slo(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1 (default: %(default)s)")
    t.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    t.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    t.add_argument("--api-key", default=None, help="sent as a Bearer token")
    t.add_argument("--server-kind", choices=("auto",) + KINDS, default="auto",
                   help="decides extension fields (ignore_eos, return_token_ids), the /tokenize dialect and "
                        "/metrics reading; auto: detected from /metrics and /props (vLLM with the headwise "
                        "plugin is vllm)")
    load = p.add_argument_group("load (a comma-separated list in one of the two makes a sweep)")
    load.add_argument("--concurrency", type=_numbers(int, "--concurrency"), default=None,
                      help="most requests in flight (default: 1 without --request-rate, else unbounded)")
    load.add_argument("--request-rate", type=_numbers(float, "--request-rate"), default=None,
                      help="Poisson arrivals, requests/s ('inf': all at once; default)")
    load.add_argument("--num-requests", type=positive(int), default=32, help="requests per load point (default: 32)")
    load.add_argument("--max-duration", type=positive(float), default=300.0,
                      help="seconds per load point before sending stops and in-flight requests are cut off "
                           "(default: 300)")
    load.add_argument("--request-timeout", type=positive(float), default=300.0, help="seconds per request (default: 300)")
    load.add_argument("--warmup", type=int, default=1, help="requests sent one by one before measuring (default: 1)")
    load.add_argument("--seed", type=int, default=0, help="seeds prompts and arrival times (default: 0)")
    d = p.add_argument_group("prompts")
    d.add_argument("--dataset-path", default=None, help="JSONL file of {\"prompt\"} or {\"messages\"} lines "
                                                        "(optional \"max_tokens\"); default: synthetic prompts")
    d.add_argument("--input-len", type=positive(int), default=128, help="synthetic prompt tokens (default: 128)")
    d.add_argument("--output-len", type=positive(int), default=64, help="output tokens per request (default: 64)")
    d.add_argument("--tokenizer", default="server",
                   help="counts synthetic prompt tokens: 'server' (default: POST /tokenize in the server "
                        "kind's dialect, else the served model's files if its id is a local path), 'default' "
                        "(headwise's default model), a .gguf file or a Hugging Face folder")
    d.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at end-of-sequence (default: ignore_eos, exact output lengths)")
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLOs for goodput, e.g. ttft:500 tpot:100 e2e:10000")
    o.add_argument("--percentiles", type=_numbers(float, "--percentiles"), default=list(PERCENTILES),
                   help="percentiles to report (default: 50,90,99)")
    o.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    o.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of latency percentiles vs throughput")
    o.add_argument("--no-per-request", dest="per_request", action="store_false",
                   help="leave per-request rows out of the JSON report")
    o.add_argument("--no-server-metrics", dest="server_metrics", action="store_false",
                   help="do not read the server's /metrics")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    s = p.add_argument_group("soak")
    s.add_argument("--soak", metavar="SECONDS", help="run the soak mode instead: its own flags, "
                                                     "see python -m loadtests --soak --help")
    return p


def wants_soak(argv: Sequence[str]) -> bool:
    return any(a == "--soak" or a.startswith("--soak=") for a in argv)


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    conc, rate = args.concurrency, args.request_rate
    if conc and rate and len(conc) > 1 and len(rate) > 1:
        raise UsageError("sweep one of --concurrency and --request-rate, not both")
    if rate is None:
        rate = [math.inf]
        conc = conc or [1]
    conc = conc or [None]
    norm = [None if math.isinf(r) else r for r in rate]
    return [LoadPoint(c, r) for c in conc for r in norm]


# ----------------------------------------------------------------------------- prompts
def build_prompts(args: argparse.Namespace, count: int, target: Target) -> list[Prompt]:
    chat = args.endpoint == "chat"
    if args.dataset_path:
        return dataset.from_jsonl(args.dataset_path, count, args.output_len, chat=chat)
    if args.tokenizer == "server":
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(timeout=30, headers=headers) as client:
            counter = server_or_model_tokenizer(client, args.base_url, target.kind, target.model)
            return dataset.synthetic(count, args.input_len, args.output_len, counter, seed=args.seed, chat=chat)
    return dataset.synthetic(count, args.input_len, args.output_len, load_local(args.tokenizer),
                             seed=args.seed, chat=chat)


# ----------------------------------------------------------------------------- running
class _Progress:
    """A tqdm bar on stderr for one load point (or nothing)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.bar = None
        self.failed = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True, leave=True)

    def __call__(self, record: RequestRecord) -> None:
        self.failed += 0 if record.ok else 1
        if self.bar is not None:
            self.bar.update(1)
            if self.failed:
                self.bar.set_postfix(failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def _settled_scrape(client, target: Target, before, completed: int):
    """The /metrics after a run, once the server has counted the finished requests (<= 2 s)."""
    after = None
    for _ in range(20):
        after = await server_metrics.scrape(client, target.base_url, target.headers)
        if after is None or before is None:
            return after
        done = server_metrics.counter_delta(before, after,
                                            server_metrics.family(server_metrics.COUNTERS["request_success"], target.kind))
        if done is None or done >= completed:
            return after
        await asyncio.sleep(0.1)
    return after


async def run_all(args: argparse.Namespace, points: list[LoadPoint], prompts: list[Prompt], target: Target,
                  slo: Slo, bounds: dict) -> list[PointResult]:
    import httpx

    results = []
    warm = prompts[:args.warmup]
    measured = prompts[args.warmup:]
    async with httpx.AsyncClient(timeout=30) as scraper:
        for i, point in enumerate(points):
            batch = measured[i * args.num_requests:(i + 1) * args.num_requests]
            if i == 0 and warm:
                await run_point(target, warm, LoadPoint(1, None), max_duration=args.max_duration)
            read = args.server_metrics and target.kind in METRICS_KINDS
            before = await server_metrics.scrape(scraper, target.base_url, target.headers) if read else None
            # vLLM with several API server processes leaves the plugin's per-head families out of
            # /metrics; its GET /v1/telemetry still has them
            tele = (await server_metrics.telemetry(scraper, target.base_url, target.headers)
                    if before is not None and target.kind == "vllm"
                    and not before.label_values(server_metrics.HEAD_FAMILIES["entropy"] + "_count", "head") else None)
            progress = _Progress(args.progress, len(batch), point.label)
            try:
                run = await run_point(target, batch, point, max_duration=args.max_duration, seed=args.seed + i,
                                      on_done=progress)
            finally:
                progress.close()
            completed = sum(1 for r in run.requests if r.ok)
            after = await _settled_scrape(scraper, target, before, completed) if before is not None else None
            view = server_metrics.server_view(before, after, target.kind) if before is not None and after is not None else None
            if view is not None and view.heads is None and tele is not None:
                tele_after = await server_metrics.telemetry(scraper, target.base_url, target.headers)
                if tele_after is not None:
                    view = dataclasses.replace(view, heads=server_metrics.head_view_from_telemetry(tele, tele_after))
            result = PointResult(run=run, summary=summarize(run, bounds, slo, args.percentiles), server=view)
            results.append(result)
            print(table.point_table(result, slo), flush=True)
            print(flush=True)
    return results


async def resolve_target(args: argparse.Namespace) -> Target:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient() as client:
        kind, model = await probe(client, args.base_url, headers)
        try:
            await client.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        except httpx.HTTPError as e:
            raise UsageError(f"cannot reach {args.base_url}: {type(e).__name__}: {e}") from None
    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--extra-body: not JSON ({e.msg})") from None
    if not isinstance(extra, dict):
        raise UsageError("--extra-body must be a JSON object")
    return Target(base_url=args.base_url, model=args.model or model,
                  kind=kind if args.server_kind == "auto" else args.server_kind, endpoint=args.endpoint,
                  api_key=args.api_key, ignore_eos=args.ignore_eos, temperature=args.temperature,
                  request_timeout=args.request_timeout, extra_body=extra)


def meta(args: argparse.Namespace, argv: Sequence[str], target: Target, slo: Slo, load_before) -> dict:
    return {
        "tool": "headwise loadtests", "report_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m loadtests " + shlex.join(argv),
        "target": {"base_url": target.base_url, "kind": target.kind, "model": target.model,
                   "endpoint": target.endpoint},
        "dataset": {"source": args.dataset_path or "synthetic", "input_len": None if args.dataset_path else args.input_len,
                    "output_len": args.output_len, "ignore_eos": args.ignore_eos, "tokenizer": args.tokenizer,
                    "num_requests_per_point": args.num_requests, "warmup": args.warmup, "seed": args.seed},
        "slo_ms": {k: None if v is None else v * 1000 for k, v in (("ttft", slo.ttft), ("tpot", slo.tpot),
                                                                  ("e2e", slo.e2e))},
        "machine": {"cpus": os.cpu_count(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_soak(argv):
        from loadtests import soak_cli

        return soak_cli.main(argv)
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    try:
        slo = parse_slo(args.goodput)
        points = load_points(args)
        if args.warmup < 0:
            raise UsageError("--warmup must be >= 0")
        target = asyncio.run(resolve_target(args))
        prompts = build_prompts(args, args.warmup + args.num_requests * len(points), target)
        bounds = histogram_bounds()
    except (UsageError, dataset.DatasetError, TokenizerError) as e:
        print(f"loadtests: error: {e}", file=sys.stderr)
        return 2
    print(f"target {target.base_url} ({target.kind}, model {target.model}, /v1/{target.endpoint}); "
          f"{len(points)} load point(s) x {args.num_requests} requests", file=sys.stderr, flush=True)
    results = asyncio.run(run_all(args, points, prompts, target, slo, bounds))
    if len(results) > 1:
        print(table.sweep_table(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_json(results, meta(args, argv, target, slo, load_before),
                                  include_requests=args.per_request), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot.write_png(results, args.plot, f"{target.kind} {target.model or ''} — {target.base_url}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r.summary.failed for r in results) else 0
