"""The real default model (SmolLM2-135M-Instruct) against transformers on the same GGUF weights."""

from __future__ import annotations

import math
import os

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import Engine
from server.engine.loader import default_model_path
from server.engine.request import SamplingParams

pytestmark = pytest.mark.slow

GREEDY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]


@pytest.fixture(scope="module")
def engine(default_model):
    return Engine(EngineConfig(cache=CacheConfig(memory_bytes=512 << 20)), loaded=default_model)


@pytest.fixture(scope="module")
def hf(default_model):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, attn_implementation="eager").eval()


def _ids(engine: Engine, prompt) -> list[int]:
    return engine.chat_prompt(prompt) if isinstance(prompt, list) else engine.tokenize(prompt)


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS, ids=range(len(GREEDY_PROMPTS)))
def test_greedy_64_tokens_equal_transformers_generate(engine, hf, prompt):
    ids = _ids(engine, prompt)
    ours = engine.generate([ids], SamplingParams(max_tokens=64, temperature=0))[0]
    eos = list(engine.model_config.eos_token_ids)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])[0, len(ids):].tolist()
    if ours.finish_reason.value == "stop":  # transformers keeps the EOS token; so do our token ids
        ref = ref[:len(ours.token_ids)]
    assert list(ours.token_ids) == ref


def _reference_stats(attn: torch.Tensor, rows: range) -> torch.Tensor:
    """[H, T, T] eager probabilities -> [H, 5] means over rows, in float64."""
    p_all = attn.double()
    acc = []
    for i in rows:
        p = p_all[:, i, :i + 1]                                     # [H, n]
        n = i + 1
        ent = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
        norm = ent / math.log(n) if n > 1 else torch.zeros_like(ent)
        j = torch.arange(n, dtype=torch.float64)
        look = (i - (p * j).sum(-1)) / i if i > 0 else torch.zeros_like(ent)
        acc.append(torch.stack([ent, norm, p.max(-1).values, p[:, :4].sum(-1), look], dim=-1))
    return torch.stack(acc).mean(0)


def test_request_telemetry_equals_eager_attention_statistics(engine, hf):
    ids = engine.chat_prompt([{"role": "user", "content": "Name three famous painters."}])
    out = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                               head_telemetry=True))[0]
    tel = out.head_telemetry
    assert tel.rows == len(out.token_ids) == 24
    assert (tel.layers, tel.heads, tel.kv_heads) == (30, 9, 3)
    fed = ids + list(out.token_ids[:-1])  # the last generated token is never fed back
    with torch.no_grad():
        attns = hf(torch.tensor([fed]), output_attentions=True).attentions  # L x [1, H, T, T]
    rows = range(len(ids) - 1, len(fed))
    names = ["entropy", "normalized_entropy", "max_weight", "sink_mass", "lookback_distance"]
    worst = 0.0
    for layer, a in enumerate(attns):
        ref = _reference_stats(a[0], rows)                          # [H, 5]
        for s, name in enumerate(names):
            ours = torch.tensor(getattr(tel, name)[layer], dtype=torch.float64)
            worst = max(worst, (ours - ref[:, s]).abs().max().item())
    assert worst < 1e-4, worst


def test_batch_invariance_16_prompts_tiny_cache(default_model):
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(8)] + [
        "The history of Rome", "Photosynthesis is", "My favourite food is", "In 1969, astronauts",
        "The best way to learn Python is", "Dear diary, today", "A list of prime numbers: 2, 3,", "Roses are red,"]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(max_tokens=20, temperature=0.8, top_k=40, seed=i, ignore_eos=True)
              for i in range(16)]
    solo = Engine(EngineConfig(cache=CacheConfig(memory_bytes=512 << 20)), loaded=default_model)
    expected = [solo.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    crowded = Engine(EngineConfig(cache=CacheConfig(num_blocks=16),
                                  scheduler=SchedulerConfig(max_model_len=256, max_num_batched_tokens=32)),
                     loaded=default_model)
    from tests.engine.test_engine import assert_blocks_all_free, run_staggered

    got = run_staggered(crowded, prompts, params)
    assert crowded.scheduler.num_preemptions > 0
    for i in range(16):
        assert got[i][0] == expected[i], f"prompt {i} differs"
    assert_blocks_all_free(crowded)
