// Fused elementwise ops of a decoder layer for the CPU quantized path (server/engine/layer_ops.py).
//
// Each replaces a chain of small torch ops whose cost at decode is dispatch, not arithmetic:
//   rms_norm_bf16(x, w, eps)        F.rms_norm(x, w, eps).to(bfloat16)          x [T, C] float32
//   add_rms_norm_bf16(x, y, w, eps) x += y (in place), then rms_norm_bf16(x, w, eps): the residual
//                                   add of a sublayer fused with the next norm; y float32 or
//                                   bfloat16 (a bf16 GEMM's own output, widened here exactly)
//   silu_mul_bf16(gate_up)          (F.silu(g) * u).to(bfloat16), g, u = halves   [T, 2I] bf16/f32
//   qkv_rope(qkv, cos, sin, H, KVH) float32 q, k rotated (rotate-half RoPE) and v from qkv [T, (H + 2KVH) D]
// All math in float32; bfloat16 outputs are rounded to nearest even (c10::BFloat16).
// Rows are computed one by one with the same arithmetic whatever the batch, so a row never
// depends on its batch: a decode row is normalized and activated the same in a decode-only step
// and beside a 256-row prefill chunk. Rows are spread over the threads (at::parallel_for) only
// when a call has at least ROW_WORK elements: at decode a call takes a few microseconds, less
// than waking the thread pool; a prefill chunk's 256 rows split over both cores. With AVX-512 the
// sum of squares and SiLU run 16 lanes wide (fixed-order partial sums, no -ffast-math); SiLU's
// exp is the Cephes-style polynomial of csrc/exp_nonpositive.h (shared with the attention op), of a non-positive
// argument only (sigmoid(g) from e = exp(-|g|)).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "exp_nonpositive.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

constexpr int64_t ROW_WORK = 32768;  // elements per call below which it stays on the calling thread

// f(begin, end) over rows 0 .. T-1 of `width` elements each: on this thread for small calls,
// else split over the pool. Either way every row gets the same arithmetic.
template <typename F>
void over_rows(int64_t T, int64_t width, const F& f) {
  if (T * width < ROW_WORK) {
    f(0, T);
    return;
  }
  at::parallel_for(0, T, std::max<int64_t>(1, ROW_WORK / std::max<int64_t>(width, 1) / 4), f);
}

// sum of x[c]^2 over 16 lanes of partial sums in a fixed order.
inline float sum_squares(const float* x, int64_t C) {
  float lanes[16] = {0.f};
  int64_t c = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; c + 16 <= C; c += 16) {
    const __m512 v = _mm512_loadu_ps(x + c);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  _mm512_storeu_ps(lanes, acc);
#else
  for (; c + 16 <= C; c += 16)
    for (int u = 0; u < 16; ++u) lanes[u] = std::fma(x[c + u], x[c + u], lanes[u]);
#endif
  for (int u = 0; c < C; ++c, ++u) lanes[u] = std::fma(x[c], x[c], lanes[u]);
  float ss = 0.f;
  for (int u = 0; u < 16; ++u) ss += lanes[u];
  return ss;
}

inline float as_float(float x) { return x; }
inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

// The normalized row t of x [T, C] into out (bfloat16); y (float32 or bfloat16, widened exactly),
// when given, is added into the row first.
template <typename Y>
at::Tensor norm_rows(float* xp, const Y* yp, const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == at::kFloat && w.size(0) == x.size(1) && w.is_contiguous(),
              "w: float32 [C]");
  const int64_t T = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({T, C}, x.options().dtype(at::kBFloat16));
  const float* wp = w.data_ptr<float>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const float e = static_cast<float>(eps);
  over_rows(T, C, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = xp + t * C;
      if (yp != nullptr)
        for (int64_t c = 0; c < C; ++c) row[c] += as_float(yp[t * C + c]);
      const float r = 1.f / std::sqrt(sum_squares(row, C) / static_cast<float>(C) + e);
      c10::BFloat16* o = op + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = c10::BFloat16(row[c] * r * wp[c]);
    }
  });
  return out;
}

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [T, C] contiguous");
  return norm_rows<float>(const_cast<float*>(x.data_ptr<float>()), nullptr, x, w, eps);  // x is only read
}

at::Tensor add_rms_norm_bf16(at::Tensor x, const at::Tensor& y, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [T, C] contiguous");
  TORCH_CHECK(y.sizes() == x.sizes() && (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16) &&
                  y.is_contiguous(),
              "y: float32 or bfloat16 [T, C] contiguous, the shape of x");
  if (y.scalar_type() == at::kBFloat16) return norm_rows(x.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), x, w, eps);
  return norm_rows(x.data_ptr<float>(), y.data_ptr<float>(), x, w, eps);
}

// silu(g) * u = g * sigmoid(g) * u, sigmoid from e = exp(-|g|) <= 1 (never overflows).
inline float silu_mul(float g, float u) {
  const float e = headwise::exp_nonpositive(-std::fabs(g));
  const float sig = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
  return g * sig * u;
}

template <typename T>
void silu_mul_rows(const T* in, c10::BFloat16* out, int64_t rows, int64_t inter) {
  over_rows(rows, inter, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = in + t * 2 * inter;
      const T* u = g + inter;
      c10::BFloat16* o = out + t * inter;
      for (int64_t i = 0; i < inter; ++i) o[i] = c10::BFloat16(silu_mul(as_float(g[i]), as_float(u[i])));
    }
  });
}

at::Tensor silu_mul_bf16(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous(), "gate_up: [T, 2I] contiguous");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gate_up.options().dtype(at::kBFloat16));
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_rows(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), T, I);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "gate_up: bfloat16 or float32");
    silu_mul_rows(gate_up.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), T, I);
  }
  return out;
}

template <typename T>
void qkv_rope_rows(const T* in, const float* cos, const float* sin, float* q, float* k, float* v, int64_t rows,
                   int64_t H, int64_t KVH, int64_t D) {
  const int64_t width = (H + 2 * KVH) * D, half = D / 2;
  over_rows(rows, width, [&](int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const T* row = in + t * width;
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    for (int64_t h = 0; h < H + KVH; ++h) {  // q heads, then k heads: rotate halves
      const T* x = row + h * D;
      float* o = h < H ? q + (t * H + h) * D : k + (t * KVH + h - H) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(x[i]), b = static_cast<float>(x[i + half]);
        o[i] = a * c[i] - b * s[i];
        o[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
    const T* vx = row + (H + KVH) * D;
    float* vo = v + t * KVH * D;
    for (int64_t i = 0; i < KVH * D; ++i) vo[i] = static_cast<float>(vx[i]);
  }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                        const at::Tensor& sin, int64_t H, int64_t KVH) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv: [T, (H + 2 KVH) D] contiguous");
  const int64_t T = qkv.size(0);
  TORCH_CHECK(qkv.size(1) % (H + 2 * KVH) == 0, "qkv width is not a multiple of H + 2 KVH");
  const int64_t D = qkv.size(1) / (H + 2 * KVH);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "cos, sin: float32 [T, D] contiguous");
  auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor q = at::empty({T, H, D}, f32), k = at::empty({T, KVH, D}, f32), v = at::empty({T, KVH, D}, f32);
  if (qkv.scalar_type() == at::kBFloat16) {
    qkv_rope_rows(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<float>(),
                  k.data_ptr<float>(), v.data_ptr<float>(), T, H, KVH, D);
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kFloat, "qkv: bfloat16 or float32");
    qkv_rope_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), q.data_ptr<float>(),
                  k.data_ptr<float>(), v.data_ptr<float>(), T, H, KVH, D);
  }
  return {q, k, v};
}

}  // namespace

TORCH_LIBRARY(headwise_layer, m) {
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_bf16(Tensor(a!) x, Tensor y, Tensor w, float eps) -> Tensor");
  m.def("silu_mul_bf16(Tensor gate_up) -> Tensor");
  m.def("qkv_rope(Tensor qkv, Tensor cos, Tensor sin, int H, int KVH) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(headwise_layer, CPU, m) {
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("add_rms_norm_bf16", &add_rms_norm_bf16);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("qkv_rope", &qkv_rope);
}
