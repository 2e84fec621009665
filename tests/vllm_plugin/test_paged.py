"""The plugin's accumulator math on a synthetic paged cache in vLLM CPU_ATTN's "vec" layout,
against a float64 softmax computed from the unpaged keys (no vLLM needed)."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.telemetry import finalize_stats
from server.vllm_plugin.paged import (StepSampler, row_accumulators, shared_step_rows, split_key_blocks, step_rows,
                                      telemetry_queries, vec_key_blocks, weight_table)
from tests.vllm_plugin.paged_fixtures import BS, D, H, KVH, paged_cache, reference, split_cache


@pytest.mark.parametrize("lens", [[1, 2, 31, 32, 33, 100], [257], [5, 64, 64, 97], [40, 40]])
def test_accumulators_match_float64_softmax(lens):
    g = torch.Generator().manual_seed(len(lens))
    keys = [torch.randn(n, KVH, D, generator=g) * 2 for n in lens]
    q = torch.randn(len(lens), H, D, generator=g) * 2                    # [R, H, D]
    cache, table = paged_cache(keys, num_blocks=64)
    ctx = torch.tensor(lens)
    step = step_rows(torch.arange(len(lens) + 1), ctx, table, BS)         # one decode row per sequence
    acc = row_accumulators(q, vec_key_blocks(cache), step, 1 / math.sqrt(D), weight_table(max(lens) + 7, 4))
    got = finalize_stats(acc, ctx).double()                               # [R, H, 5]
    want = torch.stack([reference(q[b], keys[b]) for b in range(len(lens))])
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().amax()


def test_bfloat16_cache_is_read_in_float32():
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(40, KVH, D, generator=g)]
    cache, table = paged_cache(keys, num_blocks=8)
    q = torch.randn(1, H, D, generator=g)
    step = step_rows(torch.tensor([0, 1]), torch.tensor([40]), table, BS)
    acc = row_accumulators(q.bfloat16(), vec_key_blocks(cache.bfloat16()), step, 1 / math.sqrt(D), weight_table(40, 4))
    assert acc.dtype == torch.float32
    want = reference(q.bfloat16()[0], keys[0].bfloat16())[None]
    assert torch.allclose(finalize_stats(acc, torch.tensor([40])).double(), want, atol=1e-4)


def test_vec_key_blocks_is_a_view_of_the_key_half():
    cache = torch.arange(2 * KVH * BS * 2 * D, dtype=torch.float32).view(2, KVH, BS, 2 * D)
    kb = vec_key_blocks(cache)
    assert kb.shape == (2, KVH, D, BS) and kb.data_ptr() == cache.data_ptr()
    # element [b, h, d, j] is at offset d * BS + j inside the (b, h) region, before the values
    assert kb[1, 2, 3, 5] == cache.view(2, KVH, -1)[1, 2, 3 * BS + 5]


def test_split_key_blocks_reads_the_gpu_layout_with_nhd_strides():
    """FLASH_ATTN / TRITON_ATTN: [NB, KVH, BS, 2 D] logical, keys in [..., :D]; vLLM may allocate
    it NHD ([NB, BS, KVH, 2 D] in memory). The K^T view reads the same keys either way, and the
    accumulators over it equal float64."""
    g = torch.Generator().manual_seed(5)
    lens = [3, 33, 64]
    keys = [torch.randn(n, KVH, D, generator=g) * 2 for n in lens]
    q = torch.randn(3, H, D, generator=g)
    ctx = torch.tensor(lens)
    want = torch.stack([reference(q[b], keys[b]) for b in range(3)])
    for nhd in (True, False):
        cache, table = split_cache(keys, num_blocks=12, nhd=nhd)
        kb = split_key_blocks(cache)                                              # [NB, KVH, D, BS]
        assert kb.shape == (12, KVH, D, BS) and kb.data_ptr() == cache.data_ptr()
        assert torch.equal(kb[int(table[1, 0]), 1, :, 0], keys[1][0, 1])
        step = step_rows(torch.arange(4), ctx, table, BS)
        got = finalize_stats(row_accumulators(q, kb, step, 1 / math.sqrt(D), weight_table(64, 4)), ctx).double()
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().amax()


def test_step_rows_take_each_sequences_last_row_and_skip_padding():
    qsl = torch.tensor([0, 1, 2, 7, 7, 10], dtype=torch.int32)            # decode, decode, prefill 5, empty, prefill 3
    seq = torch.tensor([9, 4, 5, 0, 40], dtype=torch.int32)
    table = torch.arange(5 * 4, dtype=torch.int32).view(5, 4)
    step = step_rows(qsl, seq, table, BS)
    assert step.rows.tolist() == [0, 1, 6, 9] and step.lens.tolist() == [9, 4, 5, 40]
    assert step.num_keys == 40 and step.width == 2
    assert step.block_ids.tolist() == [0, 1, 4, 5, 8, 9, 16, 17]
    assert step.masked.shape == (4, 1, 1, 40) and step.masked[1, 0, 0].tolist() == [False] * 4 + [True] * 36
    assert not step.first_rows
    decodes = step_rows(torch.arange(4), torch.tensor([7, 7, 7]), table[:3], BS)   # decode-only, equal lengths
    assert decodes.first_rows and decodes.masked is None and decodes.rows.tolist() == [0, 1, 2]
    q = torch.randn(5, H, D)
    assert telemetry_queries(q, decodes).data_ptr() == q.data_ptr()                 # a view, no gather
    assert torch.equal(telemetry_queries(q[:4].repeat(3, 1, 1), step), q[:4].repeat(3, 1, 1)[[0, 1, 6, 9]])
    assert step_rows(torch.tensor([0, 0]), torch.tensor([0]), table[:1], BS) is None


def test_step_rows_are_built_once_per_metadata_object():
    class Meta:
        query_start_loc = torch.tensor([0, 1])
        seq_lens = torch.tensor([3])
        block_table = torch.zeros(1, 2, dtype=torch.int32)

    a, b = Meta(), Meta()
    assert shared_step_rows(a, BS) is shared_step_rows(a, BS)
    assert shared_step_rows(b, BS) is not shared_step_rows(a, BS)


@pytest.mark.parametrize("rate, steps, taken", [(1.0, 50, 50), (0.0, 50, 0), (0.25, 100, 25), (0.1, 1000, 100),
                                                (1 / 3, 300, 100)])
def test_sampler_takes_exactly_the_rate(rate, steps, taken):
    s = StepSampler(rate)
    assert sum(s.take() for _ in range(steps)) == taken


def test_two_samplers_agree_step_by_step():
    a, b = StepSampler(0.3), StepSampler(0.3)
    assert [a.take() for _ in range(40)] == [b.take() for _ in range(40)]


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_sampler_refuses_a_rate_outside_0_1(rate):
    with pytest.raises(ValueError, match="sample rate"):
        StepSampler(rate)
