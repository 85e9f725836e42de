"""Sharded attention: the keys (and queries) split at arbitrary positions, each shard computed with
key_offset / query_offset, total_lengths and return_lse, the key shards combined by
sa.merge_attention, equal the single call (relative error <= 2e-5 float32 / 1e-10 float64, lse
within 1e-4 / 1e-9) and the float64 reference; merge_attention's input checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import sparse_attn as sa
from conftest import (
    LSE_TOL,
    REL_TOL,
    Case,
    Shapes,
    assert_unchanged,
    check_result,
    pick,
    random_case,
    random_floats,
    random_head_patterns,
    random_shapes,
    snapshot,
)
from sparse_attn import reference
from test_variants import (
    DTYPES,
    SCORES,
    VARIANT_BUDGET,
    additive_params,
    note,
    query_heads,
    random_variants,
    seeded,
)

TILE = 64  # the kernels' key tile: shard boundaries inside a tile are the interesting ones


def key_bounds(rng, Lk: int, shards: int) -> list:
    """shards + 1 boundaries 0 = b0 <= ... <= b_n = Lk: random, near tile edges, sometimes
    repeated (an empty shard)."""
    inner = []
    for _ in range(shards - 1):
        roll = rng.random()
        if roll < 0.35 and Lk > 1:
            edge = TILE * int(rng.integers(0, Lk // TILE + 1))
            inner.append(int(np.clip(edge + int(pick(rng, (-1, 0, 1, 3, -5))), 0, Lk)))
        elif roll < 0.4:
            inner.append(int(pick(rng, (0, Lk))))
        else:
            inner.append(int(rng.integers(0, Lk + 1)))
    return [0, *sorted(inner), Lk]


def keys_part(array, scores_shape: tuple, q: slice, k: slice):
    """The part of a mask / bias (broadcastable to scores_shape) for query rows q, keys k."""
    if array is None:
        return None
    full = np.broadcast_to(np.asarray(array), scores_shape)
    return full[..., q, k]


def sharded_attention(
    q,
    k,
    v,
    pattern,
    scores_shape: tuple,
    key_edges: list,
    query_edges: list | None = None,
    *,
    mask=None,
    bias=None,
    **options,
):
    """Attention computed on a grid of (query block, key shard) calls at their offsets: key
    shards merged with merge_attention, query blocks concatenated."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    query_edges = query_edges or [0, Lq]
    outs, lses = [], []
    for q0, q1 in zip(query_edges[:-1], query_edges[1:]):
        shard_outs, shard_lses = [], []
        for k0, k1 in zip(key_edges[:-1], key_edges[1:]):
            rows, cols = slice(q0, q1), slice(k0, k1)
            out, lse = sa.attention(
                q[..., rows, :],
                k[..., cols, :],
                v[..., cols, :],
                pattern,
                mask=keys_part(mask, scores_shape, rows, cols),
                bias=keys_part(bias, scores_shape, rows, cols),
                query_offset=q0,
                key_offset=k0,
                total_lengths=(Lq, Lk),
                return_lse=True,
                **options,
            )
            shard_outs.append(out)
            shard_lses.append(lse)
        out, lse = sa.merge_attention(shard_outs, shard_lses)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


def compare_with_single(case: Case, merged, single, what: str) -> tuple[float, float]:
    """The merged result against the single call: relative Frobenius error of out, absolute of
    finite lse, -inf at the same rows, zeros on empty rows."""
    dtype = np.dtype(case.dtype)
    (out, lse), (out1, lse1) = merged, single
    info = f"{what}\n  {case.describe()}"
    assert out.dtype == dtype and lse.dtype == dtype, info
    assert out.shape == out1.shape and lse.shape == lse1.shape, info
    assert not np.isnan(out).any() and not np.isnan(lse).any(), info
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse1), err_msg=info)
    assert np.all(out[np.isneginf(lse)] == 0), f"empty rows are not zero\n  {info}"
    norm = np.linalg.norm(out1.astype(np.float64))
    diff = np.linalg.norm(out.astype(np.float64) - out1)
    rel_err = float(diff / norm) if norm else float(diff)
    assert rel_err <= REL_TOL[dtype], f"relative error {rel_err:.3g} vs the single call\n  {info}"
    finite = ~np.isneginf(lse1)
    lse_err = float(np.max(np.abs(lse[finite] - lse1[finite].astype(np.float64)), initial=0.0))
    assert lse_err <= LSE_TOL[dtype], f"lse error {lse_err:.3g} vs the single call\n  {info}"
    return rel_err, lse_err


def shard_case(rng, seed, score: str, dtype) -> tuple[Case, Shapes]:
    shapes = random_shapes(rng, budget=VARIANT_BUDGET, two_d=0.1)
    shapes.Lk = max(shapes.Lk, int(pick(rng, (2, 17, 65, 129, 200))))
    case = random_case(rng, dtype=dtype, seed=seed, shapes=shapes, out=False)
    case.options.update(random_variants(rng, shapes, score))
    if score == "additive":
        case.options.pop("scale", None)  # see test_variants.test_additive_score_applies_scale
    case.pattern = random_head_patterns(rng, shapes.Lq, shapes.Lk, query_heads(shapes))
    case.return_lse = True
    return case, shapes


@pytest.mark.parametrize("seed", range(90))
def test_key_shards_merge_to_the_single_call(seed):
    """2-4 key shards at arbitrary boundaries (cutting 64-wide tiles, sometimes empty) with
    every score, ALiBi, softcap, mask / bias / key_lengths, GQA, broadcasting and 2-D operands;
    a third of the cases also split the queries and a quarter use dropout."""
    score, dtype = SCORES[seed % 3], DTYPES[(seed // 3) % 2]
    rng = seeded("shards", seed)
    case, shapes = shard_case(rng, seed, score, dtype)
    options = dict(case.options)
    if rng.random() < 0.25:
        options.update(dropout_p=float(pick(rng, (0.2, 0.5))), seed=int(rng.integers(0, 2**40)))
    Lq, Lk = shapes.Lq, shapes.Lk
    key_edges = key_bounds(rng, Lk, int(rng.integers(2, 5)))
    query_edges = None
    if rng.random() < 0.33 and Lq > 1:
        query_edges = [0, *sorted(int(x) for x in rng.integers(1, Lq, int(rng.integers(1, 3)))), Lq]
    before = snapshot({"q": case.q, "k": case.k, "v": case.v})
    merged = sharded_attention(
        case.q,
        case.k,
        case.v,
        case.pattern,
        shapes.scores_shape(),
        key_edges,
        query_edges,
        **options,
    )
    assert_unchanged(before, {"q": case.q, "k": case.k, "v": case.v})
    single = sa.attention(case.q, case.k, case.v, case.pattern, return_lse=True, **options)
    what = f"key shards {key_edges}, query blocks {query_edges}"
    rel_err, _ = compare_with_single(case, merged, single, what)
    note("sharded", dtype, rel_err)
    if "dropout_p" not in options:  # the single call is checked against the reference elsewhere
        check_result(case, *merged)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rows_empty_in_every_shard(dtype):
    """Rows with no allowed key in any shard stay zero with lse -inf; rows empty in some shards
    only are exact; an empty shard (no keys) merges as nothing."""
    rng = seeded("shards-empty", int(dtype is np.float32))
    Hq, Lq, Lk = 2, 100, 150
    q, k = random_floats(rng, (Hq, Lq, 16), dtype), random_floats(rng, (1, Lk, 16), dtype)
    v = random_floats(rng, (1, Lk, 5), dtype)
    pattern = sa.Causal(-7) | sa.Global([90], cols=False)  # rows 0-6 have no key
    mask = np.ones((Lq, Lk), dtype=bool)
    mask[30] = False  # and row 30
    bias = np.zeros((Lq, Lk))
    bias[40] = -np.inf  # and row 40 (allowed keys, all -inf)
    shapes = (Hq, Lq, Lk)
    for edges in ([0, 64, 64, 150], [0, 5, 63, 129, 150], [0, 0, 150, 150]):
        out, lse = sharded_attention(
            q, k, v, pattern, shapes, edges, mask=mask, bias=bias, alibi_slopes=[0.1, 0.2]
        )
        empty = np.zeros(Lq, dtype=bool)
        empty[[*range(7), 30, 40]] = True
        assert np.all(np.isneginf(lse[:, empty])) and np.all(out[:, empty] == 0)
        assert np.all(np.isfinite(lse[:, ~empty]))
        ref = reference.attention(
            q, k, v, pattern, mask=mask, bias=bias, alibi_slopes=[0.1, 0.2], return_lse=True
        )
        case = Case(
            f"edges {edges}",
            np.dtype(dtype),
            q,
            k,
            v,
            pattern,
            {"mask": mask, "bias": bias, "alibi_slopes": [0.1, 0.2]},
        )
        check_result(case, out, lse, *ref)


def test_a_shard_without_keys():
    """A shard of zero keys gives zeros and lse -inf, and merging it changes nothing."""
    rng = seeded("shards-no-keys", 0)
    q, k, v = (
        rng.standard_normal((2, 3, 8)),
        rng.standard_normal((2, 10, 8)),
        rng.standard_normal((2, 10, 4)),
    )
    out0, lse0 = sa.attention(
        q, k[:, :0], v[:, :0], key_offset=10, total_lengths=(3, 10), return_lse=True
    )
    assert out0.shape == (2, 3, 4) and np.all(out0 == 0) and np.all(np.isneginf(lse0))
    out1, lse1 = sa.attention(q, k, v, return_lse=True)
    out, lse = sa.merge_attention([out1, out0], [lse1, lse0])
    np.testing.assert_array_equal(out, out1)
    np.testing.assert_array_equal(lse, lse1)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_merge_is_the_log_sum_exp_combination(dtype):
    """merge_attention on hand-made shards: order does not matter, one shard is the identity,
    dtype follows the inputs, inputs are not modified; -inf lse entries carry no weight."""
    rng = seeded("merge", int(dtype is np.float32))
    outs = [random_floats(rng, (2, 3, 5, 4), dtype) for _ in range(3)]
    lses = [random_floats(rng, (2, 3, 5), dtype, 3.0) for _ in range(3)]
    lses[1][0, 0, :] = -np.inf
    outs[1][0, 0, :] = 0
    before = snapshot(
        {f"o{n}": o for n, o in enumerate(outs)} | {f"l{n}": s for n, s in enumerate(lses)}
    )
    out, lse = sa.merge_attention(outs, lses)
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.dtype(dtype)
    assert out.shape == (2, 3, 5, 4) and lse.shape == (2, 3, 5)
    assert_unchanged(
        before, {f"o{n}": o for n, o in enumerate(outs)} | {f"l{n}": s for n, s in enumerate(lses)}
    )
    stacked = np.stack(lses).astype(np.float64)
    expected_lse = np.log(np.exp(stacked).sum(0))
    weights = np.exp(stacked - expected_lse)
    expected = sum(o * w[..., None] for o, w in zip(np.asarray(outs, dtype=np.float64), weights))
    tol = 1e-5 if dtype is np.float32 else 1e-12
    np.testing.assert_allclose(lse, expected_lse, rtol=0, atol=tol)
    np.testing.assert_allclose(out, expected, rtol=0, atol=tol)
    out_r, lse_r = sa.merge_attention(outs[::-1], tuple(lses[::-1]))
    np.testing.assert_allclose(out_r, out, rtol=0, atol=tol)
    np.testing.assert_allclose(lse_r, lse, rtol=0, atol=tol)
    one_out, one_lse = sa.merge_attention([outs[0]], [lses[0]])
    np.testing.assert_allclose(one_out, outs[0], rtol=0, atol=tol)
    np.testing.assert_array_equal(one_lse, lses[0])
    all_empty = sa.merge_attention([np.zeros((3, 2), dtype)] * 2, [np.full(3, -np.inf, dtype)] * 2)
    assert np.all(all_empty[0] == 0) and np.all(np.isneginf(all_empty[1]))


O32, L32 = np.zeros((2, 5, 4), np.float32), np.zeros((2, 5), np.float32)
O64, L64 = np.zeros((2, 5, 4)), np.zeros((2, 5))
MERGE_ERRORS = [
    (
        "arrays, not lists",
        lambda: sa.merge_attention(np.stack([O64, O64]), np.stack([L64, L64])),
        TypeError,
        "list",
    ),
    ("outs a list, lses an array", lambda: sa.merge_attention([O64], L64), TypeError, "list"),
    ("no shards", lambda: sa.merge_attention([], []), ValueError, "one array per shard"),
    ("counts differ", lambda: sa.merge_attention([O64, O64], [L64]), ValueError, "2 and 1"),
    (
        "out shapes differ",
        lambda: sa.merge_attention([O64, O64[:, :4]], [L64, L64]),
        ValueError,
        "shard 1",
    ),
    (
        "lse shapes differ",
        lambda: sa.merge_attention([O64, O64], [L64, L64[:1]]),
        ValueError,
        "shard 1",
    ),
    (
        "lse is not out.shape[:-1]",
        lambda: sa.merge_attention([O64], [L64[:, :4]]),
        ValueError,
        "out.shape",
    ),
    ("lse with the Dv axis", lambda: sa.merge_attention([O64], [O64]), ValueError, "out.shape"),
    ("float32 and float64", lambda: sa.merge_attention([O32, O64], [L32, L64]), TypeError, "dtype"),
    ("float32 out, float64 lse", lambda: sa.merge_attention([O32], [L64]), TypeError, "dtype"),
    ("int arrays", lambda: sa.merge_attention([O64.astype(int)], [L64]), TypeError, "outs"),
    ("int lse", lambda: sa.merge_attention([O64], [L64.astype(np.int32)]), TypeError, "lses"),
    ("not an array", lambda: sa.merge_attention([O64], [object()]), TypeError, "lses"),
]


@pytest.mark.parametrize(
    "call, error, message", [m[1:] for m in MERGE_ERRORS], ids=[m[0] for m in MERGE_ERRORS]
)
def test_merge_attention_input_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("score", SCORES)
def test_two_dimensional_shards(score):
    """(L, D) operands (one head, no batch): shards return 2-D results and merge as such."""
    rng = seeded(f"shards-2d-{score}", 0)
    q, k, v = (
        rng.standard_normal((70, 9)),
        rng.standard_normal((200, 9)),
        rng.standard_normal((200, 3)),
    )
    options = {"score": score, "alibi_slopes": [0.05], "softcap": 8.0}
    if score == "additive":
        options["score_params"] = additive_params(rng, 9, 5)
    pattern = sa.SlidingWindow(100, 20) | sa.Strided(13)
    merged = sharded_attention(q, k, v, pattern, (70, 200), [0, 63, 64, 130, 200], **options)
    assert merged[0].shape == (70, 3) and merged[1].shape == (70,)
    case = Case(score, np.dtype(np.float64), q, k, v, pattern, options)
    check_result(case, *merged)
    compare_with_single(
        case, merged, sa.attention(q, k, v, pattern, return_lse=True, **options), "2-D"
    )
