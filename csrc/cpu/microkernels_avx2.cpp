// The AVX2 + FMA micro-kernels. Only this file is compiled with -mavx2 -mfma, and nothing in
// it runs unless dispatch.cpp found both features on the CPU. float32 uses the intrinsics
// below; float64 uses the portable loops compiled with these flags.
#define SA_SIMD_NAMESPACE avx2
#include <immintrin.h>

#include "microkernels_impl.h"
#include "simd_avx2.h"

namespace sparse_attn::cpu::avx2 {
namespace {

constexpr int kLanes = 8;     // floats per __m256
constexpr int kPanel = 16;    // query lanes per micro-tile: two vectors
constexpr int kMicroRows = 6; // rows per micro-tile: 6 x 2 accumulators + 2 loads + 1 broadcast

// c[i][0:16] (+)= sum_k a_i[k * a_col_stride] * b[k * kTileQ + 0:16] for i < R.
// With scale != null the old c is multiplied lane-wise by scale[0:16] first (accumulate mode).
template <int R>
inline void micro_tile(const float* a, int64_t a_row_stride, int64_t a_col_stride, int depth,
                       const float* b, float* c, const float* scale) {
  __m256 acc[R][2];
  if (scale != nullptr) {
    const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + kLanes);
    for (int i = 0; i < R; ++i) {
      acc[i][0] = _mm256_mul_ps(_mm256_loadu_ps(c + i * kTileQ), s0);
      acc[i][1] = _mm256_mul_ps(_mm256_loadu_ps(c + i * kTileQ + kLanes), s1);
    }
  } else {
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  }
  for (int k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kTileQ);
    const __m256 b1 = _mm256_loadu_ps(b + k * kTileQ + kLanes);
    const float* ak = a + k * a_col_stride;
    for (int i = 0; i < R; ++i) {
      const __m256 ai = _mm256_broadcast_ss(ak + i * a_row_stride);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_ps(c + i * kTileQ, acc[i][0]);
    _mm256_storeu_ps(c + i * kTileQ + kLanes, acc[i][1]);
  }
}

// C[rows][kTileQ] (+)= A[rows][depth] * B[depth][kTileQ], A strided, in 6 x 16 micro-tiles.
void lanes_gemm(const float* a, int64_t a_row_stride, int64_t a_col_stride, int rows, int depth,
                const float* b, float* c, const float* scale) {
  for (int n0 = 0; n0 < kTileQ; n0 += kPanel) {
    const float* panel_scale = scale != nullptr ? scale + n0 : nullptr;
    int i0 = 0;
    for (; i0 + kMicroRows <= rows; i0 += kMicroRows) {
      micro_tile<kMicroRows>(a + i0 * a_row_stride, a_row_stride, a_col_stride, depth, b + n0,
                             c + i0 * kTileQ + n0, panel_scale);
    }
    const float* ar = a + i0 * a_row_stride;
    float* cr = c + i0 * kTileQ + n0;
    switch (rows - i0) {
      case 5: micro_tile<5>(ar, a_row_stride, a_col_stride, depth, b + n0, cr, panel_scale); break;
      case 4: micro_tile<4>(ar, a_row_stride, a_col_stride, depth, b + n0, cr, panel_scale); break;
      case 3: micro_tile<3>(ar, a_row_stride, a_col_stride, depth, b + n0, cr, panel_scale); break;
      case 2: micro_tile<2>(ar, a_row_stride, a_col_stride, depth, b + n0, cr, panel_scale); break;
      case 1: micro_tile<1>(ar, a_row_stride, a_col_stride, depth, b + n0, cr, panel_scale); break;
      default: break;
    }
  }
}

void score_tile(const float* k, int64_t k_row_stride, int cols, int dim, const float* q_packed,
                float* s) {
  lanes_gemm(k, k_row_stride, 1, cols, dim, q_packed, s, nullptr);
}

void accumulate_pv(const float* p, int cols, const float* v, int64_t v_row_stride, int dim_v,
                   const float* corr, float* acc) {
  lanes_gemm(v, 1, v_row_stride, dim_v, cols, p, acc, corr);
}

void additive_score_tile(const float* k_proj, int64_t k_row_stride, int cols, int adim,
                         const float* qp_packed, const float* w, float* s) {
  for (int c = 0; c < cols; ++c) {
    const float* key = k_proj + c * k_row_stride;
    for (int g = 0; g < kTileQ; g += kLanes) {
      __m256 acc = _mm256_setzero_ps();
      for (int a = 0; a < adim; ++a) {
        const __m256 arg = _mm256_add_ps(_mm256_loadu_ps(qp_packed + a * kTileQ + g),
                                         _mm256_broadcast_ss(key + a));
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + a), tanh_approx(arg), acc);
      }
      _mm256_storeu_ps(s + c * kTileQ + g, acc);
    }
  }
}

void score_epilogue(float* s, int cols, const float* col_scale, float softcap, float alibi_slope,
                    int64_t i0, int64_t j0) {
  const __m256 lane_index = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int c = 0; c < cols; ++c) {
    float* lanes = s + c * kTileQ;
    const __m256 column_scale = _mm256_set1_ps(col_scale != nullptr ? col_scale[c] : 1.0f);
    const float offset = static_cast<float>(i0 - (j0 + c));  // i - j = offset + r
    for (int g = 0; g < kTileQ; g += kLanes) {
      __m256 x = _mm256_loadu_ps(lanes + g);
      if (col_scale != nullptr) x = _mm256_mul_ps(x, column_scale);
      if (softcap > 0.0f) {
        x = _mm256_mul_ps(_mm256_set1_ps(softcap),
                          tanh_approx(_mm256_mul_ps(x, _mm256_set1_ps(1.0f / softcap))));
      }
      if (alibi_slope != 0.0f) {
        const __m256 distance =
            _mm256_add_ps(_mm256_set1_ps(offset + static_cast<float>(g)), lane_index);
        x = _mm256_fnmadd_ps(_mm256_set1_ps(alibi_slope), _mm256_andnot_ps(sign_bit, distance), x);
      }
      _mm256_storeu_ps(lanes + g, x);
    }
  }
}

void mask_tile(float* s, int cols, const uint64_t* row_bits) {
  alignas(32) uint32_t low[kTileQ], high[kTileQ];
  for (int r = 0; r < kTileQ; ++r) {
    low[r] = static_cast<uint32_t>(row_bits[r]);
    high[r] = static_cast<uint32_t>(row_bits[r] >> 32);
  }
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  for (int c = 0; c < cols; ++c) {
    const uint32_t* half = c < 32 ? low : high;
    const __m128i to_sign = _mm_cvtsi32_si128(31 - (c & 31));  // bit c -> the sign bit
    float* lanes = s + c * kTileQ;
    for (int g = 0; g < kTileQ; g += kLanes) {
      const __m256i bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(half + g));
      const __m256 keep = _mm256_castsi256_ps(_mm256_sll_epi32(bits, to_sign));
      _mm256_storeu_ps(lanes + g, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(lanes + g), keep));
    }
  }
}

void softmax_update(float* s, int cols, float* row_max, float* row_sum, float* corr) {
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  for (int g = 0; g < kTileQ; g += kLanes) {
    const __m256 old_max = _mm256_loadu_ps(row_max + g);
    __m256 new_max = old_max;
    for (int c = 0; c < cols; ++c) new_max = _mm256_max_ps(_mm256_loadu_ps(s + c * kTileQ + g), new_max);
    // A lane with nothing allowed yet subtracts 0 instead of -inf: exp(-inf - 0) = 0, no NaN.
    const __m256 safe_max =
        _mm256_blendv_ps(new_max, _mm256_setzero_ps(), _mm256_cmp_ps(new_max, neg_inf, _CMP_EQ_OQ));
    __m256 sum = _mm256_setzero_ps();
    for (int c = 0; c < cols; ++c) {
      float* lanes = s + c * kTileQ + g;
      const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(lanes), safe_max));
      _mm256_storeu_ps(lanes, p);
      sum = _mm256_add_ps(sum, p);
    }
    const __m256 rescale = exp_nonpositive(_mm256_sub_ps(old_max, safe_max));
    _mm256_storeu_ps(corr + g, rescale);
    _mm256_storeu_ps(row_sum + g, _mm256_fmadd_ps(_mm256_loadu_ps(row_sum + g), rescale, sum));
    _mm256_storeu_ps(row_max + g, new_max);
  }
}

MicroKernels<float> make_table_f32() {
  return {&portable::pack_q<float>, &score_tile,     &additive_score_tile, &score_epilogue,
          &mask_tile,                &softmax_update, &accumulate_pv};
}

}  // namespace

const MicroKernels<float>& table_f32() {
  static const MicroKernels<float> table = make_table_f32();
  return table;
}

const MicroKernels<double>& table_f64() {
  static const MicroKernels<double> table = portable::make_table<double>();
  return table;
}

}  // namespace sparse_attn::cpu::avx2
