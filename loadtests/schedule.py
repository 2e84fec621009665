"""When each request is sent: offsets from the start of a run (seconds)."""

from __future__ import annotations

import math
import random


def arrival_offsets(count: int, request_rate: float | None, seed: int = 0) -> list[float]:
    """Poisson arrivals at `request_rate` requests/s (exponential gaps, seeded); None or inf:
    every request at offset 0 (the concurrency cap alone paces them). The first request goes at 0."""
    if count < 0:
        raise ValueError("count must be >= 0")
    if request_rate is None or math.isinf(request_rate):
        return [0.0] * count
    if request_rate <= 0:
        raise ValueError("request rate must be > 0")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(count):
        if i:
            t += rng.expovariate(request_rate)
        offsets.append(t)
    return offsets
