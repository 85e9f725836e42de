"""sa.attention against the float64 NumPy oracle (sparse_attn.reference) on random cases.

Tolerances: relative Frobenius error <= 2e-5 (float32) / 1e-10 (float64); lse within 1e-4 /
1e-9 on finite entries and -inf exactly where the reference has -inf; never NaN; rows with no
allowed key exactly 0. Each case draws fresh data from its own seed (conftest.random_case).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import sparse_attn as sa
from conftest import (
    BLOCKS,
    LAYOUT_KINDS,
    PRIMITIVE_KINDS,
    Case,
    Shapes,
    call,
    check_result,
    expected_out_shape,
    random_bias,
    random_case,
    random_floats,
    random_mask,
    random_pattern,
    random_primitive,
    random_shapes,
    reference_result,
    run_and_check,
    with_layout,
)
from sparse_attn import reference

RANDOM_CASES = 1200
DTYPES = (np.float32, np.float64)


def seeded(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)), seed])


# ---- the random sweep ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(RANDOM_CASES))
def test_random_case(seed):
    """Everything at once: patterns and their unions/intersections, mask/bias/key_lengths/scale,
    GQA, broadcast leading dims, 2-D/3-D operands, memory layouts, out=, threads, return_lse."""
    rng = seeded("random_case", seed)
    run_and_check(random_case(rng, dtype=DTYPES[seed % 2], seed=seed))


# ---- each pattern kind, each combination ---------------------------------------------------------

SIZES = ((1, 1), (7, 63), (65, 129), (129, 65), (257, 127), (64, 64))


@pytest.mark.parametrize("Lq, Lk", SIZES, ids=[f"{a}x{b}" for a, b in SIZES])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", PRIMITIVE_KINDS)
def test_pattern_kind(kind, dtype, Lq, Lk):
    rng = seeded(f"kind-{kind}-{np.dtype(dtype).name}", Lq * 1000 + Lk)
    for _ in range(3):
        shapes = Shapes(
            2, 1, Lq, Lk, int(rng.integers(1, 70)), int(rng.integers(1, 70)), (2,), (1,), ()
        )
        case = random_case(rng, dtype=dtype, shapes=shapes, options=False, layouts=False)
        case.pattern = random_primitive(rng, Lq, Lk, kind)
        run_and_check(case)


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("combine", ["union", "intersection", "per-head list"])
def test_combinations(combine, seed):
    """Union / intersection trees of depth 3, and one pattern per query head."""
    rng = seeded(f"combine-{combine}", seed)
    dtype = DTYPES[seed % 2]
    shapes = random_shapes(rng, two_d=0.0)
    case = random_case(rng, dtype=dtype, shapes=shapes, seed=seed)
    Lq, Lk = shapes.Lq, shapes.Lk
    if combine == "per-head list":
        case.pattern = [random_pattern(rng, Lq, Lk) for _ in range(shapes.Hq)]
    else:
        left, right = random_pattern(rng, Lq, Lk, 2), random_pattern(rng, Lq, Lk, 2)
        case.pattern = left | right if combine == "union" else left & right
    run_and_check(case)


def test_per_head_block_sparse_and_list_agree():
    """A per-head BlockSparse equals the list of its heads, and both match the reference."""
    rng = seeded("per-head", 0)
    layout = rng.random((4, 3, 5)) < 0.5
    q = rng.standard_normal((2, 4, 150, 24))
    k, v = rng.standard_normal((2, 2, 300, 24)), rng.standard_normal((2, 2, 300, 16))
    per_head = sa.BlockSparse(layout, 64)
    listed = [sa.BlockSparse(head, 64) for head in layout]
    out = sa.attention(q, k, v, per_head)
    np.testing.assert_array_equal(out, sa.attention(q, k, v, listed))
    np.testing.assert_allclose(out, reference.attention(q, k, v, listed), rtol=1e-10, atol=1e-12)


# ---- memory layouts of every operand -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUT_KINDS)
@pytest.mark.parametrize("operand", ["q", "k", "v", "mask", "bias"])
def test_memory_layouts(operand, layout, dtype):
    """Transposed, Fortran, sliced, negative-stride, permuted and zero-stride views read right."""
    rng = seeded(f"layout-{operand}-{layout}", int(dtype is np.float32))
    for Lq, Lk, D, Dv in ((65, 130, 17, 9), (7, 3, 64, 64), (1, 129, 1, 2)):
        shapes = Shapes(4, 2, Lq, Lk, D, Dv, (2, 3), (1, 3), (3,))
        case = random_case(rng, dtype=dtype, shapes=shapes, options=False, layouts=False)
        case.pattern = random_pattern(rng, Lq, Lk, 1)
        case.options = {"mask": random_mask(rng, shapes), "bias": random_bias(rng, shapes, dtype)}
        target = case.options if operand in ("mask", "bias") else None
        value = target[operand] if target is not None else getattr(case, operand)
        if target is not None:  # the full (..., Hq, Lq, Lk) shape, so every axis is laid out
            value = np.broadcast_to(value, shapes.scores_shape()).copy()
        value = with_layout(value, layout, rng)
        case.layouts[operand] = layout
        if target is not None:
            target[operand] = value
        else:
            setattr(case, operand, value)
        run_and_check(case)


def test_python_lists_and_read_only_inputs():
    rng = seeded("lists", 0)
    q, k, v = (rng.standard_normal(s) for s in ((5, 3), (7, 3), (7, 2)))
    for a in (q, k, v):
        a.flags.writeable = False
    out = sa.attention(q.tolist(), k.tolist(), v, sa.Causal(2))
    np.testing.assert_allclose(out, reference.attention(q, k, v, sa.Causal(2)), rtol=1e-12)
    out = sa.attention(q, k, v, mask=(rng.random((5, 7)) < 0.5).tolist())
    assert out.dtype == np.float64 and out.shape == (5, 2)


# ---- shapes: GQA, broadcasting, 2-D / 3-D --------------------------------------------------------

GQA = [(1, 1), (2, 1), (4, 2), (6, 3), (8, 8), (8, 1), (6, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("Hq, Hkv", GQA, ids=[f"{a}-{b}" for a, b in GQA])
def test_grouped_query_attention(Hq, Hkv, dtype):
    rng = seeded(f"gqa-{Hq}-{Hkv}", int(dtype is np.float32))
    shapes = Shapes(Hq, Hkv, 71, 93, 40, 24, (2,), (2,), (1,))
    case = random_case(rng, dtype=dtype, shapes=shapes)
    case.pattern = [random_pattern(rng, 71, 93) for _ in range(Hq)]
    run_and_check(case)


LEADS = [
    ((3,), (1,), (1,)),  # k and v with batch dim 1
    ((3,), (), ()),  # k and v without batch dims
    ((1,), (4,), (4,)),  # q broadcast over the keys' batch
    ((2, 1), (1, 3), (3,)),  # an outer product of batch dims
    ((2, 3), (2, 3), (1, 1)),
    ((1, 1, 2), (2, 1, 1), (1,)),
    ((), (2,), (2,)),  # q 3-D, k and v 4-D
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("leads", LEADS, ids=[str(i) for i in range(len(LEADS))])
def test_broadcast_leading_dims(leads, dtype):
    rng = seeded(f"leads-{leads}", int(dtype is np.float32))
    shapes = Shapes(2, 1, 37, 66, 12, 20, *leads)
    for _ in range(3):
        run_and_check(random_case(rng, dtype=dtype, shapes=shapes))


RANKS = [(2, 2, 2), (2, 3, 3), (3, 2, 2), (3, 3, 2), (2, 2, 3), (3, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("ranks", RANKS, ids=["".join(map(str, r)) for r in RANKS])
def test_two_and_three_dimensional_inputs(ranks, dtype):
    """(L, D) operands are one head; a 2-D q gives a 2-D output."""
    rng = seeded(f"ranks-{ranks}", int(dtype is np.float32))
    Hq = 1 if ranks[0] == 2 else 3
    shapes = Shapes(Hq, 1, 45, 70, 9, 30, (), (), (), *ranks)
    for _ in range(3):
        case = random_case(rng, dtype=dtype, shapes=shapes)
        out, lse = call(case)
        assert out.ndim == (2 if ranks[0] == 2 else 3)
        check_result(case, out, lse)


# ---- out=, return_lse ---------------------------------------------------------------------------


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("order", ["C", "F", "slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_out_parameter(dtype, order, return_lse):
    """out= poisoned with NaN is filled and is the very object returned."""
    rng = seeded(f"out-{order}-{return_lse}", int(dtype is np.float32))
    for shapes in (
        Shapes(3, 3, 80, 33, 16, 5, (2,), (2,), (2,)),
        Shapes(1, 1, 9, 130, 4, 7, (), (), (), 2, 2, 2),
    ):
        case = random_case(rng, dtype=dtype, shapes=shapes, out=False)
        shape = expected_out_shape(case)
        if order == "slice":
            out = np.full((*shape[:-1], 2 * shape[-1]), np.nan, dtype=dtype)[..., ::2]
        else:
            out = np.full(shape, np.nan, dtype=dtype, order=order)
        case.out, case.return_lse = out, return_lse
        result = sa.attention(
            case.q, case.k, case.v, case.pattern, **case.options, return_lse=return_lse, out=out
        )
        got, lse = result if return_lse else (result, None)
        assert got is out
        check_result(case, got, lse)


def test_return_lse_matches_log_sum_exp_of_scores():
    """lse is the natural log of the softmax denominator over the allowed (scaled) scores."""
    rng = seeded("lse", 0)
    q, k, v = (
        rng.standard_normal((70, 8)),
        rng.standard_normal((90, 8)),
        rng.standard_normal((90, 3)),
    )
    pattern = sa.SlidingWindow(5, 20)
    out, lse = sa.attention(q, k, v, pattern, scale=0.7, return_lse=True)
    scores = np.where(pattern.to_mask(70, 90), 0.7 * q @ k.T, -np.inf)
    np.testing.assert_allclose(lse, np.log(np.exp(scores).sum(-1)), rtol=0, atol=1e-12)
    assert isinstance(out, np.ndarray) and out.shape == (70, 3)


# ---- rows with no allowed key ------------------------------------------------------------------


def empty_row_cases(Lq, Lk, rng):
    rows = np.zeros((Lq, Lk), dtype=bool)
    rows[::3] = True
    bias = np.where(rng.random((Lq, Lk)) < 0.5, 0.0, -np.inf)
    bias[1::4] = -np.inf
    return {
        "causal below the diagonal": dict(pattern=sa.Causal(-5)),
        "mask rows all False": dict(mask=rows),
        "key_lengths 0": dict(key_lengths=0),
        "bias rows all -inf": dict(bias=bias),
        "empty intersection": dict(pattern=sa.SlidingWindow(2) & sa.Strided(7, 1) & sa.Causal(-1)),
        "global rows only": dict(pattern=sa.Global([Lk + 2], rows=True, cols=False)),
        "block layout all False": dict(pattern=sa.BlockSparse(np.zeros((9, 9), bool), 32)),
        "mask all False": dict(mask=np.zeros((Lq, Lk), bool)),
        "bias all -inf": dict(bias=np.full((Lq, Lk), -np.inf)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(empty_row_cases(9, 9, np.random.default_rng(0))))
def test_rows_with_no_allowed_key_are_zero(name, dtype):
    rng = seeded(f"empty-{name}", int(dtype is np.float32))
    Lq, Lk = 150, 140
    options = dict(empty_row_cases(Lq, Lk, rng)[name])
    pattern = options.pop("pattern", None)
    q, k, v = (random_floats(rng, s, dtype) for s in ((2, Lq, 16), (1, Lk, 16), (1, Lk, 8)))
    case = Case(name, np.dtype(dtype), q, k, v, pattern, options)
    out, lse = call(case)
    empty = np.isneginf(reference_result(case)[1])
    assert empty.any()
    assert (out[empty] == 0).all() and np.isneginf(lse[empty]).all()
    check_result(case, out, lse)


# ---- threads, edge sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
def test_threads_give_identical_results(seed):
    rng = seeded("threads", seed)
    shapes = random_shapes(rng, two_d=0.0)
    shapes.Lq = max(shapes.Lq, 129)  # several query tiles, so both threads get work
    case = random_case(rng, dtype=DTYPES[seed % 2], shapes=shapes, out=False)
    case.return_lse = True
    results = []
    for threads in (1, 2, 1, 3):
        case.threads = threads
        results.append(call(case))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])
    check_result(case, *results[0])


EMPTY = [
    ("Lq=0", (2, 0, 8), (2, 5, 8), (2, 5, 3)),
    ("Lq=0 2-D", (0, 8), (5, 8), (5, 3)),
    ("batch=0", (0, 2, 4, 8), (0, 2, 5, 8), (0, 2, 5, 3)),
    ("batch=0 broadcast", (0, 2, 4, 8), (1, 1, 5, 8), (1, 1, 5, 3)),
    ("Dv=0", (2, 4, 8), (2, 5, 8), (2, 5, 0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name, sq, sk, sv", EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_sizes(name, sq, sk, sv, dtype):
    rng = seeded(f"empty-size-{name}", 0)
    q, k, v = (random_floats(rng, s, dtype) for s in (sq, sk, sv))
    ref_out, ref_lse = reference.attention(q, k, v, sa.Causal(), return_lse=True)
    out, lse = sa.attention(q, k, v, sa.Causal(), return_lse=True)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert out.dtype == dtype and lse.dtype == dtype
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
    given = np.full(ref_out.shape, np.nan, dtype=dtype)
    assert sa.attention(q, k, v, sa.Causal(), out=given) is given


# ---- scale ---------------------------------------------------------------------------------------


def test_default_scale_is_one_over_sqrt_d():
    rng = seeded("scale", 0)
    q, k, v = (
        rng.standard_normal((2, 33, 20)),
        rng.standard_normal((2, 44, 20)),
        rng.standard_normal((2, 44, 5)),
    )
    np.testing.assert_array_equal(
        sa.attention(q, k, v), sa.attention(q, k, v, scale=1 / math.sqrt(20))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_scale_zero_averages_the_allowed_values(dtype):
    rng = seeded("scale-zero", int(dtype is np.float32))
    q, k, v = (random_floats(rng, s, dtype) for s in ((130, 6), (100, 6), (100, 3)))
    out = sa.attention(q, k, v, sa.Causal(), scale=0.0).astype(np.float64)
    counts = np.arange(1, 131).clip(max=100)[:, None]
    expected = np.cumsum(v.astype(np.float64), axis=0)[counts[:, 0] - 1] / counts
    tol = 1e-5 if dtype is np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("block", BLOCKS)
def test_block_sparse_block_sizes(block):
    """BlockSparse with blocks that do not divide the kernel tile, and spare layout blocks."""
    rng = seeded("blocks", block)
    for dtype in DTYPES:
        shapes = Shapes(
            2, 2, int(rng.integers(100, 260)), int(rng.integers(1, 260)), 16, 16, (), (), ()
        )
        case = random_case(rng, dtype=dtype, shapes=shapes, options=False)
        nq, nk = -(-shapes.Lq // block) + 1, -(-shapes.Lk // block) + 2
        case.pattern = sa.BlockSparse(rng.random((nq, nk)) < 0.4, block)
        run_and_check(case)


def test_concurrent_calls_from_python_threads():
    """The GIL is released while kernels run: calls from several threads give the same results."""
    rng = seeded("concurrent", 0)
    cases = [random_case(rng, seed=i, out=False) for i in range(24)]
    expected = [call(case) for case in cases]
    mismatches = []

    def worker(first):
        for i in range(first, len(cases), 3):
            out, lse = call(cases[i])
            if not (
                np.array_equal(out, expected[i][0])
                and (lse is None or np.array_equal(lse, expected[i][1]))
            ):
                mismatches.append(i)

    threads = [threading.Thread(target=worker, args=(t % 3,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches, f"cases {sorted(set(mismatches))} differ when run concurrently"


# ---- edge shapes: no keys at all, a 2-D q with batched k and v ---------------------------------


def test_two_dimensional_query_with_batched_keys():
    """A 2-D q is one head; k and v with leading dims give (..., 1, Lq, Dv), as the reference
    (and PyTorch's SDPA broadcasting) do: no batch entry may be dropped."""
    rng = seeded("2d-q-batched-kv", 0)
    q = rng.standard_normal((5, 8))
    k, v = rng.standard_normal((3, 1, 6, 8)), rng.standard_normal((3, 1, 6, 4))
    expected = reference.attention(q, k, v)
    assert expected.shape == (3, 1, 5, 4)
    out = sa.attention(q, k, v)
    assert out.shape == expected.shape, f"got {out.shape}, the reference gives {expected.shape}"
    np.testing.assert_allclose(out, expected, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shapes", [((3, 4), (0, 4), (0, 2)), ((2, 2, 5, 4), (1, 0, 4), (1, 0, 6))], ids=["2-D", "4-D"]
)
def test_no_keys_gives_zeros_and_lse_neg_inf(shapes, dtype):
    """Lk = 0: every row is empty, so the output is zeros and lse is -inf."""
    sq, sk, sv = shapes
    q, k, v = (np.ones(s, dtype=dtype) for s in (sq, sk, sv))
    out, lse = sa.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True)
    assert out.shape == ref_out.shape and (out == 0).all()
    assert lse.shape == ref_lse.shape and np.isneginf(lse).all()


def test_unpickled_arrays_are_accepted():
    """Arrays that crossed a process boundary carry their own dtype object (Dask workers)."""
    import pickle

    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 33, 8)).astype(np.float32) for _ in range(3))
    expected = sa.attention(q, k, v, sa.SlidingWindow(4))
    q2, k2, v2 = pickle.loads(pickle.dumps((q, k, v)))
    np.testing.assert_array_equal(sa.attention(q2, k2, v2, sa.SlidingWindow(4)), expected)
