"""server/engine/telemetry.py on its own: the centred merge of partial accumulators against float64
statistics of explicit probabilities, and the module's import boundary."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from server.engine.telemetry import (ACC_L, NUM_ACCUMULATORS, STAT_NAMES, RequestHeadTelemetry,
                                     combine_request_telemetry, finalize_stats, key_weights, merge_partials)

EMPTY_MAX = -1e30  # what a kernel starts a tile's running max at: large, finite, negative


def reference_stats(s: torch.Tensor, sink: int = 4) -> torch.Tensor:
    """float64 statistics of one row's scores s [n] (query at position n - 1) -> [NUM_STATS]."""
    s = s.double()
    n = s.shape[0]
    p = torch.softmax(s, dim=0)                                       # [n]
    entropy = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum()
    i = n - 1
    j = torch.arange(n, dtype=torch.float64)
    return torch.stack([entropy, entropy / math.log(n) if n > 1 else torch.zeros(()), p.max(), p[:sink].sum(),
                        (i - (p * j).sum()) / i if i > 0 else torch.zeros(())])


def partial(s: torch.Tensor, first: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What one tile of a flash-style kernel carries: its max and centred accumulators.
    s [n_tile] scores of keys first .., weights [P, 2] -> m [], acc [NUM_ACCUMULATORS]."""
    if s.numel() == 0:
        return torch.tensor(EMPTY_MAX), torch.zeros(NUM_ACCUMULATORS)
    m = s.max()
    e = torch.exp(s - m)                                              # [n_tile]
    w = e @ weights[first:first + s.numel()]                          # [2]
    return m, torch.cat([e.sum()[None], (e * (s - m)).sum()[None], w])  # [4]


@pytest.mark.parametrize("scale", [1.0, 10.0, 80.0])
@pytest.mark.parametrize("cuts", [(), (1,), (3, 3, 40), (17, 64, 65, 99)], ids=["one", "head", "empty", "four"])
def test_merge_of_split_partials_matches_float64(scale, cuts):
    n = 100
    g = torch.Generator().manual_seed(len(cuts) + int(scale))
    s = torch.randn(n, generator=g) * scale                           # [n] scores, float32
    weights = key_weights(n, 4)                                       # [n, 2]
    bounds = [0, *cuts, n]
    parts = [partial(s[a:b], a, weights) for a, b in zip(bounds, bounds[1:])]
    m = torch.stack([p[0] for p in parts])                            # [S]
    acc = torch.stack([p[1] for p in parts])                          # [S, 4]
    big_m, merged = merge_partials(m, acc)                            # [], [4]
    assert big_m == s.max()
    assert torch.isfinite(merged).all()
    stats = finalize_stats(merged[None, :], torch.tensor(n))          # [1, 5]
    assert (stats[0].double() - reference_stats(s)).abs().max().item() < 2e-5


def test_merge_is_exact_for_one_partial_and_all_empty():
    acc = torch.tensor([[2.0, -0.5, 1.0, 3.0]])                       # [1, 4]
    m, merged = merge_partials(torch.tensor([1.5]), acc)
    assert m == 1.5 and torch.equal(merged, acc[0])
    m, merged = merge_partials(torch.full((3,), EMPTY_MAX), torch.zeros(3, NUM_ACCUMULATORS))
    assert torch.equal(merged, torch.zeros(NUM_ACCUMULATORS)) and merged[ACC_L] == 0


def test_merge_over_leading_dims():
    """Partials of [rows, heads] merge elementwise."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 2, 30, generator=g) * 5                        # [R, H, n]
    weights = key_weights(30, 4)
    halves = [(0, 12), (12, 30)]
    ms, accs = [], []
    for a, b in halves:
        tile = s[..., a:b]                                            # [R, H, n_t]
        m = tile.amax(dim=-1)                                         # [R, H]
        e = torch.exp(tile - m[..., None])                            # [R, H, n_t]
        accs.append(torch.cat([e.sum(-1, keepdim=True), (e * (tile - m[..., None])).sum(-1, keepdim=True),
                               e @ weights[a:b]], dim=-1))            # [R, H, 4]
        ms.append(m)
    _, merged = merge_partials(torch.stack(ms), torch.stack(accs))   # [R, H, 4]
    stats = finalize_stats(merged, torch.tensor([30, 30, 30]))        # [R, H, 5]
    for r in range(3):
        for h in range(2):
            assert (stats[r, h].double() - reference_stats(s[r, h])).abs().max().item() < 2e-5


def test_combined_request_means_are_row_weighted():
    def tel(rows: int, value: float) -> RequestHeadTelemetry:
        return RequestHeadTelemetry(layers=1, heads=2, kv_heads=1, rows=rows,
                                    **{name: [[value, 2 * value]] for name in STAT_NAMES})

    both = combine_request_telemetry([tel(1, 1.0), tel(3, 5.0)])
    assert both.rows == 4 and both.entropy == [[4.0, 8.0]]
    assert set(both.to_dict()) == {"layers", "heads", "kv_heads", "rows", *STAT_NAMES}


def test_import_pulls_in_nothing_else_of_ours():
    code = ("import sys, server.engine.telemetry; "
            "bad = [m for m in ('server.engine.attention', 'server.engine.model', 'server.engine.engine', "
            "'server.engine.runner', 'fastapi', 'prometheus_client', 'pydantic') if m in sys.modules]; "
            "ours = sorted(m for m in sys.modules if m.startswith('server.') and m != 'server.engine.telemetry'); "
            "print(bad, ours)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] ['server.engine']", out
