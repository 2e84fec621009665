"""Event-loop lag of the server, as the latency of GET /health from a dedicated prober.

/health does no work, so its latency is the time the request waits for the server's event loop.
The prober runs on its own thread with its own keep-alive connection, so the load's client
(an asyncio loop of its own) does not delay the probes it measures. It stops on stop() or after
max_probes probes, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import httpx

from loadtests.soak_records import Probe


class HealthProber:
    def __init__(self, base_url: str, headers: Mapping[str, str], *, interval: float, timeout: float,
                 clock: Callable[[], float], max_probes: int) -> None:
        self.url = base_url.rstrip("/") + "/health"
        self.headers = dict(headers)
        self.interval, self.timeout, self.clock, self.max_probes = interval, timeout, clock, max_probes
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-health-prober", daemon=True)

    def start(self) -> "HealthProber":
        self._thread.start()
        return self

    def stop(self) -> tuple[Probe, ...]:
        self._stop.set()
        self._thread.join(self.timeout + 5.0)
        return tuple(self.probes)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            for _ in range(self.max_probes):
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                at = self.clock()
                try:
                    r = client.get(self.url, headers=self.headers)
                    latency = time.perf_counter() - t0
                    ok = r.status_code == 200
                    self.probes.append(Probe(t=at, latency=latency if ok else None, status=r.status_code,
                                             error=None if ok else f"HTTP {r.status_code}"))
                except httpx.HTTPError as e:
                    self.probes.append(Probe(t=at, latency=None, status=None, error=f"{type(e).__name__}: {e}"[:160]))
                self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))
