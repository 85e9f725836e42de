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
RANDOM = 7  # a = keys per row, b = seed (low 63 bits), c = total key length (reserved, #4)
RANDOM_BLOCKS = 8  # reserved (#4)
FIXED = 9  # reserved (#4)
DOCUMENTS = 10  # reserved (#4)
UNION = 20  # pops two, pushes their union
INTERSECT = 21  # pops two, pushes their intersection

MAX_PROGRAM_DEPTH = 32  # stack depth limit of the evaluator
