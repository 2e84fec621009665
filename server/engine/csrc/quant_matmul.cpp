// Weight-only quantized matmul for the CPU decode path (server/engine/quant_matmul.py).
//
//   quant_mm(x, qw, scales, mins, kind, N, bias) -> y [M, N] float32,  y = x @ W^T (+ bias)
//   quant_mm_out(x, qw, scales, mins, kind, N, bias, out): the same into out, float32 [M, N] with
//   unit column stride (e.g. the first rows of a mixed step's output: no concatenation)
//
// W is a GGUF block-quantized matrix [N, K] (group 32 along K) in its own values:
//   kind 0  Q4_0  w = (q - 8) d        q in 0..15
//   kind 1  Q4_1  w = q d + m          q in 0..15
//   kind 2  Q8_0  w = q d              q in -128..127
// repacked by quant_matmul.py into tiles of 16 output rows (N padded to a multiple of 16):
//   Q4_*  qw uint8 [N/16, K/4, 32]: two k-pairs (2p, 2p + 1) per 32 bytes, byte j = a_j | b_j << 4
//         where a_j, b_j are word j of the k-pairs in lane order (j = 2i + t: q[n_i, 2p' + t])
//   Q8_0  qw int8  [N/16, K/2, 32]: bytes (p, 2i), (p, 2i + 1) = q[n_i, 2p], q[n_i, 2p + 1]
//   scales, mins float16 [N/16, K/32, 16] (the file's own d and m)
// x [M, K] float32 or bfloat16; its values are rounded to bfloat16 (as every quantized kernel here
// takes them) and multiplied by the integer q exactly in bfloat16 pairs (vdpbf16ps, float32 sums):
// per group  s_g = sum_k q_k x_k,  then y += d s_g (+ m sum_k x_k for Q4_1) in float32.
//
// Why not torch's int4 / int8 kernels: they compute one activation row at a time, so a 16-row
// decode step decodes every weight 16 times. Here each weight tile is decoded once into registers
// and used for up to 8 rows, and the tiles stay in L1 for the next 8. The arithmetic of a row is the
// same whatever the other rows and however many there are (rows never share a sum, and a tile's
// outputs are computed by one thread in one order), so a row's result never depends on its batch.
// Work is split over output tiles with at::parallel_for. Needs AVX-512 BF16: built with
// -march=native, it fails to compile elsewhere and the loader falls back to torch's kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "quant_matmul needs AVX-512 BF16 and BW (built with -march=native on a CPU without them)"
#endif

namespace {

constexpr int64_t TILE = 16;   // output rows per tile: one float32 lane each
constexpr int64_t GROUP = 32;  // weights per scale
constexpr int64_t ROWS = 8;    // activation rows per pass over a tile

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

// 32 bfloat16 words: entry e is bf16(e mod 16) (Q4_1) or bf16(e mod 16 - 8) (Q4_0); vpermw looks
// q up in it by the low 5 bits of an index word, so bit 4 (the other nibble's lowest) is ignored.
__m512i nibble_table(bool centred) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    const float v = static_cast<float>(i % 16) - (centred ? 8.f : 0.f);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    t[i] = static_cast<uint16_t>(bits >> 16);  // exact: small integers have few significant bits
  }
  return _mm512_load_si512(t);
}

// Two k-pairs of a Q4 tile (32 bytes) -> 2 x 32 bf16 words, lane i holding (q[n_i, k], q[n_i, k + 1])
// of the first pair in a and of the second in b.
inline void decode_q4(const uint8_t* p, __m512i table, __m512i& a, __m512i& b) {
  const __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));  // a | b << 4
  a = _mm512_permutexvar_epi16(t, table);
  b = _mm512_permutexvar_epi16(_mm512_srli_epi16(t, 4), table);
}

// One k-pair of a Q8_0 tile (32 bytes) -> 32 bf16 words in the same lane order.
inline __m512i decode_q8(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // words 0..15 from lo, 16..31 from hi: exact
}

// accg[r] += w . (x[r0 + r, k], x[r0 + r, k + 1]) for the NR rows: one bf16 pair product per lane.
template <int64_t NR>
inline void dot_pair(__m512* accg, __m512i w, const uint16_t* xb, int64_t r0, int64_t K, int64_t k) {
  for (int64_t r = 0; r < NR; ++r) {
    int32_t pair;
    std::memcpy(&pair, xb + (r0 + r) * K + k, 4);
    accg[r] = _mm512_dpbf16_ps(accg[r], reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
  }
}

// y[r, tile outputs] for rows r0 .. r0 + NR of one tile. xb: bf16 activations [M, K] as uint16;
// xs: per-row group sums [M, G] (Q4_1 only). NR is a template argument so that the row loops
// unroll and the 2 NR accumulators stay in registers.
template <int64_t KIND, int64_t NR>
void tile_rows(const uint8_t* tw, const c10::Half* ts, const c10::Half* tm, const uint16_t* xb, const float* xs,
               int64_t r0, int64_t K, __m512i table, __m512* out) {
  constexpr int64_t nr = NR;
  const int64_t G = K / GROUP, pairs_per_group = GROUP / 2;
  const int64_t pair_bytes = KIND == Q8_0 ? 32 : 16;
  __m512 acc[NR], accg[NR];
  for (int64_t r = 0; r < nr; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < nr; ++r) accg[r] = _mm512_setzero_ps();
    const uint8_t* wp = tw + g * pairs_per_group * pair_bytes;
    if (KIND == Q8_0) {
      for (int64_t p = 0; p < pairs_per_group; ++p) {
        const __m512i w = decode_q8(reinterpret_cast<const int8_t*>(wp + p * pair_bytes));
        dot_pair<NR>(accg, w, xb, r0, K, g * GROUP + 2 * p);
      }
    } else {
      for (int64_t p = 0; p < pairs_per_group; p += 2) {
        __m512i a, b;
        decode_q4(wp + p * pair_bytes, table, a, b);
        dot_pair<NR>(accg, a, xb, r0, K, g * GROUP + 2 * p);
        dot_pair<NR>(accg, b, xb, r0, K, g * GROUP + 2 * p + 2);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ts + g * TILE)));
    if (KIND == Q4_1) {
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tm + g * TILE)));
      for (int64_t r = 0; r < nr; ++r) {
        acc[r] = _mm512_fmadd_ps(accg[r], d, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[(r0 + r) * G + g]), m, acc[r]);
      }
    } else {
      for (int64_t r = 0; r < nr; ++r) acc[r] = _mm512_fmadd_ps(accg[r], d, acc[r]);
    }
  }
  for (int64_t r = 0; r < nr; ++r) out[r] = acc[r];
}

template <int64_t KIND>
void run_tiles(const uint8_t* qw, const c10::Half* sc, const c10::Half* mn, const uint16_t* xb, const float* xs,
               const float* bias, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K) {
  const int64_t tiles = (N + TILE - 1) / TILE, G = K / GROUP;
  const int64_t tile_bytes = (KIND == Q8_0 ? 32 : 16) * (K / 2);
  const __m512i table = nibble_table(KIND == Q4_0);
  // about 64 KiB of weights per work item: small enough to balance two threads, big enough to
  // keep the pool's overhead out of the way
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    __m512 out[ROWS];
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tw = qw + t * tile_bytes;
      const c10::Half* ts = sc + t * G * TILE;
      const c10::Half* tm = KIND == Q4_1 ? mn + t * G * TILE : nullptr;
      const int64_t n0 = t * TILE, width = std::min<int64_t>(TILE, N - n0);
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
      for (int64_t r0 = 0; r0 < M; r0 += ROWS) {
        const int64_t nr = std::min<int64_t>(ROWS, M - r0);
        switch (nr) {
          case 1: tile_rows<KIND, 1>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 2: tile_rows<KIND, 2>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 3: tile_rows<KIND, 3>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 4: tile_rows<KIND, 4>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 5: tile_rows<KIND, 5>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 6: tile_rows<KIND, 6>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          case 7: tile_rows<KIND, 7>(tw, ts, tm, xb, xs, r0, K, table, out); break;
          default: tile_rows<KIND, ROWS>(tw, ts, tm, xb, xs, r0, K, table, out); break;
        }
        for (int64_t r = 0; r < nr; ++r)
          _mm512_mask_storeu_ps(y + (r0 + r) * ldy + n0, mask, _mm512_add_ps(out[r], b));
      }
    }
  });
}

void quant_mm_into(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& mins, int64_t kind, int64_t N, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& y) {
  TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "kind: 0 (Q4_0), 1 (Q4_1) or 2 (Q8_0)");
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: float32 or bfloat16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), tiles = (N + TILE - 1) / TILE, G = K / GROUP;
  TORCH_CHECK(K % GROUP == 0 && N > 0, "K must be a multiple of 32 and N positive");
  const int64_t pair_bytes = kind == Q8_0 ? 32 : 16;
  TORCH_CHECK(qw.is_contiguous() && qw.numel() == tiles * (K / 2) * pair_bytes && qw.element_size() == 1,
              "qw: packed ", kind == Q8_0 ? "[N/16, K/2, 32]" : "[N/16, K/4, 32]", " bytes for N = ", N, ", K = ", K);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == tiles * G * TILE,
              "scales: float16 [N/16, K/32, 16]");
  const bool has_mins = mins.has_value() && mins->defined();
  TORCH_CHECK(has_mins == (kind == Q4_1), "mins: given exactly for Q4_1");
  if (has_mins)
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel(),
                "mins: float16 like scales");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");

  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.stride(1) == 1 &&
                  y.stride(0) >= N && y.device().is_cpu(),
              "out: float32 [M, N] with unit column stride");
  if (M == 0) return;
  at::Tensor xb = x.to(at::kBFloat16).contiguous();  // [M, K] the activations every quantized kernel takes
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
  std::vector<float> xs;
  if (kind == Q4_1) {  // sum of each row's group of bf16 activations: the m term of Q4_1
    xs.resize(M * G);
    const c10::BFloat16* xv = xb.data_ptr<c10::BFloat16>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t i = 0; i < GROUP; ++i) s += static_cast<float>(xv[r * K + g * GROUP + i]);
        xs[r * G + g] = s;
      }
  }
  const uint8_t* wp = static_cast<const uint8_t*>(qw.data_ptr());
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const c10::Half* mp = has_mins ? mins->data_ptr<c10::Half>() : nullptr;
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  if (kind == Q4_0) run_tiles<Q4_0>(wp, sp, mp, xp, xs.data(), bp, yp, ldy, M, N, K);
  else if (kind == Q4_1) run_tiles<Q4_1>(wp, sp, mp, xp, xs.data(), bp, yp, ldy, M, N, K);
  else run_tiles<Q8_0>(wp, sp, mp, xp, xs.data(), bp, yp, ldy, M, N, K);
}

at::Tensor quant_mm(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& mins, int64_t kind, int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x: float32 or bfloat16 [M, K]");
  at::Tensor y = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  quant_mm_into(x, qw, scales, mins, kind, N, bias, y);
  return y;
}

void quant_mm_out(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& mins, int64_t kind, int64_t N, const c10::optional<at::Tensor>& bias,
                  at::Tensor out) {
  quant_mm_into(x, qw, scales, mins, kind, N, bias, out);
}

}  // namespace

TORCH_LIBRARY(headwise_quant, m) {
  m.def("quant_mm(Tensor x, Tensor qw, Tensor scales, Tensor? mins, int kind, int N, Tensor? bias) -> Tensor");
  m.def("quant_mm_out(Tensor x, Tensor qw, Tensor scales, Tensor? mins, int kind, int N, Tensor? bias, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(headwise_quant, CPU, m) {
  m.impl("quant_mm", &quant_mm);
  m.impl("quant_mm_out", &quant_mm_out);
}
