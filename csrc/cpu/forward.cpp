// The CPU forward loop: for every (batch, head, query tile) the listed key tiles are scored,
// masked and consumed by the pass's mode (online softmax, argmax, weights, counts); the
// Lq x Lk matrix never exists. The arithmetic lives in the micro-kernels; this file owns the
// tile walk, the per-element inputs (bias, user mask, random draws) and the threads.
#include "forward.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../core/random.h"
#include "microkernels.h"
#include "tile_mask.h"

namespace sparse_attn::cpu {
namespace {

template <typename T>
const T* element(const Operand& op, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(op.data) + op.batch_offset[b] + h * op.stride_head +
         row * op.stride_row;
}

template <typename T>
T vector_norm(const T* x, int64_t n) {
  T sum = T(0);
  for (int64_t d = 0; d < n; ++d) sum += x[d] * x[d];
  return std::sqrt(sum);
}

// Per-thread buffers, allocated once per call and thread. Tiles are in "query lanes" order
// (see microkernels.h): q_packed[d][r], scores[c][r], acc[e][r].
template <typename T>
struct Scratch {
  std::vector<T> q_packed, scores, acc, row_max, row_sum, corr, row_scale, col_scale, best;
  std::vector<int64_t> best_index, row_fill;
  std::vector<uint64_t> row_bits;
  Scratch(int dim_qk, int dim_v)
      : q_packed(static_cast<size_t>(dim_qk) * kTileQ),
        scores(kTileK * kTileQ),
        acc(static_cast<size_t>(dim_v) * kTileQ),
        row_max(kTileQ),
        row_sum(kTileQ),
        corr(kTileQ),
        row_scale(kTileQ),
        col_scale(kTileK),
        best(kTileQ),
        best_index(kTileQ),
        row_fill(kTileQ),
        row_bits(kTileQ) {}
};

// One (batch, head, query tile) work item and what every mode needs to know about it.
struct QueryTile {
  int64_t b, h, kv_head, qt, row0;
  int rows;
  int64_t key_limit;  // keys at or past this local column are padding
  const Layout* layout;
};

template <typename T>
class TileWalker {
 public:
  TileWalker(const AttentionParams& p, const MicroKernels<T>& mk) : p_(p), mk_(mk) {}

  // Packs the query tile (with cosine row norms folded into its scale).
  void begin(const QueryTile& t, Scratch<T>& sc) const {
    const bool additive = p_.score == ScoreKind::Additive;
    const Operand& q = additive ? p_.q_proj : p_.q;
    const int dim = static_cast<int>(additive ? p_.additive_dim : p_.dim_qk);
    const T* rows = element<T>(q, t.b, t.h, t.row0);
    for (int r = 0; r < t.rows; ++r) {
      T row_scale = additive ? T(1) : static_cast<T>(p_.scale);
      if (p_.score == ScoreKind::Cosine) {
        const T norm = vector_norm(rows + r * q.stride_row, p_.dim_qk);
        row_scale = norm > T(0) ? row_scale / norm : T(0);
      }
      sc.row_scale[r] = row_scale;
    }
    mk_.pack_q(rows, q.stride_row, t.rows, dim, sc.row_scale.data(), sc.q_packed.data());
  }

  // Scores listed tile e of the query tile into sc.scores (s[c][r], masked entries -inf).
  // Returns the number of key columns, or 0 when the tile lies wholly in key padding.
  int score(const QueryTile& t, int64_t e, Scratch<T>& sc) const {
    const Layout& layout = *t.layout;
    const int64_t kt = layout.key_tiles()[e];
    const int64_t col0 = kt * kTileK;
    if (col0 >= t.key_limit) return 0;
    const int cols = static_cast<int>(layout.k_tile_cols(kt));
    T* s = sc.scores.data();
    if (p_.score == ScoreKind::Additive) {
      mk_.additive_score_tile(element<T>(p_.k_proj, t.b, t.kv_head, col0), p_.k_proj.stride_row,
                              cols, static_cast<int>(p_.additive_dim), sc.q_packed.data(),
                              static_cast<const T*>(p_.additive_w), s);
    } else {
      const T* keys = element<T>(p_.k, t.b, t.kv_head, col0);
      mk_.score_tile(keys, p_.k.stride_row, cols, static_cast<int>(p_.dim_qk),
                     sc.q_packed.data(), s);
      if (p_.score == ScoreKind::Cosine) {
        for (int c = 0; c < cols; ++c) {
          const T norm = vector_norm(keys + c * p_.k.stride_row, p_.dim_qk);
          sc.col_scale[c] = norm > T(0) ? T(1) / norm : T(0);
        }
      }
    }
    const T slope = p_.alibi_slopes ? static_cast<T>(p_.alibi_slopes[t.h]) : T(0);
    if (p_.score == ScoreKind::Cosine || p_.softcap > 0.0 || slope != T(0)) {
      mk_.score_epilogue(s, cols, p_.score == ScoreKind::Cosine ? sc.col_scale.data() : nullptr,
                         static_cast<T>(p_.softcap), slope, p_.q0 + t.row0, p_.k0 + col0);
    }
    if (p_.bias.data != nullptr) add_bias(t, col0, cols, s);
    const bool partial = layout.kinds()[e] == TileKind::Partial;
    if (partial || col0 + cols > t.key_limit || p_.mask.data != nullptr) {
      allowed_bits(t, kt, cols, partial, sc.row_bits.data());  // full tiles skip mask work
      mk_.mask_tile(s, cols, sc.row_bits.data());
    }
    return cols;
  }

  // Allowed columns of each query row of a tile: the layout's bits (partial tiles), the
  // key-length cut and the user's mask. Lanes past the last row get none.
  void allowed_bits(const QueryTile& t, int64_t kt, int cols, bool partial,
                    uint64_t* row_bits) const {
    tile_row_bits(p_, *t.layout, t.b, t.h, t.row0, t.rows, kt, cols, partial, t.key_limit,
                  row_bits);
  }

 private:
  // scores[c][r] += bias[row0 + r][col0 + c]
  void add_bias(const QueryTile& t, int64_t col0, int cols, T* s) const {
    for (int r = 0; r < t.rows; ++r) {
      const T* bias = element<T>(p_.bias, t.b, t.h, t.row0 + r) + col0 * p_.bias.stride_col;
      for (int c = 0; c < cols; ++c) s[c * kTileQ + r] += bias[c * p_.bias.stride_col];
    }
  }

  const AttentionParams& p_;
  const MicroKernels<T>& mk_;
};

// Zeroes dropped probabilities and scales kept ones by 1 / (1 - p), after the softmax update
// (so the normaliser and lse are those of the undropped softmax, as in FlashAttention).
template <typename T>
void apply_dropout(const AttentionParams& p, const QueryTile& t, int64_t col0, int cols, T* s) {
  const float drop = static_cast<float>(p.dropout_p);
  const T keep_scale = T(1) / (T(1) - static_cast<T>(p.dropout_p));
  for (int r = 0; r < t.rows; ++r) {
    const uint64_t stream =
        random_row_prefix(p.seed, RandomStream::Dropout, t.b, t.h, p.q0 + t.row0 + r);
    for (int c = 0; c < cols; ++c) {
      const uint64_t bits = random_bits_in_row(stream, p.k0 + col0 + c);
      T& prob = s[c * kTileQ + r];
      prob = random_uniform(bits) >= drop ? prob * keep_scale : T(0);
    }
  }
}

template <typename T>
void softmax_tile(const AttentionParams& p, const TileWalker<T>& walker,
                  const MicroKernels<T>& mk, const QueryTile& t, Scratch<T>& sc) {
  const Layout& layout = *t.layout;
  std::fill(sc.acc.begin(), sc.acc.end(), T(0));
  std::fill(sc.row_max.begin(), sc.row_max.end(), -std::numeric_limits<T>::infinity());
  std::fill(sc.row_sum.begin(), sc.row_sum.end(), T(0));
  for (int64_t e = layout.row_start(t.qt); e < layout.row_start(t.qt + 1); ++e) {
    const int cols = walker.score(t, e, sc);
    if (cols == 0) break;  // key tiles ascend: the rest is padding
    const int64_t col0 = layout.key_tiles()[e] * kTileK;
    mk.softmax_update(sc.scores.data(), cols, sc.row_max.data(), sc.row_sum.data(),
                      sc.corr.data());
    if (p.dropout_p > 0.0) apply_dropout(p, t, col0, cols, sc.scores.data());
    mk.accumulate_pv(sc.scores.data(), cols, element<T>(p.v, t.b, t.kv_head, col0),
                     p.v.stride_row, static_cast<int>(p.dim_v), sc.corr.data(), sc.acc.data());
  }
  const int64_t out_row0 = (t.b * p.heads_q + t.h) * p.len_q + t.row0;
  T* out = static_cast<T*>(p.out) + out_row0 * p.dim_v;
  for (int r = 0; r < t.rows; ++r) {
    const T sum = sc.row_sum[r];
    // An empty row gives zeros, never NaN; a NaN input keeps its row NaN.
    const T inv = sum == T(0) ? T(0) : T(1) / sum;
    for (int64_t e = 0; e < p.dim_v; ++e) out[r * p.dim_v + e] = sc.acc[e * kTileQ + r] * inv;
    if (p.lse != nullptr) {
      static_cast<T*>(p.lse)[out_row0 + r] =
          sum == T(0) ? -std::numeric_limits<T>::infinity() : sc.row_max[r] + std::log(sum);
    }
  }
}

// Hard attention: the allowed key with the largest score (ties: the lowest index, since keys
// are visited in ascending order and only a strictly larger score replaces the best), or with
// the largest score / temperature + Gumbel noise when sampling.
template <typename T>
void hard_tile(const AttentionParams& p, const TileWalker<T>& walker, const QueryTile& t,
               Scratch<T>& sc) {
  const Layout& layout = *t.layout;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::fill(sc.best.begin(), sc.best.end(), neg_inf);
  std::fill(sc.best_index.begin(), sc.best_index.end(), int64_t{-1});
  const T temperature = static_cast<T>(p.temperature);
  for (int64_t e = layout.row_start(t.qt); e < layout.row_start(t.qt + 1); ++e) {
    const int cols = walker.score(t, e, sc);
    if (cols == 0) break;
    const int64_t col0 = layout.key_tiles()[e] * kTileK;
    const T* s = sc.scores.data();
    for (int r = 0; r < t.rows; ++r) {
      const int64_t i = p.q0 + t.row0 + r;
      const uint64_t stream =
          p.sample ? random_row_prefix(p.seed, RandomStream::Gumbel, t.b, t.h, i) : 0;
      for (int c = 0; c < cols; ++c) {
        T value = s[c * kTileQ + r];
        if (!(value > neg_inf)) continue;  // masked (or NaN): never chosen
        if (p.sample) {
          // Gumbel(0, 1) = -log(-log(u)), u in (0, 1): the 24-bit uniform shifted by half a step.
          const uint64_t bits = random_bits_in_row(stream, p.k0 + col0 + c);
          const double u = (static_cast<double>(bits >> 40) + 0.5) * (1.0 / 16777216.0);
          // argmax of s / t + g is the argmax of s + t * g (t > 0), which cannot overflow
          value += temperature * static_cast<T>(-std::log(-std::log(u)));
        }
        if (value > sc.best[r]) {
          sc.best[r] = value;
          sc.best_index[r] = col0 + c;
        }
      }
    }
  }
  const int64_t out_row0 = (t.b * p.heads_q + t.h) * p.len_q + t.row0;
  T* out = static_cast<T*>(p.out) + out_row0 * p.dim_v;
  for (int r = 0; r < t.rows; ++r) {
    const int64_t j = sc.best_index[r];
    p.index[out_row0 + r] = j;
    const T* value = j >= 0 ? element<T>(p.v, t.b, t.kv_head, j) : nullptr;
    for (int64_t e = 0; e < p.dim_v; ++e) out[r * p.dim_v + e] = value ? value[e] : T(0);
  }
}

// The normalised probabilities exp(s - lse) of the allowed pairs, into a dense matrix or
// into CSR rows (columns ascending, the row sizes counted beforehand by count_tile).
template <typename T>
void weights_tile(const AttentionParams& p, const TileWalker<T>& walker, const QueryTile& t,
                  Scratch<T>& sc) {
  const Layout& layout = *t.layout;
  const int64_t out_row0 = (t.b * p.heads_q + t.h) * p.len_q + t.row0;
  const T* lse = static_cast<const T*>(p.lse) + out_row0;
  for (int r = 0; r < t.rows; ++r) sc.row_fill[r] = p.csr_row_ptr ? p.csr_row_ptr[out_row0 + r] : 0;
  for (int64_t e = layout.row_start(t.qt); e < layout.row_start(t.qt + 1); ++e) {
    const int cols = walker.score(t, e, sc);
    if (cols == 0) break;
    const int64_t kt = layout.key_tiles()[e];
    const int64_t col0 = kt * kTileK;
    if (p.csr_row_ptr != nullptr) {
      walker.allowed_bits(t, kt, cols, layout.kinds()[e] == TileKind::Partial, sc.row_bits.data());
    }
    for (int r = 0; r < t.rows; ++r) {
      const T row_lse = lse[r];
      const bool empty = row_lse == -std::numeric_limits<T>::infinity();
      if (p.csr_row_ptr == nullptr) {
        T* dense = static_cast<T*>(p.weights) + (out_row0 + r) * p.len_k + col0;
        for (int c = 0; c < cols; ++c) {
          dense[c] = empty ? T(0) : std::exp(sc.scores[c * kTileQ + r] - row_lse);
        }
        continue;
      }
      T* values = static_cast<T*>(p.weights);
      for (uint64_t bits = sc.row_bits[r]; bits != 0; bits &= bits - 1) {
        const int c = __builtin_ctzll(bits);
        const int64_t at = sc.row_fill[r]++;
        p.csr_col_index[at] = col0 + c;
        values[at] = empty ? T(0) : std::exp(sc.scores[c * kTileQ + r] - row_lse);
      }
    }
  }
}

// The number of allowed keys of every row (pattern, key lengths and mask), without scoring.
template <typename T>
void count_tile(const AttentionParams& p, const TileWalker<T>& walker, const QueryTile& t,
                Scratch<T>& sc) {
  const Layout& layout = *t.layout;
  std::fill(sc.row_fill.begin(), sc.row_fill.end(), int64_t{0});
  for (int64_t e = layout.row_start(t.qt); e < layout.row_start(t.qt + 1); ++e) {
    const int64_t kt = layout.key_tiles()[e];
    if (kt * kTileK >= t.key_limit) break;
    const int cols = static_cast<int>(layout.k_tile_cols(kt));
    walker.allowed_bits(t, kt, cols, layout.kinds()[e] == TileKind::Partial, sc.row_bits.data());
    for (int r = 0; r < t.rows; ++r) sc.row_fill[r] += __builtin_popcountll(sc.row_bits[r]);
  }
  const int64_t out_row0 = (t.b * p.heads_q + t.h) * p.len_q + t.row0;
  for (int r = 0; r < t.rows; ++r) p.row_counts[out_row0 + r] = sc.row_fill[r];
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
  const bool needs_out = p.mode == Mode::Softmax || p.mode == Mode::Hard;
  if ((needs_out && p.out == nullptr) || (p.mode == Mode::Hard && p.index == nullptr) ||
      (p.mode == Mode::Weights && (p.weights == nullptr || p.lse == nullptr)) ||
      (p.mode == Mode::Count && p.row_counts == nullptr)) {
    throw std::invalid_argument("forward: a result array of this mode is missing");
  }
  if (p.score == ScoreKind::Additive &&
      (p.q_proj.data == nullptr || p.k_proj.data == nullptr || p.additive_w == nullptr)) {
    throw std::invalid_argument("forward: the additive score needs q_proj, k_proj and w");
  }
}

template <typename T>
void run(const AttentionParams& p, const MicroKernels<T>& mk) {
  const int64_t num_q_tiles = (p.len_q + kTileQ - 1) / kTileQ;
  const int64_t per_rank = p.batch * p.heads_q;
  const int64_t items = per_rank * num_q_tiles;
  if (items == 0) return;
  // No more threads than work items, and at least kMinTilesPerThread listed tiles each: starting
  // a team costs more than a few tile steps (and its idle spinning slows a busy machine). A
  // single thread runs without a parallel region.
  constexpr int64_t kMinTilesPerThread = 16;
  int64_t listed = 0;
  for (int64_t h = 0; h < p.heads_q; ++h) listed += p.layouts[h]->num_listed();
  const int64_t by_work = std::max<int64_t>(1, listed * p.batch / kMinTilesPerThread);
  const int threads = static_cast<int>(
      std::min<int64_t>({static_cast<int64_t>(std::max(1, p.num_threads)), items, by_work}));
  // Allocated before any parallel region: std::bad_alloc must reach the caller, not terminate.
  const int dim = static_cast<int>(std::max(p.dim_qk, p.additive_dim));
  std::vector<Scratch<T>> scratches;
  scratches.reserve(threads);
  for (int t = 0; t < threads; ++t) scratches.emplace_back(dim, static_cast<int>(p.dim_v));
  const TileWalker<T> walker(p, mk);
  // Work item w: the rank-th most expensive query tile of (batch, head) = w % per_rank, so the
  // costliest work is handed out first and the threads run out of work together.
  auto work = [&](int64_t w, Scratch<T>& sc) {
    if (p.cancel != nullptr && p.cancel->load(std::memory_order_relaxed)) return;
    const int64_t rank = w / per_rank, bh = w % per_rank;
    QueryTile t;
    t.b = bh / p.heads_q;
    t.h = bh % p.heads_q;
    t.kv_head = t.h / (p.heads_q / p.heads_kv);
    t.layout = p.layouts[t.h];
    t.qt = t.layout->q_tiles_by_cost()[rank];
    t.row0 = t.qt * kTileQ;
    t.rows = static_cast<int>(t.layout->q_tile_rows(t.qt));
    t.key_limit = p.key_lengths ? std::min(p.key_lengths[t.b], p.len_k) : p.len_k;
    switch (p.mode) {
      case Mode::Softmax:
        walker.begin(t, sc);
        softmax_tile(p, walker, mk, t, sc);
        break;
      case Mode::Hard:
        walker.begin(t, sc);
        hard_tile(p, walker, t, sc);
        break;
      case Mode::Weights:
        walker.begin(t, sc);
        weights_tile(p, walker, t, sc);
        break;
      case Mode::Count:
        count_tile(p, walker, t, sc);
        break;
    }
  };
  if (threads == 1) {
    for (int64_t w = 0; w < items; ++w) work(w, scratches[0]);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Scratch<T>& sc = scratches[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < items; ++w) work(w, sc);
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
