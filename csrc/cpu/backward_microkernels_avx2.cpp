// The AVX2 + FMA backward micro-kernels. Only this file of the backward is compiled with -mavx2
// -mfma, and nothing in it runs unless dispatch.cpp found both features on the CPU. float32
// uses the intrinsics below (exp and tanh from simd_avx2.h, as the forward); the rest, and all
// of float64, are the portable loops compiled with these flags.
#define SA_SIMD_NAMESPACE avx2
#include <immintrin.h>

#include "backward_microkernels_impl.h"
#include "simd_avx2.h"

namespace sparse_attn::cpu::avx2 {
namespace {

constexpr int kLanes = 8;  // floats per __m256

// The forward's score_epilogue along key lanes: the same operations in the same order.
void score_epilogue(float* t, int rows, float softcap, float* softcap_tanh, float alibi_slope,
                    int64_t i0, int64_t j0) {
  const __m256 lane_index = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int r = 0; r < rows; ++r) {
    float* row = t + r * kTileK;
    const float offset = static_cast<float>(i0 + r - j0);  // i - j = offset - c
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      __m256 x = _mm256_loadu_ps(row + c0);
      if (softcap > 0.0f) {
        const __m256 th = tanh_approx(_mm256_mul_ps(x, _mm256_set1_ps(1.0f / softcap)));
        _mm256_storeu_ps(softcap_tanh + r * kTileK + c0, th);
        x = _mm256_mul_ps(_mm256_set1_ps(softcap), th);
      }
      if (alibi_slope != 0.0f) {
        const __m256 distance =
            _mm256_sub_ps(_mm256_set1_ps(offset - static_cast<float>(c0)), lane_index);
        x = _mm256_fnmadd_ps(_mm256_set1_ps(alibi_slope), _mm256_andnot_ps(sign_bit, distance), x);
      }
      _mm256_storeu_ps(row + c0, x);
    }
  }
}

void probs_from_lse(float* t, int rows, const float* lse) {
  for (int r = 0; r < rows; ++r) {
    // An empty row (lse = -inf) subtracts +inf: every lane becomes exp(-inf) = 0, no NaN.
    const __m256 shift = _mm256_set1_ps(lse[r] == -INFINITY ? INFINITY : lse[r]);
    float* row = t + r * kTileK;
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      _mm256_storeu_ps(row + c0, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + c0), shift)));
    }
  }
}

void grad_scores(const float* p, float* dp, int rows, const float* delta) {
  for (int r = 0; r < rows; ++r) {
    const __m256 d = _mm256_set1_ps(delta[r]);
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      float* at = dp + r * kTileK + c0;
      _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(p + r * kTileK + c0),
                                         _mm256_sub_ps(_mm256_loadu_ps(at), d)));
    }
  }
}

void softcap_grad(float* ds, int rows, const float* softcap_tanh) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int r = 0; r < rows; ++r) {
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      float* at = ds + r * kTileK + c0;
      const __m256 th = _mm256_loadu_ps(softcap_tanh + r * kTileK + c0);
      _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), _mm256_fnmadd_ps(th, th, one)));
    }
  }
}

// t[r][c] = -inf where bit c of row_bits[r] is clear: each lane shifts its bit to the sign bit.
void mask_rows(float* t, int rows, const uint64_t* row_bits) {
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  const __m256i first_group = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  for (int r = 0; r < rows; ++r) {
    const uint64_t bits = row_bits[r];
    float* row = t + r * kTileK;
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      const uint32_t half = static_cast<uint32_t>(c0 < 32 ? bits : bits >> 32);
      const __m256i to_sign = _mm256_sub_epi32(first_group, _mm256_set1_epi32(c0 & 31));
      const __m256 keep = _mm256_castsi256_ps(
          _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int32_t>(half)), to_sign));
      _mm256_storeu_ps(row + c0, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(row + c0), keep));
    }
  }
}

// The 8 x 8 block at src (row stride kTileK), rows >= valid read as zero, stored transposed at
// dst (row stride kTileQ).
inline void transpose_block(const float* src, int valid, float* dst) {
  __m256 row[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    row[i] = i < valid ? _mm256_loadu_ps(src + i * kTileK) : _mm256_setzero_ps();
  }
  const __m256 t0 = _mm256_unpacklo_ps(row[0], row[1]), t1 = _mm256_unpackhi_ps(row[0], row[1]);
  const __m256 t2 = _mm256_unpacklo_ps(row[2], row[3]), t3 = _mm256_unpackhi_ps(row[2], row[3]);
  const __m256 t4 = _mm256_unpacklo_ps(row[4], row[5]), t5 = _mm256_unpackhi_ps(row[4], row[5]);
  const __m256 t6 = _mm256_unpacklo_ps(row[6], row[7]), t7 = _mm256_unpackhi_ps(row[6], row[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * kTileQ, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * kTileQ, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * kTileQ, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * kTileQ, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * kTileQ, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * kTileQ, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * kTileQ, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * kTileQ, _mm256_permute2f128_ps(u3, u7, 0x31));
}

void transpose(const float* src, int rows, float* dst) {
  for (int r0 = 0; r0 < kTileQ; r0 += kLanes) {
    const int valid = rows - r0 < 0 ? 0 : rows - r0;
    for (int c0 = 0; c0 < kTileK; c0 += kLanes) {
      transpose_block(src + r0 * kTileK + c0, valid, dst + c0 * kTileQ + r0);
    }
  }
}

BackwardMicroKernels<float> make_backward_table_f32() {
  BackwardMicroKernels<float> table = portable::make_backward_table<float>();
  table.score_epilogue = &score_epilogue;
  table.mask_rows = &mask_rows;
  table.probs_from_lse = &probs_from_lse;
  table.grad_scores = &grad_scores;
  table.softcap_grad = &softcap_grad;
  table.transpose = &transpose;
  return table;
}

}  // namespace

const BackwardMicroKernels<float>& backward_table_f32() {
  static const BackwardMicroKernels<float> table = make_backward_table_f32();
  return table;
}

const BackwardMicroKernels<double>& backward_table_f64() {
  static const BackwardMicroKernels<double> table = portable::make_backward_table<double>();
  return table;
}

}  // namespace sparse_attn::cpu::avx2
