// exp(x) for x <= 0, shared by the C++ ops (attention/csrc/paged_decode.cpp, csrc/layer_ops.cpp):
// a Cephes-style polynomial (relative error ~2 ulp), 0 below float's normal range like a flush to
// zero, no -ffast-math needed.
#pragma once

#include <cstdint>
#include <cstring>

namespace headwise {

// exp(x) for x <= 0 (callers pass s - max s); 0 below float's normal range, like a flush to zero.
inline float exp_nonpositive(float x) {
  const float lo = -87.0f;
  const bool under = x < lo;
  x = under ? lo : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (no fast-math needed); r = x - n ln 2 in two steps
  const float magic = 12582912.0f;
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return under ? 0.0f : p * two_n;
}

}  // namespace headwise
