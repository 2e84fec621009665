"""The same streaming requests from Locust, for teams that already run it.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 4 -t 60s \
        --input-len 128 --output-len 64

Each user sends synthetic prompts of exact token counts (as `python -m loadtests` does; the
server's POST /tokenize counts them unless --tokenizer names a .gguf file or a folder) and
reports, besides the request itself (with a streamed body Locust times it to the response
headers only), three entries per request in Locust's statistics: "TTFT" (first token), "TPOT"
(vLLM's time per output token, (E2E - TTFT) / (tokens - 1)) and "E2E" (end of the stream).
Locust has no histogram of our boundaries and no /metrics view: for those, and for ITL, use
`python -m loadtests`. Always pass --run-time: the run then ends
by itself. Run it from the repository root so that `loadtests` imports.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from locust import HttpUser, events, task  # noqa: E402

from loadtests import dataset  # noqa: E402
from loadtests.driver import chunk_tokens  # noqa: E402
from loadtests.target import Target, request_body  # noqa: E402
from loadtests.tokens import ServerTokenizer, load_local  # noqa: E402



@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    parser.add_argument("--input-len", type=int, default=128, help="synthetic prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--model", default="", help="model name to send (default: omitted)")
    parser.add_argument("--tokenizer", default="server", help="'server', 'default', a .gguf file or a folder")
    parser.add_argument("--server-kind", default="headwise", help="headwise, llamacpp, vllm or openai")
    parser.add_argument("--num-prompts", type=int, default=128,
                        help="distinct prompts, cycled (repeats hit a server's prefix cache: make it >= the "
                             "requests the run sends)")


@events.init.add_listener
def _prompts(environment, **_) -> None:
    """One shared, cycled list of prompts for all users, built before the run's clock starts."""
    opts = environment.parsed_options
    if opts is None:  # imported without a command line (e.g. by a test)
        return
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if opts.tokenizer == "server":
        import httpx

        with httpx.Client(timeout=30) as client:
            counter = ServerTokenizer(client, environment.host)
            prompts = dataset.synthetic(opts.num_prompts, opts.input_len, opts.output_len, counter,
                                        chat=opts.endpoint == "chat")
    else:
        prompts = dataset.synthetic(opts.num_prompts, opts.input_len, opts.output_len, load_local(opts.tokenizer),
                                    chat=opts.endpoint == "chat")
    environment.loadtests_prompts = itertools.cycle(prompts)
    environment.loadtests_target = Target(base_url="", model=opts.model or None, kind=opts.server_kind,
                                          endpoint=opts.endpoint)


class StreamingUser(HttpUser):
    """Sends one streaming request after another (no think time): a closed loop per user."""

    @task
    def generate(self) -> None:
        env = self.environment
        target: Target = env.loadtests_target
        body = request_body(target, next(env.loadtests_prompts))
        path = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
        start = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post(path, json=body, stream=True, catch_response=True, name=path) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            for raw in response.iter_lines():
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                obj = json.loads(line[5:])
                if "error" in obj:
                    response.failure(str(obj["error"])[:200])
                    return
                n, _ = chunk_tokens(obj, target.endpoint == "chat")
                if n and first is None:
                    first = time.perf_counter()
                tokens = (obj.get("usage") or {}).get("completion_tokens", tokens + n)
            if first is None:
                response.failure("no tokens received")
                return
            response.success()
        end = time.perf_counter()
        self._fire("TTFT", (first - start) * 1000.0)
        if tokens >= 2:
            self._fire("TPOT", (end - first) * 1000.0 / (tokens - 1))
        self._fire("E2E", (end - start) * 1000.0)

    def _fire(self, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type="STREAM", name=name, response_time=ms,
                                             response_length=0, exception=None, context={})
