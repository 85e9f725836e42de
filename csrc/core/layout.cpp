// The layout compiler. Per query tile it derives, from each primitive, the key tiles that may
// hold an allowed pair (a short list of intervals), then classifies each candidate exactly.
// Nothing here touches Lq * Lk elements except the Mask primitive, whose input is that size.
#include "layout.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace sparse_attn {
namespace {

// Half-open intervals of key tile indices, sorted and disjoint.
using Intervals = std::vector<std::pair<int64_t, int64_t>>;

// The compiler's knowledge of a (query tile, key tile) pair. Maybe: may be empty, needs a scan.
enum class Class : uint8_t { Empty, Partial, Full, Maybe };

int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }

size_t element_bytes(Op op) { return node_data_is_int64(op) ? sizeof(int64_t) : sizeof(uint8_t); }

void append_merged(Intervals& out, int64_t lo, int64_t hi) {
  if (lo >= hi) return;
  if (!out.empty() && lo <= out.back().second) {
    out.back().second = std::max(out.back().second, hi);
  } else {
    out.emplace_back(lo, hi);
  }
}

void union_into(const Intervals& a, const Intervals& b, Intervals& out) {
  out.clear();
  size_t x = 0, y = 0;
  while (x < a.size() || y < b.size()) {
    const bool take_a = y == b.size() || (x < a.size() && a[x].first <= b[y].first);
    const auto& iv = take_a ? a[x++] : b[y++];
    append_merged(out, iv.first, iv.second);
  }
}

void intersect_into(const Intervals& a, const Intervals& b, Intervals& out) {
  out.clear();
  size_t x = 0, y = 0;
  while (x < a.size() && y < b.size()) {
    const int64_t lo = std::max(a[x].first, b[y].first);
    const int64_t hi = std::min(a[x].second, b[y].second);
    if (lo < hi) out.emplace_back(lo, hi);
    if (a[x].second < b[y].second) ++x; else ++y;
  }
}

Class union_class(Class a, Class b) {
  if (a == Class::Full || b == Class::Full) return Class::Full;
  if (a == Class::Partial || b == Class::Partial) return Class::Partial;
  if (a == Class::Maybe || b == Class::Maybe) return Class::Maybe;
  return Class::Empty;
}

Class intersect_class(Class a, Class b) {
  if (a == Class::Empty || b == Class::Empty) return Class::Empty;
  if (a == Class::Full) return b;
  if (b == Class::Full) return a;
  return Class::Maybe;
}

// Rectangle of global positions covered by one tile: rows [i0, i1], cols [j0, j1] inclusive.
struct TileRect {
  int64_t i0, i1, j0, j1;
};

// Whether every column of [lo, hi] is a summary column of Fixed (j mod block >= block - summary).
bool all_summary(int64_t lo, int64_t hi, int64_t block, int64_t summary) {
  return lo > hi || summary >= block ||
         (floor_div(lo, block) == floor_div(hi, block) && pos_mod(lo, block) >= block - summary);
}

// Whether some column of [lo, hi] is a summary column of Fixed.
bool any_summary(int64_t lo, int64_t hi, int64_t block, int64_t summary) {
  if (summary <= 0 || lo > hi) return false;
  const int64_t r = pos_mod(lo, block);
  const int64_t next = r >= block - summary ? lo : lo + (block - summary - r);
  return next <= hi;
}

// Allowed pairs of a random primitive per key tile, for the rows of one query tile: the
// compiler draws each row (block row) once per query tile, then looks tiles up here.
struct DrawnTiles {
  int64_t i0 = -1, i1 = -1;                          // the query rows these counts are for
  std::vector<std::pair<int64_t, int64_t>> counts;  // (key tile, allowed pairs), ascending
};

class Compiler {
 public:
  Compiler(const Layout& layout, const LayoutSpec& spec)
      : program_(layout.program()), spec_(spec) {
    num_k_tiles_ = ceil_div(spec.len_k, spec.tile_k);
    // The column half of Global and the summary columns of Fixed are the same for every query
    // tile: list them once.
    static_cols_.resize(program_.size);
    drawn_.resize(program_.size);
    const int64_t k_first = spec.k0, k_last = spec.k0 + spec.len_k - 1;
    for (int32_t n = 0; n < program_.size; ++n) {
      const PatternNode& node = program_.nodes[n];
      if (node.op == Op::Global && node.b) {
        const auto* tokens = static_cast<const int64_t*>(node.data);
        for (int64_t t = 0; t < node.data_len; ++t) {
          append_tiles(static_cols_[n], tokens[t], tokens[t]);
        }
      } else if (node.op == Op::Fixed && node.b > 0 && spec.len_k > 0) {
        const int64_t block = node.a, summary = node.b;
        for (int64_t kb = floor_div(k_first, block); kb <= floor_div(k_last, block); ++kb) {
          append_tiles(static_cols_[n], kb * block + block - summary, kb * block + block - 1);
        }
      }
    }
    stack_.resize(kMaxProgramDepth);
  }

  // Candidate key tiles of the query tile with global rows [i0, i1].
  const Intervals& support(int64_t i0, int64_t i1) {
    int top = 0;
    for (int32_t n = 0; n < program_.size; ++n) {
      const PatternNode& node = program_.nodes[n];
      if (node.op == Op::Union || node.op == Op::Intersect) {
        Intervals& a = stack_[top - 2];
        Intervals& b = stack_[top - 1];
        if (node.op == Op::Union) union_into(a, b, scratch_); else intersect_into(a, b, scratch_);
        std::swap(a, scratch_);
        --top;
      } else {
        Intervals& out = stack_[top++];
        out.clear();
        primitive_support(n, node, i0, i1, out);
      }
    }
    return stack_[0];
  }

  Class classify(const TileRect& t) {
    Class stack[kMaxProgramDepth];
    int top = 0;
    for (int32_t n = 0; n < program_.size; ++n) {
      const PatternNode& node = program_.nodes[n];
      if (node.op == Op::Union) {
        --top;
        stack[top - 1] = union_class(stack[top - 1], stack[top]);
      } else if (node.op == Op::Intersect) {
        --top;
        stack[top - 1] = intersect_class(stack[top - 1], stack[top]);
      } else {
        stack[top++] = primitive_class(n, node, t);
      }
    }
    if (stack[0] != Class::Maybe) return stack[0];
    // Composite the analysis cannot decide: scan the tile's rows with the shared predicate.
    const int width = static_cast<int>(t.j1 - t.j0 + 1);
    const uint64_t all = bit_range(0, width);
    bool any = false, full = true;
    for (int64_t i = t.i0; i <= t.i1; ++i) {
      const uint64_t bits = row_bits(program_, i, t.j0, width);
      any = any || bits != 0;
      full = full && bits == all;
    }
    return full ? Class::Full : any ? Class::Partial : Class::Empty;
  }

 private:
  // Appends the key tiles overlapping global columns [lo, hi] to out (kept sorted by callers).
  void append_tiles(Intervals& out, int64_t lo, int64_t hi) const {
    lo = std::max(lo, spec_.k0);
    hi = std::min(hi, spec_.k0 + spec_.len_k - 1);
    if (lo > hi) return;
    append_merged(out, (lo - spec_.k0) / spec_.tile_k, (hi - spec_.k0) / spec_.tile_k + 1);
  }

  void primitive_support(int32_t n, const PatternNode& node, int64_t i0, int64_t i1,
                         Intervals& out) {
    const int64_t k_first = spec_.k0, k_last = spec_.k0 + spec_.len_k - 1;
    switch (node.op) {
      case Op::Causal:
        append_tiles(out, k_first, i1 + node.a);
        return;
      case Op::Window:
        append_tiles(out, i0 - node.a, i1 + node.b);
        return;
      case Op::Strided: {
        const int64_t stride = node.a, reach = node.b;
        const int64_t lo = reach >= 0 ? std::max(k_first, i0 - reach) : k_first;
        const int64_t hi = reach >= 0 ? std::min(k_last, i1 + reach) : k_last;
        if (lo > hi) return;
        if (stride <= spec_.tile_k) {
          append_tiles(out, lo, hi);
          return;
        }
        // j = i - m * stride: one run of columns per m, in ascending column order.
        const int64_t m_first = -floor_div(hi - i0, stride);  // ceil((i0 - hi) / stride)
        const int64_t m_last = floor_div(i1 - lo, stride);
        for (int64_t m = m_last; m >= m_first; --m) {
          append_tiles(out, std::max(lo, i0 - m * stride), std::min(hi, i1 - m * stride));
        }
        return;
      }
      case Op::Global: {
        const auto* tokens = static_cast<const int64_t*>(node.data);
        const int64_t at = lower_bound_i64(tokens, node.data_len, i0);
        if (node.a && at < node.data_len && tokens[at] <= i1) {
          append_tiles(out, k_first, k_last);
        } else {
          out = static_cols_[n];
        }
        return;
      }
      case Op::Random:
      case Op::RandomBlocks:
        for (const auto& [kt, count] : drawn_tiles(n, node, i0, i1).counts) {
          append_merged(out, kt, kt + 1);
        }
        return;
      case Op::Fixed: {
        const int64_t block = node.a;
        Intervals& same_block = scratch_fixed_;
        same_block.clear();
        append_tiles(same_block, floor_div(i0, block) * block,
                     floor_div(i1, block) * block + block - 1);
        union_into(static_cols_[n], same_block, out);
        return;
      }
      case Op::Documents: {
        const auto* ends = static_cast<const int64_t*>(node.data);
        int64_t first_start = 0, first_end = 0, last_start = 0, last_end = 0;
        if (!document_span(ends, node.data_len, std::max<int64_t>(i0, 0), first_start, first_end)) {
          return;  // every row lies past the last document
        }
        const int64_t last_row = std::min(i1, node.data_len ? ends[node.data_len - 1] - 1 : -1);
        document_span(ends, node.data_len, last_row, last_start, last_end);
        append_tiles(out, first_start, last_end - 1);
        return;
      }
      case Op::BlockWindow: {
        const int64_t block = node.a;
        append_tiles(out, (floor_div(i0, block) - node.b) * block,
                     (floor_div(i1, block) + node.c + 1) * block - 1);
        return;
      }
      case Op::Block: {
        const int64_t block = node.a, q_blocks = node.b, k_blocks = node.c;
        const auto* bits = static_cast<const uint8_t*>(node.data);
        const int64_t qb_last = std::min(i1 / block, q_blocks - 1);
        const int64_t kb_first = k_first / block, kb_last = std::min(k_last / block, k_blocks - 1);
        for (int64_t kb = kb_first; kb <= kb_last; ++kb) {
          for (int64_t qb = i0 / block; qb <= qb_last; ++qb) {
            if (bits[qb * k_blocks + kb]) {
              append_tiles(out, kb * block, kb * block + block - 1);
              break;
            }
          }
        }
        return;
      }
      default:  // Dense, Mask and anything whose support is not narrower than all key tiles
        append_tiles(out, k_first, k_last);
        return;
    }
  }

  Class primitive_class(int32_t n, const PatternNode& node, const TileRect& t) {
    switch (node.op) {
      case Op::Random:
      case Op::RandomBlocks: {
        // Draws are distinct per row, so a tile is full when it holds rows x cols pairs.
        const auto& counts = drawn_tiles(n, node, t.i0, t.i1).counts;
        const int64_t kt = (t.j0 - spec_.k0) / spec_.tile_k;
        const auto at =
            std::lower_bound(counts.begin(), counts.end(), std::make_pair(kt, int64_t{0}));
        if (at == counts.end() || at->first != kt) return Class::Empty;
        return at->second == (t.i1 - t.i0 + 1) * (t.j1 - t.j0 + 1) ? Class::Full : Class::Partial;
      }
      case Op::Fixed: {
        const int64_t block = node.a, summary = node.b;
        const int64_t qb0 = floor_div(t.i0, block), qb1 = floor_div(t.i1, block);
        const bool same_block = floor_div(t.j1, block) >= qb0 && floor_div(t.j0, block) <= qb1;
        if (!same_block && !any_summary(t.j0, t.j1, block, summary)) return Class::Empty;
        // Full: every column is a summary column or, when all rows share block qb, inside qb.
        bool full = all_summary(t.j0, t.j1, block, summary);
        if (!full && qb0 == qb1) {
          full = all_summary(t.j0, std::min(t.j1, qb0 * block - 1), block, summary) &&
                 all_summary(std::max(t.j0, qb0 * block + block), t.j1, block, summary);
        }
        return full ? Class::Full : Class::Partial;
      }
      case Op::Documents: {
        // Documents meeting the rows [da, db] and the columns [dc, dd] are contiguous ranges.
        const auto* ends = static_cast<const int64_t*>(node.data);
        const int64_t count = node.data_len;
        const int64_t end = count ? ends[count - 1] : 0;  // positions >= end hold no document
        if (t.i0 >= end || t.j0 >= end || t.i1 < 0 || t.j1 < 0) return Class::Empty;
        auto doc = [&](int64_t p) {
          return lower_bound_i64(ends, count, std::max<int64_t>(p, 0) + 1);
        };
        const int64_t da = doc(t.i0), db = doc(std::min(t.i1, end - 1));
        const int64_t dc = doc(t.j0), dd = doc(std::min(t.j1, end - 1));
        if (std::max(da, dc) > std::min(db, dd)) return Class::Empty;
        const bool full = da == db && dc == dd && da == dc && t.i1 < end && t.j1 < end &&
                          t.i0 >= 0 && t.j0 >= 0;
        return full ? Class::Full : Class::Partial;
      }
      case Op::BlockWindow: {
        const int64_t block = node.a, left = node.b, right = node.c;
        const int64_t qa = floor_div(t.i0, block), qz = floor_div(t.i1, block);
        const int64_t ca = floor_div(t.j0, block), cz = floor_div(t.j1, block);
        if (cz < qa - left || ca > qz + right) return Class::Empty;
        return (ca >= qz - left && cz <= qa + right) ? Class::Full : Class::Partial;
      }
      case Op::Dense:
        return Class::Full;
      case Op::Causal:
        if (t.j1 <= t.i0 + node.a) return Class::Full;
        return t.j0 > t.i1 + node.a ? Class::Empty : Class::Partial;
      case Op::Window:
        if (t.j1 < t.i0 - node.a || t.j0 > t.i1 + node.b) return Class::Empty;
        return (t.j0 >= t.i1 - node.a && t.j1 <= t.i0 + node.b) ? Class::Full : Class::Partial;
      case Op::Strided: {
        const int64_t stride = node.a, reach = node.b;
        const int64_t d_min = t.i0 - t.j1, d_max = t.i1 - t.j0;  // every d between is reached
        const int64_t lo = reach >= 0 ? std::max(d_min, -reach) : d_min;
        const int64_t hi = reach >= 0 ? std::min(d_max, reach) : d_max;
        if (lo > hi || floor_div(hi, stride) * stride < lo) return Class::Empty;
        const bool within_reach = reach < 0 || (d_min >= -reach && d_max <= reach);
        return stride == 1 && within_reach ? Class::Full : Class::Partial;
      }
      case Op::Global: {
        const auto* tokens = static_cast<const int64_t*>(node.data);
        const int64_t n = node.data_len;
        auto count = [&](int64_t lo, int64_t hi) -> int64_t {
          if (n == 0 || hi < tokens[0] || lo > tokens[n - 1]) return 0;  // most tiles: no search
          return lower_bound_i64(tokens, n, hi + 1) - lower_bound_i64(tokens, n, lo);
        };
        const int64_t rows = node.a ? count(t.i0, t.i1) : 0;
        const int64_t cols = node.b ? count(t.j0, t.j1) : 0;
        if (rows == t.i1 - t.i0 + 1 && node.a) return Class::Full;
        if (cols == t.j1 - t.j0 + 1 && node.b) return Class::Full;
        return rows + cols == 0 ? Class::Empty : Class::Partial;
      }
      case Op::Block: {
        const int64_t block = node.a, q_blocks = node.b, k_blocks = node.c;
        const auto* bits = static_cast<const uint8_t*>(node.data);
        int64_t set = 0, total = 0;
        for (int64_t qb = t.i0 / block; qb <= t.i1 / block; ++qb) {
          for (int64_t kb = t.j0 / block; kb <= t.j1 / block; ++kb) {
            ++total;
            set += (qb < q_blocks && kb < k_blocks && bits[qb * k_blocks + kb]) ? 1 : 0;
          }
        }
        return set == 0 ? Class::Empty : set == total ? Class::Full : Class::Partial;
      }
      case Op::Mask: {
        const int64_t rows = node.a, cols = node.b;
        const auto* bits = static_cast<const uint8_t*>(node.data);
        int64_t set = 0;
        for (int64_t i = t.i0; i <= t.i1; ++i) {
          if (i >= rows) continue;
          for (int64_t j = t.j0; j <= std::min(t.j1, cols - 1); ++j) set += bits[i * cols + j];
        }
        const int64_t area = (t.i1 - t.i0 + 1) * (t.j1 - t.j0 + 1);
        return set == 0 ? Class::Empty : set == area ? Class::Full : Class::Partial;
      }
      default:
        return Class::Maybe;
    }
  }

  // The allowed pairs per key tile of random node n for the query rows [i0, i1], computed once
  // per query tile: every row (block row) is drawn once, its keys (blocks) counted per tile.
  const DrawnTiles& drawn_tiles(int32_t n, const PatternNode& node, int64_t i0, int64_t i1) {
    DrawnTiles& drawn = drawn_[n];
    if (drawn.i0 == i0 && drawn.i1 == i1) return drawn;
    drawn.i0 = i0;
    drawn.i1 = i1;
    auto& counts = drawn.counts;
    counts.clear();
    const int64_t k_first = spec_.k0, k_end = spec_.k0 + spec_.len_k;
    // Adds rows x (columns of [lo, hi) inside the window) pairs, split by key tile.
    auto add = [&](int64_t lo, int64_t hi, int64_t rows) {
      lo = std::max(lo, k_first);
      hi = std::min(hi, k_end);
      while (lo < hi) {
        const int64_t kt = (lo - k_first) / spec_.tile_k;
        const int64_t tile_end = std::min(hi, k_first + (kt + 1) * spec_.tile_k);
        counts.emplace_back(kt, rows * (tile_end - lo));
        lo = tile_end;
      }
    };
    int64_t drawn_keys[kMaxRandomDraws];
    if (node.op == Op::Random) {
      for (int64_t i = std::max<int64_t>(i0, 0); i <= i1; ++i) {
        if (node.a >= node.c) {
          add(0, node.c, 1);
          continue;
        }
        const int64_t k = random_row_keys(node, i, drawn_keys);
        for (int64_t r = 0; r < k; ++r) add(drawn_keys[r], drawn_keys[r] + 1, 1);
      }
    } else {
      const int64_t block = node.b;
      for (int64_t qb = std::max<int64_t>(i0, 0) / block; qb <= i1 / block && i1 >= 0; ++qb) {
        const int64_t rows = std::min(i1, qb * block + block - 1) - std::max(i0, qb * block) + 1;
        const int64_t k = random_key_blocks(node, qb, drawn_keys);
        for (int64_t r = 0; r < k; ++r) {
          add(drawn_keys[r] * block, drawn_keys[r] * block + block, rows);
        }
      }
    }
    std::sort(counts.begin(), counts.end());
    size_t kept = 0;  // merge the entries of each tile
    for (size_t e = 0; e < counts.size(); ++e) {
      if (kept > 0 && counts[kept - 1].first == counts[e].first) {
        counts[kept - 1].second += counts[e].second;
      } else {
        counts[kept++] = counts[e];
      }
    }
    counts.resize(kept);
    return drawn;
  }

  PatternProgram program_;
  LayoutSpec spec_;
  int64_t num_k_tiles_ = 0;
  std::vector<Intervals> static_cols_;
  std::vector<DrawnTiles> drawn_;
  std::vector<Intervals> stack_;
  Intervals scratch_, scratch_fixed_;
};

void validate(const std::vector<PatternNode>& nodes, const LayoutSpec& spec) {
  if (spec.len_q < 0 || spec.len_k < 0) throw std::invalid_argument("layout: negative length");
  if (spec.tile_q < 1) throw std::invalid_argument("layout: tile_q must be >= 1");
  if (spec.tile_k < 1 || spec.tile_k > kRowBitsWidth) {
    throw std::invalid_argument("layout: tile_k must be in [1, 64]");
  }
  if (spec.q0 < 0 || spec.k0 < 0) throw std::invalid_argument("layout: negative offset");
  if (spec.len_k / spec.tile_k >= INT32_MAX || spec.len_q / spec.tile_q >= INT32_MAX) {
    throw std::invalid_argument("layout: too many tiles");
  }
  int depth = 0;
  for (const PatternNode& node : nodes) {
    switch (node.op) {
      case Op::Union:
      case Op::Intersect:
        if (depth < 2) throw std::invalid_argument("pattern program: operator without operands");
        --depth;
        continue;
      case Op::Dense:
      case Op::Causal:
      case Op::Window:
        break;
      case Op::Strided:
        if (node.a < 1) throw std::invalid_argument("pattern program: stride must be >= 1");
        break;
      case Op::Global:
        for (int64_t t = 1; t < node.data_len; ++t) {
          if (static_cast<const int64_t*>(node.data)[t - 1] >= static_cast<const int64_t*>(node.data)[t]) {
            throw std::invalid_argument("pattern program: global tokens must be sorted and unique");
          }
        }
        break;
      case Op::Block:
        if (node.a < 1 || node.b < 0 || node.c < 0 || node.data_len != node.b * node.c) {
          throw std::invalid_argument("pattern program: malformed block layout");
        }
        break;
      case Op::Mask:
        if (node.a < 0 || node.b < 0 || node.data_len != node.a * node.b) {
          throw std::invalid_argument("pattern program: malformed mask");
        }
        break;
      case Op::Random:
        if (node.a < 0 || node.a > kMaxRandomDraws || node.b < 0 || node.c < 0 || node.data_len) {
          throw std::invalid_argument("pattern program: malformed random pattern (at most " +
                                      std::to_string(kMaxRandomDraws) + " keys per row)");
        }
        break;
      case Op::RandomBlocks: {
        const auto* exclude = static_cast<const int64_t*>(node.data);
        if (node.a < 0 || node.a > kMaxRandomDraws || node.b < 1 || node.c < 0 || node.d < 0 ||
            (node.data_len != 0 && node.data_len != 2) ||
            (node.data_len == 2 && exclude && (exclude[0] < 0 || exclude[1] < -1))) {
          throw std::invalid_argument("pattern program: malformed random blocks (at most " +
                                      std::to_string(kMaxRandomDraws) + " blocks per block row)");
        }
        break;
      }
      case Op::Fixed:
        if (node.a < 1 || node.b < 0 || node.b > node.a) {
          throw std::invalid_argument(
              "pattern program: Fixed needs block >= 1 and 0 <= summary <= block");
        }
        break;
      case Op::Documents: {
        const auto* ends = static_cast<const int64_t*>(node.data);
        for (int64_t d = 0; d < node.data_len && ends; ++d) {
          if (ends[d] < (d > 0 ? ends[d - 1] : 0)) {
            throw std::invalid_argument(
                "pattern program: document ends must be non-decreasing and >= 0");
          }
        }
        break;
      }
      case Op::BlockWindow:
        if (node.a < 1 || node.b < 0 || node.c < 0) {
          throw std::invalid_argument("pattern program: malformed block window");
        }
        break;
      default:
        throw std::invalid_argument("pattern program: unknown primitive " +
                                    std::to_string(static_cast<int>(node.op)));
    }
    if (node.data_len > 0 && node.data == nullptr) {
      throw std::invalid_argument("pattern program: missing data");
    }
    if (++depth > kMaxProgramDepth) throw std::invalid_argument("pattern program: too deep");
  }
  if (depth != 1) throw std::invalid_argument("pattern program: must leave exactly one result");
}

}  // namespace

Layout::Layout(std::vector<PatternNode> nodes, const LayoutSpec& spec)
    : nodes_(std::move(nodes)), spec_(spec) {
  for (PatternNode& node : nodes_) {
    if (node.data_len == 0) {
      node.data = nullptr;
      continue;
    }
    const size_t bytes = static_cast<size_t>(node.data_len) * element_bytes(node.op);
    storage_.emplace_back((bytes + sizeof(int64_t) - 1) / sizeof(int64_t));
    std::memcpy(storage_.back().data(), node.data, bytes);
    node.data = storage_.back().data();
  }
  compile();
}

int64_t Layout::q_tile_rows(int64_t qt) const {
  return std::min(spec_.tile_q, spec_.len_q - qt * spec_.tile_q);
}

int64_t Layout::k_tile_cols(int64_t kt) const {
  return std::min(spec_.tile_k, spec_.len_k - kt * spec_.tile_k);
}

void Layout::compile() {
  num_q_tiles_ = ceil_div(spec_.len_q, spec_.tile_q);
  num_k_tiles_ = ceil_div(spec_.len_k, spec_.tile_k);
  row_start_.assign(1, 0);
  row_start_.reserve(num_q_tiles_ + 1);
  Compiler compiler(*this, spec_);
  for (int64_t qt = 0; qt < num_q_tiles_; ++qt) {
    const int64_t i0 = spec_.q0 + qt * spec_.tile_q;
    const int64_t i1 = i0 + q_tile_rows(qt) - 1;
    for (const auto& [lo, hi] : compiler.support(i0, i1)) {
      for (int64_t kt = lo; kt < hi; ++kt) {
        const int64_t j0 = spec_.k0 + kt * spec_.tile_k;
        const Class c = compiler.classify({i0, i1, j0, j0 + k_tile_cols(kt) - 1});
        if (c == Class::Empty) continue;
        key_tiles_.push_back(static_cast<int32_t>(kt));
        kinds_.push_back(c == Class::Full ? TileKind::Full : TileKind::Partial);
      }
    }
    row_start_.push_back(static_cast<int64_t>(key_tiles_.size()));
  }
  q_tiles_by_cost_.resize(num_q_tiles_);
  for (int64_t qt = 0; qt < num_q_tiles_; ++qt) q_tiles_by_cost_[qt] = static_cast<int32_t>(qt);
  std::stable_sort(q_tiles_by_cost_.begin(), q_tiles_by_cost_.end(), [this](int32_t a, int32_t b) {
    return row_start_[a + 1] - row_start_[a] > row_start_[b + 1] - row_start_[b];
  });
}

const Layout::ByKey& Layout::by_key() const {
  std::call_once(by_key_once_, [this] {
    ByKey& t = by_key_;
    t.col_start.assign(num_k_tiles_ + 1, 0);
    for (int32_t kt : key_tiles_) ++t.col_start[kt + 1];
    for (int64_t kt = 0; kt < num_k_tiles_; ++kt) t.col_start[kt + 1] += t.col_start[kt];
    t.query_tiles.resize(key_tiles_.size());
    t.kinds.resize(key_tiles_.size());
    std::vector<int64_t> fill(t.col_start.begin(), t.col_start.end() - 1);
    for (int64_t qt = 0; qt < num_q_tiles_; ++qt) {  // ascending query tiles per key tile
      for (int64_t e = row_start_[qt]; e < row_start_[qt + 1]; ++e) {
        const int64_t at = fill[key_tiles_[e]]++;
        t.query_tiles[at] = static_cast<int32_t>(qt);
        t.kinds[at] = kinds_[e];
      }
    }
  });
  return by_key_;
}

int64_t Layout::count_allowed() const {
  int64_t total = 0;
  for (int64_t qt = 0; qt < num_q_tiles_; ++qt) {
    const int64_t rows = q_tile_rows(qt);
    for (int64_t e = row_start_[qt]; e < row_start_[qt + 1]; ++e) {
      const int64_t kt = key_tiles_[e];
      if (kinds_[e] == TileKind::Full) {
        total += rows * k_tile_cols(kt);
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        total += __builtin_popcountll(tile_row_bits(qt * spec_.tile_q + r, kt));
      }
    }
  }
  return total;
}

int64_t Layout::count_empty_rows() const {
  int64_t empty = 0;
  for (int64_t qt = 0; qt < num_q_tiles_; ++qt) {
    const int64_t rows = q_tile_rows(qt);
    bool has_full = false;
    for (int64_t e = row_start_[qt]; e < row_start_[qt + 1] && !has_full; ++e) {
      has_full = kinds_[e] == TileKind::Full;
    }
    if (has_full) continue;
    for (int64_t r = 0; r < rows; ++r) {
      bool any = false;
      for (int64_t e = row_start_[qt]; e < row_start_[qt + 1] && !any; ++e) {
        any = tile_row_bits(qt * spec_.tile_q + r, key_tiles_[e]) != 0;
      }
      empty += any ? 0 : 1;
    }
  }
  return empty;
}

std::shared_ptr<const Layout> compile_layout(const std::vector<PatternNode>& nodes,
                                             const LayoutSpec& spec) {
  validate(nodes, spec);
  return std::make_shared<const Layout>(nodes, spec);
}

}  // namespace sparse_attn
