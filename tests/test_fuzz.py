"""Property tests (Hypothesis) for the pattern algebra, the layout compiler and the kernels.

Patterns are drawn from every public pattern class, nested with | and & up to three levels, for
lengths around the 64-wide tile. Three independent implementations meet here: the patterns'
NumPy masks (``to_mask``), the C++ layout compiler (tiles, counts) and the C++ kernels checked
against the float64 reference. Runs are reproducible: derandomized, no example database.
Examples per run: see EXAMPLES (1,900 in all).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import sparse_attn as sa
from conftest import Case, run_and_check
from sparse_attn import layout as layouts
from sparse_attn import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

EXAMPLES = {
    "algebra": 300,
    "union_and_intersection": 300,
    "counts": 250,
    "block_layout": 250,
    "windowed_layout": 200,
    "kernel": 450,
    "weights": 150,
}


def fuzz(name):
    """Settings for a reproducible run: fixed examples, no deadline, no database."""
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no patch files
    )


LENGTHS = st.one_of(
    st.integers(1, 9), st.sampled_from([31, 63, 64, 65, 127, 128, 129]), st.integers(1, 150)
)


def small_int(limit):
    """Mostly small ints, sometimes around the tile size or up to ``limit``."""
    return st.one_of(st.integers(0, 5), st.sampled_from([31, 63, 64, 65]), st.integers(0, limit))


@st.composite
def primitives(draw, Lq, Lk):
    """One pattern of a public class, valid for (Lq, Lk)."""
    longest = max(Lq, Lk)
    kind = draw(
        st.sampled_from(
            [
                "dense",
                "causal",
                "window",
                "strided",
                "global",
                "block",
                "mask",
                "random",
                "random_blocks",
                "fixed",
                "documents",
                "longformer",
                "bigbird",
                "sparse_transformer",
            ]
        )
    )
    if kind == "dense":
        return sa.Dense()
    if kind == "causal":
        return sa.Causal(draw(st.integers(-Lq - 2, Lk + 2)))
    if kind == "window":
        return sa.SlidingWindow(draw(small_int(longest)), draw(small_int(longest)))
    if kind == "strided":
        reach = draw(st.one_of(st.none(), small_int(longest)))
        return sa.Strided(1 + draw(small_int(longest)), reach)
    if kind == "global":
        tokens = draw(st.lists(st.integers(0, longest - 1), max_size=4))
        rows, cols = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
        return sa.Global(tokens, rows=rows, cols=cols)
    if kind == "block":
        block = draw(st.sampled_from([1, 2, 3, 5, 16, 31, 64, 65, 128]))
        shape = (-(-Lq // block) + draw(st.integers(0, 1)), -(-Lk // block))
        bits = draw(st.integers(0, 2**64 - 1))
        layout = np.random.default_rng(bits).random(shape) < draw(st.sampled_from([0.2, 0.6, 1]))
        return sa.BlockSparse(layout, block)
    if kind == "mask":
        bits = draw(st.integers(0, 2**64 - 1))
        return sa.Mask(np.random.default_rng(bits).random((Lq, Lk)) < 0.3)
    if kind == "random":
        return sa.Random(draw(st.integers(0, 9)), draw(st.integers(0, 2**62)))
    if kind == "random_blocks":
        return sa.RandomBlocks(
            draw(st.integers(0, 4)),
            draw(st.sampled_from([1, 4, 16, 64])),
            draw(st.integers(0, 100)),
            draw(st.integers(0, 2)),
            draw(st.one_of(st.none(), st.integers(0, 2))),
        )
    if kind == "fixed":
        block = draw(st.integers(1, 40))
        return sa.Fixed(block, draw(st.integers(0, block)))
    if kind == "documents":
        return sa.Documents(draw(st.lists(st.integers(0, 60), max_size=5)))
    if kind == "longformer":
        tokens = draw(st.lists(st.integers(0, longest - 1), max_size=2))
        return sa.Longformer(2 * draw(st.integers(0, 20)), tokens, draw(st.integers(1, 3)))
    if kind == "bigbird":
        return sa.BigBird(
            draw(st.sampled_from([4, 16, 32])),
            draw(st.sampled_from([1, 3])),
            draw(st.integers(0, 2)),
            draw(st.integers(0, 2)),
            draw(st.integers(0, 50)),
        )
    stride = draw(st.integers(1, 20))
    if draw(st.booleans()):
        return sa.SparseTransformer("strided", stride, causal=draw(st.booleans()))
    return sa.SparseTransformer(
        "fixed", stride, draw(st.integers(0, stride)), causal=draw(st.booleans())
    )


@st.composite
def patterns(draw, Lq, Lk, depth=None):
    """A primitive, or a union / intersection tree of them nested up to three levels."""
    depth = draw(st.integers(0, 3)) if depth is None else depth
    if depth == 0:
        return draw(primitives(Lq, Lk))
    left = draw(patterns(Lq, Lk, depth - 1))
    right = draw(patterns(Lq, Lk, draw(st.integers(0, depth - 1))))
    return left | right if draw(st.booleans()) else left & right


@st.composite
def sized_patterns(draw, count=1):
    Lq, Lk = draw(LENGTHS), draw(LENGTHS)
    return (Lq, Lk, *[draw(patterns(Lq, Lk)) for _ in range(count)])


# ---- the algebra --------------------------------------------------------------------------------


@fuzz("algebra")
@given(sized_patterns(count=3))
def test_union_and_intersection_are_associative_commutative_and_distribute(case):
    Lq, Lk, a, b, c = case
    ma, mb, mc = (p.to_mask(Lq, Lk) for p in (a, b, c))
    np.testing.assert_array_equal(((a | b) | c).to_mask(Lq, Lk), (a | (b | c)).to_mask(Lq, Lk))
    np.testing.assert_array_equal(((a & b) & c).to_mask(Lq, Lk), (a & (b & c)).to_mask(Lq, Lk))
    np.testing.assert_array_equal((a | b).to_mask(Lq, Lk), (b | a).to_mask(Lq, Lk))
    np.testing.assert_array_equal((a & b).to_mask(Lq, Lk), (b & a).to_mask(Lq, Lk))
    np.testing.assert_array_equal((a & (b | c)).to_mask(Lq, Lk), ma & (mb | mc))
    np.testing.assert_array_equal((a | (b & c)).to_mask(Lq, Lk), ma | (mb & mc))
    # the layout compiler agrees, by counts: |a or b| = |a| + |b| - |a and b|
    assert (a | b).nnz(Lq, Lk) + (a & b).nnz(Lq, Lk) == a.nnz(Lq, Lk) + b.nnz(Lq, Lk)
    assert ((a | b) | c).nnz(Lq, Lk) == (a | (b | c)).nnz(Lq, Lk) == int((ma | mb | mc).sum())


@fuzz("union_and_intersection")
@given(sized_patterns(count=2))
def test_masks_of_union_and_intersection_are_or_and_and(case):
    Lq, Lk, a, b = case
    ma, mb = a.to_mask(Lq, Lk), b.to_mask(Lq, Lk)
    for combined, expected in ((a | b, ma | mb), (a & b, ma & mb)):
        np.testing.assert_array_equal(combined.to_mask(Lq, Lk), expected)
        assert combined.nnz(Lq, Lk) == int(expected.sum())  # C++ counts vs NumPy masks
        np.testing.assert_array_equal(combined.block_layout(Lq, Lk, 64), tiles_of(expected, 64))
    same = pickle.loads(pickle.dumps(a | b))
    assert same == a | b and hash(same) == hash(a | b)


# ---- the layout compiler ------------------------------------------------------------------------


def tiles_of(mask: np.ndarray, block: int) -> np.ndarray:
    """(query tile, key tile) -> whether the tile of ``mask`` holds an allowed pair."""
    rows, cols = -(-mask.shape[0] // block), -(-mask.shape[1] // block)
    padded = np.zeros((rows * block, cols * block), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows, block, cols, block).any(axis=(1, 3))


def full_tiles_of(mask: np.ndarray, block: int) -> np.ndarray:
    """(query tile, key tile) -> whether every pair of the tile (inside the matrix) is allowed."""
    rows, cols = -(-mask.shape[0] // block), -(-mask.shape[1] // block)
    padded = np.ones((rows * block, cols * block), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows, block, cols, block).all(axis=(1, 3))


@fuzz("counts")
@given(sized_patterns())
def test_counts_match_the_mask(case):
    Lq, Lk, pattern = case
    mask = pattern.to_mask(Lq, Lk)
    assert pattern.nnz(Lq, Lk) == int(mask.sum())
    assert pattern.density(Lq, Lk) == pytest.approx(mask.mean())
    # Pattern.summary called through the class: Fixed and SparseTransformer shadow it with their
    # `summary` parameter (see test_summary_is_not_shadowed_by_a_parameter)
    assert (
        f"query rows with no allowed key: {int((~mask.any(axis=1)).sum())}"
        in sa.Pattern.summary(pattern, Lq, Lk)
    )


@pytest.mark.xfail(
    strict=True,
    raises=TypeError,
    reason="library bug: the `summary` parameter "
    "of Fixed and SparseTransformer hides the Pattern.summary(Lq, Lk) method",
)
@pytest.mark.parametrize("pattern", [sa.Fixed(4, 1), sa.SparseTransformer("fixed", 4)])
def test_summary_is_not_shadowed_by_a_parameter(pattern):
    assert "allowed pairs" in pattern.summary(16, 16)


@fuzz("block_layout")
@given(sized_patterns(), st.sampled_from([1, 2, 3, 7, 16, 31, 32, 63, 64, 128, 192]))
def test_block_layout_never_misses_a_pair_and_never_lists_an_empty_tile(case, block):
    Lq, Lk, pattern = case
    mask = pattern.to_mask(Lq, Lk)
    np.testing.assert_array_equal(pattern.block_layout(Lq, Lk, block), tiles_of(mask, block))
    if block <= 64:  # the compiler's own tiles: a full tile must hold only allowed pairs
        kinds = layouts.compile_layout(pattern, Lq, Lk, block, block).kinds()
        assert not (kinds == 2)[~full_tiles_of(mask, block)].any(), "a tile marked full is not"
        np.testing.assert_array_equal(kinds != 0, tiles_of(mask, block))


@fuzz("windowed_layout")
@given(sized_patterns(), st.data())
def test_a_window_of_the_layout_is_the_window_of_the_mask(case, data):
    """Sharded calls compile the layout of a window (q0, k0) of a larger problem: its tiles
    are those of the full mask's window."""
    Lq, Lk, pattern = case
    q0 = data.draw(st.integers(0, Lq - 1))
    k0 = data.draw(st.integers(0, Lk - 1))
    lq = data.draw(st.integers(1, Lq - q0))
    lk = data.draw(st.integers(1, Lk - k0))
    tile = data.draw(st.sampled_from([8, 16, 64]))
    window = pattern.to_mask(Lq, Lk)[q0 : q0 + lq, k0 : k0 + lk]
    compiled = layouts.compile_layout(pattern, lq, lk, tile, tile, q0, k0, total=(Lq, Lk))
    np.testing.assert_array_equal(compiled.kinds() != 0, tiles_of(window, tile))
    assert compiled.nnz() == int(window.sum())


# ---- the kernels against the reference ----------------------------------------------------------


@st.composite
def problems(draw):
    """An attention call: dtype, GQA heads, broadcast batch, odd sizes, patterns (one, or one
    per head), and sometimes a mask, a bias, key lengths and a scale."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    Hq = draw(st.sampled_from([1, 2, 3, 4]))
    Hkv = draw(st.sampled_from([h for h in range(1, Hq + 1) if Hq % h == 0]))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    Lq, Lk = draw(LENGTHS), draw(LENGTHS)
    D, Dv = draw(st.integers(1, 72)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k_batch = tuple(1 if draw(st.booleans()) else n for n in batch)  # broadcast k and v
    q = rng.standard_normal((*batch, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((*k_batch, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((*k_batch, Hkv, Lk, Dv)).astype(dtype)
    if draw(st.booleans()) and Hq > 1:
        pattern = [draw(patterns(Lq, Lk, depth=draw(st.integers(0, 1)))) for _ in range(Hq)]
    else:
        pattern = draw(st.one_of(st.none(), patterns(Lq, Lk)))
    options = {}
    if draw(st.integers(0, 3)) == 0:
        options["mask"] = rng.random((Lq, Lk)) < 0.7
    if draw(st.integers(0, 3)) == 0:
        bias = rng.standard_normal((Hq, Lq, Lk))
        options["bias"] = np.where(rng.random(bias.shape) < 0.1, -np.inf, bias).astype(dtype)
    if batch and draw(st.integers(0, 3)) == 0:
        options["key_lengths"] = rng.integers(0, Lk + 1, size=batch)
    if draw(st.integers(0, 3)) == 0:
        options["scale"] = draw(st.floats(-1.0, 1.0)) / np.sqrt(D)
    threads = draw(st.sampled_from([None, 1, 2, 3]))
    return Case("hypothesis", dtype, q, k, v, pattern, options, True, threads)


@fuzz("kernel")
@given(problems())
def test_attention_matches_the_reference(case):
    run_and_check(case)


@fuzz("weights")
@given(problems())
def test_weights_match_the_reference(case):
    weights = sa.attention_weights(
        case.q, case.k, case.pattern, **case.options, threads=case.threads
    )
    expected = reference.softmax_weights(case.q, case.k, case.pattern, **case.options)
    tol = 2e-5 if case.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(weights, expected, rtol=tol, atol=tol)
