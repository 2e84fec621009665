"""Structured output and logit_bias through the HTTP API, on the shared tiny-model server:
response_format (json_object, json_schema), vLLM's guided_* fields and structured_outputs, each
output satisfying its constraint; logit_bias banning and forcing tokens; constrained requests
leaving their greedy neighbours' outputs unchanged; bad constraints refused with a 400 naming
the field before anything is scheduled; streaming, head telemetry and the counter by type."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.api.serving import OpenAIServing
from server.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from server.engine.engine import Engine
from tests.api.conftest import metric
from tests.api.test_bad_input import assert_error_shape

C = "/v1/completions"
CH = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hello world!"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def post(server, path: str, body: dict | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url(path), content=body, headers={"content-type": "application/json"}, timeout=120)
    return httpx.post(server.url(path), json=body, timeout=120)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def texts(answer: dict) -> list[str]:
    """Each choice's output text, in index order (completions or chat)."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    return [c["text"] if "text" in c else c["message"]["content"] for c in choices]


def validates(value: dict) -> bool:
    """value matches SCHEMA."""
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 8
            and isinstance(value["age"], int) and 0 <= value["age"] <= 150
            and isinstance(value["tags"], list) and len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"})


# ------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("path,body", [(C, {"prompt": "Hello world"}), (CH, {"messages": MSG})], ids=["completions", "chat"])
def test_json_object_output_always_parses(server, path, body):
    """Every output the grammar ended (finish_reason stop) is a JSON object. (The random model
    also writes strings that run to max_tokens: those are cut, as any output would be.)"""
    stopped = 0
    for seed in (1, 2, 3):
        answer = ok(server, path, {**body, "response_format": {"type": "json_object"}, "n": 3, "seed": seed,
                                   "temperature": 1.0, "max_tokens": 200})
        for choice, text in zip(answer["choices"], texts(answer)):
            assert choice["finish_reason"] in ("stop", "length"), choice
            if choice["finish_reason"] == "stop":
                assert isinstance(json.loads(text), dict), text
                stopped += 1
            else:
                assert text.startswith("{"), text
    assert stopped >= 3


@pytest.mark.parametrize("constraint", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}},
    {"guided_json": SCHEMA},
    {"guided_json": json.dumps(SCHEMA)},
    {"structured_outputs": {"json": SCHEMA}},
], ids=["response_format", "guided_json", "guided_json-text", "structured_outputs"])
def test_json_schema_output_validates(server, constraint):
    for path, body in ((C, {"prompt": "Hello world"}), (CH, {"messages": MSG})):
        answer = ok(server, path, {**body, **constraint, "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 200})
        for text in texts(answer):
            assert validates(json.loads(text)), text


@pytest.mark.parametrize("field", ["guided_choice", "structured_outputs"])
def test_choice_output_is_always_one_of_the_choices(server, field):
    choices = ["red", "green", "blue sky", "日本"]
    constraint = {"guided_choice": choices} if field == "guided_choice" else {"structured_outputs": {"choice": choices}}
    seen = set()
    for seed in range(4):
        answer = ok(server, C, {"prompt": "Hello world", **constraint, "n": 4, "seed": seed, "temperature": 1.5,
                                "max_tokens": 20})
        seen |= set(texts(answer))
        assert all(c["finish_reason"] == "stop" for c in answer["choices"])
    assert seen <= set(choices) and len(seen) > 1


@pytest.mark.parametrize("field", ["guided_regex", "structured_outputs"])
def test_regex_output_matches(server, field):
    pattern = r"[0-9]{3}-[a-z]{2,4}( [A-Z])?"
    constraint = {"guided_regex": pattern} if field == "guided_regex" else {"structured_outputs": {"regex": pattern}}
    answer = ok(server, CH, {"messages": MSG, **constraint, "n": 4, "seed": 9, "temperature": 1.0, "max_tokens": 30})
    for text in texts(answer):
        assert re.fullmatch(pattern, text), text


def test_lark_grammar_output_matches(server):
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | /[0-9]{1,3}/'
    for body in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        answer = ok(server, C, {"prompt": "Hello", **body, "n": 3, "seed": 4, "max_tokens": 30})
        for text in texts(answer):
            assert re.fullmatch(r"The answer is (yes|no|[0-9]{1,3})\.", text), text


def test_structured_outputs_json_object(server):
    answer = ok(server, C, {"prompt": "Hello world", "structured_outputs": {"json_object": True}, "seed": 1,
                            "max_tokens": 200})
    assert answer["choices"][0]["finish_reason"] == "stop" and isinstance(json.loads(texts(answer)[0]), dict)
    free = ok(server, C, {"prompt": "Hello", "structured_outputs": {"json_object": False}, "response_format":
                          {"type": "text"}, "temperature": 0, "max_tokens": 8, "ignore_eos": True})
    assert free["usage"]["completion_tokens"] == 8  # false and text constrain nothing


def test_logit_bias_bans_and_forces(server):
    greedy = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
              "return_token_ids": True}
    base = ok(server, C, greedy)["choices"][0]["token_ids"]
    banned = ok(server, C, {**greedy, "logit_bias": {str(base[0]): -100}})["choices"][0]["token_ids"]
    assert base[0] not in banned and len(banned) == 12
    forced_id = next(t for t in range(40, 400) if t not in base)
    for path, body in ((C, {"prompt": "Hello"}), (CH, {"messages": MSG})):
        forced = ok(server, path, {**body, "max_tokens": 10, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                                   "return_token_ids": True, "logit_bias": {str(forced_id): 100, "5": -3.5}})
        assert forced["choices"][0]["token_ids"] == [forced_id] * 10


def test_logit_bias_composes_with_a_grammar(server):
    """A -100 bias on every digit but 7 leaves the digit regex only one way to go."""
    ids = {d: httpx.post(server.url("/tokenize"), json={"prompt": d, "add_special_tokens": False}).json()["tokens"]
           for d in "0123456789"}
    assert all(len(t) == 1 for t in ids.values())
    bias = {str(t[0]): -100 for d, t in ids.items() if d != "7"}
    answer = ok(server, C, {"prompt": "Hello", "guided_regex": "[0-9]{4}", "logit_bias": bias, "seed": 1,
                            "max_tokens": 10})
    assert texts(answer) == ["7777"]


def stream_lines(server, path: str, body: dict, started: threading.Event | None = None) -> tuple[list[str], float]:
    """The data lines of a streamed request, and when its last one arrived; `started` is set at
    the first."""
    lines = []
    with httpx.stream("POST", server.url(path), json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()[:300]
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if started is not None:
                    started.set()
    return lines, time.monotonic()


def test_constrained_requests_leave_greedy_neighbours_unchanged(server):
    greedy = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
              for p in ("The capital of France is", "Attention heads", "héllo wörld 😀")]
    solo = [ok(server, C, body)["choices"] for body in greedy]
    long = {"prompt": "Hi", "guided_regex": "[ab]{400}", "max_tokens": 450, "seed": 1}
    started = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        constrained = pool.submit(stream_lines, server, C, long, started)
        others = [pool.submit(ok, server, CH, {"messages": MSG, "response_format": {"type": "json_object"},
                                               "seed": i, "max_tokens": 60}) for i in range(3)]
        assert started.wait(60)

        def timed(body):
            return ok(server, C, body)["choices"], time.monotonic()

        batched = list(pool.map(timed, greedy))
        lines, constrained_done = constrained.result()
        [f.result() for f in others]
    assert [choices for choices, _ in batched] == solo  # text and token ids alike
    assert all(done < constrained_done for _, done in batched)  # they ran beside the constrained one
    text = "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1] if json.loads(line)["choices"])
    assert re.fullmatch("[ab]{400}", text)


# ------------------------------------------------------------------------------ streaming and telemetry
def test_streaming_with_response_format(server):
    body = {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            "seed": 7, "max_tokens": 200, "stream_options": {"include_usage": True}, "head_telemetry": True}
    lines, _ = stream_lines(server, CH, body)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert validates(json.loads(text))
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["head_telemetry"]["rows"] == chunks[-1]["usage"]["completion_tokens"]
    full = ok(server, CH, {**body, "stream_options": None})
    assert texts(full) == [text]  # same seed: streamed and not agree


def test_head_telemetry_of_a_constrained_request(server):
    answer = ok(server, C, {"prompt": "Hello", "guided_choice": ["alpha", "beta gamma"], "head_telemetry": True,
                            "max_tokens": 20, "seed": 0})
    t = answer["head_telemetry"]
    assert (t["layers"], t["heads"], t["kv_heads"]) == (3, 4, 2)
    assert t["rows"] == answer["usage"]["completion_tokens"] > 0
    assert len(t["entropy"]) == 3 and all(len(row) == 4 for row in t["entropy"])


def test_counter_counts_admitted_requests_by_type(server):
    requests = {"json_object": {"response_format": {"type": "json_object"}},
                "json_schema": {"guided_json": {"type": "integer"}},
                "regex": {"structured_outputs": {"regex": "[0-9]{2}"}},
                "choice": {"guided_choice": ["x", "y"]},
                "grammar": {"guided_grammar": 'start: "z"'}}
    before = {kind: metric(server, "headwise_structured_requests_total", type=kind) for kind in requests}
    for kind, constraint in requests.items():
        ok(server, C, {"prompt": "Hello", **constraint, "n": 2, "max_tokens": 30})  # n = 2 counts once
    post(server, C, {"prompt": "Hello", "guided_regex": "a(b"})  # refused: not counted
    post(server, C, {"prompt": "Hello", "max_tokens": 2})        # unconstrained: not counted
    after = {kind: metric(server, "headwise_structured_requests_total", type=kind) for kind in requests}
    assert {kind: after[kind] - before[kind] for kind in requests} == {kind: 1 for kind in requests}


# ------------------------------------------------------------------------------ bad input
def json_schema_format(schema, name: str = "out") -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}


# (id, path, extra body fields (bytes: the raw body), param, regex the message must match)
BAD = [
    ("schema-invalid-json", C, {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("schema-not-an-object-text", C, {"guided_json": "[1, 2]"}, "guided_json", "a JSON schema is an object"),
    ("schema-wrong-type", C, {"guided_json": 5}, "guided_json", "must be a JSON schema"),
    ("schema-unsupported-not", CH, json_schema_format({"type": "object", "not": {"type": "string"}}),
     "response_format", r"\bnot\b"),
    ("schema-unsatisfiable", CH, json_schema_format({"type": "string", "minLength": 5, "maxLength": 2}),
     "response_format", "nsatisfiable|minLength|no output"),
    ("schema-missing", CH, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ("schema-an-array", C, json_schema_format([1, 2]), "response_format.json_schema.schema", "must be an object"),
    ("schema-name-bad", CH, json_schema_format({"type": "object"}, name="a b"), "response_format.json_schema.name",
     "1 to 64 characters"),
    ("schema-name-long", CH, json_schema_format({"type": "object"}, name="x" * 65),
     "response_format.json_schema.name", "1 to 64 characters"),
    ("schema-nan", C, b'{"prompt": "Hi", "guided_json": {"type": "number", "maximum": NaN}}', "guided_json",
     "NaN"),
    ("schema-too-long", C, {"guided_json": {"enum": ["x" * 70_000]}}, "guided_json", "at most 65536 characters"),
    ("regex-does-not-compile", C, {"guided_regex": "a(b"}, "guided_regex", "unclosed group|parenthes|regex"),
    ("regex-empty", C, {"guided_regex": ""}, "guided_regex", "must not be empty"),
    ("regex-in-structured-outputs", C, {"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex",
     "range|regex|class"),
    ("grammar-does-not-compile", C, {"guided_grammar": "start: ("}, "guided_grammar", "."),
    ("choice-empty", C, {"guided_choice": []}, "guided_choice", "at least 1"),
    ("choice-not-strings", C, {"guided_choice": ["a", 2]}, "guided_choice[1]", "must be a string"),
    ("two-constraints", CH, {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex",
     "at most one output constraint.*response_format, guided_regex"),
    ("two-in-structured-outputs", C, {"structured_outputs": {"regex": "a+", "choice": ["b"]}},
     "structured_outputs.choice", "structured_outputs.regex, structured_outputs.choice"),
    ("structural-tag", C, {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
     "not supported"),
    ("response-format-type", C, {"response_format": {"type": "xml"}}, "response_format.type", "text"),
    ("logit-bias-key-word", C, {"logit_bias": {"abc": 1}}, "logit_bias", "decimal digits.*abc"),
    ("logit-bias-key-negative", C, {"logit_bias": {"-1": 1}}, "logit_bias", "decimal digits"),
    ("logit-bias-key-float", CH, {"logit_bias": {"1.5": 1}}, "logit_bias", "decimal digits"),
    ("logit-bias-key-twice", C, {"logit_bias": {"1": 1, "01": 2}}, "logit_bias", "token id 1 is given more than once"),
    ("logit-bias-too-big", C, {"logit_bias": {"1": 100.5}}, "logit_bias", r"\[-100, 100\].*100\.5"),
    ("logit-bias-too-small", CH, {"logit_bias": {"1": -101}}, "logit_bias", r"\[-100, 100\]"),
    ("logit-bias-string", C, {"logit_bias": {"1": "5"}}, "logit_bias", "must be a number"),
    ("logit-bias-bool", C, {"logit_bias": {"1": True}}, "logit_bias", "must be a number"),
    ("logit-bias-nan", C, b'{"prompt": "Hi", "logit_bias": {"1": NaN}}', "logit_bias", "must be a number"),
    ("logit-bias-not-a-map", C, {"logit_bias": [1, 2]}, "logit_bias", "object"),
    ("logit-bias-too-many", C, {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ("logit-bias-out-of-vocab", CH, {"logit_bias": {"3": 1, "999999": 1}}, "logit_bias", r"\[0, \d+\).*999999"),
]


@pytest.mark.parametrize("name,path,extra,param,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_are_refused_before_scheduling(server, name, path, extra, param, needle):
    base = {"prompt": "Hello", "max_tokens": 5} if path == C else {"messages": MSG, "max_tokens": 5}
    steps = metric(server, "headwise_engine_steps_total")
    err = assert_error_shape(post(server, path, extra if isinstance(extra, bytes) else {**base, **extra}), 400)
    assert err["param"] == param, err
    assert re.search(needle, err["message"]), err["message"]
    assert err["type"] == "invalid_request_error"
    assert metric(server, "headwise_engine_steps_total") == steps  # nothing was scheduled
    assert metric(server, "headwise_api_requests_in_flight") == 0


def test_bad_constraint_in_a_stream_is_refused_before_the_stream(server):
    r = post(server, CH, {"messages": MSG, "stream": True, "guided_regex": "(("})
    assert assert_error_shape(r, 400)["param"] == "guided_regex"


# ------------------------------------------------------------------------------ off the event loop
def test_grammar_is_compiled_off_the_event_loop(tiny_llama_dir):
    """One compile per request, in the tokenizer pool; its n engine requests copy the cached grammar."""
    engine = Engine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=64),
                                 scheduler=SchedulerConfig(max_model_len=128)))
    grammars = engine.inputs.grammars
    compiled_on: list[str] = []
    compile_once = grammars._compile
    grammars._compile = lambda spec: (compiled_on.append(threading.current_thread().name), compile_once(spec))[1]
    serving = OpenAIServing(engine, ServerConfig())

    async def never_disconnects() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def request() -> dict:
        body = {"prompt": "Hello", "n": 3, "max_tokens": 8, "guided_regex": "[0-9]{3}"}
        _, payload, _ = await serving.completions(json.dumps(body).encode(), never_disconnects)
        return json.loads(payload)

    engine.start()
    try:
        answer = asyncio.run(request())
    finally:
        serving.close()
        engine.shutdown()
    assert [re.fullmatch("[0-9]{3}", text) is not None for text in texts(answer)] == [True] * 3
    assert len(compiled_on) == 1 and compiled_on[0].startswith("headwise-tokenize")
