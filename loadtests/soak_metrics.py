"""The few /metrics gauges the soak samples every second: KV blocks in use and the engine's load.

headwise exports headwise_kv_cache_blocks (all) and headwise_kv_cache_free_blocks (free or cached
and evictable); in use = all - free. Only the wanted lines are parsed (the per-head families make
the full text large), by hand: no prometheus_client in the sampling loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

BLOCKS, FREE = "headwise_kv_cache_blocks", "headwise_kv_cache_free_blocks"
RUNNING, WAITING = "headwise_num_requests_running", "headwise_num_requests_waiting"
WANTED = (BLOCKS, FREE, RUNNING, WAITING)


@dataclass(frozen=True)
class KvState:
    in_use: float | None   # KV blocks held by requests; None when the server does not export them
    running: float | None
    waiting: float | None

    @property
    def idle(self) -> bool:
        return self.in_use == 0 and not self.running and not self.waiting


def gauge_values(text: str, names=WANTED) -> dict[str, float]:
    """Each wanted sample name summed over its label sets (Prometheus text format)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(names):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in names:
            continue
        try:
            rest = line.rsplit("}", 1)[1] if "}" in line else line.split(None, 1)[1]
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if math.isfinite(value):
            out[name] = out.get(name, 0.0) + value
    return out


def kv_state(values: Mapping[str, float]) -> KvState:
    in_use = values[BLOCKS] - values[FREE] if BLOCKS in values and FREE in values else None
    return KvState(in_use=in_use, running=values.get(RUNNING), waiting=values.get(WAITING))


async def read_kv(client, base_url: str, headers: Mapping[str, str], timeout: float = 10.0) -> KvState | None:
    """GET /metrics -> KvState; None when it cannot be read."""
    try:
        r = await client.get(base_url.rstrip("/") + "/metrics", headers=dict(headers), timeout=timeout)
    except Exception:  # noqa: BLE001 - a missed sample is recorded as None, the soak goes on
        return None
    if r.status_code != 200:
        return None
    return kv_state(gauge_values(r.text))
