"""ServerConfig: how the HTTP layer runs (not the engine). Frozen, validated on construction.

(Meant to move into server/config.py next to EngineConfig; it lives here until then.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings.

    max_queue bounds the engine requests admitted beyond the running batch: at most
    max_num_seqs + max_queue engine requests are in flight (a request with n choices counts n);
    past that a request is answered 503 with Retry-After without touching the engine.
    drain_timeout is how long SIGTERM waits for in-flight requests before aborting them.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    metrics_require_key: bool = False
    max_queue: int = 256
    drain_timeout: float = 30.0
    max_body_bytes: int = 4 * 2**20
    cors_origins: tuple[str, ...] = ()
    served_model_names: tuple[str, ...] = ()  # extra names the "model" field may use; the first is listed
    max_n: int = 16                  # choices per request
    max_prompts: int = 16            # prompts in one /v1/completions batch
    retry_after_s: int = 1           # Retry-After on 503
    warmup: bool = True              # run a 2-token request before /ready turns 200

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _require(bool(self.host), "host must not be empty")
        _require(self.api_key is None or len(self.api_key) > 0, "api key must not be empty")
        _require(self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}")
        _require(math.isfinite(self.drain_timeout) and self.drain_timeout >= 0,
                 f"drain_timeout must be >= 0 seconds, got {self.drain_timeout}")
        _require(self.max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        _require(all(o and o.strip() == o for o in self.cors_origins), "CORS origins must be non-empty strings")
        _require(all(n and len(n) <= 256 for n in self.served_model_names), "served model names must be 1-256 chars")
        _require(self.max_n >= 1 and self.max_prompts >= 1, "max_n and max_prompts must be >= 1")
        _require(self.retry_after_s >= 1, "retry_after_s must be >= 1")
