// The backward pass's kernel interface: the forward's problem plus the tensors the gradient
// reads and writes. Plain pointers, strides and sizes; no Python, no patterns, no allocation.
#pragma once

#include <cstdint>

#include "params.h"

namespace sparse_attn {

struct BackwardParams {
  // The forward call being differentiated (mode Softmax): its sizes, operands, scoring, dropout
  // (dropout_p, seed: the dropped set is regenerated), layouts, threads and cancel flag.
  // forward.lse is read: the forward's log-sum-exp; forward.out is not used.
  AttentionParams forward;
  Operand out;       // the forward's output (batch, heads_q, len_q, dim_v), stride_col == 1
  Operand grad_out;  // dL/d(out), same shape, stride_col == 1
  void* dq = nullptr;     // contiguous (batch, heads_q, len_q, dim_qk)
  void* dk = nullptr;     // contiguous (batch, heads_kv, len_k, dim_qk), summed over each group
  void* dv = nullptr;     // contiguous (batch, heads_kv, len_k, dim_v), summed over each group
  void* dbias = nullptr;  // contiguous (batch, heads_q, len_q, len_k), zero-filled; or null
  // Score Additive: dq and dk are not written; instead the gradients of the projections and of
  // forward.additive_w (whose scale is folded in), which the caller chains through Wq and Wk.
  void* d_q_proj = nullptr;  // contiguous (batch, heads_q, len_q, additive_dim)
  void* d_k_proj = nullptr;  // contiguous (batch, heads_kv, len_k, additive_dim)
  void* d_additive_w = nullptr;  // additive_dim
};

}  // namespace sparse_attn
