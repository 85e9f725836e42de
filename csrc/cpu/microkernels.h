// The tile operations of the CPU forward pass, one table per instruction set and dtype.
// The forward loop (forward.cpp) calls them through this table, chosen once by dispatch.cpp;
// they see only plain pointers and sizes.
#pragma once

#include <cstdint>

namespace sparse_attn::cpu {

constexpr int kTileQ = 64;  // query rows per work item: a 64 x 64 fp32 score tile is 16 KB (L1)
constexpr int kTileK = 64;  // key columns per tile: one uint64_t of mask bits per row

template <typename T>
struct MicroKernels {
  // K tile rows [0, cols) of length dim -> packed (dim, kTileK), column c = key c; zero padded.
  void (*pack_k)(const T* k, int64_t k_row_stride, int cols, int dim, T* k_packed);
  // s[r * kTileK + c] = scale * dot(q_r, key c) for r < rows and every c < kTileK.
  void (*score_tile)(const T* q, int64_t q_row_stride, int rows, const T* k_packed, int dim,
                     T scale, T* s);
  // Online softmax over columns [0, cols) of each row (masked entries are -inf): replaces s by
  // exp(s - new_max), updates row_max and row_sum, and writes corr = exp(old_max - new_max).
  void (*softmax_update)(T* s, int rows, int cols, T* row_max, T* row_sum, T* corr);
  // acc[r] = acc[r] * corr[r] + sum_c p[r * kTileK + c] * v_c, acc rows of length dim_v.
  void (*accumulate_pv)(const T* p, int rows, int cols, const T* v, int64_t v_row_stride,
                        int dim_v, const T* corr, T* acc);
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
