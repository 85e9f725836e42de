// The backward micro-kernels written once as plain loops along the key lanes, shaped for the
// vectoriser. Included by each backward_microkernels_<level>.cpp inside its own namespace and
// compiled with that level's flags; the AVX2 level replaces some float32 ones by intrinsics.
// No namespace-scope constants or statics: a static initialiser here could run AVX2 code.
#pragma once

#include <cstdint>
#include <limits>

#include "backward_microkernels.h"
#include "microkernels_impl.h"  // portable::exp_nonpositive and tanh_approx

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace portable {

template <typename T>
void score_epilogue(T* t, int rows, T softcap, T* softcap_tanh, T alibi_slope, int64_t i0,
                    int64_t j0) {
  for (int r = 0; r < rows; ++r) {
    T* row = t + r * kTileK;
    if (softcap > T(0)) {
      const T inv = T(1) / softcap;
      T* tanh_row = softcap_tanh + r * kTileK;
      for (int c = 0; c < kTileK; ++c) {
        tanh_row[c] = tanh_approx(row[c] * inv);
        row[c] = softcap * tanh_row[c];
      }
    }
    if (alibi_slope != T(0)) {
      const int64_t offset = i0 + r - j0;  // i - j = offset - c
      for (int c = 0; c < kTileK; ++c) {
        const T distance = static_cast<T>(offset - c);
        row[c] -= alibi_slope * (distance < T(0) ? -distance : distance);
      }
    }
  }
}

template <typename T>
void mask_rows(T* t, int rows, const uint64_t* row_bits) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int r = 0; r < rows; ++r) {
    const uint64_t bits = row_bits[r];
    T* row = t + r * kTileK;
    for (int c = 0; c < kTileK; ++c) row[c] = ((bits >> c) & 1) ? row[c] : neg_inf;
  }
}

template <typename T>
void probs_from_lse(T* t, int rows, const T* lse) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int r = 0; r < rows; ++r) {
    // An empty row (lse = -inf) subtracts +inf: every lane becomes exp(-inf) = 0, no NaN.
    const T shift = lse[r] == -inf ? inf : lse[r];
    T* row = t + r * kTileK;
    for (int c = 0; c < kTileK; ++c) row[c] = exp_nonpositive(row[c] - shift);
  }
}

template <typename T>
void apply_dropout(const T* p, T* p_kept, T* dp, int rows, const uint64_t* keep, T keep_scale) {
  for (int r = 0; r < rows; ++r) {
    const uint64_t bits = keep[r];
    const T* p_row = p + r * kTileK;
    T* kept_row = p_kept + r * kTileK;
    T* dp_row = dp + r * kTileK;
    for (int c = 0; c < kTileK; ++c) {
      const bool kept = (bits >> c) & 1;
      kept_row[c] = kept ? p_row[c] * keep_scale : T(0);
      dp_row[c] = kept ? dp_row[c] * keep_scale : T(0);
    }
  }
}

template <typename T>
void grad_scores(const T* p, T* dp, int rows, const T* delta) {
  for (int r = 0; r < rows; ++r) {
    const T d = delta[r];
    const T* p_row = p + r * kTileK;
    T* dp_row = dp + r * kTileK;
    for (int c = 0; c < kTileK; ++c) dp_row[c] = p_row[c] * (dp_row[c] - d);
  }
}

template <typename T>
void softcap_grad(T* ds, int rows, const T* softcap_tanh) {
  for (int r = 0; r < rows; ++r) {
    T* row = ds + r * kTileK;
    const T* tanh_row = softcap_tanh + r * kTileK;
    for (int c = 0; c < kTileK; ++c) row[c] *= T(1) - tanh_row[c] * tanh_row[c];
  }
}

template <typename T>
void transpose(const T* src, int rows, T* dst) {
  constexpr int kBlock = 8;  // 8 x 8 blocks keep both sides' lines in L1
  for (int r0 = 0; r0 < kTileQ; r0 += kBlock) {
    for (int c0 = 0; c0 < kTileK; c0 += kBlock) {
      for (int c = c0; c < c0 + kBlock; ++c) {
        for (int r = r0; r < r0 + kBlock; ++r) {
          dst[c * kTileQ + r] = r < rows ? src[r * kTileK + c] : T(0);
        }
      }
    }
  }
}

template <typename T>
BackwardMicroKernels<T> make_backward_table() {
  return {&score_epilogue<T>, &mask_rows<T>,    &probs_from_lse<T>, &apply_dropout<T>,
          &grad_scores<T>,    &softcap_grad<T>, &transpose<T>};
}

}  // namespace portable
}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
