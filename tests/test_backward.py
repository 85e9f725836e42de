"""Gradients: ``attention_backward`` and ``attention_vjp`` against the float64 reference gradient
(randomised cases over every pattern kind, GQA, broadcasting, memory layouts, mask, bias,
key_lengths, softcap, ALiBi, the cosine score, dropout, offsets), a finite-difference check of
the reference itself, PyTorch autograd when it is installed, determinism over thread counts,
the SIMD levels, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sparse_attn as sa
from conftest import (
    PRIMITIVE_KINDS,
    Shapes,
    assert_unchanged,
    expected_simd,
    pick,
    random_case,
    random_floats,
    random_layout_kind,
    random_pattern,
    random_shapes,
    run_python,
    snapshot,
    with_layout,
)
from sparse_attn import reference

REPO = Path(__file__).resolve().parents[1]

# Relative Frobenius error of every gradient against the float64 reference.
GRAD_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
# A backward case's reference work stays below this (it materialises several Lq x Lk arrays).
BACKWARD_BUDGET = 2.0e6

WORST = {"float32": 0.0, "float64": 0.0, "cases": 0}


@pytest.fixture(scope="module", autouse=True)
def report_worst(request):
    """Print the worst gradient errors of this module at the end of the run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and WORST["cases"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nsparse_attn backward: worst relative gradient error float32 "
                f"{WORST['float32']:.3g}, float64 {WORST['float64']:.3g} over "
                f"{WORST['cases']} checked calls"
            )


# ---- the check ----------------------------------------------------------------------------------


def rms(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def grad_floors(q, k, v, grad_out, options: dict) -> dict:
    """The size of each gradient's rounding noise where the exact gradient cancels to zero (a
    row with one allowed key has dS = 0 exactly, but dP - delta rounds): the relative error is
    taken against max(|expected|, floor), floor a hundredth of the gradient's natural scale."""
    scale = options.get("scale")
    D = np.shape(q)[-1]
    keep = 1.0 / (1.0 - options.get("dropout_p", 0.0))
    dp = 1e-2 * np.linalg.norm(grad_out) * rms(v) * math.sqrt(max(np.shape(v)[-1], 1)) * keep
    if options.get("score") == "additive":
        params = options["score_params"]
        ds = dp * abs(1.0 if scale is None else float(scale)) * np.linalg.norm(params["w"])
        return {"dq": ds * np.linalg.norm(params["wq"]), "dk": ds * np.linalg.norm(params["wk"]),
                "dv": 0.0, "dbias": dp, "wq": ds * np.linalg.norm(q), "wk": ds * np.linalg.norm(k),
                "w": ds * math.sqrt(np.size(q) + np.size(k))}
    if options.get("score") == "cosine":
        scale = 1.0 if scale is None else scale
        unit = 1.0 / max(min(np.linalg.norm(q, axis=-1).min(), np.linalg.norm(k, axis=-1).min()),
                         1e-3)
        q_size = k_size = unit
    else:
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        q_size, k_size = rms(q) * math.sqrt(D), rms(k) * math.sqrt(D)
    return {"dq": dp * abs(float(scale)) * k_size, "dk": dp * abs(float(scale)) * q_size,
            "dv": 0.0, "dbias": dp}


def grad_error(got, expected, floor: float) -> float:
    diff = np.linalg.norm(np.asarray(got, dtype=np.float64) - expected)
    if diff == 0:
        return 0.0
    return float(diff / max(np.linalg.norm(expected), floor, 1e-300))


def check_backward(q, k, v, pattern, options: dict, *, threads=None, grad_layout="C",
                   rng=None, info: str = "") -> dict:
    """Forward, then backward with a random grad_out, against reference.attention_backward:
    shapes and dtypes of the inputs, inputs unchanged, no NaN, relative error within GRAD_TOL.
    Returns the errors by gradient name."""
    rng = rng if rng is not None else np.random.default_rng(0)
    dtype = np.asarray(q).dtype
    out, lse = sa.attention(q, k, v, pattern, **options, return_lse=True, threads=threads)
    grad_out = with_layout(random_floats(rng, out.shape, dtype), grad_layout, rng)
    with_bias = options.get("bias") is not None
    inputs = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "grad_out": grad_out}
    for name in ("mask", "bias"):
        if isinstance(options.get(name), np.ndarray):
            inputs[name] = options[name]
    additive = options.get("score") == "additive"
    before = snapshot(inputs)
    got = sa.attention_backward(q, k, v, out, lse, grad_out, pattern, **options,
                                return_dbias=with_bias, return_dscore_params=additive,
                                threads=threads)
    assert_unchanged(before, inputs, "\n  " + info)
    expected = reference.attention_backward(q, k, v, out, lse, grad_out, pattern, **options,
                                            return_dbias=with_bias,
                                            return_dscore_params=additive)
    names = ("dq", "dk", "dv") + (("dbias",) if with_bias else ())
    shapes = {"dq": np.shape(q), "dk": np.shape(k), "dv": np.shape(v),
              "dbias": np.shape(options.get("bias"))}
    if additive:  # the gradients of score_params, by name
        assert isinstance(got[-1], dict) and set(got[-1]) == {"wq", "wk", "w"}, info
        names += ("wq", "wk", "w")
        shapes.update({n: np.shape(options["score_params"][n]) for n in ("wq", "wk", "w")})
        got = got[:-1] + tuple(got[-1][n] for n in ("wq", "wk", "w"))
        expected = expected[:-1] + tuple(expected[-1][n] for n in ("wq", "wk", "w"))
    floors = grad_floors(q, k, v, grad_out, options)
    errors = {}
    for name, g, e in zip(names, got, expected):
        assert isinstance(g, np.ndarray) and g.dtype == dtype, f"{name}: {type(g)}\n  {info}"
        assert g.shape == shapes[name], f"{name} shape {g.shape} != {shapes[name]}\n  {info}"
        assert not np.isnan(g).any(), f"NaN in {name}\n  {info}"
        errors[name] = grad_error(g, e, floors[name])
        assert errors[name] <= GRAD_TOL[dtype], (
            f"{name}: relative error {errors[name]:.3g} > {GRAD_TOL[dtype]:g}\n  {info}"
        )
    WORST[dtype.name] = max(WORST[dtype.name], *errors.values())
    WORST["cases"] += 1
    return errors


def random_variants(rng, shapes: Shapes, *, offsets: bool = False) -> dict:
    """Scoring variants of the forward, each switched on at random."""
    variants = {}
    roll = rng.random()
    if roll < 0.15:
        variants["score"] = "cosine"
    elif roll < 0.27:
        A = int(pick(rng, (1, 3, 8, 17)))
        variants["score"] = "additive"
        variants["score_params"] = {"wq": rng.standard_normal((shapes.D, A)) / math.sqrt(shapes.D),
                                    "wk": rng.standard_normal((shapes.D, A)) / math.sqrt(shapes.D),
                                    "w": rng.standard_normal(A)}
    if rng.random() < 0.2:
        variants["softcap"] = float(pick(rng, (0.5, 2.0, 20.0)))
    if rng.random() < 0.2 and shapes.rank_q != 2:
        variants["alibi_slopes"] = rng.uniform(0.0, 0.5, shapes.Hq)
    if rng.random() < 0.2:
        variants["dropout_p"] = float(pick(rng, (0.1, 0.5, 0.9)))
        variants["seed"] = int(rng.integers(0, 2**63))
    if offsets:
        variants["query_offset"] = int(pick(rng, (0, 1, 63, 64, 100)))
        variants["key_offset"] = int(pick(rng, (0, 5, 64, 129)))
    return variants


def run_random_case(seed, kind, dtype):
    rng = np.random.default_rng([2024, seed])
    shapes = random_shapes(rng, budget=BACKWARD_BUDGET)
    if kind == "union/intersection":
        case = random_case(rng, dtype=dtype, seed=seed, shapes=shapes, out=False)
        case.pattern = random_pattern(rng, shapes.Lq, shapes.Lk, int(pick(rng, (1, 2, 3))))
    else:
        case = random_case(rng, dtype=dtype, kind=kind, seed=seed, shapes=shapes, out=False)
    options = dict(case.options, **random_variants(rng, shapes))
    if options.get("score") in ("cosine", "additive") and options.get("scale") is not None:
        options["scale"] = float(np.clip(options["scale"] * math.sqrt(shapes.D), -3, 3))
    info = case.describe() + f"\n  variants={ {n: options[n] for n in options if n not in case.options} }"
    check_backward(case.q, case.k, case.v, case.pattern, options, threads=case.threads,
                   grad_layout=random_layout_kind(rng), rng=rng, info=info)


KINDS = PRIMITIVE_KINDS + ("union/intersection", None)  # None: any tree, per-head lists
CASES_PER_KIND = 20  # x 9 kinds x 2 dtypes = 360 randomised cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", KINDS, ids=[str(k) for k in KINDS])
@pytest.mark.parametrize("seed", range(CASES_PER_KIND))
def test_random_cases_match_reference(seed, kind, dtype):
    run_random_case(seed * 100 + KINDS.index(kind), kind, dtype)


# ---- targeted cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "D, Dv, Lq, Lk",
    [(1, 1, 1, 1), (3, 7, 7, 8), (8, 9, 9, 15), (16, 17, 17, 63), (31, 1, 65, 64),
     (64, 64, 129, 127), (65, 33, 64, 200), (128, 80, 100, 65), (200, 3, 33, 31)],
)
def test_odd_sizes_around_tiles_and_vector_widths(D, Dv, Lq, Lk, dtype):
    rng = np.random.default_rng([7, D, Dv, Lq, Lk])
    q = random_floats(rng, (2, 4, Lq, D), dtype)
    k = random_floats(rng, (2, 2, Lk, D), dtype)
    v = random_floats(rng, (2, 2, Lk, Dv), dtype)
    for pattern in (None, sa.Causal(Lk - Lq), sa.SlidingWindow(5, 70) | sa.Global([0])):
        check_backward(q, k, v, pattern, {}, rng=rng, info=f"D={D} Dv={Dv} {pattern!r}")


MORE_PATTERNS = [
    sa.Random(5, seed=3),
    sa.RandomBlocks(2, 16, seed=1),
    sa.Fixed(32, 4),
    sa.Documents([40, 1, 90, 69]),
    sa.Longformer(16, [0, 99]),
    sa.BigBird(32, seed=2),
    sa.SparseTransformer("strided", 16),
    sa.SparseTransformer("fixed", 32, 4) & sa.Random(40, seed=9),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", MORE_PATTERNS, ids=repr)
def test_random_patterns_and_presets(pattern, dtype):
    rng = np.random.default_rng(13)
    q = random_floats(rng, (2, 4, 200, 24), dtype)
    k = random_floats(rng, (2, 2, 200, 24), dtype)
    v = random_floats(rng, (1, 2, 200, 16), dtype)
    check_backward(q, k, v, pattern, {"dropout_p": 0.1, "seed": 4}, rng=rng, info=repr(pattern))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seed", range(6))
def test_offsets_and_variants(seed, dtype):
    """query_offset / key_offset place the call in a larger problem: the pattern, ALiBi and the
    dropped set see absolute positions."""
    rng = np.random.default_rng([11, seed])
    shapes = random_shapes(rng, budget=BACKWARD_BUDGET, two_d=0.0)
    q = random_floats(rng, shapes.q_shape(), dtype)
    k = random_floats(rng, shapes.k_shape(), dtype)
    v = random_floats(rng, shapes.v_shape(), dtype)
    pattern = pick(rng, (sa.Causal(), sa.SlidingWindow(40), sa.Strided(3, 90) | sa.Global([2])))
    options = random_variants(rng, shapes, offsets=True)
    check_backward(q, k, v, pattern, options, rng=rng, info=f"{pattern!r} {options}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_dropout_regenerates_the_forward_set(dtype):
    rng = np.random.default_rng(3)
    q, k, v = (random_floats(rng, (2, 3, 70, 16), dtype) for _ in range(3))
    for p in (0.1, 0.5, 0.9):
        check_backward(q, k, v, sa.Causal(), {"dropout_p": p, "seed": 99}, rng=rng)
    # a different seed drops a different set: the gradient changes
    out, lse = sa.attention(q, k, v, dropout_p=0.5, seed=1, return_lse=True)
    g = random_floats(rng, out.shape, dtype)
    dv1 = sa.attention_backward(q, k, v, out, lse, g, dropout_p=0.5, seed=1)[2]
    dv2 = sa.attention_backward(q, k, v, out, lse, g, dropout_p=0.5, seed=2)[2]
    assert not np.allclose(dv1, dv2)


def test_rows_with_no_allowed_key_contribute_nothing():
    rng = np.random.default_rng(4)
    q, k, v = (random_floats(rng, (2, 50, 8), np.float32) for _ in range(3))
    mask = np.ones((50, 50), dtype=bool)
    mask[10:20] = False  # these query rows see nothing
    out, lse = sa.attention(q, k, v, mask=mask, return_lse=True)
    g = random_floats(rng, out.shape, np.float32)
    dq, dk, dv = sa.attention_backward(q, k, v, out, lse, g, mask=mask)
    assert np.all(dq[:, 10:20] == 0)
    g2 = g.copy()
    g2[:, 10:20] = 1e6  # their output gradient must not reach k or v
    _, dk2, dv2 = sa.attention_backward(q, k, v, out, lse, g2, mask=mask)
    assert np.array_equal(dk, dk2) and np.array_equal(dv, dv2)
    # padding keys (key_lengths) get zero gradient
    _, dk, dv = sa.attention_backward(q, k, v, *sa.attention(q, k, v, key_lengths=30,
                                                             return_lse=True), g, key_lengths=30)
    assert np.all(dk[:, 30:] == 0) and np.all(dv[:, 30:] == 0)


def test_empty_sizes():
    for Lq, Lk, batch in ((0, 5, (2,)), (5, 0, (2,)), (5, 5, (0,))):
        q = np.ones((*batch, 2, Lq, 4), np.float32)
        k = np.ones((*batch, 1, Lk, 4), np.float32)
        v = np.ones((*batch, 1, Lk, 3), np.float32)
        out, lse = sa.attention(q, k, v, return_lse=True)
        dq, dk, dv = sa.attention_backward(q, k, v, out, lse, np.ones_like(out))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()


# ---- the reference gradient itself: finite differences ------------------------------------------


def numeric_gradient(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        saved = x[index]
        x[index] = saved + eps
        plus = f()
        x[index] = saved - eps
        minus = f()
        x[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


FD_VARIANTS = {
    "dot": {},
    "scale-bias-mask": {"scale": 0.7, "bias": True, "mask": True},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi_slopes": [0.3, 0.1]},
    "cosine": {"score": "cosine", "scale": 2.0},
    "additive": {"score": "additive"},
    "additive-softcap": {"score": "additive", "softcap": 2.0, "scale": 0.8},
    "dropout": {"dropout_p": 0.4, "seed": 7},
    "offsets-keylengths": {"query_offset": 2, "key_offset": 1, "key_lengths": [3, 4]},
}


@pytest.mark.parametrize("name", list(FD_VARIANTS))
def test_reference_gradient_matches_finite_differences(name):
    rng = np.random.default_rng([5, len(name)])
    q = rng.standard_normal((2, 2, 3, 3))
    k = rng.standard_normal((1, 1, 4, 3))  # broadcast batch, GQA (2 query heads, 1 kv head)
    v = rng.standard_normal((2, 1, 4, 2))
    g = rng.standard_normal((2, 2, 3, 2))
    options = dict(FD_VARIANTS[name])
    params = {}
    if options.pop("bias", False):
        options["bias"] = params["bias"] = rng.standard_normal((2, 1, 3, 4))
    if options.pop("mask", False):
        options["mask"] = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=bool)
    if options.get("score") == "additive":
        options["score_params"] = params = {"wq": rng.standard_normal((3, 5)),
                                            "wk": rng.standard_normal((3, 5)),
                                            "w": rng.standard_normal(5)}
    pattern = sa.SlidingWindow(2, 1) | sa.Global([0])
    if options.get("dropout_p"):
        keep = reference.dropout_keep(options["seed"], options["dropout_p"], (2,), 2, 3, 4)
        forward_options = {n: x for n, x in options.items() if n not in ("dropout_p", "seed")}
        forward_options.update(dropout_keep=keep, dropout_p=options["dropout_p"])
    else:
        forward_options = options

    def loss():
        return float(np.sum(reference.attention(q, k, v, pattern, **forward_options) * g))

    out, lse = reference.attention(q, k, v, pattern, **forward_options, return_lse=True)
    additive = options.get("score") == "additive"
    extra = {"return_dbias": "bias" in params and not additive,
             "return_dscore_params": additive}
    grads = reference.attention_backward(q, k, v, out, lse, g, pattern, **options, **extra)
    targets = [q, k, v]
    if extra["return_dbias"]:
        targets.append(params["bias"])
    if extra["return_dscore_params"]:
        targets += [params["wq"], params["wk"], params["w"]]
        grads = grads[:3] + tuple(grads[3][n] for n in ("wq", "wk", "w"))
    for x, analytic in zip(targets, grads):
        numeric = numeric_gradient(loss, x)
        assert np.linalg.norm(analytic - numeric) <= 1e-6 * max(np.linalg.norm(numeric), 1e-3), (
            f"{name}: analytic {analytic} vs numeric {numeric}"
        )


# ---- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape_q, shape_kv, pattern",
    [((1, 1, 300, 32), (1, 1, 300, 32), sa.Causal()),  # one (batch, kv head): split schedule
     ((2, 4, 200, 16), (2, 2, 200, 16), sa.SlidingWindow(30) | sa.Global([5, 150])),
     ((1, 8, 257, 64), (1, 1, 257, 64), None)],  # GQA: eight query heads summed into one
)
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_bitwise_equal_for_every_thread_count(shape_q, shape_kv, pattern, score):
    rng = np.random.default_rng(6)
    q = random_floats(rng, shape_q, np.float32)
    k = random_floats(rng, shape_kv, np.float32)
    v = random_floats(rng, shape_kv, np.float32)
    bias = random_floats(rng, shape_q[-2:-1] + shape_kv[-2:-1], np.float32)
    kwargs = {"bias": bias, "dropout_p": 0.2, "seed": 3, "softcap": 5.0}
    if score == "additive":
        D = shape_q[-1]
        kwargs.update(score="additive", score_params={"wq": rng.standard_normal((D, 8)) / D**0.5,
                                                      "wk": rng.standard_normal((D, 8)) / D**0.5,
                                                      "w": rng.standard_normal(8)},
                      return_dscore_params=True)
    forward = {n: x for n, x in kwargs.items() if n != "return_dscore_params"}
    out, lse = sa.attention(q, k, v, pattern, return_lse=True, **forward)
    g = random_floats(rng, out.shape, np.float32)
    results = [sa.attention_backward(q, k, v, out, lse, g, pattern, return_dbias=True,
                                     threads=t, **kwargs) for t in (1, 2, 3, 4, 2, 1)]
    flat = [r[:4] + (tuple(r[4].values()) if len(r) > 4 else ()) for r in results]
    for other in flat[1:]:
        for a, b in zip(flat[0], other):
            assert np.array_equal(a, b)


# ---- attention_vjp ------------------------------------------------------------------------------


def test_vjp_is_forward_plus_backward():
    rng = np.random.default_rng(8)
    q, k, v = (random_floats(rng, (2, 40, 8), np.float64) for _ in range(3))
    bias = random_floats(rng, (40, 40), np.float64)
    out, vjp = sa.attention_vjp(q, k, v, sa.Causal(), bias=bias, softcap=3.0, return_dbias=True)
    expected_out, lse = sa.attention(q, k, v, sa.Causal(), bias=bias, softcap=3.0,
                                     return_lse=True)
    assert np.array_equal(out, expected_out)
    g = random_floats(rng, out.shape, np.float64)
    got = vjp(g)
    expected = sa.attention_backward(q, k, v, out, lse, g, sa.Causal(), bias=bias, softcap=3.0,
                                     return_dbias=True)
    assert len(got) == 4
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)


def test_vjp_with_dropout_and_no_seed_uses_one_set():
    """out is linear in v, so sum(dv * v) == sum(grad_out * out) only when the backward
    regenerates exactly the forward's dropped set."""
    rng = np.random.default_rng(9)
    q, k, v = (random_floats(rng, (3, 64, 16), np.float64) for _ in range(3))
    out, vjp = sa.attention_vjp(q, k, v, sa.Causal(), dropout_p=0.5)
    g = random_floats(rng, out.shape, np.float64)
    dv = vjp(g)[2]
    assert np.isclose(np.sum(dv * v), np.sum(g * out), rtol=1e-12)


# ---- PyTorch autograd ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("pattern", [None, sa.Causal(), sa.SlidingWindow(16)], ids=repr)
def test_agrees_with_torch_autograd(pattern, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    q = random_floats(rng, (2, 4, 100, 32), dtype)
    k = random_floats(rng, (2, 2, 100, 32), dtype)
    v = random_floats(rng, (2, 2, 100, 24), dtype)
    g = random_floats(rng, (2, 4, 100, 24), dtype)
    out, vjp = sa.attention_vjp(q, k, v, pattern)
    dq, dk, dv = vjp(g)

    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    allowed = torch.tensor(reference.allowed_mask(pattern, 100, 100, 1)[0])
    t_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed,
                                                             enable_gqa=True)
    t_out.backward(torch.tensor(g))
    tol = GRAD_TOL[np.dtype(dtype)]
    for ours, theirs in ((out, t_out), (dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        theirs = theirs.detach().numpy()
        assert np.linalg.norm(ours - theirs) <= tol * np.linalg.norm(theirs)


def test_torch_autograd_example_runs():
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "torch_autograd.py")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max error" in proc.stdout


# ---- SIMD levels --------------------------------------------------------------------------------

SIMD_SWEEP = """
import json
import numpy as np
import sparse_attn as sa
import test_backward as tb

for i in range(24):
    tb.run_random_case(10_000 + i, (tb.KINDS * 3)[i], (np.float32, np.float64)[i % 2])
print(json.dumps({"simd": sa.build_info()["simd"], "worst": tb.WORST}))
"""


@pytest.mark.parametrize("level", ["generic", None], ids=["simd=generic", "simd=default"])
def test_simd_levels(level):
    proc = run_python(SIMD_SWEEP, simd=level)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if expected_simd(level) is not None:
        assert result["simd"] == expected_simd(level)
    assert result["worst"]["cases"] == 24


# ---- bad input ----------------------------------------------------------------------------------


def _problem(dtype=np.float32):
    rng = np.random.default_rng(12)
    q, k, v = (random_floats(rng, (2, 20, 8), dtype) for _ in range(3))
    out, lse = sa.attention(q, k, v, return_lse=True)
    return q, k, v, out, lse, np.ones_like(out)


@pytest.mark.parametrize(
    "change, error, names",
    [
        ({"out": np.ones((2, 20, 7), np.float32)}, ValueError, "out"),
        ({"out": np.ones((2, 20, 8), np.float64)}, TypeError, "out"),
        ({"lse": np.ones((2, 21), np.float32)}, ValueError, "lse"),
        ({"grad_out": np.ones((2, 20, 8), np.int32)}, TypeError, "grad_out"),
        ({"grad_out": np.ones((20, 8), np.float32)}, ValueError, "grad_out"),
        ({"grad_out": "x"}, TypeError, "grad_out"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"dropout_p": "0.1"}, TypeError, "dropout_p"),
        ({"dropout_p": 0.1}, ValueError, "seed"),
        ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed"),
        ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed"),
        ({"return_dbias": True}, ValueError, "return_dbias"),
        ({"return_dbias": 1}, TypeError, "return_dbias"),
        ({"pattern": "causal"}, TypeError, "pattern"),
        ({"mask": np.ones((20, 20), np.int8)}, TypeError, "mask"),
        ({"bias": np.ones((3, 20)), "return_dbias": True}, ValueError, "bias"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"threads": 0}, ValueError, "threads"),
        ({"key_lengths": [30]}, ValueError, "key_lengths"),
        ({"score": "dots"}, ValueError, "score"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"alibi_slopes": [1.0, 2.0, 3.0]}, ValueError, "alibi_slopes"),
    ],
)
def test_bad_input_names_the_argument(change, error, names):
    q, k, v, out, lse, g = _problem()
    arrays = {"q": q, "k": k, "v": v, "out": out, "lse": lse, "grad_out": g}
    options = {n: x for n, x in change.items() if n not in arrays}
    arrays.update({n: x for n, x in change.items() if n in arrays})
    with pytest.raises(error, match=names):
        sa.attention_backward(**arrays, **options)


def test_additive_parameter_gradients_need_the_additive_score():
    q, k, v, out, lse, g = _problem()
    with pytest.raises(ValueError, match="return_dscore_params"):
        sa.attention_backward(q, k, v, out, lse, g, return_dscore_params=True)
    with pytest.raises(TypeError, match="return_dscore_params"):
        sa.attention_backward(q, k, v, out, lse, g, return_dscore_params="yes")


def test_vjp_refuses_out_and_return_lse():
    q, k, v, *_ = _problem()
    for name in ("out", "return_lse"):
        with pytest.raises(TypeError, match=name):
            sa.attention_vjp(q, k, v, **{name: None})
    with pytest.raises(TypeError, match="return_dbias"):
        sa.attention_vjp(q, k, v, return_dbias="yes")


# ---- the training example -----------------------------------------------------------------------


def test_train_copy_task_small():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_copy_task.py"), "--small"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
