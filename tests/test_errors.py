"""Bad input: every case raises the documented class (ValueError / TypeError) with a message that
names the argument; the caller's arrays are left unchanged and an ``out=`` passed alongside is
left untouched (``out=`` is written only on success)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import sparse_attn as sa
from conftest import assert_unchanged, snapshot

POISON = 7.25  # what an out= passed alongside holds before (and after) the failing call


def floats(*shape, dtype=np.float64, seed=0):
    return np.random.default_rng([seed, *shape]).standard_normal(shape).astype(dtype)


def qkv(Lq=5, Lk=6, D=8, Dv=4, heads=(2, 2), dtype=np.float64):
    """A valid (q, k, v) triple with (Hq, Hkv) heads."""
    return (
        floats(heads[0], Lq, D, dtype=dtype),
        floats(heads[1], Lk, D, dtype=dtype, seed=1),
        floats(heads[1], Lk, Dv, dtype=dtype, seed=2),
    )


def guess_out_shape(q, v):
    """The output shape when q and v make sense; any shape otherwise (the call fails anyway)."""
    q, v = np.asarray(q, dtype=object), np.asarray(v, dtype=object)
    if q.ndim >= 2 and v.ndim >= 1:
        return q.shape[:-1] + v.shape[-1:]
    return (1,)


def check_raises(exc, match, q, k, v, pattern=None, **options):
    """Call sa.attention expecting ``exc`` with ``match``; then check nothing was modified."""
    arrays = {"q": q, "k": k, "v": v}
    arrays.update(
        {
            name: value
            for name, value in options.items()
            if isinstance(value, np.ndarray) and name != "out"
        }
    )
    if "out" not in options:
        dtype = getattr(q, "dtype", np.float64)
        dtype = dtype if dtype in (np.float32, np.float64) else np.float64
        options["out"] = np.full(guess_out_shape(q, v), POISON, dtype=dtype)
    out = options["out"]
    arrays = {n: a for n, a in arrays.items() if isinstance(a, np.ndarray)}
    before = snapshot(arrays)
    out_before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
    with pytest.raises(exc, match=match) as info:
        sa.attention(q, k, v, pattern, **options)
    assert_unchanged(before, arrays, f" that raised {info.value!r}")
    if out_before is not None:
        assert np.array_equal(out, out_before, equal_nan=True), (
            f"out= was written by a call that raised {info.value!r}"
        )
    return info.value


# ---- shapes -------------------------------------------------------------------------------------

SHAPE_CASES = {
    "q 1-D": (r"\bq\b", lambda: (floats(8), floats(6, 8), floats(6, 4))),
    "k 1-D": (r"\bk\b", lambda: (floats(5, 8), floats(8), floats(6, 4))),
    "v 1-D": (r"\bv\b", lambda: (floats(5, 8), floats(6, 8), floats(4))),
    "q 0-D": (r"\bq\b", lambda: (np.float64(1.0), floats(6, 8), floats(6, 4))),
    "head dims differ": (
        r"\bq\b.*\bk\b|head dim",
        lambda: (floats(5, 8), floats(6, 7), floats(6, 4)),
    ),
    "head dims differ 4-D": (
        r"\bq\b.*\bk\b|head dim",
        lambda: (floats(1, 2, 5, 8), floats(1, 2, 6, 9), floats(1, 2, 6, 4)),
    ),
    "k and v heads differ": (
        r"\bk\b.*\bv\b",
        lambda: (floats(6, 5, 8), floats(2, 6, 8), floats(3, 6, 4)),
    ),
    "k and v lengths differ": (r"\bk\b.*\bv\b", lambda: (floats(5, 8), floats(6, 8), floats(7, 4))),
    "Hq not a multiple of Hkv": (
        r"Hq=3.*Hkv=2|heads",
        lambda: (floats(3, 5, 8), floats(2, 6, 8), floats(2, 6, 4)),
    ),
    "Hkv larger than Hq": (
        r"Hq=2.*Hkv=4|heads",
        lambda: (floats(2, 5, 8), floats(4, 6, 8), floats(4, 6, 4)),
    ),
    "batch dims do not broadcast": (
        r"\bq\b.*\bk\b|batch|leading",
        lambda: (floats(2, 1, 5, 8), floats(3, 1, 6, 8), floats(3, 1, 6, 4)),
    ),
    "head dim 0": (r"\bq\b|head dim", lambda: (floats(5, 0), floats(6, 0), floats(6, 4))),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_bad_shapes(name):
    match, make = SHAPE_CASES[name]
    check_raises(ValueError, match, *make())


# ---- dtypes -------------------------------------------------------------------------------------

BAD_DTYPES = {
    "int64": lambda a: a.astype(np.int64),
    "int32": lambda a: a.astype(np.int32),
    "uint8": lambda a: a.astype(np.uint8),
    "bool": lambda a: a > 0,
    "complex128": lambda a: a.astype(np.complex128),
    "complex64": lambda a: a.astype(np.complex64),
    "object": lambda a: a.astype(object),
    "str": lambda a: a.astype(str),
    "ragged list": lambda a: [list(row) for row in a[0]] + [[1.0]],
}


@pytest.mark.parametrize("bad", list(BAD_DTYPES))
@pytest.mark.parametrize("argument", ["q", "k", "v"])
def test_unsupported_dtypes(argument, bad):
    arrays = dict(zip("qkv", qkv()))
    arrays[argument] = BAD_DTYPES[bad](arrays[argument])
    check_raises(TypeError, rf"\b{argument}\b", arrays["q"], arrays["k"], arrays["v"])


@pytest.mark.parametrize("odd_one", ["q", "k", "v"])
def test_mixed_float32_float64(odd_one):
    arrays = dict(zip("qkv", qkv()))
    arrays[odd_one] = arrays[odd_one].astype(np.float32)
    check_raises(TypeError, rf"\b{odd_one}\b", arrays["q"], arrays["k"], arrays["v"])


# ---- mask, bias, key_lengths, scale --------------------------------------------------------------

# q (2, 5, 8), k (2, 6, 8), v (2, 6, 4): the scores are (2, 5, 6), the batch shape is ().
OPTION_CASES = {
    "mask wrong shape": (ValueError, "mask", dict(mask=np.ones((4, 6), bool))),
    "mask wrong last dim": (ValueError, "mask", dict(mask=np.ones((5, 7), bool))),
    "mask extra leading dims": (ValueError, "mask", dict(mask=np.ones((3, 2, 5, 6), bool))),
    "mask int": (TypeError, "mask", dict(mask=np.ones((5, 6), np.int64))),
    "mask uint8": (TypeError, "mask", dict(mask=np.ones((5, 6), np.uint8))),
    "mask float": (TypeError, "mask", dict(mask=np.ones((5, 6)))),
    "bias not broadcastable": (ValueError, "bias", dict(bias=np.zeros((5, 7)))),
    "bias extra leading dims": (ValueError, "bias", dict(bias=np.zeros((3, 2, 5, 6)))),
    "bias complex": (TypeError, "bias", dict(bias=np.zeros((5, 6), complex))),
    "bias bool": (TypeError, "bias", dict(bias=np.zeros((5, 6), bool))),
    "bias object": (TypeError, "bias", dict(bias=np.zeros((5, 6), object))),
    "bias str": (TypeError, "bias", dict(bias=np.full((5, 6), "x"))),
    "key_lengths negative": (ValueError, "key_lengths", dict(key_lengths=-1)),
    "key_lengths above Lk": (ValueError, "key_lengths", dict(key_lengths=7)),
    "key_lengths float": (TypeError, "key_lengths", dict(key_lengths=3.0)),
    "key_lengths float array": (TypeError, "key_lengths", dict(key_lengths=np.array([3.0]))),
    "key_lengths bool": (TypeError, "key_lengths", dict(key_lengths=True)),
    "key_lengths str": (TypeError, "key_lengths", dict(key_lengths="3")),
    "key_lengths wrong shape": (ValueError, "key_lengths", dict(key_lengths=np.array([1, 2]))),
    "scale nan": (ValueError, "scale", dict(scale=float("nan"))),
    "scale inf": (ValueError, "scale", dict(scale=float("inf"))),
    "scale -inf": (ValueError, "scale", dict(scale=-float("inf"))),
    "scale float32 nan": (ValueError, "scale", dict(scale=np.float32("nan"))),
    "scale str": (TypeError, "scale", dict(scale="0.5")),
    "scale complex": (TypeError, "scale", dict(scale=0.5j)),
    "scale bool": (TypeError, "scale", dict(scale=True)),
    "scale list": (TypeError, "scale", dict(scale=[0.5])),
    "threads 0": (ValueError, "threads", dict(threads=0)),
    "threads negative": (ValueError, "threads", dict(threads=-2)),
    "threads float": (TypeError, "threads", dict(threads=2.0)),
    "threads str": (TypeError, "threads", dict(threads="2")),
    "threads bool": (TypeError, "threads", dict(threads=True)),
    "device unknown": (ValueError, "device", dict(device="gpu")),
    "device empty": (ValueError, "device", dict(device="")),
    "device None": (TypeError, "device", dict(device=None)),
    "device int": (TypeError, "device", dict(device=0)),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_bad_options(name):
    exc, argument, options = OPTION_CASES[name]
    options = {
        n: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for n, v in options.items()
    }
    check_raises(exc, rf"\b{argument}\b", *qkv(), **options)


def test_key_lengths_one_value_out_of_range():
    q, k, v = floats(3, 2, 5, 8), floats(3, 2, 6, 8), floats(3, 2, 6, 4)
    check_raises(ValueError, r"\bkey_lengths\b", q, k, v, key_lengths=np.array([6, 0, 7]))


def test_cuda_without_cuda_build():
    if sa.build_info()["cuda_compiled"]:
        pytest.skip("this build has CUDA kernels")
    check_raises((RuntimeError, ValueError), r"\bdevice\b|cuda", *qkv(), device="cuda")


# ---- patterns -----------------------------------------------------------------------------------

CONSTRUCTION_CASES = {
    "SlidingWindow(-1)": (ValueError, "left", lambda: sa.SlidingWindow(-1)),
    "SlidingWindow(2, -1)": (ValueError, "right", lambda: sa.SlidingWindow(2, -1)),
    "SlidingWindow(1.5)": (TypeError, "left", lambda: sa.SlidingWindow(1.5)),
    "Strided(0)": (ValueError, "stride", lambda: sa.Strided(0)),
    "Strided(-3)": (ValueError, "stride", lambda: sa.Strided(-3)),
    "Strided(2, reach=-1)": (ValueError, "reach", lambda: sa.Strided(2, -1)),
    "Causal(0.5)": (TypeError, "offset", lambda: sa.Causal(0.5)),
    "Global([-1])": (ValueError, "tokens", lambda: sa.Global([-1])),
    "Global 2-D tokens": (ValueError, "tokens", lambda: sa.Global([[1, 2]])),
    "Global float tokens": (TypeError, "tokens", lambda: sa.Global([1.5])),
    "Global neither rows nor cols": (
        ValueError,
        "rows|cols",
        lambda: sa.Global([1], rows=False, cols=False),
    ),
    "BlockSparse block 0": (ValueError, "block", lambda: sa.BlockSparse(np.ones((2, 2), bool), 0)),
    "BlockSparse 1-D layout": (ValueError, "layout", lambda: sa.BlockSparse(np.ones(4, bool), 2)),
    "BlockSparse layout of 2s": (
        ValueError,
        "layout",
        lambda: sa.BlockSparse(np.full((2, 2), 2), 2),
    ),
    "BlockSparse float layout": (TypeError, "layout", lambda: sa.BlockSparse(np.ones((2, 2)), 2)),
    "Mask 1-D": (ValueError, "array", lambda: sa.Mask(np.ones(4, bool))),
    "Union with a non-pattern": (TypeError, r"\bb\b|Pattern", lambda: sa.Union(sa.Dense(), 3)),
}


@pytest.mark.parametrize("name", list(CONSTRUCTION_CASES))
def test_bad_pattern_parameters(name):
    exc, argument, make = CONSTRUCTION_CASES[name]
    with pytest.raises(exc, match=rf"\b(?:{argument})\b"):
        make()


def test_pattern_constructors_leave_arrays_unchanged():
    layout = np.array([[1, 0], [0, 1]], dtype=np.int64)
    tokens = np.array([3, 1, 3])
    for make, array in (
        (lambda: sa.BlockSparse(layout, 4), layout),
        (lambda: sa.Global(tokens), tokens),
    ):
        copy = array.copy()
        make()
        np.testing.assert_array_equal(array, copy)
    with pytest.raises(ValueError):
        sa.BlockSparse(np.full((2, 2), 3), 4)


# q (2, 5, 8), k (2, 6, 8), v (2, 6, 4): Hq = 2, Lq = 5, Lk = 6.
CALL_PATTERN_CASES = {
    "Global token beyond both lengths": (ValueError, "tokens", lambda: sa.Global([6])),
    "Global token far away": (ValueError, "tokens", lambda: sa.Global([2, 100])),
    "Global token beyond, inside a union": (
        ValueError,
        "tokens",
        lambda: sa.Causal() | sa.Global([9], cols=False),
    ),
    "BlockSparse layout too small": (
        ValueError,
        "layout",
        lambda: sa.BlockSparse(np.ones((1, 2), bool), 4),
    ),
    "BlockSparse layout too few key blocks": (
        ValueError,
        "layout",
        lambda: sa.BlockSparse(np.ones((2, 1), bool), 4),
    ),
    "per-head BlockSparse with 3 heads": (
        ValueError,
        "pattern|heads",
        lambda: sa.BlockSparse(np.ones((3, 2, 2), bool), 4),
    ),
    "Mask of the wrong shape": (ValueError, "shape|mask", lambda: sa.Mask(np.ones((5, 5), bool))),
    "pattern list too long": (ValueError, "pattern", lambda: [sa.Causal()] * 3),
    "pattern list too short": (ValueError, "pattern", lambda: [sa.Causal()]),
    "pattern list with a per-head pattern": (
        ValueError,
        "pattern",
        lambda: [sa.Dense(), sa.BlockSparse(np.ones((2, 2, 2), bool), 4)],
    ),
    "pattern str": (TypeError, "pattern", lambda: "causal"),
    "pattern list with a str": (TypeError, "pattern", lambda: [sa.Causal(), "dense"]),
    "pattern nested too deeply": (
        ValueError,
        "pattern",
        lambda: functools.reduce(lambda acc, p: p | acc, [sa.Causal(i) for i in range(40)]),
    ),
}


@pytest.mark.parametrize("name", list(CALL_PATTERN_CASES))
def test_bad_patterns_for_the_sizes(name):
    exc, argument, make = CALL_PATTERN_CASES[name]
    check_raises(exc, rf"\b(?:{argument})\b", *qkv(), make())


# ---- out= ---------------------------------------------------------------------------------------


def overlapping(kind):
    """(q, k, v, options) where out= is bad in the way ``kind`` says."""
    q, k, v = qkv(D=4, Dv=4)  # out has the shape of q: (2, 5, 4)
    if kind == "wrong shape":
        return q, k, v, dict(out=np.full((2, 5, 5), POISON))
    if kind == "wrong rank":
        return q, k, v, dict(out=np.full((1, 2, 5, 4), POISON))
    if kind == "read-only":
        out = np.full((2, 5, 4), POISON)
        out.flags.writeable = False
        return q, k, v, dict(out=out)
    if kind == "is q":
        return q, k, v, dict(out=q)
    if kind == "view of v":
        big = floats(2, 6, 4, seed=9)
        return q, k, big, dict(out=big[:, :5])
    if kind == "view of k":
        big = floats(2, 6, 4, seed=9)
        return q, big, v, dict(out=big[:, 1:])
    if kind == "view of bias":
        bias = np.zeros((2, 5, 6))
        return q, k, v, dict(bias=bias, out=bias[..., :4])
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind",
    ["wrong shape", "wrong rank", "read-only", "is q", "view of v", "view of k", "view of bias"],
)
def test_bad_out(kind):
    q, k, v, options = overlapping(kind)
    check_raises(ValueError, r"\bout\b", q, k, v, **options)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.complex128])
def test_out_of_the_wrong_dtype(dtype):
    q, k, v = qkv()
    out = np.full((2, 5, 4), POISON).astype(dtype)
    check_raises((TypeError, ValueError), r"\bout\b", q, k, v, out=out)


def test_out_not_an_array():
    check_raises(TypeError, r"\bout\b", *qkv(), out=[[0.0] * 4] * 5)


def test_out_for_a_two_dimensional_call_has_no_head_axis():
    q, k, v = floats(5, 8), floats(6, 8), floats(6, 4)
    check_raises(ValueError, r"\bout\b", q, k, v, out=np.full((1, 5, 4), POISON))
    out = np.full((5, 4), POISON)
    assert sa.attention(q, k, v, out=out) is out


def test_errors_name_the_shapes():
    """Shape errors print the shapes involved, so the caller can see what went wrong."""
    error = check_raises(ValueError, "mask", *qkv(), mask=np.ones((4, 6), bool))
    assert "(4, 6)" in str(error)
    error = check_raises(ValueError, r"\bk\b", floats(5, 8), floats(6, 7), floats(6, 4))
    assert "(6, 7)" in str(error)
