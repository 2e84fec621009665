// The paged K/V cache as the attention ops read it (paged_decode.cpp, paged_prefill.cpp): its
// elements as float32 (a cache holds float32 or bfloat16, c10::BFloat16; a bfloat16 widens exactly,
// its bits shifted into the high half of a float32), and the checks both ops make of their query
// and cache arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace headwise {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

#if defined(__AVX512F__)
// Sixteen cache elements as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Thirty-two cache elements as two float32 vectors: float32 elements 0..15 and 16..31; bfloat16
// elements 0, 2, .., 30 (the low halves of the 32-bit lanes, one shift) and 1, 3, .., 31 (the high
// halves, one mask): half the widening work of two load16, in another order.
inline void load32(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p);
  b = _mm512_loadu_ps(p + 16);
}
inline void load32(const c10::BFloat16* p, __m512& a, __m512& b) {
  const __m512i raw = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
#endif

// q: contiguous float32 CPU [rows, H, D]; k_cache, v_cache: contiguous CPU [NB, block_size, KVH, D],
// both float32 or both bfloat16, with H a multiple of KVH. op names the caller in the messages.
inline void check_query_and_cache(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.device().is_cpu(), op,
              ": q must be a contiguous float32 CPU tensor [rows, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must both be [NB, block_size, KVH, D]");
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              op, ": k_cache and v_cache must be contiguous CPU tensors, both float32 or both bfloat16");
  TORCH_CHECK(k_cache.size(3) == q.size(2), op, ": head_dim of q and the cache differ");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0, op, ": H must be a multiple of KVH");
}

}  // namespace headwise
