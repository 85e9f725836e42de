// The backward micro-kernels, written once: float32 against the vector type of simd.h, float64
// as plain loops, like the forward's (microkernels_impl.h). Included by each
// backward_microkernels_<level>.cpp, which sets SA_SIMD_NAMESPACE and SA_VEC_BYTES and is
// compiled with that level's flags. Tiles are in "key lanes" order (backward_microkernels.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "backward_microkernels.h"
#include "simd.h"

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace {

static_assert(kTileK % kVecWidth == 0 && kTileK == 64, "a key tile is 64 lanes");

// ---- float32: vector code ------------------------------------------------------------------

// 1 in the lanes of keys c0 .. c0 + kVecWidth - 1 whose bit is set in bits (c0 % kVecWidth == 0).
inline vuint key_bits(uint64_t bits, int c0) {
  vuint shift;
  for (int l = 0; l < kVecWidth; ++l) shift[l] = static_cast<uint32_t>((c0 & 31) + l);
  const uint32_t half = static_cast<uint32_t>(c0 < 32 ? bits : bits >> 32);
  return ((vuint{} + half) >> shift) & 1u;
}

void score_epilogue_f32(float* t, int rows, float softcap, float* softcap_tanh,
                        float alibi_slope, int64_t i0, int64_t j0) {
  vfloat lane_index;
  for (int l = 0; l < kVecWidth; ++l) lane_index[l] = static_cast<float>(l);
  for (int r = 0; r < rows; ++r) {
    float* row = t + r * kTileK;
    const float offset = static_cast<float>(i0 + r - j0);  // i - j = offset - c
    for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
      vfloat x = load(row + c0);
      if (softcap > 0.0f) {
        const vfloat th = tanh_approx(x * splat(1.0f / softcap));
        store(softcap_tanh + r * kTileK + c0, th);
        x = splat(softcap) * th;
      }
      if (alibi_slope != 0.0f) {
        x = x - splat(alibi_slope) * vabs(splat(offset - static_cast<float>(c0)) - lane_index);
      }
      store(row + c0, x);
    }
  }
}

void mask_rows_f32(float* t, int rows, const uint64_t* row_bits) {
  const vfloat neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < rows; ++r) {
    float* row = t + r * kTileK;
    for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
      store(row + c0, key_bits(row_bits[r], c0) != vuint{} ? load(row + c0) : neg_inf);
    }
  }
}

void probs_from_lse_f32(float* t, int rows, const float* lse) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    // An empty row (lse = -inf) subtracts +inf: every lane becomes exp(-inf) = 0, no NaN.
    const vfloat shift = splat(lse[r] == -inf ? inf : lse[r]);
    float* row = t + r * kTileK;
    for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
      store(row + c0, exp_nonpositive(load(row + c0) - shift));
    }
  }
}

void apply_dropout_f32(const float* p, float* p_kept, float* dp, int rows, const uint64_t* keep,
                       float keep_scale) {
  for (int r = 0; r < rows; ++r) {
    for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
      const int at = r * kTileK + c0;
      const auto kept = key_bits(keep[r], c0) != vuint{};
      store(p_kept + at, kept ? load(p + at) * splat(keep_scale) : vfloat{});
      store(dp + at, kept ? load(dp + at) * splat(keep_scale) : vfloat{});
    }
  }
}

void grad_scores_f32(const float* p, float* dp, int rows, const float* delta) {
  for (int r = 0; r < rows; ++r) {
    const vfloat d = splat(delta[r]);
    for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
      const int at = r * kTileK + c0;
      store(dp + at, load(p + at) * (load(dp + at) - d));
    }
  }
}

void softcap_grad_f32(float* ds, int rows, const float* softcap_tanh) {
  for (int at = 0; at < rows * kTileK; at += kVecWidth) {
    const vfloat th = load(softcap_tanh + at);
    store(ds + at, load(ds + at) * (splat(1.0f) - th * th));
  }
}

void add_rows_f32(float* acc, const float* t, int rows) {
  for (int at = 0; at < rows * kTileK; at += kVecWidth) store(acc + at, load(acc + at) + load(t + at));
}

inline float sum_lanes(vfloat x) {
  float sum = 0.0f;
  for (int l = 0; l < kVecWidth; ++l) sum += x[l];
  return sum;
}

void additive_grad_f32(const float* ds, int rows, const float* q_proj, int64_t q_proj_stride,
                       int adim, const float* kp_packed, const float* w, float* dqp, float* dkp_t,
                       float* dw) {
  for (int r = 0; r < rows; ++r) {
    const float* ds_row = ds + r * kTileK;
    for (int a = 0; a < adim; ++a) {
      const vfloat qa = splat(q_proj[r * q_proj_stride + a]), wa = splat(w[a]);
      vfloat g_sum{}, u_sum{};
      for (int c0 = 0; c0 < kTileK; c0 += kVecWidth) {
        const vfloat u = tanh_approx(qa + load(kp_packed + a * kTileK + c0));
        const vfloat d = load(ds_row + c0);
        const vfloat g = d * wa * (splat(1.0f) - u * u);
        if (dkp_t != nullptr) store(dkp_t + a * kTileK + c0, load(dkp_t + a * kTileK + c0) + g);
        g_sum = g_sum + g;
        u_sum = fmadd(d, u, u_sum);
      }
      if (dqp != nullptr) dqp[r * adim + a] += sum_lanes(g_sum);
      if (dw != nullptr) dw[a] += sum_lanes(u_sum);
    }
  }
}

BackwardMicroKernels<float> make_backward_table_f32() {
  return {&score_epilogue_f32, &mask_rows_f32,    &probs_from_lse_f32, &apply_dropout_f32,
          &grad_scores_f32,    &softcap_grad_f32, &add_rows_f32,       &additive_grad_f32};
}

// ---- float64: plain loops -------------------------------------------------------------------

void score_epilogue_f64(double* t, int rows, double softcap, double* softcap_tanh,
                        double alibi_slope, int64_t i0, int64_t j0) {
  for (int r = 0; r < rows; ++r) {
    double* row = t + r * kTileK;
    const int64_t offset = i0 + r - j0;  // i - j = offset - c
    for (int c = 0; c < kTileK; ++c) {
      double x = row[c];
      if (softcap > 0.0) {
        softcap_tanh[r * kTileK + c] = std::tanh(x / softcap);
        x = softcap * softcap_tanh[r * kTileK + c];
      }
      if (alibi_slope != 0.0) x -= alibi_slope * std::fabs(static_cast<double>(offset - c));
      row[c] = x;
    }
  }
}

void mask_rows_f64(double* t, int rows, const uint64_t* row_bits) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < kTileK; ++c) {
      if (!((row_bits[r] >> c) & 1)) t[r * kTileK + c] = neg_inf;
    }
  }
}

void probs_from_lse_f64(double* t, int rows, const double* lse) {
  for (int r = 0; r < rows; ++r) {
    const bool empty = lse[r] == -std::numeric_limits<double>::infinity();
    for (int c = 0; c < kTileK; ++c) {
      double& x = t[r * kTileK + c];
      x = empty ? 0.0 : std::exp(x - lse[r]);
    }
  }
}

void apply_dropout_f64(const double* p, double* p_kept, double* dp, int rows,
                       const uint64_t* keep, double keep_scale) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < kTileK; ++c) {
      const int at = r * kTileK + c;
      const bool kept = (keep[r] >> c) & 1;
      p_kept[at] = kept ? p[at] * keep_scale : 0.0;
      dp[at] = kept ? dp[at] * keep_scale : 0.0;
    }
  }
}

void grad_scores_f64(const double* p, double* dp, int rows, const double* delta) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < kTileK; ++c) dp[r * kTileK + c] = p[r * kTileK + c] * (dp[r * kTileK + c] - delta[r]);
  }
}

void softcap_grad_f64(double* ds, int rows, const double* softcap_tanh) {
  for (int at = 0; at < rows * kTileK; ++at) ds[at] *= 1.0 - softcap_tanh[at] * softcap_tanh[at];
}

void add_rows_f64(double* acc, const double* t, int rows) {
  for (int at = 0; at < rows * kTileK; ++at) acc[at] += t[at];
}

void additive_grad_f64(const double* ds, int rows, const double* q_proj, int64_t q_proj_stride,
                       int adim, const double* kp_packed, const double* w, double* dqp,
                       double* dkp_t, double* dw) {
  for (int r = 0; r < rows; ++r) {
    for (int a = 0; a < adim; ++a) {
      double g_sum = 0.0, u_sum = 0.0;
      for (int c = 0; c < kTileK; ++c) {
        const double u = std::tanh(q_proj[r * q_proj_stride + a] + kp_packed[a * kTileK + c]);
        const double d = ds[r * kTileK + c];
        const double g = d * w[a] * (1.0 - u * u);
        if (dkp_t != nullptr) dkp_t[a * kTileK + c] += g;
        g_sum += g;
        u_sum += d * u;
      }
      if (dqp != nullptr) dqp[r * adim + a] += g_sum;
      if (dw != nullptr) dw[a] += u_sum;
    }
  }
}

BackwardMicroKernels<double> make_backward_table_f64() {
  return {&score_epilogue_f64, &mask_rows_f64,    &probs_from_lse_f64, &apply_dropout_f64,
          &grad_scores_f64,    &softcap_grad_f64, &add_rows_f64,       &additive_grad_f64};
}

}  // namespace

const BackwardMicroKernels<float>& backward_table_f32() {
  static const BackwardMicroKernels<float> table = make_backward_table_f32();
  return table;
}

const BackwardMicroKernels<double>& backward_table_f64() {
  static const BackwardMicroKernels<double> table = make_backward_table_f64();
  return table;
}

}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
