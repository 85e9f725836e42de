// The one definition of "is (i, j) allowed": a pattern program evaluated row by row.
// Shared by the layout compiler, the CPU kernels and the CUDA kernels (host + device inline);
// it holds no allocation, no exceptions and no Python.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SA_HD __host__ __device__ __forceinline__
#else
#define SA_HD inline
#endif

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
  Random = 7,        // reserved
  RandomBlocks = 8,  // reserved
  Fixed = 9,         // reserved
  Documents = 10,    // reserved
  Union = 20,
  Intersect = 21,
};

constexpr int kMaxProgramDepth = 32;
constexpr int kRowBitsWidth = 64;  // one uint64_t covers a key tile of up to 64 columns

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
