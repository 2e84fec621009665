"""The model runner: step buffers that live across steps never carry one sequence's layout into another's."""

from __future__ import annotations

import time

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import Engine
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import ScheduledRequest


@pytest.fixture(scope="module")
def runner(tiny_dir):
    return Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=64),
                               scheduler=SchedulerConfig(max_model_len=256))).runner


def _scheduled(rid: str, blocks: list[int], num_tokens: int, preemptions: int = 0) -> ScheduledRequest:
    req = Request(request_id=rid, prompt_token_ids=list(range(1, num_tokens + 1)), params=SamplingParams(),
                  arrival_time=time.monotonic(), max_tokens=4, block_ids=list(blocks), num_preemptions=preemptions)
    req.num_computed_tokens = num_tokens - 1
    return ScheduledRequest.of(req, 1)


def _table_row(runner, sched: ScheduledRequest) -> list[int]:
    meta = runner._fill([sched], None)
    return meta.block_table[0, :len(sched.request.block_ids)].tolist()


def test_block_table_rows_follow_the_sequence_they_hold(runner):
    bs = runner.block_size
    first = _scheduled("same", [1, 2, 3], 3 * bs)
    assert _table_row(runner, first) == [1, 2, 3]
    first.request.block_ids.append(4)                     # the same sequence grows: one more block
    first.request.token_ids.extend([1] * bs)
    first.request.num_computed_tokens += bs
    grown = ScheduledRequest.of(first.request, 1)
    assert _table_row(runner, grown) == [1, 2, 3, 4]
    # a new request that reuses a finished one's id, in the same row, with other blocks
    reused = _scheduled("same", [9, 8, 7, 6, 5], 5 * bs)
    assert _table_row(runner, reused) == [9, 8, 7, 6, 5]
    # the same request after a preemption: recomputed into new blocks
    req = reused.request
    req.block_ids[:] = [11, 12, 13, 14, 15]
    req.num_preemptions += 1
    assert _table_row(runner, ScheduledRequest.of(req, 1)) == [11, 12, 13, 14, 15]
    meta = runner._fill([ScheduledRequest.of(req, 1)], None)
    pos = req.num_computed_tokens
    assert meta.slot_mapping.tolist() == [req.block_ids[pos // bs] * bs + pos % bs]


@pytest.mark.parametrize("requested, model, want", [
    ("auto", "fp32", torch.float32), ("auto", "q4", torch.bfloat16),
    ("float32", "q4", torch.float32), ("bfloat16", "fp32", torch.bfloat16)])
def test_kv_cache_dtype_follows_the_activations_unless_named(requested, model, want, tiny_llama_dir,
                                                             tiny_llama_q4_dir):
    """auto: bfloat16 where every projection takes bfloat16 activations (the quantized model),
    float32 on the fp32 path (the exactness reference); a named dtype is used as is. The same
    memory budget holds twice the blocks in bfloat16."""
    path = tiny_llama_dir if model == "fp32" else tiny_llama_q4_dir
    engine = Engine(EngineConfig(model=path, cache=CacheConfig(memory_bytes=1 << 22, dtype=requested),
                                 scheduler=SchedulerConfig(max_model_len=256)))
    cache = engine.runner.cache
    assert cache.dtype == want and all(t.dtype == want for t in cache.k + cache.v)
    mc = engine.model_config
    assert engine.runner.num_blocks == (1 << 22) // (mc.kv_bytes_per_token(want.itemsize) * cache.block_size)
    out = engine.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="KV cache dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        CacheConfig(dtype="fp8")


@pytest.mark.parametrize("dtype, fmt, want", [
    ("bfloat16", "auto", torch.bfloat16), ("float16", "fp16", torch.float16), ("float32", "auto", torch.float32)])
def test_dtype_sets_the_projections_and_the_cache(dtype, fmt, want, tiny_llama_dir):
    """--dtype names the projections' weight and activation dtype (on a CPU too); the cache
    follows on CUDA only (on a CPU auto stays float32 unless every projection takes bfloat16)."""
    engine = Engine(EngineConfig(model=tiny_llama_dir, dtype=dtype, weight_format=fmt,
                                 cache=CacheConfig(num_blocks=32), scheduler=SchedulerConfig(max_model_len=128)))
    model = engine.runner.model
    assert model.activation_dtype == want
    assert all(lin.act_dtype == want for layer in model.layers for lin in (layer.qkv, layer.down))
    assert engine.runner.cache.dtype == (torch.bfloat16 if want == torch.bfloat16 else torch.float32)
    out = engine.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_a_dtype_that_contradicts_the_weight_format_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="dtype float16 runs fp16 weights, which conflicts with weight format bf16"):
        EngineConfig(model=tiny_llama_dir, dtype="float16", weight_format="bf16")  # before anything loads
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"):
        EngineConfig(dtype="fp8")
