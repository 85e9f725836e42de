// Which pairs of one (query tile, key tile) may attend: the compiled layout's bits for partial
// tiles, the key-length cut and the user's mask, as one 64-bit word per query row.
// Shared by the CPU forward and backward passes; holds no arithmetic on scores.
#pragma once

#include <cstdint>

#include "../core/params.h"
#include "microkernels.h"

namespace sparse_attn::cpu {

// Row `row` of head h of batch entry b of a strided operand.
template <typename T>
const T* operand_row(const Operand& op, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(op.data) + op.batch_offset[b] + h * op.stride_head +
         row * op.stride_row;
}

// row_bits[r] = allowed columns of query row row0 + r within key tile kt (cols wide): the
// layout's bits when the tile is partial, keys below key_limit, and the user's mask.
// Lanes past the last row get none.
inline void tile_row_bits(const AttentionParams& p, const Layout& layout, int64_t b, int64_t h,
                          int64_t row0, int rows, int64_t kt, int cols, bool partial,
                          int64_t key_limit, uint64_t* row_bits) {
  const int64_t col0 = kt * kTileK;
  const uint64_t limit_bits = bit_range(0, key_limit - col0) & bit_range(0, cols);
  for (int r = 0; r < rows; ++r) {
    uint64_t bits = partial ? layout.tile_row_bits(row0 + r, kt) & limit_bits : limit_bits;
    if (p.mask.data != nullptr) {
      const auto* m = static_cast<const uint8_t*>(p.mask.data) + p.mask.batch_offset[b] +
                      h * p.mask.stride_head + (row0 + r) * p.mask.stride_row +
                      col0 * p.mask.stride_col;
      for (int c = 0; c < cols; ++c) {
        if (!m[c * p.mask.stride_col]) bits &= ~(uint64_t{1} << c);
      }
    }
    row_bits[r] = bits;
  }
  for (int r = rows; r < kTileQ; ++r) row_bits[r] = 0;
}

}  // namespace sparse_attn::cpu
