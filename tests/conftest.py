"""Random-case generators shared by the tests: patterns, shapes, operands and memory layouts, one
checker against the float64 oracle, a runner for the SIMD levels and the worst-error summary.

Every case is drawn from its own seeded ``np.random.Generator``, so a failure names its seed and
reruns alone. The oracle is ``sparse_attn.reference``; nothing here reads library internals.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# Idle OpenMP threads sleep instead of spinning: thousands of small calls on a shared 2-core
# machine otherwise spend half their time in spin-waits. Results do not depend on it. Set
# before the library (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sparse_attn as sa  # noqa: E402
from sparse_attn import reference  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent

# Odd sizes always, around the 64-wide kernel tile and the SIMD widths.
LENGTHS = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 100, 127, 128, 129, 200, 257)
HEAD_DIMS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 96, 127, 128)
HEAD_DIMS += (200, 255, 256)
HEAD_COUNTS = (1, 2, 3, 4, 6, 8)
BLOCKS = (1, 2, 3, 5, 16, 31, 32, 63, 64, 65, 100, 128)
PRIMITIVE_KINDS = ("dense", "causal", "window", "strided", "global", "block", "mask")
LAYOUT_KINDS = ("C", "F", "T", "perm", "slice", "neg", "bcast")

# Tolerances of the contract (see tests/test_attention.py): relative Frobenius error of the
# output, absolute error of finite lse entries.
REL_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
LSE_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}

# A case's reference work, prod(batch) * Hq * Lq * Lk * (D + Dv), stays below this so the
# float64 oracle answers in milliseconds.
WORK_BUDGET = 1.0e7


# ---- worst errors seen in this process ----------------------------------------------------------

WORST = {
    "float32 rel err": 0.0,
    "float64 rel err": 0.0,
    "float32 lse err": 0.0,
    "float64 lse err": 0.0,
    "cases": 0,
}


def record(dtype, rel_err: float, lse_err: float | None) -> None:
    name = np.dtype(dtype).name
    WORST[f"{name} rel err"] = max(WORST[f"{name} rel err"], float(rel_err))
    if lse_err is not None:
        WORST[f"{name} lse err"] = max(WORST[f"{name} lse err"], float(lse_err))
    WORST["cases"] += 1


def merge_worst(other: dict) -> None:
    """Fold the tracker of a subprocess into this one."""
    for name, value in other.items():
        WORST[name] = WORST[name] + value if name == "cases" else max(WORST[name], value)


def pytest_terminal_summary(terminalreporter):
    if not WORST["cases"]:
        return
    terminalreporter.write_sep("-", "sparse_attn: worst errors against the float64 reference")
    terminalreporter.write_line(
        f"worst float32 rel err {WORST['float32 rel err']:.3g} / "
        f"worst float64 rel err {WORST['float64 rel err']:.3g} / "
        f"worst lse err {WORST['float32 lse err']:.3g} (float32), "
        f"{WORST['float64 lse err']:.3g} (float64)  over {WORST['cases']} checked calls"
    )


@pytest.fixture(scope="session")
def worst_errors():
    """The process-wide tracker of the worst errors (printed at the end of the run)."""
    return WORST


# ---- small random helpers ----------------------------------------------------------------------


def pick(rng: np.random.Generator, options, p=None):
    """One element of ``options`` (any sequence), keeping its Python type."""
    return options[int(rng.choice(len(options), p=p))]


def small_or_large(rng, upper: int) -> int:
    """A non-negative int, mostly small, sometimes near the tile size or up to ``upper``."""
    roll = rng.random()
    if roll < 0.45:
        return int(rng.integers(0, 6))
    if roll < 0.65:
        return int(pick(rng, (31, 32, 33, 63, 64, 65, 127, 128, 129)))
    if roll < 0.95:
        return int(rng.integers(0, max(upper, 1) + 1))
    return int(pick(rng, (upper + 1, upper + 100, 2**40)))


# ---- patterns -----------------------------------------------------------------------------------


def random_primitive(rng, Lq: int, Lk: int, kind: str | None = None) -> sa.Pattern:
    """One primitive pattern valid for (Lq, Lk): Dense, Causal, SlidingWindow, Strided, Global,
    BlockSparse or Mask, with parameters around the edges (0, tile sizes, beyond the sequence)."""
    kind = kind or pick(rng, PRIMITIVE_KINDS)
    longest = max(Lq, Lk)
    if kind == "dense":
        return sa.Dense()
    if kind == "causal":
        roll = rng.random()
        if roll < 0.3:
            return sa.Causal()
        if roll < 0.55:
            return sa.Causal(Lk - Lq)
        if roll < 0.95:
            return sa.Causal(int(rng.integers(-Lq - 3, Lk + 4)))
        return sa.Causal(int(pick(rng, (-(2**40), 2**40))))
    if kind == "window":
        left = small_or_large(rng, longest)
        right = None if rng.random() < 0.4 else small_or_large(rng, longest)
        return (
            sa.SlidingWindow(left, right)
            if right is not None or rng.random() < 0.5
            else sa.SlidingWindow(left)
        )
    if kind == "strided":
        stride = 1 + small_or_large(rng, longest)
        reach = None if rng.random() < 0.5 else small_or_large(rng, longest)
        return sa.Strided(stride, reach)
    if kind == "global":
        count = int(pick(rng, (0, 1, 1, 2, 3, 5, 9)))
        tokens = rng.choice(longest, size=min(count, longest), replace=False)
        if rng.random() < 0.3 and len(tokens):
            tokens = np.concatenate([tokens, tokens[:1]])  # duplicates are allowed
        rows, cols = pick(rng, ((True, True), (True, False), (False, True)), p=(0.5, 0.25, 0.25))
        tokens = pick(rng, (list(map(int, tokens)), tuple(map(int, tokens)), tokens))
        return sa.Global(tokens, rows=rows, cols=cols)
    if kind == "block":
        block = pick(rng, BLOCKS)
        return sa.BlockSparse(random_block_layout(rng, Lq, Lk, None, block), block)
    if kind == "mask":
        return sa.Mask(rng.random((Lq, Lk)) < pick(rng, (0.0, 0.05, 0.3, 0.7, 1.0)))
    raise ValueError(f"unknown pattern kind {kind!r}")


def random_block_layout(rng, Lq: int, Lk: int, heads: int | None, block: int) -> np.ndarray:
    """A bool (query blocks, key blocks) layout covering (Lq, Lk), sometimes with spare blocks."""
    query_blocks = -(-Lq // block) + int(rng.integers(0, 3) if rng.random() < 0.3 else 0)
    key_blocks = -(-Lk // block) + int(rng.integers(0, 3) if rng.random() < 0.3 else 0)
    shape = (query_blocks, key_blocks) if heads is None else (heads, query_blocks, key_blocks)
    density = pick(rng, (0.0, 0.2, 0.5, 0.8, 1.0), p=(0.05, 0.3, 0.3, 0.2, 0.15))
    layout = rng.random(shape) < density
    return layout.astype(np.int64) if rng.random() < 0.1 else layout  # 0/1 ints are accepted


def random_pattern(
    rng, Lq: int, Lk: int, depth: int | None = None, kind: str | None = None
) -> sa.Pattern:
    """A primitive, or a union / intersection tree of primitives nested up to ``depth`` (<= 3)."""
    if depth is None:
        depth = int(pick(rng, (0, 0, 1, 2, 3)))
    if depth == 0:
        return random_primitive(rng, Lq, Lk, kind)
    left = random_pattern(rng, Lq, Lk, depth - 1, kind)
    right = random_pattern(rng, Lq, Lk, int(rng.integers(0, depth)))
    if rng.random() < 0.5:
        left, right = right, left
    union = rng.random() < 0.5
    if rng.random() < 0.5:
        return left | right if union else left & right
    return sa.Union(left, right) if union else sa.Intersection(left, right)


def random_head_patterns(rng, Lq: int, Lk: int, heads: int, kind: str | None = None):
    """What ``attention(pattern=...)`` takes: None, one pattern, a per-head BlockSparse (maybe
    combined), or a list with one pattern per query head."""
    roll = rng.random()
    if kind is None and roll < 0.08:
        return None
    if kind is None and roll < 0.16:
        block = pick(rng, BLOCKS)
        per_head = sa.BlockSparse(random_block_layout(rng, Lq, Lk, heads, block), block)
        if rng.random() < 0.5:
            other = random_pattern(rng, Lq, Lk, int(rng.integers(0, 2)))
            per_head = per_head | other if rng.random() < 0.5 else other & per_head
        return per_head
    if heads > 1 and roll > 0.8:
        patterns = [random_pattern(rng, Lq, Lk, kind=kind) for _ in range(heads)]
        return patterns if rng.random() < 0.5 else tuple(patterns)
    return random_pattern(rng, Lq, Lk, kind=kind)


def describe_pattern(pattern) -> str:
    if isinstance(pattern, (list, tuple)):
        return "[" + ", ".join(describe_pattern(p) for p in pattern) + "]"
    return repr(pattern)


# ---- shapes and operands ------------------------------------------------------------------------


@dataclass
class Shapes:
    """The sizes of one problem and the leading (batch) shape of each operand."""

    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    lead_q: tuple
    lead_k: tuple
    lead_v: tuple
    rank_q: int = 3  # 2 for a (L, D) operand, else 3 + len(lead)
    rank_k: int = 3
    rank_v: int = 3

    @property
    def batch(self) -> tuple:
        return tuple(np.broadcast_shapes(self.lead_q, self.lead_k, self.lead_v))

    def q_shape(self):
        return (self.Lq, self.D) if self.rank_q == 2 else (*self.lead_q, self.Hq, self.Lq, self.D)

    def k_shape(self):
        return (self.Lk, self.D) if self.rank_k == 2 else (*self.lead_k, self.Hkv, self.Lk, self.D)

    def v_shape(self):
        return (
            (self.Lk, self.Dv) if self.rank_v == 2 else (*self.lead_v, self.Hkv, self.Lk, self.Dv)
        )

    def scores_shape(self):
        return (*self.batch, self.Hq, self.Lq, self.Lk)


def broadcast_variant(rng, shape: tuple, p_one: float = 0.3, p_drop: float = 0.3) -> tuple:
    """A shape that broadcasts to ``shape``: some axes set to 1, maybe some leading axes dropped."""
    out = [1 if rng.random() < p_one else n for n in shape]
    drop = int(rng.integers(0, len(out) + 1)) if out and rng.random() < p_drop else 0
    return tuple(out[drop:])


def random_shapes(rng, *, budget: float = WORK_BUDGET, two_d: float = 0.1) -> Shapes:
    """Random sizes: odd lengths, Lq != Lk, D in 1..256 with Dv != D, GQA (Hq % Hkv == 0),
    leading dimensions that broadcast (k or v with batch dim 1), and sometimes 2-D operands."""
    Lq, Lk = pick(rng, LENGTHS), pick(rng, LENGTHS)
    if rng.random() < 0.15:
        Lk = Lq
    D = pick(rng, HEAD_DIMS)
    Dv = D if rng.random() < 0.2 else pick(rng, HEAD_DIMS)
    per_head = Lq * Lk * (D + Dv + 4)
    if per_head > budget:  # keep the long sequences, shrink the head dims
        D, Dv = min(D, 64), min(Dv, 48)
        per_head = Lq * Lk * (D + Dv + 4)
    room = max(1, int(budget // per_head))

    if rng.random() < two_d:
        # (L, D) operands: all 2-D, or one side 3-D with a single head and no batch.
        ranks = pick(rng, ((2, 2, 2), (2, 3, 3), (3, 2, 2), (2, 2, 3), (3, 3, 2)))
        Hq = 1 if ranks[0] == 2 else pick(rng, [h for h in HEAD_COUNTS if h <= room])
        return Shapes(Hq, 1, Lq, Lk, D, Dv, (), (), (), *ranks)

    Hq = pick(rng, [h for h in HEAD_COUNTS if h <= room])
    Hkv = pick(rng, [h for h in range(1, Hq + 1) if Hq % h == 0])
    batch: list[int] = []
    for _ in range(int(pick(rng, (0, 1, 1, 2, 2, 3)))):
        n = int(pick(rng, (1, 2, 3)))
        if math.prod(batch) * n * Hq <= room:
            batch.append(n)
    batch = tuple(batch)
    return Shapes(
        Hq,
        Hkv,
        Lq,
        Lk,
        D,
        Dv,
        broadcast_variant(rng, batch),
        broadcast_variant(rng, batch),
        broadcast_variant(rng, batch),
    )


def with_layout(a: np.ndarray, kind: str, rng) -> np.ndarray:
    """``a``'s values (for 'bcast': the values of a broadcast slice of it) in another memory
    layout: C, Fortran, last two axes stored swapped, a random axis order, a strided slice of a
    larger buffer, negative strides, or a zero-stride broadcast view (read-only)."""
    if a.ndim == 0 or a.size == 0 or kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "T" and a.ndim >= 2:
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    if kind == "perm":
        order = rng.permutation(a.ndim)
        return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))
    if kind == "slice":
        steps = [1] * a.ndim  # a step of 2 or 3 on one or two axes (memory stays small)
        for axis in rng.choice(a.ndim, size=min(a.ndim, int(rng.integers(1, 3))), replace=False):
            steps[axis] = int(pick(rng, (2, 3)))
        buffer = np.zeros([n * s + 1 for n, s in zip(a.shape, steps)], dtype=a.dtype)
        view = buffer[tuple(slice(1, 1 + n * s, s) for n, s in zip(a.shape, steps))]
        view[...] = a
        return view
    if kind == "neg":
        flips = [bool(rng.random() < 0.6) for _ in range(a.ndim)]
        flip = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
        return np.ascontiguousarray(a[flip])[flip]
    if kind == "bcast":
        axes = [ax for ax in range(a.ndim) if a.shape[ax] > 1]
        if not axes:
            return np.ascontiguousarray(a)
        axis = int(pick(rng, axes))
        first = np.take(a, [0], axis=axis)
        return np.broadcast_to(first, a.shape)
    return np.ascontiguousarray(a)


def random_layout_kind(rng, p_c: float = 0.5) -> str:
    return "C" if rng.random() < p_c else pick(rng, LAYOUT_KINDS[1:])


def random_floats(rng, shape, dtype, magnitude: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * magnitude).astype(dtype)


def random_mask(rng, shapes: Shapes):
    """A bool mask broadcastable to (..., Hq, Lq, Lk), mostly True, sometimes emptying rows."""
    shape = broadcast_variant(rng, shapes.scores_shape(), p_one=0.4, p_drop=0.4)
    density = pick(rng, (0.0, 0.1, 0.5, 0.9, 1.0), p=(0.03, 0.2, 0.3, 0.37, 0.1))
    mask = rng.random(shape) < density
    if mask.ndim >= 2 and rng.random() < 0.2:
        mask[..., int(rng.integers(mask.shape[-2])), :] = False  # a row with no allowed key
    return np.bool_(mask) if mask.ndim == 0 else mask


def random_bias(rng, shapes: Shapes, dtype):
    """A real bias broadcastable to (..., Hq, Lq, Lk), with some -inf entries (whole rows too)."""
    shape = broadcast_variant(rng, shapes.scores_shape(), p_one=0.4, p_drop=0.4)
    bias_dtype = pick(rng, (dtype, np.float32, np.float64, np.int32), p=(0.6, 0.15, 0.15, 0.1))
    if bias_dtype is np.int32:
        return rng.integers(-3, 4, size=shape).astype(np.int32)
    bias = rng.standard_normal(shape) * pick(rng, (0.5, 1.0, 2.0))
    fraction = pick(rng, (0.0, 0.05, 0.3, 0.9))
    bias = np.where(rng.random(shape) < fraction, -np.inf, bias)
    if bias.ndim >= 2 and rng.random() < 0.2:
        bias[..., int(rng.integers(bias.shape[-2])), :] = -np.inf
    bias = np.asarray(bias, dtype=bias_dtype)
    return bias


def random_key_lengths(rng, shapes: Shapes):
    """Ints in [0, Lk] broadcastable to the batch shape (a plain int, a list or an array)."""
    batch = shapes.batch
    shape = broadcast_variant(rng, batch, p_one=0.3, p_drop=0.5)
    lengths = rng.integers(0, shapes.Lk + 1, size=shape)
    if lengths.size and rng.random() < 0.5:
        lengths.flat[int(rng.integers(lengths.size))] = pick(rng, (0, shapes.Lk))
    dtype = pick(rng, (np.int64, np.int32, np.int16 if shapes.Lk < 2**15 else np.int64))
    lengths = lengths.astype(dtype)
    if lengths.ndim == 0 and rng.random() < 0.5:
        return int(lengths)
    if lengths.ndim == 1 and rng.random() < 0.3:
        return lengths.tolist()
    return lengths


def random_scale(rng, D: int):
    roll = rng.random()
    if roll < 0.6:
        return None
    if roll < 0.9:
        return float(rng.uniform(0.01, 2.0) / math.sqrt(D))
    # Unusual values; the absolute ones only where D is small, so that the logits stay within
    # about +-10 and float32 rounding of the scores stays far below the tolerance.
    return pick(rng, (0.0, -0.3 / math.sqrt(D)) + ((np.float32(0.25), 1, 2.0) if D <= 8 else ()))


# ---- one case -----------------------------------------------------------------------------------


@dataclass
class Case:
    """The arguments of one ``sa.attention`` call (and how its result is checked)."""

    seed: object
    dtype: np.dtype
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    pattern: object = None
    options: dict = field(default_factory=dict)  # mask, bias, scale, key_lengths
    return_lse: bool = True
    threads: object = None
    device: str = "cpu"
    out: np.ndarray | None = None
    layouts: dict = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"seed={self.seed} dtype={np.dtype(self.dtype).name}"]
        for name in ("q", "k", "v"):
            a = getattr(self, name)
            parts.append(f"{name}{a.shape} strides={a.strides} layout={self.layouts.get(name)}")
        parts.append(f"pattern={describe_pattern(self.pattern)}")
        for name, value in self.options.items():
            if isinstance(value, np.ndarray):
                value = f"array{value.shape} {value.dtype} layout={self.layouts.get(name)}"
            parts.append(f"{name}={value}")
        parts.append(
            f"return_lse={self.return_lse} threads={self.threads} device={self.device}"
            f" out={None if self.out is None else self.out.shape}"
        )
        return "\n  ".join(parts)


def random_case(
    rng,
    *,
    dtype=None,
    kind: str | None = None,
    seed=None,
    shapes: Shapes | None = None,
    layouts: bool = True,
    options: bool = True,
    out: bool = True,
) -> Case:
    """A random ``attention`` call: shapes, pattern (``kind`` forces the primitive kind),
    mask/bias/key_lengths/scale, memory layouts, ``out=``, threads and ``return_lse``."""
    dtype = np.dtype(dtype if dtype is not None else pick(rng, (np.float32, np.float64)))
    shapes = shapes or random_shapes(rng)
    magnitude = pick(rng, (0.3, 1.0, 1.0, 1.5))
    arrays = {
        "q": random_floats(rng, shapes.q_shape(), dtype, magnitude),
        "k": random_floats(rng, shapes.k_shape(), dtype, magnitude),
        "v": random_floats(rng, shapes.v_shape(), dtype),
    }
    chosen = {}
    if layouts:
        for name, array in arrays.items():
            chosen[name] = random_layout_kind(rng)
            arrays[name] = with_layout(array, chosen[name], rng)
    pattern = random_head_patterns(rng, shapes.Lq, shapes.Lk, shapes.Hq, kind)

    extra = {}
    if options:
        if rng.random() < 0.3:
            extra["mask"] = random_mask(rng, shapes)
        if rng.random() < 0.3:
            extra["bias"] = random_bias(rng, shapes, dtype)
        if rng.random() < 0.25:
            extra["key_lengths"] = random_key_lengths(rng, shapes)
        scale = random_scale(rng, shapes.D)
        if scale is not None or rng.random() < 0.2:
            extra["scale"] = scale
        if layouts:
            for name in ("mask", "bias"):
                if isinstance(extra.get(name), np.ndarray) and extra[name].ndim:
                    chosen[name] = random_layout_kind(rng)
                    extra[name] = with_layout(extra[name], chosen[name], rng)

    case = Case(
        seed,
        dtype,
        arrays["q"],
        arrays["k"],
        arrays["v"],
        pattern,
        extra,
        return_lse=bool(rng.random() < 0.7),
        threads=pick(rng, (None, 1, 2, 3)),
        device=pick(rng, ("cpu", "cpu", "auto")),
        layouts=chosen,
    )
    if out and rng.random() < 0.3:
        case.out = poisoned_out(rng, expected_out_shape(case), dtype)
    return case


def expected_out_shape(case: Case) -> tuple:
    """The output shape the reference gives for this case."""
    q, k, v = case.q, case.k, case.v
    lead = np.broadcast_shapes(*(a.shape[:-3] for a in (q, k, v) if a.ndim > 2))
    heads = q.shape[-3] if q.ndim > 2 else 1
    shape = (*lead, heads, q.shape[-2], v.shape[-1])
    return shape[1:] if q.ndim == 2 and len(shape) == 3 else shape


def poisoned_out(rng, shape, dtype) -> np.ndarray:
    """A NaN-filled array to pass as ``out=``: C order, Fortran order or a strided view."""
    kind = pick(rng, ("C", "F", "slice"))
    if kind == "C":
        return np.full(shape, np.nan, dtype=dtype)
    if kind == "F":
        return np.full(shape, np.nan, dtype=dtype, order="F")
    steps = [1] * len(shape)
    steps[int(rng.integers(len(shape)))] = 2
    buffer = np.full([s * n + 1 for n, s in zip(shape, steps)], np.nan, dtype=dtype)
    return buffer[tuple(slice(1, 1 + s * n, s) for n, s in zip(shape, steps))]


def case_arrays(case: Case) -> dict:
    """Every array-like argument of the case, by name (for the not-modified check)."""
    found = {"q": case.q, "k": case.k, "v": case.v}
    for name, value in case.options.items():
        if isinstance(value, (np.ndarray, list)):
            found[name] = value
    return found


def snapshot(arrays: dict) -> dict:
    return {name: np.array(a, copy=True) for name, a in arrays.items()}


def assert_unchanged(before: dict, arrays: dict, what: str = "") -> None:
    for name, copy in before.items():
        now = np.asarray(arrays[name])
        same = np.array_equal(copy, now, equal_nan=copy.dtype.kind == "f")
        assert same and copy.dtype == now.dtype and copy.shape == now.shape, (
            f"the input {name} was modified by the call{what}"
        )


def call(case: Case):
    """Run ``sa.attention`` on the case; returns (out, lse or None)."""
    result = sa.attention(
        case.q,
        case.k,
        case.v,
        case.pattern,
        **case.options,
        return_lse=case.return_lse,
        threads=case.threads,
        device=case.device,
        out=case.out,
    )
    if case.return_lse:
        assert isinstance(result, tuple) and len(result) == 2, "return_lse=True gives (out, lse)"
        return result
    assert isinstance(result, np.ndarray), f"attention returned {type(result).__name__}"
    return result, None


def reference_result(case: Case):
    return reference.attention(
        case.q, case.k, case.v, case.pattern, **case.options, return_lse=True
    )


def check_result(case: Case, out, lse, ref_out=None, ref_lse=None) -> tuple[float, float | None]:
    """Assert ``(out, lse)`` matches the float64 reference within the dtype's tolerance;
    returns (relative Frobenius error, worst lse error) and records them."""
    if ref_out is None:
        ref_out, ref_lse = reference_result(case)
    info = case.describe()
    dtype = np.dtype(case.dtype)
    assert isinstance(out, np.ndarray), info
    assert out.dtype == dtype, f"out dtype {out.dtype}, expected {dtype}\n  {info}"
    assert out.shape == ref_out.shape, f"out shape {out.shape}, expected {ref_out.shape}\n  {info}"
    if case.out is not None:
        assert out is case.out, f"out= was given, but another array was returned\n  {info}"
    assert not np.isnan(out).any(), f"NaN in the output\n  {info}"

    empty_rows = np.isneginf(ref_lse)  # no allowed key (or only -inf scores): exactly zero
    assert (out[empty_rows] == 0).all(), f"rows with no allowed key are not zero\n  {info}"
    ref_norm = np.linalg.norm(ref_out)
    diff = np.linalg.norm(out.astype(np.float64) - ref_out)
    if ref_norm == 0:
        rel_err = float(diff)
        assert diff == 0, f"output should be all zeros, |out| = {diff}\n  {info}"
    else:
        rel_err = float(diff / ref_norm)
        assert rel_err <= REL_TOL[dtype], (
            f"relative error {rel_err:.3g} > {REL_TOL[dtype]:g}\n  {info}"
        )

    lse_err = None
    if lse is not None:
        assert isinstance(lse, np.ndarray) and lse.dtype == dtype, f"lse dtype\n  {info}"
        assert lse.shape == ref_lse.shape, (
            f"lse shape {lse.shape}, expected {ref_lse.shape}\n  {info}"
        )
        assert not np.isnan(lse).any(), f"NaN in lse\n  {info}"
        assert np.array_equal(np.isneginf(lse), empty_rows), (
            f"lse is -inf at rows where the reference is finite, or the reverse\n  {info}"
        )
        assert not np.isposinf(lse).any(), f"lse holds +inf\n  {info}"
        finite = ~empty_rows
        lse_err = float(np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0))
        assert lse_err <= LSE_TOL[dtype], f"lse error {lse_err:.3g} > {LSE_TOL[dtype]:g}\n  {info}"
    record(dtype, rel_err, lse_err)
    return rel_err, lse_err


def run_and_check(case: Case) -> tuple[float, float | None]:
    """The whole contract for one case: inputs unchanged, result (and ``out=``) checked."""
    arrays = case_arrays(case)
    before = snapshot(arrays)
    out, lse = call(case)
    assert_unchanged(before, arrays, "\n  " + case.describe())
    return check_result(case, out, lse)


# ---- SIMD levels --------------------------------------------------------------------------------


def cpu_has_avx2_fma() -> bool | None:
    """Whether this CPU has AVX2 and FMA (None where /proc/cpuinfo cannot tell)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma"} <= flags
    return None


def run_python(
    code: str, *, simd: str | None, timeout: float = 120.0
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with SPARSE_ATTN_SIMD set to ``simd`` (None: unset,
    the library's own choice). The micro-kernels are picked once per process, so each level
    needs its own. The tests folder is importable there (``import conftest``)."""
    env = dict(os.environ)
    env.pop("SPARSE_ATTN_SIMD", None)
    if simd is not None:
        env["SPARSE_ATTN_SIMD"] = simd
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(TESTS_DIR),
    )


@pytest.fixture(params=["generic", None], ids=["simd=generic", "simd=default"])
def simd_level(request):
    """Parametrises a test over the SIMD levels: the value of SPARSE_ATTN_SIMD for
    ``run_python`` (None leaves the library's choice)."""
    return request.param


def expected_simd(level: str | None) -> str | None:
    """The level build_info() must report for SPARSE_ATTN_SIMD=level (None: cannot tell)."""
    if level == "generic":
        return "generic"
    if "avx2" not in sa.build_info()["simd_compiled"]:
        return "generic"
    has = cpu_has_avx2_fma()
    return None if has is None else ("avx2" if has else "generic")
