"""Patterns: every mask against its formula written out here, union and intersection, value
semantics, argument errors, lowering to the core's program, per-head splitting, and the tile-level
views (block_layout, nnz, density, to_string, summary) that go through the C++ layout compiler."""

import copy
import pickle

import numpy as np
import pytest
from sparse_attn import _ops
from sparse_attn.patterns import (
    BlockSparse,
    Causal,
    Dense,
    Global,
    Intersection,
    Mask,
    Pattern,
    SlidingWindow,
    Strided,
    Union,
    as_head_patterns,
)

SIZES = [(1, 1), (7, 7), (63, 65), (129, 97), (5, 31), (31, 5)]
PRIMITIVES = ["dense", "causal", "window", "strided", "global", "block", "mask"]


def formula_mask(allowed, Lq, Lk):
    """The mask of a predicate on (i, j), evaluated pair by pair."""
    rows = [[bool(allowed(i, j)) for j in range(Lk)] for i in range(Lq)]
    return np.array(rows, dtype=bool).reshape(Lq, Lk)


def random_primitive(kind, rng, Lq, Lk):
    """A primitive with random parameters that fit (Lq, Lk), and its predicate from DESIGN.md."""
    if kind == "dense":
        return Dense(), lambda i, j: True
    if kind == "causal":
        offset = int(rng.integers(-Lq, Lk + 1))
        return Causal(offset), lambda i, j: j <= i + offset
    if kind == "window":
        left, right = (int(n) for n in rng.integers(0, 12, size=2))
        return SlidingWindow(left, right), lambda i, j: i - left <= j <= i + right
    if kind == "strided":
        stride = int(rng.integers(1, 10))
        reach = None if rng.random() < 0.5 else int(rng.integers(0, 40))
        return Strided(
            stride, reach
        ), lambda i, j: (i - j) % stride == 0 and (reach is None or abs(i - j) <= reach)
    if kind == "global":
        tokens = set(rng.choice(max(Lq, Lk), size=min(3, max(Lq, Lk)), replace=False).tolist())
        rows, cols = [(True, True), (True, False), (False, True)][rng.integers(3)]
        return Global(
            sorted(tokens), rows=rows, cols=cols
        ), lambda i, j: (rows and i in tokens) or (cols and j in tokens)
    if kind == "block":
        block = int(rng.choice([1, 3, 16]))
        shape = (-(-Lq // block) + int(rng.integers(2)), -(-Lk // block) + int(rng.integers(2)))
        layout = rng.random(shape) < 0.5
        return BlockSparse(layout, block), lambda i, j: layout[i // block, j // block]
    if kind == "mask":
        array = rng.random((Lq, Lk)) < 0.3
        return Mask(array), lambda i, j: array[i, j]
    raise AssertionError(kind)


def random_pattern(rng, Lq, Lk, depth):
    """A random union/intersection tree of random primitives, and its predicate."""
    if depth == 0 or rng.random() < 0.3:
        return random_primitive(PRIMITIVES[rng.integers(len(PRIMITIVES))], rng, Lq, Lk)
    a, allowed_a = random_pattern(rng, Lq, Lk, depth - 1)
    b, allowed_b = random_pattern(rng, Lq, Lk, depth - 1)
    if rng.random() < 0.5:
        return a | b, lambda i, j: allowed_a(i, j) or allowed_b(i, j)
    return a & b, lambda i, j: allowed_a(i, j) and allowed_b(i, j)


# ---- masks against their formulas ------------------------------------------------------------


@pytest.mark.parametrize("Lq, Lk", SIZES)
@pytest.mark.parametrize("kind", PRIMITIVES)
def test_primitive_mask_matches_formula(kind, Lq, Lk):
    rng = np.random.default_rng([PRIMITIVES.index(kind), Lq, Lk])
    for _ in range(3):
        pattern, allowed = random_primitive(kind, rng, Lq, Lk)
        mask = pattern.to_mask(Lq, Lk)
        assert mask.dtype == bool and mask.shape == (Lq, Lk)
        np.testing.assert_array_equal(mask, formula_mask(allowed, Lq, Lk), err_msg=repr(pattern))


@pytest.mark.parametrize("Lq, Lk", [(7, 7), (63, 65), (129, 97)])
def test_default_arguments(Lq, Lk):
    np.testing.assert_array_equal(
        Causal().to_mask(Lq, Lk), formula_mask(lambda i, j: j <= i, Lq, Lk)
    )
    np.testing.assert_array_equal(
        SlidingWindow(3).to_mask(Lq, Lk), formula_mask(lambda i, j: abs(i - j) <= 3, Lq, Lk)
    )
    np.testing.assert_array_equal(
        Strided(4).to_mask(Lq, Lk), formula_mask(lambda i, j: (i - j) % 4 == 0, Lq, Lk)
    )
    np.testing.assert_array_equal(Dense().to_mask(Lq), np.ones((Lq, Lq), bool))


def test_causal_bottom_right_alignment():
    Lq, Lk = 3, 10  # three new queries after seven cached keys
    mask = Causal(offset=Lk - Lq).to_mask(Lq, Lk)
    assert mask.sum(axis=1).tolist() == [8, 9, 10]


@pytest.mark.parametrize("Lq, Lk", SIZES)
def test_union_and_intersection_are_or_and(Lq, Lk):
    rng = np.random.default_rng([Lq, Lk])
    for _ in range(4):
        a, _ = random_primitive(PRIMITIVES[rng.integers(len(PRIMITIVES))], rng, Lq, Lk)
        b, _ = random_primitive(PRIMITIVES[rng.integers(len(PRIMITIVES))], rng, Lq, Lk)
        mask_a, mask_b = a.to_mask(Lq, Lk), b.to_mask(Lq, Lk)
        np.testing.assert_array_equal((a | b).to_mask(Lq, Lk), mask_a | mask_b)
        np.testing.assert_array_equal((a & b).to_mask(Lq, Lk), mask_a & mask_b)
        assert isinstance(a | b, Union) and isinstance(a & b, Intersection)


@pytest.mark.parametrize("Lq, Lk", [(7, 7), (63, 65), (129, 97)])
def test_random_trees_match_formula(Lq, Lk):
    rng = np.random.default_rng([Lq, Lk, 1])
    for _ in range(6):
        pattern, allowed = random_pattern(rng, Lq, Lk, depth=3)
        np.testing.assert_array_equal(
            pattern.to_mask(Lq, Lk), formula_mask(allowed, Lq, Lk), err_msg=repr(pattern)
        )


def test_empty_sizes():
    for pattern in (Dense(), Causal(), SlidingWindow(1) | Strided(2)):
        assert pattern.to_mask(0, 5).shape == (0, 5)
        assert pattern.to_mask(4, 0).shape == (4, 0)


def test_to_mask_returns_a_fresh_array():
    pattern = Mask(np.eye(3, dtype=bool))
    mask = pattern.to_mask(3, 3)
    mask[:] = False
    np.testing.assert_array_equal(pattern.to_mask(3, 3), np.eye(3, dtype=bool))


# ---- value semantics -------------------------------------------------------------------------


def test_repr_names_parameters():
    assert repr(Dense()) == "Dense()"
    assert repr(Causal()) == "Causal(offset=0)"
    assert repr(SlidingWindow(256)) == "SlidingWindow(left=256, right=256)"
    assert repr(Strided(4, reach=8)) == "Strided(stride=4, reach=8)"
    assert repr(Global([3], cols=False)) == "Global(tokens=[3], cols=False)"
    assert (
        repr(SlidingWindow(2) | Global([1, 0, 1]))
        == "(SlidingWindow(left=2, right=2) | Global(tokens=[0, 1]))"
    )
    assert repr(Causal() & Dense()) == "(Causal(offset=0) & Dense())"
    text = repr(BlockSparse(np.eye(3, 4, dtype=bool), 16))
    assert "BlockSparse" in text and "(3, 4)" in text and "block=16" in text
    assert "(5, 6)" in repr(Mask(np.zeros((5, 6), bool)))


def test_equal_parameters_give_equal_patterns():
    same = [
        (SlidingWindow(2), SlidingWindow(2, 2)),
        (SlidingWindow(np.int64(3)), SlidingWindow(3, right=np.uint8(3))),
        (Causal(np.int32(-2)), Causal(-2)),
        (Global([2, 0, 2]), Global(np.array([0, 2]))),
        (BlockSparse([[1, 0], [0, 1]], 4), BlockSparse(np.eye(2, dtype=bool), 4)),
        (Mask(np.eye(3, dtype=np.int8)), Mask(np.eye(3, dtype=bool))),
        (Dense() | Causal(), Union(Dense(), Causal(0))),
    ]
    for a, b in same:
        assert a == b and hash(a) == hash(b), (a, b)
    different = [
        (Causal(), Dense()),
        (SlidingWindow(2), SlidingWindow(2, 3)),
        (Strided(2), Strided(2, 4)),
        (Global([0]), Global([0], cols=False)),
        (BlockSparse(np.eye(2, dtype=bool), 4), BlockSparse(np.eye(2, dtype=bool), 8)),
        (BlockSparse(np.eye(2, dtype=bool), 4), BlockSparse(np.ones((2, 2), bool), 4)),
        (Mask(np.eye(2, dtype=bool)), Mask(np.eye(2, 3, dtype=bool))),
        (Dense() | Causal(), Dense() & Causal()),
        (Dense() | Causal(), Causal() | Dense()),
    ]
    for a, b in different:
        assert a != b, (a, b)
    assert Dense() != "Dense()"
    assert len({SlidingWindow(1), SlidingWindow(1, 1), Causal(), Causal(0)}) == 2


@pytest.mark.parametrize(
    "pattern",
    [
        Dense(),
        Strided(3, 7),
        Global([1, 4], rows=False),
        BlockSparse(np.eye(2, 3, dtype=bool)[None].repeat(2, axis=0), 8),
        Mask(np.eye(4, dtype=bool)) & Causal(1),
    ],
    ids=repr,
)
def test_pickle_and_copy_round_trip(pattern):
    for clone in (pickle.loads(pickle.dumps(pattern)), copy.copy(pattern), copy.deepcopy(pattern)):
        assert clone == pattern and hash(clone) == hash(pattern)


def test_patterns_are_immutable():
    window = SlidingWindow(2)
    with pytest.raises(AttributeError):
        window.left = 5
    with pytest.raises(AttributeError):
        del window.right
    with pytest.raises(AttributeError):
        window.extra = 1
    assert window == SlidingWindow(2, 2)
    layout = BlockSparse(np.eye(2, dtype=bool), 4).layout
    with pytest.raises(ValueError):
        layout[0, 1] = True


@pytest.mark.parametrize(
    "make, Lq, Lk", [(lambda a: BlockSparse(a, 2), 10, 12), (Mask, 5, 6)], ids=["block", "mask"]
)
def test_caller_arrays_are_copied_not_modified(make, Lq, Lk):
    rng = np.random.default_rng(7)
    array = (rng.random((5, 6)) < 0.5).astype(np.int16)
    before = array.copy()
    pattern = make(array)
    mask = pattern.to_mask(Lq, Lk)
    array[:] = 1 - array  # the pattern must not see this
    np.testing.assert_array_equal(pattern.to_mask(Lq, Lk), mask)
    np.testing.assert_array_equal(array, 1 - before)
    assert array.flags.writeable and array.dtype == np.int16


def test_operators_need_patterns():
    with pytest.raises(TypeError):
        Dense() | 1
    with pytest.raises(TypeError):
        None & Causal()
    assert Dense().__or__(1) is NotImplemented and Dense().__and__("x") is NotImplemented


# ---- argument errors -------------------------------------------------------------------------

ERRORS = [
    (lambda: SlidingWindow(-1), ValueError, "left"),
    (lambda: SlidingWindow(1, -1), ValueError, "right"),
    (lambda: SlidingWindow(1.5), TypeError, "left"),
    (lambda: SlidingWindow(True), TypeError, "left"),
    (lambda: SlidingWindow(2, np.float64(2)), TypeError, "right"),
    (lambda: Causal(0.0), TypeError, "offset"),
    (lambda: Causal(False), TypeError, "offset"),
    (lambda: Causal(2**70), ValueError, "offset"),
    (lambda: Strided(0), ValueError, "stride"),
    (lambda: Strided(2, -1), ValueError, "reach"),
    (lambda: Strided(2, 1.0), TypeError, "reach"),
    (lambda: Global([-1]), ValueError, "tokens"),
    (lambda: Global([0.5]), TypeError, "tokens"),
    (lambda: Global([[0, 1]]), ValueError, "tokens"),
    (lambda: Global([True]), TypeError, "tokens"),
    (lambda: Global([0], rows=False, cols=False), ValueError, "rows"),
    (lambda: Global([0], rows=1), TypeError, "rows"),
    (lambda: BlockSparse(np.ones((2, 2)), 4), TypeError, "layout"),
    (lambda: BlockSparse(np.full((2, 2), 2), 4), ValueError, "layout"),
    (lambda: BlockSparse(np.ones(3, bool), 4), ValueError, "layout"),
    (lambda: BlockSparse(np.ones((2, 2), bool), 0), ValueError, "block"),
    (lambda: BlockSparse(np.ones((2, 2), bool), 2.0), TypeError, "block"),
    (lambda: Mask(np.ones((2, 2))), TypeError, "array"),
    (lambda: Mask(np.ones((2, 2, 2), bool)), ValueError, "array"),
    (lambda: Union(Dense(), 3), TypeError, "b"),
    (lambda: Intersection("x", Dense()), TypeError, "a"),
    (
        lambda: BlockSparse(np.ones((2, 1, 1), bool), 4) | BlockSparse(np.ones((3, 1, 1), bool), 4),
        ValueError,
        "2 and 3 heads",
    ),
    (lambda: Dense().to_mask(-1), ValueError, "Lq"),
    (lambda: Dense().to_mask(3, 2.0), TypeError, "Lk"),
    (lambda: Dense()._lower(3, -2), ValueError, "Lk"),
    (lambda: Global([5]).to_mask(3, 5), ValueError, r"tokens.*Lq=3, Lk=5"),
    (lambda: Global([5])._lower(5, 3), ValueError, r"tokens.*Lq=5, Lk=3"),
    (
        lambda: BlockSparse(np.ones((2, 2), bool), 4)._lower(9, 8),
        ValueError,
        r"layout.*\(2, 2\).*\(3, 2\)",
    ),
    (
        lambda: BlockSparse(np.ones((2, 2), bool), 4).to_mask(8, 9),
        ValueError,
        r"layout.*\(2, 2\).*\(2, 3\)",
    ),
    (lambda: BlockSparse(np.ones((2, 2, 2), bool), 4)._lower(8, 8), ValueError, "split_heads"),
    (lambda: Mask(np.ones((3, 4), bool))._lower(4, 3), ValueError, r"mask.*\(3, 4\).*\(4, 3\)"),
    (lambda: Mask(np.ones((3, 4), bool)).to_mask(3, 5), ValueError, r"mask.*\(3, 4\)"),
]


@pytest.mark.parametrize("call, error, message", ERRORS)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_tokens_are_checked_against_the_longer_sequence():
    assert Global([4])._lower(3, 5)[0][0] == _ops.GLOBAL
    assert Global([4], rows=False).to_mask(3, 5)[:, 4].all()
    assert Global([4], cols=False).to_mask(5, 3)[4].all()


def test_program_depth_is_limited():
    chain = Dense()
    for _ in range(100):
        chain = chain | Causal()  # left to right: the stack never holds more than two entries
    assert len(chain._lower(4)) == 201
    nested = Dense()
    for _ in range(_ops.MAX_PROGRAM_DEPTH):
        nested = Causal() | nested  # right to left: one more stack entry per level
    with pytest.raises(ValueError, match="stack"):
        nested._lower(4)


# ---- lowering --------------------------------------------------------------------------------


def test_lowering_of_each_primitive():
    assert Dense()._lower(5) == [(_ops.DENSE, 0, 0, 0, 0, None)]
    assert Causal(-3)._lower(5, 7) == [(_ops.CAUSAL, -3, 0, 0, 0, None)]
    assert SlidingWindow(4, 1)._lower(5) == [(_ops.WINDOW, 4, 1, 0, 0, None)]
    assert Strided(3)._lower(5) == [(_ops.STRIDED, 3, -1, 0, 0, None)]
    assert Strided(3, 9)._lower(5) == [(_ops.STRIDED, 3, 9, 0, 0, None)]

    (node,) = Global([3, 1, 3], cols=False)._lower(5)
    assert node[:5] == (_ops.GLOBAL, 1, 0, 0, 0)
    assert node[5].dtype == np.int64 and node[5].tolist() == [1, 3]

    layout = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    (node,) = BlockSparse(layout, 4)._lower(7, 9)
    assert node[:5] == (_ops.BLOCK, 4, 2, 3, 0)
    assert node[5].dtype == np.uint8 and node[5].flags.c_contiguous
    np.testing.assert_array_equal(node[5], layout)

    array = np.random.default_rng(3).random((5, 7)) < 0.5
    (node,) = Mask(array)._lower(5, 7)
    assert node[:5] == (_ops.MASK, 5, 7, 0, 0)
    assert node[5].dtype == np.uint8 and node[5].flags.c_contiguous
    np.testing.assert_array_equal(node[5], array)

    for node in (Dense() | Causal(2) & SlidingWindow(1))._lower(5):
        assert len(node) == 6 and all(type(x) is int for x in node[:5])


def test_lowering_is_postfix():
    pattern = (Dense() | Causal(1)) & SlidingWindow(2)
    assert [node[0] for node in pattern._lower(6)] == [
        _ops.DENSE,
        _ops.CAUSAL,
        _ops.UNION,
        _ops.WINDOW,
        _ops.INTERSECT,
    ]


# ---- heads -----------------------------------------------------------------------------------


def test_per_head_block_sparse():
    rng = np.random.default_rng(11)
    layout = rng.random((3, 4, 5)) < 0.5
    pattern = BlockSparse(layout, 8)
    assert pattern.num_heads == 3 and Causal().num_heads is None
    heads = pattern.split_heads(3)
    assert heads == [BlockSparse(layout[h], 8) for h in range(3)]
    assert all(head.num_heads is None for head in heads)
    mask = pattern.to_mask(29, 37)
    assert mask.shape == (3, 29, 37)
    for h in range(3):
        np.testing.assert_array_equal(mask[h], heads[h].to_mask(29, 37))


def test_combinations_with_per_head_patterns():
    rng = np.random.default_rng(12)
    per_head = BlockSparse(rng.random((2, 3, 3)) < 0.5, 4)
    combined = per_head & Causal(1) | SlidingWindow(1)
    assert combined.num_heads == 2
    mask = combined.to_mask(11, 12)
    for h, head in enumerate(combined.split_heads(2)):
        assert head.num_heads is None
        np.testing.assert_array_equal(mask[h], head.to_mask(11, 12))
        expected = per_head.split_heads(2)[h].to_mask(11, 12) & Causal(1).to_mask(11, 12)
        np.testing.assert_array_equal(mask[h], expected | SlidingWindow(1).to_mask(11, 12))
    both = per_head | BlockSparse(rng.random((2, 3, 3)) < 0.5, 4)
    assert both.num_heads == 2


def test_split_heads():
    window = SlidingWindow(3)
    assert window.split_heads(4) == [window] * 4
    with pytest.raises(ValueError, match="3 heads.*2"):
        BlockSparse(np.ones((3, 1, 1), bool), 4).split_heads(2)
    with pytest.raises(ValueError, match="H"):
        window.split_heads(0)


def test_as_head_patterns():
    assert as_head_patterns(None, 3) == (Dense(),) * 3
    assert as_head_patterns(Causal(), 2) == (Causal(), Causal())
    per_head = BlockSparse(np.eye(2, dtype=bool)[None].repeat(3, axis=0), 4)
    assert as_head_patterns(per_head, 3) == tuple(per_head.split_heads(3))
    heads = [Causal(), SlidingWindow(1)]
    assert as_head_patterns(heads, 2) == tuple(heads)
    assert as_head_patterns(tuple(heads), 2) == tuple(heads)
    assert all(isinstance(p, Pattern) for p in as_head_patterns(None, 1))

    with pytest.raises(ValueError, match=r"pattern.*3.*4"):
        as_head_patterns(per_head, 4)
    with pytest.raises(ValueError, match=r"pattern.*2.*3"):
        as_head_patterns(heads, 3)
    with pytest.raises(TypeError, match=r"pattern\[1\]"):
        as_head_patterns([Causal(), "window"], 2)
    with pytest.raises(ValueError, match=r"pattern\[0\]"):
        as_head_patterns([per_head], 1)
    with pytest.raises(TypeError, match="pattern"):
        as_head_patterns("causal", 1)
    with pytest.raises(ValueError, match="num_heads"):
        as_head_patterns(None, 0)


# ---- tile-level views: the C++ layout compiler -----------------------------------------------

LAYOUT_SIZES = [(1, 1), (7, 7), (63, 65), (129, 97), (200, 31)]


def tiles_any(mask, block):
    """Blockwise any over (block x block) tiles, the last ones clipped to the sequence."""
    Lq, Lk = mask.shape[-2:]
    nqt, nkt = -(-Lq // block), -(-Lk // block)
    padded = np.zeros((*mask.shape[:-2], nqt * block, nkt * block), dtype=bool)
    padded[..., :Lq, :Lk] = mask
    return padded.reshape(*mask.shape[:-2], nqt, block, nkt, block).any(axis=(-3, -1))


@pytest.mark.parametrize("block", [1, 16, 64, 128])
@pytest.mark.parametrize("Lq, Lk", LAYOUT_SIZES)
def test_block_layout_is_blockwise_any(Lq, Lk, block):
    rng = np.random.default_rng([Lq, Lk, block])
    for _ in range(8):
        pattern, _ = random_pattern(rng, Lq, Lk, depth=2)
        mask = pattern.to_mask(Lq, Lk)
        tiles = pattern.block_layout(Lq, Lk, block=block)
        assert tiles.dtype == bool
        np.testing.assert_array_equal(tiles, tiles_any(mask, block), err_msg=repr(pattern))


@pytest.mark.parametrize("block", [1, 16, 64])
@pytest.mark.parametrize("Lq, Lk", LAYOUT_SIZES)
def test_full_tiles_are_full(Lq, Lk, block):
    from sparse_attn.layout import compile_layout

    rng = np.random.default_rng([Lq, Lk, block, 2])
    for _ in range(8):
        pattern, _ = random_pattern(rng, Lq, Lk, depth=2)
        mask = pattern.to_mask(Lq, Lk)
        kinds = compile_layout(pattern, Lq, Lk, block, block).kinds()
        np.testing.assert_array_equal(kinds != 0, tiles_any(mask, block), err_msg=repr(pattern))
        # A full tile is really full (a union may still mark a full tile as partial).
        every_pair_allowed = ~tiles_any(~mask, block)
        assert every_pair_allowed[kinds == 2].all(), repr(pattern)


@pytest.mark.parametrize("Lq, Lk", LAYOUT_SIZES)
def test_nnz_and_density_count_allowed_pairs(Lq, Lk):
    rng = np.random.default_rng([Lq, Lk, 3])
    for _ in range(8):
        pattern, _ = random_pattern(rng, Lq, Lk, depth=2)
        expected = int(pattern.to_mask(Lq, Lk).sum())
        assert pattern.nnz(Lq, Lk) == expected, repr(pattern)
        assert pattern.density(Lq, Lk) == pytest.approx(expected / (Lq * Lk))
    assert Dense().nnz(0, 5) == 0 and Dense().density(0, 5) == 0.0


def test_per_head_tile_views_cover_every_head():
    rng = np.random.default_rng(4)
    pattern = BlockSparse(rng.random((3, 5, 4)) < 0.5, 16) & Causal(8)
    mask = pattern.to_mask(70, 60)
    assert pattern.nnz(70, 60) == int(mask.sum())
    assert pattern.density(70, 60) == pytest.approx(mask.mean())
    np.testing.assert_array_equal(pattern.block_layout(70, 60, block=16), tiles_any(mask, 16))
    assert pattern.to_string(70, 60, block=16).count("head ") == 3
    assert "3 heads" in pattern.summary(70, 60)


def test_to_string_draws_tile_kinds():
    assert Causal().to_string(8, block=4) == "+.\n#+"
    assert Dense().to_string(8, 4, block=4) == "#\n#"
    assert SlidingWindow(0).to_string(3, block=1) == "#..\n.#.\n..#"
    picture = Dense().to_string(65, 70, block=1).splitlines()
    assert picture[:64] == ["#" * 64] * 64
    assert "64 x 64 of 65 x 70" in picture[64]


def test_summary_reports_counts_and_empty_rows():
    pattern = Causal(offset=-3)
    text = pattern.summary(10, 12)
    nnz = int(pattern.to_mask(10, 12).sum())
    assert repr(pattern) in text
    assert f"{nnz} of 120" in text
    assert "no allowed key: 3" in text


def test_block_layout_groups_core_tiles_for_large_blocks():
    rng = np.random.default_rng(5)
    Lq, Lk = 700, 450
    for block in (128, 192):
        for _ in range(4):
            pattern, _ = random_pattern(rng, Lq, Lk, depth=2)
            mask = pattern.to_mask(Lq, Lk)
            tiles = pattern.block_layout(Lq, Lk, block=block)
            np.testing.assert_array_equal(tiles, tiles_any(mask, block), err_msg=repr(pattern))
            picture = np.array([list(line) for line in pattern.to_string(Lq, Lk, block).split()])
            np.testing.assert_array_equal(picture != ".", tiles)
            assert (~tiles_any(~mask, block))[picture == "#"].all(), repr(pattern)
    with pytest.raises(ValueError, match="block"):
        Dense().block_layout(200, block=100)
    with pytest.raises(ValueError, match="block"):
        Dense().to_string(200, block=0)


def test_tile_views_never_materialise_the_mask():
    L = 1 << 20
    i = np.arange(L)
    window = SlidingWindow(256)
    expected = int((np.minimum(i + 256, L - 1) - np.maximum(i - 256, 0) + 1).sum())
    assert window.nnz(L) == expected
    assert window.density(L) == pytest.approx(expected / L**2)
    text = (window | Global([0])).summary(L)
    assert "query rows with no allowed key: 0" in text
    assert "query rows with no allowed key: 100" in (window & Causal(-100)).summary(L)

    L = 1 << 16  # dense and causal list every (or half of every) tile: kept moderate
    assert Causal().nnz(L) == L * (L + 1) // 2
    assert Dense().density(L) == 1.0
    tiles = window.block_layout(L, block=4096)
    assert tiles.shape == (16, 16) and tiles.sum() == 16 + 2 * 15
