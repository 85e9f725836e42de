// The micro-kernels written once as plain loops shaped for the vectoriser; included by each
// microkernels_<level>.cpp inside its own namespace and compiled with that level's flags.
// No namespace-scope constants or statics: a static initialiser here could run AVX2 code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "microkernels.h"

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace {

// exp(x) for x <= 0 (softmax arguments), branch-free so it vectorises. Cephes' expf
// polynomial: max relative error about 2 ulp. Results below 2^-126 flush to 0 (no denormals);
// exp(-inf) = 0, NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float xc = x < -87.33f ? -87.33f : x;
  const float t = xc * kLog2e + kRoundMagic;
  const float n = t - kRoundMagic;
  const float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float y = p * scale;
  return x < -87.33f ? 0.0f : (x != x ? x : y);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
void pack_k(const T* k, int64_t k_row_stride, int cols, int dim, T* k_packed) {
  for (int c = 0; c < cols; ++c) {
    const T* key = k + c * k_row_stride;
    for (int d = 0; d < dim; ++d) k_packed[d * kTileK + c] = key[d];
  }
  for (int d = 0; d < dim; ++d) {
    for (int c = cols; c < kTileK; ++c) k_packed[d * kTileK + c] = T(0);
  }
}

template <typename T>
void score_tile(const T* q, int64_t q_row_stride, int rows, const T* k_packed, int dim, T scale,
                T* s) {
  for (int r = 0; r < rows; ++r) {
    T acc[kTileK] = {};
    const T* query = q + r * q_row_stride;
    for (int d = 0; d < dim; ++d) {
      const T qd = query[d];
      const T* keys = k_packed + d * kTileK;
      for (int c = 0; c < kTileK; ++c) acc[c] += qd * keys[c];
    }
    T* out = s + r * kTileK;
    for (int c = 0; c < kTileK; ++c) out[c] = acc[c] * scale;
  }
}

template <typename T>
void softmax_update(T* s, int rows, int cols, T* row_max, T* row_sum, T* corr) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int r = 0; r < rows; ++r) {
    T* scores = s + r * kTileK;
    T tile_max = neg_inf;
    for (int c = 0; c < cols; ++c) tile_max = scores[c] > tile_max ? scores[c] : tile_max;
    const T new_max = tile_max > row_max[r] ? tile_max : row_max[r];
    if (new_max == neg_inf) {  // nothing allowed so far: keep the row empty
      corr[r] = T(1);
      for (int c = 0; c < cols; ++c) scores[c] = T(0);
      continue;
    }
    corr[r] = exp_nonpositive(row_max[r] - new_max);  // 0 on the first allowed tile
    T sum = T(0);
    for (int c = 0; c < cols; ++c) {
      const T p = exp_nonpositive(scores[c] - new_max);
      scores[c] = p;
      sum += p;
    }
    row_sum[r] = row_sum[r] * corr[r] + sum;
    row_max[r] = new_max;
  }
}

template <typename T>
void accumulate_pv(const T* p, int rows, int cols, const T* v, int64_t v_row_stride, int dim_v,
                   const T* corr, T* acc) {
  for (int r = 0; r < rows; ++r) {
    T* out = acc + static_cast<int64_t>(r) * dim_v;
    const T* probs = p + r * kTileK;
    if (corr[r] != T(1)) {
      for (int e = 0; e < dim_v; ++e) out[e] *= corr[r];
    }
    for (int c = 0; c < cols; ++c) {
      const T pc = probs[c];
      if (pc == T(0)) continue;  // masked key: no work
      const T* value = v + c * v_row_stride;
      for (int e = 0; e < dim_v; ++e) out[e] += pc * value[e];
    }
  }
}

template <typename T>
MicroKernels<T> make_table() {
  return {&pack_k<T>, &score_tile<T>, &softmax_update<T>, &accumulate_pv<T>};
}

}  // namespace

const MicroKernels<float>& table_f32() {
  static const MicroKernels<float> table = make_table<float>();
  return table;
}

const MicroKernels<double>& table_f64() {
  static const MicroKernels<double> table = make_table<double>();
  return table;
}

}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
