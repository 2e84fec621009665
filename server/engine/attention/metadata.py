"""AttentionMetadata: where one step's attention reads and writes, in vLLM's vocabulary.

The runner fills it once per step from buffers that live across steps; every backend reads the
same fields. Sequences are ordered decodes first (exactly one query token each), then prefill
chunks; the query rows of sequence b are query_start_loc[b] .. query_start_loc[b + 1] - 1 of
the flat batch, and its last row sits at position seq_lens[b] - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's attention layout (all tensors on the model's device unless named *_cpu)."""

    num_decodes: int                   # sequences 0 .. num_decodes - 1 have one query token each
    num_tokens: int                    # T, query rows in the flat batch
    max_seq_len: int                   # max of seq_lens (host value, for shapes)
    slot_mapping: torch.Tensor         # [T] int64 cache slot of each new token
    query_start_loc: torch.Tensor      # [B + 1] int32 first query row of each sequence, then T
    seq_lens: torch.Tensor             # [B] int32 keys the last row of each sequence sees
    block_table: torch.Tensor          # [B, max_blocks] int32 each sequence's cache blocks (unused: 0)
    query_start_loc_cpu: torch.Tensor  # [B + 1] int32, host copy (the same tensor on a CPU device)
    seq_lens_cpu: torch.Tensor         # [B] int32, host copy
    stats_seqs_cpu: torch.Tensor | None  # [R] int64 ascending: sequences whose last row computes
                                         # telemetry this step (R telemetry rows in this order); None: none

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def compute_stats(self) -> bool:
        return self.stats_seqs_cpu is not None
