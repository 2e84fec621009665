"""The torch reference backend: attention output and per-head telemetry against float64 math on
explicit softmax probabilities, through the backend interface and the runner's metadata."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.attention import AttentionMetadata, build_backend
from server.engine.attention.torch_ref import attend, prefill_attention
from server.engine.kv_cache import KVCache
from server.engine.telemetry import finalize_stats


def reference_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int = 4):
    """float64 reference for one query row at position n-1. q [H, D]; k, v [n, KVH, D]."""
    q, k, v = q.double(), k.double(), v.double()
    h, d = q.shape
    n, kvh, _ = k.shape
    kk = k.repeat_interleave(h // kvh, dim=1)                       # [n, H, D]
    vv = v.repeat_interleave(h // kvh, dim=1)                       # [n, H, D]
    s = torch.einsum("hd,nhd->hn", q, kk) / math.sqrt(d)            # [H, n]
    p = torch.softmax(s, dim=-1)                                    # [H, n]
    out = torch.einsum("hn,nhd->hd", p, vv)                         # [H, D]
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    entropy = -plogp.sum(-1)                                        # [H]
    norm = entropy / math.log(n) if n > 1 else torch.zeros_like(entropy)
    i = n - 1
    j = torch.arange(n, dtype=torch.float64)
    lookback = (i - (p * j).sum(-1)) / i if i > 0 else torch.zeros(h, dtype=torch.float64)
    stats = torch.stack([entropy, norm, p.max(-1).values, p[:, :sink].sum(-1), lookback], dim=-1)  # [H, 5]
    return out, stats


CASES = [(n, scale) for n in (1, 2, 17, 1100) for scale in (1.0, 3.0, 20.0)]


@pytest.mark.parametrize("n,qscale", CASES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_attend_matches_float64_reference(n, qscale, heads, kv_heads):
    g = torch.Generator().manual_seed(n * 31 + int(qscale) + heads)
    d = 64
    q = torch.randn(1, heads, d, generator=g) * qscale
    k = torch.randn(1, n, kv_heads, d, generator=g)
    v = torch.randn(1, n, kv_heads, d, generator=g)
    out, acc = attend(q, k, v, torch.tensor([n]), 1.0 / math.sqrt(d), compute_stats=True)
    stats = finalize_stats(acc, torch.tensor([n]))
    ref_out, ref_stats = reference_row(q[0], k[0], v[0])
    assert torch.allclose(out[0].double(), ref_out, atol=1e-5, rtol=1e-4)
    assert (stats[0].double() - ref_stats).abs().max().item() < 1e-5
    assert (stats[..., 0] >= -1e-6).all() and (stats[..., 0] <= math.log(n) + 1e-5).all()


def test_attend_padded_batch_each_row_matches_alone():
    """Rows of different context lengths in one padded batch equal their own reference."""
    g = torch.Generator().manual_seed(7)
    lens = [1, 5, 33, 200]
    nmax, h, kvh, d = max(lens), 6, 2, 32
    q = torch.randn(len(lens), h, d, generator=g) * 4
    k = torch.randn(len(lens), nmax, kvh, d, generator=g)
    v = torch.randn(len(lens), nmax, kvh, d, generator=g)
    k[0, 1:] = 1e4  # padding past the context must not leak in, however large its keys
    v[0, 1:] = 1e4
    out, acc = attend(q, k, v, torch.tensor(lens), 1.0 / math.sqrt(d), compute_stats=True)
    stats = finalize_stats(acc, torch.tensor(lens))
    for b, n in enumerate(lens):
        ref_out, ref_stats = reference_row(q[b], k[b, :n], v[b, :n])
        assert torch.allclose(out[b].double(), ref_out, atol=1e-5, rtol=1e-4)
        assert (stats[b].double() - ref_stats).abs().max().item() < 1e-5


def test_attend_without_stats_gives_same_output():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g), torch.randn(2, 9, 2, 16, generator=g)
    lens = torch.tensor([9, 4])
    a, sa = attend(q, k, v, lens, 0.25, compute_stats=True)
    b, sb = attend(q, k, v, lens, 0.25, compute_stats=False)
    assert sb is None and sa.shape == (2, 4, 4)
    assert torch.equal(a, b)


def test_sharp_attention_is_accurate():
    """Very large logits: centred accumulators keep entropy accurate where lse - sum p s would not."""
    g = torch.Generator().manual_seed(11)
    d, n = 64, 1500
    q = torch.randn(1, 2, d, generator=g) * 50
    k = torch.randn(1, n, 1, d, generator=g)
    v = torch.randn(1, n, 1, d, generator=g)
    _, acc = attend(q, k, v, torch.tensor([n]), 1.0 / math.sqrt(d), compute_stats=True)
    stats = finalize_stats(acc, torch.tensor([n]))
    _, ref = reference_row(q[0], k[0], v[0])
    assert (stats[0].double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("cached", [0, 5, 40])
def test_prefill_attention_matches_reference(cached):
    g = torch.Generator().manual_seed(cached)
    n, h, kvh, d = 12, 4, 2, 16
    c = cached + n
    q = torch.randn(n, h, d, generator=g)
    k = torch.randn(c, kvh, d, generator=g)
    v = torch.randn(c, kvh, d, generator=g)
    out = prefill_attention(q, k, v, 1.0 / math.sqrt(d))
    for r in range(n):
        ref_out, _ = reference_row(q[r], k[:cached + r + 1], v[:cached + r + 1])
        assert torch.allclose(out[r].double(), ref_out, atol=1e-5, rtol=1e-4)


def _meta(tables: list[list[int]], lens: list[int], new: list[int], bs: int, stats: list[int] | None
          ) -> AttentionMetadata:
    """Metadata of sequences (decodes first) with block tables, total lengths and new tokens."""
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    slots = torch.tensor([t[p // bs] * bs + p % bs for t, n, nn in zip(tables, lens, new) for p in range(n - nn, n)])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return AttentionMetadata(num_decodes=sum(1 for n in new if n == 1), num_tokens=sum(new), max_seq_len=max(lens),
                             slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_table=table,
                             query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
                             stats_seqs_cpu=None if stats is None else torch.tensor(stats))


@pytest.mark.parametrize("stats", [[0, 1, 2], [1, 2], [0], None], ids=["all", "some", "decode-only", "off"])
def test_backend_reads_and_writes_through_block_tables(stats):
    """Two decode rows and a prefill chunk with a cached prefix, scattered block tables; the
    telemetry rows come out for exactly the sequences asked, in order; the output never depends
    on whether telemetry is computed."""
    from server.config import ModelConfig

    g = torch.Generator().manual_seed(5)
    h, kvh, d, bs = 4, 2, 16, 4
    mc = ModelConfig(name="t", architecture="llama", vocab_size=10, hidden_size=h * d, intermediate_size=8,
                     num_layers=1, num_heads=h, num_kv_heads=kvh, head_dim=d, max_position_embeddings=64)
    cache = KVCache.allocate(mc, num_blocks=16, block_size=bs)
    tables = [[7, 2, 11], [5, 1], [3, 9, 0, 14]]
    lens = [10, 6, 15]  # seq 0: 9 cached + 1 decode token; seq 1: 5 + 1; seq 2: 6 cached + 9-token chunk
    new = [1, 1, 9]
    k_all = [torch.randn(n, kvh, d, generator=g) for n in lens]
    v_all = [torch.randn(n, kvh, d, generator=g) for n in lens]
    for t, n, nn, kk, vv in zip(tables, lens, new, k_all, v_all):  # the cached part
        idx = torch.tensor([t[p // bs] * bs + p % bs for p in range(n - nn)], dtype=torch.long)
        cache.write(0, idx, kk[:n - nn], vv[:n - nn])
    q = torch.randn(sum(new), h, d, generator=g)
    k_new = torch.cat([kk[n - nn:] for kk, n, nn in zip(k_all, lens, new)])
    v_new = torch.cat([vv[n - nn:] for vv, n, nn in zip(v_all, lens, new)])
    backend = build_backend("torch", cache, torch.device("cpu"), sink_tokens=4, max_positions=64)
    meta = _meta(tables, lens, new, bs, stats)
    out, acc = backend.forward(0, q, k_new, v_new, backend.prepare(meta))
    rows = [0, 1, 2 + new[2] - 1]  # each sequence's last query row
    expected = [reference_row(q[r], k_all[b], v_all[b]) for b, r in enumerate(rows)]
    for b, r in enumerate(rows):
        assert torch.allclose(out[r].double(), expected[b][0], atol=1e-5)
    for r in range(new[2]):
        upto = lens[2] - new[2] + r + 1
        ref, _ = reference_row(q[2 + r], k_all[2][:upto], v_all[2][:upto])
        assert torch.allclose(out[2 + r].double(), ref, atol=1e-5)
    if stats is None:
        assert acc is None
    else:
        assert acc.shape == (len(stats), h, 4)
        got = finalize_stats(acc, torch.tensor([lens[b] for b in stats]))
        for i, b in enumerate(stats):
            assert (got[i].double() - expected[b][1]).abs().max() < 1e-5
    # the same step again with telemetry off: the output is bit for bit the same
    cache2 = KVCache(k=[t.clone() for t in cache.k], v=[t.clone() for t in cache.v])
    off = build_backend("torch", cache2, torch.device("cpu"), sink_tokens=4, max_positions=64)
    out_off, _ = off.forward(0, q, k_new, v_new, off.prepare(_meta(tables, lens, new, bs, None)))
    assert torch.equal(out, out_off)


def test_unknown_backend_is_a_clear_error():
    from server.config import ModelConfig

    mc = ModelConfig(name="t", architecture="llama", vocab_size=10, hidden_size=32, intermediate_size=8,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    cache = KVCache.allocate(mc, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*auto, cpu, triton, torch"):
        build_backend("nope", cache, torch.device("cpu"), sink_tokens=4, max_positions=8)
