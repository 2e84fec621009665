"""The official openai client against a live tiny-model server: completions and chat, streamed
and not, n > 1, logprobs, stop, usage, timings, head telemetry, tokenizer routes, and greedy
text equal to transformers' greedy text on the same model."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from tests.api.conftest import metric

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]


def test_models_lists_the_served_model(client, model_id, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert httpx.get(server.url("/v1/models")).json()["data"][0]["max_model_len"] == 512


def test_health_ready_metrics(server):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    assert httpx.get(server.url("/ready")).status_code == 200
    for name in ("headwise_num_requests_running", "headwise_kv_cache_usage_ratio", "headwise_kv_cache_free_blocks"):
        assert metric(server, name) >= 0


def test_completion_non_streaming(client, model_id, server):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == model_id and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    timings = r.model_extra["timings"]
    assert timings["e2e_latency"] >= timings["time_to_first_token"] >= timings["queue_time"] >= 0
    assert timings["decode_tokens_per_s"] > 0


def test_timing_headers_on_non_streaming(server, model_id):
    r = httpx.post(server.url("/v1/completions"), json={"model": model_id, "prompt": PROMPT, "max_tokens": 4,
                                                        "ignore_eos": True})
    assert r.status_code == 200
    for h in ("x-headwise-queue-time", "x-headwise-ttft", "x-headwise-prefill-time", "x-headwise-decode-time",
              "x-headwise-e2e-time", "x-headwise-decode-tokens-per-s"):
        assert float(r.headers[h]) >= 0
    assert "ttft;dur=" in r.headers["server-timing"]
    assert float(r.headers["x-headwise-e2e-time"]) == pytest.approx(r.json()["timings"]["e2e_latency"], abs=1e-5)


def test_completion_streaming_matches_non_streaming_same_seed(client, model_id):
    kw = dict(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 50})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["timings"]["time_to_first_token"] > 0
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_streaming_matches_non_streaming_same_seed(client, model_id):
    kw = dict(model=model_id, messages=CHAT, max_completion_tokens=24, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 24
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert "timings" in last.model_extra


def test_sse_wire_format(server, model_id):
    """data: lines only, every chunk valid JSON, [DONE] last; coalesced chunks still add up."""
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 16, "stream": True, "ignore_eos": True,
            "temperature": 0, "return_token_ids": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 16


def test_greedy_equals_transformers_greedy(server, model_id, tiny_llama_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for prompt in (PROMPT, "Attention heads look back", "héllo wörld 😀"):
        ids = tok(prompt)["input_ids"]
        seq = list(ids)
        with torch.no_grad():  # plain greedy decoding, EOS not special (ignore_eos)
            for _ in range(24):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        ref = seq[len(ids):]
        r = httpx.post(server.url("/v1/completions"), json={
            "model": model_id, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}).json()
        assert r["choices"][0]["token_ids"] == ref
        assert r["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)


def test_chat_uses_the_chat_template(server, model_id, client):
    tokens = httpx.post(server.url("/tokenize"), json={"messages": CHAT}).json()
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=3)
    assert r.usage.prompt_tokens == tokens["count"]
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hello world!"}]}]
    r2 = client.chat.completions.create(model=model_id, messages=parts, max_tokens=3)
    assert r2.usage.prompt_tokens == tokens["count"]


def test_n_choices_with_seed_are_distinct_and_reproducible(client, model_id):
    kw = dict(model=model_id, prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=42,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    single = client.completions.create(**{**kw, "n": 1})
    assert single.choices[0].text == texts[0]
    assert a.usage.completion_tokens == 48 and a.usage.prompt_tokens == single.usage.prompt_tokens
    streamed = list(client.completions.create(stream=True, **kw))
    got = {i: "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)}
    assert [got[i] for i in range(3)] == texts


def test_batch_prompts(client, model_id):
    r = client.completions.create(model=model_id, prompt=["Hello", "The capital"], max_tokens=4, n=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    by_index = sorted(r.choices, key=lambda c: c.index)
    assert len(by_index) == 4 and by_index[0].text == by_index[1].text and by_index[2].text == by_index[3].text


def test_token_id_prompt_equals_text_prompt(server, model_id, client):
    ids = httpx.post(server.url("/tokenize"), json={"prompt": PROMPT}).json()["tokens"]
    a = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    b = client.completions.create(model=model_id, prompt=ids, max_tokens=8, temperature=0).choices[0].text
    assert a == b


def test_completion_logprobs(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4 and token in top
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy picks the argmax


def test_chat_logprobs_streamed(client, model_id):
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 4
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)
        if e.token.startswith("bytes:"):  # part of a multi-byte character, spelled as OpenAI does
            assert e.token == "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes)
        else:
            assert bytes(e.bytes).decode("utf-8") == e.token


def test_stop_string_and_stop_reason(client, model_id, server):
    base = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:6]
    assert stop and stop in base
    r = httpx.post(server.url("/v1/completions"), json={"model": model_id, "prompt": PROMPT, "max_tokens": 20,
                                                        "temperature": 0, "ignore_eos": True, "stop": [stop]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == base[:base.index(stop)]


def test_head_telemetry_contract(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True, "head_telemetry": True})
    t = r.model_extra["head_telemetry"]
    assert (t["layers"], t["heads"], t["kv_heads"], t["rows"]) == (3, 4, 2, 6)
    for name in ("entropy", "normalized_entropy", "max_weight", "sink_mass", "lookback_distance"):
        assert len(t[name]) == 3 and all(len(row) == 4 for row in t[name])
        assert all(math.isfinite(v) for row in t[name] for v in row)
    assert all(0 <= v <= 1 + 1e-6 for row in t["max_weight"] for v in row)
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, stream=True,
                                                 extra_body={"ignore_eos": True, "head_telemetry": True}))
    assert chunks[-1].model_extra["head_telemetry"]["rows"] == 5
    assert all("head_telemetry" not in c.model_extra for c in chunks[:-1])
    plain = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2)
    assert "head_telemetry" not in plain.model_extra


def test_tokenize_detokenize_roundtrip(server):
    text = "héllo wörld 😀 The capital"
    t = httpx.post(server.url("/tokenize"), json={"prompt": text, "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == len(t["token_strs"]) and t["max_model_len"] == 512
    d = httpx.post(server.url("/detokenize"), json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == text


def test_echo(client, model_id):
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith(PROMPT)


def test_model_aliases_accepted(server, model_id, tiny_llama_dir):
    for name in (model_id, model_id.upper(), tiny_llama_dir):
        r = httpx.post(server.url("/v1/completions"), json={"model": name, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert httpx.post(server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_openai_exception_classes(client, model_id):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="Hi", max_tokens=1, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=1)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt="Hi " * 300, max_tokens=400)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # the stream is refused before it starts: a real 400
        client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=1, stream=True, top_p=0)
