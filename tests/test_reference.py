"""The float64 oracle against a naive loop over query rows written here: patterns, mask, bias,
key lengths, grouped-query heads, broadcasting of leading dimensions, and rows with no key."""

import math

import numpy as np
import pytest
from sparse_attn import reference
from sparse_attn.patterns import (
    BlockSparse,
    Causal,
    Dense,
    Global,
    SlidingWindow,
    Strided,
    as_head_patterns,
)


def naive_head(q, k, v, allowed, bias, scale):
    """One head, one query row at a time: softmax over the allowed keys with finite scores."""
    Lq, Dv = q.shape[0], v.shape[1]
    out, lse = np.zeros((Lq, Dv)), np.full(Lq, -math.inf)
    for i in range(Lq):
        keys = [j for j in range(k.shape[0]) if allowed[i, j]]
        scores = {j: scale * float(np.dot(q[i], k[j])) + bias[i, j] for j in keys}
        keys = [j for j in keys if scores[j] != -math.inf]
        if not keys:
            continue
        top = max(scores[j] for j in keys)
        weights = {j: math.exp(scores[j] - top) for j in keys}
        total = sum(weights.values())
        out[i] = sum(weights[j] * v[j] for j in keys) / total
        lse[i] = top + math.log(total)
    return out, lse


def naive_attention(q, k, v, pattern=None, mask=None, bias=None, scale=None, key_lengths=None):
    """Batched attention from ``naive_head``; q, k, v have a head axis and any leading dims."""
    (Hq, Lq, D), (Hkv, Lk, _), Dv = q.shape[-3:], k.shape[-3:], v.shape[-1]
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    scores_shape = (*batch, Hq, Lq, Lk)
    q = np.broadcast_to(q, (*batch, Hq, Lq, D))
    k = np.broadcast_to(k, (*batch, Hkv, Lk, D))
    v = np.broadcast_to(v, (*batch, Hkv, Lk, Dv))
    mask = np.broadcast_to(True if mask is None else mask, scores_shape)
    bias = np.broadcast_to(0.0 if bias is None else bias, scores_shape)
    lengths = np.broadcast_to(Lk if key_lengths is None else key_lengths, batch)
    scale = 1 / math.sqrt(D) if scale is None else scale
    heads = as_head_patterns(pattern, Hq)

    out, lse = np.zeros((*batch, Hq, Lq, Dv)), np.zeros((*batch, Hq, Lq))
    for index in np.ndindex(*batch):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            allowed = heads[h].to_mask(Lq, Lk) & mask[index][h]
            allowed[:, lengths[index] :] = False
            out[index][h], lse[index][h] = naive_head(
                q[index][h], k[index][kv], v[index][kv], allowed, bias[index][h], scale
            )
    return out, lse


def random_inputs(rng, batch, Hq, Hkv, Lq, Lk, D, Dv):
    q = rng.standard_normal((*batch, Hq, Lq, D))
    k = rng.standard_normal((*batch, Hkv, Lk, D))
    v = rng.standard_normal((*batch, Hkv, Lk, Dv))
    return q, k, v


def assert_matches(got, expected):
    out, lse = got
    expected_out, expected_lse = expected
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], rtol=1e-12, atol=1e-12)


PATTERNS = [
    None,
    Causal(),
    Causal(offset=-4),
    SlidingWindow(2, 5) | Global([3]),
    Strided(3, reach=9) & Causal(offset=4),
    [Causal(), SlidingWindow(1), Dense(), Strided(2) | Global([0], rows=False)],
    BlockSparse(np.random.default_rng(0).random((4, 3, 5)) < 0.5, 3),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("Lq, Lk", [(1, 6), (4, 1), (7, 13), (9, 5)])
def test_matches_naive_loop(pattern, Lq, Lk):
    rng = np.random.default_rng([PATTERNS.index(pattern), Lq, Lk])
    q, k, v = random_inputs(rng, (2,), Hq=4, Hkv=2, Lq=Lq, Lk=Lk, D=5, Dv=3)
    mask = rng.random((2, 1, Lq, Lk)) < 0.8
    bias = rng.standard_normal((4, Lq, Lk))
    got = reference.attention(q, k, v, pattern, mask=mask, bias=bias, return_lse=True)
    assert got[0].dtype == np.float64 and got[0].shape == (2, 4, Lq, 3)
    assert got[1].shape == (2, 4, Lq)
    assert_matches(got, naive_attention(q, k, v, pattern, mask=mask, bias=bias))
    assert_matches(
        reference.attention(q, k, v, pattern, return_lse=True), naive_attention(q, k, v, pattern)
    )


def test_grouped_query_heads_equal_repeated_key_value_heads():
    rng = np.random.default_rng(1)
    q, k, v = random_inputs(rng, (3,), Hq=6, Hkv=2, Lq=11, Lk=17, D=8, Dv=5)
    pattern = SlidingWindow(4) | Global([0])
    grouped = reference.attention(q, k, v, pattern)
    repeated = reference.attention(q, np.repeat(k, 3, axis=-3), np.repeat(v, 3, axis=-3), pattern)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-13, atol=1e-13)
    # query head h reads key/value head h // 3
    alone = reference.attention(q[:, 4:5], k[:, 1:2], v[:, 1:2], pattern)
    np.testing.assert_allclose(grouped[:, 4:5], alone, rtol=1e-13, atol=1e-13)


def test_leading_dimensions_broadcast():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 1, 2, 7, 4))
    k = rng.standard_normal((3, 2, 9, 4))
    v = rng.standard_normal((1, 2, 9, 6))
    key_lengths = np.array([9, 4, 0])  # over the batch (2, 3), broadcast along the first axis
    out, lse = reference.attention(q, k, v, Causal(2), key_lengths=key_lengths, return_lse=True)
    assert out.shape == (2, 3, 2, 7, 6) and lse.shape == (2, 3, 2, 7)
    expanded = (
        np.broadcast_to(q, (2, 3, 2, 7, 4)),
        np.broadcast_to(k, (2, 3, 2, 9, 4)),
        np.broadcast_to(v, (2, 3, 2, 9, 6)),
    )
    explicit = reference.attention(
        *expanded, Causal(2), key_lengths=np.broadcast_to(key_lengths, (2, 3)), return_lse=True
    )
    assert_matches((out, lse), explicit)
    assert_matches((out, lse), naive_attention(q, k, v, Causal(2), key_lengths=key_lengths))


def test_two_and_three_dimensional_inputs():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((5, 4)), rng.standard_normal((8, 4)), rng.standard_normal((8, 3))
    out, lse = reference.attention(q, k, v, Causal(3), return_lse=True)
    assert out.shape == (5, 3) and lse.shape == (5,)
    assert_matches((out[None], lse[None]), naive_attention(q[None], k[None], v[None], Causal(3)))

    q3, k3, v3 = random_inputs(rng, (), Hq=2, Hkv=1, Lq=5, Lk=8, D=4, Dv=3)
    out3, lse3 = reference.attention(q3, k3, v3, Causal(3), return_lse=True)
    assert out3.shape == (2, 5, 3) and lse3.shape == (2, 5)
    assert_matches((out3, lse3), naive_attention(q3, k3, v3, Causal(3)))

    out_batched = reference.attention(q, k[None, None], v[None, None])
    assert out_batched.shape == (1, 1, 5, 3)  # k and v bring a leading dimension


def test_rows_with_no_allowed_key_give_zero_and_minus_inf():
    rng = np.random.default_rng(4)
    q, k, v = random_inputs(rng, (2,), Hq=2, Hkv=2, Lq=6, Lk=6, D=3, Dv=2)
    with np.errstate(all="raise"):  # no invalid operation on the way either
        out, lse = reference.attention(q, k, v, Causal(-3), return_lse=True)
        weights = reference.softmax_weights(q, k, Causal(-3))
    assert np.all(out[..., :3, :] == 0) and np.all(np.isneginf(lse[..., :3]))
    assert np.all(weights[..., :3, :] == 0)
    assert np.all(np.isfinite(lse[..., 3:])) and not np.isnan(out).any()


def test_minus_inf_bias():
    rng = np.random.default_rng(5)
    q, k, v = random_inputs(rng, (), Hq=2, Hkv=1, Lq=5, Lk=7, D=4, Dv=3)
    bias = np.zeros((5, 7))
    bias[1] = -np.inf  # a whole row
    bias[2, ::2] = -np.inf  # some keys
    with np.errstate(all="raise"):
        out, lse = reference.attention(q, k, v, bias=bias, return_lse=True)
    assert np.all(out[:, 1] == 0) and np.all(np.isneginf(lse[:, 1]))
    mask = np.ones((5, 7), bool)
    mask[2, ::2] = False
    masked_out, masked_lse = reference.attention(q, k, v, mask=mask, return_lse=True)
    np.testing.assert_allclose(out[:, 2], masked_out[:, 2], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse[:, 2], masked_lse[:, 2], rtol=1e-13)
    assert_matches((out, lse), naive_attention(q, k, v, bias=bias))


def test_key_lengths_mask_padding_keys():
    rng = np.random.default_rng(6)
    q, k, v = random_inputs(rng, (4,), Hq=3, Hkv=3, Lq=5, Lk=9, D=4, Dv=2)
    key_lengths = np.array([9, 3, 0, 20])
    out, lse = reference.attention(
        q, k, v, SlidingWindow(3), key_lengths=key_lengths, return_lse=True
    )
    for b, length in enumerate(key_lengths):
        keep = min(length, 9)
        alone = reference.attention(
            q[b], k[b, :, :keep], v[b, :, :keep], SlidingWindow(3), return_lse=True
        )
        assert_matches((out[b], lse[b]), alone)
    assert np.all(out[2] == 0) and np.all(np.isneginf(lse[2]))
    assert_matches((out, lse), naive_attention(q, k, v, SlidingWindow(3), key_lengths=key_lengths))


def test_softmax_weights_are_the_normalised_probabilities():
    rng = np.random.default_rng(7)
    q, k, v = random_inputs(rng, (2,), Hq=4, Hkv=2, Lq=7, Lk=11, D=5, Dv=3)
    pattern = Strided(2) & Causal(1)
    bias = rng.standard_normal((7, 11))
    weights = reference.softmax_weights(q, k, pattern, bias=bias)
    assert weights.shape == (2, 4, 7, 11)
    assert np.all(weights >= 0) and np.all(weights[..., ~pattern.to_mask(7, 11)] == 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-13)
    np.testing.assert_allclose(
        weights @ np.repeat(v, 2, axis=-3),
        reference.attention(q, k, v, pattern, bias=bias),
        rtol=1e-13,
        atol=1e-13,
    )


def test_scale_and_numerical_stability():
    rng = np.random.default_rng(8)
    q, k, v = random_inputs(rng, (), Hq=1, Hkv=1, Lq=6, Lk=10, D=9, Dv=4)
    np.testing.assert_array_equal(
        reference.attention(q, k, v), reference.attention(q, k, v, scale=1 / 3)
    )
    assert not np.allclose(reference.attention(q, k, v), reference.attention(q, k, v, scale=1.0))
    # scores near 1e4 overflow a naive exp; shifted by the row maximum they do not
    out, lse = reference.attention(1e3 * q, k, v, scale=1.0, return_lse=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert_matches((out, lse), naive_attention(1e3 * q, k, v, scale=1.0))


def test_computes_in_float64():
    rng = np.random.default_rng(13)
    q, k, v = random_inputs(rng, (), Hq=2, Hkv=2, Lq=3, Lk=4, D=2, Dv=2)
    single = [x.astype(np.float32) for x in (q, k, v)]
    out = reference.attention(*single, Causal())
    assert out.dtype == np.float64
    np.testing.assert_array_equal(
        out, reference.attention(*(x.astype(np.float64) for x in single), Causal())
    )


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    q, k, v = random_inputs(rng, (2,), Hq=2, Hkv=1, Lq=4, Lk=6, D=3, Dv=3)
    mask = rng.random((4, 6)) < 0.5
    bias = rng.standard_normal((4, 6))
    key_lengths = np.array([6, 2])
    arrays = (q, k, v, mask, bias, key_lengths)
    before = [a.copy() for a in arrays]
    reference.attention(q, k, v, Causal(), mask=mask, bias=bias, key_lengths=key_lengths)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_allowed_mask():
    per_head = [Causal(), SlidingWindow(1), Dense()]
    allowed = reference.allowed_mask(per_head, 5, 7, 3)
    assert allowed.shape == (3, 5, 7) and allowed.dtype == bool
    for h, pattern in enumerate(per_head):
        np.testing.assert_array_equal(allowed[h], pattern.to_mask(5, 7))
    np.testing.assert_array_equal(reference.allowed_mask(None, 2, 3, 2), np.ones((2, 2, 3), bool))
    layout = np.random.default_rng(10).random((2, 2, 3)) < 0.5
    np.testing.assert_array_equal(
        reference.allowed_mask(BlockSparse(layout, 4), 5, 9, 2),
        BlockSparse(layout, 4).to_mask(5, 9),
    )
    assert reference.allowed_mask(Causal(), 0, 4, 2).shape == (2, 0, 4)


def test_empty_sequences():
    rng = np.random.default_rng(11)
    q, k, v = random_inputs(rng, (2,), Hq=2, Hkv=2, Lq=3, Lk=0, D=4, Dv=5)
    out, lse = reference.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 3, 5) and np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v = random_inputs(rng, (2,), Hq=2, Hkv=2, Lq=0, Lk=4, D=4, Dv=5)
    assert reference.attention(q, k, v).shape == (2, 2, 0, 5)


ERRORS = [
    ({"q": (2, 4, 3), "k": (3, 5, 3), "v": (3, 5, 2)}, {}, ValueError, "heads"),
    ({"q": (2, 4, 3), "k": (1, 5, 4), "v": (1, 5, 2)}, {}, ValueError, "head dimension"),
    ({"q": (2, 4, 3), "k": (1, 5, 3), "v": (1, 6, 2)}, {}, ValueError, "v"),
    ({"q": (3,), "k": (5, 3), "v": (5, 2)}, {}, ValueError, "q"),
    ({"q": (4, 3), "k": (5, 3), "v": (5, 2)}, {"mask": np.ones((4, 5))}, TypeError, "mask"),
    (
        {"q": (4, 3), "k": (5, 3), "v": (5, 2)},
        {"mask": np.ones((4, 4), bool)},
        ValueError,
        "broadcast",
    ),
    ({"q": (4, 3), "k": (5, 3), "v": (5, 2)}, {"key_lengths": 2.5}, TypeError, "key_lengths"),
    (
        {"q": (2, 4, 3), "k": (1, 5, 3), "v": (1, 5, 2)},
        {"pattern": [Causal()]},
        ValueError,
        "pattern",
    ),
]


@pytest.mark.parametrize("shapes, kwargs, error, message", ERRORS)
def test_errors(shapes, kwargs, error, message):
    rng = np.random.default_rng(12)
    arrays = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    with pytest.raises(error, match=message):
        reference.attention(**arrays, **kwargs)
