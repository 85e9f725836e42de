// The backward pass's kernel interface: the forward's problem plus the tensors the gradient
// reads and writes. Plain pointers, strides and sizes; no Python, no patterns, no allocation.
#pragma once

#include <cstdint>

#include "params.h"

namespace sparse_attn {

struct BackwardParams {
  // The forward call being differentiated: dtype, sizes, q, k, v, mask, bias, key_lengths,
  // scale, layouts and num_threads. Its out and lse pointers are not used.
  AttentionParams forward;
  Operand out;       // the forward's output (batch, heads_q, len_q, dim_v), stride_col == 1
  Operand grad_out;  // dL/d(out), same shape, stride_col == 1
  const void* lse = nullptr;  // the forward's log-sum-exp, contiguous (batch, heads_q, len_q)
  // Dropout of the forward: (i, j) of (batch b, query head h) was kept iff
  // random_uniform(random_bits(seed, RandomStream::Dropout, b, h, i, j)) >= dropout_p, with i, j
  // absolute positions; kept probabilities were scaled by 1 / (1 - dropout_p).
  double dropout_p = 0.0;
  uint64_t seed = 0;
  void* dq = nullptr;     // contiguous (batch, heads_q, len_q, dim_qk)
  void* dk = nullptr;     // contiguous (batch, heads_kv, len_k, dim_qk), summed over each group
  void* dv = nullptr;     // contiguous (batch, heads_kv, len_k, dim_v), summed over each group
  void* dbias = nullptr;  // contiguous (batch, heads_q, len_q, len_k), zero-filled; or null
};

}  // namespace sparse_attn
