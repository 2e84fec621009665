"""Attention backends: one interface, vLLM-shaped metadata, one file per implementation.

A backend is built once per engine (over the KV cache) and called per layer per step:

    plan = backend.prepare(meta)                 # once per step: derive its own indices
    out, acc = backend.forward(layer, q, k, v, plan)  # per layer: write new K/V, attend, telemetry

forward returns out [T, H, D] and, on steps that compute telemetry, the accumulators
[R, H, NUM_ACCUMULATORS] (server/engine/telemetry.py) of the rows in meta.stats_seqs_cpu order.
The output must not depend on whether telemetry is computed. Adding a backend is one new file
plus one line in BACKENDS.

Backends, in the order "auto" tries them: "cpu" (cpu_paged.py: decode rows and prefill chunks
through C++ ops over the paged cache, CPU only, where the extension builds; otherwise auto warns
once and moves on),
"triton" (triton_paged.py: decode rows through Triton kernels; CUDA wherever triton imports; on a
CPU only when named explicitly under TRITON_INTERPRET=1, for tests), "torch" (torch_ref.py: the
reference, any device). supports(device) says whether a backend can run there when named;
auto_picks(device), where a backend defines it, whether "auto" may take it (default: supports);
unavailable_reason(device), where defined, why it cannot run.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from server.engine.attention.cpu_paged import CpuPagedBackend
from server.engine.attention.metadata import AttentionMetadata
from server.engine.attention.torch_ref import TorchAttentionBackend
from server.engine.attention.triton_paged import TritonPagedBackend
from server.engine.kv_cache import KVCache


class AttentionBackend(Protocol):
    """What the model calls; see the module docstring."""

    name: str

    def prepare(self, meta: AttentionMetadata) -> Any: ...

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                plan: Any) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    @staticmethod
    def supports(device: torch.device) -> bool: ...


# name -> class(cache, sink_tokens, max_positions); "auto" picks the first that auto_picks the device.
BACKENDS: dict[str, type] = {"cpu": CpuPagedBackend, "triton": TritonPagedBackend, "torch": TorchAttentionBackend}
BACKEND_CHOICES = ("auto", *BACKENDS)


def build_backend(name: str, cache: KVCache, device: torch.device, sink_tokens: int,
                  max_positions: int) -> AttentionBackend:
    """The backend called name ("auto": the best one available for device)."""
    if name == "auto":
        name = next(n for n, cls in BACKENDS.items() if getattr(cls, "auto_picks", cls.supports)(device))
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}")
    cls = BACKENDS[name]
    if not cls.supports(device):
        why = getattr(cls, "unavailable_reason", lambda _device: None)(device)
        raise ValueError(f"attention backend {name!r} does not run on {device}" + (f": {why}" if why else ""))
    return cls(cache, sink_tokens, max_positions)


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "BACKEND_CHOICES", "build_backend"]
