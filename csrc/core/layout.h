// The layout compiler: from a pattern program and a problem window, the key tiles each query
// tile must visit, each marked full (no mask work) or partial (evaluate the predicate).
// Device-free C++; knows nothing of Python or of any kernel.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "predicates.h"

namespace sparse_attn {

enum class TileKind : uint8_t { Empty = 0, Partial = 1, Full = 2 };

// The window of the full problem this layout covers: local query row r is global row q0 + r.
struct LayoutSpec {
  int64_t len_q = 0, len_k = 0;    // rows and columns of this window
  int64_t tile_q = 64, tile_k = 64;
  int64_t q0 = 0, k0 = 0;          // absolute offsets of the window in the full problem
};

// A compiled layout is immutable once built and owns a copy of its program's data, so
// kernels may read it from many threads and it may outlive the caller's arrays.
class Layout {
 public:
  Layout(std::vector<PatternNode> nodes, const LayoutSpec& spec);

  const LayoutSpec& spec() const { return spec_; }
  PatternProgram program() const { return {nodes_.data(), static_cast<int32_t>(nodes_.size())}; }
  int64_t num_q_tiles() const { return num_q_tiles_; }
  int64_t num_k_tiles() const { return num_k_tiles_; }
  int64_t num_listed() const { return static_cast<int64_t>(key_tiles_.size()); }

  // Key tiles of query tile qt: key_tiles()[row_start(qt) .. row_start(qt + 1)), ascending.
  int64_t row_start(int64_t qt) const { return row_start_[qt]; }
  const int32_t* key_tiles() const { return key_tiles_.data(); }
  const TileKind* kinds() const { return kinds_.data(); }

  // Query tiles of key tile kt, for passes that walk by key tile (the backward pass):
  // query_tiles_by_key()[col_start(kt) .. col_start(kt + 1)), ascending, with their kinds.
  // Built on first use (thread-safe), since forward passes never need it.
  int64_t col_start(int64_t kt) const { return by_key().col_start[kt]; }
  const int32_t* query_tiles_by_key() const { return by_key().query_tiles.data(); }
  const TileKind* kinds_by_key() const { return by_key().kinds.data(); }
  // Query tiles ordered by decreasing number of listed key tiles: schedulers hand out the
  // most expensive work first so threads finish together (causal, global rows).
  const int32_t* q_tiles_by_cost() const { return q_tiles_by_cost_.data(); }

  // Rows and columns of a tile (the last tile of each axis may be short).
  int64_t q_tile_rows(int64_t qt) const;
  int64_t k_tile_cols(int64_t kt) const;

  int64_t count_allowed() const;     // exact number of allowed (i, j) pairs
  int64_t count_empty_rows() const;  // query rows with no allowed key

  // Allowed columns of local row r within local key tile kt (bit c = column kt*tile_k + c).
  uint64_t tile_row_bits(int64_t r, int64_t kt) const {
    return row_bits(program(), spec_.q0 + r, spec_.k0 + kt * spec_.tile_k,
                    static_cast<int>(k_tile_cols(kt)));
  }

 private:
  struct ByKey {
    std::vector<int64_t> col_start;
    std::vector<int32_t> query_tiles;
    std::vector<TileKind> kinds;
  };
  void compile();
  const ByKey& by_key() const;

  std::vector<PatternNode> nodes_;
  std::vector<std::vector<int64_t>> storage_;  // owned node data, 8-byte aligned
  LayoutSpec spec_;
  int64_t num_q_tiles_ = 0, num_k_tiles_ = 0;
  std::vector<int64_t> row_start_;
  std::vector<int32_t> key_tiles_;
  std::vector<TileKind> kinds_;
  std::vector<int32_t> q_tiles_by_cost_;
  mutable std::once_flag by_key_once_;
  mutable ByKey by_key_;
};

// Validates the program and the spec (std::invalid_argument on a malformed one), copies the
// nodes' data and compiles. Cost grows with the number of listed tiles, not with len_q * len_k.
std::shared_ptr<const Layout> compile_layout(const std::vector<PatternNode>& nodes,
                                             const LayoutSpec& spec);

}  // namespace sparse_attn
