// Reads the problem's sizes and offsets from the configuration dict that api.py builds, into
// any parameter struct with those fields (the CPU's AttentionParams, the CUDA ForwardParams).
// Binding plumbing: no attention logic.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sparse_attn {

template <typename Params>
void read_problem_fields(const pybind11::dict& config, Params& p) {
  auto field = [&config](const char* key) {
    if (!config.contains(key)) throw std::invalid_argument(std::string("forward: missing ") + key);
    return config[key].template cast<int64_t>();
  };
  p.batch = field("batch");
  p.heads_q = field("heads_q");
  p.heads_kv = field("heads_kv");
  p.len_q = field("len_q");
  p.len_k = field("len_k");
  p.dim_qk = field("dim_qk");
  p.dim_v = field("dim_v");
  p.q0 = field("q0");
  p.k0 = field("k0");
}

}  // namespace sparse_attn
