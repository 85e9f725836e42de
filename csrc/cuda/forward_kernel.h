// The CUDA forward kernel: block-sparse flash attention over a compiled layout. One block owns
// one (batch, head, query tile) and a slice of the output columns; it streams the listed key
// tiles through shared memory (load tile, score, mask, online softmax, accumulate) and never
// forms the Lq x Lk matrix. Compiled by nvcc, and by the host compiler for the emulator.
#pragma once

#include "../core/predicates.h"
#include "compat.h"
#include "forward_params.h"
#include "tile_math.h"

namespace sparse_attn::cuda {

// Element (b, h, row, 0) of a strided operand.
template <typename T>
SA_DEVICE const T* operand_row(const DeviceOperand& op, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(op.data) + op.batch_offset[b] + h * op.stride_head +
         row * op.stride_row;
}

// What a block works on, derived from blockIdx exactly as the CPU derives its work items:
// query tiles in decreasing cost (layout.q_tiles_by_cost) so the heaviest start first.
struct BlockWork {
  int64_t b, h, kv_head, query_tile, row0, key_limit;
  int rows, dv0;
};

template <int kBlockDv>
SA_DEVICE BlockWork block_work(const ForwardParams& p) {
  const int64_t per_rank = p.batch * p.heads_q;
  const int64_t rank = blockIdx.x / per_rank, bh = blockIdx.x % per_rank;
  BlockWork w;
  w.b = bh / p.heads_q;
  w.h = bh % p.heads_q;
  w.kv_head = w.h / (p.heads_q / p.heads_kv);
  w.query_tile = p.layouts[w.h].q_tiles_by_cost[rank];
  w.row0 = w.query_tile * kTileQ;
  const int64_t rows_left = p.len_q - w.row0;
  w.rows = static_cast<int>(rows_left < kTileQ ? rows_left : kTileQ);
  w.key_limit = p.key_lengths != nullptr && p.key_lengths[w.b] < p.len_k ? p.key_lengths[w.b]
                                                                           : p.len_k;
  w.dv0 = static_cast<int>(blockIdx.y) * kBlockDv;
  return w;
}

// The pattern program's allowed keys of one row: a real call on the GPU, so the evaluator's
// stack and registers stay out of the kernel's hot loop.
SA_DEVICE_NOINLINE uint64_t pattern_row_bits(const PatternProgram& program, int64_t i, int64_t j0,
                                             int width) {
  return row_bits(program, i, j0, width);
}

// Allowed keys of each row of a tile that needs mask work (a partial tile, or one cut by
// key_lengths), from the shared predicate header; the user mask is applied per element later.
SA_DEVICE void compute_row_bits(const DeviceLayout& layout, const BlockWork& w, int64_t col0,
                                int cols, bool partial, uint64_t (&tile_bits)[kTileQ]) {
  const int r = static_cast<int>(threadIdx.x);
  if (r >= kTileQ) return;
  uint64_t bits = 0;
  if (r < w.rows) {
    bits = bit_range(0, w.key_limit - col0) & bit_range(0, cols);
    if (partial) {
      bits &= pattern_row_bits(layout.program, layout.q0 + w.row0 + r, layout.k0 + col0, cols);
    }
  }
  tile_bits[r] = bits;
}

// Scaled scores plus bias, -inf where the pair is not allowed: outside the tile, excluded by
// the row bits (when the tile needs them) or by the user mask.
template <typename T>
SA_DEVICE void bias_and_mask(const ForwardParams& p, const BlockWork& w, int64_t col0, int cols,
                             bool use_row_bits, const uint64_t (&tile_bits)[kTileQ], Fragment f,
                             float (&s)[kRowsPerThread][kKeysPerThread]) {
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = f.first_row + i;
    const bool row_ok = r < w.rows;
    const uint64_t bits = use_row_bits ? tile_bits[r] : ~uint64_t{0};
    const T* bias = p.bias.data != nullptr && row_ok ? operand_row<T>(p.bias, w.b, w.h, w.row0 + r)
                                                     : nullptr;
    const uint8_t* mask = p.mask.data != nullptr && row_ok
                              ? operand_row<uint8_t>(p.mask, w.b, w.h, w.row0 + r)
                              : nullptr;
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      const int c = f.lane + kLanesPerRow * jj;
      bool allowed = row_ok && c < cols && ((bits >> c) & 1) != 0;
      if (allowed && mask != nullptr) allowed = mask[(col0 + c) * p.mask.stride_col] != 0;
      float x = s[i][jj];
      if (allowed && bias != nullptr) x += to_float(bias[(col0 + c) * p.bias.stride_col]);
      s[i][jj] = allowed ? x : -INFINITY;
    }
  }
}

// out = acc / row sum (zeros for a row with nothing allowed); lse = max + log(sum) or -inf.
template <typename T, int kColsPerThread>
SA_DEVICE void store_output(const ForwardParams& p, const BlockWork& w, Fragment f,
                            const float (&acc)[kRowsPerThread][kColsPerThread],
                            const float (&row_max)[kRowsPerThread],
                            const float (&row_sum)[kRowsPerThread]) {
  const int64_t out_row0 = (w.b * p.heads_q + w.h) * p.len_q + w.row0;
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const float sum = row_group_sum(row_sum[i]);  // the whole warp takes part
    const int r = f.first_row + i;
    if (r >= w.rows) continue;
    const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;  // a NaN input keeps its row NaN
    T* out = static_cast<T*>(p.out) + (out_row0 + r) * p.dim_v;
    SA_UNROLL
    for (int c = 0; c < kColsPerThread; ++c) {
      const int col = w.dv0 + f.lane + kLanesPerRow * c;
      if (col < p.dim_v) out[col] = from_float<T>(acc[i][c] * inv);
    }
    if (p.lse != nullptr && blockIdx.y == 0 && f.lane == 0) {
      p.lse[out_row0 + r] = sum == 0.0f ? -INFINITY : row_max[i] + logf(sum);
    }
  }
}

// At most kThreads threads, two blocks per SM: ptxas may use up to 255 registers, and the
// kernel (about 176 / 224 registers for 8 / 16 columns per thread) then spills nothing.
template <typename T, int kColsPerThread>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const ForwardParams p) {
  using Tiles = SharedTiles<kColsPerThread>;
  constexpr int kBlockDv = Tiles::kBlockDv;
  Tiles& sh = shared_tiles<Tiles>();
  const BlockWork w = block_work<kBlockDv>(p);
  const DeviceLayout& layout = p.layouts[w.h];
  const Fragment f = thread_fragment();
  const int dim = static_cast<int>(p.dim_qk);
  const int dv_cols = static_cast<int>(p.dim_v - w.dv0 < kBlockDv ? p.dim_v - w.dv0 : kBlockDv);
  const T* q_rows = operand_row<T>(p.q, w.b, w.h, w.row0);

  float acc[kRowsPerThread][kColsPerThread] = {};
  float row_max[kRowsPerThread], row_sum[kRowsPerThread];
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }

  // Every decision below depends only on the block's work, so barriers are reached by all.
  for (int64_t e = layout.row_start[w.query_tile]; e < layout.row_start[w.query_tile + 1]; ++e) {
    const int64_t col0 = int64_t{layout.key_tiles[e]} * kTileK;
    if (col0 >= w.key_limit) break;  // key tiles ascend: the rest is padding
    const int cols = static_cast<int>(p.len_k - col0 < kTileK ? p.len_k - col0 : kTileK);
    const bool partial = layout.kinds[e] == kPartialTile;
    const bool use_row_bits = partial || col0 + cols > w.key_limit;
    if (use_row_bits) compute_row_bits(layout, w, col0, cols, partial, sh.row_bits);

    // Scores: S = (scale Q) K^T over head-dim slices.
    const T* k_rows = operand_row<T>(p.k, w.b, w.kv_head, col0);
    float s[kRowsPerThread][kKeysPerThread] = {};
    for (int d0 = 0; d0 < dim; d0 += kChunkD) {
      __syncthreads();  // the previous step's readers of q, kv and p are done
      load_tile<kTileQ, kChunkD>(sh.q, q_rows + d0, p.q.stride_row, w.rows, dim - d0, p.scale);
      load_tile<kTileK, kChunkD>(sh.kv.k, k_rows + d0, p.k.stride_row, cols, dim - d0, 1.0f);
      __syncthreads();
      score_chunk(sh.q, sh.kv.k, f, s);
    }
    bias_and_mask<T>(p, w, col0, cols, use_row_bits, sh.row_bits, f, s);
    softmax_update(s, row_max, row_sum, acc);
    store_probabilities(s, f, sh.p);

    // Output: acc += P V over slices of kChunkV keys and this block's output columns.
    const T* v_rows = operand_row<T>(p.v, w.b, w.kv_head, col0) + w.dv0;
    for (int key0 = 0; key0 < cols; key0 += kChunkV) {
      __syncthreads();  // p is complete; nobody reads k or the previous v slice any more
      load_tile<kChunkV, kBlockDv>(sh.kv.v, v_rows + key0 * p.v.stride_row, p.v.stride_row,
                                   cols - key0, dv_cols, 1.0f);
      __syncthreads();
      accumulate_pv(sh.p, key0, sh.kv.v, f, acc);
    }
  }
  store_output<T>(p, w, f, acc, row_max, row_sum);
}

// One launch helper per kernel: grid (work items, output column slices) x kThreads.
template <typename T, int kColsPerThread>
cudaError_t launch_forward_kernel(const ForwardParams& p, cudaStream_t stream) {
  using Tiles = SharedTiles<kColsPerThread>;
  const int64_t items = p.batch * p.heads_q * p.num_q_tiles;
  const int64_t slices = p.dim_v > 0 ? (p.dim_v + Tiles::kBlockDv - 1) / Tiles::kBlockDv : 1;
  if (items == 0) return cudaSuccess;
  if (items > 0x7fffffff || slices > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(slices));
  return launch_kernel(&forward_kernel<T, kColsPerThread>, grid, dim3(kThreads), sizeof(Tiles),
                       stream, p);
}

}  // namespace sparse_attn::cuda
