// Fused elementwise ops of a decoder layer for the CPU quantized path (server/engine/layer_ops.py).
//
// Each replaces a chain of small torch ops whose cost at decode is dispatch, not arithmetic:
//   rms_norm_bf16(x, w, eps)        F.rms_norm(x, w, eps).to(bfloat16)          x [T, C] float32
//   silu_mul_bf16(gate_up)          (F.silu(g) * u).to(bfloat16), g, u = halves   [T, 2I] bf16/f32
//   qkv_rope(qkv, cos, sin, H, KVH) float32 q, k rotated (rotate-half RoPE) and v from qkv [T, (H + 2KVH) D]
// All math in float32; bfloat16 outputs are rounded to nearest even (c10::BFloat16).
// Single-threaded on purpose: at decode a call takes a few microseconds, less than waking a
// thread pool, and it keeps a second OpenMP runtime (the system's libgomp beside torch's bundled
// one) out of the process. Rows are computed one by one, so a row never depends on its batch.

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [T, C] contiguous");
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == at::kFloat && w.size(0) == x.size(1) && w.is_contiguous(),
              "w: float32 [C]");
  const int64_t T = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({T, C}, x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const float e = static_cast<float>(eps);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xp + t * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += row[c] * row[c];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + e);
    c10::BFloat16* o = op + t * C;
    for (int64_t c = 0; c < C; ++c) o[c] = c10::BFloat16(row[c] * r * wp[c]);
  }
  return out;
}

template <typename T>
void silu_mul_rows(const T* in, c10::BFloat16* out, int64_t rows, int64_t inter) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = in + t * 2 * inter;
    const T* u = g + inter;
    c10::BFloat16* o = out + t * inter;
    for (int64_t i = 0; i < inter; ++i) {
      const float gv = static_cast<float>(g[i]);
      o[i] = c10::BFloat16(gv / (1.f + std::exp(-gv)) * static_cast<float>(u[i]));
    }
  }
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
  for (int64_t t = 0; t < rows; ++t) {
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
  m.def("silu_mul_bf16(Tensor gate_up) -> Tensor");
  m.def("qkv_rope(Tensor qkv, Tensor cos, Tensor sin, int H, int KVH) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(headwise_layer, CPU, m) {
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("qkv_rope", &qkv_rope);
}
