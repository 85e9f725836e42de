"""The CUDA forward kernel run on the SIMT emulator, through the public API: device="cuda" with
the backend swapped for sparse_attn._cuda_emu (same kernel source, same Python dispatch), checked
against sparse_attn.reference on randomised cases over every pattern kind, mask, bias,
key_lengths, grouped-query heads, broadcasting, strided inputs and lse, in float32, float16 and
bfloat16, with the threads of each block run in forward, reverse and shuffled order. Device
arrays (__cuda_array_interface__ and DLPack) are read in place: the emulator's device memory is
host memory, so host arrays dressed as device arrays stand in for CuPy and PyTorch tensors.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import sparse_attn as sa
from sparse_attn import _device, reference

if not sa.build_info()["cuda_compiled"]:
    pytest.skip("this build has no CUDA kernels, so no emulator", allow_module_level=True)

from sparse_attn import _cuda_emu as emu

ORDERS = ("forward", "reverse", "shuffled")
KINDS = ("none", "dense", "causal", "window", "strided", "global", "block", "mask", "union",
         "intersection", "per_head", "random", "random_blocks", "fixed", "documents",
         "longformer", "bigbird", "sparse_transformer")
LENGTHS = (1, 2, 5, 17, 63, 64, 65, 100, 129, 200)
HEAD_DIMS = (1, 3, 8, 16, 31, 32, 33, 64, 65, 80)
VALUE_DIMS = (1, 5, 16, 64, 65, 100, 128, 130, 200)
# Relative Frobenius error of the output against the float64 reference on the same (rounded)
# inputs; absolute error of finite lse entries. float16 / bfloat16 outputs are rounded once.
REL_TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 8e-3}
LSE_TOL = 1e-4
NUM_RANDOM_CASES = 330
NUM_HARD_CASES = 72
WORK_BUDGET = 4e6  # batch * Hq * Lq * Lk * (D + Dv) per case: the emulator runs in milliseconds

WORST = {name: 0.0 for name in REL_TOL} | {"lse": 0.0, "cases": 0}


@pytest.fixture(autouse=True)
def emulated_gpu():
    """Every test here runs device='cuda' on the emulator, forward order unless it says."""
    with _device.use_backend(emu):
        yield
    emu.set_schedule("forward", 0, "default")


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---- random cases --------------------------------------------------------------------------------


def random_primitive(rng, Lq: int, Lk: int) -> sa.Pattern:
    kind = rng.choice(["causal", "window", "strided", "global", "block", "mask", "dense",
                       "random", "random_blocks", "fixed", "documents"])
    return random_pattern(rng, str(kind), Lq, Lk, 1)


def random_pattern(rng, kind: str, Lq: int, Lk: int, Hq: int):
    """A pattern of the given kind with parameters that fit (Lq, Lk); some leave rows empty."""
    n = max(Lq, Lk)
    if kind == "none":
        return None
    if kind == "dense":
        return sa.Dense()
    if kind == "causal":
        return sa.Causal(int(rng.integers(-Lq, Lk + 1)) if rng.random() < 0.7 else Lk - Lq)
    if kind == "window":
        left, right = (int(x) for x in rng.integers(0, 80, size=2))
        return sa.SlidingWindow(left, right)
    if kind == "strided":
        reach = None if rng.random() < 0.4 else int(rng.integers(0, 150))
        return sa.Strided(int(rng.integers(1, 90)), reach)
    if kind == "global":
        tokens = rng.choice(n, size=min(int(rng.integers(1, 5)), n), replace=False)
        rows, cols = [(True, True), (True, False), (False, True)][int(rng.integers(3))]
        return sa.Global(sorted(int(t) for t in tokens), rows=rows, cols=cols)
    if kind == "block":
        block = int(rng.choice([1, 7, 16, 32, 64, 100]))
        shape = (-(-Lq // block) + int(rng.integers(2)), -(-Lk // block) + int(rng.integers(2)))
        return sa.BlockSparse(rng.random(shape) < rng.uniform(0.2, 0.8), block)
    if kind == "mask":
        return sa.Mask(rng.random((Lq, Lk)) < rng.uniform(0.05, 0.9))
    if kind == "union":
        return random_primitive(rng, Lq, Lk) | random_primitive(rng, Lq, Lk)
    if kind == "intersection":
        return random_primitive(rng, Lq, Lk) & random_primitive(rng, Lq, Lk)
    if kind == "random":
        return sa.Random(int(rng.integers(1, 65)), int(rng.integers(0, 2**40)))
    if kind == "random_blocks":
        block = int(rng.choice([3, 16, 64]))
        radius = None if rng.random() < 0.5 else int(rng.integers(0, 3))
        return sa.RandomBlocks(int(rng.integers(1, 5)), block, int(rng.integers(0, 1000)),
                               exclude_first=int(rng.integers(0, 3)), exclude_radius=radius)
    if kind == "fixed":
        block = int(rng.integers(1, 80))
        return sa.Fixed(block, int(rng.integers(0, block + 1)))
    if kind == "documents":
        return sa.Documents(rng.integers(0, 60, size=int(rng.integers(1, 8))))
    if kind == "longformer":
        tokens = sorted({int(t) for t in rng.choice(n, size=min(2, n), replace=False)})
        return sa.Longformer(2 * int(rng.integers(0, 40)), tokens,
                             dilation=int(rng.integers(1, 4)))
    if kind == "bigbird":
        return sa.BigBird(int(rng.choice([8, 16, 32])), window_blocks=int(rng.choice([1, 3])),
                          global_blocks=int(rng.integers(0, 3)),
                          random_blocks=int(rng.integers(0, 4)), seed=int(rng.integers(100)))
    if kind == "sparse_transformer":
        if rng.random() < 0.5:
            return sa.SparseTransformer("strided", int(rng.integers(1, 40)),
                                        causal=bool(rng.random() < 0.7))
        stride = int(rng.integers(1, 40))
        return sa.SparseTransformer("fixed", stride, summary=int(rng.integers(0, stride + 1)))
    if kind == "per_head":
        if rng.random() < 0.5:
            block = int(rng.choice([16, 64]))
            layout = rng.random((Hq, -(-Lq // block), -(-Lk // block))) < 0.5
            return sa.BlockSparse(layout, block)
        return [random_primitive(rng, Lq, Lk) for _ in range(Hq)]
    raise AssertionError(kind)


def broadcast_variant(rng, shape: tuple) -> tuple:
    """shape with some leading axes set to 1 or dropped (still broadcastable to shape)."""
    lead = [1 if rng.random() < 0.3 else n for n in shape]
    while lead and rng.random() < 0.3:
        lead = lead[1:]
    return tuple(lead)


def random_floats(rng, shape, dtype: np.dtype, layout: str) -> np.ndarray:
    """Normal values in dtype, laid out in memory as asked: C order, a row slice of a larger
    array, reversed rows, or transposed storage (the last two take other strides)."""
    if layout == "slice":
        big = rng.standard_normal(shape[:-2] + (2 * shape[-2], shape[-1]))
        return big.astype(dtype)[..., ::2, :]
    a = rng.standard_normal(shape).astype(dtype)
    if layout == "reversed":
        return a[..., ::-1, :].copy()[..., ::-1, :]
    if layout == "fortran":
        return np.asfortranarray(a)
    return a


@dataclass
class Case:
    seed: int
    kind: str
    dtype: str
    order: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    pattern: object
    mask: np.ndarray | None
    bias: np.ndarray | None
    key_lengths: np.ndarray | None
    scale: float | None
    variants: dict = field(default_factory=dict)  # score, softcap, alibi_slopes, offsets
    dropout: tuple = (0.0, 0)  # (dropout_p, seed)

    def describe(self) -> str:
        return (f"seed={self.seed} kind={self.kind} dtype={self.dtype} order={self.order} "
                f"q{self.q.shape} k{self.k.shape} v{self.v.shape} pattern={self.pattern!r} "
                f"mask={None if self.mask is None else self.mask.shape} "
                f"bias={None if self.bias is None else self.bias.shape} "
                f"key_lengths={self.key_lengths} scale={self.scale} variants={self.variants} "
                f"dropout={self.dropout}")

    def options(self) -> dict:
        """The keyword arguments of sparse_attn.attention / hard_attention for this case."""
        return dict(mask=self.mask, bias=self.bias, scale=self.scale,
                    key_lengths=self.key_lengths, **self.variants)


def random_case(seed: int, kind: str | None = None, dtype: str | None = None) -> Case:
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[seed % len(KINDS)]
    dtype = dtype or str(rng.choice(["float32"] * 3 + ["float16"] * 2 + ["bfloat16"]))
    order = ORDERS[(seed // len(KINDS)) % len(ORDERS)]
    while True:
        batch = [(), (1,), (2,), (3,), (2, 2)][int(rng.integers(5))]
        heads_kv, group = int(rng.choice([1, 2])), int(rng.choice([1, 2, 3]))
        heads_q = heads_kv * group
        Lq, Lk = int(rng.choice(LENGTHS)), int(rng.choice(LENGTHS))
        D, Dv = int(rng.choice(HEAD_DIMS)), int(rng.choice(VALUE_DIMS))
        work = math.prod(batch) * heads_q * Lq * Lk * (D + Dv)
        if work <= WORK_BUDGET:
            break
    t = np_dtype(dtype)
    layouts = ["C", "C", "slice", "reversed", "fortran"]
    two_d = batch == () and heads_q == 1 and rng.random() < 0.3
    q_shape = (Lq, D) if two_d else batch + (heads_q, Lq, D)
    kv_lead = () if two_d else broadcast_variant(rng, batch)
    k_shape = (Lk, D) if two_d else kv_lead + (heads_kv, Lk, D)
    v_shape = (Lk, Dv) if two_d else kv_lead + (heads_kv, Lk, Dv)
    q = random_floats(rng, q_shape, t, str(rng.choice(layouts)))
    k = random_floats(rng, k_shape, t, str(rng.choice(layouts)))
    v = random_floats(rng, v_shape, t, str(rng.choice(layouts)))
    scores = batch + (heads_q, Lq, Lk)
    mask = bias = key_lengths = None
    if rng.random() < 0.3:
        shape = broadcast_variant(rng, scores[:-2]) + tuple(
            1 if rng.random() < 0.2 else n for n in scores[-2:])
        mask = rng.random(shape) < rng.uniform(0.4, 0.95)
    if rng.random() < 0.3:
        shape = broadcast_variant(rng, scores[:-2]) + tuple(
            1 if rng.random() < 0.2 else n for n in scores[-2:])
        bias = rng.standard_normal(shape).astype(np.float32)
        bias[rng.random(shape) < 0.05] = -np.inf
    if batch and rng.random() < 0.4:
        key_lengths = rng.integers(0, Lk + 1, size=batch)
    scale = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
    variants = {}
    if rng.random() < 0.2:
        variants["score"] = "cosine"
        scale = None if rng.random() < 0.5 else float(rng.uniform(1.0, 8.0))
    if rng.random() < 0.2:
        variants["softcap"] = float(rng.uniform(0.5, 5.0))
    if rng.random() < 0.2:
        variants["alibi_slopes"] = rng.uniform(0.0, 0.5, size=heads_q)
    if rng.random() < 0.15:
        variants["query_offset"] = int(rng.integers(0, 100))
        variants["key_offset"] = int(rng.integers(0, 100))
        if key_lengths is not None:
            key_lengths = key_lengths + variants["key_offset"]  # key_lengths are absolute
    dropout = (float(rng.uniform(0.1, 0.6)), int(rng.integers(2**62))) \
        if rng.random() < 0.15 else (0.0, 0)
    total = (variants.get("query_offset", 0) + Lq, variants.get("key_offset", 0) + Lk)
    pattern = random_pattern(rng, kind, *total, heads_q)  # patterns see absolute positions
    return Case(seed, kind, dtype, order, q, k, v, pattern, mask, bias, key_lengths, scale,
                variants, dropout)


def call(case: Case):
    return sa.attention(case.q, case.k, case.v, case.pattern, return_lse=True, device="cuda",
                        dropout_p=case.dropout[0], seed=case.dropout[1], **case.options())


def run_case(case: Case):
    emu.set_schedule(case.order, case.seed)
    return call(case)


def reference_inputs(case: Case) -> tuple[dict, dict]:
    """q, k, v in float64 (from the rounded inputs) and the reference's keyword arguments."""
    f64 = {n: getattr(case, n).astype(np.float64) for n in ("q", "k", "v")}
    options = case.options()
    if case.bias is not None:  # the kernels add the bias in the input dtype
        options["bias"] = case.bias.astype(np_dtype(case.dtype)).astype(np.float64)
    return f64, options


def check_case(case: Case, out, lse) -> float:
    """Asserts the result matches the float64 reference on the same inputs; returns the error."""
    f64, options = reference_inputs(case)
    keep = None
    if case.dropout[0] > 0:
        p = sa._args.problem_shape(case.q, case.k, case.v)
        keep = reference.dropout_keep(case.dropout[1], case.dropout[0], p.batch_shape, p.heads_q,
                                      p.len_q, p.len_k, case.variants.get("query_offset", 0),
                                      case.variants.get("key_offset", 0))
    ref_out, ref_lse = reference.attention(
        f64["q"], f64["k"], f64["v"], case.pattern, return_lse=True, dropout_keep=keep,
        dropout_p=case.dropout[0], **options)
    what = case.describe()
    assert out.dtype == case.q.dtype, what
    assert lse.dtype == np.float32, what
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, what
    out64 = out.astype(np.float64)
    assert not np.isnan(out64).any() and not np.isnan(lse).any(), what
    norm = np.linalg.norm(ref_out)
    err = np.linalg.norm(out64 - ref_out) / norm if norm > 0 else np.abs(out64).max(initial=0)
    assert err <= REL_TOL[case.dtype], f"relative error {err:.3g}: {what}"
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg=what)
    assert (out64[empty] == 0).all(), what  # rows with no allowed key give exact zeros
    lse_err = np.abs(lse[~empty] - ref_lse[~empty]).max(initial=0.0)
    assert lse_err <= LSE_TOL, f"lse error {lse_err:.3g}: {what}"
    WORST[case.dtype] = max(WORST[case.dtype], err)
    WORST["lse"] = max(WORST["lse"], float(lse_err))
    WORST["cases"] += 1
    return err


# ---- the randomised suite --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(NUM_RANDOM_CASES))
def test_random_case(seed):
    case = random_case(seed)
    check_case(case, *run_case(case))


@pytest.mark.parametrize("seed", range(NUM_HARD_CASES))
def test_random_hard_case(seed):
    """Hard attention: argmax against the reference (up to rounding ties), Gumbel-max samples
    against the CPU's (the same draws), and out = v[index] exactly."""
    case = random_case(50_000 + seed)
    case.dropout = (0.0, 0)
    sample = seed % 3 == 0
    emu.set_schedule(case.order, case.seed)
    out, index = sa.hard_attention(case.q, case.k, case.v, case.pattern, sample=sample,
                                   temperature=0.7, seed=seed, device="cuda", **case.options())
    what = case.describe() + f" sample={sample}"
    f64, options = reference_inputs(case)
    scores, allowed = reference._scores_and_allowed(
        f64["q"], f64["k"], case.pattern, options.pop("mask"), options.pop("bias"),
        options.pop("scale"), options.pop("key_lengths"), lead=f64["v"].shape[:-3], **options)
    masked = np.where(allowed, scores, -np.inf)
    assert index.dtype == np.int64 and out.dtype == case.q.dtype, what
    idx = index.reshape(masked.shape[:-1])
    empty = ~np.any(masked > -np.inf, axis=-1)
    np.testing.assert_array_equal(idx == -1, empty, err_msg=what)
    chosen = np.take_along_axis(masked, np.maximum(idx, 0)[..., None], axis=-1)[..., 0]
    assert np.all(chosen[~empty] > -np.inf), what  # only allowed keys are chosen
    if not sample:
        best = masked.max(axis=-1, initial=-np.inf)
        tie = 1e-5 * (1.0 + np.abs(best))
        assert np.all(chosen[~empty] >= best[~empty] - tie[~empty]), what
    elif case.dtype == "float32":
        _, cpu_index = sa.hard_attention(case.q, case.k, case.v, case.pattern, sample=True,
                                         temperature=0.7, seed=seed, device="cpu",
                                         **case.options())
        assert np.mean(cpu_index != index) < 1e-3, what  # the same draws; rounding ties aside
    v3 = f64["v"] if f64["v"].ndim > 2 else f64["v"][None]
    heads_q = masked.shape[-3]
    values = np.broadcast_to(np.repeat(v3, heads_q // v3.shape[-3], axis=-3),
                             masked.shape[:-2] + v3.shape[-2:])
    expected = np.take_along_axis(values, np.maximum(idx, 0)[..., None], axis=-2)
    expected[empty] = 0
    np.testing.assert_array_equal(out.astype(np.float64).reshape(expected.shape), expected,
                                  err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_with_mask_bias_and_lengths(kind, dtype):
    rng = np.random.default_rng(1000 + KINDS.index(kind))
    t = np_dtype(dtype)
    q = rng.standard_normal((2, 4, 97, 40)).astype(t)
    k = rng.standard_normal((1, 2, 150, 40)).astype(t)
    v = rng.standard_normal((1, 2, 150, 72)).astype(t)
    case = Case(0, kind, dtype, "shuffled", q, k, v, random_pattern(rng, kind, 97, 150, 4),
                rng.random((4, 97, 150)) < 0.8, rng.standard_normal((97, 150)).astype(np.float32),
                np.array([150, 77]), 0.3)
    check_case(case, *run_case(case))


def test_thread_orders_agree_bitwise():
    case = random_case(4242, kind="union", dtype="float32")
    results = []
    for order in ORDERS:
        case.order = order
        results.append(run_case(case))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


def test_ucontext_switcher_gives_the_same_result():
    case = random_case(77, kind="causal", dtype="float32")
    expected = run_case(case)
    emu.set_schedule("reverse", 0, "ucontext")
    np.testing.assert_array_equal(call(case)[0], expected[0])


@pytest.mark.parametrize("Dv", [1, 64, 65, 128, 129, 300])
@pytest.mark.parametrize("D", [1, 32, 33, 100])
def test_head_dims_across_chunks_and_column_slices(D, Dv):
    rng = np.random.default_rng(D * 1000 + Dv)
    q = rng.standard_normal((2, 70, D)).astype(np.float32)
    k = rng.standard_normal((2, 130, D)).astype(np.float32)
    v = rng.standard_normal((2, 130, Dv)).astype(np.float32)
    case = Case(0, "window", "float32", "reverse", q, k, v, sa.SlidingWindow(40, 90), None, None,
                None, None)
    check_case(case, *run_case(case))


def test_many_key_tiles_fold_into_one_softmax():
    rng = np.random.default_rng(5)
    q = (3 * rng.standard_normal((1, 3, 16))).astype(np.float32)
    k = (3 * rng.standard_normal((1, 1000, 16))).astype(np.float32)
    v = rng.standard_normal((1, 1000, 8)).astype(np.float32)
    case = Case(0, "strided", "float32", "shuffled", q, k, v, sa.Strided(3) | sa.Causal(500),
                None, None, None, None)
    check_case(case, *run_case(case))


def test_rows_with_nothing_allowed_give_zeros_and_minus_inf():
    rng = np.random.default_rng(6)
    q = rng.standard_normal((2, 1, 130, 8)).astype(np.float32)
    k = rng.standard_normal((2, 1, 90, 8)).astype(np.float32)
    v = rng.standard_normal((2, 1, 90, 8)).astype(np.float32)
    bias = np.zeros((130, 90), dtype=np.float32)
    bias[100] = -np.inf  # row 100: allowed keys, all with score -inf
    out, lse = sa.attention(q, k, v, sa.Causal(-70), bias=bias, key_lengths=[90, 0],
                            return_lse=True, device="cuda")
    assert not np.isnan(out).any()
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all()  # key_lengths 0
    empty = np.zeros(130, dtype=bool)
    empty[:70] = empty[100] = True  # causal -70 leaves rows < 70 empty
    assert (out[0, 0, empty] == 0).all() and np.isneginf(lse[0, 0, empty]).all()
    assert np.isfinite(lse[0, 0, ~empty]).all()


def test_float64_is_refused_on_the_gpu_and_computed_on_the_cpu_by_auto():
    q = np.random.default_rng(0).standard_normal((9, 4))
    with pytest.raises(TypeError, match="float64"):
        sa.attention(q, q, q, device="cuda")
    np.testing.assert_array_equal(sa.attention(q, q, q, device="auto"),
                                  sa.attention(q, q, q, device="cpu"))


def test_what_only_the_cpu_implements():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 20, 8)).astype(np.float32)
    params = {"wq": rng.standard_normal((8, 5)), "wk": rng.standard_normal((8, 5)),
              "w": rng.standard_normal(5)}
    with pytest.raises(NotImplementedError, match="additive"):
        sa.attention(q, q, q, score="additive", score_params=params, device="cuda")
    np.testing.assert_array_equal(
        sa.attention(q, q, q, score="additive", score_params=params, device="auto"),
        sa.attention(q, q, q, score="additive", score_params=params, device="cpu"))
    with pytest.raises(NotImplementedError, match="no GPU implementation"):
        sa.attention_weights(q, q, device="cuda")
    np.testing.assert_array_equal(sa.attention_weights(q, q, device="auto"),
                                  sa.attention_weights(q, q, device="cpu"))


def test_gpu_and_cpu_draw_the_same_dropout_and_samples():
    rng = np.random.default_rng(10)
    q = rng.standard_normal((2, 3, 90, 16)).astype(np.float32)
    kv = rng.standard_normal((2, 3, 150, 16)).astype(np.float32)
    options = {"alibi_slopes": [0.0, 0.1, 0.3], "softcap": 3.0, "query_offset": 40,
               "key_offset": 10}
    gpu = sa.attention(q, kv, kv, sa.Causal(30), dropout_p=0.4, seed=11, device="cuda",
                       **options)
    cpu = sa.attention(q, kv, kv, sa.Causal(30), dropout_p=0.4, seed=11, device="cpu",
                       **options)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
    gpu_out, gpu_index = sa.hard_attention(q, kv, kv, sa.Causal(30), sample=True, seed=12,
                                           temperature=2.0, device="cuda", **options)
    cpu_out, cpu_index = sa.hard_attention(q, kv, kv, sa.Causal(30), sample=True, seed=12,
                                           temperature=2.0, device="cpu", **options)
    np.testing.assert_array_equal(gpu_index, cpu_index)
    np.testing.assert_array_equal(gpu_out, cpu_out)


class CountingBackend:
    """The emulator with its forward calls counted."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        return getattr(emu, name)

    def forward(self, *args):
        self.calls += 1
        return emu.forward(*args)


def test_auto_uses_the_gpu_when_one_is_usable():
    backend = CountingBackend()
    q = np.random.default_rng(1).standard_normal((2, 33, 8)).astype(np.float32)
    with _device.use_backend(backend):
        assert sa.cuda_available()
        out = sa.attention(q, q, q, sa.Causal(), device="auto")
        assert backend.calls == 1
    np.testing.assert_allclose(out, sa.attention(q, q, q, sa.Causal(), device="cpu"), atol=1e-6)


def test_numpy_out_and_two_dimensional_inputs():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((45, 12)).astype(np.float16)
    out = np.full((45, 12), np.nan, dtype=np.float16)
    got, lse = sa.attention(q, q, q, sa.SlidingWindow(3), out=out, return_lse=True,
                            device="cuda")
    assert got is out and lse.shape == (45,)
    ref = reference.attention(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64),
                              sa.SlidingWindow(3))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < REL_TOL["float16"]
    with pytest.raises(ValueError, match="out must have shape"):
        sa.attention(q, q, q, out=np.empty((45, 12), np.float32), device="cuda")


def test_empty_problems():
    z = np.zeros((2, 0, 8), dtype=np.float32)
    q = np.ones((2, 5, 8), dtype=np.float32)
    assert sa.attention(z, q, q, device="cuda").shape == (2, 0, 8)
    out, lse = sa.attention(q, z, z, return_lse=True, device="cuda")  # no keys at all
    assert (out == 0).all() and np.isneginf(lse).all()
    empty_batch = np.ones((0, 2, 5, 8), dtype=np.float32)
    out, index = sa.hard_attention(empty_batch, empty_batch, empty_batch,
                                   key_lengths=np.zeros(0, dtype=np.int64),
                                   alibi_slopes=[0.1, 0.2], device="cuda")
    assert out.shape == (0, 2, 5, 8) and index.shape == (0, 2, 5)


# ---- device arrays read in place -------------------------------------------------------------------


class CaiArray:
    """Host memory posing as device memory through __cuda_array_interface__ (version 3)."""

    def __init__(self, a: np.ndarray):
        self.a = a

    @property
    def __cuda_array_interface__(self):
        a = self.a
        return {"shape": a.shape, "typestr": a.__array_interface__["typestr"],
                "data": (a.ctypes.data, False),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3}


class DlpackArray:
    """Host memory posing as a CUDA tensor through DLPack; bfloat16 travels as uint16 bits."""

    CODES: ClassVar[dict] = {"float32": (2, 32), "float16": (2, 16), "bfloat16": (4, 16),
                             "bool": (6, 8), "int64": (0, 64)}

    def __init__(self, a: np.ndarray, dtype: str | None = None):
        self.a, self.dtype = a, dtype or a.dtype.name

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        assert stream == 1  # the consumer names the legacy default stream
        return emu.fake_dlpack(self.a, *self.CODES[self.dtype])


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), and the rounded values."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("wrap", [CaiArray, DlpackArray])
def test_device_arrays_in_place(wrap):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 70, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 90, 16)).astype(np.float32)[:, :, ::-1]  # negative strides
    v = rng.standard_normal((2, 90, 24)).astype(np.float32)[:, None]  # broadcast over batch
    v = np.broadcast_to(v, (2, 2, 90, 24)) if wrap is CaiArray else np.ascontiguousarray(
        np.broadcast_to(v, (2, 2, 90, 24)))
    mask = rng.random((70, 90)) < 0.8
    bias = rng.standard_normal((4, 1, 90)).astype(np.float32)
    lengths = np.array([90, 41])
    pattern = sa.Causal(20) | sa.Global([3])
    out, lse = sa.attention(wrap(q), wrap(k), wrap(v), pattern, mask=wrap(mask), bias=wrap(bias),
                            key_lengths=wrap(lengths), return_lse=True, device="cuda")
    assert isinstance(out, _device.DeviceArray) and isinstance(lse, _device.DeviceArray)
    assert out.shape == (2, 4, 70, 24) and lse.shape == (2, 4, 70)
    ref, ref_lse = reference.attention(q, k, v, pattern, mask=mask, bias=bias,
                                       key_lengths=lengths, return_lse=True)
    got = out.to_numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < REL_TOL["float32"]
    finite = np.isfinite(ref_lse)
    assert np.abs(lse.to_numpy()[finite] - ref_lse[finite]).max() < LSE_TOL


def test_device_out_is_written_in_place():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((3, 50, 8)).astype(np.float32)
    host_out = np.zeros((3, 50, 8), dtype=np.float32)
    result = sa.attention(CaiArray(q), CaiArray(q), CaiArray(q), sa.SlidingWindow(4),
                          out=CaiArray(host_out), device="cuda")
    assert isinstance(result, CaiArray) and result.a is host_out
    ref = reference.attention(q, q, q, sa.SlidingWindow(4))
    assert np.linalg.norm(host_out - ref) / np.linalg.norm(ref) < REL_TOL["float32"]
    with pytest.raises(ValueError, match="out must have shape"):
        sa.attention(CaiArray(q), CaiArray(q), CaiArray(q), out=CaiArray(host_out[:2]),
                     device="cuda")
    with pytest.raises(TypeError, match="device array"):
        sa.attention(CaiArray(q), CaiArray(q), CaiArray(q), out=host_out, device="cuda")


def test_bfloat16_through_dlpack():
    rng = np.random.default_rng(8)
    qb, q = bf16_bits(rng.standard_normal((2, 66, 32)))
    kb, k = bf16_bits(rng.standard_normal((2, 80, 32)))
    vb, v = bf16_bits(rng.standard_normal((2, 80, 40)))
    out = sa.attention(DlpackArray(qb, "bfloat16"), DlpackArray(kb, "bfloat16"),
                       DlpackArray(vb, "bfloat16"), sa.Causal(14), device="cuda")
    assert out.dtype == "bfloat16"
    bits = np.empty(out.shape, dtype=np.uint16)
    out._buffer.download(bits.ctypes.data, bits.nbytes)
    got = (bits.astype(np.uint32) << 16).view(np.float32)
    ref = reference.attention(q, k, v, sa.Causal(14))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < REL_TOL["bfloat16"]


def test_device_array_errors():
    q = np.ones((2, 5, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        sa.attention(CaiArray(q), CaiArray(q.astype(np.float16)), CaiArray(q), device="cuda")
    with pytest.raises(ValueError, match="unit stride"):
        sa.attention(CaiArray(np.asfortranarray(q)), CaiArray(q), CaiArray(q), device="cuda")
    with pytest.raises(TypeError, match="bias on the device"):
        sa.attention(CaiArray(q), CaiArray(q), CaiArray(q),
                     bias=CaiArray(q[0, :, :5].astype(np.float16)), device="cuda")
    with pytest.raises(TypeError, match="mask must be a bool"):
        sa.attention(CaiArray(q), CaiArray(q), CaiArray(q), mask=CaiArray(q[0, :, :5]),
                     device="cuda")
    with pytest.raises(ValueError, match="does not broadcast"):
        sa.attention(CaiArray(q), CaiArray(q), CaiArray(q),
                     mask=CaiArray(np.ones((3, 5), dtype=bool)), device="cuda")


def test_dlpack_parsing():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::-1, 1:]
    info = emu.dlpack_info(emu.fake_dlpack(a, 2, 32))
    assert info["ptr"] == a.ctypes.data
    assert info["shape"] == (2, 3, 3) and info["strides"] == (12, -4, 1)
    assert (info["code"], info["bits"], info["lanes"], info["device_type"]) == (2, 32, 1, 2)
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    with pytest.raises(ValueError, match="dltensor"):
        emu.dlpack_info(new_capsule(a.ctypes.data, b"used_dltensor", None))


def test_worst_errors_summary(capsys):
    """Runs last: prints the worst errors of the cases above (pytest -s shows them)."""
    if WORST["cases"] == 0:
        pytest.skip("no case ran in this session")
    with capsys.disabled():
        print("\nemulated CUDA kernel, worst errors over", WORST["cases"], "checked cases:",
              ", ".join(f"{k} {v:.3g}" for k, v in WORST.items() if k != "cases"))
