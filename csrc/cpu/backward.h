// The CPU backward pass: gradients of block-sparse flash attention over a compiled layout.
#pragma once

#include "../core/backward_params.h"

namespace sparse_attn::cpu {

// Computes params.dq, dk, dv (and dbias when non-null) from the forward's out and lse.
// Bitwise deterministic: the same inputs give the same bits for every thread count. Runs on
// params.forward.num_threads threads; throws std::invalid_argument on an inconsistent struct.
void backward(const BackwardParams& params);

}  // namespace sparse_attn::cpu
