// The CPU forward loop: for every (batch, head, query tile) the listed key tiles are scored,
// masked, folded into an online softmax and accumulated; the Lq x Lk matrix never exists.
// The arithmetic lives in the micro-kernels; this file owns the tile walk and the threads.
#include "forward.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "microkernels.h"

namespace sparse_attn::cpu {
namespace {

template <typename T>
const T* element(const Operand& op, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(op.data) + op.batch_offset[b] + h * op.stride_head +
         row * op.stride_row;
}

// Per-thread buffers, allocated once per call and thread. Tiles are in "query lanes" order
// (see microkernels.h): q_packed[d][r], scores[c][r], acc[e][r].
template <typename T>
struct Scratch {
  std::vector<T> q_packed, scores, acc, row_max, row_sum, corr;
  std::vector<uint64_t> row_bits;
  Scratch(int dim_qk, int dim_v)
      : q_packed(static_cast<size_t>(dim_qk) * kTileQ),
        scores(kTileK * kTileQ),
        acc(static_cast<size_t>(dim_v) * kTileQ),
        row_max(kTileQ),
        row_sum(kTileQ),
        corr(kTileQ),
        row_bits(kTileQ) {}
};

// Allowed columns of each query row of a tile that needs mask work: the layout's bits
// (partial tiles), the key-length cut and the user's mask. Lanes past the last row get none.
void tile_row_bits(const AttentionParams& p, const Layout& layout, int64_t b, int64_t h,
                   int64_t row0, int rows, int64_t kt, int cols, bool partial, int64_t key_limit,
                   uint64_t* row_bits) {
  const int64_t col0 = kt * kTileK;
  const uint64_t limit_bits = bit_range(0, key_limit - col0) & bit_range(0, cols);
  for (int r = 0; r < rows; ++r) {
    uint64_t bits = partial ? layout.tile_row_bits(row0 + r, kt) & limit_bits : limit_bits;
    if (p.mask.data != nullptr) {
      const auto* m = static_cast<const uint8_t*>(p.mask.data) + p.mask.batch_offset[b] +
                      h * p.mask.stride_head + (row0 + r) * p.mask.stride_row +
                      col0 * p.mask.stride_col;
      for (int c = 0; c < cols; ++c) {
        if (!m[c * p.mask.stride_col]) bits &= ~(uint64_t{1} << c);
      }
    }
    row_bits[r] = bits;
  }
  for (int r = rows; r < kTileQ; ++r) row_bits[r] = 0;
}

// scores[c][r] += bias[row0 + r][col0 + c]
template <typename T>
void add_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t row0, int rows, int64_t col0,
              int cols, T* s) {
  for (int r = 0; r < rows; ++r) {
    const T* bias = element<T>(p.bias, b, h, row0 + r) + col0 * p.bias.stride_col;
    for (int c = 0; c < cols; ++c) s[c * kTileQ + r] += bias[c * p.bias.stride_col];
  }
}

template <typename T>
void query_tile(const AttentionParams& p, const MicroKernels<T>& mk, int64_t b, int64_t h,
                int64_t qt, Scratch<T>& scratch) {
  const Layout& layout = *p.layouts[h];
  const int64_t kv_head = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = qt * kTileQ;
  const int rows = static_cast<int>(layout.q_tile_rows(qt));
  const int dim = static_cast<int>(p.dim_qk), dim_v = static_cast<int>(p.dim_v);
  const int64_t key_limit = p.key_lengths ? std::min(p.key_lengths[b], p.len_k) : p.len_k;
  T* const scores = scratch.scores.data();
  T* const acc = scratch.acc.data();

  mk.pack_q(element<T>(p.q, b, h, row0), p.q.stride_row, rows, dim, static_cast<T>(p.scale),
            scratch.q_packed.data());
  std::fill(scratch.acc.begin(), scratch.acc.end(), T(0));
  std::fill(scratch.row_max.begin(), scratch.row_max.end(), -std::numeric_limits<T>::infinity());
  std::fill(scratch.row_sum.begin(), scratch.row_sum.end(), T(0));

  for (int64_t e = layout.row_start(qt); e < layout.row_start(qt + 1); ++e) {
    const int64_t kt = layout.key_tiles()[e];
    const int64_t col0 = kt * kTileK;
    if (col0 >= key_limit) break;  // key tiles ascend: the rest is padding
    const int cols = static_cast<int>(layout.k_tile_cols(kt));
    const bool partial = layout.kinds()[e] == TileKind::Partial;
    const bool cut = col0 + cols > key_limit;

    mk.score_tile(element<T>(p.k, b, kv_head, col0), p.k.stride_row, cols, dim,
                  scratch.q_packed.data(), scores);
    if (p.bias.data != nullptr) add_bias(p, b, h, row0, rows, col0, cols, scores);
    if (partial || cut || p.mask.data != nullptr) {  // full tiles skip all mask work
      tile_row_bits(p, layout, b, h, row0, rows, kt, cols, partial, key_limit,
                    scratch.row_bits.data());
      mk.mask_tile(scores, cols, scratch.row_bits.data());
    }
    mk.softmax_update(scores, cols, scratch.row_max.data(), scratch.row_sum.data(),
                      scratch.corr.data());
    mk.accumulate_pv(scores, cols, element<T>(p.v, b, kv_head, col0), p.v.stride_row, dim_v,
                     scratch.corr.data(), acc);
  }

  const int64_t out_row0 = (b * p.heads_q + h) * p.len_q + row0;
  T* out = static_cast<T*>(p.out) + out_row0 * dim_v;
  for (int r = 0; r < rows; ++r) {
    const T sum = scratch.row_sum[r];
    // An empty row gives zeros, never NaN; a NaN input keeps its row NaN.
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    for (int e = 0; e < dim_v; ++e) out[r * dim_v + e] = acc[e * kTileQ + r] * inv;
    if (p.lse != nullptr) {
      static_cast<T*>(p.lse)[out_row0 + r] =
          sum == T(0) ? -std::numeric_limits<T>::infinity() : scratch.row_max[r] + std::log(sum);
    }
  }
}

void check(const AttentionParams& p) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    throw std::invalid_argument("forward: heads_q must be a multiple of heads_kv");
  }
  for (int64_t h = 0; h < p.heads_q; ++h) {
    const LayoutSpec& s = p.layouts[h]->spec();
    if (s.len_q != p.len_q || s.len_k != p.len_k || s.tile_q != kTileQ || s.tile_k != kTileK) {
      throw std::invalid_argument("forward: layout does not match the problem or the tile size");
    }
  }
}

template <typename T>
void run(const AttentionParams& p, const MicroKernels<T>& mk) {
  const int64_t num_q_tiles = (p.len_q + kTileQ - 1) / kTileQ;
  const int64_t per_rank = p.batch * p.heads_q;
  const int64_t items = per_rank * num_q_tiles;
  if (items == 0) return;
  const int threads = std::max(1, p.num_threads);
  // Allocated before the parallel region: std::bad_alloc must reach the caller, not terminate.
  std::vector<Scratch<T>> scratches;
  scratches.reserve(threads);
  for (int t = 0; t < threads; ++t) scratches.emplace_back(int(p.dim_qk), int(p.dim_v));
#pragma omp parallel num_threads(threads)
  {
    Scratch<T>& scratch = scratches[omp_get_thread_num()];
    // Most expensive query tiles first, so the threads run out of work together.
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) {
      const int64_t rank = w / per_rank, bh = w % per_rank;
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      query_tile<T>(p, mk, b, h, p.layouts[h]->q_tiles_by_cost()[rank], scratch);
    }
  }
}

}  // namespace

void forward(const AttentionParams& p) {
  check(p);
  if (p.dtype == DType::Float32) {
    run<float>(p, microkernels_f32());
  } else {
    run<double>(p, microkernels_f64());
  }
}

}  // namespace sparse_attn::cpu
