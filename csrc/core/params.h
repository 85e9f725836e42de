// The one kernel interface: a plain struct of pointers, strides and sizes, filled by the
// bindings and read by every device's kernels. No Python, no patterns, no allocation.
#pragma once

#include <cstdint>

#include "layout.h"

namespace sparse_attn {

enum class DType : int32_t { Float32 = 0, Float64 = 1 };

// One strided array over (batch, head, row, col). Leading dimensions of any shape and
// broadcasting are flattened into batch_offset: the element offset of each batch index.
struct Operand {
  const void* data = nullptr;  // null: operand absent (mask, bias)
  const int64_t* batch_offset = nullptr;
  int64_t stride_head = 0, stride_row = 0, stride_col = 1;  // in elements; may be 0 (broadcast)
};

struct AttentionParams {
  DType dtype = DType::Float32;
  int64_t batch = 0, heads_q = 0, heads_kv = 0;  // heads_q % heads_kv == 0
  int64_t len_q = 0, len_k = 0, dim_qk = 0, dim_v = 0;
  Operand q, k, v;   // stride_col == 1 for q, k, v
  Operand mask;      // uint8, nonzero = may attend
  Operand bias;      // same dtype as q, added to the scaled scores
  const int64_t* key_lengths = nullptr;  // per batch: keys at j >= length are padding
  double scale = 1.0;
  void* out = nullptr;  // contiguous (batch, heads_q, len_q, dim_v)
  void* lse = nullptr;  // contiguous (batch, heads_q, len_q), or null
  const Layout* const* layouts = nullptr;  // one per query head, all of (len_q, len_k)
  int num_threads = 1;
};

}  // namespace sparse_attn
