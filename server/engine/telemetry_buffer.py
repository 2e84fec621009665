"""TelemetryBuffer: a step's raw telemetry accumulators wait, then become statistics in batches.

Turning accumulators into statistics (finalize_stats), moving them to float64 on the host and
folding them into the running sums costs a few dozen small ops whatever the number of rows; at
batch 1 that was most of the telemetry's cost per decode step. The engine therefore hands each
step's accumulators here and they are finalized FLUSH_EVERY steps at a time, in one pass:
into the engine's HeadStatsAccumulator (rows of internal requests left out) and into each
request's own RequestTelemetry.

The engine flushes before any request finishes (so a finished request's per-head means, and the
running sums once the engine is idle, are exact), so readers of the running sums lag by at most
FLUSH_EVERY - 1 steps while requests are running. Used only by the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.telemetry import HeadStatsAccumulator, RequestTelemetry, finalize_stats

FLUSH_EVERY = 16   # steps whose accumulators wait before one finalize (bounded lag, ~16x fewer small ops)


@dataclass(frozen=True)
class RowOwner:
    """Who a telemetry row belongs to: the request's running sums (None: not kept) and whether it
    counts in the server-wide statistics (internal requests, e.g. the warm-up, do not)."""

    telemetry: RequestTelemetry | None
    counted: bool


@dataclass(frozen=True)
class PendingStep:
    acc: torch.Tensor             # [L, R, H, NUM_ACCUMULATORS] float32, the model's device
    keys: torch.Tensor            # [R] keys each row attended to (its position + 1), same device
    owners: tuple[RowOwner, ...]  # R, one per row


class TelemetryBuffer:
    def __init__(self, head_stats: HeadStatsAccumulator, flush_every: int = FLUSH_EVERY) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.head_stats = head_stats
        self.flush_every = flush_every
        self._pending: list[PendingStep] = []

    @property
    def pending_steps(self) -> int:
        return len(self._pending)

    def add(self, step: PendingStep) -> None:
        if step.acc.shape[1] != len(step.owners) or step.keys.shape[0] != len(step.owners):
            raise ValueError(f"{step.acc.shape[1]} telemetry rows, {step.keys.shape[0]} key counts and "
                             f"{len(step.owners)} owners do not match")
        self._pending.append(step)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Finalize every waiting row and fold it into the running and per-request sums."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        acc = torch.cat([p.acc for p in pending], dim=1)                          # [L, N, H, 4]
        keys = torch.cat([p.keys for p in pending])[None, :]                       # [1, N]
        stats = finalize_stats(acc, keys).to("cpu", torch.float64)                 # [L, N, H, 5]
        owners = [o for p in pending for o in p.owners]
        counted = [k for k, o in enumerate(owners) if o.counted]
        if len(counted) == len(owners):
            self.head_stats.add(stats)                                             # [L, N, H, 5]
        elif counted:
            self.head_stats.add(stats[:, counted])                                 # [L, N', H, 5]
        for k, owner in enumerate(owners):
            if owner.telemetry is not None:
                owner.telemetry.add_row(stats[:, k])                               # [L, H, 5]
