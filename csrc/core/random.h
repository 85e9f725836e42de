// Counter-based random numbers: a pure function of (seed, stream, counters), so the CPU
// kernels, the CUDA kernels, the layout compiler and NumPy (sparse_attn._random) draw the same
// values in any order and on any thread count, without storing them. Host + device inline.
#pragma once

#include <cstdint>

#include "hostdevice.h"  // SA_HD

namespace sparse_attn {

// Independent streams, so that e.g. dropout and Gumbel noise never share draws.
enum class RandomStream : uint64_t {
  RandomPattern = 1,  // Random(per_row, seed): counters (row, draw)
  RandomBlocks = 2,   // RandomBlocks(per_block_row, block, seed): counters (block row, draw)
  Dropout = 3,        // dropout keep/drop: counters (batch, head, i, j)
  Gumbel = 4,         // hard attention sampling: counters (batch, head, i, j)
};

// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche.
SA_HD uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The draws of one row of counters (a, b, c, *): random_bits(seed, stream, a, b, c, d) equals
// random_bits_in_row(random_row_prefix(seed, stream, a, b, c), d), one mix per element.
SA_HD uint64_t random_row_prefix(uint64_t seed, RandomStream stream, uint64_t a, uint64_t b,
                                 uint64_t c) {
  uint64_t h = mix64(seed ^ (static_cast<uint64_t>(stream) << 56));
  h = mix64(h ^ a);
  h = mix64(h ^ b);
  return mix64(h ^ c);
}
SA_HD uint64_t random_bits_in_row(uint64_t row_prefix, uint64_t d) {
  return mix64(row_prefix ^ d);
}

// The draw for (seed, stream, a, b, c, d): each counter is folded in through the mixer.
SA_HD uint64_t random_bits(uint64_t seed, RandomStream stream, uint64_t a, uint64_t b = 0,
                           uint64_t c = 0, uint64_t d = 0) {
  return random_bits_in_row(random_row_prefix(seed, stream, a, b, c), d);
}

// Uniform in [0, 1) with 24 random bits (exact in float32).
SA_HD float random_uniform(uint64_t bits) {
  return static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);
}

}  // namespace sparse_attn
