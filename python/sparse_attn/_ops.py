"""Opcodes of the pattern program: the primitives the C++ core knows.

Mirrors ``enum class Op`` in ``csrc/core/predicates.h``; the two lists must stay equal.
A lowered pattern is a postfix list of nodes ``(op, a, b, c, d, data)``.
"""

DENSE = 0  # always allowed
CAUSAL = 1  # a = offset: j <= i + a
WINDOW = 2  # a = left, b = right: i - a <= j <= i + b
STRIDED = 3  # a = stride, b = reach (-1: unlimited): (i - j) % a == 0 and |i - j| <= b
GLOBAL = 4  # a = rows (0/1), b = cols (0/1), data = sorted unique int64 tokens
BLOCK = 5  # a = block, b = query blocks, c = key blocks, data = uint8 (b * c) row-major
MASK = 6  # a = rows, b = cols, data = uint8 (a * b) row-major; outside it: not allowed
RANDOM = 7  # a = keys per row, b = seed, c = total key length
# a = key blocks per block row, b = block, c = seed, d = total key blocks,
# data = None or int64 [exclude_first, exclude_radius (-1: none)]
RANDOM_BLOCKS = 8
FIXED = 9  # a = block, b = summary: j // a == i // a or j % a >= a - b
DOCUMENTS = 10  # data = int64 cumulative document ends (non-decreasing)
BLOCK_WINDOW = 11  # a = block, b = left, c = right (in blocks): -b <= j // a - i // a <= c
UNION = 20  # pops two, pushes their union
INTERSECT = 21  # pops two, pushes their intersection

MAX_PROGRAM_DEPTH = 32  # stack depth limit of the evaluator
MAX_RANDOM_DRAWS = 64  # keys per row of RANDOM, key blocks per block row of RANDOM_BLOCKS
