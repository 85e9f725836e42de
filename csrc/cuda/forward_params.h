// What the CUDA forward kernels read: device pointers, strides and sizes, and the compiled
// layouts copied to the device. A plain struct passed by value to the kernel; filled on the
// host by device_backend.h. No logic here.
#pragma once

#include <cstdint>

#include "../core/predicates.h"

namespace sparse_attn::cuda {

// sparse_attn::Operand with device pointers: element (b, h, row, col) of a strided array is
// data[batch_offset[b] + h * stride_head + row * stride_row + col * stride_col].
struct DeviceOperand {
  const void* data = nullptr;  // null: absent (mask, bias)
  const int64_t* batch_offset = nullptr;
  int64_t stride_head = 0, stride_row = 0, stride_col = 1;
};

// A compiled Layout (csrc/core/layout.h) in device memory.
struct DeviceLayout {
  const int64_t* row_start = nullptr;  // num_q_tiles + 1 entries
  const int32_t* key_tiles = nullptr;  // ascending per query tile
  const uint8_t* kinds = nullptr;      // TileKind values, kPartialTile marks mask work
  const int32_t* q_tiles_by_cost = nullptr;
  PatternProgram program{nullptr, 0};  // nodes, and their data, in device memory
  int64_t len_q = 0, len_k = 0, q0 = 0, k0 = 0;
};

constexpr int kTileQ = 64;  // query rows per block: the layout's tile_q
constexpr int kTileK = 64;  // keys per tile: the layout's tile_k, one uint64_t of row bits
constexpr uint8_t kPartialTile = 1;  // == TileKind::Partial (checked in device_backend.h)

enum class ElementType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// The values of sparse_attn::Mode and sparse_attn::ScoreKind (params.h) that the CUDA kernels
// implement (checked in device_backend.h).
constexpr int32_t kModeSoftmax = 0, kModeHard = 1;
constexpr int32_t kScoreDot = 0, kScoreCosine = 1;

struct ForwardParams {
  int32_t mode = kModeSoftmax;  // softmax: out and lse; hard: out and index
  int64_t batch = 0, heads_q = 0, heads_kv = 0;  // heads_q % heads_kv == 0
  int64_t len_q = 0, len_k = 0, dim_qk = 0, dim_v = 0;
  int64_t num_q_tiles = 0;
  int64_t q0 = 0, k0 = 0;  // absolute positions of query row 0 and key 0 (ALiBi, random draws)
  DeviceOperand q, k, v;  // stride_col == 1
  DeviceOperand mask;     // uint8, nonzero = may attend
  DeviceOperand bias;     // the input element type, added to the scores
  const int64_t* key_lengths = nullptr;  // per batch, local key limits, or null

  // s = softcap(scale * score(q, k)) - slope_h * |i - j| + bias, as on the CPU.
  int32_t score = kScoreDot;  // dot: q . k; cosine: q . k / (|q| |k|), 0 for a zero vector
  float scale = 1.0f;
  float softcap = 0.0f;                  // > 0: s -> softcap * tanh(s / softcap)
  const float* alibi_slopes = nullptr;   // one per query head, or null

  // Randomness from csrc/core/random.h, keyed by (seed, batch, head, i, j) as on the CPU.
  float dropout_p = 0.0f;  // softmax: drop each probability with this chance, keep 1/(1-p)
  bool sample = false;     // hard: Gumbel-max sampling instead of argmax
  float temperature = 1.0f;  // sampling takes the argmax of s + temperature * Gumbel noise
  uint64_t seed = 0;

  void* out = nullptr;      // contiguous (batch, heads_q, len_q, dim_v), the input element type
  float* lse = nullptr;     // softmax: contiguous (batch, heads_q, len_q), float32, or null
  int64_t* index = nullptr; // hard: contiguous (batch, heads_q, len_q), -1 for an empty row
  const DeviceLayout* layouts = nullptr;  // one per query head, all of (len_q, len_k)
};

}  // namespace sparse_attn::cuda
