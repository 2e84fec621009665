// Paged decode attention on the CPU with headwise's per-head telemetry in the same pass.
//
// One query row per sequence (the decode rows of a step) attends over its seq_len keys, read
// directly from one layer's paged K/V cache through its block table: no gathered, padded copy.
// Work is split over (row, split, KV head) items with at::parallel_for: a row of more than
// SPLIT_KEYS keys runs as splits of that many keys (flash-decoding), so even one long row keeps
// both threads busy, and its splits are merged afterwards in a fixed order (merge_splits, the
// centred merge of server/engine/telemetry.py). A thread that holds several KV heads of one
// split reads each cache slot whole, and the G = H / KVH query heads of a KV head share every
// key and value load. Per (row, query head) an exact two-pass softmax, as in the
// torch reference
// (server/engine/attention/torch_ref.py, attend):
//   s_j = (q . k_j) * scale            into a scratch row, j = 0 .. n-1 (only valid keys exist here)
//   m = max s,  e_j = exp(s_j - m),  l = sum e,  out = (sum_j e_j v_j) / l
// and, when compute_stats, the accumulators of server/engine/telemetry.py in its layout
//   acc = (l, t = sum e_j (s_j - m), sum_{j < sink_tokens} e_j, sum e_j j).
// The cache holds float32 or bfloat16 keys and values (a bfloat16 element is widened exactly to
// float32 on load: its bits shifted into the high half). Everything accumulates in float32. l and out come from the same code whether or not telemetry
// is computed (the statistics are extra loops over the same e), so out is bit-identical either
// way; every (row, query head) gets the same arithmetic however the work is split among threads
// (its splits depend on its length only), so a row's result never depends on the batch or the
// thread count.
// Keys and values are read in tiles of 16 (one tile stays in L1 while all its heads use it). With
// AVX-512 and D a multiple of 16, a tile's 16 x G dot products end in one transpose-and-add
// (hsum16), values accumulate in registers and exp is 16 lanes wide; elsewhere portable loops
// over LANES partial sums do the same (no -ffast-math anywhere: every sum has a fixed order, so
// results are deterministic). exp is a Cephes-style polynomial (relative error ~2 ulp), exactly 0
// below float's normal range.
//
// References: FlashAttention-2 / vLLM paged attention (block-table addressing), DESIGN.md
// "Per-head telemetry", Cephes expf.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../csrc/exp_nonpositive.h"
#include "paged_cache.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using headwise::exp_nonpositive;
using headwise::to_float;
#if defined(__AVX512F__)
using headwise::exp_nonpositive16;
using headwise::load16;
using headwise::load32;
#endif

constexpr int64_t LANES = 16;


inline float reduce_lanes(const float* acc) {
  float total = 0.0f;
  for (int64_t u = 0; u < LANES; ++u) total += acc[u];
  return total;
}

// sum_d a[d] * b[d] over LANES partial sums.
template <typename T>
inline float dot(const float* a, const T* b, int64_t d) {
  float acc[LANES] = {0.0f};
  int64_t i = 0;
  for (; i + LANES <= d; i += LANES)
    for (int64_t u = 0; u < LANES; ++u) acc[u] += a[i + u] * to_float(b[i + u]);
  for (int64_t u = 0; i < d; ++i, ++u) acc[u] += a[i] * to_float(b[i]);
  return reduce_lanes(acc);
}

inline float max_of(const float* x, int64_t n) {
  float acc[LANES];
  for (int64_t u = 0; u < LANES; ++u) acc[u] = x[0];
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int64_t u = 0; u < LANES; ++u) acc[u] = x[j + u] > acc[u] ? x[j + u] : acc[u];
  for (int64_t u = 0; j < n; ++j, ++u) acc[u] = x[j] > acc[u] ? x[j] : acc[u];
  float m = acc[0];
  for (int64_t u = 1; u < LANES; ++u) m = acc[u] > m ? acc[u] : m;
  return m;
}

// e[j] = exp(s[j] - m); returns l = sum e.
inline float exp_and_sum(const float* s, float m, float* e, int64_t n) {
  for (int64_t j = 0; j < n; ++j) e[j] = exp_nonpositive(s[j] - m);
  float acc[LANES] = {0.0f};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int64_t u = 0; u < LANES; ++u) acc[u] += e[j + u];
  for (int64_t u = 0; j < n; ++j, ++u) acc[u] += e[j];
  return reduce_lanes(acc);
}

// The telemetry sums besides l over keys k0 .. k0 + n - 1 (s, e indexed from k0):
// t = sum e (s - m), sink = sum_{j < sink_tokens} e, pos = sum e j.
inline void stat_sums(const float* s, const float* e, float m, int64_t n, int64_t k0, int64_t sink_tokens,
                      float* out3) {
  float t_acc[LANES] = {0.0f};
  float p_acc[LANES] = {0.0f};
  int64_t j = 0;
#if defined(__AVX512F__)
  // the same 16 lanes, 16 keys a step, the last step masked (its missing keys add 0); positions
  // k0 + j + u are exact in float32 below 2^24
  __m512 t = _mm512_setzero_ps(), p = _mm512_setzero_ps();
  __m512 pos = _mm512_add_ps(_mm512_set1_ps(static_cast<float>(k0)),
                             _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  const __m512 mv = _mm512_set1_ps(m), step = _mm512_set1_ps(static_cast<float>(LANES));
  for (; j < n; j += LANES) {
    const __mmask16 k = n - j >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 ej = _mm512_maskz_loadu_ps(k, e + j);
    t = _mm512_fmadd_ps(ej, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv), t);
    p = _mm512_fmadd_ps(ej, pos, p);
    pos = _mm512_add_ps(pos, step);
  }
  _mm512_storeu_ps(t_acc, t);
  _mm512_storeu_ps(p_acc, p);
#else
  for (; j + LANES <= n; j += LANES)
    for (int64_t u = 0; u < LANES; ++u) {
      const float ej = e[j + u];
      t_acc[u] += ej * (s[j + u] - m);
      p_acc[u] += ej * static_cast<float>(k0 + j + u);
    }
  for (int64_t u = 0; j < n; ++j, ++u) {
    t_acc[u] += e[j] * (s[j] - m);
    p_acc[u] += e[j] * static_cast<float>(k0 + j);
  }
#endif
  float sink = 0.0f;
  for (int64_t k = 0; k < std::min(n, sink_tokens - k0); ++k) sink += e[k];
  out3[0] = reduce_lanes(t_acc);
  out3[1] = sink;
  out3[2] = reduce_lanes(p_acc);
}

struct Shapes {
  int64_t H, KVH, G, D, bs, NB, W, table_stride;
  int64_t slot_stride;  // floats between consecutive cache slots: KVH * D
};

constexpr int64_t CHUNK = 16;
// Keys per split of a long row (a multiple of the block size is used): below it a row is one
// work item per KV head; above, its splits spread over the threads even at batch 1.
constexpr int64_t SPLIT_KEYS = 512;  // keys per tile: one tile of K or V (16 x D floats) stays in L1 for all G heads

// Pointers to the D elements of KV head g of keys j0 .. j0 + c - 1 (block-table addressing).
template <typename T>
inline void tile_rows(const T* cache, const int32_t* table, int64_t j0, int64_t c, int64_t g,
                      const Shapes& sh, const T** rows) {
  for (int64_t u = 0; u < c; ++u) {
    const int64_t j = j0 + u;
    const int64_t slot = static_cast<int64_t>(table[j / sh.bs]) * sh.bs + j % sh.bs;
    rows[u] = cache + slot * sh.slot_stride + g * sh.D;
  }
}

#if defined(__AVX512F__)
// Sixteen horizontal sums at once: lane i of the result is the sum of the 16 lanes of a[i].
inline __m512 hsum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// s[lh, j] = (q_h . k_j) * scale for the query heads of KV heads g0 .. g1 - 1 (local head
// lh = (g - g0) * G + i for query head g * G + i); D % 16 == 0. Each tile of keys is read once,
// whole slots at a time across the KV heads of the range, and used by all their query heads.
template <typename T>
void scores(const float* q_row, const T* kc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
            const Shapes& sh, float scale, float* s) {
  const int64_t D = sh.D, G = sh.G;
  const T* rows[CHUNK];
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(kc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < G; ++i) {
        const float* qh = q_row + (g * G + i) * D;
        __m512 part[CHUNK];
        for (int64_t u = 0; u < CHUNK; ++u) part[u] = _mm512_setzero_ps();
        for (int64_t u = 0; u < c; ++u) {
          const T* kj = rows[u] + g * D;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), load16(kj));
          for (int64_t d = 16; d < D; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), load16(kj + d), acc);
          part[u] = acc;
        }
        const __m512 sums = _mm512_mul_ps(hsum16(part), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(s + ((g - g0) * G + i) * n + j0, static_cast<__mmask16>((1u << c) - 1u), sums);
      }
  }
}

// o[lh, :] = sum_j e[lh, j] v_j for the query heads of KV heads g0 .. g1 - 1; D % 16 == 0.
template <typename T>
void weighted_values(const float* e, const T* vc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                     const Shapes& sh, float* o) {
  const int64_t D = sh.D, G = sh.G;
  const T* rows[CHUNK];
  std::fill(o, o + (g1 - g0) * G * D, 0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(vc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < G; ++i) {
        const int64_t lh = (g - g0) * G + i;
        const float* eh = e + lh * n + j0;
        for (int64_t d = 0; d < D; d += 64) {  // up to four accumulators in registers
          const int64_t w = std::min<int64_t>(4, (D - d) / 16);
          __m512 acc[4];
          for (int64_t x = 0; x < w; ++x) acc[x] = _mm512_loadu_ps(o + lh * D + d + 16 * x);
          for (int64_t u = 0; u < c; ++u) {
            const __m512 wu = _mm512_set1_ps(eh[u]);
            const T* vj = rows[u] + g * D + d;
            for (int64_t x = 0; x < w; ++x) acc[x] = _mm512_fmadd_ps(wu, load16(vj + 16 * x), acc[x]);
          }
          for (int64_t x = 0; x < w; ++x) _mm512_storeu_ps(o + lh * D + d + 16 * x, acc[x]);
        }
      }
  }
}

// The same two loops with the G query heads of a KV head in registers together (G a template
// argument, 1 .. 8): each key and value vector is loaded and widened once for all G heads instead
// of once per head. Every (head, key) dot product and (head, d) value sum runs in the same order
// as in scores / weighted_values above, so results are bit-identical to them.
template <int64_t G, int64_t DV, typename T>
void scores_gqa(const float* q_row, const T* kc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                const Shapes& sh, float scale, float* s) {
  // DV > 0: D = 16 DV known at compile time, the G heads' query vectors held in registers across
  // the keys (G DV <= 16); DV = 0: any D % 16 == 0, queries read from memory. Same sums either way.
  const int64_t D = DV > 0 ? 16 * DV : sh.D;
  const T* rows[CHUNK];
  __m512 part[G][CHUNK];
  __m512 qv[G][DV > 0 ? DV : 1];
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(kc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g) {
      const float* qg = q_row + g * G * D;
      if constexpr (DV > 0)
        for (int64_t i = 0; i < G; ++i)
          for (int64_t x = 0; x < DV; ++x) qv[i][x] = _mm512_loadu_ps(qg + i * D + 16 * x);
      auto query = [&](int64_t i, int64_t d) {
        if constexpr (DV > 0) return qv[i][d / 16];
        else return _mm512_loadu_ps(qg + i * D + d);
      };
      for (int64_t u = 0; u < CHUNK; ++u)
        for (int64_t i = 0; i < G; ++i) part[i][u] = _mm512_setzero_ps();
      for (int64_t u = 0; u < c; ++u) {
        const T* kj = rows[u] + g * D;
        __m512 acc[G];
        const __m512 k0v = load16(kj);
        for (int64_t i = 0; i < G; ++i) acc[i] = _mm512_mul_ps(query(i, 0), k0v);
        for (int64_t d = 16; d < D; d += 16) {
          const __m512 kv = load16(kj + d);
          for (int64_t i = 0; i < G; ++i) acc[i] = _mm512_fmadd_ps(query(i, d), kv, acc[i]);
        }
        for (int64_t i = 0; i < G; ++i) part[i][u] = acc[i];
      }
      for (int64_t i = 0; i < G; ++i) {
        const __m512 sums = _mm512_mul_ps(hsum16(part[i]), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(s + ((g - g0) * G + i) * n + j0, static_cast<__mmask16>((1u << c) - 1u), sums);
      }
    }
  }
}

template <int64_t G, typename T>
void scores_of_heads(const float* q_row, const T* kc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                     const Shapes& sh, float scale, float* s) {
  if constexpr (G <= 4) {
    if (sh.D == 64) return scores_gqa<G, 4>(q_row, kc, table, n, g0, g1, sh, scale, s);
  }
  if (sh.D == 32) return scores_gqa<G, 2>(q_row, kc, table, n, g0, g1, sh, scale, s);
  scores_gqa<G, 0>(q_row, kc, table, n, g0, g1, sh, scale, s);
}

// o[lh, :] = sum_j e[lh, j] v_j for the query heads of KV heads g0 .. g1 - 1, the G heads of a KV
// head together (each value vector loaded and widened once for all of them), D % 32 == 0, WC
// chunks of 32 dimensions per pass (G x WC x 2 accumulators in registers). Every (head, d) sums its
// e_j v_j[d] in key order, as weighted_values does: bit-identical results. A chunk comes in as two
// vectors (load32): a float32 cache's two halves, or a bfloat16 cache's 16 even and 16 odd
// elements (one shift, one mask for 32 values); for the latter the scratch o holds each chunk as
// its even then its odd dimensions while keys accumulate and is put back in order at the end.
template <int64_t G, int64_t WC, typename T>
void weighted_values_gqa(const float* e, const T* vc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                         const Shapes& sh, float* o) {
  const int64_t D = sh.D, nh = (g1 - g0) * G;
  const T* rows[CHUNK];
  std::fill(o, o + nh * D, 0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(vc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t lh0 = (g - g0) * G;
      for (int64_t d = 0; d < D; d += 32 * WC) {
        __m512 acc[G][WC][2];
        for (int64_t i = 0; i < G; ++i)
          for (int64_t x = 0; x < WC; ++x)
            for (int64_t h = 0; h < 2; ++h) acc[i][x][h] = _mm512_loadu_ps(o + (lh0 + i) * D + d + 32 * x + 16 * h);
        for (int64_t u = 0; u < c; ++u) {
          const T* vj = rows[u] + g * D + d;
          __m512 half[WC][2];
          for (int64_t x = 0; x < WC; ++x) load32(vj + 32 * x, half[x][0], half[x][1]);
          for (int64_t i = 0; i < G; ++i) {
            const __m512 wu = _mm512_set1_ps(e[(lh0 + i) * n + j0 + u]);
            for (int64_t x = 0; x < WC; ++x)
              for (int64_t h = 0; h < 2; ++h) acc[i][x][h] = _mm512_fmadd_ps(wu, half[x][h], acc[i][x][h]);
          }
        }
        for (int64_t i = 0; i < G; ++i)
          for (int64_t x = 0; x < WC; ++x)
            for (int64_t h = 0; h < 2; ++h) _mm512_storeu_ps(o + (lh0 + i) * D + d + 32 * x + 16 * h, acc[i][x][h]);
      }
    }
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t lh = 0; lh < nh; ++lh)
      for (int64_t d = 0; d < D; d += 32) {  // even / odd halves back into dimension order
        float* p = o + lh * D + d;
        const __m512 even = _mm512_loadu_ps(p), odd = _mm512_loadu_ps(p + 16);
        _mm512_storeu_ps(p, _mm512_permutex2var_ps(even, first, odd));
        _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(even, second, odd));
      }
  }
}

// weighted_values_gqa with the widest pass that fits; false (the caller takes the generic
// weighted_values) when D % 32 != 0.
template <int64_t G, typename T>
bool values_gqa(const float* e, const T* vc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                const Shapes& sh, float* o) {
  if (sh.D % 32 != 0) return false;
  if (G <= 4 && sh.D % 64 == 0) weighted_values_gqa<G, 2>(e, vc, table, n, g0, g1, sh, o);
  else weighted_values_gqa<G, 1>(e, vc, table, n, g0, g1, sh, o);
  return true;
}

// scores + weighted_values through the G-specialised loops when G is 1 .. 8; false otherwise.
template <typename T>
bool gqa_scores(int64_t G, const float* q_row, const T* kc, const int32_t* table, int64_t n, int64_t g0,
                int64_t g1, const Shapes& sh, float scale, float* s) {
  switch (G) {
    case 1: scores_of_heads<1>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 2: scores_of_heads<2>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 3: scores_of_heads<3>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 4: scores_of_heads<4>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 5: scores_of_heads<5>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 6: scores_of_heads<6>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 7: scores_of_heads<7>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    case 8: scores_of_heads<8>(q_row, kc, table, n, g0, g1, sh, scale, s); return true;
    default: return false;
  }
}

template <typename T>
bool gqa_values(int64_t G, const float* e, const T* vc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                const Shapes& sh, float* o) {
  switch (G) {
    case 1: return values_gqa<1>(e, vc, table, n, g0, g1, sh, o);
    case 2: return values_gqa<2>(e, vc, table, n, g0, g1, sh, o);
    case 3: return values_gqa<3>(e, vc, table, n, g0, g1, sh, o);
    case 4: return values_gqa<4>(e, vc, table, n, g0, g1, sh, o);
    case 5: return values_gqa<5>(e, vc, table, n, g0, g1, sh, o);
    case 6: return values_gqa<6>(e, vc, table, n, g0, g1, sh, o);
    case 7: return values_gqa<7>(e, vc, table, n, g0, g1, sh, o);
    case 8: return values_gqa<8>(e, vc, table, n, g0, g1, sh, o);
    default: return false;
  }
}

// e[j] = exp(s[j] - m) (0 past n inside the last vector); returns l = sum e.
inline float exp_and_sum16(const float* s, float m, float* e, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv);
    const __m512 ex = _mm512_maskz_mov_ps(k, exp_nonpositive16(x));
    _mm512_mask_storeu_ps(e + j, k, ex);
    acc = _mm512_add_ps(acc, ex);
  }
  float lanes[16];
  _mm512_storeu_ps(lanes, acc);
  return reduce_lanes(lanes);
}
#endif

// Portable versions (any CPU, any D): the same tiles, one key at a time.
template <typename T>
void scores_portable(const float* q_row, const T* kc, const int32_t* table, int64_t n, int64_t g0, int64_t g1,
                     const Shapes& sh, float scale, float* s) {
  const int64_t D = sh.D, G = sh.G;
  const T* rows[CHUNK];
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(kc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < G; ++i)
        for (int64_t u = 0; u < c; ++u)
          s[((g - g0) * G + i) * n + j0 + u] = dot(q_row + (g * G + i) * D, rows[u] + g * D, D) * scale;
  }
}

template <typename T>
void weighted_values_portable(const float* e, const T* vc, const int32_t* table, int64_t n, int64_t g0,
                              int64_t g1, const Shapes& sh, float* o) {
  const int64_t D = sh.D, G = sh.G;
  const T* rows[CHUNK];
  std::fill(o, o + (g1 - g0) * G * D, 0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t c = std::min(CHUNK, n - j0);
    tile_rows(vc, table, j0, c, 0, sh, rows);
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < G; ++i) {
        const int64_t lh = (g - g0) * G + i;
        float* oh = o + lh * D;
        for (int64_t u = 0; u < c; ++u) {
          const float w = e[lh * n + j0 + u];
          const T* vj = rows[u] + g * D;
          for (int64_t d = 0; d < D; ++d) oh[d] += w * to_float(vj[d]);
        }
      }
  }
}

// One row, KV heads g0 .. g1 - 1: scores, softmax, output and (optionally) accumulators of their
// query heads. Every (KV head, query head) gets the same arithmetic whatever the range, so how
// the work is split never changes a result.
// Keys k0 .. k0 + n - 1 of the row (k0 a multiple of the block size; table already advanced to
// k0's block). part == nullptr: the row's whole range, written as out_row [H, D] and acc_row
// [H, 4]; else one split of it, written unnormalized into part [H, PART] (per head: sum e v [D],
// then m, l, t, sink, pos) for merge_splits.
template <typename T>
void attend_heads(const float* q_row, const T* kc, const T* vc, const int32_t* table, int64_t n, int64_t k0,
                  int64_t g0, int64_t g1, const Shapes& sh, float scale, bool stats, int64_t sink_tokens,
                  float* out_row, float* acc_row, float* part, std::vector<float>& scratch) {
  const int64_t D = sh.D, nh = (g1 - g0) * sh.G, h0 = g0 * sh.G;
  scratch.resize(static_cast<size_t>(2 * nh * n + nh * D + 2 * nh));
  float* s = scratch.data();  // [nh, n] scores
  float* e = s + nh * n;      // [nh, n] exp(s - m)
  float* o = e + nh * n;      // [nh, D] sum e v
  float* m = o + nh * D;      // [nh] row max
  float* l = m + nh;          // [nh] sum e
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    if (!gqa_scores(sh.G, q_row, kc, table, n, g0, g1, sh, scale, s)) scores(q_row, kc, table, n, g0, g1, sh, scale, s);
    for (int64_t lh = 0; lh < nh; ++lh) {
      m[lh] = max_of(s + lh * n, n);
      l[lh] = exp_and_sum16(s + lh * n, m[lh], e + lh * n, n);
    }
    if (!gqa_values(sh.G, e, vc, table, n, g0, g1, sh, o)) weighted_values(e, vc, table, n, g0, g1, sh, o);
  } else
#endif
  {
    scores_portable(q_row, kc, table, n, g0, g1, sh, scale, s);
    for (int64_t lh = 0; lh < nh; ++lh) {
      m[lh] = max_of(s + lh * n, n);
      l[lh] = exp_and_sum(s + lh * n, m[lh], e + lh * n, n);
    }
    weighted_values_portable(e, vc, table, n, g0, g1, sh, o);
  }
  if (part != nullptr) {
    for (int64_t lh = 0; lh < nh; ++lh) {
      float* dst = part + (h0 + lh) * (D + 5);
      std::copy(o + lh * D, o + (lh + 1) * D, dst);
      dst[D] = m[lh];
      dst[D + 1] = l[lh];
      if (stats) stat_sums(s + lh * n, e + lh * n, m[lh], n, k0, sink_tokens, dst + D + 2);
    }
    return;
  }
  for (int64_t lh = 0; lh < nh; ++lh) {
    float* dst = out_row + (h0 + lh) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = o[lh * D + d] / l[lh];
  }
  if (!stats) return;
  for (int64_t lh = 0; lh < nh; ++lh) {
    float* a = acc_row + (h0 + lh) * 4;
    a[0] = l[lh];
    stat_sums(s + lh * n, e + lh * n, m[lh], n, k0, sink_tokens, a + 1);
  }
}

// One (row, query head)'s splits, in order, merged exactly as server/engine/telemetry.py's
// merge_partials does (each split centred at its own max m_c; M = max m_c, w_c = exp(m_c - M)):
// l = sum w_c l_c, out = (sum w_c o_c) / l, t = sum w_c (t_c + l_c (m_c - M)), sink and pos
// weighted like l. parts: S splits of [D + 5] floats each, PART floats apart.
void merge_splits(const float* parts, int64_t S, int64_t stride, int64_t D, bool stats, float* out, float* acc) {
  float M = parts[D];
  for (int64_t c = 1; c < S; ++c) M = std::max(M, parts[c * stride + D]);
  std::fill(out, out + D, 0.0f);
  float l = 0.0f, t = 0.0f, sink = 0.0f, pos = 0.0f;
  for (int64_t c = 0; c < S; ++c) {
    const float* p = parts + c * stride;
    const float w = exp_nonpositive(p[D] - M);
    for (int64_t d = 0; d < D; ++d) out[d] += w * p[d];
    l += w * p[D + 1];
    if (stats) {
      t += w * (p[D + 2] + p[D + 1] * (p[D] - M));
      sink += w * p[D + 3];
      pos += w * p[D + 4];
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= l;
  if (stats) {
    acc[0] = l;
    acc[1] = t;
    acc[2] = sink;
    acc[3] = pos;
  }
}

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_table,
                                                const at::Tensor& seq_lens, double scale, bool compute_stats,
                                                int64_t sink_tokens) {
  headwise::check_query_and_cache("paged_decode", q, k_cache, v_cache);
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 &&
                  block_table.device().is_cpu(),
              "paged_decode: block_table must be int32 [Bd, W] with unit column stride");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous() &&
                  seq_lens.device().is_cpu(),
              "paged_decode: seq_lens must be a contiguous int32 [Bd]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(block_table.size(0) == B && seq_lens.size(0) == B, "paged_decode: batch sizes differ");
  TORCH_CHECK(sink_tokens >= 0, "paged_decode: sink_tokens must be >= 0");
  const Shapes sh{H, KVH, H / KVH, D, bs, NB, block_table.size(1), block_table.stride(0), KVH * D};
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {  // every index the kernel will follow, checked before it runs
    const int64_t n = lens[b];
    total_keys += n;
    TORCH_CHECK(n >= 1 && n <= sh.W * bs, "paged_decode: seq_lens[", b, "] = ", n,
                " outside 1 .. block_table width * block_size");
    for (int64_t w = 0; w < (n + bs - 1) / bs; ++w) {
      const int32_t blk = table[b * sh.table_stride + w];
      TORCH_CHECK(blk >= 0 && blk < NB, "paged_decode: block_table[", b, ", ", w, "] = ", blk, " out of range");
    }
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  at::Tensor acc = compute_stats ? at::empty({B, H, 4}, q.options()) : at::empty({0}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* ap = compute_stats ? acc.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  // Below ~2k (key, KV head) pairs the work (~30 us) is not worth waking another thread: a
  // fork-join costs microseconds on an idle machine and a scheduler time slice on a busy one.
  // Rows longer than SPLIT keys run as ceil(n / SPLIT) splits of SPLIT keys (the last shorter),
  // each its own work item, merged afterwards in order (merge_splits): the splits of a row
  // depend on its length only, so its result still never depends on the batch or the threads.
  const int64_t split = std::max<int64_t>(SPLIT_KEYS, bs) / bs * bs;
  std::vector<int64_t> item_base(B + 1, 0), part_base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = (lens[b] + split - 1) / split;
    item_base[b + 1] = item_base[b] + S * KVH;
    part_base[b + 1] = part_base[b] + (S > 1 ? S : 0);
  }
  const int64_t items = item_base[B];
  const int64_t part_stride = H * (D + 5);
  at::Tensor parts = at::empty({part_base[B] * part_stride}, q.options());  // [splits of split rows, H, D + 5]
  float* pp = parts.data_ptr<float>();
  const int64_t grain = total_keys * KVH < 2048 ? items : 1;
  auto run = [&](const auto* kc, const auto* vc) {
    at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      int64_t b = std::upper_bound(item_base.begin(), item_base.end(), begin) - item_base.begin() - 1;
      for (int64_t i = begin; i < end;) {  // the range's (row, split, KV head) items, a split's KV heads together
        while (i >= item_base[b + 1]) ++b;
        const int64_t r = i - item_base[b], c = r / KVH, g0 = r % KVH;
        const int64_t g1 = std::min(KVH, g0 + std::min(end, item_base[b + 1]) - i);
        const int64_t n = lens[b], k0 = c * split, nk = std::min(split, n - k0);
        const bool whole = nk == n;
        attend_heads(qp + b * H * D, kc, vc, table + b * sh.table_stride + k0 / bs, nk, k0, g0, g1, sh, sc,
                     compute_stats, sink_tokens, op + b * H * D, compute_stats ? ap + b * H * 4 : nullptr,
                     whole ? nullptr : pp + (part_base[b] + c) * part_stride, scratch);
        i += g1 - g0;
      }
    });
  };
  if (k_cache.scalar_type() == at::kBFloat16)
    run(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  if (part_base[B] > 0) {
    at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / H, h = i % H, S = part_base[b + 1] - part_base[b];
        if (S == 0) continue;
        merge_splits(pp + part_base[b] * part_stride + h * (D + 5), S, part_stride, D, compute_stats,
                     op + (b * H + h) * D, compute_stats ? ap + (b * H + h) * 4 : nullptr);
      }
    });
  }
  return {out, acc};
}

// k_cache, v_cache [NB, bs, KVH, D] (float32 or bfloat16) at slots [T] <- k, v [T, KVH, D] (float32
// or bfloat16), rounded to the cache's dtype to nearest even, as Tensor.to does: the decode
// step's four torch ops (two casts, two index_copy_) in one call. Every slot is checked first.
// float32 -> bfloat16 bits by c10::BFloat16(float)'s rule (nearest even; NaN -> 0x7FC0), in
// integer arithmetic that the compiler vectorizes.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

inline void store_row(c10::BFloat16* __restrict dst, const float* __restrict src, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(src[i]);
}
inline void store_row(float* __restrict dst, const c10::BFloat16* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename T>
inline void store_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(T));
}

template <typename C, typename S>
void write_rows(C* kc, C* vc, const int64_t* slots, const S* k, const S* v, int64_t T, int64_t row) {
  for (int64_t t = 0; t < T; ++t) {
    store_row(kc + slots[t] * row, k + t * row, row);
    store_row(vc + slots[t] * row, v + t * row, row);
  }
}

void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "write_kv: k_cache and v_cache must be contiguous [NB, block_size, KVH, D], both float32 or bfloat16");
  const int64_t row = k_cache.size(2) * k_cache.size(3), capacity = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "write_kv: slots must be a contiguous int64 [T]");
  const int64_t T = slots.size(0);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.numel() == T * row &&
                  k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "write_kv: k and v must be contiguous float32 or bfloat16 [T, KVH, D] matching the cache");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "write_kv: slot ", sp[t], " out of range");
  auto run = [&](auto* kc, auto* vc) {
    if (k.scalar_type() == at::kFloat) write_rows(kc, vc, sp, k.data_ptr<float>(), v.data_ptr<float>(), T, row);
    else write_rows(kc, vc, sp, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), T, row);
  };
  if (k_cache.scalar_type() == at::kFloat) run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else run(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
}

}  // namespace

TORCH_LIBRARY(headwise, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "float scale, bool compute_stats, int sink_tokens) -> (Tensor, Tensor)");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(headwise, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("write_kv", &write_kv);
}
