// The tile operations of the CPU forward pass, one table per instruction set and dtype.
// The forward loop (forward.cpp) calls them through this table, chosen once by dispatch.cpp;
// they see only plain pointers and sizes.
//
// Layout of a tile step ("query lanes"): the queries of a tile run along the vector lanes.
// Q is packed once per query tile as q_packed[d][r] (scaled); scores are produced transposed,
// s[c][r] for key c and query r, so the online softmax is vertical (no horizontal reductions)
// and the accumulator is acc[e][r]. K and V are read in place, never packed.
#pragma once

#include <cstdint>

namespace sparse_attn::cpu {

constexpr int kTileQ = 64;  // queries per tile (vector lanes); 64 x 64 fp32 scores = 16 KB
constexpr int kTileK = 64;  // keys per tile: one uint64_t of mask bits per query row

template <typename T>
struct MicroKernels {
  // q_packed[d * kTileQ + r] = row_scale[r] * q[r][d] for r < rows; zero for r >= rows.
  void (*pack_q)(const T* q, int64_t q_row_stride, int rows, int dim, const T* row_scale,
                 T* q_packed);
  // s[c * kTileQ + r] = sum_d k[c][d] * q_packed[d][r] for c < cols and every lane r.
  void (*score_tile)(const T* k, int64_t k_row_stride, int cols, int dim, const T* q_packed,
                     T* s);
  // Additive score: s[c][r] = sum_a w[a] * tanh(qp_packed[a][r] + k_proj[c][a]).
  void (*additive_score_tile)(const T* k_proj, int64_t k_row_stride, int cols, int adim,
                              const T* qp_packed, const T* w, T* s);
  // s[c][r] = softcap(s[c][r] * col_scale[c]) - alibi_slope * |(i0 + r) - (j0 + c)|, where
  // col_scale may be null (1), softcap <= 0 means none, alibi_slope == 0 means none.
  void (*score_epilogue)(T* s, int cols, const T* col_scale, T softcap, T alibi_slope,
                         int64_t i0, int64_t j0);
  // s[c][r] = -inf where bit c of row_bits[r] is clear (c < cols, every lane r).
  void (*mask_tile)(T* s, int cols, const uint64_t* row_bits);
  // Online softmax down the columns c < cols of every lane r: s becomes exp(s - new_max),
  // row_sum = row_sum * corr + sum, row_max = new_max, corr = exp(old_max - new_max).
  // A lane whose max stays -inf keeps p = 0 (and corr = 0: its accumulator is still zero).
  void (*softmax_update)(T* s, int cols, T* row_max, T* row_sum, T* corr);
  // acc[e][r] = acc[e][r] * corr[r] + sum_{c < cols} v[c][e] * p[c][r], for e < dim_v.
  void (*accumulate_pv)(const T* p, int cols, const T* v, int64_t v_row_stride, int dim_v,
                        const T* corr, T* acc);
};

enum class SimdLevel : int { Generic = 0, Avx2 = 1 };

// The level chosen at first use: AVX2 + FMA when the CPU has both, unless the environment
// variable SPARSE_ATTN_SIMD=generic forces the portable path.
SimdLevel active_simd_level();
const char* simd_level_name(SimdLevel level);

const MicroKernels<float>& microkernels_f32();
const MicroKernels<double>& microkernels_f64();

// One table per compiled level (defined in microkernels_<level>.cpp).
namespace generic {
const MicroKernels<float>& table_f32();
const MicroKernels<double>& table_f64();
}  // namespace generic
namespace avx2 {
const MicroKernels<float>& table_f32();
const MicroKernels<double>& table_f64();
}  // namespace avx2

}  // namespace sparse_attn::cpu
