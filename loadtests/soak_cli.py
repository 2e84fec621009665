"""Soak a live server: a mixed load for a fixed time, then check that nothing leaked.

The mix (seeded, reproducible): streamed and non-streamed completions and chat, client disconnects
mid-stream, aborts during prefill (a long prompt, then the client leaves), invalid bodies (bad
JSON, wrong types, NaN, bad UTF-8), prompts over the context window (-> 400), bodies over the
server's limit (-> 413), and every --burst-every seconds an overload burst past the admission
capacity (--max-num-seqs + --max-queue; -> 503 with Retry-After). Every second it samples the
server's RSS, open descriptors and threads (/proc/PID), KV blocks in use (/metrics); a thread
probes GET /health (event-loop lag) four times a second.

Examples
    python -m loadtests --soak 60 --launch "headwise serve --max-queue 16"
    python -m loadtests --soak 600 --server-pid 12345 --max-queue 16 --json soak.json
    python -m loadtests --soak 300            # the server listening on 127.0.0.1:8000, found in /proc

The server: --launch starts it (no shell; stopped with SIGTERM at the end, and it must exit 0),
--server-pid names it, else the process listening on --base-url's port is looked up in /proc.
Its --max-num-seqs, --max-queue and --max-body-bytes size the bursts and the oversize bodies:
read from the --launch command when it sets them, else headwise's defaults, unless given here.
Loopback only. Bounded: load for SECONDS, each request --request-timeout, the drain
--drain-timeout. Report on stdout (--json for the JSON), progress on stderr.
Exit status: 0 when every invariant holds, 1 when one fails (named on stderr), 2 for bad flags
or set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import random
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx

from loadtests import soak_launch, soak_mix, soak_proc
from loadtests.flags import positive
from loadtests.soak_report import report_json, table
from loadtests.soak_run import RunConfig, Soak
from loadtests.soak_verdict import Limits, checks, failures, summarize


class UsageError(Exception):
    """Bad flags or set-up: one line on stderr, exit status 2."""


def _weights(text: str) -> dict[str, float]:
    try:
        return soak_mix.parse_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m loadtests --soak", usage="%(prog)s SECONDS [options]",
                                description=doc[0] + "\n\n" + doc[1], epilog="\n\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--soak", metavar="SECONDS", type=positive(float), nargs="?", default=None,
                   help="seconds of load (required)")
    t = p.add_argument_group("server")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root on loopback (default: %(default)s)")
    t.add_argument("--api-key", default=None, help="sent as a Bearer token")
    who = t.add_mutually_exclusive_group()
    who.add_argument("--server-pid", type=positive(int), metavar="PID", help="the server's process id (for /proc)")
    who.add_argument("--launch", metavar="CMD", help='start the server with this command, e.g. "headwise serve '
                                                     '--max-queue 16"; stopped with SIGTERM at the end')
    t.add_argument("--launch-timeout", type=positive(float), default=300.0,
                   help="seconds for a launched server to answer /ready (default: 300)")
    t.add_argument("--launch-log", metavar="PATH", default=None,
                   help="the launched server's output (default: a temp file)")
    t.add_argument("--max-num-seqs", type=positive(int), default=None,
                   help="the server's (default: from --launch, else 16)")
    t.add_argument("--max-queue", type=positive(int), default=None,
                   help="the server's (default: from --launch, else 256)")
    t.add_argument("--max-body-bytes", type=positive(int), default=None,
                   help="the server's body limit (default: from --launch, else 4 MiB)")
    t.add_argument("--max-model-len", type=positive(int), default=None,
                   help="the context window (default: max_model_len of GET /v1/models)")
    t.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=positive(int), default=4, help="workers of the mix (default: 4)")
    load.add_argument("--rate", type=positive(float), default=None, metavar="REQ_PER_S",
                      help="pace the mix at this many requests/s in all (default: none, each worker sends "
                           "its next request when the last one ends)")
    load.add_argument("--max-tokens", type=positive(int), default=32,
                      help="most output tokens of a normal request (default: 32)")
    load.add_argument("--mix", type=_weights, default=dict(soak_mix.DEFAULT_WEIGHTS), metavar="KIND=W,...",
                      help="weights of the kinds (default: " + ",".join(f"{k}={v:g}" for k, v in
                                                                       soak_mix.DEFAULT_WEIGHTS.items()) + ")")
    load.add_argument("--seed", type=int, default=0, help="seeds the mix (default: 0)")
    load.add_argument("--burst-every", type=float, default=30.0,
                      help="seconds between overload bursts; 0: none (default: 30)")
    load.add_argument("--burst-size", type=positive(int), default=None,
                      help="requests per burst (default: max-num-seqs + max-queue + 8)")
    load.add_argument("--burst-max-tokens", type=positive(int), default=16, help="(default: 16)")
    load.add_argument("--busy-wait", type=float, default=1.0,
                      help="seconds a worker waits after a 503 before its next request (default: 1)")
    load.add_argument("--request-timeout", type=positive(float), default=120.0,
                      help="a request still open after this many seconds is hung (default: 120)")
    load.add_argument("--drain-timeout", type=positive(float), default=30.0,
                      help="seconds the KV blocks may take to come back after the load (default: 30)")
    w = p.add_argument_group("sampling and limits")
    w.add_argument("--sample-interval", type=positive(float), default=1.0, help="seconds (default: 1)")
    w.add_argument("--probe-interval", type=positive(float), default=0.25, help="GET /health every (default: 0.25 s)")
    w.add_argument("--probe-timeout", type=positive(float), default=10.0, help="a slower probe fails (default: 10 s)")
    w.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS slope is fitted (default: min(60, SECONDS / 4)); with "
                        "under 20 s of samples after it the slope is reported, not judged")
    w.add_argument("--max-rss-slope", type=positive(float), default=2.0, help="MB/min (default: 2)")
    w.add_argument("--rss-median", type=positive(int), default=5, metavar="N",
                   help="the slope is fitted to medians of N consecutive samples (default: 5; 1: to every sample)")
    w.add_argument("--max-fd-growth", type=int, default=10, help="descriptors, end minus start (default: 10)")
    w.add_argument("--max-lag-p99", type=positive(float), default=None, metavar="MS",
                   help="also fail when GET /health p99 is above this (default: report only)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", default=None, help="write the JSON report here")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines on stderr")
    return p


# ----------------------------------------------------------------------------- checks of flags
def check_loopback(base_url: str) -> int:
    """The port of a loopback http URL; UsageError otherwise."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise UsageError(f"--base-url {base_url!r}: expected http://HOST:PORT")
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = False
    if not loop:
        raise UsageError(f"--base-url {base_url!r}: the soak runs against loopback only (127.0.0.1, ::1, localhost)")
    try:
        return parts.port or 80
    except ValueError:
        raise UsageError(f"--base-url {base_url!r}: bad port") from None


def settings(args: argparse.Namespace) -> dict[str, int]:
    """max_num_seqs, max_queue, max_body_bytes: flags, else the --launch command, else defaults."""
    try:
        base = soak_launch.server_settings(shlex.split(args.launch) if args.launch else [])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


# ----------------------------------------------------------------------------- the server's facts
def mix_spec(args: argparse.Namespace, headers: dict, body_limit: int) -> soak_mix.MixSpec:
    """Model, window, and the words-to-tokens ratio (POST /tokenize, when the server has it)."""
    base = args.base_url.rstrip("/")
    try:
        models = httpx.get(base + "/v1/models", headers=headers, timeout=30).json().get("data") or [{}]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise UsageError(f"GET {base}/v1/models failed: {e}") from None
    window = args.max_model_len or models[0].get("max_model_len")
    if not isinstance(window, int) or window <= 0:
        raise UsageError("the server does not say its context window: give --max-model-len")
    model = args.model or models[0].get("id")
    sample = soak_mix.words(random.Random(0), 200)
    ratio, ids = 1.5, (1, 2, 3)
    try:
        r = httpx.post(base + "/tokenize", json={"prompt": sample}, headers=headers, timeout=30)
        tokens = r.json().get("tokens") if r.status_code == 200 else None
        if tokens:
            ratio, ids = len(tokens) / 200, tuple(sorted(set(tokens)))
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return soak_mix.MixSpec(model=model, max_model_len=window, max_body_bytes=body_limit, max_tokens=args.max_tokens,
                            tokens_per_word=ratio, token_ids=ids, weights=args.mix)


def find_pid(args: argparse.Namespace, port: int) -> int:
    if args.server_pid is not None:
        if not soak_proc.alive(args.server_pid):
            raise UsageError(f"--server-pid {args.server_pid}: no such process")
        return args.server_pid
    pid = soak_proc.listener_pid(port)
    if pid is None:
        raise UsageError(f"no readable process listens on port {port}: give --server-pid PID or --launch CMD")
    return pid


def wait_ready(base_url: str, headers: dict) -> None:
    try:
        r = httpx.get(base_url.rstrip("/") + "/ready", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise UsageError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise UsageError(f"{base_url}/ready answers {r.status_code}: the server is not ready")


# ----------------------------------------------------------------------------- run
def meta(args, argv, pid: int, spec: soak_mix.MixSpec, cfg: RunConfig, limits: Limits, sizes: dict,
         load_before) -> dict:
    return {
        "tool": "headwise loadtests soak", "report_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m loadtests " + shlex.join(argv),
        "target": {"base_url": args.base_url, "pid": pid, "launched": args.launch, "model": spec.model,
                   "max_model_len": spec.max_model_len, **sizes},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "headers"},
        "mix": dict(spec.weights), "tokens_per_word": round(spec.tokens_per_word, 3),
        "limits": dataclasses.asdict(limits),
        "machine": {"cpus": os.cpu_count(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
    }


def _temp_log() -> str:
    fd, path = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
    os.close(fd)
    return path


def _say(args) -> Callable[[str], None]:
    def say(line: str) -> None:
        if args.progress:
            print(line, file=sys.stderr, flush=True)
    return say


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    say = _say(args)
    load_before = os.getloadavg()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server = None
    try:
        if args.soak is None:
            raise UsageError("--soak needs SECONDS (python -m loadtests --soak --help)")
        port = check_loopback(args.base_url)
        sizes = settings(args)
        if args.launch:
            if soak_launch.answering(args.base_url):
                raise UsageError(f"something already answers at {args.base_url}; stop it, or drop --launch")
            log_path = args.launch_log or _temp_log()
            server = soak_launch.start(args.launch, log_path)
            say(f"soak launched pid={server.pid} log={log_path}")
            ready = soak_launch.wait_ready(server, args.base_url, args.launch_timeout)
            say(f"soak server ready after {ready:.1f}s")
            pid = server.pid
        else:
            pid = find_pid(args, port)
            wait_ready(args.base_url, headers)
        spec = mix_spec(args, headers, sizes["max_body_bytes"])
        warmup = args.warmup if args.warmup is not None else min(60.0, args.soak / 4)
        limits = Limits(max_rss_slope=args.max_rss_slope, warmup=warmup, smooth=args.rss_median,
                        max_fd_growth=args.max_fd_growth,
                        max_lag_p99_ms=args.max_lag_p99)
        cfg = RunConfig(base_url=args.base_url, duration=args.soak, headers=headers, concurrency=args.concurrency,
                        rate=args.rate, seed=args.seed, request_timeout=args.request_timeout,
                        sample_interval=args.sample_interval, probe_interval=args.probe_interval,
                        probe_timeout=args.probe_timeout, drain_timeout=args.drain_timeout,
                        burst_every=args.burst_every or None,
                        burst_size=args.burst_size or sizes["max_num_seqs"] + sizes["max_queue"] + 8,
                        burst_max_tokens=args.burst_max_tokens, busy_wait=max(0.0, args.busy_wait),
                        progress_every=10.0 if args.progress else 0.0)
        say(f"soak start duration={args.soak:g}s pid={pid} model={spec.model} window={spec.max_model_len} "
            f"workers={cfg.concurrency} rate={cfg.rate or 'closed-loop'} burst_size={cfg.burst_size} "
            f"burst_every={cfg.burst_every} seed={cfg.seed}")
        result = asyncio.run(Soak(cfg, spec, pid, say).run())
        if server is not None:
            result = dataclasses.replace(result, server_exit=soak_launch.stop(server))
            server = None
    except (UsageError, soak_launch.LaunchError) as e:
        print(f"loadtests --soak: error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            soak_launch.stop(server)
    summary = summarize(result, limits)
    found = checks(result, summary, limits, [k for k in soak_mix.KINDS if spec.weights.get(k, 0) > 0])
    header = (f"soak {args.soak:g} s against {args.base_url} (pid {pid}, model {spec.model}, window "
              f"{spec.max_model_len}), {cfg.concurrency} workers, seed {cfg.seed}")
    print(table(summary, found, header, limits.warmup), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_json(result, summary, found, meta(args, argv, pid, spec, cfg, limits, sizes, load_before)),
                      f, indent=2)
        say(f"soak wrote {args.json}")
    failed = failures(found)
    if failed:
        print(f"loadtests --soak: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
