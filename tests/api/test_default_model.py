"""`headwise serve` with no --model (the real default model, SmolLM2-135M-Instruct): chat through
the official client, greedy tokens equal to transformers' greedy tokens on the same GGUF weights."""

from __future__ import annotations

import os

import openai
import pytest
import torch

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_model_chat_greedy_equals_transformers(start_server, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from server.engine.loader import default_model_path

    srv = start_server("--max-model-len", "1024", "--kv-cache-memory", "0.1", model=None, name="default-model")
    with openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=120) as client:
        model = client.models.list().data[0].id
        assert "SmolLM2-135M-Instruct" in model
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=32,
                                           temperature=0, extra_body={"return_token_ids": True})
        ours = r.choices[0].model_extra["token_ids"]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert "Paris" in r.choices[0].message.content
    assert streamed == r.choices[0].message.content

    import httpx
    prompt_ids = httpx.post(srv.url("/tokenize"), json={"messages": MESSAGES}).json()["tokens"]
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=list(hf.generation_config.eos_token_id if isinstance(
                              hf.generation_config.eos_token_id, list) else [hf.generation_config.eos_token_id]),
                          pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert ours == ref[:len(ours)] and (len(ours) == len(ref) or r.choices[0].finish_reason == "stop")
