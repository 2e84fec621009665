"""Token sampling: pure functions over a batch of logits rows, no engine state.

Order (vLLM's and Hugging Face's where they define it): logit bias; suppressed ids -> -inf; repetition
penalty (HF, on prompt and output tokens); frequency and presence penalties (OpenAI, output
tokens only); greedy rows take the argmax; the others are divided by their temperature and
truncated by top-k, then top-p (on the top-k-renormalized distribution), then min-p, and drawn.

Truncation is one threshold per row: each filter keeps the logits at or above some value, so the
three combine into the largest of their thresholds and the vocabulary is masked once.

The draw is inverse-CDF: one uniform u per row from torch.Generator().manual_seed(row.seed);
the token is the first whose running probability exceeds u * (kept mass). Its distribution is
that of the exponential race argmax(p / q), q ~ Exp(1), which vLLM uses, but it takes one random
number per row instead of one per vocabulary entry: here, at V = 49152, the exponentials cost
1.5 ms per row and the cumulative sum 0.05 ms. Top-p looks at the 64 most likely tokens first
(8x more while they hold less than top_p) instead of sorting the vocabulary (7 ms per row).

Batch invariance: a row's token and logprobs depend only on its own logits, params and seed.
Every batched operation here works row by row (softmax, log_softmax, cumsum, topk values, amax,
elementwise ops), and a row that does not use an option is left bit-equal by it (x / 1, x - 0, a
-inf threshold). Float sums over the vocabulary, whose order may depend on the batch size, are
never used.

Log-probabilities are vLLM's default "raw" ones: log_softmax of the logits as given, before
suppression, penalties and temperature.

Hostile parameters cannot break a row, nor reach its neighbours: token ids are checked against
the vocabulary before any flat index is formed; penalties are applied in float64 and the results
held within +-PENALIZED_LOGIT_LIMIT (a suppressed -inf stays -inf); temperatures below
GREEDY_BELOW_TEMPERATURE are greedy and above MAX_EFFECTIVE_TEMPERATURE are clamped to it, so
logits / temperature stays finite; a drawn index is never past the vocabulary. A row whose raw
logits are not finite is reported in SamplerOutput.nonfinite_rows (its request fails alone).

References: vLLM v1 sampler (vllm/v1/sample/), Hugging Face logits processors
(RepetitionPenalty, TopK, TopP, MinP), OpenAI's presence/frequency penalty formula.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from server.engine.request import MAX_EFFECTIVE_TEMPERATURE, SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1
_BITS = torch.arange(32, dtype=torch.int32)                            # [32] bit positions in a mask word
# Where penalized logits are held: far above any model's logits, far below float32's limit once
# divided by the smallest sampled temperature.
PENALIZED_LOGIT_LIMIT = 1e30
_TOP_P_CANDIDATES = 64   # top-p's first look; 8x more for the rows whose candidates fall short


@dataclass(frozen=True)
class SamplingRow:
    """One row of the batch: its parameters, its token history and the seed of this draw."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int                                   # this draw's seed (derive_seed of the request's)
    suppress_token_ids: tuple[int, ...] = ()    # e.g. EOS / stop ids below min_tokens: -> -inf


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]                        # one per row
    logprobs: list[TokenLogprob | None]         # None where the row's params.logprobs is None
    nonfinite_rows: frozenset[int] = frozenset()  # rows whose logits held NaN or inf: no valid token


# ---------------------------------------------------------------------------------------- seeds

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(request_seed: int, position: int) -> int:
    """Seed of the draw at output `position` of a request seeded `request_seed`, in [0, 2**63).

    splitmix64(splitmix64(seed) xor position) >> 1: distinct positions give distinct 64-bit
    values (splitmix64 is a bijection), so seeds collide only by the final shift (2**-63).
    """
    return _splitmix64(_splitmix64(request_seed & _MASK64) ^ (position & _MASK64)) >> 1


def seeded_uniforms(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One float64 uniform in [0, 1) per seed, each from its own torch.Generator."""
    values = [torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64).item()
              for s in seeds]
    return torch.tensor(values, dtype=torch.float64, device=device)  # [B]


# ------------------------------------------------------------------------------------ penalties

def _as_ids(ids: Sequence[int]) -> torch.Tensor:
    """Token ids as int64 [n]; numpy's fromiter reads a list 4x faster than torch.tensor."""
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).long()                                 # [n]
    if isinstance(ids, np.ndarray):
        return torch.from_numpy(ids.reshape(-1).astype(np.int64))     # [n]
    return torch.from_numpy(np.fromiter(ids, dtype=np.int64, count=len(ids)))  # [n]


def _flat_ids(token_ids: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """Row-major flat indices b * vocab + t of every t in row b's list (duplicates kept).
    Raises ValueError for an id outside [0, vocab): it would index another row."""
    rows = [(b, _as_ids(ids)) for b, ids in enumerate(token_ids) if len(ids)]  # P x [n_b]
    if not rows:
        return torch.zeros(0, dtype=torch.long, device=device)        # [0]
    for b, ids in rows:
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token id outside the vocabulary [0, {vocab}) in sampling row {b}")
    return torch.cat([ids.to(device) + b * vocab for b, ids in rows])  # [N]


def suppress_tokens_(out: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> None:
    """In place: out[b, t] = -inf for each t in token_ids[b]. out [B, V] contiguous."""
    flat = _flat_ids(token_ids, out.shape[-1], out.device)            # [N]
    out.view(-1)[flat] = float("-inf")                                # [B * V]


def apply_penalties_(out: torch.Tensor, prompt_token_ids: Sequence[Sequence[int]],
                     output_token_ids: Sequence[Sequence[int]], repetition: torch.Tensor,
                     frequency: torch.Tensor, presence: torch.Tensor) -> None:
    """Repetition penalty (HF) on prompt-or-output tokens, then frequency and presence (OpenAI).

    out [B, V]; per-row token lists; penalties [B]. A seen token's logit > 0 is divided by
    its row's repetition penalty, otherwise multiplied; then each output token's logit loses
    frequency * count + presence. Only the listed tokens are touched (gather, then scatter;
    a token listed twice is written twice with the same value), and neutral values (1, 0, 0)
    leave a row bit-equal. In place on out [B, V] (contiguous).
    """
    vocab = out.shape[-1]
    flat = out.view(-1)                                               # [B * V]
    ids = _flat_ids(output_token_ids, vocab, out.device)              # [M]
    seen = torch.cat([_flat_ids(prompt_token_ids, vocab, out.device), ids])  # [N]
    rep = repetition.to(out).index_select(0, seen // vocab)           # [N]
    vals = flat.index_select(0, seen)                                 # [N]
    flat.index_copy_(0, seen, torch.where(vals > 0, vals / rep, vals * rep))  # [B * V]
    uniq, counts = torch.unique(ids, return_counts=True)              # [U], [U]
    row = uniq // vocab                                               # [U]
    penalty = (frequency.to(out).index_select(0, row) * counts.to(out)
               + presence.to(out).index_select(0, row))               # [U]
    flat.index_copy_(0, uniq, flat.index_select(0, uniq) - penalty)   # [B * V]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def add_logit_bias_(out: torch.Tensor, biases: Sequence[Sequence[tuple[int, float]]]) -> None:
    """In place: out[b, t] += bias for each (t, bias) of row b. out [B, V] contiguous."""
    flat = _flat_ids([[t for t, _ in row] for row in biases], out.shape[-1], out.device)  # [N]
    values = torch.tensor([v for row in biases for _, v in row], dtype=out.dtype, device=out.device)  # [N]
    out.view(-1).index_add_(0, flat, values)                          # [B * V]


def penalize(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Logit bias, suppression and penalties for the rows that ask for them, in that order, on
    one copy (a suppressed id stays suppressed whatever its bias); logits itself when no row asks."""
    suppress = any(r.suppress_token_ids for r in rows)
    penalties = any(_has_penalty(r.params) for r in rows)
    bias = any(r.params.logit_bias for r in rows)
    if not (suppress or penalties or bias):
        return logits
    # float64 where penalties run: a 1e-300 penalty must not turn a logit into inf
    out = logits.to(torch.float64 if penalties else logits.dtype, memory_format=torch.contiguous_format,
                    copy=True)                                        # [B, V]
    if bias:
        add_logit_bias_(out, [r.params.logit_bias for r in rows])
    if not penalties:
        suppress_tokens_(out, [r.suppress_token_ids for r in rows])
        return out
    if suppress:
        suppress_tokens_(out, [r.suppress_token_ids for r in rows])
    if penalties:
        device = out.device
        apply_penalties_(
            out,
            [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in rows],
            [r.output_token_ids if _has_penalty(r.params) else () for r in rows],
            torch.tensor([r.params.repetition_penalty for r in rows], device=device),  # [B]
            torch.tensor([r.params.frequency_penalty for r in rows], device=device),   # [B]
            torch.tensor([r.params.presence_penalty for r in rows], device=device),    # [B]
        )
    limit = PENALIZED_LOGIT_LIMIT
    held = torch.where(out == float("-inf"), out, out.clamp(-limit, limit))  # [B, V] -inf stays suppressed
    return held.to(logits.dtype)                                      # [B, V]


# ---------------------------------------------------------------------------------- truncation

def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [B, V] divided by each row's temperature [B] (> 0; above MAX_EFFECTIVE_TEMPERATURE
    taken as that)."""
    return logits / temperature.clamp(max=MAX_EFFECTIVE_TEMPERATURE).to(logits)[:, None]  # [B, V]


def top_values(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, m) along the last dim: values descending and exact (among equal values any
    index may come first). At V = 49152, B = 16 and m <= 64 it takes a third to two thirds of
    topk's time; for m > V / 256 it is topk.

    x [B, V] is cut into blocks of 32. Only the m blocks with the largest maxima can hold the
    m largest entries (an entry outside them is at most each of those m maxima), so topk runs
    on those m * 32 candidates instead of V.
    """
    batch, vocab = x.shape
    block = 32
    if m == 0 or vocab % block or 8 * m * block > vocab or not x.is_contiguous():
        return x.topk(m, dim=-1)                                      # [B, m] values, indices
    blocks = x.view(batch, vocab // block, block)                     # [B, V/32, 32]
    best = blocks.amax(dim=-1).topk(m, dim=-1).indices                # [B, m], block ids
    cand = blocks.gather(1, best[:, :, None].expand(-1, -1, block))   # [B, m, 32]
    values, pos = cand.view(batch, m * block).topk(m, dim=-1)         # [B, m]
    index = best.gather(1, pos // block) * block + pos % block        # [B, m]
    return values, index


def truncation_threshold(logits: torch.Tensor, probs: torch.Tensor, top_k: torch.Tensor,
                         top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per row, the logit below which top-k, then top-p, then min-p drop a token.

    logits [B, V] (temperature applied), probs = softmax(logits) [B, V]; top_k [B] (0, -1 or
    >= V: off), top_p [B] (1: off), min_p [B] (0: off). Returns [B], -inf where nothing is
    dropped. Top-k keeps ties with its k-th logit. Top-p keeps the smallest most-likely set
    whose (top-k-renormalized) probability reaches top_p, at least one token, plus ties with
    its last member. Min-p keeps p >= min_p * p_max, i.e. logit >= max logit + ln(min_p).
    """
    batch, vocab = logits.shape
    device = logits.device
    top_k = top_k.to(device=device, dtype=torch.long)                 # [B]
    top_p = top_p.to(device=device, dtype=torch.float64)              # [B]
    threshold = logits.amax(dim=-1) + torch.log(min_p.to(logits))     # [B], -inf where min_p = 0
    use_k = (top_k > 0) & (top_k < vocab)                             # [B]
    use_p = top_p < 1                                                 # [B]
    k = torch.where(use_k, top_k, vocab)                              # [B]
    pending = torch.nonzero(use_k | use_p).flatten()                  # [R]
    m = max([_TOP_P_CANDIDATES] * bool((use_p & ~use_k).any()) + k[use_k].tolist(), default=1)
    while pending.numel() > 0:
        m = min(m, vocab)
        rows = logits if pending.numel() == batch else logits[pending]  # [R, V]
        values, index = top_values(rows, m)                           # [R, m], descending
        kk = k[pending].clamp(max=m)                                  # [R]
        in_k = torch.arange(m, device=device)[None, :] < kk[:, None]  # [R, m]
        mass = probs[pending[:, None], index] * in_k                  # [R, m]
        cum = mass.cumsum(dim=-1, dtype=torch.float64)                # [R, m]
        total = torch.where(use_k[pending], cum[:, -1], 1.0)          # [R], top-k renormalizes
        need = top_p[pending] * total                                 # [R]
        n = (1 + (cum[:, :-1] < need[:, None]).sum(dim=-1)).minimum(kk)  # [R], tokens kept
        thr_p = values.gather(1, (n - 1)[:, None]).squeeze(1)         # [R]
        thr_k = values.gather(1, (kk - 1)[:, None]).squeeze(1)        # [R]
        thr = torch.maximum(torch.where(use_p[pending], thr_p, float("-inf")),
                            torch.where(use_k[pending], thr_k, float("-inf")))  # [R]
        done = use_k[pending] | (cum[:, -1] >= need) | (m == vocab)   # [R]
        threshold[pending[done]] = torch.maximum(threshold[pending[done]], thr[done])  # [B]
        pending = pending[~done]                                      # [R']
        m *= 8
    return threshold                                                  # [B]


# ---------------------------------------------------------------------------------------- draws

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row [B], the lowest index on ties; a NaN counts as the largest, as in
    torch.argmax (whose CPU kernel tracks indices one value at a time: ~350 us for 16 rows of
    49152). In two stages: the max of each block of S values (a vectorized reduction), the first
    block holding the row's max, then the first index of the max inside that block. The same
    result as logits.argmax(-1)."""
    b, v = logits.shape
    s = _argmax_block(v)
    if s is None or b == 0:
        return logits.argmax(dim=-1)                                  # [B]
    blocks = logits.reshape(b, v // s, s)                             # [B, V / S, S]
    first = blocks.amax(dim=-1).argmax(dim=-1)                        # [B] first block holding the max
    inner = blocks[torch.arange(b, device=logits.device), first].argmax(dim=-1)  # [B]
    return first * s + inner                                          # [B]


@functools.cache
def _argmax_block(vocab: int) -> int | None:
    """The largest divisor of vocab in 256 .. 2048 (block size of greedy), or None."""
    return next((s for s in range(min(vocab // 2, 2048), 255, -1) if vocab % s == 0), None)


def inverse_cdf_draw(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token whose interval of the running probability sum holds u * total.

    cdf [B, V] = probs.cumsum(-1) of probs >= 0 that need not sum to 1; uniforms [B] in
    [0, 1). A token of probability 0 has an empty interval and is never drawn.
    """
    total = cdf[:, -1]                                                # [B]
    target = (uniforms.to(cdf.device) * total.double()).to(cdf.dtype)  # [B]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # [B]
    drawn = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # [B]
    return drawn.clamp_(max=cdf.shape[-1] - 1)                        # [B] a NaN row must not index past V


def sample_random(logits: torch.Tensor, params: Sequence[SamplingParams],
                  seeds: Sequence[int]) -> torch.Tensor:
    """Temperature, truncation and the seeded draw, for rows with temperature > 0."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=device)  # [S]
    x = apply_temperature(logits, temperature)                        # [S, V]
    probs = torch.softmax(x, dim=-1)                                  # [S, V]
    if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
        threshold = truncation_threshold(
            x, probs,
            torch.tensor([p.top_k for p in params]),                  # [S]
            torch.tensor([p.top_p for p in params], dtype=torch.float64),  # [S]
            torch.tensor([p.min_p for p in params], dtype=torch.float64))  # [S]
        probs.mul_(x.ge_(threshold[:, None]))                         # [S, V], x is now 0/1
    return inverse_cdf_draw(probs.cumsum_(dim=-1), seeded_uniforms(seeds, device))  # [S]


# -------------------------------------------------------------------------------------- logprobs

def compute_logprobs(logits: torch.Tensor, token_ids: Sequence[int],
                     num_top: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Log-probabilities (log_softmax of logits [B, V]) of the chosen tokens, and the num_top
    most likely tokens of each row (best first); None for rows whose num_top is None."""
    rows = [i for i, k in enumerate(num_top) if k is not None]
    result: list[TokenLogprob | None] = [None] * len(num_top)
    if not rows:
        return result
    device = logits.device
    if len(rows) < len(num_top):
        logits = logits.index_select(0, torch.tensor(rows, device=device))  # [L, V]
    logp = torch.log_softmax(logits, dim=-1)                          # [L, V]
    chosen_ids = torch.tensor([token_ids[i] for i in rows], device=device)  # [L]
    chosen = logp.gather(1, chosen_ids[:, None]).squeeze(1).tolist()  # L floats
    kmax = max(num_top[i] for i in rows)
    top_lp, top_ids = top_values(logp, kmax)                          # [L, kmax]
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = num_top[i]
        result[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen[j],
                                 top=tuple(zip(top_ids[j][:k], top_lp[j][:k])))
    return result


# ---------------------------------------------------------------------------------- token masks

def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: logits[rows[i], t] = -inf for every token t that bitmask[i] disallows (bit t & 31
    of word t >> 5 clear). logits [B, V]; bitmask [len(rows), ceil(V / 32)] int32."""
    vocab = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().view(len(rows), -1)[:, :vocab]  # [R, V]
    index = torch.tensor(list(rows), device=logits.device)            # [R]
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))  # [R, V]


# ------------------------------------------------------------------------------------ the sampler

def nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """Rows of logits [B, V] holding a NaN or an infinity. One reduction in the common case: a
    row of finite values has a finite sum unless the sum overflows, and only then (or when a
    value is not finite) is the row checked value by value."""
    suspect = (~torch.isfinite(logits.sum(dim=-1))).nonzero().flatten()           # [B'] rows to check
    if suspect.numel() == 0:
        return []
    rows = logits.index_select(0, suspect)                                          # [B', V]
    return suspect[~torch.isfinite(rows).all(dim=-1)].tolist()


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow],
           allowed: tuple[torch.Tensor, Sequence[int]] | None = None) -> SamplerOutput:
    """One token per row of logits [B, V] (float32), with logprobs where asked. allowed: a token
    bitmask [R, ceil(V / 32)] for the rows it lists (structured output), applied after penalties."""
    assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    raw = logits.float()                                              # [B, V]
    x = penalize(raw, rows)                                           # [B, V]
    if allowed is not None:
        x = x.clone() if x is raw else x                              # [B, V] raw stays for logprobs
        apply_bitmask_(x, *allowed)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not random_rows:
        token_ids = greedy(x)                                         # [B]
    elif len(random_rows) == len(rows):
        token_ids = sample_random(x, [r.params for r in rows], [r.seed for r in rows])  # [B]
    else:
        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        g = torch.tensor(greedy_rows, device=x.device)                # [G]
        s = torch.tensor(random_rows, device=x.device)                # [S]
        token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)  # [B]
        token_ids[g] = greedy(x.index_select(0, g))                   # [G]
        token_ids[s] = sample_random(x.index_select(0, s), [rows[i].params for i in random_rows],
                                     [rows[i].seed for i in random_rows])  # [S]
    ids = token_ids.tolist()
    bad = nonfinite_rows(raw)
    return SamplerOutput(token_ids=ids,
                         logprobs=compute_logprobs(raw, ids, [r.params.logprobs for r in rows]),
                         nonfinite_rows=frozenset(bad))
