// Small SIMD helpers for the CPU kernels: W-lane float vectors (GCC/Clang vector extensions),
// a vectorised exp, and bf16 / fp16 <-> float conversion.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace rlhf_cpu {

constexpr int VW = 16;  // lanes: one AVX-512 register, two AVX2, four SSE
typedef float vfloat __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(VW * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(VW * sizeof(uint32_t))));

template <typename V, typename T>
inline V vload(const T* p) {
  V x;
  std::memcpy(&x, p, sizeof(V));
  return x;
}
template <typename V, typename T>
inline void vstore(T* p, const V& x) {
  std::memcpy(p, &x, sizeof(V));
}

inline vfloat vsplat(float x) { return vfloat{} + x; }

// exp(x) to ~2 ulp: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by
// building the exponent bits. Below -87.3 (float underflow) the result is 0, -inf included.
inline vfloat vexp(vfloat x) {
  const vint underflow = x < -87.3f;
  x = x > 88.3f ? vsplat(88.3f) : x;  // keeps 2^n a finite float
  x = underflow ? vsplat(0.f) : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat n = (x * 1.44269504088896341f + shifter) - shifter;
  const vfloat r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vfloat p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * r * r + r + 1.f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vsplat(0.f) : y * scale;
}

inline float hmax(vfloat x) {
  float m = x[0];
  for (int i = 1; i < VW; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline float hsum(vfloat x) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
}

// VW consecutive elements of any logits dtype as floats.
inline vfloat load_float(const float* p) { return vload<vfloat>(p); }
inline vfloat load_float(const c10::BFloat16* p) {
  uint16_t raw[VW];
  std::memcpy(raw, p, sizeof(raw));
  vuint u;
  for (int i = 0; i < VW; ++i) u[i] = static_cast<uint32_t>(raw[i]) << 16;  // bf16 = top half
  vfloat f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline vfloat load_float(const c10::Half* p) {
  vfloat f;
  for (int i = 0; i < VW; ++i) f[i] = static_cast<float>(p[i]);
  return f;
}

inline void store_from_float(float* p, vfloat x) { vstore(p, x); }
inline void store_from_float(c10::BFloat16* p, vfloat x) {
  vuint u;
  std::memcpy(&u, &x, sizeof(u));
  // round to nearest even (gradients are finite; NaN handling is not needed here)
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint16_t raw[VW];
  for (int i = 0; i < VW; ++i) raw[i] = static_cast<uint16_t>(u[i]);
  std::memcpy(p, raw, sizeof(raw));
}
inline void store_from_float(c10::Half* p, vfloat x) {
  for (int i = 0; i < VW; ++i) p[i] = c10::Half(x[i]);
}

}  // namespace rlhf_cpu
