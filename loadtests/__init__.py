"""Load-test client for OpenAI-compatible servers (headwise, llama.cpp's llama-server, vLLM).

    python -m loadtests --base-url http://127.0.0.1:8000 --concurrency 4 --num-requests 32 --json out.json

Reports what `vllm bench serve` reports: time to first token (TTFT), time per output token
(TPOT), inter-token latency (ITL) and end-to-end latency (E2E) as mean, median, p90 and p99;
request and output-token throughput; goodput under SLOs; peak concurrency. Definitions match
headwise's engine (DESIGN.md), and observations are binned into the histogram boundaries of
server/latency.py (the server's, in a pure-Python module: the client imports neither
prometheus_client nor the engine), so the client's view and the server's /metrics view compare
directly.

Modules, one job each: records (the dataclasses between layers), dataset (prompts), tokens
(token counting for exact prompt lengths), schedule (arrival times), driver (async streaming
requests), stats (pure statistics), server_metrics (/metrics before and after), report (JSON),
table (text), plot (PNG), sse (SSE lines as the standard splits them), flags (argparse values),
cli (flags -> runs).
locustfile.py drives the same requests from Locust.

The soak (python -m loadtests --soak SECONDS): soak_records (its dataclasses), soak_mix (the seeded
request mix), soak_client (one request -> Outcome), soak_probe (GET /health lag on a thread),
soak_proc (/proc: RSS, descriptors, the listening pid), soak_metrics (KV blocks from /metrics),
soak_launch (start and stop a server), soak_run (the timed run), soak_verdict (summary and
invariants, pure), soak_report (table and JSON), soak_cli (flags -> run).
"""
