"""NumPy twin of ``csrc/core/random.h`` and of the random-pattern draws in ``predicates.h``.

Vectorised, wrapping uint64 arithmetic that reproduces the C++ bits exactly, so a random
pattern's ``to_mask`` and what the layout compiler and the kernels allow are the same set.
Holds no pattern classes and no state: every value is a pure function of its counters.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "RANDOM_BLOCKS",
    "RANDOM_PATTERN",
    "mix64",
    "mul_high",
    "random_bits",
    "random_key_blocks",
    "random_row_keys",
    "random_subset",
]

# enum class RandomStream
RANDOM_PATTERN = 1  # Random(per_row, seed): counters (row, draw)
RANDOM_BLOCKS = 2  # RandomBlocks(per_block_row, block, seed): counters (block row, draw)
DROPOUT = 3
GUMBEL = 4

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)


def _u64(x) -> np.ndarray:
    """``x`` (ints >= 0, or uint64) as a uint64 array of at least one dimension."""
    return np.atleast_1d(np.asarray(x).astype(np.uint64))


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on a uint64 array (wrapping, as in C++)."""
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def random_bits(seed, stream: int, a, b=0, c=0, d=0) -> np.ndarray:
    """``random_bits(seed, stream, a, b, c, d)`` of random.h; the counters broadcast."""
    h = mix64(_u64(seed) ^ (_U64(stream) << _U64(56)))
    for counter in (a, b, c, d):
        h = mix64(h ^ _u64(counter))
    return h


def mul_high(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``floor(a * b / 2**64)`` for uint64 arrays, from 32-bit halves (no 128-bit type needed)."""
    a_lo, a_hi = a & _LOW32, a >> _U64(32)
    b_lo, b_hi = b & _LOW32, b >> _U64(32)
    # cross < 2**64: (2**32 - 1)**2 + 2 * (2**32 - 1) = 2**64 - 1
    cross = ((a_lo * b_lo) >> _U64(32)) + ((a_hi * b_lo) & _LOW32) + a_lo * b_hi
    return a_hi * b_hi + ((a_hi * b_lo) >> _U64(32)) + (cross >> _U64(32))


def random_subset(seed, stream: int, counters, n, k) -> np.ndarray:
    """Floyd's algorithm, as ``random_subset`` in predicates.h, once per counter.

    Counter ``r`` draws ``k[r]`` distinct values of ``[0, n[r])`` (``k[r] <= n[r]``); draw ``s``
    takes ``t = floor(bits * (m + 1) / 2**64)``, ``m = n - k + s``, ``bits = random_bits(seed,
    stream, counter, s)``, and keeps ``t`` unless an earlier draw kept it, else ``m``. Returns
    int64 ``(len(counters), max(k))``, the draws in order, padded with -1.
    """
    counters = np.atleast_1d(np.asarray(counters, dtype=np.int64))
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), counters.shape)
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), counters.shape)
    width = int(k.max()) if k.size else 0
    out = np.full((counters.size, width), -1, dtype=np.int64)
    for s in range(width):
        active = s < k
        m = n - k + s
        bits = random_bits(seed, stream, counters, s)
        t = mul_high(bits, np.where(active, m + 1, 1).astype(np.uint64)).astype(np.int64)
        kept = (out[:, :s] == t[:, None]).any(axis=1)
        out[:, s] = np.where(active, np.where(kept, m, t), -1)
    return out


def random_row_keys(per_row: int, seed: int, n: int, rows) -> np.ndarray:
    """The keys of each query row under ``Random(per_row, seed)`` with ``n`` keys in all:
    int64 ``(len(rows), min(per_row, n))``."""
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    k = min(per_row, n)
    if k == n:  # every key is drawn (Floyd's algorithm gives the same set)
        return np.broadcast_to(np.arange(n, dtype=np.int64), (rows.size, n)).copy()
    return random_subset(seed, RANDOM_PATTERN, rows, n, k)


def random_key_blocks(
    per_block_row: int, seed: int, total: int, block_rows, exclude_first=0, exclude_radius=-1
) -> np.ndarray:
    """The key blocks of each query block row under ``RandomBlocks``, as ``random_key_blocks`` in
    predicates.h: int64 ``(len(block_rows), min(per_block_row, total))``, padded with -1 where
    fewer blocks are available.

    Blocks ``< exclude_first`` and, when ``exclude_radius >= 0``, blocks within
    ``exclude_radius`` of the block row are excluded; the draws are ranks among the remaining
    blocks, in ascending order.
    """
    qb = np.atleast_1d(np.asarray(block_rows, dtype=np.int64))
    first = min(exclude_first, total)
    if exclude_radius >= 0:
        lo = np.maximum(qb - exclude_radius, first)
        hi = np.minimum(qb + exclude_radius, total - 1)
    else:
        lo, hi = np.zeros_like(qb), np.full_like(qb, -1)
    gap = np.where(hi >= lo, hi - lo + 1, 0)
    available = total - first - gap
    k = np.minimum(per_block_row, available)
    ranks = random_subset(seed, RANDOM_BLOCKS, qb, available, k)
    if ranks.shape[1] < min(per_block_row, total):  # keep the documented width
        pad = np.full((qb.size, min(per_block_row, total) - ranks.shape[1]), -1, dtype=np.int64)
        ranks = np.concatenate([ranks, pad], axis=1)
    blocks = first + ranks
    blocks = np.where((gap[:, None] > 0) & (blocks >= lo[:, None]), blocks + gap[:, None], blocks)
    return np.where(ranks >= 0, blocks, -1)
