"""Sparsity patterns: immutable descriptions of the allowed (query i, key j) pairs.

A pattern lowers itself to the postfix program of ``_ops`` that the C++ core evaluates and draws
its own dense mask with NumPy; it knows nothing about devices, kernels or compiled layouts.

Adding a pattern means adding one class: declare ``__slots__ = _params = (names...)`` (the
constructor parameters, stored under their own names), validate them in ``__init__`` and store
them with ``_set_fields``, then define ``_nodes`` (the program) and ``_mask`` (the NumPy mask);
``__repr__``, equality, hashing and pickling follow from ``_params``.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

import numpy as np

from . import _ops, _random

__all__ = [
    "BlockSparse",
    "Causal",
    "Dense",
    "Documents",
    "Fixed",
    "Global",
    "Intersection",
    "Mask",
    "Pattern",
    "Random",
    "RandomBlocks",
    "SlidingWindow",
    "Strided",
    "Union",
    "as_head_patterns",
]

# One node of a lowered program: (op, a, b, c, d, data), as documented in _ops.
Node = tuple[int, int, int, int, int, "np.ndarray | None"]

# Integer parameters stay within 2**62 so that i + offset and i - left cannot overflow int64,
# here and in the C++ predicates.
_INT_LIMIT = 2**62

# The core's tiles hold at most 64 keys (one 64-bit word of mask bits per row); larger blocks are
# drawn from 64-tiles. Counting uses 64 too, the kernels' tile, so the layout cache is shared.
_CORE_TILE = 64
_OUTSIDE = 3  # a tile kind for the padding beyond the last tile when 64-tiles are grouped

_MAX_PICTURE = 64  # to_string draws at most this many tiles per side
_TILE_CHARS = np.array([".", "+", "#"])  # indexed by tile kind: 0 empty, 1 partial, 2 full


def _check_int(value, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as a Python int; real ints only (numpy integers too, bool never)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if abs(value) > _INT_LIMIT:
        raise ValueError(f"{name} must lie within +-2**62, got {value}")
    return value


def _int_sequence(values, name: str, *, minimum: int = 0) -> np.ndarray:
    """``values`` as a 1-D int64 array of ints in ``[minimum, 2**62]`` (bools never)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {array.shape}")
    if not array.size:
        return np.zeros(0, dtype=np.int64)
    if array.dtype == np.bool_ or array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be ints, got {array.dtype}")
    for bound in (array.min(), array.max()):  # reports the offending extreme
        _check_int(bound, name, minimum=minimum)
    return array.astype(np.int64)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _sizes(Lq, Lk) -> tuple[int, int]:
    """Validate the sequence lengths; ``Lk`` defaults to ``Lq``."""
    Lq = _check_int(Lq, "Lq", minimum=0)
    Lk = Lq if Lk is None else _check_int(Lk, "Lk", minimum=0)
    return Lq, Lk


def _positions(Lq: int, Lk: int) -> tuple[np.ndarray, np.ndarray]:
    """Query positions as a column and key positions as a row; they broadcast to (Lq, Lk)."""
    return np.arange(Lq, dtype=np.int64)[:, None], np.arange(Lk, dtype=np.int64)[None, :]


def _frozen_bool_array(value, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """A read-only C-contiguous bool copy of ``value`` (bool, or integers that are all 0/1)."""
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular array: {error}") from None
    if array.dtype != np.bool_:
        if array.dtype.kind not in "iu":
            raise TypeError(
                f"{name} must be a bool array or an int array of 0/1, got {array.dtype}"
            )
        if not ((array == 0) | (array == 1)).all():
            raise ValueError(f"{name} holds integers other than 0 and 1")
    if array.ndim not in ndims:
        allowed = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {allowed}, got shape {array.shape}")
    frozen = np.array(array, dtype=np.bool_, order="C", copy=True)
    frozen.flags.writeable = False
    return frozen


def _describe_bool_array(array: np.ndarray) -> str:
    shape = ", ".join(str(n) for n in array.shape)
    return f"<bool ({shape}), {int(np.count_nonzero(array))} set>"


def _stack_depth(nodes: list[Node]) -> int:
    """Peak stack depth of ``nodes``: a leaf pushes one, a combinator pops two and pushes one."""
    depth = peak = 0
    for node in nodes:
        depth += -1 if node[0] in (_ops.UNION, _ops.INTERSECT) else 1
        peak = max(peak, depth)
    return peak


def _check_block(block) -> int:
    """A tile size the core compiles directly (<= 64) or as groups of 64-tiles."""
    block = _check_int(block, "block", minimum=1)
    if block > _CORE_TILE and block % _CORE_TILE:
        raise ValueError(
            f"block must be at most {_CORE_TILE} or a multiple of {_CORE_TILE}, got {block}"
        )
    return block


def _group_tiles(kinds: np.ndarray, factor: int) -> np.ndarray:
    """Kinds of factor x factor groups of tiles.

    A group is full if all its tiles are, else partial if any tile holds an allowed pair.
    """
    rows, cols = -(-kinds.shape[0] // factor), -(-kinds.shape[1] // factor)
    padded = np.full((rows * factor, cols * factor), _OUTSIDE, dtype=np.uint8)
    padded[: kinds.shape[0], : kinds.shape[1]] = kinds
    groups = padded.reshape(rows, factor, cols, factor)
    listed = ((groups == 1) | (groups == 2)).any(axis=(1, 3))
    full = (groups >= 2).all(axis=(1, 3))
    return np.where(listed & full, 2, listed).astype(np.uint8)


def _draw_tiles(kinds: np.ndarray, block: int) -> str:
    """One line per query tile: '#' full, '+' partial, '.' empty; truncated to a 64 x 64 corner."""
    shown = kinds[:_MAX_PICTURE, :_MAX_PICTURE]
    lines = ["".join(_TILE_CHARS[row]) for row in shown]
    if shown.shape != kinds.shape:
        lines.append(
            f"(first {shown.shape[0]} x {shown.shape[1]} of {kinds.shape[0]} x {kinds.shape[1]}"
            f" tiles of {block} x {block})"
        )
    return "\n".join(lines)


class Pattern(ABC):
    """The set of allowed (query i, key j) pairs, as immutable, hashable data.

    ``a | b`` is their union and ``a & b`` their intersection. A pattern is head-agnostic
    (``num_heads is None``) unless it holds one layout per head; ``split_heads`` gives one
    head-agnostic pattern per head either way.
    """

    __slots__ = ("_hash",)
    _params: tuple[str, ...] = ()

    # ---- what each pattern defines ------------------------------------------------------------

    @abstractmethod
    def _nodes(self, Lq: int, Lk: int) -> list[Node]:
        """The postfix program for validated sizes (see ``_ops``)."""

    @abstractmethod
    def _mask(self, Lq: int, Lk: int) -> np.ndarray:
        """A bool array broadcastable to the shape ``to_mask`` returns, for validated sizes."""

    def _split_heads(self) -> list[Pattern]:
        """One head-agnostic pattern per head; defined by patterns whose ``num_heads`` is set."""
        raise NotImplementedError(f"{type(self).__name__} is head-agnostic")

    @property
    def num_heads(self) -> int | None:
        """The number of heads of a per-head pattern; None for a head-agnostic one."""
        return None

    # ---- immutable value semantics ------------------------------------------------------------

    def _set_fields(self, **fields) -> None:
        """Store the validated fields once, then the hash (every field is immutable)."""
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_hash", hash((type(self).__name__, self._key())))

    def _args(self) -> tuple:
        """The constructor arguments that rebuild this pattern."""
        return tuple(getattr(self, name) for name in self._params)

    def _key(self) -> tuple:
        """What equality compares; patterns that hold arrays compare their shape and bytes."""
        return self._args()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        return self is other or (
            type(self) is type(other) and self._hash == other._hash and self._key() == other._key()
        )

    def __hash__(self):
        return self._hash

    def __reduce__(self):
        return type(self), self._args()

    def __repr__(self):
        params = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._params)
        return f"{type(self).__name__}({params})"

    def __or__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        return Union(self, other)

    def __and__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        return Intersection(self, other)

    # ---- dense views (NumPy, for small sizes) ---------------------------------------------------

    def to_mask(self, Lq, Lk=None) -> np.ndarray:
        """The allowed pairs as a new bool array (Lq, Lk), or (H, Lq, Lk) for a per-head pattern."""
        Lq, Lk = _sizes(Lq, Lk)
        shape = (Lq, Lk) if self.num_heads is None else (self.num_heads, Lq, Lk)
        return np.broadcast_to(self._mask(Lq, Lk), shape).copy()

    def _lower(self, Lq, Lk=None) -> list[Node]:
        """The postfix program ``[(op, a, b, c, d, data), ...]`` the C++ core evaluates."""
        Lq, Lk = _sizes(Lq, Lk)
        nodes = self._nodes(Lq, Lk)
        depth = _stack_depth(nodes)
        if depth > _ops.MAX_PROGRAM_DEPTH:
            raise ValueError(
                f"pattern nests too deeply: its program needs {depth} stack entries, the core "
                f"evaluates at most {_ops.MAX_PROGRAM_DEPTH} (build long unions left to right)"
            )
        return nodes

    def split_heads(self, H) -> list[Pattern]:
        """``H`` head-agnostic patterns: ``[self] * H``, or the heads of a per-head pattern."""
        H = _check_int(H, "H", minimum=1)
        if self.num_heads is None:
            return [self] * H
        if self.num_heads != H:
            raise ValueError(f"pattern has {self.num_heads} heads, but {H} heads were asked for")
        return self._split_heads()

    # ---- tile-level views (the C++ layout compiler; never Lq x Lk) -----------------------------

    def _compile(self, Lq: int, Lk: int, tile: int = _CORE_TILE) -> list:
        """One compiled layout per head (a single one for a head-agnostic pattern)."""
        from .layout import compile_layout  # the C++ core, loaded only when tiles are asked for

        heads = [self] if self.num_heads is None else self._split_heads()
        return [compile_layout(head, Lq, Lk, tile, tile) for head in heads]

    def _tile_kinds(self, Lq: int, Lk: int, block: int) -> list[np.ndarray]:
        """Per head, uint8 (query tile, key tile) kinds: 0 empty, 1 partial, 2 full."""
        if block <= _CORE_TILE:
            return [layout.kinds() for layout in self._compile(Lq, Lk, block)]
        return [
            _group_tiles(layout.kinds(), block // _CORE_TILE) for layout in self._compile(Lq, Lk)
        ]

    def nnz(self, Lq, Lk=None) -> int:
        """The number of allowed pairs (summed over the heads of a per-head pattern)."""
        Lq, Lk = _sizes(Lq, Lk)
        return sum(layout.nnz() for layout in self._compile(Lq, Lk))

    def density(self, Lq, Lk=None) -> float:
        """The allowed fraction of all pairs; 0.0 when there are no pairs."""
        Lq, Lk = _sizes(Lq, Lk)
        pairs = (self.num_heads or 1) * Lq * Lk
        return self.nnz(Lq, Lk) / pairs if pairs else 0.0

    def block_layout(self, Lq, Lk=None, block=64) -> np.ndarray:
        """Bool (query tile, key tile) array, True where the tile holds an allowed pair.

        Shape ``(ceil(Lq / block), ceil(Lk / block))``, with a leading head axis for a per-head
        pattern. ``block`` is at most 64 or a multiple of 64.
        """
        Lq, Lk = _sizes(Lq, Lk)
        tiles = np.stack([kinds != 0 for kinds in self._tile_kinds(Lq, Lk, _check_block(block))])
        return tiles if self.num_heads is not None else tiles[0]

    def to_string(self, Lq, Lk=None, block=64) -> str:
        """A text picture of the tile layout: '#' full tile, '+' partial, '.' empty.

        One line per query tile, at most 64 x 64 tiles; ``block`` is at most 64 or a multiple of 64.
        """
        Lq, Lk = _sizes(Lq, Lk)
        block = _check_block(block)
        pictures = [_draw_tiles(kinds, block) for kinds in self._tile_kinds(Lq, Lk, block)]
        if self.num_heads is None:
            return pictures[0]
        return "\n".join(f"head {h}:\n{picture}" for h, picture in enumerate(pictures))

    def summary(self, Lq, Lk=None) -> str:
        """A few lines: the pattern, its size, allowed pairs, density and empty query rows."""
        Lq, Lk = _sizes(Lq, Lk)
        layouts = self._compile(Lq, Lk)
        nnz = sum(layout.nnz() for layout in layouts)
        empty_rows = sum(layout.empty_rows() for layout in layouts)
        pairs = len(layouts) * Lq * Lk
        heads = "" if self.num_heads is None else f" x {self.num_heads} heads"
        return "\n".join(
            [
                repr(self),
                f"size: {Lq} queries x {Lk} keys{heads}",
                f"allowed pairs: {nnz} of {pairs} (density {nnz / pairs if pairs else 0.0:.4g})",
                f"query rows with no allowed key: {empty_rows}",
            ]
        )


class Dense(Pattern):
    """Every pair allowed: plain softmax attention."""

    __slots__ = _params = ()

    def __init__(self):
        self._set_fields()

    def _nodes(self, Lq, Lk):
        return [(_ops.DENSE, 0, 0, 0, 0, None)]

    def _mask(self, Lq, Lk):
        return np.ones((Lq, Lk), dtype=np.bool_)


class Causal(Pattern):
    """``j <= i + offset``; ``offset = Lk - Lq`` aligns to the bottom right (KV-cache decoding)."""

    __slots__ = _params = ("offset",)

    def __init__(self, offset=0):
        self._set_fields(offset=_check_int(offset, "offset"))

    def _nodes(self, Lq, Lk):
        return [(_ops.CAUSAL, self.offset, 0, 0, 0, None)]

    def _mask(self, Lq, Lk):
        i, j = _positions(Lq, Lk)
        return j <= i + self.offset


class SlidingWindow(Pattern):
    """``i - left <= j <= i + right``; ``right`` defaults to ``left``."""

    __slots__ = _params = ("left", "right")

    def __init__(self, left, right=None):
        left = _check_int(left, "left", minimum=0)
        right = left if right is None else _check_int(right, "right", minimum=0)
        self._set_fields(left=left, right=right)

    def _nodes(self, Lq, Lk):
        return [(_ops.WINDOW, self.left, self.right, 0, 0, None)]

    def _mask(self, Lq, Lk):
        i, j = _positions(Lq, Lk)
        return (i - self.left <= j) & (j <= i + self.right)


class Strided(Pattern):
    """``(i - j) % stride == 0`` and, when ``reach`` is given, ``|i - j| <= reach``."""

    __slots__ = _params = ("stride", "reach")

    def __init__(self, stride, reach=None):
        stride = _check_int(stride, "stride", minimum=1)
        reach = None if reach is None else _check_int(reach, "reach", minimum=0)
        self._set_fields(stride=stride, reach=reach)

    def _nodes(self, Lq, Lk):
        reach = -1 if self.reach is None else self.reach
        return [(_ops.STRIDED, self.stride, reach, 0, 0, None)]

    def _mask(self, Lq, Lk):
        i, j = _positions(Lq, Lk)
        allowed = (i - j) % self.stride == 0
        if self.reach is not None:
            allowed &= np.abs(i - j) <= self.reach
        return allowed


class Global(Pattern):
    """Special tokens: ``(rows and i in tokens) or (cols and j in tokens)``.

    ``tokens`` are stored sorted and without duplicates; every token must be a position of the
    queries or of the keys (below ``max(Lq, Lk)``).
    """

    __slots__ = _params = ("tokens", "rows", "cols")

    def __init__(self, tokens, rows=True, cols=True):
        unique = np.unique(_int_sequence(tokens, "tokens")).tolist()
        rows, cols = _check_bool(rows, "rows"), _check_bool(cols, "cols")
        if not (rows or cols):
            raise ValueError("Global needs rows=True or cols=True (or both)")
        self._set_fields(tokens=tuple(unique), rows=rows, cols=cols)

    def __repr__(self):
        switched_off = "".join(
            f", {name}=False" for name in ("rows", "cols") if not getattr(self, name)
        )
        return f"Global(tokens={list(self.tokens)}{switched_off})"

    def _token_array(self, Lq, Lk) -> np.ndarray:
        if self.tokens and self.tokens[-1] >= max(Lq, Lk):
            raise ValueError(
                f"tokens: token {self.tokens[-1]} lies outside the sequence (Lq={Lq}, Lk={Lk})"
            )
        return np.array(self.tokens, dtype=np.int64)

    def _nodes(self, Lq, Lk):
        tokens = self._token_array(Lq, Lk)
        return [(_ops.GLOBAL, int(self.rows), int(self.cols), 0, 0, tokens)]

    def _mask(self, Lq, Lk):
        tokens = self._token_array(Lq, Lk)
        i, j = _positions(Lq, Lk)
        allowed = np.zeros((Lq, Lk), dtype=np.bool_)
        if self.rows:
            allowed |= np.isin(i, tokens)
        if self.cols:
            allowed |= np.isin(j, tokens)
        return allowed


class BlockSparse(Pattern):
    """A bool layout over (query block, key block): ``layout[i // block, j // block]``.

    ``layout`` is ``(query blocks, key blocks)``, or ``(H, query blocks, key blocks)`` with one
    layout per head. It must cover the sequence; extra blocks beyond it are ignored.
    """

    __slots__ = _params = ("layout", "block")

    def __init__(self, layout, block):
        self._set_fields(
            layout=_frozen_bool_array(layout, "layout", (2, 3)),
            block=_check_int(block, "block", minimum=1),
        )

    def _key(self):
        return self.layout.shape, self.layout.tobytes(), self.block

    def __repr__(self):
        return f"BlockSparse(layout={_describe_bool_array(self.layout)}, block={self.block})"

    @property
    def num_heads(self):
        return self.layout.shape[0] if self.layout.ndim == 3 else None

    def _split_heads(self):
        return [BlockSparse(head, self.block) for head in self.layout]

    def _check_covers(self, Lq, Lk) -> None:
        needed = (-(-Lq // self.block), -(-Lk // self.block))
        if self.layout.shape[-2] < needed[0] or self.layout.shape[-1] < needed[1]:
            raise ValueError(
                f"layout of shape {self.layout.shape} does not cover Lq={Lq}, Lk={Lk} with "
                f"block={self.block}: it needs at least {needed} (query blocks, key blocks)"
            )

    def _nodes(self, Lq, Lk):
        if self.num_heads is not None:
            raise ValueError(
                f"BlockSparse with a per-head layout ({self.num_heads} heads) lowers one head at "
                f"a time: use split_heads({self.num_heads})"
            )
        self._check_covers(Lq, Lk)
        query_blocks, key_blocks = self.layout.shape
        data = np.ascontiguousarray(self.layout, dtype=np.uint8)
        return [(_ops.BLOCK, self.block, query_blocks, key_blocks, 0, data)]

    def _mask(self, Lq, Lk):
        self._check_covers(Lq, Lk)
        i, j = _positions(Lq, Lk)
        return self.layout[..., i // self.block, j // self.block]


class Mask(Pattern):
    """A user bool matrix of shape exactly (Lq, Lk); True = may attend."""

    __slots__ = _params = ("array",)

    def __init__(self, array):
        self._set_fields(array=_frozen_bool_array(array, "array", (2,)))

    def _key(self):
        return self.array.shape, self.array.tobytes()

    def __repr__(self):
        return f"Mask(array={_describe_bool_array(self.array)})"

    def _check_shape(self, Lq, Lk) -> None:
        if self.array.shape != (Lq, Lk):
            raise ValueError(
                f"mask of shape {self.array.shape} does not match (Lq, Lk) = ({Lq}, {Lk})"
            )

    def _nodes(self, Lq, Lk):
        self._check_shape(Lq, Lk)
        data = np.ascontiguousarray(self.array, dtype=np.uint8)
        return [(_ops.MASK, Lq, Lk, 0, 0, data)]

    def _mask(self, Lq, Lk):
        self._check_shape(Lq, Lk)
        return self.array


def _check_draws(value, name: str) -> int:
    draws = _check_int(value, name, minimum=0)
    if draws > _ops.MAX_RANDOM_DRAWS:
        raise ValueError(
            f"{name} must be at most {_ops.MAX_RANDOM_DRAWS} (each row's draws are kept in a "
            f"local array by the kernels), got {draws}"
        )
    return draws


class Random(Pattern):
    """``per_row`` random keys per query row, drawn from ``seed``; the same on every device.

    Query row ``i`` attends to ``k = min(per_row, Lk)`` distinct keys of ``[0, Lk)`` (the whole
    key sequence; the rule never depends on ``Lq``), chosen by Floyd's algorithm from the
    counter-based generator of ``csrc/core/random.h``. Draw ``s = 0, 1, ..., k - 1`` of row ``i``
    takes ``m = Lk - k + s`` and ``t = floor(random_bits(seed, RandomPattern, i, s) * (m + 1) /
    2**64)``, a value in ``[0, m]``; the row keeps ``t`` unless an earlier draw of the row kept
    it, in which case it keeps ``m``. Every k-subset of keys is equally likely (up to the 2**-64
    granularity of ``t``), and rows are independent. Nothing is stored: the CPU and CUDA kernels,
    the layout compiler and ``to_mask`` (through ``sparse_attn._random``) recompute a row's keys
    from ``(seed, i)`` alone, with ``O(k**2)`` comparisons. ``per_row`` is at most 64;
    ``seed`` is an int in ``[0, 2**62]``. Combine with ``Causal()`` (``&``) for causal models;
    the keys are drawn from all of ``[0, Lk)`` before the intersection.
    """

    __slots__ = _params = ("per_row", "seed")

    def __init__(self, per_row, seed=0):
        self._set_fields(
            per_row=_check_draws(per_row, "per_row"), seed=_check_int(seed, "seed", minimum=0)
        )

    def _nodes(self, Lq, Lk):
        return [(_ops.RANDOM, self.per_row, self.seed, Lk, 0, None)]

    def _mask(self, Lq, Lk):
        keys = _random.random_row_keys(self.per_row, self.seed, Lk, np.arange(Lq))
        mask = np.zeros((Lq, Lk), dtype=np.bool_)
        mask[np.arange(Lq)[:, None], keys] = True
        return mask


class RandomBlocks(Pattern):
    """``per_block_row`` random key blocks per query block, drawn from ``seed`` (BigBird's random
    attention at block level); the same on every device.

    Query block ``qb = i // block`` attends to ``min(per_block_row, available)`` distinct key
    blocks ``kb`` (keys ``[kb * block, (kb + 1) * block)``) of the ``ceil(Lk / block)`` key blocks,
    excluding the first ``exclude_first`` blocks and, when ``exclude_radius`` is given, the blocks
    with ``|kb - qb| <= exclude_radius`` (BigBird excludes its global and window blocks so that
    random blocks never repeat them). The draw is the rule of ``Random`` applied to the ranks of
    the available blocks in ascending order, with counters ``(qb, s)`` of the stream
    ``RandomBlocks``: ``n = available``, ``k = min(per_block_row, n)``, draw ``s`` takes
    ``t = floor(random_bits(seed, RandomBlocks, qb, s) * (m + 1) / 2**64)``, ``m = n - k + s``,
    keeps ``t`` unless already kept, else ``m``. ``per_block_row`` is at most 64.
    """

    __slots__ = _params = ("per_block_row", "block", "seed", "exclude_first", "exclude_radius")

    def __init__(self, per_block_row, block, seed=0, exclude_first=0, exclude_radius=None):
        if exclude_radius is not None:
            exclude_radius = _check_int(exclude_radius, "exclude_radius", minimum=0)
        self._set_fields(
            per_block_row=_check_draws(per_block_row, "per_block_row"),
            block=_check_int(block, "block", minimum=1),
            seed=_check_int(seed, "seed", minimum=0),
            exclude_first=_check_int(exclude_first, "exclude_first", minimum=0),
            exclude_radius=exclude_radius,
        )

    def __repr__(self):
        shown = ["per_block_row", "block", "seed"]
        shown += ["exclude_first"] if self.exclude_first else []
        shown += ["exclude_radius"] if self.exclude_radius is not None else []
        params = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"RandomBlocks({params})"

    def _exclusion(self) -> tuple[int, int]:
        return self.exclude_first, -1 if self.exclude_radius is None else self.exclude_radius

    def _nodes(self, Lq, Lk):
        exclusion = self._exclusion()
        data = None if exclusion == (0, -1) else np.array(exclusion, dtype=np.int64)
        key_blocks = -(-Lk // self.block)
        return [(_ops.RANDOM_BLOCKS, self.per_block_row, self.block, self.seed, key_blocks, data)]

    def _mask(self, Lq, Lk):
        query_blocks, key_blocks = -(-Lq // self.block), -(-Lk // self.block)
        drawn = _random.random_key_blocks(
            self.per_block_row, self.seed, key_blocks, np.arange(query_blocks), *self._exclusion()
        )
        layout = np.zeros((query_blocks, key_blocks + 1), dtype=np.bool_)  # last column: padding
        layout[np.arange(query_blocks)[:, None], drawn] = True
        i, j = _positions(Lq, Lk)
        return layout[i // self.block, j // self.block]


class Fixed(Pattern):
    """The "fixed" pattern of the Sparse Transformer (Child et al. 2019, section 4.3).

    ``j // block == i // block`` (the same block: Child et al.'s A(1)), or
    ``j % block >= block - summary`` (one of the last ``summary`` positions of a block, which
    summarise it: A(2) with ``l = block``, ``c = summary``). Not causal by itself: intersect with
    ``Causal()``, as ``SparseTransformer("fixed", ...)`` does. ``0 <= summary <= block``.
    """

    __slots__ = _params = ("block", "summary")

    def __init__(self, block, summary):
        block = _check_int(block, "block", minimum=1)
        summary = _check_int(summary, "summary", minimum=0)
        if summary > block:
            raise ValueError(f"summary must be at most block ({block}), got {summary}")
        self._set_fields(block=block, summary=summary)

    def _nodes(self, Lq, Lk):
        return [(_ops.FIXED, self.block, self.summary, 0, 0, None)]

    def _mask(self, Lq, Lk):
        i, j = _positions(Lq, Lk)
        return (i // self.block == j // self.block) | (j % self.block >= self.block - self.summary)


class Documents(Pattern):
    """Packed sequences: ``i`` and ``j`` lie in the same document.

    Document ``d`` holds positions ``[sum(lengths[:d]), sum(lengths[:d + 1]))``, for queries and
    keys alike; positions past the last document belong to none and are never allowed (their
    query rows are empty). Zero lengths are allowed and hold nothing. Combine with ``Causal()``
    or ``SlidingWindow(...)`` by ``&``. Its layout lists, per query tile, the key tiles of the
    documents it meets: compiling costs time in proportion to the listed tiles.
    """

    __slots__ = _params = ("lengths",)

    _MAX_SHOWN = 8  # repr lists at most this many lengths

    def __init__(self, lengths):
        lengths = _int_sequence(lengths, "lengths")
        if int(lengths.sum(dtype=np.float64)) > _INT_LIMIT:
            raise ValueError("lengths must sum to at most 2**62")
        self._set_fields(lengths=tuple(lengths.tolist()))

    def __repr__(self):
        if len(self.lengths) <= self._MAX_SHOWN:
            return f"Documents(lengths={list(self.lengths)})"
        return f"Documents(lengths=<{len(self.lengths)} documents, {sum(self.lengths)} positions>)"

    def _ends(self) -> np.ndarray:
        return np.cumsum(np.array(self.lengths, dtype=np.int64), dtype=np.int64)

    def _nodes(self, Lq, Lk):
        return [(_ops.DOCUMENTS, 0, 0, 0, 0, self._ends())]

    def _mask(self, Lq, Lk):
        ends = self._ends()
        i, j = _positions(Lq, Lk)
        doc_i = np.searchsorted(ends, i, side="right")  # the first document ending after i
        doc_j = np.searchsorted(ends, j, side="right")
        return (doc_i == doc_j) & (doc_i < len(ends))


class _BlockWindow(Pattern):
    """Blocks around the query's block: ``-left <= j // block - i // block <= right``.

    BigBird's sliding window at block level; kept private, BigBird is its public face.
    """

    __slots__ = _params = ("block", "left", "right")

    def __init__(self, block, left, right):
        self._set_fields(
            block=_check_int(block, "block", minimum=1),
            left=_check_int(left, "left", minimum=0),
            right=_check_int(right, "right", minimum=0),
        )

    def _nodes(self, Lq, Lk):
        return [(_ops.BLOCK_WINDOW, self.block, self.left, self.right, 0, None)]

    def _mask(self, Lq, Lk):
        i, j = _positions(Lq, Lk)
        offset = j // self.block - i // self.block
        return (-self.left <= offset) & (offset <= self.right)


class _Combination(Pattern):
    """A binary set operation on two patterns; per-head when either side is."""

    __slots__ = ("_heads", "a", "b")
    _params = ("a", "b")
    _op: int
    _symbol: str

    def __init__(self, a, b):
        for name, side in (("a", a), ("b", b)):
            if not isinstance(side, Pattern):
                raise TypeError(f"{name} must be a Pattern, got {type(side).__name__}")
        if a.num_heads is not None and b.num_heads is not None and a.num_heads != b.num_heads:
            raise ValueError(f"cannot combine patterns with {a.num_heads} and {b.num_heads} heads")
        heads = a.num_heads if a.num_heads is not None else b.num_heads
        self._set_fields(a=a, b=b, _heads=heads)

    def __repr__(self):
        return f"({self.a!r} {self._symbol} {self.b!r})"

    @property
    def num_heads(self):
        return self._heads

    def _split_heads(self):
        heads_a, heads_b = self.a.split_heads(self._heads), self.b.split_heads(self._heads)
        return [type(self)(a, b) for a, b in zip(heads_a, heads_b)]

    def _nodes(self, Lq, Lk):
        return [*self.a._nodes(Lq, Lk), *self.b._nodes(Lq, Lk), (self._op, 0, 0, 0, 0, None)]


class Union(_Combination):
    """Pairs allowed by ``a`` or by ``b`` (``a | b``)."""

    __slots__ = ()
    _op = _ops.UNION
    _symbol = "|"

    def _mask(self, Lq, Lk):
        return self.a._mask(Lq, Lk) | self.b._mask(Lq, Lk)


class Intersection(_Combination):
    """Pairs allowed by both ``a`` and ``b`` (``a & b``)."""

    __slots__ = ()
    _op = _ops.INTERSECT
    _symbol = "&"

    def _mask(self, Lq, Lk):
        return self.a._mask(Lq, Lk) & self.b._mask(Lq, Lk)


def as_head_patterns(pattern, num_heads) -> tuple[Pattern, ...]:
    """One head-agnostic pattern per query head.

    ``pattern`` is None (dense attention), a Pattern (per-head patterns are split), or a list or
    tuple with one head-agnostic Pattern per head.
    """
    num_heads = _check_int(num_heads, "num_heads", minimum=1)
    if pattern is None:
        return (Dense(),) * num_heads
    if isinstance(pattern, Pattern):
        if pattern.num_heads not in (None, num_heads):
            raise ValueError(
                f"pattern has {pattern.num_heads} heads, but there are {num_heads} query heads"
            )
        return tuple(pattern.split_heads(num_heads))
    if not isinstance(pattern, (list, tuple)):
        raise TypeError(
            f"pattern must be None, a Pattern or a list of Patterns, got {type(pattern).__name__}"
        )
    if len(pattern) != num_heads:
        raise ValueError(
            f"pattern lists {len(pattern)} patterns, but there are {num_heads} query heads"
        )
    for h, head in enumerate(pattern):
        if not isinstance(head, Pattern):
            raise TypeError(f"pattern[{h}] must be a Pattern, got {type(head).__name__}")
        if head.num_heads is not None:
            raise ValueError(
                f"pattern[{h}] holds {head.num_heads} heads; a list needs one head-agnostic "
                "pattern per head"
            )
    return tuple(pattern)
