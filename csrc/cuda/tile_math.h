// Tile maths of the CUDA forward kernel: the shapes of one block's work, its shared-memory
// tiles, and small device functions on them and on one thread's register fragment.
// Device code only (compat.h); no loops over tiles and no barriers live here.
#pragma once

#include "compat.h"
#include "forward_params.h"

namespace sparse_attn::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kLanesPerRow = 8;   // lanes that share a query row (one shuffle group)
constexpr int kRowsPerThread = kTileQ / (kWarps * (32 / kLanesPerRow));  // 4
constexpr int kKeysPerThread = kTileK / kLanesPerRow;                    // 8
constexpr int kChunkD = 32;  // head-dim slice of Q and K in shared memory per step
constexpr int kChunkV = 32;  // keys of V in shared memory per step
constexpr unsigned kFullMask = 0xffffffffu;

// Where one thread sits in a 64 x 64 tile: query rows first_row + i (i < kRowsPerThread),
// keys lane + kLanesPerRow * jj (jj < kKeysPerThread), output columns lane + kLanesPerRow * c.
// A warp covers 16 whole rows, so row reductions are shuffles within groups of 8 lanes.
struct Fragment {
  int first_row;
  int lane;  // 0 .. kLanesPerRow - 1
};

SA_DEVICE Fragment thread_fragment() {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  return {warp * (kTileQ / kWarps) + (lane / kLanesPerRow) * kRowsPerThread, lane % kLanesPerRow};
}

// The block's shared memory. kColsPerThread output columns per thread give a kBlockDv-wide
// slice of the output per block. Rows of q and k are padded by one float so that the eight
// key lanes and four row groups of a warp read different banks.
template <int kColsPerThread>
struct SharedTiles {
  static constexpr int kBlockDv = kColsPerThread * kLanesPerRow;
  float q[kTileQ][kChunkD + 1];  // scale * Q, one head-dim slice
  union {
    float k[kTileK][kChunkD + 1];  // one head-dim slice of K, while scores are computed
    float v[kChunkV][kBlockDv];    // kChunkV keys of V, while probabilities are applied
  } kv;
  float p[kTileQ][kTileK + 1];     // probabilities of the current key tile
  uint64_t row_bits[kTileQ];       // allowed keys of each row, for tiles that need mask work
  float q_scale[kTileQ];           // scale of each query row (divided by |q| for cosine)
  float k_scale[kTileK];           // cosine: 1 / |k| of each key of the current tile
};
// The default dynamic shared-memory limit: no opt-in needed, several blocks per SM.
static_assert(sizeof(SharedTiles<16>) <= 48 * 1024, "shared tiles exceed 48 KB");

// dst[r][c] = src[r * row_stride + c] (times row_scale[r] when given) for r < rows, c < cols;
// zero elsewhere in the kRows x kCols tile. All threads of the block take part; coalesced
// along c.
template <int kRows, int kCols, int kPitch, typename T>
SA_DEVICE void load_tile(float (&dst)[kRows][kPitch], const T* src, int64_t row_stride, int rows,
                         int cols, const float* row_scale) {
  for (int idx = static_cast<int>(threadIdx.x); idx < kRows * kCols; idx += kThreads) {
    const int r = idx / kCols, c = idx % kCols;
    float x = 0.0f;
    if (r < rows && c < cols) {
      x = to_float(src[r * row_stride + c]);
      if (row_scale != nullptr) x *= row_scale[r];
    }
    dst[r][c] = x;
  }
}

// sqrt(sum x^2) of one row of n elements, in float32.
template <typename T>
SA_DEVICE float row_norm(const T* x, int64_t n) {
  float sum = 0.0f;
  for (int64_t d = 0; d < n; ++d) {
    const float v = to_float(x[d]);
    sum += v * v;
  }
  return sqrtf(sum);
}

// s[i][jj] += sum_d q[row i][d] * k[key jj][d] over one kChunkD slice.
template <int kPitch>
SA_DEVICE void score_chunk(const float (&q)[kTileQ][kPitch], const float (&k)[kTileK][kPitch],
                           Fragment f, float (&s)[kRowsPerThread][kKeysPerThread]) {
  SA_UNROLL_BY(4)
  for (int d = 0; d < kChunkD; ++d) {
    float qd[kRowsPerThread], kd[kKeysPerThread];
    SA_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) qd[i] = q[f.first_row + i][d];
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) kd[jj] = k[f.lane + kLanesPerRow * jj][d];
    SA_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      SA_UNROLL
      for (int jj = 0; jj < kKeysPerThread; ++jj) s[i][jj] += qd[i] * kd[jj];
    }
  }
}

// Maximum over the kLanesPerRow lanes that share a row; the whole warp must call it.
SA_DEVICE float row_group_max(float x) {
  SA_UNROLL
  for (int offset = 1; offset < kLanesPerRow; offset *= 2) {
    const float other = __shfl_xor_sync(kFullMask, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

// Sum over the kLanesPerRow lanes that share a row; the whole warp must call it.
SA_DEVICE float row_group_sum(float x) {
  SA_UNROLL
  for (int offset = 1; offset < kLanesPerRow; offset *= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Online softmax over one tile of masked scores s (-inf = not allowed). s becomes
// exp(s - new_max); row_max is the row's running maximum (the same in all its lanes);
// row_sum is this thread's share of the denominator and acc its share of the output, both
// rescaled by exp(old_max - new_max). A row with nothing allowed yet subtracts 0, not -inf:
// exp(-inf - 0) = 0 and no NaN appears.
template <int kColsPerThread>
SA_DEVICE void softmax_update(float (&s)[kRowsPerThread][kKeysPerThread],
                              float (&row_max)[kRowsPerThread], float (&row_sum)[kRowsPerThread],
                              float (&acc)[kRowsPerThread][kColsPerThread]) {
  const float neg_inf = -INFINITY;
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    float tile_max = row_max[i];
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      tile_max = s[i][jj] > tile_max ? s[i][jj] : tile_max;
    }
    const float new_max = row_group_max(tile_max);
    const float shift = new_max == neg_inf ? 0.0f : new_max;
    const float corr = __expf(row_max[i] - shift);  // 0 while the row was empty
    float sum = 0.0f;
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      s[i][jj] = __expf(s[i][jj] - shift);
      sum += s[i][jj];
    }
    row_sum[i] = row_sum[i] * corr + sum;
    row_max[i] = new_max;
    SA_UNROLL
    for (int c = 0; c < kColsPerThread; ++c) acc[i][c] *= corr;
  }
}

// p[row][key] = s for this thread's fragment.
SA_DEVICE void store_probabilities(const float (&s)[kRowsPerThread][kKeysPerThread], Fragment f,
                                   float (&p)[kTileQ][kTileK + 1]) {
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      p[f.first_row + i][f.lane + kLanesPerRow * jj] = s[i][jj];
    }
  }
}

// acc[i][c] += sum_j p[row i][key0 + j] * v[j][column c] over one kChunkV slice of keys.
template <int kColsPerThread, int kBlockDv>
SA_DEVICE void accumulate_pv(const float (&p)[kTileQ][kTileK + 1], int key0,
                             const float (&v)[kChunkV][kBlockDv], Fragment f,
                             float (&acc)[kRowsPerThread][kColsPerThread]) {
  SA_UNROLL_BY(4)
  for (int j = 0; j < kChunkV; ++j) {
    float pj[kRowsPerThread];
    SA_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) pj[i] = p[f.first_row + i][key0 + j];
    SA_UNROLL
    for (int c = 0; c < kColsPerThread; ++c) {
      const float vj = v[j][f.lane + kLanesPerRow * c];
      SA_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) acc[i][c] += pj[i] * vj;
    }
  }
}

}  // namespace sparse_attn::cuda
