// The backward micro-kernels written once as plain loops along the key lanes, shaped for the
// vectoriser. Included by each backward_microkernels_<level>.cpp inside its own namespace and
// compiled with that level's flags; the AVX2 level replaces some float32 ones by intrinsics.
// No namespace-scope constants or statics: a static initialiser here could run AVX2 code.
#pragma once

#include <cstdint>
#include <limits>

#include "backward_microkernels.h"
#include "microkernels_impl.h"  // portable::exp_nonpositive, the forward's exp

namespace sparse_attn::cpu::SA_SIMD_NAMESPACE {
namespace portable {

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
  return {&mask_rows<T>, &probs_from_lse<T>, &apply_dropout<T>, &grad_scores<T>, &transpose<T>};
}

}  // namespace portable
}  // namespace sparse_attn::cpu::SA_SIMD_NAMESPACE
