// Causal attention of a prefill chunk's query rows over one sequence's paged K/V cache, on the CPU.
//
//   paged_prefill(q [n, H, D] float32, k_cache, v_cache [NB, bs, KVH, D] float32 or bfloat16,
//                 block_table [W] int32, start, scale) -> out [n, H, D] float32
//
// Row i of the chunk sits at position start + i and attends keys 0 .. start + i, read through the
// sequence's block table (the chunk's own keys are in the cache already: the backend writes a
// step's K/V first). Per (row, query head) an exact two-pass softmax in float32, as in the torch
// reference (server/engine/attention/torch_ref.py, prefill_attention):
//   s_j = (q . k_j) * scale,  m = max s,  e_j = exp(s_j - m),  out = (sum_j e_j v_j) / sum_j e_j
// With a bfloat16 cache on a CPU with AVX-512 BF16 the two sums take bfloat16 dot products, q and
// e_j rounded to bfloat16 (float32 sums; see pair_tile): twice as fast, for rows whose output the
// o projection rounds to bfloat16 next.
// No telemetry here: the row of a chunk that samples (its last) goes through the decode op, which
// computes the accumulators (server/engine/attention/cpu_paged.py).
//
// Layout of the work (AVX-512, D a multiple of 16): 16 query rows of one KV head's G query heads
// form a tile, one row per float32 lane, so the softmax of a row is lane-wise arithmetic across
// keys (no horizontal sums). The tile's keys and values, widened once to float32 into a per-thread
// scratch (kept across the tiles of a KV head), are read as broadcasts (q . k: one FMA per lane
// and dimension, 8 keys in flight) and as vectors (sum e v: 4 rows x 64 dimensions in registers).
// A row's sums run over d and then j in a fixed order whatever the tile or the chunk it is in
// (keys past a row's position contribute exact zeros), so its result does not depend on how a
// prompt is chunked or on the thread count. Tiles are paired first with last (t, T - 1 - t) so
// every work item costs about the same under the causal mask; items run with at::parallel_for.
// Elsewhere (no AVX-512 or D % 16 != 0) a portable loop per row does the same arithmetic.
//
// References: FlashAttention-2 (tiling), vLLM paged attention (block-table addressing).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../csrc/exp_nonpositive.h"
#include "paged_cache.h"

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using headwise::exp_nonpositive;
using headwise::to_float;
#if defined(__AVX512F__)
using headwise::load16;
#endif

constexpr int64_t LANES = 16;        // query rows per tile: one float32 lane each
constexpr float MASKED = -FLT_MAX;   // the score of a key past a row's position: exp gives exactly 0

struct Geometry {
  int64_t H, KVH, G, D, bs, slot_stride;  // slot_stride: elements between cache slots (KVH * D)
};


// The D elements of KV head g at key j (block-table addressing).
template <typename T>
inline const T* key_row(const T* cache, const int32_t* table, int64_t j, int64_t g, const Geometry& geo) {
  const int64_t slot = static_cast<int64_t>(table[j / geo.bs]) * geo.bs + j % geo.bs;
  return cache + slot * geo.slot_stride + g * geo.D;
}

// Per-thread scratch, reused across the work items a thread runs.
struct Scratch {
  std::vector<float> kf, vf;  // [keys, D] K and V of KV head `head`, widened to float32
  int64_t head = -1, keys = 0;
  std::vector<float> qt;      // [GC, D, 16] the tile's queries, transposed: lane = row
  std::vector<float> s;       // [GC, nk, 16] scores, then exp(s - m)
  std::vector<float> l;       // [GC, 16] sum of exp(s - m) per row
  // bfloat16 cache (pair_tile): 32-bit words holding two bfloat16, the lower one first
  std::vector<uint32_t> vp;   // [ceil(keys / 2), D] V of KV head `head`: (v_2p[d], v_2p+1[d])
  std::vector<uint32_t> qp;   // [GC, D / 2, 16] the tile's queries rounded: (q[2p], q[2p + 1]), lane = row
  std::vector<uint32_t> ep;   // [GC, ceil(nk / 2), 16] exp(s - m) rounded: (e_2p, e_2p+1), lane = row
};

// kf / vf hold keys 0 .. nk - 1 of KV head g afterwards (widening only the keys not held yet).
template <typename T>
void widen(const T* kc, const T* vc, const int32_t* table, int64_t g, int64_t nk, const Geometry& geo, Scratch& sc) {
  if (sc.head != g) {
    sc.head = g;
    sc.keys = 0;
  }
  if (nk <= sc.keys) return;
  const int64_t D = geo.D;
  if (static_cast<int64_t>(sc.kf.size()) < nk * D) {
    sc.kf.resize(nk * D);
    sc.vf.resize(nk * D);
  }
  for (int64_t j = sc.keys; j < nk; ++j) {
    const T* k = key_row(kc, table, j, g, geo);
    const T* v = key_row(vc, table, j, g, geo);
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + LANES <= D; d += LANES) {
      _mm512_storeu_ps(&sc.kf[j * D + d], load16(k + d));
      _mm512_storeu_ps(&sc.vf[j * D + d], load16(v + d));
    }
#endif
    for (; d < D; ++d) {
      sc.kf[j * D + d] = to_float(k[d]);
      sc.vf[j * D + d] = to_float(v[d]);
    }
  }
  sc.keys = nk;
}

#if defined(__AVX512F__)
using headwise::exp_nonpositive16;

// Keys in flight per pass of q . k: GC x KB accumulators, KB broadcasts and one query vector in
// the 32 registers.
constexpr int64_t keys_in_flight(int64_t gc) { return gc <= 2 ? 8 : gc <= 4 ? 6 : 3; }

// s[i, j, lane] = (q_i[lane] . k_j) for keys j0 .. j0 + KB - 1; qt [GC, D, 16], kf [keys, D].
template <int64_t GC, int64_t KB>
inline void score_keys(const float* qt, const float* kf, int64_t j0, int64_t nk, int64_t D, float* s) {
  __m512 acc[GC][KB];
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t u = 0; u < KB; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kb[KB];
    for (int64_t u = 0; u < KB; ++u) kb[u] = _mm512_set1_ps(kf[(j0 + u) * D + d]);
    for (int64_t i = 0; i < GC; ++i) {
      const __m512 qv = _mm512_loadu_ps(qt + (i * D + d) * LANES);
      for (int64_t u = 0; u < KB; ++u) acc[i][u] = _mm512_fmadd_ps(qv, kb[u], acc[i][u]);
    }
  }
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t u = 0; u < KB; ++u) _mm512_storeu_ps(s + (i * nk + j0 + u) * LANES, acc[i][u]);
}

// Scores s [nk, 16] (lane = row r of a tile whose first row sits at key diag) scaled in place,
// keys past a row's position set to MASKED; returns each row's maximum.
inline __m512 scale_mask_max(float* s, int64_t nk, int64_t diag, float scale) {
  const __m512 sc_v = _mm512_set1_ps(scale);
  __m512 m = _mm512_set1_ps(MASKED);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j * LANES), sc_v);
    if (j >= diag)  // lanes r < j - diag sit before key j
      x = _mm512_mask_mov_ps(_mm512_set1_ps(MASKED), static_cast<__mmask16>(0xFFFFu << (j - diag)), x);
    _mm512_storeu_ps(s + j * LANES, x);
    m = _mm512_max_ps(m, x);
  }
  return m;
}

// o[r, :16 W] = sum_j e[j, r] v_j[:16 W] / l[r] for 4 rows r (rows of them stored, HD floats
// apart): e [nk, 16] (lane = row, this block's rows first), v [nk, D] (this block's dimensions
// first). W a template argument: the 4 x W accumulators stay in registers.
template <int64_t W>
inline void weigh_values(const float* e, const float* v, int64_t nk, int64_t D, const float* l, int64_t rows,
                         int64_t HD, float* o) {
  __m512 acc[4][W];
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t x = 0; x < W; ++x) acc[r][x] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[W];
    for (int64_t x = 0; x < W; ++x) vv[x] = _mm512_loadu_ps(v + j * D + x * LANES);
    for (int64_t r = 0; r < 4; ++r) {
      const __m512 w = _mm512_set1_ps(e[j * LANES + r]);
      for (int64_t x = 0; x < W; ++x) acc[r][x] = _mm512_fmadd_ps(w, vv[x], acc[r][x]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lv = _mm512_set1_ps(l[r]);
    for (int64_t x = 0; x < W; ++x) _mm512_storeu_ps(o + r * HD + x * LANES, _mm512_div_ps(acc[r][x], lv));
  }
}

#if defined(__AVX512BF16__)
// A bfloat16 cache: the same two-pass softmax with bfloat16 dot products (vdpbf16ps: two bf16
// products per float32 lane, float32 sums), twice the multiply-adds of an FMA per instruction.
// The cache's K and V are bfloat16 already; the query rows and the weights e_j = exp(s_j - m) are
// rounded to bfloat16 (nearest even) on the way in, and out = sum_j e_j v_j / sum_j e_j with the
// rounded e_j in both sums. The rows are the prefill rows that do not sample: their output is
// rounded to bfloat16 by the o projection next, and the rounding of q adds an error of the size the
// bfloat16 cache already puts on k. The row that samples (and gives telemetry) goes through the
// decode op in float32. Keys pair up as (2p, 2p + 1) by position, so a row's sums still run in a
// fixed order whatever its chunk (tested).

// vp holds keys 0 .. nk - 1 of KV head g as pairs afterwards (a missing odd key is 0); a pair
// left incomplete by an earlier, shorter call is rebuilt.
inline void pair_values(const c10::BFloat16* vc, const int32_t* table, int64_t g, int64_t nk, const Geometry& geo,
                        Scratch& sc) {
  if (sc.head != g) {
    sc.head = g;
    sc.keys = 0;
  }
  if (nk <= sc.keys) return;
  const int64_t D = geo.D, pairs = (nk + 1) / 2;
  if (static_cast<int64_t>(sc.vp.size()) < pairs * D) sc.vp.resize(pairs * D);
  for (int64_t jp = sc.keys / 2; jp < pairs; ++jp) {
    const auto* v0 = reinterpret_cast<const uint16_t*>(key_row(vc, table, 2 * jp, g, geo));
    const bool odd = 2 * jp + 1 < nk;
    const auto* v1 = odd ? reinterpret_cast<const uint16_t*>(key_row(vc, table, 2 * jp + 1, g, geo)) : nullptr;
    for (int64_t d = 0; d < D; d += LANES) {
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)));
      const __m512i hi = odd ? _mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d))), 16)
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(&sc.vp[jp * D + d], _mm512_or_si512(lo, hi));
    }
  }
  sc.keys = nk;
}

// s[i, j, lane] = (q_i[lane] . k_j) for keys j0 .. j0 + KB - 1, k_j read from the cache in pairs.
template <int64_t GC, int64_t KB>
inline void score_key_pairs(const uint32_t* qp, const c10::BFloat16* kc, const int32_t* table, int64_t g,
                            const Geometry& geo, int64_t j0, int64_t nk, float* s) {
  const int64_t P = geo.D / 2;
  const uint32_t* kr[KB];
  for (int64_t u = 0; u < KB; ++u) kr[u] = reinterpret_cast<const uint32_t*>(key_row(kc, table, j0 + u, g, geo));
  __m512 acc[GC][KB];
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t u = 0; u < KB; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh kb[KB];
    for (int64_t u = 0; u < KB; ++u) kb[u] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(kr[u][p])));
    for (int64_t i = 0; i < GC; ++i) {
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qp + (i * P + p) * LANES));
      for (int64_t u = 0; u < KB; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], qv, kb[u]);
    }
  }
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t u = 0; u < KB; ++u) _mm512_storeu_ps(s + (i * nk + j0 + u) * LANES, acc[i][u]);
}

// weigh_values over pairs: o[r, :16 W] = sum_p (e_2p[r] v_2p + e_2p+1[r] v_2p+1)[:16 W] / l[r].
template <int64_t W>
inline void weigh_value_pairs(const uint32_t* ep, const uint32_t* vp, int64_t pairs, int64_t D, const float* l,
                              int64_t rows, int64_t HD, float* o) {
  __m512 acc[4][W];
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t x = 0; x < W; ++x) acc[r][x] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh vv[W];
    for (int64_t x = 0; x < W; ++x) vv[x] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(vp + p * D + x * LANES));
    for (int64_t r = 0; r < 4; ++r) {
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(ep[p * LANES + r])));
      for (int64_t x = 0; x < W; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], vv[x], w);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lv = _mm512_set1_ps(l[r]);
    for (int64_t x = 0; x < W; ++x) _mm512_storeu_ps(o + r * HD + x * LANES, _mm512_div_ps(acc[r][x], lv));
  }
}

// tile() for a bfloat16 cache.
template <int64_t GC>
void pair_tile(const float* q, const c10::BFloat16* kc, const c10::BFloat16* vc, const int32_t* table, int64_t start,
               int64_t r0, int64_t nr, int64_t g, int64_t h0, const Geometry& geo, float scale, float* out,
               Scratch& sc) {
  const int64_t D = geo.D, HD = geo.H * D, P = D / 2;
  const int64_t diag = start + r0, nk = diag + nr, pairs = (nk + 1) / 2;
  pair_values(vc, table, g, nk, geo, sc);
  sc.qp.assign(GC * P * LANES, 0u);
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t r = 0; r < nr; ++r) {
      const float* qr = q + (r0 + r) * HD + (h0 + i) * D;
      for (int64_t p = 0; p < P; ++p)
        sc.qp[(i * P + p) * LANES + r] = static_cast<uint32_t>(c10::BFloat16(qr[2 * p]).x) |
                                         static_cast<uint32_t>(c10::BFloat16(qr[2 * p + 1]).x) << 16;
    }
  sc.s.resize(GC * nk * LANES);
  sc.ep.resize(GC * pairs * LANES);
  sc.l.resize(GC * LANES);
  float* s = sc.s.data();
  constexpr int64_t KB = keys_in_flight(GC);
  int64_t j0 = 0;
  for (; j0 + KB <= nk; j0 += KB) score_key_pairs<GC, KB>(sc.qp.data(), kc, table, g, geo, j0, nk, s);
  for (; j0 < nk; ++j0) score_key_pairs<GC, 1>(sc.qp.data(), kc, table, g, geo, j0, nk, s);

  // word 2r <- e_2p[r] (words 0..15 of cvtne2ps), word 2r + 1 <- e_2p+1[r] (words 16..31)
  alignas(64) int16_t order[32];
  for (int w = 0; w < 32; ++w) order[w] = static_cast<int16_t>((w % 2) * 16 + w / 2);
  const __m512i interleave = _mm512_load_si512(order);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t i = 0; i < GC; ++i) {  // softmax per lane: scale, mask, max, exp, round, sum
    float* si = s + i * nk * LANES;
    uint32_t* ei = sc.ep.data() + i * pairs * LANES;
    const __m512 m = scale_mask_max(si, nk, diag, scale);
    __m512 l = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512 e0 = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(si + 2 * p * LANES), m));
      const __m512 e1 = 2 * p + 1 < nk ? exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(si + (2 * p + 1) * LANES), m))
                                       : _mm512_setzero_ps();
      const __m512i e = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      _mm512_storeu_si512(ei + p * LANES, e);
      l = _mm512_add_ps(l, _mm512_castsi512_ps(_mm512_slli_epi32(e, 16)));  // the rounded e_2p
      l = _mm512_add_ps(l, _mm512_castsi512_ps(_mm512_and_si512(e, high)));  // and e_2p+1
    }
    _mm512_storeu_ps(sc.l.data() + i * LANES, l);
  }

  for (int64_t i = 0; i < GC; ++i) {  // out = sum_j e_j v_j / l: 4 rows x 64 dimensions at a time
    const uint32_t* ei = sc.ep.data() + i * pairs * LANES;
    const float* li = sc.l.data() + i * LANES;
    for (int64_t rb = 0; rb < nr; rb += 4) {
      const int64_t rows = std::min<int64_t>(4, nr - rb);
      float* o = out + (r0 + rb) * HD + (h0 + i) * D;
      int64_t d0 = 0;
      for (; d0 + 4 * LANES <= D; d0 += 4 * LANES)
        weigh_value_pairs<4>(ei + rb, sc.vp.data() + d0, pairs, D, li + rb, rows, HD, o + d0);
      switch ((D - d0) / LANES) {
        case 3: weigh_value_pairs<3>(ei + rb, sc.vp.data() + d0, pairs, D, li + rb, rows, HD, o + d0); break;
        case 2: weigh_value_pairs<2>(ei + rb, sc.vp.data() + d0, pairs, D, li + rb, rows, HD, o + d0); break;
        case 1: weigh_value_pairs<1>(ei + rb, sc.vp.data() + d0, pairs, D, li + rb, rows, HD, o + d0); break;
        default: break;
      }
    }
  }
}
#endif

// One tile (rows r0 .. r0 + nr - 1) of query heads h0 .. h0 + GC - 1, all of KV head g.
template <int64_t GC, typename T>
void tile(const float* q, const T* kc, const T* vc, const int32_t* table, int64_t start, int64_t r0, int64_t nr,
          int64_t g, int64_t h0, const Geometry& geo, float scale, float* out, Scratch& sc) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    pair_tile<GC>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc);
    return;
  }
#endif
  const int64_t D = geo.D, HD = geo.H * D;
  const int64_t diag = start + r0;  // keys from here on are hidden from some rows of the tile
  const int64_t nk = diag + nr;     // keys the tile's last row sees
  widen(kc, vc, table, g, nk, geo, sc);
  sc.qt.assign(GC * D * LANES, 0.0f);
  for (int64_t i = 0; i < GC; ++i)
    for (int64_t r = 0; r < nr; ++r) {
      const float* qr = q + (r0 + r) * HD + (h0 + i) * D;
      for (int64_t d = 0; d < D; ++d) sc.qt[(i * D + d) * LANES + r] = qr[d];
    }
  sc.s.resize(GC * nk * LANES);
  sc.l.resize(GC * LANES);
  float* s = sc.s.data();
  constexpr int64_t KB = keys_in_flight(GC);
  int64_t j0 = 0;
  for (; j0 + KB <= nk; j0 += KB) score_keys<GC, KB>(sc.qt.data(), sc.kf.data(), j0, nk, D, s);
  for (; j0 < nk; ++j0) score_keys<GC, 1>(sc.qt.data(), sc.kf.data(), j0, nk, D, s);

  for (int64_t i = 0; i < GC; ++i) {  // softmax per lane: scale, mask, max, exp, sum
    float* si = s + i * nk * LANES;
    const __m512 m = scale_mask_max(si, nk, diag, scale);
    __m512 l = _mm512_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(si + j * LANES), m));
      _mm512_storeu_ps(si + j * LANES, e);
      l = _mm512_add_ps(l, e);
    }
    _mm512_storeu_ps(sc.l.data() + i * LANES, l);
  }

  for (int64_t i = 0; i < GC; ++i) {  // out = sum_j e_j v_j / l: 4 rows x 64 dimensions at a time
    const float* ei = s + i * nk * LANES;
    const float* li = sc.l.data() + i * LANES;
    for (int64_t rb = 0; rb < nr; rb += 4) {
      const int64_t rows = std::min<int64_t>(4, nr - rb);
      float* o = out + (r0 + rb) * HD + (h0 + i) * D;
      int64_t d0 = 0;
      for (; d0 + 4 * LANES <= D; d0 += 4 * LANES) weigh_values<4>(ei + rb, sc.vf.data() + d0, nk, D, li + rb, rows, HD, o + d0);
      switch ((D - d0) / LANES) {
        case 3: weigh_values<3>(ei + rb, sc.vf.data() + d0, nk, D, li + rb, rows, HD, o + d0); break;
        case 2: weigh_values<2>(ei + rb, sc.vf.data() + d0, nk, D, li + rb, rows, HD, o + d0); break;
        case 1: weigh_values<1>(ei + rb, sc.vf.data() + d0, nk, D, li + rb, rows, HD, o + d0); break;
        default: break;
      }
    }
  }
}

// The G query heads of KV head g in groups of up to 8 (the register budget of score_keys).
template <typename T>
void tile_heads(const float* q, const T* kc, const T* vc, const int32_t* table, int64_t start, int64_t r0,
                int64_t nr, int64_t g, const Geometry& geo, float scale, float* out, Scratch& sc) {
  for (int64_t h0 = g * geo.G; h0 < (g + 1) * geo.G; h0 += 8) {
    switch (std::min<int64_t>(8, (g + 1) * geo.G - h0)) {
      case 1: tile<1>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 2: tile<2>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 3: tile<3>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 4: tile<4>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 5: tile<5>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 6: tile<6>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      case 7: tile<7>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
      default: tile<8>(q, kc, vc, table, start, r0, nr, g, h0, geo, scale, out, sc); break;
    }
  }
}
#endif

// Portable: rows r0 .. r0 + nr - 1, every query head of KV head g, one row at a time.
template <typename T>
void rows_portable(const float* q, const T* kc, const T* vc, const int32_t* table, int64_t start, int64_t r0,
                   int64_t nr, int64_t g, const Geometry& geo, float scale, float* out, Scratch& sc) {
  const int64_t D = geo.D, HD = geo.H * D;
  widen(kc, vc, table, g, start + r0 + nr, geo, sc);
  std::vector<float> e, o(D);
  for (int64_t r = r0; r < r0 + nr; ++r) {
    const int64_t n = start + r + 1;
    e.resize(n);
    for (int64_t h = g * geo.G; h < (g + 1) * geo.G; ++h) {
      const float* qr = q + r * HD + h * D;
      float m = MASKED;
      for (int64_t j = 0; j < n; ++j) {
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += qr[d] * sc.kf[j * D + d];
        e[j] = acc * scale;
        m = std::max(m, e[j]);
      }
      float l = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        e[j] = exp_nonpositive(e[j] - m);
        l += e[j];
      }
      std::fill(o.begin(), o.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) o[d] += e[j] * sc.vf[j * D + d];
      for (int64_t d = 0; d < D; ++d) out[r * HD + h * D + d] = o[d] / l;
    }
  }
}

at::Tensor paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_table, int64_t start, double scale) {
  headwise::check_query_and_cache("paged_prefill", q, k_cache, v_cache);
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == at::kInt && block_table.is_contiguous() &&
                  block_table.device().is_cpu(),
              "paged_prefill: block_table must be a contiguous int32 [W]");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(start >= 0, "paged_prefill: start must be >= 0");
  const int64_t keys = start + n;  // the last row's keys
  TORCH_CHECK(keys <= block_table.size(0) * bs, "paged_prefill: start + n = ", keys,
              " keys need more blocks than block_table holds (", block_table.size(0), " of ", bs, ")");
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t w = 0; w < (keys + bs - 1) / bs; ++w)  // every block the kernel will read, checked first
    TORCH_CHECK(table[w] >= 0 && table[w] < NB, "paged_prefill: block_table[", w, "] = ", table[w], " out of range");
  at::Tensor out = at::empty({n, H, D}, q.options());
  if (n == 0) return out;
  const Geometry geo{H, KVH, H / KVH, D, bs, KVH * D};
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t tiles = (n + LANES - 1) / LANES, pairs = (tiles + 1) / 2;
  // work items: (KV head, tile pair t / T - 1 - t); below ~32k (row, key, KV head) triples the
  // work (~0.1 ms) is not worth waking another thread
  const int64_t items = KVH * pairs;
  const int64_t grain = n * keys * KVH < (1 << 15) ? items : 1;
  auto run = [&](const auto* kc, const auto* vc) {
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t it = begin; it < end; ++it) {
        const int64_t g = it / pairs, p = it % pairs;
        for (const int64_t t : {tiles - 1 - p, p}) {  // the longer tile first: its widened keys serve both
          const int64_t r0 = t * LANES, nr = std::min(LANES, n - r0);
#if defined(__AVX512F__)
          if (D % LANES == 0) tile_heads(qp, kc, vc, table, start, r0, nr, g, geo, sc, op, scratch);
          else
#endif
            rows_portable(qp, kc, vc, table, start, r0, nr, g, geo, sc, op, scratch);
          if (t == p) break;  // the middle tile of an odd count: once
        }
      }
    });
  };
  if (k_cache.scalar_type() == at::kBFloat16)
    run(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headwise, m) {
  m.def("paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int start, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(headwise, CPU, m) { m.impl("paged_prefill", &paged_prefill); }
