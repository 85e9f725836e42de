// The vector type the float32 micro-kernels are written against: a GCC/Clang vector extension
// of SA_VEC_BYTES (32: eight floats, AVX2 + FMA in microkernels_avx2.cpp; 16: four floats,
// SSE2 or any target's native vectors in microkernels_generic.cpp), so one source serves both. Kernels call these named
// helpers and read like the maths. Everything sits in the level's namespace (SA_SIMD_NAMESPACE,
// set by the including .cpp) and an anonymous one: code built with different flags must never
// be shared between translation units. No namespace-scope vector constants either: a static
// initialiser could run AVX2 code on a CPU without it.
#pragma once

#include <cstdint>
#include <cstring>

#if !defined(SA_SIMD_NAMESPACE) || !defined(SA_VEC_BYTES)
#error "define SA_SIMD_NAMESPACE (the level's namespace) and SA_VEC_BYTES before simd.h"
#endif

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace {

typedef float vfloat __attribute__((vector_size(SA_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(SA_VEC_BYTES)));
typedef uint32_t vuint __attribute__((vector_size(SA_VEC_BYTES)));
constexpr int kVecWidth = SA_VEC_BYTES / 4;

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vuint load_u32(const uint32_t* p) {
  vuint v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Every lane x (not "0 + x", which the compiler may not fold: 0 + -0 is +0).
inline vfloat splat(float x) {
#if SA_VEC_BYTES == 32
  return vfloat{x, x, x, x, x, x, x, x};
#else
  return vfloat{x, x, x, x};
#endif
}
// a * b + c: contracted to one FMA where the target has it (never -ffast-math).
inline vfloat fmadd(vfloat a, vfloat b, vfloat c) { return a * b + c; }
// The larger lane; a NaN in a gives b (like maxps with b second).
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vabs(vfloat x) { return (vfloat)((vint)x & ~(vint)splat(-0.0f)); }

// exp(x) for x <= 0 (softmax arguments): Cephes' expf polynomial, max relative error about
// 2 ulp. Results below 2^-126 flush to 0 (no denormals); exp(-inf) = 0; NaN stays NaN (it
// flows through the arithmetic).
inline vfloat exp_nonpositive(vfloat x) {
  const vfloat lowest = splat(-87.33f);
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat xc = x < lowest ? lowest : x;
  const vfloat n = fmadd(xc, splat(1.44269504088896341f), magic) - magic;
  vfloat r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vfloat p = splat(1.9875691500e-4f);
  p = fmadd(p, r, splat(1.3981999507e-3f));
  p = fmadd(p, r, splat(8.3334519073e-3f));
  p = fmadd(p, r, splat(4.1665795894e-2f));
  p = fmadd(p, r, splat(1.6666665459e-1f));
  p = fmadd(p, r, splat(5.0000001201e-1f));
  p = fmadd(p, r * r, r + splat(1.0f));
  const vint exponent = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat y = p * (vfloat)exponent;
  return x < lowest ? vfloat{} : y;
}

// tanh through exp(-2|x|), with a Taylor polynomial below |x| < 1/16 where 1 - exp(-2|x|)
// would cancel: absolute error about 1e-7.
inline vfloat tanh_approx(vfloat x) {
  const vfloat ax = vabs(x);
  const vfloat e = exp_nonpositive(ax * splat(-2.0f));
  const vfloat big = (splat(1.0f) - e) / (splat(1.0f) + e);
  const vfloat x2 = ax * ax;
  vfloat poly = fmadd(x2, splat(-17.0f / 315.0f), splat(2.0f / 15.0f));
  poly = fmadd(x2, poly, splat(-1.0f / 3.0f));
  const vfloat small = fmadd(ax * x2, poly, ax);
  const vfloat t = ax < splat(0.0625f) ? small : big;
  return (vfloat)((vint)t | ((vint)x & (vint)splat(-0.0f)));  // the sign of x; NaN stays
}

}  // namespace
}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
