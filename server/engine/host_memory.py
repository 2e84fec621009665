"""CPU tensors on transparent huge pages (2 MiB) where the kernel offers them.

A decode step reads every quantized weight once (96 MB for the default model): on 4 KiB pages
that is ~24,000 pages a step, far past the TLB's reach, and the hardware prefetchers restart at
every 4 KiB boundary. The same reads from 2 MiB pages run faster (a 96 MB sum on this project's
2-core machines: 27 -> 33 GB/s; a batch-1 decode step 6.5 -> 5.65 ms; BENCHMARKS.md). Linux
gives an anonymous mapping huge pages when THP is "always", or "madvise" and the mapping asks for
them (MADV_HUGEPAGE), which huge_empty does; where THP is off or the platform has no madvise, the
mapping simply stays on small pages. A huge page is backed whole when first touched, so small
tensors share an Arena's chunks instead of each holding 2 MiB.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes; the mapping is aligned to it so that every 2 MiB of it can be one page
ALIGN = 64           # bytes between the start of an arena's tensors (a cache line)


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor [shape] in its own anonymous mapping advised for
    huge pages (torch.empty where that is not possible: no MADV_HUGEPAGE here, or no elements).
    The tensor keeps the mapping alive; it is unmapped when the last view of it goes."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: small pages
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)                # [nbytes + HUGE_PAGE]
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)         # [shape]


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor t in a huge_empty allocation."""
    out = huge_empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out


class Arena:
    """Copies of CPU tensors packed one after another into huge_empty chunks of chunk_bytes
    (a tensor bigger than that gets its own), for many tensors read together: the quantized
    weights of a model. Resident memory is what the copies take, rounded up to 2 MiB per chunk."""

    def __init__(self, chunk_bytes: int = 32 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None   # uint8 [chunk_bytes], the chunk being filled
        self._used = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t (same shape and dtype) in the arena."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.chunk_bytes:
            return on_huge_pages(t)
        start = -self._used % ALIGN + self._used
        if self._chunk is None or start + nbytes > self.chunk_bytes:
            self._chunk, start = huge_empty((self.chunk_bytes,), torch.uint8), 0
        self._used = start + nbytes
        out = self._chunk[start:start + nbytes].view(t.dtype).view(t.shape)   # [t.shape]
        out.copy_(t)
        return out
