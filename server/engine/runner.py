"""The model runner owns the device: model, KV cache, attention backend, threads, step buffers.

execute(batch) turns the scheduler's Batch into one forward pass and the sampled tokens:
sequences are ordered decodes first, then prefill chunks (the layout attention backends, CUDA
graphs and vLLM expect); the step's inputs and AttentionMetadata are written into buffers
allocated once, sized by max_num_seqs and max_num_batched_tokens (numpy views of host tensors,
pinned and copied without blocking on CUDA; the same memory as the model's inputs on a CPU),
instead of tensors built from lists every step. The backend derives its own indices from the
metadata (prepare), the model runs, and one token is sampled for every sequence whose chunk
reached the end of its tokens; the step's raw telemetry accumulators go back with the tokens (the
engine turns them into statistics in batches: telemetry_buffer.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from server.config import EngineConfig, ModelConfig
from server.engine.attention import AttentionMetadata, build_backend
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import KVCache, num_blocks_for
from server.engine.model import LlamaModel
from server.engine.request import Request, TokenLogprob
from server.engine.sampler import SamplingRow, derive_seed, sample
from server.engine.scheduler import Batch, ScheduledRequest
from server.engine.structured import fill_bitmask, new_bitmask
from server.engine.timing import LayerTimer
from server.engine.weights import QuantizedTensor, WeightSource, format_for_dtype


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: TokenLogprob | None
    telemetry_row: int | None  # row of StepOutput.telemetry, when telemetry ran this step
    nonfinite: bool = False    # the row's logits held NaN or inf: token_id is not a real draw


@dataclass(frozen=True)
class StepTelemetry:
    """One step's raw telemetry rows (server/engine/telemetry.py), still on the model's device."""

    acc: torch.Tensor    # [L, R, H, NUM_ACCUMULATORS] float32
    keys: torch.Tensor   # [R] keys each row attended to (its position + 1)


@dataclass(frozen=True)
class HostStep:
    """What _write_host put in the host buffers."""

    num_seqs: int
    num_tokens: int
    num_decodes: int
    width: int       # block-table columns in use
    max_len: int


@dataclass(frozen=True)
class StepOutput:
    sampled: tuple[SampledToken, ...]
    telemetry: StepTelemetry | None
    num_tokens: int
    attention_times: tuple[float, ...] | None = None  # seconds per layer, on timed steps


class StepBuffers:
    """Host and device tensors for one step's inputs, allocated once and refilled every step.

    Each host tensor has a numpy view (*_np) the runner writes into; on a CPU device the device
    tensors are the host tensors themselves, on CUDA they are separate and filled by one
    non-blocking copy from pinned memory per field.
    """

    def __init__(self, max_seqs: int, max_tokens: int, max_blocks: int, device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"

        def host(*shape: int, dtype=torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.input_ids = host(max_tokens)                             # [Tmax]
        self.positions = host(max_tokens)                             # [Tmax]
        self.slot_mapping = host(max_tokens)                          # [Tmax]
        self.query_start_loc = host(max_seqs + 1, dtype=torch.int32)  # [Bmax + 1]
        self.seq_lens = host(max_seqs, dtype=torch.int32)             # [Bmax]
        self.block_table = host(max_seqs, max_blocks, dtype=torch.int32)  # [Bmax, max_blocks]
        self.sample_rows = host(max_seqs)                             # [Bmax]
        self.np = {name: getattr(self, name).numpy() for name in self._FIELDS}
        self.dev = ({name: torch.zeros_like(getattr(self, name), device=device) for name in self._FIELDS}
                    if pin else {name: getattr(self, name) for name in self._FIELDS})

    _FIELDS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_table", "sample_rows")

    def to_device(self, name: str, n: int, width: int | None = None) -> torch.Tensor:
        """The first n entries (rows, and width columns for the block table) on the device."""
        src = getattr(self, name)[:n] if width is None else getattr(self, name)[:n, :width]
        dst = self.dev[name][:n] if width is None else self.dev[name][:n, :width]
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src, non_blocking=True)
        return dst


def kv_cache_dtype(requested: str, model: LlamaModel, device: torch.device) -> torch.dtype:
    """The KV cache's element type (CacheConfig.dtype). "auto": on CUDA the activation dtype; on a
    CPU bfloat16 when every projection takes bfloat16 activations anyway (int4 / int8 / bf16
    weights; half the bytes each decode step reads), float32 otherwise (the fp32 path stays the
    exactness reference)."""
    if requested == "auto":
        act = model.activation_dtype
        if device.type == "cuda":
            return act
        return torch.bfloat16 if act == torch.bfloat16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


class ModelRunner:
    """Builds the model, the KV cache and the attention backend on the engine's device."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: Mapping[str, torch.Tensor],
                 quantized: Mapping[str, QuantizedTensor], max_model_len: int) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.model_config = model_config
        self.block_size = bs = config.cache.block_size
        fmt = format_for_dtype(config.dtype, config.weight_format, self.device)
        source = WeightSource(weights, quantized, fmt, self.device)
        self.model = LlamaModel.from_weights(model_config, source, max_model_len)
        kv_dtype = kv_cache_dtype(config.cache.dtype, self.model, self.device)
        self.num_blocks = num_blocks_for(model_config, config.cache, max_model_len, kv_dtype.itemsize)
        self.cache = KVCache.allocate(model_config, self.num_blocks, bs, self.device, kv_dtype)
        self.attention = build_backend(config.attention_backend, self.cache, self.device,
                                       config.telemetry.sink_tokens, max_model_len)
        sc = config.scheduler
        self.buffers = StepBuffers(sc.max_num_seqs, sc.max_num_batched_tokens, -(-max_model_len // bs), self.device)
        # per block-table row: (request, its preemptions, blocks written) as of the last write, so a
        # row that holds the same sequence again only gets its new blocks written (the request
        # object, not its id: a finished request's id may be used again)
        self._table_rows: list[tuple[Request, int, int] | None] = [None] * sc.max_num_seqs
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and hasattr(self.attention, "graph_plan"):
            self.graphs = self.decode_graphs()
            self.graphs.capture()

    def decode_graphs(self) -> DecodeGraphs:
        """Graphs of decode steps over this runner's buffers (cuda_graphs.py); captured by capture()."""
        def forward(ids, positions, plan, sample_rows, b):
            return self.model.forward(ids, positions, self.attention, plan, sample_rows, num_decodes=b,
                                      sample_decodes=b)

        return DecodeGraphs(self.attention, self.buffers, forward, self.buffers.seq_lens.shape[0],
                            self.cache.num_blocks, self.device)

    def _write_host(self, scheduled: list[ScheduledRequest]) -> HostStep:
        """Write the step's inputs into the host buffers; scheduled is in decodes-first order."""
        bs = self.block_size
        npb = self.buffers.np
        ids, positions, slots = npb["input_ids"], npb["positions"], npb["slot_mapping"]
        qsl, lens, table = npb["query_start_loc"], npb["seq_lens"], npb["block_table"]
        row, width, max_len, num_decodes = 0, 1, 0, 0
        qsl[0] = 0
        for b, s in enumerate(scheduled):
            req, start, n = s.request, s.start, s.num_new_tokens
            blocks = req.block_ids
            held = self._table_rows[b]
            done = held[2] if held is not None and held[0] is req and held[1] == req.num_preemptions else 0
            if done < len(blocks):
                table[b, done:len(blocks)] = blocks[done:]
            self._table_rows[b] = (req, req.num_preemptions, len(blocks))
            if n == 1:  # a decode: scalars, no array ops
                num_decodes += 1
                ids[row] = req.token_ids[start]
                positions[row] = start
                slots[row] = blocks[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, start + n)                                          # [n]
                ids[row:row + n] = req.token_ids[start:start + n]
                positions[row:row + n] = pos
                slots[row:row + n] = table[b, pos // bs].astype(np.int64) * bs + pos % bs  # [n]
            row += n
            qsl[b + 1] = row
            lens[b] = start + n
            width = max(width, len(blocks))
            max_len = max(max_len, start + n)
        return HostStep(len(scheduled), row, num_decodes, width, max_len)

    def _fill(self, scheduled: list[ScheduledRequest], stats_seqs: list[int] | None) -> AttentionMetadata:
        """Write the step's inputs into the buffers and describe them for the attention backend."""
        buf = self.buffers
        step = self._write_host(scheduled)
        num_seqs, num_tokens, width = step.num_seqs, step.num_tokens, step.width
        return AttentionMetadata(
            num_decodes=step.num_decodes, num_tokens=num_tokens, max_seq_len=step.max_len,
            slot_mapping=buf.to_device("slot_mapping", num_tokens),                      # [T]
            query_start_loc=buf.to_device("query_start_loc", num_seqs + 1),              # [B + 1]
            seq_lens=buf.to_device("seq_lens", num_seqs),                                # [B]
            block_table=buf.to_device("block_table", num_seqs, width),                   # [B, W]
            query_start_loc_cpu=buf.query_start_loc[:num_seqs + 1], seq_lens_cpu=buf.seq_lens[:num_seqs],
            stats_seqs_cpu=None if stats_seqs is None else torch.tensor(stats_seqs, dtype=torch.long))

    def execute(self, batch: Batch, compute_stats: bool, time_attention: bool = False) -> StepOutput:
        # decodes first (stable: arrival order within each kind), as the metadata promises
        scheduled = sorted(batch.scheduled, key=lambda s: s.num_new_tokens != 1)
        samples = [b for b, s in enumerate(scheduled) if s.samples]
        stats = samples if compute_stats and samples else None
        graphs = self.graphs
        if (graphs is not None and not time_attention and len(scheduled) <= graphs.max_batch
                and all(s.num_new_tokens == 1 for s in scheduled)):
            logits, telemetry, num_tokens, times = self._replay(graphs, scheduled, samples, stats)
        else:
            logits, telemetry, num_tokens, times = self._forward(scheduled, samples, stats, time_attention)
        rows = [self._sampling_row(scheduled[b].request) for b in samples]
        constrained = [k for k, b in enumerate(samples) if scheduled[b].request.grammar is not None]
        allowed = None
        if constrained:
            mask = new_bitmask(len(constrained), self.model_config.vocab_size)          # [R, W]
            for i, k in enumerate(constrained):
                fill_bitmask(scheduled[samples[k]].request.grammar, mask, i)
            allowed = (mask, constrained)
        result = sample(logits.float(), rows, allowed) if rows else None
        sampled = tuple(
            SampledToken(scheduled[b].request.request_id, result.token_ids[k], result.logprobs[k],
                         k if telemetry is not None else None, k in result.nonfinite_rows)
            for k, b in enumerate(samples))
        return StepOutput(sampled=sampled, telemetry=telemetry, num_tokens=num_tokens, attention_times=times)

    def _forward(self, scheduled: list[ScheduledRequest], samples: list[int], stats: list[int] | None,
                 time_attention: bool) -> tuple[torch.Tensor, StepTelemetry | None, int, tuple[float, ...] | None]:
        """An eager step: logits [S, V] of the sampled rows, their telemetry, T, attention times."""
        meta = self._fill(scheduled, stats)
        buf = self.buffers
        buf.np["sample_rows"][:len(samples)] = buf.np["query_start_loc"][[b + 1 for b in samples]] - 1
        plan = self.attention.prepare(meta)
        out = self.model.forward(
            buf.to_device("input_ids", meta.num_tokens), buf.to_device("positions", meta.num_tokens),  # [T], [T]
            self.attention, plan, buf.to_device("sample_rows", len(samples)),                         # [S]
            timer=LayerTimer(self.device) if time_attention else None, num_decodes=meta.num_decodes,
            sample_decodes=sum(1 for b in samples if b < meta.num_decodes))
        telemetry = None
        if out.telemetry is not None:
            keys = meta.seq_lens[meta.stats_seqs_cpu.to(self.device)]                   # [R]
            telemetry = StepTelemetry(out.telemetry, keys)                              # [L, R, H, 4], [R]
        return out.logits, telemetry, meta.num_tokens, out.attention_times

    def _replay(self, graphs: DecodeGraphs, scheduled: list[ScheduledRequest], samples: list[int],
                stats: list[int] | None) -> tuple[torch.Tensor, StepTelemetry | None, int, None]:
        """A decode-only step through its bucket's CUDA graph: the same outputs as _forward."""
        step = self._write_host(scheduled)
        n = step.num_seqs
        out = graphs.replay(n, step.width, stats or [])
        for r in range(n, graphs.bucket(n)):   # padding overwrote these block-table rows
            self._table_rows[r] = None
        picked = torch.tensor(samples, device=self.device)                              # [S]
        logits = out.logits[picked]                                                     # [S, V] a copy
        telemetry = None
        if stats is not None:
            rows = torch.tensor(stats, device=self.device)                              # [R]
            keys = self.buffers.dev["seq_lens"][rows]                                   # [R]
            telemetry = StepTelemetry(out.telemetry[:, rows], keys)                     # [L, R, H, 4] a copy
        return logits, telemetry, n, None

    @staticmethod
    def _sampling_row(req: Request) -> SamplingRow:
        p = req.params
        suppress = ()
        if req.num_output_tokens < p.min_tokens:
            suppress = tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))))
        return SamplingRow(params=p, prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids,
                           seed=derive_seed(req.seed, req.num_output_tokens), suppress_token_ids=suppress)
