"""sa.MultiHeadAttention against the reference composition (projections in float64 around
sparse_attn.reference.attention) and, when PyTorch is installed, torch.nn.MultiheadAttention
loaded with the same weights; seeded initialisation, save/load, load_params, bad input.

Tolerances: relative Frobenius error <= 2e-5 (float32) / 1e-10 (float64) against the reference,
<= 1e-5 against PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sparse_attn as sa
from sparse_attn import reference

DTYPES = (np.float32, np.float64)
REL_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
TORCH_TOL = 1e-5


def seeded(name: str, seed: int = 0) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)), seed])


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, dtype=np.float64)
    diff = np.linalg.norm(np.asarray(actual, dtype=np.float64) - expected)
    return diff / max(np.linalg.norm(expected), 1e-300)


def reference_layer(params, num_heads, kv_heads, patterns, x, context=None, value=None, **kw):
    """The layer in float64: y = merge(attention(x Wq + bq, c Wk + bk, v Wv + bv)) Wo + bo."""
    kw.pop("threads", None)  # how the library runs, not what it computes
    p = {name: np.asarray(a, dtype=np.float64) for name, a in params.items()}
    x = np.asarray(x, dtype=np.float64)
    context = x if context is None else np.asarray(context, dtype=np.float64)
    value = context if value is None else np.asarray(value, dtype=np.float64)

    def project(a, name, heads):
        out = a @ p["w" + name] + p.get("b" + name, 0.0)
        return np.swapaxes(out.reshape(*out.shape[:-1], heads, -1), -2, -3)

    q, k, v = (
        project(x, "q", num_heads),
        project(context, "k", kv_heads),
        project(value, "v", kv_heads),
    )
    result = reference.attention(q, k, v, patterns, **kw)
    heads, lse = result if kw.get("return_lse") else (result, None)
    merged = np.swapaxes(heads, -2, -3)
    y = merged.reshape(*merged.shape[:-2], -1) @ p["wo"] + p.get("bo", 0.0)
    return (y, lse) if lse is not None else y


def check_layer(layer, patterns, x, context=None, value=None, **kw):
    """Run the layer and compare it with reference_layer; returns what the layer returned."""
    y = layer(x, context, value=value, **kw)
    expected = reference_layer(
        layer.params, layer.num_heads, layer.kv_heads, patterns, x, context, value, **kw
    )
    if kw.get("return_lse"):
        (y, lse), (expected, expected_lse) = y, expected
        assert lse.shape == expected_lse.shape and lse.dtype == layer.dtype
        finite = np.isfinite(expected_lse)
        assert np.array_equal(np.isfinite(lse), finite)
        assert np.max(np.abs(lse[finite] - expected_lse[finite]), initial=0.0) < 1e-4
    assert y.shape == expected.shape and y.dtype == layer.dtype
    assert not np.isnan(y).any()
    assert rel_err(y, expected) <= REL_TOL[layer.dtype]
    return (y, lse) if kw.get("return_lse") else y


def random_inputs(rng, dtype, *shapes):
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


# ---- against the reference composition ----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["2d", "batch", "two-batch-dims"])
@pytest.mark.parametrize("L", [1, 17, 65])
def test_dense_self_attention(dtype, lead, L):
    rng = seeded("dense", L + len(lead))
    layer = sa.MultiHeadAttention(24, 3, dtype=dtype, seed=L)
    with_random_biases(layer, rng)  # non-zero biases, so that they are checked too
    (x,) = random_inputs(rng, dtype, (*lead, L, 24))
    y = check_layer(layer, None, x)
    assert y.shape == (*lead, L, 24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "pattern",
    [sa.SlidingWindow(3), sa.SlidingWindow(2, 0), sa.Causal(), sa.Strided(4) | sa.Global([0, 5])],
    ids=repr,
)
def test_one_pattern_for_all_heads(dtype, pattern):
    rng = seeded("one pattern")
    layer = sa.MultiHeadAttention(20, 4, patterns=pattern, dtype=dtype, seed=1)
    (x,) = random_inputs(rng, dtype, (2, 67, 20))
    check_layer(layer, pattern, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_patterns(dtype):
    rng = seeded("per head")
    patterns = [sa.Causal(), sa.SlidingWindow(5), sa.Strided(3, 30), sa.Global([2]) | sa.Causal()]
    layer = sa.MultiHeadAttention(32, 4, patterns=patterns, dtype=dtype, seed=2)
    (x,) = random_inputs(rng, dtype, (3, 70, 32))
    y = check_layer(layer, patterns, x)
    dense = sa.MultiHeadAttention(32, 4, dtype=dtype, seed=2)(x)
    assert rel_err(y, dense) > 1e-3  # the patterns do change the result


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_block_sparse_pattern(dtype):
    """One Pattern holding a layout per head is split over the heads."""
    rng = seeded("block per head")
    layout = rng.random((2, 5, 5)) < 0.5
    layout[:, np.arange(5), np.arange(5)] = True
    pattern = sa.BlockSparse(layout, 16)
    layer = sa.MultiHeadAttention(16, 2, patterns=pattern, dtype=dtype)
    (x,) = random_inputs(rng, dtype, (75, 16))
    check_layer(layer, pattern, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_grouped_query_attention(dtype, kv_heads):
    rng = seeded("gqa", kv_heads)
    pattern = sa.SlidingWindow(7, 2)
    layer = sa.MultiHeadAttention(36, 6, kv_heads=kv_heads, patterns=pattern, dtype=dtype)
    assert layer.params["wk"].shape == (36, kv_heads * 6)
    assert layer.params["wv"].shape == (36, kv_heads * 6)
    (x,) = random_inputs(rng, dtype, (2, 41, 36))
    check_layer(layer, pattern, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cross_attention(dtype, bias):
    rng = seeded("cross", bias)
    layer = sa.MultiHeadAttention(16, 4, kv_heads=2, kdim=10, vdim=7, bias=bias, dtype=dtype)
    assert set(layer.params) == (
        {"wq", "wk", "wv", "wo"} | ({"bq", "bk", "bv", "bo"} if bias else set())
    )
    x, context, value = random_inputs(rng, dtype, (2, 13, 16), (2, 70, 10), (2, 70, 7))
    y = check_layer(layer, None, x, context, value)
    assert y.shape == (2, 13, 16)

    same_dims = sa.MultiHeadAttention(16, 4, kdim=9, vdim=9, bias=bias, dtype=dtype)
    (context,) = random_inputs(rng, dtype, (2, 70, 9))
    check_layer(same_dims, None, x, context)  # values come from the context too
    pattern = sa.Causal(offset=70 - 13)  # bottom-right aligned, as in decoding with a KV cache
    windowed = sa.MultiHeadAttention(16, 4, kdim=9, vdim=9, patterns=pattern, dtype=dtype)
    check_layer(windowed, pattern, x, context)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dimensions_broadcast(dtype):
    rng = seeded("broadcast")
    layer = sa.MultiHeadAttention(12, 2, dtype=dtype)
    x, context = random_inputs(rng, dtype, (2, 1, 9, 12), (3, 20, 12))
    y = check_layer(layer, None, x, context)
    assert y.shape == (2, 3, 9, 12)
    x2d, context = random_inputs(rng, dtype, (9, 12), (4, 20, 12))  # one query set, 4 contexts
    assert check_layer(layer, None, x2d, context).shape == (4, 9, 12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_arguments_pass_through(dtype):
    rng = seeded("kwargs")
    pattern = sa.SlidingWindow(6)
    layer = sa.MultiHeadAttention(20, 4, kv_heads=2, patterns=pattern, dtype=dtype)
    x, context = random_inputs(rng, dtype, (3, 11, 20), (3, 30, 20))
    mask = rng.random((3, 1, 11, 30)) < 0.7
    bias = rng.standard_normal((4, 11, 30))
    lengths = np.array([30, 17, 0])  # the last batch entry has no key: its attention is 0
    kw = {
        "mask": mask,
        "bias": bias,
        "key_lengths": lengths,
        "scale": 0.3,
        "threads": 2,
        "return_lse": True,
    }
    y, lse = check_layer(layer, pattern, x, context, **kw)
    assert np.isneginf(lse[2]).all()
    # with no key, each head's output is 0 and the layer gives the output bias (zero here) only
    np.testing.assert_array_equal(y[2], np.broadcast_to(layer.params["bo"], y[2].shape))
    check_layer(layer, pattern, x, mask=rng.random((11, 11)) < 0.5)


def test_inputs_are_converted_to_the_layer_dtype():
    rng = seeded("convert")
    layer = sa.MultiHeadAttention(8, 2, dtype=np.float32)
    x = rng.integers(-3, 4, (5, 8))
    y = layer(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, layer(x.astype(np.float32)))
    assert layer(x.astype(np.float64)).dtype == np.float32


def test_inputs_are_not_modified():
    rng = seeded("unmodified")
    layer = sa.MultiHeadAttention(8, 2, kdim=6, vdim=6, dtype=np.float64)
    x, context = random_inputs(rng, np.float64, (5, 8), (7, 6))
    before = x.copy(), context.copy(), {n: a.copy() for n, a in layer.params.items()}
    layer(x, context)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(context, before[1])
    for name, a in layer.params.items():
        np.testing.assert_array_equal(a, before[2][name])


# ---- initialisation -----------------------------------------------------------------------------


def test_initialisation_is_seeded_glorot_uniform():
    layer = sa.MultiHeadAttention(64, 8, kv_heads=2, kdim=48, seed=7, dtype=np.float64)
    again = sa.MultiHeadAttention(64, 8, kv_heads=2, kdim=48, seed=7, dtype=np.float64)
    other = sa.MultiHeadAttention(64, 8, kv_heads=2, kdim=48, seed=8, dtype=np.float64)
    single = sa.MultiHeadAttention(64, 8, kv_heads=2, kdim=48, seed=7, dtype=np.float32)
    expected_shapes = {
        "wq": (64, 64),
        "wk": (48, 16),
        "wv": (64, 16),
        "wo": (64, 64),
        "bq": (64,),
        "bk": (16,),
        "bv": (16,),
        "bo": (64,),
    }
    assert {n: a.shape for n, a in layer.params.items()} == expected_shapes
    assert layer.param_shapes() == expected_shapes
    for name, a in layer.params.items():
        np.testing.assert_array_equal(a, again.params[name])
        assert single.params[name].dtype == np.float32
        np.testing.assert_array_equal(single.params[name], a.astype(np.float32))
        if name.startswith("b"):
            assert not a.any()
            continue
        assert not np.array_equal(a, other.params[name])
        bound = math.sqrt(6.0 / sum(a.shape))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound  # U(-a, a) has std a/sqrt(3)
    assert not np.array_equal(layer.params["wq"], layer.params["wo"])


# ---- weights in and out -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"embed_dim": 16, "num_heads": 4},
        {
            "embed_dim": 18,
            "num_heads": 6,
            "kv_heads": 2,
            "kdim": 5,
            "vdim": 7,
            "bias": False,
            "dtype": np.float64,
        },
    ],
    ids=["default", "gqa-kdim-vdim-nobias-float64"],
)
def test_save_load_round_trip(tmp_path, config):
    rng = seeded("save")
    layer = sa.MultiHeadAttention(**config, seed=3)
    for a in layer.params.values():
        a[...] = rng.standard_normal(a.shape)  # not the seeded values: the file must carry them
    path = tmp_path / "layer.npz"
    layer.save(path)
    pattern = sa.SlidingWindow(2)
    loaded = sa.MultiHeadAttention.load(path, patterns=pattern)
    assert repr(loaded) == repr(layer)[:-1] + f", patterns={pattern!r})"
    assert list(loaded.params) == list(layer.params)
    for name, a in layer.params.items():
        assert loaded.params[name].dtype == a.dtype
        np.testing.assert_array_equal(loaded.params[name], a)
    x, context, value = random_inputs(
        rng, layer.dtype, (6, layer.embed_dim), (9, layer.kdim), (9, layer.vdim)
    )
    np.testing.assert_array_equal(
        sa.MultiHeadAttention.load(path)(x, context, value=value), layer(x, context, value=value)
    )
    check_layer(loaded, pattern, x, context, value)

    layer.save(str(tmp_path / "no_suffix"))  # np.savez appends .npz
    assert repr(sa.MultiHeadAttention.load(str(tmp_path / "no_suffix.npz"))) == repr(layer)


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, wq=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="config"):
        sa.MultiHeadAttention.load(path)


def test_load_params():
    rng = seeded("load_params")
    layer = sa.MultiHeadAttention(8, 2, kv_heads=1, dtype=np.float32)
    params = {name: rng.standard_normal(shape) for name, shape in layer.param_shapes().items()}
    layer.load_params(params)
    for name, a in layer.params.items():
        assert a.dtype == np.float32 and a.flags.c_contiguous
        np.testing.assert_array_equal(a, params[name].astype(np.float32))
    params["wq"][...] = 0.0  # the layer holds copies
    assert layer.params["wq"].any()


def test_load_params_checks_everything_before_changing_anything():
    layer = sa.MultiHeadAttention(8, 2, kv_heads=1)
    before = {name: a.copy() for name, a in layer.params.items()}
    good = {name: np.ones(shape) for name, shape in layer.param_shapes().items()}

    with pytest.raises(ValueError, match=r"wk must have shape \(8, 4\), got \(8, 8\)"):
        layer.load_params({**good, "wk": np.ones((8, 8))})
    with pytest.raises(ValueError, match=r"bo must have shape \(8,\), got \(1, 8\)"):
        layer.load_params({**good, "bo": np.ones((1, 8))})
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['bv'\]"):
        layer.load_params({name: a for name, a in good.items() if name != "bv"})
    with pytest.raises(ValueError, match=r"unknown parameter.*'in_proj_weight'"):
        layer.load_params({**good, "in_proj_weight": np.ones((24, 8))})
    with pytest.raises(TypeError, match="wv must be a float"):
        layer.load_params({**good, "wv": np.ones((8, 4), dtype=bool)})
    with pytest.raises(TypeError, match="mapping"):
        layer.load_params([("wq", np.ones((8, 8)))])
    no_bias = sa.MultiHeadAttention(8, 2, kv_heads=1, bias=False)
    with pytest.raises(ValueError, match="bias=False"):
        no_bias.load_params(good)
    for name, a in layer.params.items():
        np.testing.assert_array_equal(a, before[name])


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"embed_dim": 10, "num_heads": 4},
            ValueError,
            r"embed_dim \(10\) must be divisible by num_heads \(4\)",
        ),
        (
            {"embed_dim": 12, "num_heads": 6, "kv_heads": 4},
            ValueError,
            r"kv_heads \(4\) must divide num_heads \(6\)",
        ),
        ({"embed_dim": 0, "num_heads": 1}, ValueError, "embed_dim must be >= 1"),
        ({"embed_dim": 8, "num_heads": 0}, ValueError, "num_heads must be >= 1"),
        ({"embed_dim": 8, "num_heads": 2, "kv_heads": 0}, ValueError, "kv_heads must be >= 1"),
        ({"embed_dim": 8.0, "num_heads": 2}, TypeError, "embed_dim must be an int"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 0}, ValueError, "kdim must be >= 1"),
        (
            {"embed_dim": 8, "num_heads": 2, "dtype": np.float16},
            TypeError,
            "dtype must be float32 or float64",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "dtype": np.int32},
            TypeError,
            "dtype must be float32 or float64",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "dtype": "nonsense"},
            TypeError,
            "dtype must be float32 or float64",
        ),
        (
            {"embed_dim": 8, "num_heads": 2, "dtype": None},
            TypeError,
            "dtype must be float32 or float64",
        ),
        ({"embed_dim": 8, "num_heads": 2, "bias": "yes"}, TypeError, "bias must be a bool"),
        ({"embed_dim": 8, "num_heads": 2, "seed": -1}, ValueError, "seed must be >= 0"),
        (
            {"embed_dim": 8, "num_heads": 2, "patterns": [sa.Causal()] * 3},
            ValueError,
            "patterns: .*3 patterns.*2 query heads",
        ),
        ({"embed_dim": 8, "num_heads": 2, "patterns": "causal"}, TypeError, "patterns: "),
        (
            {
                "embed_dim": 8,
                "num_heads": 2,
                "patterns": sa.BlockSparse(np.ones((3, 1, 1), dtype=bool), 4),
            },
            ValueError,
            "patterns: .*3 heads",
        ),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        sa.MultiHeadAttention(**kwargs)


def test_bad_call():
    layer = sa.MultiHeadAttention(8, 2)
    cross = sa.MultiHeadAttention(8, 2, kdim=6, vdim=5)
    x = np.ones((3, 7, 8), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"x must have shape \(\.\.\., length, embed_dim=8\), got \(3, 7, 9\)"
    ):
        layer(np.ones((3, 7, 9)))
    with pytest.raises(ValueError, match=r"x must have shape .*got \(8,\)"):
        layer(np.ones(8))
    with pytest.raises(TypeError, match="x must be a float"):
        layer(np.ones((7, 8), dtype=bool))
    with pytest.raises(TypeError, match="x must be a float"):
        layer(np.ones((7, 8), dtype=complex))
    with pytest.raises(
        ValueError, match=r"context must have shape \(\.\.\., length, kdim=6\), got \(3, 4, 8\)"
    ):
        cross(x, np.ones((3, 4, 8)), value=np.ones((3, 4, 5)))
    with pytest.raises(
        ValueError, match=r"value must have shape \(\.\.\., length, vdim=5\), got \(3, 4, 6\)"
    ):
        cross(x, np.ones((3, 4, 6)), value=np.ones((3, 4, 6)))
    with pytest.raises(
        ValueError, match="vdim=5 differs from kdim=6: pass the values' input as value="
    ):
        cross(x, np.ones((3, 4, 6)))
    with pytest.raises(ValueError, match="self-attention reads keys and values from x"):
        cross(x)
    with pytest.raises(ValueError, match="value needs context"):
        layer(x, value=x)
    with pytest.raises(ValueError, match="same length"):
        cross(x, np.ones((3, 4, 6)), value=np.ones((3, 5, 5)))
    with pytest.raises(
        ValueError, match=r"leading dimensions of x \(3, 7, 8\), context \(2, 4, 8\)"
    ):
        layer(x, np.ones((2, 4, 8)))
    with pytest.raises(TypeError, match="out="):
        layer(x, out=np.empty((3, 7, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="pattern="):
        layer(x, pattern=sa.Causal())
    with pytest.raises(TypeError):
        layer(x, not_an_argument=1)  # sa.attention refuses what it does not know
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=np.ones((5, 5), dtype=bool))


# ---- against PyTorch ----------------------------------------------------------------------------


def torch_twin(layer):
    """torch.nn.MultiheadAttention (batch_first) holding the layer's weights, transposed."""
    torch = pytest.importorskip("torch")
    dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[layer.dtype]
    mha = torch.nn.MultiheadAttention(
        layer.embed_dim,
        layer.num_heads,
        bias=layer.bias,
        batch_first=True,
        kdim=layer.kdim,
        vdim=layer.vdim,
        dtype=dtype,
    )
    p = {name: torch.from_numpy(a.copy()) for name, a in layer.params.items()}
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([p["wq"].T, p["wk"].T, p["wv"].T]))
        else:
            mha.q_proj_weight.copy_(p["wq"].T)
            mha.k_proj_weight.copy_(p["wk"].T)
            mha.v_proj_weight.copy_(p["wv"].T)
        mha.out_proj.weight.copy_(p["wo"].T)
        if layer.bias:
            mha.in_proj_bias.copy_(torch.cat([p["bq"], p["bk"], p["bv"]]))
            mha.out_proj.bias.copy_(p["bo"])
    return mha.eval()


def torch_forward(mha, x, context=None, value=None, **kw):
    torch = pytest.importorskip("torch")
    context = x if context is None else context
    value = context if value is None else value
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, context, value)]
    kw = {name: torch.from_numpy(a) for name, a in kw.items()}
    with torch.no_grad():
        out, _ = mha(*tensors, need_weights=False, **kw)
    return out.numpy()


def with_random_biases(layer, rng):
    for name, a in layer.params.items():
        if name.startswith("b"):
            a[...] = rng.standard_normal(a.shape)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_dense(dtype, bias):
    pytest.importorskip("torch")
    rng = seeded("torch dense", bias)
    layer = with_random_biases(sa.MultiHeadAttention(32, 4, bias=bias, dtype=dtype, seed=5), rng)
    (x,) = random_inputs(rng, dtype, (3, 37, 32))
    mha = torch_twin(layer)
    assert rel_err(layer(x), torch_forward(mha, x)) <= TORCH_TOL
    x, context = random_inputs(rng, dtype, (3, 5, 32), (3, 66, 32))
    assert rel_err(layer(x, context), torch_forward(mha, x, context)) <= TORCH_TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_kdim_vdim(dtype):
    pytest.importorskip("torch")
    rng = seeded("torch kdim")
    layer = with_random_biases(sa.MultiHeadAttention(24, 3, kdim=10, vdim=14, dtype=dtype), rng)
    x, context, value = random_inputs(rng, dtype, (2, 9, 24), (2, 21, 10), (2, 21, 14))
    expected = torch_forward(torch_twin(layer), x, context, value)
    assert rel_err(layer(x, context, value=value), expected) <= TORCH_TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "pattern", [sa.SlidingWindow(4), sa.Causal(), sa.Strided(3) | sa.Global([1])], ids=repr
)
def test_matches_torch_with_pattern_as_attn_mask(dtype, pattern):
    """A pattern is torch's boolean attn_mask negated (torch: True = may NOT attend)."""
    pytest.importorskip("torch")
    rng = seeded("torch mask")
    layer = with_random_biases(sa.MultiHeadAttention(16, 2, patterns=pattern, dtype=dtype), rng)
    (x,) = random_inputs(rng, dtype, (2, 45, 16))
    attn_mask = ~pattern.to_mask(45, 45)
    expected = torch_forward(torch_twin(layer), x, attn_mask=attn_mask)
    assert rel_err(layer(x), expected) <= TORCH_TOL
    dense = sa.MultiHeadAttention(16, 2, dtype=dtype)
    dense.load_params(layer.params)
    assert rel_err(dense(x, mask=~attn_mask), expected) <= TORCH_TOL  # the same through mask=


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_per_head_patterns_and_key_lengths(dtype):
    """Per-head patterns are torch's (batch * heads, L, S) attn_mask; key_lengths its
    key_padding_mask."""
    pytest.importorskip("torch")
    rng = seeded("torch per head")
    patterns = [sa.Causal(), sa.SlidingWindow(3) | sa.Global([0]), sa.Strided(2), sa.Dense()]
    layer = with_random_biases(sa.MultiHeadAttention(32, 4, patterns=patterns, dtype=dtype), rng)
    (x,) = random_inputs(rng, dtype, (3, 30, 32))
    per_head = np.stack([p.to_mask(30, 30) for p in patterns])
    attn_mask = np.tile(~per_head, (3, 1, 1))  # (batch * heads, L, S), batch-major
    lengths = np.array([30, 21, 9])
    key_padding_mask = np.arange(30) >= lengths[:, None]
    expected = torch_forward(
        torch_twin(layer), x, attn_mask=attn_mask, key_padding_mask=key_padding_mask
    )
    # every row keeps a key below 9, so torch has no fully masked row (where it would give NaN)
    assert rel_err(layer(x, key_lengths=lengths), expected) <= TORCH_TOL
