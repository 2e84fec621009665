"""Decode graphs (server/engine/cuda_graphs.py): buckets, and a graphed engine against an eager one.

Without CUDA the graphs cannot be captured, but everything around them runs: the runner's
decode-only steps go through DecodeGraphs.replay, which pads the batch to its bucket in the
persistent buffers and runs the Triton backend's graph plan (in Triton's interpreter) exactly as
a graph would replay it. With CUDA the same test captures and replays real graphs.
"""

from __future__ import annotations

import pytest
import torch

from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.cuda_graphs import buckets_for
from server.engine.engine import Engine
from server.engine.request import SamplingParams

PROMPTS = ["The capital of France is", "Hello world! 1 2 3", "A", "look back over the context window",
           "some attend to the first token"]


@pytest.mark.parametrize("max_seqs,want", [(1, (1,)), (2, (1, 2)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16))])
def test_buckets(max_seqs, want):
    assert buckets_for(max_seqs) == want


def engine(path: str, device: torch.device, graphs: bool, **telemetry) -> Engine:
    eng = Engine(EngineConfig(model=path, device=str(device), attention_backend="triton", enforce_eager=not graphs,
                              cache=CacheConfig(num_blocks=64),
                              scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64),
                              telemetry=TelemetryConfig(attention_time_sample_rate=0.0, **telemetry)))
    if graphs and eng.runner.graphs is None:  # a CPU: replay the graph plans eagerly
        eng.runner.graphs = eng.runner.decode_graphs()
    if not graphs:
        assert eng.runner.graphs is None
    return eng


@pytest.mark.slow
@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_graphed_decode_matches_eager(triton_dev, tiny_llama_dir, sample_rate):
    """Same tokens and per-request telemetry as eager steps, over batches padded to their bucket
    (5 sequences -> bucket 8, then fewer as they finish), with telemetry on every step or on
    some (one graph serves both); padded rows never write the cache."""
    graphed = engine(tiny_llama_dir, triton_dev, True, sample_rate=sample_rate)
    eager = engine(tiny_llama_dir, triton_dev, False, sample_rate=sample_rate)
    replays = []
    real_replay = graphed.runner.graphs.replay
    graphed.runner.graphs.replay = lambda n, width, stats: replays.append((n, len(stats))) or real_replay(n, width, stats)
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0, ignore_eos=True, head_telemetry=True)
              for i in range(len(PROMPTS))]
    got, want = graphed.generate(PROMPTS, params), eager.generate(PROMPTS, params)
    assert {n for n, _ in replays} >= {5, 1}, replays         # bucket 8 with 3 padded rows, and bucket 1
    if sample_rate < 1:
        assert any(s == 0 for _, s in replays) and any(s > 0 for _, s in replays)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert a.head_telemetry.rows == b.head_telemetry.rows
        for name in ("entropy", "sink_mass", "lookback_distance", "max_weight"):
            mine, ref = torch.tensor(getattr(a.head_telemetry, name)), torch.tensor(getattr(b.head_telemetry, name))
            assert (mine - ref).abs().max() < 1e-5, name
    snap_a, snap_b = graphed.head_stats_snapshot(), eager.head_stats_snapshot()
    assert torch.equal(snap_a.counts, snap_b.counts)
    cache = graphed.runner.cache
    for k, v in zip(cache.k, cache.v):
        assert not k[cache.num_blocks].any() and not v[cache.num_blocks].any()   # the padding block stays zero
