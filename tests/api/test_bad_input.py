"""Bad input: every case answers 400 (404 for an unknown model or route, 405 for a wrong method)
with OpenAI's error object, small, without a traceback or a file path, and the server stays up."""

from __future__ import annotations

import json

import httpx
import pytest

C = "/v1/completions"
CH = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]


def comp(**kw) -> dict:
    return {"prompt": "Hello", "max_tokens": 2, **kw}


def chat(**kw) -> dict:
    return {"messages": MSG, "max_tokens": 2, **kw}


# (id, path, body (dict -> JSON, bytes -> raw), status, param expected (None: not checked), code expected)
CASES = [
    ("invalid-json", C, b'{"prompt": ', 400, None, "invalid_json"),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None, "invalid_encoding"),
    ("lone-surrogate", C, b'{"prompt": "\\ud800"}', 400, None, "invalid_json"),
    ("body-array", C, b"[1, 2]", 400, None, None),
    ("body-number", C, b"42", 400, None, None),
    ("body-null", C, b"null", 400, None, None),
    ("body-empty", C, b"", 400, None, None),
    ("deep-nesting", C, b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, None),
    ("huge-integer", C, b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, None),
    ("prompt-missing", C, {"max_tokens": 2}, 400, "prompt", None),
    ("prompt-number", C, comp(prompt=5), 400, "prompt", None),
    ("prompt-bools", C, comp(prompt=[True, False]), 400, "prompt", None),
    ("prompt-mixed", C, comp(prompt=["a", 1]), 400, "prompt", None),
    ("prompt-empty-string", C, comp(prompt=""), 400, "prompt", None),
    ("prompt-empty-list", C, comp(prompt=[]), 400, "prompt", None),
    ("prompt-token-out-of-vocab", C, comp(prompt=[999999]), 400, "prompt", None),
    ("prompt-token-negative", C, comp(prompt=[-1]), 400, None, None),
    ("prompt-too-many", C, comp(prompt=["a"] * 17), 400, "prompt", None),
    ("temperature-nan", C, b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature", None),
    ("temperature-infinity", C, b'{"prompt": "Hi", "temperature": Infinity}', 400, "temperature", None),
    ("temperature-neg-infinity", C, b'{"prompt": "Hi", "temperature": -Infinity}', 400, "temperature", None),
    ("temperature-overflow", C, b'{"prompt": "Hi", "temperature": 1e999}', 400, "temperature", None),
    ("temperature-string", C, comp(temperature="hot"), 400, "temperature", None),
    ("temperature-negative", C, comp(temperature=-1), 400, "temperature", None),
    ("temperature-too-high", C, comp(temperature=3), 400, "temperature", None),
    ("top-p-zero", C, comp(top_p=0), 400, "top_p", None),
    ("top-p-above-one", C, comp(top_p=1.5), 400, "top_p", None),
    ("max-tokens-zero", C, comp(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", C, comp(max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-float", C, comp(max_tokens=1.5), 400, "max_tokens", None),
    ("max-tokens-string", C, comp(max_tokens="10"), 400, "max_tokens", None),
    ("max-tokens-bool", C, comp(max_tokens=True), 400, "max_tokens", None),
    ("max-tokens-huge", C, comp(max_tokens=10**30), 400, "max_tokens", None),
    ("n-zero", C, comp(n=0), 400, "n", None),
    ("n-above-limit", C, comp(n=17), 400, "n", None),
    ("n-absurd", C, comp(n=10**6), 400, "n", None),
    ("logprobs-too-many", C, comp(logprobs=21), 400, "logprobs", None),
    ("logprobs-negative", C, comp(logprobs=-1), 400, "logprobs", None),
    ("presence-penalty-range", C, comp(presence_penalty=3), 400, "presence_penalty", None),
    ("frequency-penalty-nan", C, b'{"prompt": "Hi", "frequency_penalty": NaN}', 400, "frequency_penalty", None),
    ("top-k-negative", C, comp(top_k=-2), 400, "top_k", None),
    ("min-p-range", C, comp(min_p=2), 400, "min_p", None),
    ("repetition-penalty-zero", C, comp(repetition_penalty=0), 400, "repetition_penalty", None),
    ("stop-number", C, comp(stop=5), 400, "stop", None),
    ("stop-empty-string", C, comp(stop=[""]), 400, "stop", None),
    ("stop-too-many", C, comp(stop=[f"s{i}" for i in range(100)]), 400, "stop", None),
    ("stop-token-ids-negative", C, comp(stop_token_ids=[-3]), 400, None, None),
    ("seed-string", C, comp(seed="abc"), 400, "seed", None),
    ("seed-too-large", C, comp(seed=2**70), 400, "seed", None),
    ("stream-string", C, comp(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", C, comp(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("min-tokens-above-max", C, comp(min_tokens=5, max_tokens=2), 400, "min_tokens", None),
    ("logit-bias-key-not-an-id", C, comp(logit_bias={"abc": 5}), 400, "logit_bias", "invalid_value"),
    ("logit-bias-out-of-range", C, comp(logit_bias={"1": 101}), 400, "logit_bias", "invalid_value"),
    ("suffix", C, comp(suffix="x"), 400, "suffix", "unsupported_parameter"),
    ("best-of", C, comp(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("head-telemetry-string", C, comp(head_telemetry="yes"), 400, "head_telemetry", None),
    ("context-prompt-too-long", C, comp(prompt="Hello " * 700, max_tokens=1), 400, None, "context_length_exceeded"),
    ("context-prompt-plus-max-tokens", C, comp(prompt="Hello", max_tokens=512), 400, "max_tokens",
     "context_length_exceeded"),
    ("model-unknown", C, comp(model="gpt-4o"), 404, "model", "model_not_found"),
    ("model-wrong-type", C, comp(model=5), 400, "model", None),
    ("content-type-form", C, "form", 400, None, "unsupported_media_type"),
    ("chat-messages-missing", CH, {"max_tokens": 2}, 400, "messages", None),
    ("chat-messages-empty", CH, chat(messages=[]), 400, "messages", None),
    ("chat-messages-string", CH, chat(messages="hi"), 400, "messages", None),
    ("chat-message-no-role", CH, chat(messages=[{"content": "hi"}]), 400, "messages[0].role", None),
    ("chat-message-bad-role", CH, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
    ("chat-content-number", CH, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("chat-content-image", CH, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]), 400, None, None),
    ("chat-content-part-no-text", CH, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     None, None),
    ("chat-user-content-null", CH, chat(messages=[{"role": "user", "content": None}]), 400, "messages[0].content",
     None),
    ("chat-tool-role", CH, chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "a"}]), 400,
     "messages[0].role", None),
    ("chat-top-logprobs-without-logprobs", CH, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("chat-top-logprobs-too-many", CH, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("chat-logprobs-string", CH, chat(logprobs="yes"), 400, "logprobs", None),
    ("chat-max-completion-tokens-zero", CH, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("chat-response-format-unknown", CH, chat(response_format={"type": "yaml"}), 400, "response_format.type", None),
    ("chat-response-format-no-schema", CH, chat(response_format={"type": "json_schema"}), 400, "response_format",
     None),
    ("chat-template-kwargs-tokenize", CH, chat(chat_template_kwargs={"tokenize": True}), 400,
     "chat_template_kwargs", None),
    ("chat-template-kwargs-nan", CH, b'{"messages": [{"role": "user", "content": "Hi"}], '
                                     b'"chat_template_kwargs": {"x": NaN}}', 400, "chat_template_kwargs", None),
    ("chat-template-kwargs-list", CH, chat(chat_template_kwargs=[1]), 400, "chat_template_kwargs", None),
    ("chat-tools", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    ("chat-n-too-many", CH, chat(n=100), 400, "n", None),
    ("chat-context-exceeded", CH, chat(messages=[{"role": "user", "content": "Hello " * 700}]), 400, None,
     "context_length_exceeded"),
    ("tokenize-nothing", "/tokenize", {}, 400, None, None),
    ("tokenize-both", "/tokenize", {"prompt": "a", "messages": MSG}, 400, None, None),
    ("tokenize-prompt-number", "/tokenize", {"prompt": 5}, 400, "prompt", None),
    ("detokenize-negative", "/detokenize", {"tokens": [-1]}, 400, None, None),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [999999]}, 400, "tokens", None),
    ("detokenize-string", "/detokenize", {"tokens": "abc"}, 400, "tokens", None),
]


def post(server, path: str, body) -> httpx.Response:
    if body == "form":
        return httpx.post(server.url(path), content=b"prompt=hi", timeout=30,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    if isinstance(body, bytes):
        return httpx.post(server.url(path), content=body, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(server.url(path), json=body, timeout=30)


def assert_error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.content) < 2000, len(r.content)
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 512
    assert isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    for leak in ("Traceback", 'File "', "/work/", "site-packages", ".py", "0x7f"):
        assert leak not in r.text, r.text
    return err


def test_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name,path,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, path, body, status, param, code):
    err = assert_error_shape(post(server, path, body), status)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if status == 400:
        assert err["type"] == "invalid_request_error"


def test_stream_requests_are_refused_before_the_stream(server):
    r = httpx.post(server.url(C), json=comp(stream=True, temperature=-1))
    assert_error_shape(r, 400)
    r = httpx.post(server.url(CH), json=chat(stream=True, messages=[{"role": "user", "content": "Hello " * 700}]))
    assert assert_error_shape(r, 400)["code"] == "context_length_exceeded"


def test_echoed_values_are_truncated(server):
    r = httpx.post(server.url(C), json=comp(temperature="x" * 100_000))
    err = assert_error_shape(r, 400)
    assert len(err["message"]) < 300
    many = {"prompt": "Hi", **{k: "bad" for k in ("temperature", "top_p", "n", "seed", "max_tokens", "top_k",
                                                  "min_p", "presence_penalty", "frequency_penalty", "user")}}
    err = assert_error_shape(httpx.post(server.url(C), json=many), 400)
    assert "more" in err["message"]


def test_unknown_route_and_method(server):
    err = assert_error_shape(httpx.get(server.url("/v1/nothing")), 404)
    assert err["code"] == "not_found"
    err = assert_error_shape(httpx.get(server.url(C)), 405)
    assert err["code"] == "method_not_allowed"


def test_boundary_context_fits(server):
    """prompt + max_tokens == context window is accepted (one past it is not)."""
    ids = httpx.post(server.url("/tokenize"), json={"prompt": "Hello"}).json()["tokens"]
    r = httpx.post(server.url(C), json={"prompt": ids, "max_tokens": 512 - len(ids), "ignore_eos": True,
                                        "stream": True}, timeout=120)
    assert r.status_code == 200
    assert json.loads(r.text.split("\n\n")[-3][6:])["choices"][0]["finish_reason"] == "length"
    r = httpx.post(server.url(C), json={"prompt": ids, "max_tokens": 513 - len(ids)})
    assert assert_error_shape(r, 400)["code"] == "context_length_exceeded"


def test_server_still_serves_after_bad_input(server):
    r = httpx.post(server.url(C), json=comp())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
