"""Random, RandomBlocks, Fixed, Documents and the presets Longformer, BigBird, SparseTransformer.

Every mask is checked against a formula written out here (the random ones against a scalar,
pure-Python copy of the generator, independent of sparse_attn._random); the C++ layout compiler
and the CPU kernel against ``to_mask`` pair for pair; presets against masks drawn by hand;
attention against the float64 oracle; and Documents' layout at a million positions.
"""

import copy
import pickle
import time

import numpy as np
import pytest
import sparse_attn as sa
from sparse_attn import _core, _ops, reference
from sparse_attn.layout import compile_layout

SIZES = [(1, 1), (7, 7), (13, 29), (29, 13), (63, 65), (97, 130)]

# ---- the rules, written out independently ------------------------------------------------------

MASK64 = (1 << 64) - 1
STREAM_RANDOM, STREAM_BLOCKS = 1, 2  # enum class RandomStream in csrc/core/random.h


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def random_bits(seed, stream, *counters):
    h = mix64(seed ^ (stream << 56))
    for counter in (*counters, 0, 0, 0)[:4]:
        h = mix64(h ^ counter)
    return h


def floyd(seed, stream, counter, n, k):
    """Floyd's algorithm as documented in Random's docstring, one draw at a time."""
    kept = []
    for s in range(k):
        m = n - k + s
        t = (random_bits(seed, stream, counter, s) * (m + 1)) >> 64
        kept.append(m if t in kept else t)
    return kept


def random_rule(per_row, seed, Lq, Lk):
    mask = np.zeros((Lq, Lk), bool)
    for i in range(Lq):
        mask[i, floyd(seed, STREAM_RANDOM, i, Lk, min(per_row, Lk))] = True
    return mask


def block_rule(per_block_row, block, seed, Lq, Lk, exclude_first=0, exclude_radius=None):
    key_blocks = -(-Lk // block)
    mask = np.zeros((Lq, Lk), bool)
    for qb in range(-(-Lq // block)):
        available = [
            kb
            for kb in range(key_blocks)
            if kb >= exclude_first and (exclude_radius is None or abs(kb - qb) > exclude_radius)
        ]
        ranks = floyd(seed, STREAM_BLOCKS, qb, len(available), min(per_block_row, len(available)))
        for rank in ranks:
            kb = available[rank]
            mask[qb * block : (qb + 1) * block, kb * block : (kb + 1) * block] = True
    return mask


def pair_rule(allowed, Lq, Lk):
    return np.array([[bool(allowed(i, j)) for j in range(Lk)] for i in range(Lq)], bool).reshape(
        Lq, Lk
    )


def fixed_rule(block, summary, Lq, Lk):
    return pair_rule(lambda i, j: i // block == j // block or j % block >= block - summary, Lq, Lk)


def documents_rule(lengths, Lq, Lk):
    document = {}
    position = 0
    for d, length in enumerate(lengths):
        for _ in range(length):
            document[position] = d
            position += 1
    return pair_rule(lambda i, j: i in document and document[i] == document.get(j), Lq, Lk)


def picture(text):
    """A mask drawn as rows of 0s and 1s."""
    return np.array([[c == "1" for c in row] for row in text.split()], bool)


def tiles_any(mask, block):
    Lq, Lk = mask.shape
    nqt, nkt = -(-Lq // block), -(-Lk // block)
    padded = np.zeros((nqt * block, nkt * block), bool)
    padded[:Lq, :Lk] = mask
    return padded.reshape(nqt, block, nkt, block).any(axis=(1, 3))


def random_variant(rng, Lq, Lk):
    """One new primitive with random parameters, and its mask from the rules above."""
    kind = rng.integers(4)
    seed = int(rng.integers(2**62))
    if kind == 0:
        per_row = int(rng.integers(0, 12))
        return sa.Random(per_row, seed), random_rule(per_row, seed, Lq, Lk)
    if kind == 1:
        per, block = int(rng.integers(0, 5)), int(rng.choice([1, 3, 8, 17, 64]))
        first = int(rng.integers(0, 3))
        radius = None if rng.random() < 0.4 else int(rng.integers(0, 3))
        return sa.RandomBlocks(per, block, seed, first, radius), block_rule(
            per, block, seed, Lq, Lk, first, radius
        )
    if kind == 2:
        block = int(rng.integers(1, 40))
        summary = int(rng.integers(0, block + 1))
        return sa.Fixed(block, summary), fixed_rule(block, summary, Lq, Lk)
    lengths = rng.integers(0, 30, size=int(rng.integers(0, 8))).tolist()
    return sa.Documents(lengths), documents_rule(lengths, Lq, Lk)


def old_primitive(rng, Lq, Lk):
    kind = rng.integers(5)
    if kind == 0:
        return sa.Causal(int(rng.integers(-5, 5)))
    if kind == 1:
        return sa.SlidingWindow(int(rng.integers(0, 9)), int(rng.integers(0, 9)))
    if kind == 2:
        return sa.Strided(int(rng.integers(1, 6)), None if rng.random() < 0.5 else 20)
    if kind == 3:
        return sa.Global([int(rng.integers(max(Lq, Lk)))])
    return sa.BlockSparse(rng.random((-(-Lq // 8), -(-Lk // 8))) < 0.5, 8)


def combined(rng, Lq, Lk):
    """A new primitive united or intersected with an old one (or with another new one)."""
    a, _ = random_variant(rng, Lq, Lk)
    b = old_primitive(rng, Lq, Lk) if rng.random() < 0.7 else random_variant(rng, Lq, Lk)[0]
    return a | b if rng.random() < 0.5 else a & b


# ---- masks against the rules --------------------------------------------------------------------


@pytest.mark.parametrize("Lq, Lk", SIZES)
def test_masks_match_the_rules(Lq, Lk):
    rng = np.random.default_rng([Lq, Lk, 10])
    for _ in range(12):
        pattern, expected = random_variant(rng, Lq, Lk)
        mask = pattern.to_mask(Lq, Lk)
        assert mask.dtype == bool and mask.shape == (Lq, Lk)
        np.testing.assert_array_equal(mask, expected, err_msg=repr(pattern))


def test_fixed_and_documents_by_hand():
    blocks_of_4 = picture(
        """111100010001 111100010001 111100010001 111100010001
           000111110001 000111110001 000111110001 000111110001
           000100011111 000100011111 000100011111 000100011111"""
    )
    np.testing.assert_array_equal(sa.Fixed(4, 1).to_mask(12, 12), blocks_of_4)
    # documents [0, 3), [3, 3), [3, 8), [8, 10); positions 10 and 11 belong to none
    documents = picture(
        """111000000000 111000000000 111000000000
           000111110000 000111110000 000111110000 000111110000 000111110000
           000000001100 000000001100 000000000000 000000000000"""
    )
    np.testing.assert_array_equal(sa.Documents([3, 0, 5, 2]).to_mask(12, 12), documents)
    assert not sa.Documents([]).to_mask(5, 5).any()


@pytest.mark.parametrize("per_row, Lk", [(1, 1), (3, 7), (7, 7), (9, 7), (12, 500), (64, 65)])
def test_random_rows_hold_distinct_keys(per_row, Lk):
    mask = sa.Random(per_row, 5).to_mask(300, Lk)
    assert (mask.sum(axis=1) == min(per_row, Lk)).all()
    keys = sa._random.random_row_keys(per_row, 5, Lk, np.arange(300))
    assert all(len(set(row)) == len(row) == min(per_row, Lk) for row in keys.tolist())


def test_random_does_not_depend_on_the_number_of_queries():
    pattern = sa.Random(4, 11)
    np.testing.assert_array_equal(pattern.to_mask(40, 90), pattern.to_mask(200, 90)[:40])
    # ... but on the total number of keys: they are drawn from all of [0, Lk)
    assert not np.array_equal(pattern.to_mask(40, 90), pattern.to_mask(40, 91)[:, :90])


def test_random_is_reproducible_and_seed_sensitive():
    masks = [sa.Random(5, seed).to_mask(64, 80) for seed in (0, 1, 2**62)]
    np.testing.assert_array_equal(sa.Random(5, 0).to_mask(64, 80), masks[0])
    assert sa.Random(5, 0) == sa.Random(5) and hash(sa.Random(5, 0)) == hash(sa.Random(5))
    for a in range(3):
        for b in range(a):
            overlap = (masks[a] & masks[b]).sum() / masks[a].sum()
            assert overlap < 0.25, overlap  # independent draws share ~5/80 of their keys
    assert len({row.tobytes() for row in masks[0]}) > 60  # rows differ from each other
    blocks = [sa.RandomBlocks(2, 8, seed).to_mask(256, 256) for seed in (3, 4)]
    assert not np.array_equal(*blocks)
    np.testing.assert_array_equal(sa.RandomBlocks(2, 8, 3).to_mask(256, 256), blocks[0])


def test_random_keys_are_uniform():
    rows, Lk, per_row = 30000, 10, 3
    frequency = sa.Random(per_row, 123).to_mask(rows, Lk).mean(axis=0)
    np.testing.assert_allclose(frequency, per_row / Lk, atol=0.015)  # ~6 sigma
    frequency = sa.RandomBlocks(1, 1, 9, exclude_first=2).to_mask(rows, Lk)[5:].mean(axis=0)
    np.testing.assert_allclose(frequency, [0, 0] + [1 / 8] * 8, atol=0.015)


def test_random_blocks_draw_whole_distinct_blocks():
    Lq, Lk, block, per = 150, 203, 16, 3  # 13 key blocks, the last one short
    mask = sa.RandomBlocks(per, block, 7, exclude_first=1, exclude_radius=1).to_mask(Lq, Lk)
    for qb in range(-(-Lq // block)):
        rows = mask[qb * block : (qb + 1) * block]
        assert (rows == rows[0]).all()  # one draw per query block
        starts = np.flatnonzero(rows[0, ::block])
        assert len(starts) == per
        assert all(kb >= 1 and abs(kb - qb) > 1 for kb in starts)
        for kb in starts:
            assert rows[0, kb * block : (kb + 1) * block].all()
    assert sa.RandomBlocks(40, 4).to_mask(12, 10).all()  # fewer blocks than draws: all of them


# ---- the C++ layout compiler and kernel against to_mask ----------------------------------------


@pytest.mark.parametrize("Lq, Lk", SIZES)
def test_layout_agrees_pair_for_pair(Lq, Lk):
    """Tiles of 1 x 1 make the compiled layout the mask itself; nnz counts through 64-tiles."""
    rng = np.random.default_rng([Lq, Lk, 11])
    patterns = [random_variant(rng, Lq, Lk)[0] for _ in range(6)]
    patterns += [combined(rng, Lq, Lk) for _ in range(6)]
    for pattern in patterns:
        mask = pattern.to_mask(Lq, Lk)
        kinds = compile_layout(pattern, Lq, Lk, 1, 1).kinds()
        np.testing.assert_array_equal(kinds != 0, mask, err_msg=repr(pattern))
        assert pattern.nnz(Lq, Lk) == mask.sum(), repr(pattern)


@pytest.mark.parametrize("block", [1, 5, 16, 64, 128])
def test_block_layout_and_full_tiles(block):
    rng = np.random.default_rng([block, 12])
    for _ in range(16):
        Lq, Lk = (int(n) for n in rng.integers(1, 300, size=2))
        pattern = random_variant(rng, Lq, Lk)[0] if rng.random() < 0.5 else combined(rng, Lq, Lk)
        mask = pattern.to_mask(Lq, Lk)
        np.testing.assert_array_equal(
            pattern.block_layout(Lq, Lk, block=block), tiles_any(mask, block), err_msg=repr(pattern)
        )
        if block <= 64:
            kinds = compile_layout(pattern, Lq, Lk, block, block).kinds()
            assert (~tiles_any(~mask, block))[kinds == 2].all(), repr(pattern)


def test_single_primitives_mark_full_tiles_full():
    """The analysis is exact for each new primitive alone: no full tile is left partial."""
    rng = np.random.default_rng(13)
    for _ in range(60):
        Lq, Lk = (int(n) for n in rng.integers(1, 200, size=2))
        pattern, mask = random_variant(rng, Lq, Lk)
        block = int(rng.choice([1, 4, 16, 64]))
        kinds = compile_layout(pattern, Lq, Lk, block, block).kinds()
        np.testing.assert_array_equal(kinds == 2, ~tiles_any(~mask, block), err_msg=repr(pattern))


def test_windows_at_offsets_draw_from_the_whole_problem():
    """A layout for a window (q0, k0) of a larger problem sees the same pairs (sharding)."""
    rng = np.random.default_rng(14)
    for _ in range(40):
        Lq, Lk = (int(n) for n in rng.integers(1, 160, size=2))
        pattern = random_variant(rng, Lq, Lk)[0] if rng.random() < 0.5 else combined(rng, Lq, Lk)
        mask = pattern.to_mask(Lq, Lk)
        q0, k0 = int(rng.integers(Lq)), int(rng.integers(Lk))
        len_q, len_k = int(rng.integers(1, Lq - q0 + 1)), int(rng.integers(1, Lk - k0 + 1))
        tile = int(rng.choice([1, 7, 64]))
        layout = compile_layout(pattern, len_q, len_k, tile, tile, q0, k0, total=(Lq, Lk))
        window = mask[q0 : q0 + len_q, k0 : k0 + len_k]
        np.testing.assert_array_equal(layout.kinds() != 0, tiles_any(window, tile))
        assert layout.nnz() == window.sum(), repr(pattern)


def test_random_agrees_at_large_counters():
    """Rows near 10**9 and ten million keys: the C++ draws equal the scalar rule bit for bit."""
    seed, n, q0 = 2**62 - 3, 10_000_019, 10**9
    pattern, total = sa.Random(6, seed), (q0 + 3, n)
    expected = [set(floyd(seed, STREAM_RANDOM, q0 + r, n, 6)) for r in range(3)]
    assert compile_layout(pattern, 3, n, 1, 64, q0, 0, total=total).nnz() == 18
    for key in set().union(*expected):
        k0 = key - key % 64
        kinds = compile_layout(pattern, 3, min(64, n - k0), 1, 1, q0, k0, total=total).kinds()
        for r in range(3):
            assert set((np.flatnonzero(kinds[r]) + k0).tolist()) == {
                j for j in expected[r] if k0 <= j < k0 + 64
            }


def test_kernel_allows_exactly_the_mask():
    """With q = k = 0 every allowed key gets the same weight; v = identity reads them back."""
    rng = np.random.default_rng(15)
    Lq, Lk = 77, 101
    patterns = [random_variant(rng, Lq, Lk)[0] for _ in range(6)] + [
        combined(rng, Lq, Lk) for _ in range(4)
    ]
    q, k, v = np.zeros((Lq, 4)), np.zeros((Lk, 4)), np.eye(Lk)
    for pattern in patterns:
        mask = pattern.to_mask(Lq, Lk)
        out = sa.attention(q, k, v, pattern)
        np.testing.assert_array_equal(out > 0, mask, err_msg=repr(pattern))
        counts = np.maximum(mask.sum(axis=1, keepdims=True), 1)
        np.testing.assert_allclose(out, mask / counts, rtol=1e-12)


def test_documents_compile_without_a_quadratic_step():
    """A million positions in 1,000 documents: the layout lists the tiles of the documents'
    spans only (FlexAttention's create_block_mask materialises L x L for this case)."""
    L, tile = 1_000_000, 64
    rng = np.random.default_rng(16)
    cuts = np.sort(rng.choice(np.arange(1, L), size=999, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [L]]))
    documents = sa.Documents(lengths)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # The tiles each query tile must list: from its first document's start to its last one's end.
    first_row = np.arange(0, L, tile)
    last_row = np.minimum(first_row + tile, L) - 1
    span_start = starts[np.searchsorted(ends, first_row, side="right")]
    span_end = ends[np.searchsorted(ends, last_row, side="right")]
    expected_tiles = int((-(-span_end // tile) - span_start // tile).sum())

    for pattern, nnz in [
        (documents, int((lengths**2).sum())),
        (documents & sa.Causal(), int((lengths * (lengths + 1) // 2).sum())),
        (documents & sa.SlidingWindow(100), None),
    ]:
        start = time.perf_counter()
        layout = compile_layout(pattern, L, L, tile, tile)
        seconds = time.perf_counter() - start
        assert seconds < 0.5, f"{pattern!r} compiled in {seconds:.3f} s"
        if pattern is documents:
            assert layout.num_listed == expected_tiles
        else:
            assert layout.num_listed <= expected_tiles
        if nnz is not None:
            assert layout.nnz() == nnz


# ---- presets ------------------------------------------------------------------------------------


def test_longformer_by_hand():
    window_and_global = picture(
        """111111111111 111100000000 111110000000 111111000000
           101111100000 100111110000 100011111000 100001111100
           100000111110 100000011111 100000001111 100000000111"""
    )
    np.testing.assert_array_equal(sa.Longformer(4, [0]).to_mask(12, 12), window_and_global)
    dilated = picture(
        """101010000000 010101000000 101010100000 010101010000
           101010101000 010101010100 001010101010 000101010101
           000010101010 000001010101 000000101010 000000010101"""
    )
    np.testing.assert_array_equal(sa.Longformer(4, dilation=2).to_mask(12, 12), dilated)
    assert sa.Longformer(4, [0]).compose(12) == sa.SlidingWindow(2) | sa.Global([0])
    assert sa.Longformer(4, dilation=2).compose(12) == sa.Strided(2, reach=4)


def test_sparse_transformer_by_hand():
    strided = picture(
        """100000000000 110000000000 111000000000 111100000000
           011110000000 001111000000 100111100000 010011110000
           001001111000 100100111100 010010011110 001001001111"""
    )
    np.testing.assert_array_equal(sa.SparseTransformer("strided", 3).to_mask(12, 12), strided)
    fixed = picture(
        """100000000000 110000000000 111000000000 111100000000
           000110000000 000111000000 000111100000 000111110000
           000100011000 000100011100 000100011110 000100011111"""
    )
    np.testing.assert_array_equal(sa.SparseTransformer("fixed", 4).to_mask(12, 12), fixed)
    np.testing.assert_array_equal(
        sa.SparseTransformer("fixed", 4, summary=1, causal=False).to_mask(12, 12),
        sa.Fixed(4, 1).to_mask(12, 12),
    )
    both_sides = sa.SparseTransformer("strided", 3, causal=False).to_mask(12, 12)
    np.testing.assert_array_equal(both_sides, strided | strided.T)


def test_bigbird_by_hand():
    # block 2: window = the block and one on each side, first block global, no random blocks
    window_and_global = picture(
        """111111111111 111111111111 111111000000 111111000000
           111111110000 111111110000 110011111100 110011111100
           110000111111 110000111111 110000001111 110000001111"""
    )
    np.testing.assert_array_equal(sa.BigBird(2, 3, 1, 0).to_mask(12, 12), window_and_global)


@pytest.mark.parametrize("Lq, Lk", [(12, 12), (97, 130), (130, 97)])
def test_bigbird_random_blocks_avoid_window_and_global(Lq, Lk):
    block, window, globals_, random, seed = 4, 3, 2, 3, 21
    mask = sa.BigBird(block, window, globals_, random, seed).to_mask(Lq, Lk)
    window_mask = pair_rule(lambda i, j: abs(j // block - i // block) <= 1, Lq, Lk)
    global_mask = pair_rule(lambda i, j: i < 2 * block or j < 2 * block, Lq, Lk)
    random_mask = block_rule(random, block, seed, Lq, Lk, exclude_first=2, exclude_radius=1)
    np.testing.assert_array_equal(mask, window_mask | global_mask | random_mask)
    rows = slice(2 * block, None)  # the rows of global blocks attend everywhere anyway
    assert not (random_mask[rows] & (window_mask[rows] | global_mask[rows])).any()
    key_blocks = -(-Lk // block)
    for qb in range(2, -(-Lq // block)):
        expected = min(
            random,
            key_blocks - 2 - len([kb for kb in range(key_blocks) if kb >= 2 and abs(kb - qb) <= 1]),
        )
        assert random_mask[qb * block, ::block].sum() == expected


def program(nodes):
    return [(*node[:5], None if node[5] is None else node[5].tolist()) for node in nodes]


def test_presets_show_their_names_and_lower_to_primitives():
    presets = {
        sa.Longformer(512, [0, 3]): "Longformer(window=512, global_tokens=[0, 3], dilation=1)",
        sa.BigBird(64): (
            "BigBird(block=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)"
        ),
        sa.SparseTransformer("fixed", 128, 16): (
            "SparseTransformer(kind='fixed', stride=128, summary=16, causal=True)"
        ),
        sa.SparseTransformer("strided", 64): (
            "SparseTransformer(kind='strided', stride=64, summary=None, causal=True)"
        ),
    }
    primitive_ops = {
        _ops.DENSE,
        _ops.CAUSAL,
        _ops.WINDOW,
        _ops.STRIDED,
        _ops.GLOBAL,
        _ops.RANDOM_BLOCKS,
        _ops.FIXED,
        _ops.BLOCK_WINDOW,
        _ops.UNION,
        _ops.INTERSECT,
    }
    for preset, text in presets.items():
        assert repr(preset) == text
        assert {node[0] for node in preset._lower(1000)} <= primitive_ops
        assert program(preset._lower(1000)) == program(preset.compose(1000)._lower(1000))
        clone = pickle.loads(pickle.dumps(preset))
        assert clone == preset and hash(clone) == hash(preset) and repr(clone) == text
    assert sa.BigBird(64) != sa.BigBird(64, seed=1)
    # global blocks beyond the sequence are dropped, not an error
    assert sa.BigBird(8, 3, 4, 0).to_mask(20, 20).all()


# ---- attention through the kernel against the float64 oracle -----------------------------------

ATTENTION_PATTERNS = [
    sa.Random(5, 3),
    sa.Random(3, 8) & sa.Causal(),
    sa.RandomBlocks(2, 16, 1, exclude_first=1, exclude_radius=1),
    sa.Fixed(16, 3),
    sa.Fixed(16, 3) & sa.Causal(),
    sa.Documents([30, 0, 50, 20]),
    sa.Documents([40, 27, 33]) & sa.Causal() | sa.Random(2, 5),
    sa.Documents([64, 17, 50]) & sa.SlidingWindow(9),
    sa.Longformer(10, [0, 50]),
    sa.Longformer(6, [3], dilation=3),
    sa.BigBird(16, 3, 1, 2, 7),
    sa.SparseTransformer("strided", 8),
    sa.SparseTransformer("fixed", 16, 4),
]
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-10}


def relative_error(out, ref):
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS, ids=repr)
def test_attention_matches_the_oracle(pattern, dtype):
    rng = np.random.default_rng([ATTENTION_PATTERNS.index(pattern), np.dtype(dtype).itemsize])
    for Lq, Lk, D, Dv in [(97, 113, 24, 17), (129, 129, 33, 8)]:
        q = rng.standard_normal((2, Lq, D)).astype(dtype)
        k = rng.standard_normal((2, Lk, D)).astype(dtype)
        v = rng.standard_normal((2, Lk, Dv)).astype(dtype)
        out = sa.attention(q, k, v, pattern)
        assert out.dtype == dtype
        error = relative_error(out, reference.attention(q, k, v, pattern))
        assert error <= TOLERANCE[dtype], error


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_attention_with_one_pattern_per_head(dtype):
    rng = np.random.default_rng([17, np.dtype(dtype).itemsize])
    heads = [
        sa.Random(4, 1),
        sa.RandomBlocks(1, 8, 2),
        sa.Fixed(8, 2) & sa.Causal(),
        sa.Documents([50, 47]),
        sa.BigBird(8, 3, 1, 1),
        sa.SparseTransformer("strided", 5),
    ]
    q = rng.standard_normal((2, 6, 97, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, 97, 16)).astype(dtype)  # grouped-query: 2 heads per kv head
    v = rng.standard_normal((2, 3, 97, 16)).astype(dtype)
    out = sa.attention(q, k, v, heads)
    error = relative_error(out, reference.attention(q, k, v, heads))
    assert error <= TOLERANCE[dtype], error


def test_rows_past_the_last_document_give_zeros():
    rng = np.random.default_rng(18)
    q, k, v = (rng.standard_normal((20, 8)) for _ in range(3))
    out, lse = sa.attention(q, k, v, sa.Documents([5, 10]), return_lse=True)
    assert (out[15:] == 0).all() and np.isneginf(lse[15:]).all()
    assert np.isfinite(lse[:15]).all()


# ---- value semantics, lowering and argument errors ---------------------------------------------

NEW_PATTERNS = [
    sa.Random(3, 2**62),
    sa.RandomBlocks(2, 16, 5),
    sa.RandomBlocks(2, 16, 5, exclude_first=1, exclude_radius=0),
    sa.Fixed(8, 2),
    sa.Documents([3, 0, 5]),
    sa.Documents(np.arange(20)),
]


@pytest.mark.parametrize("pattern", NEW_PATTERNS, ids=repr)
def test_value_semantics(pattern):
    for clone in (pickle.loads(pickle.dumps(pattern)), copy.copy(pattern), copy.deepcopy(pattern)):
        assert clone == pattern and hash(clone) == hash(pattern)
    with pytest.raises(AttributeError):
        pattern.seed = 1
    assert pattern != sa.Dense()


def test_reprs_and_equality():
    assert repr(sa.Random(3, 7)) == "Random(per_row=3, seed=7)"
    assert repr(sa.RandomBlocks(2, 64)) == "RandomBlocks(per_block_row=2, block=64, seed=0)"
    assert (
        repr(sa.RandomBlocks(2, 64, 1, 2, 1))
        == "RandomBlocks(per_block_row=2, block=64, seed=1, exclude_first=2, exclude_radius=1)"
    )
    assert repr(sa.Fixed(128, 8)) == "Fixed(block=128, summary=8)"
    assert repr(sa.Documents([3, 4])) == "Documents(lengths=[3, 4])"
    assert repr(sa.Documents([2] * 1000)) == "Documents(lengths=<1000 documents, 2000 positions>)"
    assert sa.Documents(np.array([3, 4], np.int16)) == sa.Documents([3, 4])
    assert sa.Documents([3, 4]) != sa.Documents([4, 3])
    assert sa.Random(3, 1) != sa.Random(3, 2) and sa.Random(3, 1) != sa.Random(4, 1)
    assert sa.Longformer(4, [3, 0, 3]) == sa.Longformer(4, (0, 3))


def test_lowering_of_each_new_primitive():
    assert sa.Random(3, 9)._lower(5, 7) == [(_ops.RANDOM, 3, 9, 7, 0, None)]
    assert sa.RandomBlocks(2, 4, 9)._lower(5, 9) == [(_ops.RANDOM_BLOCKS, 2, 4, 9, 3, None)]
    (node,) = sa.RandomBlocks(2, 4, 9, exclude_first=1)._lower(5, 9)
    assert node[:5] == (_ops.RANDOM_BLOCKS, 2, 4, 9, 3) and node[5].tolist() == [1, -1]
    assert sa.Fixed(8, 2)._lower(5) == [(_ops.FIXED, 8, 2, 0, 0, None)]
    (node,) = sa.Documents([3, 0, 5])._lower(5)
    assert node[:5] == (_ops.DOCUMENTS, 0, 0, 0, 0)
    assert node[5].dtype == np.int64 and node[5].tolist() == [3, 3, 8]


ERRORS = [
    (lambda: sa.Random(65), ValueError, "per_row.*64"),
    (lambda: sa.Random(-1), ValueError, "per_row"),
    (lambda: sa.Random(2.0), TypeError, "per_row"),
    (lambda: sa.Random(3, -1), ValueError, "seed"),
    (lambda: sa.Random(3, 2**63), ValueError, "seed"),
    (lambda: sa.RandomBlocks(2, 0), ValueError, "block"),
    (lambda: sa.RandomBlocks(65, 4), ValueError, "per_block_row"),
    (lambda: sa.RandomBlocks(2, 4, exclude_first=-1), ValueError, "exclude_first"),
    (lambda: sa.RandomBlocks(2, 4, exclude_radius=-1), ValueError, "exclude_radius"),
    (lambda: sa.Fixed(0, 0), ValueError, "block"),
    (lambda: sa.Fixed(4, 5), ValueError, "summary"),
    (lambda: sa.Fixed(4, -1), ValueError, "summary"),
    (lambda: sa.Documents([[1, 2]]), ValueError, "lengths"),
    (lambda: sa.Documents([1.5]), TypeError, "lengths"),
    (lambda: sa.Documents([True]), TypeError, "lengths"),
    (lambda: sa.Documents([3, -1]), ValueError, "lengths"),
    (lambda: sa.Documents([2**62, 2**62]), ValueError, "lengths"),
    (lambda: sa.Longformer(3), ValueError, "window.*even"),
    (lambda: sa.Longformer(4, [-1]), ValueError, "global_tokens"),
    (lambda: sa.Longformer(4, dilation=0), ValueError, "dilation"),
    (lambda: sa.Longformer(4, [9]).to_mask(5), ValueError, "tokens"),
    (lambda: sa.BigBird(0), ValueError, "block"),
    (lambda: sa.BigBird(64, window_blocks=2), ValueError, "window_blocks.*odd"),
    (lambda: sa.BigBird(64, random_blocks=65), ValueError, "random_blocks"),
    (lambda: sa.BigBird(64, global_blocks=-1), ValueError, "global_blocks"),
    (lambda: sa.SparseTransformer("dense", 4), ValueError, "kind"),
    (lambda: sa.SparseTransformer("strided", 4, summary=2), ValueError, "summary"),
    (lambda: sa.SparseTransformer("fixed", 4, summary=5), ValueError, "summary"),
    (lambda: sa.SparseTransformer("fixed", 0), ValueError, "stride"),
    (lambda: sa.SparseTransformer("fixed", 4, causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("call, error, message", ERRORS)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "node, data",
    [
        ((_ops.RANDOM, 65, 0, 100, 0), None),
        ((_ops.RANDOM, 2, -1, 100, 0), None),
        ((_ops.RANDOM_BLOCKS, 2, 0, 0, 4), None),
        ((_ops.RANDOM_BLOCKS, 2, 4, 0, 4), np.array([1], np.int64)),
        ((_ops.RANDOM_BLOCKS, 2, 4, 0, 4), np.array([1, -2], np.int64)),
        ((_ops.FIXED, 4, 5, 0, 0), None),
        ((_ops.DOCUMENTS, 0, 0, 0, 0), np.array([3, 2], np.int64)),
        ((_ops.DOCUMENTS, 0, 0, 0, 0), np.array([-1], np.int64)),
        ((_ops.BLOCK_WINDOW, 0, 1, 1, 0), None),
    ],
)
def test_the_core_refuses_malformed_nodes(node, data):
    table = np.array([node], dtype=np.int64)
    with pytest.raises(ValueError, match="pattern program"):
        _core.compile_layout(table, [data], 8, 8, 4, 4, 0, 0)
