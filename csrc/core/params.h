// The one kernel interface: a plain struct of pointers, strides and sizes, filled by the
// bindings and read by every device's kernels. No Python, no patterns, no allocation.
#pragma once

#include <atomic>
#include <cstdint>

#include "layout.h"

namespace sparse_attn {

enum class DType : int32_t { Float32 = 0, Float64 = 1 };

// How a (query, key) pair is scored before scale, softcap, bias and ALiBi:
//   Dot:      q . k
//   Cosine:   q . k / (|q| |k|)  (0 when either vector is zero)
//   Additive: w . tanh(q_proj + k_proj), with q_proj = q Wq and k_proj = k Wk projected once
enum class ScoreKind : int32_t { Dot = 0, Cosine = 1, Additive = 2 };

// What a pass computes over the allowed pairs of every query row.
enum class Mode : int32_t {
  Softmax = 0,  // out = softmax(s) . v (with dropout), lse
  Hard = 1,     // out = v[argmax_j s] (Gumbel-max sample when sample), index
  Weights = 2,  // the normalised probabilities exp(s - lse), dense or CSR
  Count = 3,    // the number of allowed keys of every row (CSR row sizes)
};

// One strided array over (batch, head, row, col). Leading dimensions of any shape and
// broadcasting are flattened into batch_offset: the element offset of each batch index.
struct Operand {
  const void* data = nullptr;  // null: operand absent (mask, bias)
  const int64_t* batch_offset = nullptr;
  int64_t stride_head = 0, stride_row = 0, stride_col = 1;  // in elements; may be 0 (broadcast)
};

struct AttentionParams {
  DType dtype = DType::Float32;
  Mode mode = Mode::Softmax;
  int64_t batch = 0, heads_q = 0, heads_kv = 0;  // heads_q % heads_kv == 0
  int64_t len_q = 0, len_k = 0, dim_qk = 0, dim_v = 0;
  int64_t q0 = 0, k0 = 0;  // absolute positions of query row 0 and key 0 (ALiBi, random draws)
  Operand q, k, v;   // stride_col == 1 for q, k, v
  Operand mask;      // uint8, nonzero = may attend
  Operand bias;      // same dtype as q, added to the scaled scores
  const int64_t* key_lengths = nullptr;  // per batch, local: keys at j >= length are padding

  // Scoring: s = softcap(scale * score(q, k)) + bias - slope_h * |i - j|
  ScoreKind score = ScoreKind::Dot;
  Operand q_proj, k_proj;           // Additive: (batch, heads, rows, additive_dim)
  const void* additive_w = nullptr;  // Additive: additive_dim weights (scale folded in)
  int64_t additive_dim = 0;
  double scale = 1.0;  // Dot and Cosine; Additive has it folded into additive_w
  double softcap = 0.0;                  // > 0: s -> softcap * tanh(s / softcap)
  const double* alibi_slopes = nullptr;  // one per query head, or null

  // Randomness, drawn from csrc/core/random.h keyed by (seed, batch, head, i, j).
  double dropout_p = 0.0;  // Softmax: drop each probability with this chance, scale by 1/(1-p)
  bool sample = false;     // Hard: Gumbel-max sampling instead of argmax
  double temperature = 1.0;
  uint64_t seed = 0;

  // Results (contiguous, batch-major): Softmax out (batch, heads_q, len_q, dim_v) and lse;
  // Hard out and index (int64, -1 for an empty row); Weights dense (batch, heads_q, len_q,
  // len_k) or CSR (row_ptr, col_index, values over all batch*heads_q*len_q rows; row_ptr given);
  // Count: row_counts (int64 per row).
  void* out = nullptr;
  void* lse = nullptr;          // Softmax: written when non-null; Weights: read (required)
  int64_t* index = nullptr;     // Hard
  void* weights = nullptr;      // Weights, dense
  const int64_t* csr_row_ptr = nullptr;  // Weights, CSR (then weights = values)
  int64_t* csr_col_index = nullptr;
  int64_t* row_counts = nullptr;  // Count

  const Layout* const* layouts = nullptr;  // one per query head, all of (len_q, len_k)
  int num_threads = 1;
  const std::atomic<bool>* cancel = nullptr;  // set from a signal handler: stop between tiles
};

}  // namespace sparse_attn
