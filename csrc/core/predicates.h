// The one definition of "is (i, j) allowed": a pattern program evaluated row by row.
// Shared by the layout compiler, the CPU kernels and the CUDA kernels (host + device inline);
// it holds no allocation, no exceptions and no Python.
#pragma once

#include <cstdint>

#include "hostdevice.h"  // SA_HD
#include "random.h"

namespace sparse_attn {

// Mirrors python/sparse_attn/_ops.py.
enum class Op : int32_t {
  Dense = 0,
  Causal = 1,        // a = offset: j <= i + a
  Window = 2,        // a = left, b = right: i - a <= j <= i + b
  Strided = 3,       // a = stride, b = reach (-1: unlimited)
  Global = 4,        // a = rows, b = cols, data = sorted int64 tokens (len = data_len)
  Block = 5,         // a = block, b = query blocks, c = key blocks, data = uint8 b x c
  Mask = 6,          // a = rows, b = cols, data = uint8 a x b
  Random = 7,        // a = keys per row, b = seed, c = total key length
  RandomBlocks = 8,  // a = key blocks per block row, b = block, c = seed, d = total key blocks,
                     // data = none or int64 {exclude_first, exclude_radius} (see random_key_blocks)
  Fixed = 9,         // a = block, b = summary: same block, or j % a >= a - b
  Documents = 10,    // data = int64 cumulative document ends (non-decreasing)
  BlockWindow = 11,  // a = block, b = left, c = right (in blocks): -b <= j/a - i/a <= c
  Union = 20,
  Intersect = 21,
};

constexpr int kMaxProgramDepth = 32;
constexpr int kRowBitsWidth = 64;  // one uint64_t covers a key tile of up to 64 columns
// Random draws per row (per block row): a row's draws live in a local array of this size, and
// Floyd's algorithm compares each draw with the earlier ones (cost per row ~ draws^2 / 2).
constexpr int kMaxRandomDraws = 64;

// Primitives whose data is int64 (the others carry uint8 bits).
SA_HD bool node_data_is_int64(Op op) {
  return op == Op::Global || op == Op::Documents || op == Op::RandomBlocks;
}

struct PatternNode {
  Op op;
  int64_t a, b, c, d;
  const void* data;  // owned by whoever owns the program (the compiled layout)
  int64_t data_len;  // elements of data
};

// A postfix program; positions (i, j) are absolute in the full problem.
struct PatternProgram {
  const PatternNode* nodes;
  int32_t size;
};

// Bits [lo, hi) of a width-64 word, with lo/hi clamped to [0, 64].
SA_HD uint64_t bit_range(int64_t lo, int64_t hi) {
  lo = lo < 0 ? 0 : lo;
  hi = hi > kRowBitsWidth ? kRowBitsWidth : hi;
  if (hi <= lo) return 0;
  const uint64_t upper = hi == kRowBitsWidth ? ~uint64_t{0} : ((uint64_t{1} << hi) - 1);
  const uint64_t lower = (uint64_t{1} << lo) - 1;
  return upper & ~lower;
}

// Floor division and non-negative modulo for possibly negative numerators, positive d.
SA_HD int64_t floor_div(int64_t n, int64_t d) {
  const int64_t q = n / d;
  return (n % d != 0 && ((n < 0) != (d < 0))) ? q - 1 : q;
}
SA_HD int64_t pos_mod(int64_t n, int64_t d) {
  const int64_t r = n % d;
  return r < 0 ? r + d : r;
}

// First index in sorted tokens[0, n) that is >= value.
SA_HD int64_t lower_bound_i64(const int64_t* tokens, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tokens[mid] < value) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Columns c in [0, 64) with (j0 + c) mod period in [lo, hi), for 0 <= lo < hi <= period.
SA_HD uint64_t periodic_bits(int64_t j0, int64_t period, int64_t lo, int64_t hi) {
  const int64_t start = -pos_mod(j0, period);  // column of the period start at or before 0
  uint64_t bits =
      bit_range(start + lo, start + hi) | bit_range(start + period + lo, start + period + hi);
  // bits is exact on columns [0, exact); shifting by a multiple of the period <= exact extends it
  for (int64_t exact = start + 2 * period, shift = period; exact < kRowBitsWidth; shift *= 2) {
    bits |= bits << shift;
    exact += shift;
  }
  return bits;
}

// The document holding position i: [start, end) of the first document whose end is > i.
// False when i lies before 0 or past the last document.
SA_HD bool document_span(const int64_t* ends, int64_t n, int64_t i, int64_t& start, int64_t& end) {
  if (i < 0) return false;
  const int64_t d = lower_bound_i64(ends, n, i + 1);
  if (d >= n) return false;
  start = d > 0 ? ends[d - 1] : 0;
  end = ends[d];
  return true;
}

// ---- random patterns: drawn on the fly from the counter-based generator of random.h ----------

// floor(a * b / 2^64).
SA_HD uint64_t mul_high_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  __extension__ using uint128 = unsigned __int128;  // GCC and Clang; __extension__: -Wpedantic
  return static_cast<uint64_t>((static_cast<uint128>(a) * b) >> 64);
#endif
}

// Floyd's algorithm: k distinct values of [0, n) (k <= n, k <= kMaxRandomDraws) into out[0, k).
// Draw s (s = 0 .. k-1) takes t = floor(bits * (m + 1) / 2^64) in [0, m], m = n - k + s, from
// bits = random_bits(seed, stream, counter, s), and keeps t unless an earlier draw kept it, in
// which case it keeps m (never kept before: every earlier value is < m).
SA_HD void random_subset(uint64_t seed, RandomStream stream, uint64_t counter, int64_t n,
                         int64_t k, int64_t* out) {
  for (int64_t s = 0; s < k; ++s) {
    const int64_t m = n - k + s;
    const int64_t t = static_cast<int64_t>(
        mul_high_u64(random_bits(seed, stream, counter, static_cast<uint64_t>(s)),
                     static_cast<uint64_t>(m) + 1));
    bool kept = false;
    for (int64_t r = 0; r < s && !kept; ++r) kept = out[r] == t;
    out[s] = kept ? m : t;
  }
}

// The keys of query row i >= 0 under Random: min(per_row, n) distinct keys of [0, n), n the total
// key length. Returns their number.
SA_HD int64_t random_row_keys(const PatternNode& node, int64_t i, int64_t* out) {
  const int64_t per_row = node.a, n = node.c;
  const int64_t k = per_row < n ? per_row : n;
  random_subset(static_cast<uint64_t>(node.b), RandomStream::RandomPattern,
                static_cast<uint64_t>(i), n, k, out);
  return k;
}

// The key blocks of query block qb >= 0 under RandomBlocks: min(per_block_row, available)
// distinct blocks among the available ones of [0, total). Excluded (when data is given): the
// first exclude_first blocks, and, when exclude_radius >= 0, blocks kb with |kb - qb| <= radius.
// Floyd's algorithm draws ranks among the available blocks in ascending order. Returns the count.
SA_HD int64_t random_key_blocks(const PatternNode& node, int64_t qb, int64_t* out) {
  const int64_t per_row = node.a, total = node.d;
  int64_t first = 0, lo = 0, hi = -1;  // excluded: [0, first) and [lo, hi]
  if (node.data_len == 2) {
    const auto* exclude = static_cast<const int64_t*>(node.data);
    first = exclude[0] < total ? exclude[0] : total;
    if (exclude[1] >= 0) {
      lo = qb - exclude[1] > first ? qb - exclude[1] : first;
      hi = qb + exclude[1] < total - 1 ? qb + exclude[1] : total - 1;
    }
  }
  const int64_t gap = hi >= lo ? hi - lo + 1 : 0;
  const int64_t available = total - first - gap;
  const int64_t k = per_row < available ? per_row : available;
  random_subset(static_cast<uint64_t>(node.c), RandomStream::RandomBlocks,
                static_cast<uint64_t>(qb), available, k, out);
  for (int64_t r = 0; r < k; ++r) {
    const int64_t kb = first + out[r];
    out[r] = gap > 0 && kb >= lo ? kb + gap : kb;
  }
  return k;
}

// Allowed keys j in [j0, j0 + width) of query row i under one primitive, bit (j - j0) set.
SA_HD uint64_t primitive_row_bits(const PatternNode& node, int64_t i, int64_t j0, int width) {
  const uint64_t all = bit_range(0, width);
  switch (node.op) {
    case Op::Dense:
      return all;
    case Op::Causal:
      return bit_range(0, i + node.a + 1 - j0) & all;
    case Op::Window:
      return bit_range(i - node.a - j0, i + node.b + 1 - j0) & all;
    case Op::Strided: {
      const int64_t stride = node.a, reach = node.b;
      int64_t lo = 0, hi = width;
      if (reach >= 0) {
        lo = i - reach - j0 > lo ? i - reach - j0 : lo;
        hi = i + reach + 1 - j0 < hi ? i + reach + 1 - j0 : hi;
      }
      if (stride == 1) return bit_range(lo, hi);
      uint64_t bits = 0;
      // first column c >= lo with (i - (j0 + c)) % stride == 0
      for (int64_t c = lo + pos_mod(i - j0 - lo, stride); c < hi; c += stride) bits |= uint64_t{1} << c;
      return bits;
    }
    case Op::Global: {
      const auto* tokens = static_cast<const int64_t*>(node.data);
      const int64_t n = node.data_len;
      if (node.a) {
        const int64_t at = lower_bound_i64(tokens, n, i);
        if (at < n && tokens[at] == i) return all;
      }
      uint64_t bits = 0;
      if (node.b) {
        for (int64_t t = lower_bound_i64(tokens, n, j0); t < n && tokens[t] < j0 + width; ++t)
          bits |= uint64_t{1} << (tokens[t] - j0);
      }
      return bits;
    }
    case Op::Block: {
      const int64_t block = node.a, q_blocks = node.b, k_blocks = node.c;
      if (i < 0) return 0;
      const int64_t qb = i / block;
      if (qb >= q_blocks) return 0;
      const auto* row = static_cast<const uint8_t*>(node.data) + qb * k_blocks;
      uint64_t bits = 0;
      const int64_t kb_end = floor_div(j0 + width - 1, block);
      for (int64_t kb = floor_div(j0, block) < 0 ? 0 : floor_div(j0, block);
           kb <= kb_end && kb < k_blocks; ++kb) {
        if (row[kb]) bits |= bit_range(kb * block - j0, (kb + 1) * block - j0);
      }
      return bits & all;
    }
    case Op::Mask: {
      const int64_t rows = node.a, cols = node.b;
      if (i < 0 || i >= rows) return 0;
      const auto* row = static_cast<const uint8_t*>(node.data) + i * cols;
      uint64_t bits = 0;
      for (int c = 0; c < width; ++c) {
        const int64_t j = j0 + c;
        if (j >= 0 && j < cols && row[j]) bits |= uint64_t{1} << c;
      }
      return bits;
    }
    case Op::Random: {
      if (i < 0) return 0;
      if (node.a >= node.c) return bit_range(-j0, node.c - j0) & all;  // every key is drawn
      int64_t keys[kMaxRandomDraws];
      const int64_t count = random_row_keys(node, i, keys);
      uint64_t bits = 0;
      for (int64_t r = 0; r < count; ++r) {
        const int64_t c = keys[r] - j0;
        if (c >= 0 && c < width) bits |= uint64_t{1} << c;
      }
      return bits;
    }
    case Op::RandomBlocks: {
      if (i < 0) return 0;
      const int64_t block = node.b;
      int64_t blocks[kMaxRandomDraws];
      const int64_t count = random_key_blocks(node, i / block, blocks);
      uint64_t bits = 0;
      for (int64_t r = 0; r < count; ++r) {
        bits |= bit_range(blocks[r] * block - j0, (blocks[r] + 1) * block - j0);
      }
      return bits & all;
    }
    case Op::Fixed: {
      const int64_t block = node.a, summary = node.b;
      const int64_t start = floor_div(i, block) * block;
      uint64_t bits = bit_range(start - j0, start + block - j0);
      if (summary > 0) bits |= periodic_bits(j0, block, block - summary, block);
      return bits & all;
    }
    case Op::Documents: {
      int64_t start, end;
      if (!document_span(static_cast<const int64_t*>(node.data), node.data_len, i, start, end)) {
        return 0;
      }
      return bit_range(start - j0, end - j0) & all;
    }
    case Op::BlockWindow: {
      const int64_t block = node.a, qb = floor_div(i, block);
      return bit_range((qb - node.b) * block - j0, (qb + node.c + 1) * block - j0) & all;
    }
    default:
      return 0;
  }
}

// Allowed keys j in [j0, j0 + width) of query row i (width <= 64) under the whole program.
SA_HD uint64_t row_bits(const PatternProgram& program, int64_t i, int64_t j0, int width) {
  uint64_t stack[kMaxProgramDepth];
  int top = 0;
  for (int32_t n = 0; n < program.size; ++n) {
    const PatternNode& node = program.nodes[n];
    if (node.op == Op::Union) {
      --top;
      stack[top - 1] |= stack[top];
    } else if (node.op == Op::Intersect) {
      --top;
      stack[top - 1] &= stack[top];
    } else {
      stack[top++] = primitive_row_bits(node, i, j0, width);
    }
  }
  return top == 1 ? stack[0] : 0;
}

SA_HD bool is_allowed(const PatternProgram& program, int64_t i, int64_t j) {
  return (row_bits(program, i, j, 1) & 1) != 0;
}

}  // namespace sparse_attn
