"""Batch -> device tensors -> forward -> sample. The only device-specific code.

The runner flattens the scheduled chunks into T query rows, builds the AttentionMetadata
(slot mapping, decode key slots, prefill spans), runs the model, and samples one token for every
request whose chunk reached the end of its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.attention import AttentionMetadata, PrefillSpan
from server.engine.telemetry import finalize_stats, key_weights
from server.engine.kv_cache import KVCache
from server.engine.model import LlamaModel
from server.engine.request import TokenLogprob
from server.engine.sampler import SamplingRow, derive_seed, sample
from server.engine.scheduler import Batch
from server.engine.timing import LayerTimer


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: TokenLogprob | None
    telemetry_row: int | None  # row of StepOutput.stats, when telemetry ran this step


@dataclass(frozen=True)
class StepOutput:
    sampled: tuple[SampledToken, ...]
    stats: torch.Tensor | None  # [L, R, H, NUM_STATS] on the CPU, float64
    num_tokens: int
    attention_times: tuple[float, ...] | None = None  # seconds per layer, on timed steps


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, device: torch.device, sink_tokens: int = 4) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.sink_tokens = sink_tokens

    def _slots(self, block_tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """Cache slots of the first lengths[b] positions of each block table, padded with the
        zero slot to the longest -> [B, max(lengths)]."""
        bs = self.block_size
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # [B, W]
        offsets = torch.arange(bs, dtype=torch.long)                                      # [bs]
        slots = (table[:, :, None] * bs + offsets).reshape(len(block_tables), -1)         # [B, W bs]
        n = max(lengths)
        slots = slots[:, :n]                                                              # [B, N]
        inside = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]                # [B, N]
        return torch.where(inside, slots, self.cache.pad_slot)                            # [B, N]

    def execute(self, batch: Batch, compute_stats: bool, time_attention: bool = False) -> StepOutput:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        prefill_sampling: list[int] = []   # index into batch.scheduled of prefills with want_stats
        decode_sched: list[int] = []       # index into batch.scheduled of decode rows
        sample_rows: list[int] = []
        sample_sched: list[int] = []
        for idx, s in enumerate(batch.scheduled):
            req, start, n = s.request, s.start, s.num_new_tokens
            row = len(input_ids)
            input_ids.extend(req.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slot_mapping.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(req.block_ids)
                decode_lens.append(start + 1)
                decode_sched.append(idx)
            else:
                slots = self._slots([req.block_ids], [start + n])[0]        # [C]
                prefills.append(PrefillSpan(row, n, slots.to(self.device), want_stats=s.samples))
                if s.samples:
                    prefill_sampling.append(idx)
            if s.samples:
                sample_rows.append(row + n - 1)
                sample_sched.append(idx)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),            # [T]
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev),              # [Bd]
            decode_slots=(self._slots(decode_tables, decode_lens).to(dev) if decode_tables
                          else torch.zeros(0, 0, dtype=torch.long, device=dev)),              # [Bd, N]
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=dev),      # [Bd]
            prefills=tuple(prefills), compute_stats=compute_stats, sink_tokens=self.sink_tokens,
            decode_key_weights=(key_weights(max(decode_lens), self.sink_tokens, dev)
                                if compute_stats and decode_lens else None))                 # [N, 2]
        out = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=dev),                            # [T]
            torch.tensor(positions, dtype=torch.long, device=dev),                            # [T]
            self.cache, meta, torch.tensor(sample_rows, dtype=torch.long, device=dev),        # [S]
            timer=LayerTimer(dev) if time_attention else None)

        # telemetry rows: all decode rows, then prefill last rows with want_stats
        telemetry_row: dict[int, int] = {}
        stats = None
        if out.telemetry is not None:
            order = decode_sched + prefill_sampling
            telemetry_row = {sched_idx: r for r, sched_idx in enumerate(order)}
            keys = decode_lens + [batch.scheduled[i].start + batch.scheduled[i].num_new_tokens for i in prefill_sampling]
            lens = torch.tensor(keys, device=dev)[None, :]                               # [1, R]
            stats = finalize_stats(out.telemetry, lens).to("cpu", torch.float64)         # [L, R, H, 5]
        rows = []
        for idx in sample_sched:
            req = batch.scheduled[idx].request
            p = req.params
            suppress = ()
            if req.num_output_tokens < p.min_tokens:
                suppress = tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))))
            rows.append(SamplingRow(params=p, prompt_token_ids=req.prompt_token_ids,
                                    output_token_ids=req.output_token_ids,
                                    seed=derive_seed(req.seed, req.num_output_tokens),
                                    suppress_token_ids=suppress))
        result = sample(out.logits.float(), rows) if rows else None
        sampled = tuple(
            SampledToken(batch.scheduled[idx].request.request_id, result.token_ids[k], result.logprobs[k],
                         telemetry_row.get(idx))
            for k, idx in enumerate(sample_sched))
        return StepOutput(sampled=sampled, stats=stats, num_tokens=len(input_ids),
                          attention_times=out.attention_times)
