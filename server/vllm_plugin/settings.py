"""The plugin's settings, read once from the environment of each vLLM process.

HEADWISE_TELEMETRY_SAMPLE_RATE: fraction of engine steps that compute per-head statistics, 0..1
(0 turns the computation off; the families are still exported, with zero counts). The default,
0.2, is the largest rate on a 0.05 grid whose cost on the decode step stays at or below 3%: the
cost grows linearly with the rate (a sampled step pays the full recomputation, others nothing)
and measured 6-13% at rate 1.0 on this project's 2-core machines, single stream and 16 concurrent
(BENCHMARKS.md, "Per-head telemetry inside vLLM"). Sink tokens and histogram buckets are headwise serve's
defaults (server.config.TelemetryConfig), so both servers export comparable series.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from server.config import TelemetryConfig

SAMPLE_RATE_ENV = "HEADWISE_TELEMETRY_SAMPLE_RATE"
DEFAULT_SAMPLE_RATE = 0.2
_DEFAULTS = TelemetryConfig()


@dataclass(frozen=True)
class PluginSettings:
    sample_rate: float = DEFAULT_SAMPLE_RATE
    sink_tokens: int = _DEFAULTS.sink_tokens
    buckets: tuple[float, ...] = _DEFAULTS.histogram_buckets

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sample_rate) and 0.0 <= self.sample_rate <= 1.0):
            raise ValueError(f"{SAMPLE_RATE_ENV} must be a number in [0, 1], got {self.sample_rate!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> PluginSettings:
        raw = env.get(SAMPLE_RATE_ENV, "").strip()
        if not raw:
            return cls()
        try:
            rate = float(raw)
        except ValueError:
            raise ValueError(f"{SAMPLE_RATE_ENV} must be a number in [0, 1], got {raw!r}") from None
        return cls(sample_rate=rate)
