"""Schemathesis against the live server's OpenAPI document: valid and invalid generated requests
to every route, and no answer may be a server error (5xx). Bounded: MAX_EXAMPLES per route and
mode, a tiny model with a 64-token context window (so generations stay short)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server("--max-model-len", "64", "--no-warmup", name="schemathesis")


def operations(srv):
    schema = schemathesis.openapi.from_url(srv.url("/openapi.json"))
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                       "/v1/models", "/health", "/ready", "/metrics"}
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_error(fuzz_server, mode):
    statuses: dict[str, set[int]] = {}
    for op in operations(fuzz_server):
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # no parameters and no body: nothing to make invalid

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call_and_validate(base_url=fuzz_server.base_url, checks=[not_a_server_error], timeout=60)
            statuses.setdefault(op.label, set()).add(response.status_code)

        run()
    print({k: sorted(v) for k, v in statuses.items()})
    r = httpx.post(fuzz_server.url("/v1/completions"), json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # still serving
