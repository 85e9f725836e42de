// The micro-kernels, written once: float32 against the vector type of simd.h, float64 as plain
// loops (the simpler path). Included by each microkernels_<level>.cpp, which sets
// SA_SIMD_NAMESPACE and SA_VEC_BYTES and is compiled with that level's flags. Tiles are in
// "query lanes" order (see microkernels.h): the queries of a tile run along the vector lanes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "microkernels.h"
#include "simd.h"

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace {

// ---- float32: vector code ------------------------------------------------------------------

constexpr int kPanel = 2 * kVecWidth;  // query lanes per micro-tile: two vectors
// Rows per micro-tile: 6 x 2 accumulators fit 16 vector registers with the two B vectors and
// a broadcast.
constexpr int kMicroRows = 6;

// c[i][0:16] = sum_k a_i[k * a_col_stride] * b[k * kTileQ + 0:16] for i < R; in accumulate mode
// the old c, multiplied lane-wise by scale[0:16], is added. depth >= 1: with a loop that may
// run zero times, or a run-time branch choosing the accumulators' start, gcc kept them in
// memory and the FMA rate halved.
template <int R, bool kAccumulate>
inline void micro_tile(const float* a, int64_t a_row_stride, int64_t a_col_stride, int depth,
                       const float* b, float* c, const float* scale) {
  vfloat acc[R][2];
  if constexpr (kAccumulate) {
    const vfloat s0 = load(scale), s1 = load(scale + kVecWidth);
    for (int i = 0; i < R; ++i) {
      acc[i][0] = load(c + i * kTileQ) * s0;
      acc[i][1] = load(c + i * kTileQ + kVecWidth) * s1;
    }
  } else {
    for (int i = 0; i < R; ++i) {
      acc[i][0] = vfloat{};
      acc[i][1] = vfloat{};
    }
  }
  int k = 0;
  do {
    const vfloat b0 = load(b + k * kTileQ), b1 = load(b + k * kTileQ + kVecWidth);
    const float* ak = a + k * a_col_stride;
    for (int i = 0; i < R; ++i) {
      const vfloat ai = splat(ak[i * a_row_stride]);
      acc[i][0] = fmadd(ai, b0, acc[i][0]);
      acc[i][1] = fmadd(ai, b1, acc[i][1]);
    }
  } while (++k < depth);
  for (int i = 0; i < R; ++i) {
    store(c + i * kTileQ, acc[i][0]);
    store(c + i * kTileQ + kVecWidth, acc[i][1]);
  }
}

template <int R, bool kAccumulate>
void micro_rows(const float* a, int64_t a_row_stride, int64_t a_col_stride, int rows, int depth,
                const float* b, float* c, const float* scale) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_tile<R, kAccumulate>(a, a_row_stride, a_col_stride, depth, b, c, scale);
    } else {
      micro_rows<R - 1, kAccumulate>(a, a_row_stride, a_col_stride, rows, depth, b, c, scale);
    }
  }
}

// C[rows][kTileQ] (+)= A[rows][depth] * B[depth][kTileQ], A strided, in micro-tiles of
// kMicroRows x 16; depth >= 1 (callers: the head dim, or a tile's key count).
template <bool kAccumulate>
void lanes_gemm(const float* a, int64_t a_row_stride, int64_t a_col_stride, int rows, int depth,
                const float* b, float* c, const float* scale) {
  for (int n0 = 0; n0 < kTileQ; n0 += kPanel) {
    const float* panel_scale = kAccumulate ? scale + n0 : nullptr;
    int i0 = 0;
    for (; i0 + kMicroRows <= rows; i0 += kMicroRows) {
      micro_tile<kMicroRows, kAccumulate>(a + i0 * a_row_stride, a_row_stride, a_col_stride,
                                          depth, b + n0, c + i0 * kTileQ + n0, panel_scale);
    }
    if (i0 < rows) {
      micro_rows<kMicroRows - 1, kAccumulate>(a + i0 * a_row_stride, a_row_stride, a_col_stride,
                                              rows - i0, depth, b + n0, c + i0 * kTileQ + n0,
                                              panel_scale);
    }
  }
}

void pack_q_f32(const float* q, int64_t q_row_stride, int rows, int dim, const float* row_scale,
                float* q_packed) {
  for (int r = 0; r < rows; ++r) {
    const float* query = q + r * q_row_stride;
    for (int d = 0; d < dim; ++d) q_packed[d * kTileQ + r] = row_scale[r] * query[d];
  }
  for (int d = 0; d < dim; ++d) {
    for (int r = rows; r < kTileQ; ++r) q_packed[d * kTileQ + r] = 0.0f;
  }
}

void score_tile_f32(const float* k, int64_t k_row_stride, int cols, int dim,
                    const float* q_packed, float* s) {
  lanes_gemm<false>(k, k_row_stride, 1, cols, dim, q_packed, s, nullptr);
}

void accumulate_pv_f32(const float* p, int cols, const float* v, int64_t v_row_stride, int dim_v,
                       const float* corr, float* acc) {
  lanes_gemm<true>(v, 1, v_row_stride, dim_v, cols, p, acc, corr);
}

void additive_score_tile_f32(const float* k_proj, int64_t k_row_stride, int cols, int adim,
                             const float* qp_packed, const float* w, float* s) {
  for (int c = 0; c < cols; ++c) {
    const float* key = k_proj + c * k_row_stride;
    for (int g = 0; g < kTileQ; g += kVecWidth) {
      vfloat acc{};
      for (int a = 0; a < adim; ++a) {
        acc = fmadd(splat(w[a]), tanh_approx(load(qp_packed + a * kTileQ + g) + splat(key[a])), acc);
      }
      store(s + c * kTileQ + g, acc);
    }
  }
}

void score_epilogue_f32(float* s, int cols, const float* col_scale, float softcap,
                        float alibi_slope, int64_t i0, int64_t j0) {
  vfloat lane_index;
  for (int l = 0; l < kVecWidth; ++l) lane_index[l] = static_cast<float>(l);
  for (int c = 0; c < cols; ++c) {
    float* lanes = s + c * kTileQ;
    const float column_scale = col_scale != nullptr ? col_scale[c] : 1.0f;
    const float offset = static_cast<float>(i0 - (j0 + c));  // i - j = offset + r
    for (int g = 0; g < kTileQ; g += kVecWidth) {
      vfloat x = load(lanes + g);
      if (col_scale != nullptr) x = x * splat(column_scale);
      if (softcap > 0.0f) x = splat(softcap) * tanh_approx(x * splat(1.0f / softcap));
      if (alibi_slope != 0.0f) {
        x = x - splat(alibi_slope) * vabs(lane_index + splat(offset + static_cast<float>(g)));
      }
      store(lanes + g, x);
    }
  }
}

void mask_tile_f32(float* s, int cols, const uint64_t* row_bits) {
  uint32_t halves[2][kTileQ];  // bits of columns 0-31 and 32-63, one word per query lane
  for (int r = 0; r < kTileQ; ++r) {
    halves[0][r] = static_cast<uint32_t>(row_bits[r]);
    halves[1][r] = static_cast<uint32_t>(row_bits[r] >> 32);
  }
  const vfloat neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < cols; ++c) {
    const uint32_t* half = halves[c >> 5];
    const uint32_t shift = static_cast<uint32_t>(c & 31);
    float* lanes = s + c * kTileQ;
    for (int g = 0; g < kTileQ; g += kVecWidth) {
      const vuint bit = (load_u32(half + g) >> shift) & 1u;
      store(lanes + g, bit != vuint{} ? load(lanes + g) : neg_inf);
    }
  }
}

void softmax_update_f32(float* s, int cols, float* row_max, float* row_sum, float* corr) {
  const vfloat neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int g = 0; g < kTileQ; g += kVecWidth) {
    const vfloat old_max = load(row_max + g);
    vfloat new_max = old_max;
    for (int c = 0; c < cols; ++c) new_max = vmax(load(s + c * kTileQ + g), new_max);
    // A lane with nothing allowed yet subtracts 0 instead of -inf: exp(-inf - 0) = 0, no NaN.
    const vfloat safe_max = new_max == neg_inf ? vfloat{} : new_max;
    vfloat sum{};
    for (int c = 0; c < cols; ++c) {
      float* lanes = s + c * kTileQ + g;
      const vfloat p = exp_nonpositive(load(lanes) - safe_max);
      store(lanes, p);
      sum = sum + p;
    }
    const vfloat rescale = exp_nonpositive(old_max - safe_max);
    store(corr + g, rescale);
    store(row_sum + g, fmadd(load(row_sum + g), rescale, sum));
    store(row_max + g, new_max);
  }
}

MicroKernels<float> make_table_f32() {
  return {&pack_q_f32,         &score_tile_f32,     &additive_score_tile_f32, &score_epilogue_f32,
          &mask_tile_f32,      &softmax_update_f32, &accumulate_pv_f32};
}

// ---- float64: plain loops -------------------------------------------------------------------

inline double tanh_f64(double x) { return std::tanh(x); }

void pack_q_f64(const double* q, int64_t q_row_stride, int rows, int dim,
                const double* row_scale, double* q_packed) {
  for (int r = 0; r < rows; ++r) {
    const double* query = q + r * q_row_stride;
    for (int d = 0; d < dim; ++d) q_packed[d * kTileQ + r] = row_scale[r] * query[d];
  }
  for (int d = 0; d < dim; ++d) {
    for (int r = rows; r < kTileQ; ++r) q_packed[d * kTileQ + r] = 0.0;
  }
}

void score_tile_f64(const double* k, int64_t k_row_stride, int cols, int dim,
                    const double* q_packed, double* s) {
  for (int c = 0; c < cols; ++c) {
    double acc[kTileQ] = {};
    const double* key = k + c * k_row_stride;
    for (int d = 0; d < dim; ++d) {
      const double kd = key[d];
      const double* lanes = q_packed + d * kTileQ;
      for (int r = 0; r < kTileQ; ++r) acc[r] += kd * lanes[r];
    }
    std::memcpy(s + c * kTileQ, acc, sizeof acc);
  }
}

void additive_score_tile_f64(const double* k_proj, int64_t k_row_stride, int cols, int adim,
                             const double* qp_packed, const double* w, double* s) {
  for (int c = 0; c < cols; ++c) {
    double acc[kTileQ] = {};
    const double* key = k_proj + c * k_row_stride;
    for (int a = 0; a < adim; ++a) {
      const double* lanes = qp_packed + a * kTileQ;
      for (int r = 0; r < kTileQ; ++r) acc[r] += w[a] * tanh_f64(lanes[r] + key[a]);
    }
    std::memcpy(s + c * kTileQ, acc, sizeof acc);
  }
}

void score_epilogue_f64(double* s, int cols, const double* col_scale, double softcap,
                        double alibi_slope, int64_t i0, int64_t j0) {
  for (int c = 0; c < cols; ++c) {
    double* lanes = s + c * kTileQ;
    const int64_t offset = i0 - (j0 + c);  // i - j = offset + r
    for (int r = 0; r < kTileQ; ++r) {
      double x = lanes[r];
      if (col_scale != nullptr) x *= col_scale[c];
      if (softcap > 0.0) x = softcap * tanh_f64(x / softcap);
      if (alibi_slope != 0.0) x -= alibi_slope * std::fabs(static_cast<double>(offset + r));
      lanes[r] = x;
    }
  }
}

void mask_tile_f64(double* s, int cols, const uint64_t* row_bits) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int c = 0; c < cols; ++c) {
    double* lanes = s + c * kTileQ;
    for (int r = 0; r < kTileQ; ++r) {
      if (!((row_bits[r] >> c) & 1)) lanes[r] = neg_inf;
    }
  }
}

void softmax_update_f64(double* s, int cols, double* row_max, double* row_sum, double* corr) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < kTileQ; ++r) {
    double new_max = row_max[r];
    for (int c = 0; c < cols; ++c) new_max = s[c * kTileQ + r] > new_max ? s[c * kTileQ + r] : new_max;
    // A lane with nothing allowed yet subtracts 0 instead of -inf: exp(-inf - 0) = 0, no NaN.
    const double safe_max = new_max == neg_inf ? 0.0 : new_max;
    double sum = 0.0;
    for (int c = 0; c < cols; ++c) {
      const double p = std::exp(s[c * kTileQ + r] - safe_max);
      s[c * kTileQ + r] = p;
      sum += p;
    }
    corr[r] = std::exp(row_max[r] - safe_max);
    row_sum[r] = row_sum[r] * corr[r] + sum;
    row_max[r] = new_max;
  }
}

void accumulate_pv_f64(const double* p, int cols, const double* v, int64_t v_row_stride,
                       int dim_v, const double* corr, double* acc) {
  for (int e = 0; e < dim_v; ++e) {
    double lanes_acc[kTileQ];
    double* out = acc + static_cast<int64_t>(e) * kTileQ;
    for (int r = 0; r < kTileQ; ++r) lanes_acc[r] = out[r] * corr[r];
    for (int c = 0; c < cols; ++c) {
      const double ve = v[c * v_row_stride + e];
      const double* probs = p + c * kTileQ;
      for (int r = 0; r < kTileQ; ++r) lanes_acc[r] += ve * probs[r];
    }
    std::memcpy(out, lanes_acc, sizeof lanes_acc);
  }
}

MicroKernels<double> make_table_f64() {
  return {&pack_q_f64,         &score_tile_f64,     &additive_score_tile_f64, &score_epilogue_f64,
          &mask_tile_f64,      &softmax_update_f64, &accumulate_pv_f64};
}

}  // namespace

const MicroKernels<float>& table_f32() {
  static const MicroKernels<float> table = make_table_f32();
  return table;
}

const MicroKernels<double>& table_f64() {
  static const MicroKernels<double> table = make_table_f64();
  return table;
}

}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
