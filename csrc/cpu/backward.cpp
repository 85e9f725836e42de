// The CPU backward loop (FlashAttention-2 style): probabilities are recomputed tile by tile from
// the forward's lse, only the layout's listed tiles are visited and Lq x Lk is never stored.
// This file owns the tile walks, the accumulation order and the threads; the arithmetic lives
// in the forward's and the backward's micro-kernels.
//
// Accumulation, and why the result is bitwise deterministic for any thread count:
//  * dK, dV of a (batch, kv head, key tile) are owned by one work item, which walks the query
//    tiles touching that key tile (the layout by key tile), for every query head of the GQA
//    group in ascending order, accumulating in thread-private tiles; one write at the end.
//  * dQ of a (batch, query head, query tile) accumulates its key tiles in ascending order, in a
//    buffer of (padded) dQ's size in which each query tile belongs to one item. Either the key-major pass does it as it goes
//    ("fused": an item is a whole (batch, kv head), so it owns the dQ rows of its group), or a
//    second, query-major pass recomputes P and dS ("split": when there are too few (batch,
//    kv head) items to keep the threads busy). Both compute each tile with the same function
//    and add the tiles to dQ in the same order, so they agree bit for bit; no atomics anywhere.
#include "backward.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "../core/random.h"
#include "backward_microkernels.h"
#include "microkernels.h"
#include "tile_mask.h"

namespace sparse_attn::cpu {
namespace {

// Matrix products per visited tile: S, dP, dV, dK and dQ; the split schedule recomputes S, dP.
constexpr int64_t kFusedProducts = 5;
constexpr int64_t kSplitProducts = 7;

constexpr int kTile = kTileQ * kTileK;
static_assert(kTileQ == kTileK, "dQ panels of 64 head dims are tiles");

// 64-wide panels of the head dim in which dQ accumulates ([panel][r][d % 64]).
int dim_panels(int64_t dim) { return static_cast<int>((dim + kTileK - 1) / kTileK); }

// Per-thread buffers, allocated once per call and thread. Key-lane tiles are t[r][c]. The
// "score dim" is the head dim D, or the additive score's projection dim A.
template <typename T>
struct Scratch {
  std::vector<T> k_packed, v_packed;  // scale * k[c][d] (or k_proj) as [d][c]; v as [e][c]
  std::vector<T> k_panels;            // k[c][d] as [panel][c][d % 64], zero-padded
  std::vector<T> probs, grad, kept;   // P, dP (then dS) and P after dropout: [r][c]
  std::vector<T> softcap_tanh;        // tanh(s / softcap) of the raw scores: [r][c]
  std::vector<T> dq_part;             // one key tile's dS K for one panel: [r][d % 64]
  std::vector<T> dk_t, dv_t;          // sum over query rows: [d][c] (score dim), [e][c]
  std::vector<T> key_scale, ones;     // pack_q's row scales for K (scale) and V (1); ones are
                                      // also the accumulators' rescale factor: none
  std::vector<uint64_t> row_bits, keep_bits;
  Scratch(int score_dim, int dim_v, int panels)
      : k_packed(static_cast<size_t>(score_dim) * kTileK),
        v_packed(static_cast<size_t>(dim_v) * kTileK),
        k_panels(static_cast<size_t>(panels) * kTile),
        probs(kTile),
        grad(kTile),
        kept(kTile),
        softcap_tanh(kTile),
        dq_part(kTile),
        dk_t(static_cast<size_t>(score_dim) * kTileK),
        dv_t(static_cast<size_t>(dim_v) * kTileK),
        key_scale(kTileK),
        ones(kTileQ, T(1)),
        row_bits(kTileQ),
        keep_bits(kTileQ) {}
};

template <typename T>
class BackwardPass {
 public:
  BackwardPass(const BackwardParams& p, const MicroKernels<T>& mk,
               const BackwardMicroKernels<T>& bk)
      : bp_(p), p_(p.forward), mk_(mk), bk_(bk) {
    num_q_tiles_ = (p_.len_q + kTileQ - 1) / kTileQ;
    num_k_tiles_ = (p_.len_k + kTileK - 1) / kTileK;
    group_ = p_.heads_q / p_.heads_kv;
    dim_ = static_cast<int>(p_.dim_qk);
    dim_v_ = static_cast<int>(p_.dim_v);
    additive_ = p_.score == ScoreKind::Additive;
    if (additive_) {  // the scale is folded into additive_w
      score_dim_ = static_cast<int>(p_.additive_dim);
      panels_ = 0;
      q_acc_size_ = kTileQ * score_dim_;
      scale_ = T(1);
    } else {
      score_dim_ = dim_;
      panels_ = dim_panels(p_.dim_qk);
      q_acc_size_ = panels_ * kTile;
      scale_ = static_cast<T>(p_.scale);
    }
    keep_scale_ = T(1) / (T(1) - static_cast<T>(p_.dropout_p));  // as the forward scales
  }

  void run() {
    const int threads = std::max(1, p_.num_threads);
    const int64_t query_items = p_.batch * p_.heads_q * num_q_tiles_;
    const int64_t group_items = p_.batch * p_.heads_kv;
    const int64_t key_items = group_items * num_k_tiles_;
    // Fused unless whole (batch, kv head) items leave threads idle for longer than the split
    // schedule's extra products cost (the item costs are assumed equal).
    const int64_t waves = (group_items + threads - 1) / threads;
    const bool fused = kFusedProducts * waves * threads <= kSplitProducts * group_items;

    // Allocated before the parallel regions: std::bad_alloc must reach the caller.
    for (int64_t h = 0; h < p_.heads_q; ++h) p_.layouts[h]->col_start(0);  // builds by-key lists
    delta_.resize(static_cast<size_t>(p_.batch * p_.heads_q * p_.len_q));
    dq_acc_.resize(static_cast<size_t>(query_items) * q_acc_size_);
    if (additive_) dw_parts_.assign(static_cast<size_t>(key_items) * score_dim_, T(0));
    std::vector<Scratch<T>> scratches;
    scratches.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      scratches.emplace_back(score_dim_, dim_v_, panels_);
      std::fill(scratches.back().key_scale.begin(), scratches.back().key_scale.end(), scale_);
    }

#pragma omp parallel num_threads(threads)
    {
      Scratch<T>& scratch = scratches[omp_get_thread_num()];
#pragma omp for schedule(static)
      for (int64_t w = 0; w < query_items; ++w) prepare_query_tile(w);
      if (fused) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < group_items; ++w) {
          for (int64_t kt = 0; kt < num_k_tiles_ && !cancelled(); ++kt) {
            key_tile(w, kt, true, scratch);
          }
        }
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < key_items; ++w) {
          if (!cancelled()) key_tile(w / num_k_tiles_, w % num_k_tiles_, false, scratch);
        }
        // Most expensive query tiles first, so the threads run out of work together.
        const int64_t per_rank = p_.batch * p_.heads_q;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < query_items; ++w) {
          const int64_t bh = w % per_rank, h = bh % p_.heads_q;
          if (!cancelled()) query_tile_dq(bh, p_.layouts[h]->q_tiles_by_cost()[w / per_rank], scratch);
        }
      }
#pragma omp for schedule(static)
      for (int64_t w = 0; w < query_items; ++w) write_dq(w);
    }
    if (additive_) {  // dw: the key tiles' partial sums, added in one fixed order
      T* dw = static_cast<T*>(bp_.d_additive_w);
      std::fill_n(dw, score_dim_, T(0));
      for (int64_t item = 0; item < key_items; ++item) {
        for (int a = 0; a < score_dim_; ++a) dw[a] += dw_parts_[item * score_dim_ + a];
      }
    }
  }

 private:
  // Ctrl-C from Python: stop between tiles (the result is discarded).
  bool cancelled() const {
    return p_.cancel != nullptr && p_.cancel->load(std::memory_order_relaxed);
  }

  // ---- indexing ---------------------------------------------------------------------------------

  int64_t key_limit(int64_t b) const {
    return p_.key_lengths ? std::min(p_.key_lengths[b], p_.len_k) : p_.len_k;
  }
  int tile_rows(int64_t qt) const {
    return static_cast<int>(std::min<int64_t>(kTileQ, p_.len_q - qt * kTileQ));
  }
  int tile_cols(int64_t kt) const {
    return static_cast<int>(std::min<int64_t>(kTileK, p_.len_k - kt * kTileK));
  }
  // Offset of (b, h, row) in the contiguous (batch, heads_q, len_q) lse and delta arrays.
  int64_t row_index(int64_t b, int64_t h, int64_t row) const {
    return (b * p_.heads_q + h) * p_.len_q + row;
  }
  // The query-side accumulator of (b, h, qt): dQ panels, or d(q_proj) rows [r][a] (additive).
  T* dq_tile(int64_t b, int64_t h, int64_t qt) {
    return dq_acc_.data() + ((b * p_.heads_q + h) * num_q_tiles_ + qt) * q_acc_size_;
  }
  T* dw_part(int64_t b, int64_t kv_head, int64_t kt) {
    return dw_parts_.data() + ((b * p_.heads_kv + kv_head) * num_k_tiles_ + kt) * score_dim_;
  }
  // The additive score's query projections, read like q.
  const T* q_proj_rows(int64_t b, int64_t h, int64_t row0) const {
    return operand_row<T>(p_.q_proj, b, h, row0);
  }

  // ---- passes -----------------------------------------------------------------------------------

  // delta[i] = rowsum(dO * O) for the rows of one query tile (summed in double); dQ zeroed.
  void prepare_query_tile(int64_t w) {
    const int64_t qt = w % num_q_tiles_, bh = w / num_q_tiles_;
    const int64_t b = bh / p_.heads_q, h = bh % p_.heads_q;
    const int rows = tile_rows(qt);
    for (int r = 0; r < rows; ++r) {
      const int64_t row = qt * kTileQ + r;
      const T* o = operand_row<T>(bp_.out, b, h, row);
      const T* g = operand_row<T>(bp_.grad_out, b, h, row);
      double sum = 0.0;
      for (int e = 0; e < dim_v_; ++e) sum += static_cast<double>(o[e]) * g[e];
      delta_[row_index(b, h, row)] = static_cast<T>(sum);
    }
    std::fill_n(dq_tile(b, h, qt), q_acc_size_, T(0));
  }

  // dK (or d k_proj) and dV of key tile kt of kv head (group % heads_kv) of batch entry
  // group / heads_kv, from every query tile of the group's query heads that touches it;
  // with_dq also adds each visited tile's share of dQ (the fused schedule, where this item owns
  // its group's dQ rows). The additive score also adds the tile's share of dw.
  void key_tile(int64_t group_item, int64_t kt, bool with_dq, Scratch<T>& s) {
    const int64_t b = group_item / p_.heads_kv, kv_head = group_item % p_.heads_kv;
    const int64_t col0 = kt * kTileK;
    const int cols = tile_cols(kt);
    const int64_t key_row = (b * p_.heads_kv + kv_head) * p_.len_k + col0;
    T* dk = static_cast<T*>(additive_ ? bp_.d_k_proj : bp_.dk) + key_row * score_dim_;
    T* dv = static_cast<T*>(bp_.dv) + key_row * dim_v_;
    const int64_t limit = key_limit(b);
    if (col0 >= limit) {  // padding keys: no query sees them
      std::fill_n(dk, static_cast<int64_t>(cols) * score_dim_, T(0));
      std::fill_n(dv, static_cast<int64_t>(cols) * dim_v_, T(0));
      return;
    }
    pack_key_tile(b, kv_head, kt, with_dq, s);
    std::fill(s.dk_t.begin(), s.dk_t.end(), T(0));
    std::fill(s.dv_t.begin(), s.dv_t.end(), T(0));

    for (int64_t h = kv_head * group_; h < (kv_head + 1) * group_; ++h) {
      const Layout& layout = *p_.layouts[h];
      for (int64_t e = layout.col_start(kt); e < layout.col_start(kt + 1); ++e) {
        const int64_t qt = layout.query_tiles_by_key()[e];
        const int rows = tile_rows(qt);
        const int64_t row0 = qt * kTileQ;
        const bool partial = layout.kinds_by_key()[e] == TileKind::Partial;
        const T* kept = tile_grads(b, h, qt, kt, partial, bp_.dbias != nullptr, s);
        mk_.accumulate_pv(kept, rows, operand_row<T>(bp_.grad_out, b, h, row0),
                          bp_.grad_out.stride_row, dim_v_, s.ones.data(), s.dv_t.data());
        if (additive_) {
          bk_.additive_grad(s.grad.data(), rows, q_proj_rows(b, h, row0), p_.q_proj.stride_row,
                            score_dim_, s.k_packed.data(), additive_w(),
                            with_dq ? dq_tile(b, h, qt) : nullptr, s.dk_t.data(),
                            dw_part(b, kv_head, kt));
          continue;
        }
        mk_.accumulate_pv(s.grad.data(), rows, operand_row<T>(p_.q, b, h, row0), p_.q.stride_row,
                          dim_, s.ones.data(), s.dk_t.data());
        if (with_dq) add_to_dq(b, h, qt, cols, s);
      }
    }
    for (int c = 0; c < cols; ++c) {
      for (int d = 0; d < score_dim_; ++d) {
        dk[c * score_dim_ + d] = scale_ * s.dk_t[d * kTileK + c];
      }
      for (int d = 0; d < dim_v_; ++d) dv[c * dim_v_ + d] = s.dv_t[d * kTileK + c];
    }
  }

  // dQ of one query tile from its listed key tiles, recomputing P and dS (the split schedule).
  void query_tile_dq(int64_t bh, int64_t qt, Scratch<T>& s) {
    const int64_t b = bh / p_.heads_q, h = bh % p_.heads_q;
    const int64_t kv_head = h / group_;
    const Layout& layout = *p_.layouts[h];
    const int64_t limit = key_limit(b);
    for (int64_t e = layout.row_start(qt); e < layout.row_start(qt + 1); ++e) {
      const int64_t kt = layout.key_tiles()[e];
      if (kt * kTileK >= limit) break;  // key tiles ascend: the rest is padding
      pack_key_tile(b, kv_head, kt, true, s);
      tile_grads(b, h, qt, kt, layout.kinds()[e] == TileKind::Partial, false, s);
      if (additive_) {
        bk_.additive_grad(s.grad.data(), tile_rows(qt), q_proj_rows(b, h, qt * kTileQ),
                          p_.q_proj.stride_row, score_dim_, s.k_packed.data(), additive_w(),
                          dq_tile(b, h, qt), nullptr, nullptr);
      } else {
        add_to_dq(b, h, qt, tile_cols(kt), s);
      }
    }
  }

  // dQ rows of one query tile from its panels: dq[r][d] = scale * sum over key tiles; or the
  // additive score's d q_proj rows.
  void write_dq(int64_t w) {
    const int64_t qt = w % num_q_tiles_, bh = w / num_q_tiles_;
    const T* acc = dq_tile(bh / p_.heads_q, bh % p_.heads_q, qt);
    const int rows = tile_rows(qt);
    if (additive_) {
      T* dqp = static_cast<T*>(bp_.d_q_proj) + (bh * p_.len_q + qt * kTileQ) * score_dim_;
      std::copy_n(acc, static_cast<int64_t>(rows) * score_dim_, dqp);
      return;
    }
    T* dq = static_cast<T*>(bp_.dq) + (bh * p_.len_q + qt * kTileQ) * dim_;
    for (int r = 0; r < rows; ++r) {
      for (int d = 0; d < dim_; ++d) {
        dq[r * dim_ + d] = scale_ * acc[(d / kTileK) * kTile + r * kTileK + d % kTileK];
      }
    }
  }

  // ---- one tile ---------------------------------------------------------------------------------

  // k_packed = scale * K (additive: k_proj) and v_packed = V of one key tile, keys along the
  // lanes (zero padded); with with_dq also K in 64-wide panels of the head dim (keys along the
  // rows) for dS K.
  void pack_key_tile(int64_t b, int64_t kv_head, int64_t kt, bool with_dq, Scratch<T>& s) {
    const int64_t col0 = kt * kTileK;
    const int cols = tile_cols(kt);
    mk_.pack_q(operand_row<T>(p_.v, b, kv_head, col0), p_.v.stride_row, cols, dim_v_,
               s.ones.data(), s.v_packed.data());
    if (additive_) {
      mk_.pack_q(operand_row<T>(p_.k_proj, b, kv_head, col0), p_.k_proj.stride_row, cols,
                 score_dim_, s.ones.data(), s.k_packed.data());
      return;
    }
    const T* k = operand_row<T>(p_.k, b, kv_head, col0);
    mk_.pack_q(k, p_.k.stride_row, cols, dim_, s.key_scale.data(), s.k_packed.data());
    if (!with_dq) return;
    for (int panel = 0; panel < panels_; ++panel) {
      const int d0 = panel * kTileK, width = std::min(kTileK, dim_ - d0);
      T* rows = s.k_panels.data() + panel * kTile;
      for (int c = 0; c < cols; ++c) {
        std::copy_n(k + c * p_.k.stride_row + d0, width, rows + c * kTileK);
        std::fill(rows + c * kTileK + width, rows + (c + 1) * kTileK, T(0));
      }
    }
  }

  // For the (query tile qt, key tile kt) pair of head h, with K and V packed: s.probs = P and
  // s.grad = dS = P * (dP - delta), the gradient of the scores (written to dbias when
  // with_dbias), then taken through the softcap to the raw scaled scores. Returns the
  // probabilities that multiplied V in the forward (P, or P after dropout). Rows past the
  // tile's last row hold garbage and are never read.
  const T* tile_grads(int64_t b, int64_t h, int64_t qt, int64_t kt, bool partial,
                      bool with_dbias, Scratch<T>& s) {
    const Layout& layout = *p_.layouts[h];
    const int64_t row0 = qt * kTileQ, col0 = kt * kTileK;
    const int rows = tile_rows(qt), cols = tile_cols(kt);
    const int64_t limit = key_limit(b);
    T* const probs = s.probs.data();
    T* const grad = s.grad.data();

    if (additive_) {  // the forward's tile with the roles of queries and keys swapped
      mk_.additive_score_tile(q_proj_rows(b, h, row0), p_.q_proj.stride_row, rows, score_dim_,
                              s.k_packed.data(), additive_w(), probs);
    } else {
      mk_.score_tile(operand_row<T>(p_.q, b, h, row0), p_.q.stride_row, rows, dim_,
                     s.k_packed.data(), probs);
    }
    const bool softcap = p_.softcap > 0.0;
    const T slope = p_.alibi_slopes != nullptr ? static_cast<T>(p_.alibi_slopes[h]) : T(0);
    if (softcap || slope != T(0)) {
      bk_.score_epilogue(probs, rows, static_cast<T>(p_.softcap), s.softcap_tanh.data(), slope,
                         p_.q0 + row0, p_.k0 + col0);
    }
    if (p_.bias.data != nullptr) add_bias(b, h, row0, rows, col0, cols, probs);
    // Lanes past the last key hold scores of zero-padded keys: mask them as well.
    if (partial || col0 + cols > limit || cols < kTileK || p_.mask.data != nullptr) {
      tile_row_bits(p_, layout, b, h, row0, rows, kt, cols, partial, limit, s.row_bits.data());
      bk_.mask_rows(probs, rows, s.row_bits.data());
    }
    bk_.probs_from_lse(probs, rows, static_cast<const T*>(p_.lse) + row_index(b, h, row0));
    if (dim_v_ > 0) {  // the products need a depth of at least one
      mk_.score_tile(operand_row<T>(bp_.grad_out, b, h, row0), bp_.grad_out.stride_row, rows,
                     dim_v_, s.v_packed.data(), grad);
    } else {
      std::fill_n(grad, rows * kTileK, T(0));
    }
    const T* kept = probs;
    if (p_.dropout_p > 0.0) {
      dropout_keep_bits(b, h, p_.q0 + row0, rows, p_.k0 + col0, cols, s.keep_bits.data());
      bk_.apply_dropout(probs, s.kept.data(), grad, rows, s.keep_bits.data(), keep_scale_);
      kept = s.kept.data();
    }
    bk_.grad_scores(probs, grad, rows, delta_.data() + row_index(b, h, row0));
    if (with_dbias) write_dbias(b, h, row0, rows, col0, cols, grad);
    if (softcap) bk_.softcap_grad(grad, rows, s.softcap_tanh.data());
    return kept;
  }

  // dQ panels of (b, h, qt) += dS K for the tile in s.grad (K unscaled, from s.k_panels).
  void add_to_dq(int64_t b, int64_t h, int64_t qt, int cols, Scratch<T>& s) {
    const int rows = tile_rows(qt);
    T* acc = dq_tile(b, h, qt);
    for (int panel = 0; panel < panels_; ++panel) {
      // dq_part[r][d] = sum_c dS[r][c] * k[c][d]: the score product with dS in K's place.
      mk_.score_tile(s.grad.data(), kTileK, rows, cols, s.k_panels.data() + panel * kTile,
                     s.dq_part.data());
      bk_.add_rows(acc + panel * kTile, s.dq_part.data(), rows);
    }
  }

  // t[r][c] += bias[row0 + r][col0 + c]
  void add_bias(int64_t b, int64_t h, int64_t row0, int rows, int64_t col0, int cols, T* t) const {
    for (int r = 0; r < rows; ++r) {
      const T* bias = operand_row<T>(p_.bias, b, h, row0 + r) + col0 * p_.bias.stride_col;
      T* row = t + r * kTileK;
      for (int c = 0; c < cols; ++c) row[c] += bias[c * p_.bias.stride_col];
    }
  }

  // dbias[b][h][row0 + r][col0 + c] = dS[r][c]; each element belongs to one visited tile.
  void write_dbias(int64_t b, int64_t h, int64_t row0, int rows, int64_t col0, int cols,
                   const T* grad) const {
    T* dbias = static_cast<T*>(bp_.dbias) + row_index(b, h, row0) * p_.len_k + col0;
    for (int r = 0; r < rows; ++r) {
      std::memcpy(dbias + r * p_.len_k, grad + r * kTileK, sizeof(T) * cols);
    }
  }

  // keep[r] bit c: the forward kept the pair at absolute (i0 + r, j0 + c), i.e. its draw
  // random_bits(seed, Dropout, b, h, i, j) is uniform >= dropout_p (compared in float).
  void dropout_keep_bits(int64_t b, int64_t h, int64_t i0, int rows, int64_t j0, int cols,
                         uint64_t* keep) const {
    const float drop = static_cast<float>(p_.dropout_p);
    for (int r = 0; r < rows; ++r) {
      const uint64_t row = random_row_prefix(p_.seed, RandomStream::Dropout, b, h, i0 + r);
      uint64_t bits = 0;
      for (int c = 0; c < cols; ++c) {
        if (random_uniform(random_bits_in_row(row, j0 + c)) >= drop) bits |= uint64_t{1} << c;
      }
      keep[r] = bits;
    }
  }

  const T* additive_w() const { return static_cast<const T*>(p_.additive_w); }

  const BackwardParams& bp_;
  const AttentionParams& p_;
  const MicroKernels<T>& mk_;
  const BackwardMicroKernels<T>& bk_;
  int64_t num_q_tiles_ = 0, num_k_tiles_ = 0, group_ = 1;
  int dim_ = 0, dim_v_ = 0;
  bool additive_ = false;
  int score_dim_ = 0;   // D, or the additive projection dim A
  int panels_ = 1;      // 64-wide panels of D in dQ (none for the additive score)
  int64_t q_acc_size_ = 0;  // elements of one query tile's accumulator
  T scale_ = 1, keep_scale_ = 1;
  std::vector<T> delta_;     // rowsum(dO * O), contiguous (batch, heads_q, len_q)
  std::vector<T> dq_acc_;    // unscaled dQ [panel][r][d % 64] (or d q_proj [r][a]) per query tile
  std::vector<T> dw_parts_;  // additive: each (batch, kv head, key tile)'s share of dw
};

void check(const BackwardParams& bp) {
  const AttentionParams& p = bp.forward;
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) {
    throw std::invalid_argument("backward: heads_q must be a multiple of heads_kv");
  }
  for (int64_t h = 0; h < p.heads_q; ++h) {
    const LayoutSpec& s = p.layouts[h]->spec();
    if (s.len_q != p.len_q || s.len_k != p.len_k || s.tile_q != kTileQ || s.tile_k != kTileK) {
      throw std::invalid_argument("backward: layout does not match the problem or the tile size");
    }
  }
  if (!(p.dropout_p >= 0.0 && p.dropout_p < 1.0)) {
    throw std::invalid_argument("backward: dropout_p must lie in [0, 1)");
  }
  if (p.mode != Mode::Softmax || p.lse == nullptr) {
    throw std::invalid_argument("backward: differentiates a softmax pass and needs its lse");
  }
  if (p.score == ScoreKind::Cosine) {  // it arrives as dot products of unit rows
    throw std::invalid_argument("backward: differentiate cosine scores as dot products");
  }
  const bool additive = p.score == ScoreKind::Additive;
  if (additive && (p.q_proj.data == nullptr || p.k_proj.data == nullptr ||
                   p.additive_w == nullptr || bp.d_q_proj == nullptr ||
                   bp.d_k_proj == nullptr || bp.d_additive_w == nullptr || p.additive_dim < 1)) {
    throw std::invalid_argument("backward: the additive score needs its projections and results");
  }
  if ((!additive && (bp.dq == nullptr || bp.dk == nullptr)) || bp.dv == nullptr) {
    throw std::invalid_argument("backward: a result array is missing");
  }
  if (p.q.stride_col != 1 || p.k.stride_col != 1 || p.v.stride_col != 1 ||
      bp.out.stride_col != 1 || bp.grad_out.stride_col != 1) {
    throw std::invalid_argument("backward: q, k, v, out and grad_out need unit column stride");
  }
}

}  // namespace

void backward(const BackwardParams& params) {
  check(params);
  const AttentionParams& p = params.forward;
  if (p.batch * p.heads_q * p.len_q == 0 && p.batch * p.heads_kv * p.len_k == 0) return;
  if (p.dtype == DType::Float32) {
    BackwardPass<float>(params, microkernels_f32(), backward_microkernels_f32()).run();
  } else {
    BackwardPass<double>(params, microkernels_f64(), backward_microkernels_f64()).run();
  }
}

}  // namespace sparse_attn::cpu
