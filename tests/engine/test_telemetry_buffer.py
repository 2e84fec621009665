"""TelemetryBuffer: raw accumulators wait and are finalized in batches, with the same result as
finalizing each step on its own, into the running sums and each request's sums."""

from __future__ import annotations

import pytest
import torch

from server.engine.telemetry import HeadStatsAccumulator, RequestTelemetry, finalize_stats
from server.engine.telemetry_buffer import FLUSH_EVERY, PendingStep, RowOwner, TelemetryBuffer

L, H, KVH = 3, 4, 2
BUCKETS = (0.1, 0.5, 0.9)


def random_step(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid accumulators of `rows` rows: l >= 1, t <= 0, sink mass <= l, position sum within range."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(1, 50, (rows,), generator=g)                                # [R]
    l = 1 + torch.rand(L, rows, H, generator=g) * keys[None, :, None]                # [L, R, H]
    t = -torch.rand(L, rows, H, generator=g) * l                                     # [L, R, H]
    sink = torch.rand(L, rows, H, generator=g) * l                                   # [L, R, H]
    pos = torch.rand(L, rows, H, generator=g) * l * (keys[None, :, None] - 1)        # [L, R, H]
    return torch.stack([l, t, sink, pos], dim=-1), keys                              # [L, R, H, 4], [R]


def test_waits_then_equals_finalizing_every_step_alone():
    acc_now = HeadStatsAccumulator(L, H, BUCKETS)
    acc_later = HeadStatsAccumulator(L, H, BUCKETS)
    req_now, req_later = RequestTelemetry(L, H, KVH), RequestTelemetry(L, H, KVH)
    buf = TelemetryBuffer(acc_later)
    for s in range(FLUSH_EVERY - 1):
        acc, keys = random_step(2, s)
        stats = finalize_stats(acc, keys[None, :]).to(torch.float64)                 # [L, 2, H, 5]
        acc_now.add(stats)
        req_now.add_row(stats[:, 0])
        buf.add(PendingStep(acc, keys, (RowOwner(req_later, True), RowOwner(None, True))))
    assert acc_later.snapshot().rows == 0 and req_later.rows == 0 and buf.pending_steps == FLUSH_EVERY - 1
    acc, keys = random_step(2, 99)
    stats = finalize_stats(acc, keys[None, :]).to(torch.float64)
    acc_now.add(stats)
    req_now.add_row(stats[:, 0])
    buf.add(PendingStep(acc, keys, (RowOwner(req_later, True), RowOwner(None, True))))    # the FLUSH_EVERY-th
    assert buf.pending_steps == 0
    now, later = acc_now.snapshot(), acc_later.snapshot()
    assert later.rows == now.rows == 2 * FLUSH_EVERY
    assert torch.equal(later.counts, now.counts) and torch.equal(later.histogram, now.histogram)
    assert torch.allclose(later.sums, now.sums, rtol=1e-12, atol=0)
    assert req_later.rows == FLUSH_EVERY and torch.allclose(req_later.sums, req_now.sums, rtol=1e-12, atol=0)


def test_internal_rows_reach_their_request_but_not_the_running_sums():
    head = HeadStatsAccumulator(L, H, BUCKETS)
    warmup, user = RequestTelemetry(L, H, KVH), RequestTelemetry(L, H, KVH)
    buf = TelemetryBuffer(head)
    acc, keys = random_step(3, 1)
    buf.add(PendingStep(acc, keys, (RowOwner(warmup, False), RowOwner(user, True), RowOwner(None, False))))
    buf.flush()
    stats = finalize_stats(acc, keys[None, :]).to(torch.float64)                      # [L, 3, H, 5]
    snap = head.snapshot()
    assert snap.rows == 1 and torch.allclose(snap.sums, stats[:, 1], rtol=1e-12, atol=0)
    assert warmup.rows == 1 and user.rows == 1
    assert torch.allclose(warmup.sums, stats[:, 0], rtol=1e-12, atol=0)
    buf.flush()                                                                         # nothing waits: no-op
    assert head.snapshot().rows == 1


def test_rows_and_owners_must_match():
    buf = TelemetryBuffer(HeadStatsAccumulator(L, H, BUCKETS))
    acc, keys = random_step(2, 0)
    with pytest.raises(ValueError, match="do not match"):
        buf.add(PendingStep(acc, keys, (RowOwner(None, True),)))
    with pytest.raises(ValueError, match="flush_every"):
        TelemetryBuffer(HeadStatsAccumulator(L, H, BUCKETS), flush_every=0)
