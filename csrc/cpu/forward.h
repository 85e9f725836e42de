// The CPU forward pass: block-sparse flash attention over a compiled layout.
#pragma once

#include "../core/params.h"

namespace sparse_attn::cpu {

// Computes params.out (and params.lse when non-null). Runs on params.num_threads threads;
// throws std::invalid_argument on an inconsistent params struct.
void forward(const AttentionParams& params);

}  // namespace sparse_attn::cpu
