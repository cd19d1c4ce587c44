// Small SIMD helpers for the CPU kernels: W-lane float vectors (GCC/Clang vector extensions),
// a vectorised exp, bf16 / fp16 <-> float conversion, and the x86-64-v3 build switch.
//
// W is a template parameter because the right width depends on the instruction set the code
// is compiled for: a vector wider than the target's registers is split by GCC into slow
// sequences (measured with GCC 12: the exp below costs 4.6 ns per element at 16 lanes on
// AVX2, 0.6 ns at 8 lanes). Kernels therefore build their hot loop twice: W = 8 inside a
// function with RLHF_CPU_V3 (AVX2 + FMA, one ymm register) and W = 4 (one SSE / NEON register)
// for the baseline, and pick one at run time with cpu_has_v3().
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_CPU_HAS_V3 1
#define RLHF_CPU_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define RLHF_CPU_HAS_V3 0
#define RLHF_CPU_V3
#endif
// helpers must be inlined into the x86-64-v3 functions to be compiled for AVX2
#define RLHF_INLINE inline __attribute__((always_inline))

namespace rlhf_cpu {

// RLHF_KERNELS_CPU_BASELINE=1 forces the baseline build (how the tests reach it on AVX2 CPUs)
inline bool cpu_has_v3() {
#if RLHF_CPU_HAS_V3
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          !std::getenv("RLHF_KERNELS_CPU_BASELINE");
  return has;
#else
  return false;
#endif
}

template <int W>
struct Lanes;
template <>
struct Lanes<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef double d __attribute__((vector_size(32)));
};
template <>
struct Lanes<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef double d __attribute__((vector_size(64)));
};
template <int W>
using vfloat = typename Lanes<W>::f;
template <int W>
using vdouble = typename Lanes<W>::d;
template <int W>
using vint = typename Lanes<W>::i;
template <int W>
using vuint = typename Lanes<W>::u;

template <typename V, typename T>
RLHF_INLINE V vload(const T* p) {
  V x;
  std::memcpy(&x, p, sizeof(V));
  return x;
}
template <typename V, typename T>
RLHF_INLINE void vstore(T* p, const V& x) {
  std::memcpy(p, &x, sizeof(V));
}

template <int W>
RLHF_INLINE vfloat<W> vsplat(float x) {
  return vfloat<W>{} + x;
}

// exp(x) to ~2 ulp: x = n*ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by
// building the exponent bits. Below -87.3 (float underflow) the result is 0, -inf included.
template <int W>
RLHF_INLINE vfloat<W> vexp(vfloat<W> x) {
  const vint<W> underflow = x < -87.3f;
  x = x > 88.3f ? vsplat<W>(88.3f) : x;  // keeps 2^n a finite float
  x = underflow ? vsplat<W>(0.f) : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const vfloat<W> n = (x * 1.44269504088896341f + shifter) - shifter;
  const vfloat<W> r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vfloat<W> p = vsplat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat<W> y = p * r * r + r + 1.f;
  const vint<W> bits = (__builtin_convertvector(n, vint<W>) + 127) << 23;
  vfloat<W> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vsplat<W>(0.f) : y * scale;
}

template <int W>
RLHF_INLINE float hmax(vfloat<W> x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
template <int W>
RLHF_INLINE float hsum(vfloat<W> x) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}

// W consecutive elements of any logits dtype as floats.
template <int W>
RLHF_INLINE vfloat<W> load_float(const float* p) {
  return vload<vfloat<W>>(p);
}
template <int W>
RLHF_INLINE vfloat<W> load_float(const c10::BFloat16* p) {
  uint16_t raw[W];
  std::memcpy(raw, p, sizeof(raw));
  vuint<W> u;
  for (int i = 0; i < W; ++i) u[i] = static_cast<uint32_t>(raw[i]) << 16;  // bf16 = top half
  vfloat<W> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <int W>
RLHF_INLINE vfloat<W> load_float(const c10::Half* p) {
  vfloat<W> f;
  for (int i = 0; i < W; ++i) f[i] = static_cast<float>(p[i]);
  return f;
}

template <int W>
RLHF_INLINE void store_from_float(float* p, vfloat<W> x) {
  vstore(p, x);
}
template <int W>
RLHF_INLINE void store_from_float(c10::BFloat16* p, vfloat<W> x) {
  vuint<W> u;
  std::memcpy(&u, &x, sizeof(u));
  // round to nearest even (gradients are finite; NaN handling is not needed here)
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint16_t raw[W];
  for (int i = 0; i < W; ++i) raw[i] = static_cast<uint16_t>(u[i]);
  std::memcpy(p, raw, sizeof(raw));
}
template <int W>
RLHF_INLINE void store_from_float(c10::Half* p, vfloat<W> x) {
  for (int i = 0; i < W; ++i) p[i] = c10::Half(x[i]);
}

}  // namespace rlhf_cpu
