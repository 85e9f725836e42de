// The CUDA forward kernels over a compiled layout: block-sparse flash attention (softmax mode)
// and hard attention (argmax or Gumbel-max sampling). One block owns one (batch, head, query
// tile), and in softmax mode a slice of the output columns; it streams the listed key tiles
// through shared memory (load tile, score, mask, then online softmax and accumulate, or keep
// the best key) and never forms the Lq x Lk matrix. Compiled by nvcc, and by the host compiler
// for the emulator.
#pragma once

#include "../core/predicates.h"
#include "../core/random.h"
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

SA_DEVICE BlockWork block_work(const ForwardParams& p, int block_dv) {
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
  w.dv0 = static_cast<int>(blockIdx.y) * block_dv;
  return w;
}

// The pattern program's allowed keys of one row: a real call on the GPU, so the evaluator's
// stack and registers stay out of the kernel's hot loop.
SA_DEVICE_NOINLINE uint64_t pattern_row_bits(const PatternProgram& program, int64_t i, int64_t j0,
                                             int width) {
  return row_bits(program, i, j0, width);
}

// Per-row scale of the block's queries into shared memory: the scale, divided by |q| for the
// cosine score (0 for a zero vector). Read after the next barrier.
template <typename T>
SA_DEVICE void query_scales(const ForwardParams& p, const BlockWork& w,
                            float (&q_scale)[kTileQ]) {
  const int r = static_cast<int>(threadIdx.x);
  if (r >= kTileQ) return;
  float scale = p.scale;
  if (p.score == kScoreCosine && r < w.rows) {
    const float norm = row_norm(operand_row<T>(p.q, w.b, w.h, w.row0 + r), p.dim_qk);
    scale = norm > 0.0f ? scale / norm : 0.0f;
  }
  q_scale[r] = scale;
}

// One listed key tile of a block: its columns and whether it needs mask work.
struct KeyTile {
  int64_t col0;
  int cols;
  bool partial, use_row_bits;
};

// Row bits of a tile that needs mask work (a partial tile, or one cut by key_lengths), from the
// shared predicate header, and the cosine key scales. Threads 0..63 write one row/key each.
template <typename T>
SA_DEVICE void tile_setup(const ForwardParams& p, const DeviceLayout& layout, const BlockWork& w,
                          const KeyTile& t, uint64_t (&tile_bits)[kTileQ],
                          float (&k_scale)[kTileK]) {
  const int r = static_cast<int>(threadIdx.x);
  if (r >= kTileQ) return;
  if (t.use_row_bits) {
    uint64_t bits = 0;
    if (r < w.rows) {
      bits = bit_range(0, w.key_limit - t.col0) & bit_range(0, t.cols);
      if (t.partial) {
        bits &= pattern_row_bits(layout.program, layout.q0 + w.row0 + r, layout.k0 + t.col0,
                                 t.cols);
      }
    }
    tile_bits[r] = bits;
  }
  if (p.score == kScoreCosine) {
    float scale = 0.0f;
    if (r < t.cols) {
      const float norm = row_norm(operand_row<T>(p.k, w.b, w.kv_head, t.col0 + r), p.dim_qk);
      scale = norm > 0.0f ? 1.0f / norm : 0.0f;
    }
    k_scale[r] = scale;
  }
}

// From s = scale * q.k / |q| to the final score, -inf where the pair is not allowed: cosine
// key scale, softcap, ALiBi, bias (in the CPU's order), then the tile, row-bit and user masks.
template <typename T>
SA_DEVICE void score_epilogue(const ForwardParams& p, const BlockWork& w, const KeyTile& t,
                              const uint64_t (&tile_bits)[kTileQ], const float (&k_scale)[kTileK],
                              Fragment f, float (&s)[kRowsPerThread][kKeysPerThread]) {
  const float slope = p.alibi_slopes != nullptr ? p.alibi_slopes[w.h] : 0.0f;
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = f.first_row + i;
    const bool row_ok = r < w.rows;
    const uint64_t bits = t.use_row_bits ? tile_bits[r] : ~uint64_t{0};
    const T* bias = p.bias.data != nullptr && row_ok ? operand_row<T>(p.bias, w.b, w.h, w.row0 + r)
                                                     : nullptr;
    const uint8_t* mask = p.mask.data != nullptr && row_ok
                              ? operand_row<uint8_t>(p.mask, w.b, w.h, w.row0 + r)
                              : nullptr;
    const int64_t i_abs = p.q0 + w.row0 + r;
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      const int c = f.lane + kLanesPerRow * jj;
      bool allowed = row_ok && c < t.cols && ((bits >> c) & 1) != 0;
      if (allowed && mask != nullptr) allowed = mask[(t.col0 + c) * p.mask.stride_col] != 0;
      float x = s[i][jj];
      if (p.score == kScoreCosine) x *= k_scale[c];
      if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
      if (slope != 0.0f) {
        const int64_t distance = i_abs - (p.k0 + t.col0 + c);
        x -= slope * static_cast<float>(distance < 0 ? -distance : distance);
      }
      if (allowed && bias != nullptr) x += to_float(bias[(t.col0 + c) * p.bias.stride_col]);
      s[i][jj] = allowed ? x : -INFINITY;
    }
  }
}

// Scores of one listed key tile into this thread's fragment s. Starts with a barrier (every
// reader of the shared tiles from the previous step is done) and ends after one, so the
// caller may overwrite any tile but q, kv.k, row_bits and k_scale right away.
template <typename T, typename Tiles>
SA_DEVICE void score_tile(const ForwardParams& p, const DeviceLayout& layout, const BlockWork& w,
                          const KeyTile& t, Tiles& sh, Fragment f,
                          float (&s)[kRowsPerThread][kKeysPerThread]) {
  __syncthreads();
  tile_setup<T>(p, layout, w, t, sh.row_bits, sh.k_scale);
  const T* q_rows = operand_row<T>(p.q, w.b, w.h, w.row0);
  const T* k_rows = operand_row<T>(p.k, w.b, w.kv_head, t.col0);
  const int dim = static_cast<int>(p.dim_qk);
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) s[i][jj] = 0.0f;
  }
  for (int d0 = 0; d0 < dim; d0 += kChunkD) {
    if (d0 > 0) __syncthreads();  // the previous slice's readers are done
    load_tile<kTileQ, kChunkD>(sh.q, q_rows + d0, p.q.stride_row, w.rows, dim - d0, sh.q_scale);
    load_tile<kTileK, kChunkD>(sh.kv.k, k_rows + d0, p.k.stride_row, t.cols, dim - d0, nullptr);
    __syncthreads();
    score_chunk(sh.q, sh.kv.k, f, s);
  }
  score_epilogue<T>(p, w, t, sh.row_bits, sh.k_scale, f, s);
}

// Zeroes dropped probabilities and scales kept ones by 1 / (1 - p), after the softmax update
// (the normaliser and lse stay those of the undropped softmax, as on the CPU).
SA_DEVICE void apply_dropout(const ForwardParams& p, const BlockWork& w, const KeyTile& t,
                             Fragment f, float (&s)[kRowsPerThread][kKeysPerThread]) {
  const float keep_scale = 1.0f / (1.0f - p.dropout_p);
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const uint64_t stream =
        random_row_prefix(p.seed, RandomStream::Dropout, w.b, w.h, p.q0 + w.row0 + f.first_row + i);
    SA_UNROLL
    for (int jj = 0; jj < kKeysPerThread; ++jj) {
      const int c = f.lane + kLanesPerRow * jj;
      const uint64_t bits = random_bits_in_row(stream, p.k0 + t.col0 + c);
      s[i][jj] = random_uniform(bits) >= p.dropout_p ? s[i][jj] * keep_scale : 0.0f;
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

// Softmax mode. At most kThreads threads, two blocks per SM: ptxas may use up to 255
// registers, and the kernel (about 180 / 230 registers for 8 / 16 columns per thread) then
// spills nothing.
template <typename T, int kColsPerThread>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const ForwardParams p) {
  using Tiles = SharedTiles<kColsPerThread>;
  constexpr int kBlockDv = Tiles::kBlockDv;
  Tiles& sh = shared_tiles<Tiles>();
  const BlockWork w = block_work(p, kBlockDv);
  const DeviceLayout& layout = p.layouts[w.h];
  const Fragment f = thread_fragment();
  const int dv_cols = static_cast<int>(p.dim_v - w.dv0 < kBlockDv ? p.dim_v - w.dv0 : kBlockDv);

  float acc[kRowsPerThread][kColsPerThread] = {};
  float row_max[kRowsPerThread], row_sum[kRowsPerThread];
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }
  query_scales<T>(p, w, sh.q_scale);

  // Every decision below depends only on the block's work, so barriers are reached by all.
  for (int64_t e = layout.row_start[w.query_tile]; e < layout.row_start[w.query_tile + 1]; ++e) {
    KeyTile t;
    t.col0 = int64_t{layout.key_tiles[e]} * kTileK;
    if (t.col0 >= w.key_limit) break;  // key tiles ascend: the rest is padding
    t.cols = static_cast<int>(p.len_k - t.col0 < kTileK ? p.len_k - t.col0 : kTileK);
    t.partial = layout.kinds[e] == kPartialTile;
    t.use_row_bits = t.partial || t.col0 + t.cols > w.key_limit;

    float s[kRowsPerThread][kKeysPerThread];
    score_tile<T>(p, layout, w, t, sh, f, s);
    softmax_update(s, row_max, row_sum, acc);
    if (p.dropout_p > 0.0f) apply_dropout(p, w, t, f, s);
    store_probabilities(s, f, sh.p);

    // Output: acc += P V over slices of kChunkV keys and this block's output columns.
    const T* v_rows = operand_row<T>(p.v, w.b, w.kv_head, t.col0) + w.dv0;
    for (int key0 = 0; key0 < t.cols; key0 += kChunkV) {
      __syncthreads();  // p is complete; nobody reads k or the previous v slice any more
      load_tile<kChunkV, kBlockDv>(sh.kv.v, v_rows + key0 * p.v.stride_row, p.v.stride_row,
                                   t.cols - key0, dv_cols, nullptr);
      __syncthreads();
      accumulate_pv(sh.p, key0, sh.kv.v, f, acc);
    }
  }
  store_output<T>(p, w, f, acc, row_max, row_sum);
}

// The shared memory of the hard-attention kernel: the scoring tiles only.
struct HardTiles {
  float q[kTileQ][kChunkD + 1];
  union {
    float k[kTileK][kChunkD + 1];
  } kv;
  uint64_t row_bits[kTileQ];
  float q_scale[kTileQ];
  float k_scale[kTileK];
};
static_assert(sizeof(HardTiles) <= 48 * 1024, "shared tiles exceed 48 KB");

// The better of two candidates: a larger value, or the same value at a lower key.
SA_DEVICE bool better(float value, int64_t key, float best_value, int64_t best_key) {
  return value > best_value || (value == best_value && key >= 0 && key < best_key);
}

// Hard mode: per row, the allowed key with the largest score (ties: the lowest key), or with
// the largest score / temperature + Gumbel noise when sampling; out = v[key], index = key
// (-1 and zeros for a row with nothing allowed). The same choice as the CPU's.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) hard_kernel(const ForwardParams p) {
  HardTiles& sh = shared_tiles<HardTiles>();
  const BlockWork w = block_work(p, 0);
  const DeviceLayout& layout = p.layouts[w.h];
  const Fragment f = thread_fragment();
  float best[kRowsPerThread];
  int64_t best_key[kRowsPerThread];
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    best[i] = -INFINITY;
    best_key[i] = -1;
  }
  query_scales<T>(p, w, sh.q_scale);

  for (int64_t e = layout.row_start[w.query_tile]; e < layout.row_start[w.query_tile + 1]; ++e) {
    KeyTile t;
    t.col0 = int64_t{layout.key_tiles[e]} * kTileK;
    if (t.col0 >= w.key_limit) break;
    t.cols = static_cast<int>(p.len_k - t.col0 < kTileK ? p.len_k - t.col0 : kTileK);
    t.partial = layout.kinds[e] == kPartialTile;
    t.use_row_bits = t.partial || t.col0 + t.cols > w.key_limit;

    float s[kRowsPerThread][kKeysPerThread];
    score_tile<T>(p, layout, w, t, sh, f, s);
    SA_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t i_abs = p.q0 + w.row0 + f.first_row + i;
      const uint64_t stream =
          p.sample ? random_row_prefix(p.seed, RandomStream::Gumbel, w.b, w.h, i_abs) : 0;
      float tile_best = -INFINITY;
      int64_t tile_key = -1;
      SA_UNROLL
      for (int jj = 0; jj < kKeysPerThread; ++jj) {  // this lane's keys, ascending
        float value = s[i][jj];
        if (!(value > -INFINITY)) continue;  // masked (or NaN): never chosen
        const int64_t key = t.col0 + f.lane + kLanesPerRow * jj;
        if (p.sample) {
          // Gumbel(0, 1) = -log(-log(u)), u in (0, 1): the 24-bit uniform shifted half a step.
          const uint64_t bits = random_bits_in_row(stream, p.k0 + key);
          const double u = (static_cast<double>(bits >> 40) + 0.5) * (1.0 / 16777216.0);
          // argmax of s / t + g is that of s + t g (t > 0), which cannot overflow; the
          // product is rounded on its own, as on the CPU
          value += __fmul_rn(p.temperature, static_cast<float>(-log(-log(u))));
        }
        if (value > tile_best) {
          tile_best = value;
          tile_key = key;
        }
      }
      SA_UNROLL
      for (int offset = 1; offset < kLanesPerRow; offset *= 2) {  // the whole warp takes part
        const float other = __shfl_xor_sync(kFullMask, tile_best, offset);
        const int64_t other_key = __shfl_xor_sync(kFullMask, tile_key, offset);
        if (better(other, other_key, tile_best, tile_key)) {
          tile_best = other;
          tile_key = other_key;
        }
      }
      if (tile_best > best[i]) {  // key tiles ascend: an equal later score keeps the earlier
        best[i] = tile_best;
        best_key[i] = tile_key;
      }
    }
  }

  const int64_t out_row0 = (w.b * p.heads_q + w.h) * p.len_q + w.row0;
  SA_UNROLL
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int r = f.first_row + i;
    if (r >= w.rows) continue;
    const int64_t key = best_key[i];
    if (f.lane == 0) p.index[out_row0 + r] = key;
    const T* value = key >= 0 ? operand_row<T>(p.v, w.b, w.kv_head, key) : nullptr;
    T* out = static_cast<T*>(p.out) + (out_row0 + r) * p.dim_v;
    for (int64_t col = f.lane; col < p.dim_v; col += kLanesPerRow) {
      out[col] = value != nullptr ? value[col] : from_float<T>(0.0f);
    }
  }
}

// One launch helper per kernel: grid (work items, output column slices) x kThreads.
template <typename T, int kColsPerThread>
cudaError_t launch_forward_kernel(const ForwardParams& p, cudaStream_t stream) {
  using Tiles = SharedTiles<kColsPerThread>;
  const int64_t items = p.batch * p.heads_q * p.num_q_tiles;
  const int64_t slices = p.dim_v > 0 ? (p.dim_v + Tiles::kBlockDv - 1) / Tiles::kBlockDv : 1;
  if (items == 0) return cudaSuccess;
  if (items > 0x7fffffff || slices > 65535 || p.dim_qk < 1) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(items), static_cast<unsigned>(slices));
  return launch_kernel(&forward_kernel<T, kColsPerThread>, grid, dim3(kThreads), sizeof(Tiles),
                       stream, p);
}

template <typename T>
cudaError_t launch_hard_kernel(const ForwardParams& p, cudaStream_t stream) {
  const int64_t items = p.batch * p.heads_q * p.num_q_tiles;
  if (items == 0) return cudaSuccess;
  if (items > 0x7fffffff || p.dim_qk < 1) return cudaErrorInvalidConfiguration;
  return launch_kernel(&hard_kernel<T>, dim3(static_cast<unsigned>(items)), dim3(kThreads),
                       sizeof(HardTiles), stream, p);
}

}  // namespace sparse_attn::cuda
