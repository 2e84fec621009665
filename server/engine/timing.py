"""Per-layer region timing for sampled steps: wall clock on the CPU, CUDA events on a GPU.

Per-head latency is not meaningful (all heads of a layer run in one kernel with the same work),
so the engine times each layer's attention on a sample of steps and publishes that.
"""

from __future__ import annotations

import time

import torch


class LayerTimer:
    """start()/stop() around one region per layer, in layer order; seconds() after the forward.

    On CUDA the events are recorded on the stream and read after one synchronize, so timing a
    step costs one sync (which is why it is sampled)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list = []

    def start(self) -> None:
        self._marks.append(self._mark())

    def stop(self) -> None:
        self._marks.append(self._mark())

    def _mark(self):
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self) -> tuple[float, ...]:
        """Duration of each start/stop pair, in order."""
        pairs = zip(self._marks[0::2], self._marks[1::2])
        if self._cuda:
            torch.cuda.synchronize()
            return tuple(a.elapsed_time(b) / 1000.0 for a, b in pairs)
        return tuple(b - a for a, b in pairs)
