"""CUDA graphs of decode-only steps: one captured forward pass per batch-size bucket.

A decode step of a small model on a GPU is bound by kernel launches, not arithmetic: ~10
kernels a layer, each a few microseconds of CPU work to launch. Replaying a captured graph
launches them all at once. A graph replays over fixed memory, so every input of a decode step
lives in persistent device buffers (the runner's StepBuffers and the flags here), and the
attention backend builds a plan whose launches do not depend on the step (graph_plan: telemetry
switched per row by a device-side flag, the splits of the longest possible row).

Buckets are 1, 2, 4, 8, ... up to max_num_seqs (and max_num_seqs itself). A step of n decode rows
replays the smallest bucket b >= n; rows n .. b - 1 are padding: token 0 at position 0, one key
read from the zero padding block, and slot -1 so nothing is written to the cache; their logits
and telemetry are never read. Captured largest first into one memory pool, as vLLM does, so the
smaller graphs reuse the larger one's memory.

Prefill and mixed steps, and steps whose attention time is measured, run eagerly. On a CPU
there are no graphs: replay() runs the same plan eagerly over the same buffers (what the tests
use, under Triton's interpreter, to check the padding and the buffers without a GPU).

References: torch.cuda.CUDAGraph / torch.cuda.graph, vLLM's CUDAGraphRunner (buckets, a shared
pool, capture largest first), gpt-fast (static decode shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.engine.model import ForwardOutput


def buckets_for(max_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_seqs, then max_seqs."""
    sizes, b = [], 1
    while b < max_seqs:
        sizes.append(b)
        b *= 2
    return (*sizes, max_seqs)


@dataclass
class Captured:
    """One bucket's graph (None on a CPU) and the output tensors it writes."""

    run: Callable[[], ForwardOutput]   # the eager forward over the bucket's buffers
    graph: torch.cuda.CUDAGraph | None
    out: ForwardOutput | None          # logits [b, V], telemetry [L, b, H, 4] (CUDA: static)


class DecodeGraphs:
    """Decode-step graphs over persistent buffers (see the module docstring).

    buffers: the runner's StepBuffers (host arrays in .np, device tensors in .dev, to_device);
    the graphs read .dev's input_ids, positions, slot_mapping, seq_lens and block_table (its width
    covering max_model_len). forward(input_ids, positions, plan, sample_rows, b) runs the model.
    """

    FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens")

    def __init__(self, backend, buffers, forward: Callable[..., ForwardOutput], max_seqs: int, pad_block: int,
                 device: torch.device) -> None:
        self.device = device
        self.buckets = buckets_for(max_seqs)
        self.buffers = buffers
        self.pad_block = pad_block
        pin = device.type == "cuda"
        self.flags_host = torch.zeros(max_seqs, dtype=torch.int32, pin_memory=pin)        # [Bmax]
        self.flags = (torch.zeros(max_seqs, dtype=torch.int32, device=device) if pin
                      else self.flags_host)                                               # [Bmax]
        self.sample_rows = torch.arange(max_seqs, device=device)                          # [Bmax]
        dev = buffers.dev
        self._captured: dict[int, Captured] = {}
        for b in self.buckets:
            plan = backend.graph_plan(dev["slot_mapping"][:b], dev["seq_lens"][:b], dev["block_table"][:b],
                                      self.flags[:b])
            self._captured[b] = Captured(self._closure(forward, plan, b), None, None)

    def _closure(self, forward: Callable[..., ForwardOutput], plan, b: int) -> Callable[[], ForwardOutput]:
        dev = self.buffers.dev
        return lambda: forward(dev["input_ids"][:b], dev["positions"][:b], plan, self.sample_rows[:b], b)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        """The smallest bucket holding n rows (n <= max_batch)."""
        return next(b for b in self.buckets if b >= n)

    def capture(self) -> None:
        """Record every bucket's graph on CUDA (a no-op elsewhere), over an all-padding step with
        every flag set. Each is run twice eagerly first, on a side stream, so Triton compiles and
        cuBLAS picks its kernels outside the capture."""
        if self.device.type != "cuda":
            return
        self._load(0, self.max_batch, 1, list(range(self.max_batch)))
        pool = None
        side = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            cap = self._captured[b]
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                cap.run()
                cap.run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                cap.out = cap.run()
            pool = graph.pool()
            cap.graph = graph
        torch.cuda.synchronize(self.device)

    def _load(self, n: int, b: int, width: int, stats_rows: list[int]) -> None:
        """Pad host rows n .. b - 1 (token 0 at position 0, one key from the zero padding block,
        slot -1: no cache write), set the flags, and copy rows 0 .. b - 1 to the device."""
        buf = self.buffers
        npb = buf.np
        npb["input_ids"][n:b] = 0
        npb["positions"][n:b] = 0
        npb["slot_mapping"][n:b] = -1
        npb["seq_lens"][n:b] = 1
        npb["block_table"][n:b, 0] = self.pad_block
        for name in self.FIELDS:
            buf.to_device(name, b)
        buf.to_device("block_table", b, width)
        flags = self.flags_host[:b]                                       # [b] host
        flags.zero_()
        flags[stats_rows] = 1
        if self.flags.data_ptr() != self.flags_host.data_ptr():
            self.flags[:b].copy_(flags, non_blocking=True)

    def replay(self, n: int, width: int, stats_rows: list[int]) -> ForwardOutput:
        """Run the bucket of n decode rows, whose inputs are in the first n rows of the host
        buffers (block-table columns 0 .. width - 1). stats_rows: rows whose telemetry is wanted.
        Returns the outputs for the whole bucket, valid until the next replay. The caller must
        forget what it cached of block-table rows n .. bucket - 1 (padding overwrites column 0)."""
        b = self.bucket(n)
        self._load(n, b, width, stats_rows)
        cap = self._captured[b]
        if cap.graph is None:
            return cap.run()
        cap.graph.replay()
        return cap.out
