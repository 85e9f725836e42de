// The micro-kernels written once as plain loops shaped for the vectoriser (inner loops run
// along the query lanes). Included by each microkernels_<level>.cpp inside its own namespace
// and compiled with that level's flags; the AVX2 level replaces the float32 ones by intrinsics.
// No namespace-scope constants or statics: a static initialiser here could run AVX2 code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "microkernels.h"

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace portable {

// exp(x) for x <= 0 (softmax arguments), branch-free so it vectorises. Cephes' expf
// polynomial: max relative error about 2 ulp. Results below 2^-126 flush to 0 (no denormals);
// exp(-inf) = 0 and NaN stays NaN.
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
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float y = p * two_n;
  return x < -87.33f ? 0.0f : (x != x ? x : y);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// tanh through exp(-2|x|), with a Taylor polynomial below |x| < 1/16 where 1 - exp(-2|x|)
// would cancel: absolute error about 1e-7 (float).
inline float tanh_approx(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float e = exp_nonpositive(-2.0f * ax);
  const float big = (1.0f - e) / (1.0f + e);
  const float x2 = ax * ax;
  const float small = ax + ax * x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f)));
  const float t = ax < 0.0625f ? small : big;
  return x < 0.0f ? -t : (x != x ? x : t);
}

inline double tanh_approx(double x) { return std::tanh(x); }

template <typename T>
void pack_q(const T* q, int64_t q_row_stride, int rows, int dim, const T* row_scale,
            T* q_packed) {
  for (int r = 0; r < rows; ++r) {
    const T* query = q + r * q_row_stride;
    for (int d = 0; d < dim; ++d) q_packed[d * kTileQ + r] = row_scale[r] * query[d];
  }
  for (int d = 0; d < dim; ++d) {
    for (int r = rows; r < kTileQ; ++r) q_packed[d * kTileQ + r] = T(0);
  }
}

template <typename T>
void score_tile(const T* k, int64_t k_row_stride, int cols, int dim, const T* q_packed, T* s) {
  for (int c = 0; c < cols; ++c) {
    T acc[kTileQ] = {};
    const T* key = k + c * k_row_stride;
    for (int d = 0; d < dim; ++d) {
      const T kd = key[d];
      const T* lanes = q_packed + d * kTileQ;
      for (int r = 0; r < kTileQ; ++r) acc[r] += kd * lanes[r];
    }
    std::memcpy(s + c * kTileQ, acc, sizeof acc);
  }
}

template <typename T>
void additive_score_tile(const T* k_proj, int64_t k_row_stride, int cols, int adim,
                         const T* qp_packed, const T* w, T* s) {
  for (int c = 0; c < cols; ++c) {
    T acc[kTileQ] = {};
    const T* key = k_proj + c * k_row_stride;
    for (int a = 0; a < adim; ++a) {
      const T ka = key[a], wa = w[a];
      const T* lanes = qp_packed + a * kTileQ;
      for (int r = 0; r < kTileQ; ++r) acc[r] += wa * tanh_approx(lanes[r] + ka);
    }
    std::memcpy(s + c * kTileQ, acc, sizeof acc);
  }
}

template <typename T>
void score_epilogue(T* s, int cols, const T* col_scale, T softcap, T alibi_slope, int64_t i0,
                    int64_t j0) {
  for (int c = 0; c < cols; ++c) {
    T* lanes = s + c * kTileQ;
    if (col_scale != nullptr) {
      for (int r = 0; r < kTileQ; ++r) lanes[r] *= col_scale[c];
    }
    if (softcap > T(0)) {
      const T inv = T(1) / softcap;
      for (int r = 0; r < kTileQ; ++r) lanes[r] = softcap * tanh_approx(lanes[r] * inv);
    }
    if (alibi_slope != T(0)) {
      const int64_t offset = i0 - (j0 + c);  // i - j = offset + r
      for (int r = 0; r < kTileQ; ++r) {
        const T distance = static_cast<T>(offset + r);
        lanes[r] -= alibi_slope * (distance < T(0) ? -distance : distance);
      }
    }
  }
}

template <typename T>
void mask_tile(T* s, int cols, const uint64_t* row_bits) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int c = 0; c < cols; ++c) {
    T* lanes = s + c * kTileQ;
    for (int r = 0; r < kTileQ; ++r) lanes[r] = ((row_bits[r] >> c) & 1) ? lanes[r] : neg_inf;
  }
}

template <typename T>
void softmax_update(T* s, int cols, T* row_max, T* row_sum, T* corr) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T new_max[kTileQ], safe_max[kTileQ], sum[kTileQ] = {};
  for (int r = 0; r < kTileQ; ++r) new_max[r] = row_max[r];
  for (int c = 0; c < cols; ++c) {
    const T* lanes = s + c * kTileQ;
    for (int r = 0; r < kTileQ; ++r) new_max[r] = lanes[r] > new_max[r] ? lanes[r] : new_max[r];
  }
  // A lane with nothing allowed yet subtracts 0 instead of -inf: exp(-inf - 0) = 0, no NaN.
  for (int r = 0; r < kTileQ; ++r) safe_max[r] = new_max[r] == neg_inf ? T(0) : new_max[r];
  for (int c = 0; c < cols; ++c) {
    T* lanes = s + c * kTileQ;
    for (int r = 0; r < kTileQ; ++r) {
      const T p = exp_nonpositive(lanes[r] - safe_max[r]);
      lanes[r] = p;
      sum[r] += p;
    }
  }
  for (int r = 0; r < kTileQ; ++r) {
    corr[r] = exp_nonpositive(row_max[r] - safe_max[r]);
    row_sum[r] = row_sum[r] * corr[r] + sum[r];
    row_max[r] = new_max[r];
  }
}

template <typename T>
void accumulate_pv(const T* p, int cols, const T* v, int64_t v_row_stride, int dim_v,
                   const T* corr, T* acc) {
  for (int e = 0; e < dim_v; ++e) {
    T lanes_acc[kTileQ];
    T* out = acc + static_cast<int64_t>(e) * kTileQ;
    for (int r = 0; r < kTileQ; ++r) lanes_acc[r] = out[r] * corr[r];
    for (int c = 0; c < cols; ++c) {
      const T ve = v[c * v_row_stride + e];
      const T* probs = p + c * kTileQ;
      for (int r = 0; r < kTileQ; ++r) lanes_acc[r] += ve * probs[r];
    }
    std::memcpy(out, lanes_acc, sizeof lanes_acc);
  }
}

template <typename T>
MicroKernels<T> make_table() {
  return {&pack_q<T>,         &score_tile<T>,      &additive_score_tile<T>, &score_epilogue<T>,
          &mask_tile<T>,      &softmax_update<T>,  &accumulate_pv<T>};
}

}  // namespace portable
}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
