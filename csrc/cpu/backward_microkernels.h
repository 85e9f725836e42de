// The element-wise tile operations of the CPU backward pass, one table per instruction set and
// dtype, chosen once by dispatch.cpp like the forward's. The matrix products of the backward
// reuse the forward's table (score_tile, accumulate_pv, pack_q); this table holds the rest.
//
// Layout of a backward tile ("key lanes"): the keys of a tile run along the vector lanes, so a
// tile is t[r][c] for query row r and key c (kTileK lanes per row). Scores, probabilities, dP
// and dS are produced in that order, so dK and dV accumulate as dk_t[d][c], dv_t[e][c] and dQ
// as dq[r][d] (64-wide panels of d) without any transpose or horizontal reduction.
#pragma once

#include <cstdint>

#include "microkernels.h"

namespace sparse_attn::cpu {

template <typename T>
struct BackwardMicroKernels {
  // For r < rows and every lane c: t[r][c] = softcap * tanh(t[r][c] / softcap) (when
  // softcap > 0, keeping the tanh in softcap_tanh[r][c] for the gradient), then
  // t[r][c] -= alibi_slope * |(i0 + r) - (j0 + c)| (when alibi_slope != 0). The forward's
  // score_epilogue in key-lane order.
  void (*score_epilogue)(T* t, int rows, T softcap, T* softcap_tanh, T alibi_slope, int64_t i0,
                         int64_t j0);
  // t[r][c] = -inf where bit c of row_bits[r] is clear, for r < rows and every lane c.
  void (*mask_rows)(T* t, int rows, const uint64_t* row_bits);
  // t[r][c] = exp(t[r][c] - lse[r]) for r < rows: the forward's normalised probabilities.
  // A row whose lse is -inf (no allowed key) gets 0 everywhere, never NaN.
  void (*probs_from_lse)(T* t, int rows, const T* lse);
  // Dropout with the kept set as bits (bit c of keep[r]): p_kept = p * kept * keep_scale and
  // dp = dp * kept * keep_scale, for r < rows.
  void (*apply_dropout)(const T* p, T* p_kept, T* dp, int rows, const uint64_t* keep,
                        T keep_scale);
  // dp[r][c] = p[r][c] * (dp[r][c] - delta[r]) for r < rows: dP becomes dS in place.
  void (*grad_scores)(const T* p, T* dp, int rows, const T* delta);
  // ds[r][c] *= 1 - softcap_tanh[r][c]^2 for r < rows: dS through the softcap.
  void (*softcap_grad)(T* ds, int rows, const T* softcap_tanh);
  // acc[r][c] += t[r][c] for r < rows and every lane c.
  void (*add_rows)(T* acc, const T* t, int rows);
  // The additive score w . tanh(q_proj[r] + k_proj[c]) backwards, for r < rows: with
  // u = tanh(q_proj[r][a] + kp_packed[a][c]) and g = ds[r][c] * w[a] * (1 - u^2), adds g to
  // dkp_t[a][c], sum_c g to dqp[r * adim + a] and sum_c ds[r][c] * u to dw[a] (sums over every
  // lane c, in a fixed order); a null dqp, dkp_t or dw is skipped.
  void (*additive_grad)(const T* ds, int rows, const T* q_proj, int64_t q_proj_stride, int adim,
                        const T* kp_packed, const T* w, T* dqp, T* dkp_t, T* dw);
};

const BackwardMicroKernels<float>& backward_microkernels_f32();
const BackwardMicroKernels<double>& backward_microkernels_f64();

// One table per compiled level (defined in backward_microkernels_<level>.cpp).
namespace generic {
const BackwardMicroKernels<float>& backward_table_f32();
const BackwardMicroKernels<double>& backward_table_f64();
}  // namespace generic
namespace avx2 {
const BackwardMicroKernels<float>& backward_table_f32();
const BackwardMicroKernels<double>& backward_table_f64();
}  // namespace avx2

}  // namespace sparse_attn::cpu
