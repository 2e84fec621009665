"""Unit tests of server/engine/sampler.py: semantics against hand-computed float64 references,
seeded determinism, batch invariance and the empirical distribution of the draw."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.engine.errors import InvalidRequestError
from server.engine.request import SamplingParams
from server.engine.sampler import (
    SamplingRow,
    apply_penalties_,
    apply_temperature,
    derive_seed,
    greedy,
    inverse_cdf_draw,
    sample,
    seeded_uniforms,
    suppress_tokens_,
    top_values,
    truncation_threshold,
)

NEG_INF = float("-inf")


# One rule at a time, on a copy, from the sampler's own pieces (the sampler applies them together).
def suppress_tokens(logits: torch.Tensor, token_ids) -> torch.Tensor:
    out = logits.clone()                                              # [B, V]
    suppress_tokens_(out, token_ids)
    return out


def apply_penalties(logits: torch.Tensor, prompt, output, repetition, frequency, presence) -> torch.Tensor:
    out = logits.clone()                                              # [B, V]
    apply_penalties_(out, prompt, output, repetition, frequency, presence)
    return out


def _threshold(logits: torch.Tensor, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    b = logits.shape[0]
    return truncation_threshold(
        logits, torch.softmax(logits, dim=-1),
        top_k if top_k is not None else torch.zeros(b, dtype=torch.long),           # [B]
        top_p if top_p is not None else torch.ones(b, dtype=torch.float64),         # [B]
        min_p if min_p is not None else torch.zeros(b, dtype=torch.float64))        # [B]


def _mask_below(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(logits < threshold[:, None], NEG_INF)  # [B, V]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    return _mask_below(logits, _threshold(logits, top_k=top_k))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return _mask_below(logits, _threshold(logits, top_p=top_p))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    return _mask_below(logits, _threshold(logits, min_p=min_p.to(torch.float64)))


def _logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale  # [B, V]


def _row(seed: int = 0, prompt=(), output=(), suppress=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), tuple(prompt), tuple(output), seed, tuple(suppress))


def _kept(x: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(x)).flatten().tolist())


# ---------------------------------------------------------------------------------- greedy

def test_greedy_is_argmax():
    x = _logits(8, 1000, 1)                                           # [8, 1000]
    out = sample(x, [_row(temperature=0.0) for _ in range(8)])
    assert out.token_ids == torch.argmax(x, dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_ties_take_lowest_index_and_handle_inf():
    x = torch.zeros(4, 10)                                            # [4, 10]
    x[0, [7, 3, 9]] = 5.0
    x[1] = NEG_INF
    x[1, 4] = -1.0
    x[2, 9] = float("inf")
    x[3, 1], x[3, 6] = 5.0 - 5e-7, 5.0                               # nearly tied: not a tie
    assert greedy(x).tolist() == [3, 4, 9, 6] == torch.argmax(x, dim=-1).tolist()


@pytest.mark.parametrize("vocab", [49152, 1024, 512 * 3, 1009])  # 1009 (prime): no block size, torch's argmax
def test_greedy_in_blocks_equals_argmax_on_ties_infinities_and_nan(vocab):
    """greedy's two-stage argmax (block maxima, then inside the first block holding the max)
    returns what torch.argmax does: the lowest index on ties, also across blocks, and the first
    NaN of a row that holds one."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)                            # [9, V]
    x[1] = 3.0                                                        # all tied: 0
    x[2, [vocab - 1, vocab // 2, 700]] = 50.0                         # ties in different blocks
    x[3] = NEG_INF
    x[3, vocab - 2] = -1e30
    x[4, [600, 5]] = float("inf")
    x[5, [900, 801]] = float("nan")                                   # NaN counts as the largest
    x[6, 17] = float("nan")
    x[6, 3] = float("inf")
    x[7] = NEG_INF                                                    # all -inf: 0
    assert greedy(x).tolist() == torch.argmax(x, dim=-1).tolist()
    assert greedy(x[8:8].reshape(0, vocab)).shape == (0,)


def test_greedy_rows_mixed_with_random_rows():
    x = _logits(6, 300, 2)                                            # [6, 300]
    rows = [_row(seed=i, temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = sample(x, rows)
    for i in range(0, 6, 2):
        assert out.token_ids[i] == int(torch.argmax(x[i]))


def test_greedy_uses_penalized_logits():
    x = torch.tensor([[2.0, 1.9, 0.0]])                               # [1, 3]
    assert sample(x, [_row(temperature=0.0)]).token_ids == [0]
    assert sample(x, [_row(temperature=0.0, output=[0], repetition_penalty=1.2)]).token_ids == [1]
    assert sample(x, [_row(temperature=0.0, output=[0], presence_penalty=0.5)]).token_ids == [1]


def test_shape_mismatch_is_an_error():
    with pytest.raises(AssertionError):
        sample(torch.zeros(2, 5), [_row()])


def test_sample_does_not_modify_its_input():
    x = _logits(4, 200, 3)                                            # [4, 200]
    before = x.clone()                                                # [4, 200]
    rows = [_row(seed=i, temperature=0.7, top_p=0.8, top_k=50, min_p=0.05, prompt=[1, 2],
                 output=[3, 3], suppress=[4], repetition_penalty=1.3, frequency_penalty=0.4,
                 presence_penalty=0.2, logprobs=2) for i in range(4)]
    sample(x, rows)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------ temperature

def test_temperature_scales_logits_per_row():
    x = _logits(3, 20, 4)                                             # [3, 20]
    t = torch.tensor([0.5, 1.0, 2.0])                                 # [3]
    y = apply_temperature(x, t)                                       # [3, 20]
    assert torch.allclose(y, x / t[:, None])
    assert torch.equal(y[1], x[1])                                    # temperature 1 is bit-equal
    p = torch.softmax(y, dim=-1)                                      # [3, 20]
    entropy = -(p * p.log()).sum(dim=-1)                              # [3]
    assert entropy[0] < entropy[1] < entropy[2]                       # colder is sharper


# ------------------------------------------------------------------------------------ top-k

def test_top_k_keeps_exactly_k():
    x = _logits(4, 500, 5)                                            # [4, 500]
    k = torch.tensor([1, 7, 0, -1])                                   # [4]
    y = apply_top_k(x, k)                                             # [4, 500]
    for row, kk in enumerate(k.tolist()):
        expected = set(torch.topk(x[row], kk).indices.tolist()) if kk > 0 else set(range(500))
        assert _kept(y[row]) == expected
        assert torch.equal(y[row][list(expected)], x[row][list(expected)])


def test_top_k_keeps_ties_with_the_kth():
    x = torch.tensor([[5.0, 3.0, 3.0, 1.0, 3.0]])                     # [1, 5]
    assert _kept(apply_top_k(x, torch.tensor([2]))) == {0, 1, 2, 4}


def test_top_k_at_least_vocab_is_off():
    x = _logits(1, 10, 6)                                             # [1, 10]
    assert torch.equal(apply_top_k(x, torch.tensor([10])), x)
    assert torch.equal(apply_top_k(x, torch.tensor([50])), x)


# ------------------------------------------------------------------------------------ top-p

def _top_p_reference(logits: torch.Tensor, top_p: float) -> set[int]:
    """Float64: the smallest most-likely set whose probability reaches top_p."""
    p = torch.softmax(logits.double(), dim=-1)                        # [V]
    order = torch.argsort(p, descending=True)                         # [V]
    cum = torch.cumsum(p[order], dim=0)                               # [V]
    n = int((cum < top_p).sum()) + 1
    return set(order[:n].tolist())


def _boundary_margin(logits: torch.Tensor, top_p: float) -> float:
    cum = torch.cumsum(torch.sort(torch.softmax(logits.double(), dim=-1), descending=True).values, 0)
    return float((cum - top_p).abs().min())


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 200),
       top_p=st.floats(0.01, 0.999), scale=st.sampled_from([0.3, 1.0, 3.0, 8.0]))
def test_top_p_matches_float64_reference(seed, vocab, top_p, scale):
    x = _logits(1, vocab, seed, scale)                                # [1, V]
    assume(_boundary_margin(x[0], top_p) > 1e-5)
    y = apply_top_p(x, torch.tensor([top_p], dtype=torch.float64))   # [1, V]
    assert _kept(y[0]) == _top_p_reference(x[0], top_p)


def test_top_p_with_a_large_nucleus_looks_past_the_first_candidates():
    x = _logits(3, 5000, 7, scale=0.5)                                # [3, 5000], flat
    p = torch.tensor([0.9, 0.3, 0.995], dtype=torch.float64)          # [3]
    y = apply_top_p(x, p)                                             # [3, 5000]
    for row in range(3):
        expected = _top_p_reference(x[row], float(p[row]))
        assert len(expected) > 64
        assert _kept(y[row]) == expected


def test_top_p_keeps_at_least_one_token_and_one_is_off():
    x = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 0.0]])              # [2, 3]
    assert _kept(apply_top_p(x, torch.tensor([1e-9, 1e-9], dtype=torch.float64))[0]) == {0}
    assert torch.equal(apply_top_p(x, torch.tensor([1.0, 1.0], dtype=torch.float64)), x)


def test_top_p_hand_computed():
    # probabilities 0.5, 0.3, 0.15, 0.05
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()                  # [1, 4]
    for top_p, expected in [(0.4, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
                            (0.96, {0, 1, 2, 3})]:
        kept = _kept(apply_top_p(x, torch.tensor([top_p], dtype=torch.float64))[0])
        assert kept == expected, top_p


def test_top_p_after_top_k_uses_the_renormalized_distribution():
    # top-k 2 of (0.4, 0.3, 0.2, 0.1) renormalizes to (4/7, 3/7): top-p 0.55 keeps one token,
    # top-p 0.6 both; on the raw distribution 0.6 would keep two and 0.55 two as well.
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()                    # [1, 4]
    probs = torch.softmax(x, dim=-1)                                  # [1, 4]
    for top_p, expected in [(0.55, {0}), (0.6, {0, 1}), (1.0, {0, 1})]:
        thr = truncation_threshold(x, probs, torch.tensor([2]),
                                   torch.tensor([top_p], dtype=torch.float64),
                                   torch.tensor([0.0], dtype=torch.float64))  # [1]
        assert set(torch.nonzero(x[0] >= thr[0]).flatten().tolist()) == expected, top_p


# ------------------------------------------------------------------------------------ min-p

def test_min_p_against_reference():
    x = _logits(3, 300, 8)                                            # [3, 300]
    m = torch.tensor([0.0, 0.05, 0.5], dtype=torch.float64)           # [3]
    y = apply_min_p(x, m)                                             # [3, 300]
    p = torch.softmax(x.double(), dim=-1)                             # [3, 300]
    for row in range(3):
        expected = set(torch.nonzero(p[row] >= m[row] * p[row].max()).flatten().tolist())
        assert _kept(y[row]) == expected
    assert torch.equal(y[0], x[0])


# --------------------------------------------------------------------------------- suppress

def test_suppressed_ids_are_never_chosen():
    x = torch.tensor([[9.0, 8.9, 0.0, -1.0]])                         # [1, 4]
    assert torch.equal(suppress_tokens(x, [(0, 2)]), torch.tensor([[NEG_INF, 8.9, NEG_INF, -1.0]]))
    assert sample(x, [_row(temperature=0.0, suppress=[0])]).token_ids == [1]
    rows = [_row(seed=s, temperature=5.0, suppress=[0, 1]) for s in range(500)]
    out = sample(x.expand(500, 4), rows)
    assert set(out.token_ids) == {2, 3}


# -------------------------------------------------------------------------------- penalties

def test_repetition_penalty_on_prompt_and_output_tokens():
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 4.0]])              # [1, 6]
    y = apply_penalties(x, [[0, 1, 1]], [[3]], torch.tensor([2.0]), torch.tensor([0.0]),
                        torch.tensor([0.0]))                          # [1, 6]
    assert y.tolist() == [[1.0, -4.0, 3.0, -2.0, 0.5, 4.0]]


def test_frequency_and_presence_penalties_on_output_only():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])                          # [1, 4]
    y = apply_penalties(x, [[0, 0, 1]], [[1, 2, 2, 2]], torch.tensor([1.0]), torch.tensor([0.5]),
                        torch.tensor([0.25]))                         # [1, 4]
    expected = [1.0, 1.0 - 0.5 * 1 - 0.25, 1.0 - 0.5 * 3 - 0.25, 1.0]
    assert torch.allclose(y, torch.tensor([expected]))


def test_all_penalties_together_hand_computed():
    x = torch.tensor([[3.0, -1.5, 2.0, 0.7, -0.2],
                      [1.0, 2.0, 3.0, 4.0, 5.0]])                     # [2, 5]
    rows = [(1.5, 0.3, 0.1), (1.0, 0.0, 0.0)]                         # second row neutral
    prompt = [[0, 4], [0, 1]]
    output = [[1, 2, 2], [2]]
    y = apply_penalties(x, prompt, output, torch.tensor([r[0] for r in rows]),
                        torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]))
    expected = x.double().clone()                                     # [2, 5]
    for b, (rep, freq, pres) in enumerate(rows):
        for t in set(prompt[b]) | set(output[b]):
            v = expected[b, t]
            expected[b, t] = v / rep if v > 0 else v * rep
        for t in set(output[b]):
            expected[b, t] -= freq * output[b].count(t) + pres
    assert torch.allclose(y.double(), expected, atol=1e-6)
    assert torch.equal(y[1], x[1])


def test_penalties_in_sample_leave_other_rows_untouched():
    x = _logits(3, 50, 9)                                             # [3, 50]
    rows = [_row(temperature=0.0), _row(temperature=0.0, output=[int(torch.argmax(x[1]))],
                                        frequency_penalty=2.0, presence_penalty=2.0,
                                        repetition_penalty=2.0),
            _row(temperature=0.0)]
    out = sample(x, rows)
    assert out.token_ids[0] == int(torch.argmax(x[0]))
    assert out.token_ids[2] == int(torch.argmax(x[2]))


# ------------------------------------------------------------------------- seeds and draws

def test_derive_seed():
    seeds = [derive_seed(1234, p) for p in range(10_000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(1234, p) for p in range(10_000)]
    assert derive_seed(1234, 0) != derive_seed(1235, 0)
    for request_seed in (0, -1, 2**63 - 1, 2**64 + 5, -(2**70)):
        assert 0 <= derive_seed(request_seed, 3) < 2**63


def test_seeded_uniforms_are_deterministic_per_seed():
    a = seeded_uniforms([1, 2, 2**63 - 1])                            # [3]
    b = seeded_uniforms([2**63 - 1, 1])                               # [2]
    assert a[0] == b[1] and a[2] == b[0]
    assert ((a >= 0) & (a < 1)).all()


def test_inverse_cdf_draw_never_draws_zero_probability():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)                 # [4, 5]
    u = torch.tensor([0.0, 0.49, 0.51, 1.0 - 2**-53], dtype=torch.float64)  # [4]
    assert inverse_cdf_draw(p.cumsum(dim=-1), u).tolist() == [1, 1, 3, 3]


def test_same_seed_same_token_and_different_seeds_differ():
    x = _logits(1, 1000, 10, scale=1.0)                               # [1, 1000]
    tokens = [sample(x, [_row(seed=derive_seed(7, 0))]).token_ids[0] for _ in range(3)]
    assert len(set(tokens)) == 1
    many = sample(x.expand(50, 1000), [_row(seed=derive_seed(s, 0)) for s in range(50)])
    assert len(set(many.token_ids)) > 10


# -------------------------------------------------------------------------- batch invariance

_params = st.builds(
    dict,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 1.8]),
    top_k=st.sampled_from([0, -1, 1, 3, 20]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.8]),
    frequency_penalty=st.sampled_from([0.0, 0.5, -1.0]),
    presence_penalty=st.sampled_from([0.0, 1.0]),
    logprobs=st.sampled_from([None, 0, 1, 5]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), batch=st.integers(2, 16), vocab=st.sampled_from([7, 100, 3000]))
def test_batch_invariance(data, batch, vocab):
    x = _logits(batch, vocab, data.draw(st.integers(0, 2**31 - 1)),
                data.draw(st.sampled_from([0.5, 2.0, 6.0])))          # [B, V]
    rows = []
    for _ in range(batch):
        ids = st.lists(st.integers(0, vocab - 1), max_size=12)
        rows.append(SamplingRow(SamplingParams(**data.draw(_params)), data.draw(ids), data.draw(ids),
                                data.draw(st.integers(0, 2**63 - 1)),
                                tuple(data.draw(st.lists(st.integers(0, vocab - 1), max_size=2)))))
    together = sample(x, rows)
    for i, row in enumerate(rows):
        alone = sample(x[i:i + 1], [row])
        assert alone.token_ids[0] == together.token_ids[i]
        assert alone.logprobs[0] == together.logprobs[i]


def test_batch_invariance_at_full_vocabulary():
    vocab = 49152
    x = _logits(16, vocab, 11)                                        # [16, V]
    settings_ = [dict(temperature=0.0), dict(), dict(temperature=0.8, top_p=0.9),
                 dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, logprobs=5),
                 dict(temperature=1.2, repetition_penalty=1.1, frequency_penalty=0.5, logprobs=0)]
    rows = [_row(seed=derive_seed(i, 5), prompt=range(i, 600, 7), output=range(i, 90, 3),
                 **settings_[i % len(settings_)]) for i in range(16)]
    together = sample(x, rows)
    for i, row in enumerate(rows):
        alone = sample(x[i:i + 1], [row])
        assert alone.token_ids[0] == together.token_ids[i]
        assert alone.logprobs[0] == together.logprobs[i]


# ---------------------------------------------------------------------------- distribution

def _frequencies(x: torch.Tensor, n: int, **params) -> torch.Tensor:
    rows = [_row(seed=derive_seed(99, i), **params) for i in range(n)]
    out = sample(x.expand(n, x.shape[-1]), rows)
    return torch.bincount(torch.tensor(out.token_ids), minlength=x.shape[-1]).double() / n  # [V]


_TARGET = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])           # [6]


@pytest.mark.parametrize(("params", "expected"), [
    (dict(), _TARGET),
    (dict(temperature=0.5), _TARGET**2 / (_TARGET**2).sum()),
    (dict(top_k=3), torch.cat([_TARGET[:3] / _TARGET[:3].sum(), torch.zeros(3)])),
    (dict(top_p=0.7), torch.cat([_TARGET[:3] / _TARGET[:3].sum(), torch.zeros(3)])),
    (dict(top_k=4, top_p=0.85), torch.cat([_TARGET[:3] / _TARGET[:3].sum(), torch.zeros(3)])),
    (dict(min_p=0.3), torch.cat([_TARGET[:4] / _TARGET[:4].sum(), torch.zeros(2)])),
])
def test_draws_match_the_target_distribution(params, expected):
    n = 20_000
    x = _TARGET.log()[None, :]                                        # [1, 6]
    freq = _frequencies(x, n, **params)                               # [6]
    assert float((freq - expected.double()).abs().max()) < 0.01
    # chi-square with 5 degrees of freedom: 20.5 is its 0.999 quantile
    support = expected > 0                                            # [6]
    chi2 = float((n * (freq[support] - expected.double()[support]) ** 2
                  / expected.double()[support]).sum())
    assert chi2 < 20.5
    assert float(freq[~support].sum()) == 0.0


# ---------------------------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax():
    x = _logits(4, 1000, 12, scale=5.0)                               # [4, 1000]
    best = torch.topk(x, 3, dim=-1).indices.tolist()                  # penalize the likeliest
    rows = [_row(seed=1, logprobs=5, temperature=0.6, repetition_penalty=1.5, output=best[0]),
            _row(logprobs=0, temperature=0.0, presence_penalty=2.0, output=best[1][:1]),
            _row(logprobs=None),
            _row(seed=2, logprobs=20, top_p=0.5, suppress=best[3][:2])]
    out = sample(x, rows)
    reference = torch.log_softmax(x.double(), dim=-1)                 # [4, 1000]
    assert out.logprobs[2] is None
    assert out.logprobs[1].top == ()
    for i, k in [(0, 5), (1, 0), (3, 20)]:
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - float(reference[i, lp.token_id])) < 1e-5
        assert len(lp.top) == k
        assert [t for t, _ in lp.top] == torch.topk(reference[i], k).indices.tolist()
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        for token, value in lp.top:
            assert abs(value - float(reference[i, token])) < 1e-5


def test_logprobs_need_at_most_one_raw_softmax_pass():
    x = torch.tensor([[1000.0, 999.0, -1000.0]])                      # [1, 3], large logits
    lp = sample(x, [_row(temperature=0.0, logprobs=2)]).logprobs[0]
    reference = torch.log_softmax(x.double(), dim=-1)[0]              # [3]
    assert lp.token_id == 0
    assert abs(lp.logprob - float(reference[0])) < 1e-5
    assert [t for t, _ in lp.top] == [0, 1]
    assert math.isfinite(lp.top[1][1])


# --------------------------------------------------------------------------------- top_values

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), blocks=st.integers(1, 300), m=st.integers(0, 80),
       levels=st.sampled_from([3, 50, 10**6]))
def test_top_values_equals_topk(seed, blocks, m, levels):
    vocab = 32 * blocks
    m = min(m, vocab)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (3, vocab), generator=g).float()     # [3, V], many ties
    x[0, : vocab // 2] = NEG_INF
    values, index = top_values(x, m)                                  # [3, m]
    assert torch.equal(values, torch.topk(x, m, dim=-1).values)
    assert torch.equal(x.gather(1, index), values)
    assert all(len(set(r)) == m for r in index.tolist())


def test_top_values_at_full_vocabulary_with_ties():
    x = torch.randint(0, 40, (4, 49152), generator=torch.Generator().manual_seed(3)).float()  # [4, V]
    for m in (1, 20, 64, 192, 193, 600):
        values, index = top_values(x, m)                              # [4, m]
        assert torch.equal(values, torch.topk(x, m, dim=-1).values)
        assert torch.equal(x.gather(1, index), values)


def test_token_histories_may_be_lists_tuples_ranges_tensors_or_arrays():
    import numpy as np

    x = _logits(1, 40, 13)                                            # [1, 40]
    args = (torch.tensor([1.3]), torch.tensor([0.4]), torch.tensor([0.2]))
    expected = apply_penalties(x, [[1, 2, 3, 5]], [[5, 6, 6]], *args)  # [1, 40]
    for prompt, output in [((1, 2, 3, 5), (5, 6, 6)), (range(1, 4), [5, 6, 6]),
                           (torch.tensor([1, 2, 3]), torch.tensor([5, 6, 6], dtype=torch.int32)),
                           (np.array([1, 2, 3]), np.array([5, 6, 6], dtype=np.int32))]:
        assert torch.equal(apply_penalties(x, [prompt], [output], *args), expected)


# ------------------------------------------------------------------ hostile parameters stay in their row
def test_tiny_and_huge_temperatures_and_penalties_give_valid_tokens():
    x = _logits(4, 500, seed=21)                                      # [4, 500]
    rows = [_row(temperature=1e-30, seed=1), _row(temperature=1e300, seed=2),
            _row(repetition_penalty=1e-300, prompt=[3, 4], output=[5], seed=3),
            _row(repetition_penalty=1e300, temperature=1e-5, output=[int(x[3].argmax())], seed=4)]
    out = sample(x, rows)
    assert all(0 <= t < 500 for t in out.token_ids) and not out.nonfinite_rows
    assert out.token_ids[0] == int(x[0].argmax())                     # below 1e-5: greedy
    assert rows[0].params.greedy and not rows[3].params.greedy
    assert out.token_ids[2] in (3, 4, 5)                              # 1e-300 multiplies seen logits > 0 by 1e300


def test_a_row_with_nan_logits_is_reported_and_leaves_the_others_alone():
    x = _logits(3, 300, seed=5)                                       # [3, 300]
    rows = [_row(temperature=0.7, seed=s) for s in (1, 2, 3)]
    clean = sample(x, rows)
    poisoned = x.clone()
    poisoned[1, 17] = float("nan")
    out = sample(poisoned, rows)
    assert out.nonfinite_rows == {1}
    assert out.token_ids[0] == clean.token_ids[0] and out.token_ids[2] == clean.token_ids[2]
    assert 0 <= out.token_ids[1] < 300


def test_an_id_outside_the_vocabulary_is_refused_not_written_into_a_neighbour():
    x = _logits(2, 100, seed=6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(x, [_row(suppress=(150,)), _row()])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(x, [_row(repetition_penalty=1.5, output=(-1,)), _row()])


def test_logit_bias_bans_and_forces_in_its_row_only():
    x = _logits(3, 200, seed=8)                                       # [3, 200]
    top = [int(t) for t in x.argmax(dim=-1)]
    rows = [_row(logit_bias=((top[0], -100.0),)), _row(logit_bias=((7, 100.0),), temperature=0.8, seed=3), _row()]
    out = sample(x, rows)
    assert out.token_ids[0] != top[0] and out.token_ids[1] == 7 and out.token_ids[2] == top[2]
    assert out.logprobs == [None, None, None]
    # a suppressed id stays suppressed whatever its bias
    assert sample(x[:1], [_row(logit_bias=((5, 100.0),), suppress=(5,))]).token_ids[0] != 5


@pytest.mark.parametrize("bias,needle", [(((1, 101.0),), "in \\[-100, 100\\]"), (((1, float("nan")),), "finite"),
                                         (((-1, 1.0),), ">= 0"), (((1, 1.0), (1, 2.0)), "distinct"),
                                         (tuple((i, 1.0) for i in range(301)), "at most 300")])
def test_bad_logit_bias_is_refused(bias, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        SamplingParams(logit_bias=bias)


def test_nonfinite_rows_finds_nan_and_inf_and_spares_huge_finite_rows():
    from server.engine.sampler import nonfinite_rows

    x = torch.randn(6, 1000)                                         # [B, V]
    x[1, 7] = float("nan")
    x[3, 0] = float("-inf")
    x[4, :] = 3e38                                                   # finite, but its sum overflows
    x[5, 999] = float("inf")
    assert nonfinite_rows(x) == [1, 3, 5]
    assert nonfinite_rows(torch.randn(3, 50)) == []
