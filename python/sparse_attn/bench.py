"""The benchmark suite: sparse_attn against NumPy, PyTorch SDPA (dense, ``is_causal``, bool mask),
FlexAttention and ONNX Runtime's SparseAttention on the same problems in the same run.

Run ``python -m sparse_attn.bench --help`` (or ``python bench/run.py``). FLOPs are counted on
allowed pairs only (4·D per pair and head: Q·Kᵀ and P·V); a ratio is baseline time / our time, so
above 1 means sparse_attn is faster. Baselines are used only when installed. This module holds no
attention logic: it calls the public API and the baselines' public APIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

import sparse_attn as sa

from . import layout as _layout

__all__ = ["CASES", "Case", "Result", "bigbird_layout", "main", "run_suite", "run_targets"]

CASE_NAMES = ("dense", "causal", "window", "longformer", "bigbird", "strided")
BASELINE_NAMES = ("numpy", "sdpa", "sdpa_mask", "flex", "ort")
DEFAULT_LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (1024, 4096)

WINDOW = 256  # sliding window +-256 (window and Longformer cases)
GLOBAL_TOKENS = 16  # Longformer's global tokens: positions 0..15
BIGBIRD = {"block": 64, "window_blocks": 3, "global_blocks": 2, "random_blocks": 3, "seed": 0}
STRIDE, STRIDE_WINDOW = 128, 64  # strided case: Strided(128) | SlidingWindow(64)

NUMPY_MAX_LEN = 8192  # NumPy holds B x H x L x L float32 scores: 2 GiB at H = 8, L = 8192
MASK_MAX_BYTES = 2 * 1024**3  # SDPA's L x L bool mask is skipped above this
SGEMM_SIZE = 4096
FLEX_BLOCK = 128  # FlexAttention's default block size
MISMATCH_TOL = {"float32": 2e-3, "float64": 1e-8}  # max |baseline - ours| before we flag it
LONG_CALL_S = 2.0  # implementations whose calls take longer than this get at most 3 timed runs

# ---- the cases --------------------------------------------------------------------------------


def bigbird_layout(L: int, block=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0):
    """BigBird at block level as a bool (blocks, blocks) array: ``window_blocks`` blocks centred on
    the diagonal, the first ``global_blocks`` blocks as global rows and columns, and per other
    row ``random_blocks`` seeded random blocks among those not yet set."""
    n = -(-L // block)
    layout = np.zeros((n, n), dtype=np.bool_)
    rows = np.arange(n)
    for offset in range(-(window_blocks // 2), window_blocks // 2 + 1):
        cols = rows + offset
        keep = (cols >= 0) & (cols < n)
        layout[rows[keep], cols[keep]] = True
    layout[:global_blocks, :] = True
    layout[:, :global_blocks] = True
    rng = np.random.default_rng(seed)
    for r in range(global_blocks, n):
        free = np.flatnonzero(~layout[r])
        if free.size:
            layout[r, rng.choice(free, size=min(random_blocks, free.size), replace=False)] = True
    return layout


@functools.lru_cache(maxsize=16)
def case_pattern(name: str, L: int) -> sa.Pattern:
    """The pattern of a case at sequence length L (BigBird's block layout depends on L)."""
    if name == "dense":
        return sa.Dense()
    if name == "causal":
        return sa.Causal()
    if name == "window":
        return sa.SlidingWindow(WINDOW)
    if name == "longformer":
        return sa.SlidingWindow(WINDOW) | sa.Global(range(GLOBAL_TOKENS))
    if name == "bigbird":
        if hasattr(sa, "BigBird"):
            return sa.BigBird(**BIGBIRD)
        params = {k: v for k, v in BIGBIRD.items() if k != "block"}
        return sa.BlockSparse(bigbird_layout(L, BIGBIRD["block"], **params), BIGBIRD["block"])
    if name == "strided":
        return sa.Strided(STRIDE) | sa.SlidingWindow(STRIDE_WINDOW)
    raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASE_NAMES)}")


def _mask_mod(name: str, L: int):
    """The same pattern as a FlexAttention mask_mod (torch ops on index tensors); None = dense."""
    if name == "dense":
        return None
    if name == "causal":
        return lambda b, h, q, kv: q >= kv
    if name == "window":
        return lambda b, h, q, kv: (q - kv <= WINDOW) & (kv - q <= WINDOW)
    if name == "longformer":
        return lambda b, h, q, kv: (
            ((q - kv <= WINDOW) & (kv - q <= WINDOW)) | (q < GLOBAL_TOKENS) | (kv < GLOBAL_TOKENS)
        )
    if name == "bigbird":
        import torch

        block = BIGBIRD["block"]
        blocks = torch.from_numpy(case_pattern(name, L).block_layout(L, L, block))
        return lambda b, h, q, kv: blocks[q // block, kv // block]
    if name == "strided":
        return lambda b, h, q, kv: (
            ((q - kv) % STRIDE == 0) | ((q - kv <= STRIDE_WINDOW) & (kv - q <= STRIDE_WINDOW))
        )
    raise ValueError(name)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str


CASES = {
    "dense": Case("dense", "sa.Dense()"),
    "causal": Case("causal", "sa.Causal()"),
    "window": Case("window", f"sa.SlidingWindow({WINDOW})"),
    "longformer": Case(
        "longformer", f"sa.SlidingWindow({WINDOW}) | sa.Global(range({GLOBAL_TOKENS}))"
    ),
    "bigbird": Case(
        "bigbird",
        "sa.BigBird(block=64, window_blocks=3, global_blocks=2, random_blocks=3, seed=0)"
        if hasattr(sa, "BigBird")
        else "sa.BlockSparse(bigbird_layout(L), 64): block 64, 3 window + 2 global + 3 random "
        "blocks (numpy, seed 0)",
    ),
    "strided": Case("strided", f"sa.Strided({STRIDE}) | sa.SlidingWindow({STRIDE_WINDOW})"),
}

# ---- measurement primitives --------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One (case, L, implementation) entry. Times in ms; FLOP rates count allowed pairs only."""

    case: str
    L: int
    impl: str  # "ours" or a baseline name
    density: float = 0.0
    ms: float | None = None  # median of the timed runs
    times_ms: list = dataclasses.field(default_factory=list)
    gflops: float | None = None  # useful GFLOP/s: 4·D·nnz·H·B / time
    ratio: float | None = None  # baseline time / our time (baselines only)
    peak_mb: float | None = None  # peak RSS during one cold call minus RSS before it (subprocess)
    compile_s: float | None = None  # flex: first call minus steady state
    max_abs_err: float | None = None  # against our output on the same inputs
    detail: str = ""  # what exactly ran (e.g. "is_causal=True")
    note: str = ""  # why it was skipped, or a warning


def _median_ms(times: list) -> float:
    return statistics.median(times) * 1e3


def _timed(fn, repeats: int):
    """One warm-up call (its output is returned for checking), then up to ``repeats`` timed calls
    (at most 3 when the warm-up took longer than LONG_CALL_S). Returns (out, first_s, times_s)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    runs = repeats if first < LONG_CALL_S else min(repeats, 3)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, first, times


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM), which, unlike ru_maxrss, is not inherited over exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(L: int, heads: int, dim: int, batch: int, dtype: str, seed: int = 0):
    """q, k, v of shape (batch, heads, L, dim), standard normal, drawn without temporaries."""
    rng = np.random.default_rng(seed)
    shape = (batch, heads, L, dim)
    return tuple(rng.standard_normal(shape, dtype=np.dtype(dtype)) for _ in range(3))


def numpy_attention(q, k, v, causal=False):
    """Plain NumPy softmax(Q·Kᵀ/sqrt(D))·V with the whole L x L score matrix."""
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= 1.0 / math.sqrt(q.shape[-1])
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.matmul(s, v)


def _import_torch(threads: int):
    """torch with its thread count set, or (None, reason)."""
    try:
        import torch
    except ImportError as exc:
        return None, f"torch not installed ({exc})"
    torch.set_num_threads(threads)
    return torch, ""


def _flex_block_mask(pattern, mask_mod, L: int):
    """FlexAttention's BlockMask at 128 x 128 blocks, read off sparse_attn's compiled 64 x 64 tile
    layout (a 128-block is full when its four tiles are full, listed when any is). This is what
    ``create_block_mask`` would build, without its L x L evaluation (4 GB at L = 16384)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    kinds = _layout.compile_layout(pattern, L, L, 64, 64).kinds()
    n = -(-L // FLEX_BLOCK)
    padded = np.zeros((2 * n, 2 * n), dtype=np.uint8)
    padded[: kinds.shape[0], : kinds.shape[1]] = kinds
    # Padding tiles count as full, so a short last block can still be full.
    padded[kinds.shape[0] :, :] = 2
    padded[:, kinds.shape[1] :] = 2
    quad = padded.reshape(n, 2, n, 2)
    full = (quad == 2).all(axis=(1, 3))
    listed = (quad != 0).any(axis=(1, 3))
    partial = listed & ~full

    def indices(blocks):
        counts = torch.from_numpy(blocks.sum(axis=1).astype(np.int32))[None, None]
        order = np.argsort(~blocks, axis=1, kind="stable").astype(np.int32)
        return counts, torch.from_numpy(np.ascontiguousarray(order))[None, None]

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(L, L),
    )


class _OrtCausal:
    """ONNX Runtime's CPU ``com.microsoft.SparseAttention`` with a causal block layout (block 64,
    every block on or below the diagonal). The op is causal-only, float32-only; it takes
    (B, L, H·D) inputs, converted once here (not timed), and writes K, V into a present cache
    that must share memory with the past cache (hence the IO binding)."""

    def __init__(self, q, k, v, threads: int, block: int = 64):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        B, H, L, D = q.shape
        nb = -(-L // block)
        counts = np.arange(1, nb + 1, dtype=np.int64)
        row_index = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)[None]
        col_index = np.concatenate([np.arange(r + 1) for r in range(nb)]).astype(np.int32)[None]
        f32, i32 = TensorProto.FLOAT, TensorProto.INT32
        names = [
            "query",
            "key",
            "value",
            "past_key",
            "past_value",
            "block_row_indices",
            "block_col_indices",
            "total_sequence_length",
            "key_total_sequence_lengths",
        ]
        shapes = (
            [(f32, [B, L, H * D])] * 3
            + [(f32, [B, H, L, D])] * 2
            + [(i32, list(row_index.shape)), (i32, list(col_index.shape)), (i32, []), (i32, [B])]
        )
        inputs = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in zip(names, shapes)]
        outputs = [
            helper.make_tensor_value_info(n, f32, None)
            for n in ("output", "present_key", "present_value")
        ]
        node = helper.make_node(
            "SparseAttention",
            names,
            ["output", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=H,
            kv_num_heads=H,
            sparse_block_size=block,
            scale=1.0 / math.sqrt(D),
        )
        model = helper.make_model(
            helper.make_graph([node], "sparse_attention", inputs, outputs),
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

        def bsh(x):  # (B, H, L, D) -> (B, L, H * D)
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B, L, H * D))

        self._keep = [
            bsh(q),
            bsh(k),
            bsh(v),
            row_index,
            col_index,
            np.array(L, dtype=np.int32),
            np.full(B, L, dtype=np.int32),
        ]
        self.binding = self.session.io_binding()
        for name, array in zip(names[:3] + names[5:], self._keep):
            self.binding.bind_cpu_input(name, array)
        cache = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((B, H, L, D), np.float32)) for _ in range(2)
        ]
        self.out = ort.OrtValue.ortvalue_from_numpy(np.empty((B, L, H * D), np.float32))
        for name, value in zip(("past_key", "past_value"), cache):
            self.binding.bind_ortvalue_input(name, value)
        for name, value in zip(("present_key", "present_value"), cache):
            self.binding.bind_ortvalue_output(name, value)
        self.binding.bind_ortvalue_output("output", self.out)
        self.shape = (B, H, L, D)

    def __call__(self):
        self.session.run_with_iobinding(self.binding)
        B, H, L, D = self.shape
        return self.out.numpy().reshape(B, L, H, D).transpose(0, 2, 1, 3)


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", "?")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f") if x in flags)
    except OSError:
        pass
    return "?"


def _numpy_thread_limit(threads: int):
    """A context limiting NumPy's BLAS to ``threads`` (threadpoolctl), or None if unavailable."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def sgemm_ceiling(threads: int, size: int = SGEMM_SIZE, repeats: int = 3) -> dict:
    """float32 GEMM GFLOP/s of torch (MKL) and NumPy at size³: the ceiling for dense attention."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops = 2.0 * size**3
    out = {"size": size}
    _, _, times = _timed(lambda: a @ b, repeats)
    out["numpy_gflops"] = flops / statistics.median(times) / 1e9
    torch, reason = _import_torch(threads)
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        _, _, times = _timed(lambda: ta @ tb, repeats)
        out["torch_gflops"] = flops / statistics.median(times) / 1e9
    else:
        out["torch_gflops"] = None
        out["torch_note"] = reason
    return out


def machine_info(args) -> dict:
    info = sa.build_info()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            [os.path.basename(sys.executable), "-m", "sparse_attn.bench", *sys.argv[1:]]
        ),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "dtype": args.dtype,
        "shape": f"B={args.batch} H={args.heads} D={args.dim}",
        "sparse_attn": info.get("version"),
        "sparse_attn_simd": info.get("simd"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _module_version("torch"),
        "onnxruntime": _module_version("onnxruntime"),
        "platform": platform.platform(),
        "load_average_start": _load_average(),
    }


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ---- one measurement per implementation ---------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """One implementation prepared for an entry: a zero-argument call and what follows it."""

    fn: Callable
    to_numpy: Callable = lambda out: out
    check: bool = True  # compare its warm-up output with ours
    after: Callable | None = None  # (result, run) -> None, once the timings are in
    work_key: str = ""  # sdpa: the case whose time predicts the next length's
    compiles: bool = False  # the first call includes a compile (flex)
    first: float = 0.0  # seconds of the warm-up call
    rounds: int = 0
    times: list = dataclasses.field(default_factory=list)


def _failure(exc: Exception) -> str:
    return f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


class Suite:
    """Runs (case, L) entries for sparse_attn and the requested baselines; keeps the results."""

    def __init__(self, args):
        self.args = args
        self.results: list[Result] = []
        self.ceiling: dict = {}
        self._inputs_L = None
        self._inputs = None
        self._dense_sdpa: dict = {}  # L -> the dense SDPA Result, shared by the cases
        self._last: dict = {}  # (impl, case) -> (work, seconds): for the time estimate
        self.torch, self.torch_note = (
            (None, "") if not self._wants_torch() else _import_torch(args.threads)
        )
        self._numpy_limit = _numpy_thread_limit(args.threads)
        self.overhead = self.memory_probe = self.portable = self.rates = None  # --targets

    def _wants_torch(self):
        return any(b in self.args.baselines for b in ("sdpa", "sdpa_mask", "flex"))

    def log(self, message: str):
        print(message, file=sys.stderr, flush=True)

    def inputs(self, L: int):
        if self._inputs_L != L:
            self._inputs = None
            gc.collect()
            a = self.args
            self._inputs = make_inputs(L, a.heads, a.dim, a.batch, a.dtype, a.seed)
            self._inputs_L = L
            self._dense_sdpa.clear()
        return self._inputs

    # Work a call does, to predict the next length's time from the last one measured.
    @staticmethod
    def _work(impl: str, L: int, nnz: int) -> float:
        return float(nnz) if impl in ("ours", "flex", "ort") else float(L) * L

    def _too_long(self, impl: str, case: str, L: int, nnz: int) -> str:
        last = self._last.get((impl, case))
        if last is None:
            return ""
        work, seconds = last
        estimate = seconds * self._work(impl, L, nnz) / work
        if estimate > self.args.max_call_s:
            limit = self.args.max_call_s
            return f"skipped: estimated {estimate:.0f} s per call > --max-call-s {limit:g}"
        return ""

    def _record(self, res: Result, nnz: int, times: list, key: tuple):
        a = self.args
        res.times_ms = [t * 1e3 for t in times]
        res.ms = _median_ms(times)
        res.gflops = 4.0 * a.dim * nnz * a.heads * a.batch / (res.ms / 1e3) / 1e9
        self._last[key] = (self._work(key[0], res.L, nnz), res.ms / 1e3)

    def run_entry(self, case: str, L: int, impls) -> list[Result]:
        """Measure sparse_attn and each baseline in ``impls`` on one (case, L).

        Every implementation gets one warm-up call (checked against ours), then the timed calls
        run in interleaved rounds (ours, b1, b2, ours, b1, ...), so that load from other
        processes on a shared machine falls on all of them alike and the ratios stay fair."""
        a = self.args
        pattern = case_pattern(case, L)
        nnz = pattern.nnz(L, L)
        density = nnz / (L * L)
        self.inputs(L)
        entry = {"ours": Result(case, L, "ours", density, detail=f"threads={a.threads}")}
        runs = {}  # impl -> _Run
        reason = self._too_long("ours", case, L, nnz)
        if reason:
            entry["ours"].note = reason
        else:
            runs["ours"] = self._prepare_ours(pattern, L)
        for impl in impls:
            res = Result(case, L, impl, density)
            try:
                prepared = self._prepare(res, impl, case, L, nnz, pattern)
            except Exception as exc:  # noqa: BLE001 (a baseline failing is reported, never fatal)
                prepared = _failure(exc)
            if prepared is None:
                continue  # not applicable to this case
            entry[impl] = res
            if isinstance(prepared, str):
                res.note = prepared
            else:
                runs[impl] = prepared

        # Warm-up (and, for flex, compile), in order; ours first so the others can be checked.
        ours_out = None
        for impl, run in list(runs.items()):
            res = entry[impl]
            time.sleep(0.05)  # let the previous runtime's worker threads go idle
            try:
                gc.collect()
                t0 = time.perf_counter()
                out = run.fn()
                run.first = time.perf_counter() - t0
                out = run.to_numpy(out)
            except Exception as exc:  # noqa: BLE001 (reported in the table, never fatal)
                res.note = _failure(exc)
                del runs[impl]
                continue
            if run.compiles:  # the first call compiled: time a second one to plan the rounds
                t0 = time.perf_counter()
                run.fn()
                steady = time.perf_counter() - t0
            else:
                steady = run.first
            if impl == "ours":
                ours_out = out
            elif run.check:
                self._check(res, out, ours_out)
            del out
            run.rounds = a.repeats if steady < LONG_CALL_S else min(a.repeats, 3)
        for r in range(max((run.rounds for run in runs.values()), default=0)):
            for impl, run in runs.items():
                if r < run.rounds:
                    time.sleep(0.02)
                    t0 = time.perf_counter()
                    run.fn()
                    run.times.append(time.perf_counter() - t0)

        ours = entry["ours"]
        for impl, run in runs.items():
            res = entry[impl]
            self._record(res, nnz, run.times, (impl, run.work_key or case))
            if run.after is not None:
                run.after(res, run)
        runs.clear()
        for impl, res in entry.items():
            if res.ms is not None:
                if res.peak_mb is None and impl != "flex":
                    res.peak_mb = self._memory(impl, case, L)
                if impl != "ours" and ours.ms is not None:
                    res.ratio = res.ms / ours.ms
            shown = _fmt_ms(res.ms) + (f" ({res.ratio:.2f}x)" if res.ratio else "")
            self.log(f"[{case} L={L}] {impl}: {shown if res.ms else res.note}")
        self.results.extend(entry.values())
        return list(entry.values())

    def _check(self, res: Result, out, ours_out):
        if ours_out is None or out is None:
            return
        res.max_abs_err = float(np.max(np.abs(out.astype(ours_out.dtype, copy=False) - ours_out)))
        if res.max_abs_err > MISMATCH_TOL[self.args.dtype]:
            res.note = (res.note + "; " if res.note else "") + (
                f"MISMATCH: max |{res.impl} - ours| = {res.max_abs_err:.3g}"
            )

    def _prepare_ours(self, pattern, L):
        q, k, v = self.inputs(L)
        threads = self.args.threads
        return _Run(lambda: sa.attention(q, k, v, pattern, threads=threads))

    def _prepare(self, res, impl, case, L, nnz, pattern):
        """A _Run for one baseline, a skip reason (str), or None when it does not apply."""
        a = self.args
        q, k, v = self.inputs(L)
        if impl == "numpy":
            if case != "dense":
                return None
            if L > NUMPY_MAX_LEN:
                return f"skipped: L > {NUMPY_MAX_LEN} (the L x L scores would not fit)"
            res.detail = "softmax(QKᵀ)V, L x L scores" + (
                "" if self._numpy_limit is not None else " (BLAS threads: library default)"
            )
            return self._too_long(impl, case, L, nnz) or _Run(lambda: numpy_attention(q, k, v))
        if impl == "ort":
            if case != "causal":
                return None  # the op only computes causal block layouts
            if a.dtype != "float32":
                return "skipped: SparseAttention's CPU kernel is float32 only"
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                return f"skipped: onnxruntime/onnx not installed ({exc.name})"
            if reason := self._too_long(impl, case, L, nnz):
                return reason
            res.detail = "com.microsoft.SparseAttention, causal block layout, block 64"
            return _Run(_OrtCausal(q, k, v, a.threads))
        torch = self.torch
        if torch is None:
            return f"skipped: {self.torch_note}"
        F = torch.nn.functional
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

        def to_numpy(tensor):
            return tensor.numpy()

        if impl == "sdpa":
            causal = case == "causal"
            res.detail = "is_causal=True" if causal else "dense (no mask)"
            work_key = "causal" if causal else "dense"
            dense = self._dense_sdpa.get(L)
            if not causal and dense is not None:  # the same dense run serves every case
                res.ms, res.times_ms, res.peak_mb = dense.ms, dense.times_ms, dense.peak_mb
                res.gflops = dense.gflops / dense.density * res.density
                res.detail += f", measured with the {dense.case} case"
                return ""  # nothing left to run
            if reason := self._too_long(impl, work_key, L, nnz):
                return reason

            def after(res, run):
                if not causal:
                    self._dense_sdpa[L] = res

            return _Run(
                lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal),
                to_numpy,
                check=case in ("dense", "causal"),
                after=after,
                work_key=work_key,
            )
        if impl == "sdpa_mask":
            if L * L > MASK_MAX_BYTES:
                return f"skipped: the L x L bool mask would take {L * L / 2**30:.0f} GiB"
            if reason := self._too_long(impl, case, L, nnz):
                return reason
            mask = torch.from_numpy(pattern.to_mask(L, L))
            res.detail = "attn_mask = pattern.to_mask(L, L) (bool)"
            return _Run(
                lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask), to_numpy
            )
        if impl == "flex":
            try:
                from torch.nn.attention.flex_attention import flex_attention
            except ImportError as exc:
                return f"skipped: flex_attention unavailable ({exc})"
            if reason := self._too_long(impl, case, L, nnz):
                return reason
            mask_mod = _mask_mod(case, L)
            t0 = time.perf_counter()
            block_mask = None if mask_mod is None else _flex_block_mask(pattern, mask_mod, L)
            mask_s = time.perf_counter() - t0
            torch._dynamo.reset()  # a clean compile per entry, so its time is this entry's
            compiled = torch.compile(flex_attention, dynamic=False)
            res.detail = "torch.compile(flex_attention), " + (
                f"BlockMask {FLEX_BLOCK}x{FLEX_BLOCK} ({mask_s * 1e3:.0f} ms to build)"
                if block_mask is not None
                else "no block mask"
            )

            def call():
                with torch.inference_mode():
                    return compiled(tq, tk, tv, block_mask=block_mask)

            def after(res, run):  # the warm-up call compiled: the rest of it is steady state
                res.compile_s = max(0.0, run.first - res.ms / 1e3)

            return _Run(call, to_numpy, after=after, compiles=True)
        raise ValueError(f"unknown baseline {impl!r}")

    def _memory(self, impl: str, case: str, L: int) -> float | None:
        mode = self.args.memory
        if mode == "none" or (mode == "ours" and impl != "ours"):
            return None
        child = run_child(self.args, {"kind": "memory", "impl": impl, "case": case, "L": L})
        return child.get("delta_mb") if child.get("ok") else None


def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


# ---- subprocess probes: memory, SIMD level ------------------------------------------------------


def _child_args(args) -> dict:
    return {k: getattr(args, k) for k in ("heads", "dim", "batch", "threads", "dtype", "seed")}


def run_child(
    args, spec: dict, env_extra: dict | None = None, env_remove=(), timeout: float = 900
) -> dict:
    """Run one probe in a fresh interpreter (so its memory and SIMD level are its own)."""
    spec = {**_child_args(args), **spec}
    env = {k: v for k, v in os.environ.items() if k not in env_remove}
    env.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    env.setdefault("MKL_NUM_THREADS", str(args.threads))
    env.update(env_extra or {})
    code = "import sys, sparse_attn.bench as b; b._child_main(sys.argv[1])"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _child_main(spec_json: str) -> None:
    """Entry point of a probe process: prints one JSON line."""
    spec = json.loads(spec_json)
    kind = spec["kind"]
    if kind == "memory":
        print(json.dumps(_child_memory(spec)))
    elif kind == "time":
        print(json.dumps(_child_time(spec)))
    else:
        raise ValueError(kind)


def _child_call(spec):
    """The inputs and a zero-argument call for one implementation; returns (fn, extra_mb)."""
    impl, case, L = spec["impl"], spec["case"], spec["L"]
    q, k, v = make_inputs(L, spec["heads"], spec["dim"], spec["batch"], spec["dtype"], spec["seed"])
    if impl == "ours":
        pattern = case_pattern(case, L)
        return (lambda: sa.attention(q, k, v, pattern, threads=spec["threads"])), (q, k, v)
    if impl == "numpy":
        return (lambda: numpy_attention(q, k, v)), (q, k, v)
    if impl == "ort":
        runner = _OrtCausal(q, k, v, spec["threads"])
        return runner, (q, k, v, *runner._keep)
    torch, _ = _import_torch(spec["threads"])
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    F = torch.nn.functional
    if impl == "sdpa":
        causal = case == "causal"
        return (lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)), (q, k, v)
    if impl == "sdpa_mask":
        mask_np = case_pattern(case, L).to_mask(L, L)
        mask = torch.from_numpy(mask_np)
        return (lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)), (
            q,
            k,
            v,
            mask_np,
        )
    raise ValueError(impl)


def _child_memory(spec) -> dict:
    """Peak RSS of one cold call (first call in a fresh process) minus the RSS just before it.
    Inputs are allocated before and excluded; the output is included."""
    if spec["impl"] in ("sdpa", "sdpa_mask"):
        _import_torch(spec["threads"])
    import_rss = _rss_mb()
    fn, held = _child_call(spec)
    inputs_mb = sum(x.nbytes for x in held) / 2**20
    gc.collect()
    before = _rss_mb()
    reset = _reset_peak()  # without it, VmHWM may still hold an earlier, higher peak
    out = fn()
    peak = _peak_mb()
    out_mb = (out.nbytes if hasattr(out, "nbytes") else out.numel() * out.element_size()) / 2**20
    return {
        "ok": True,
        "import_rss_mb": import_rss,
        "rss_before_mb": before,
        "peak_mb": peak,
        "delta_mb": max(0.0, peak - before),
        "inputs_mb": inputs_mb,
        "outputs_mb": out_mb,
        "peak_reset": reset,
    }


def _child_time(spec) -> dict:
    fn, _ = _child_call(spec)
    _, _, times = _timed(fn, spec.get("repeats", 3))
    return {"ok": True, "ms": _median_ms(times), "simd": sa.build_info().get("simd")}


def run_suite(args, suite: Suite) -> list[Result]:
    """Every requested (case, L), lengths ascending so that slow entries can be predicted."""
    for L in args.lengths:
        for case in args.cases:
            suite.run_entry(case, L, args.baselines)
    return suite.results


# ---- the targets --------------------------------------------------------------------------------

# The performance goals (2 threads, float32, B=1, H=8, D=64), checked by --targets.
TARGETS = {
    "dense_vs_sdpa": 1.2,
    "dense_vs_sgemm": 0.70,
    "window_vs_dense": 0.80,
    "window_vs_flex": 3.0,
    "window_vs_sdpa_mask": 25.0,
    "sparse_vs_dense": 0.70,
    "causal_vs_sdpa": 1.2,
    "compile_ms": 10.0,
    "overhead_us": 20.0,
    "memory_slack_mb": 64.0,
    "portable_ratio": 4.0,
}
COMPILE_LENGTH = 1_048_576
MEMORY_LENGTH = 262_144
PORTABLE_CASE, PORTABLE_LENGTH = "dense", 2048


def layout_compile_ms(pattern, L: int, repeats: int = 5) -> tuple[float, float]:
    """Median and best time (ms) of ``sparse_attn.layout.compile_layout`` on an empty cache:
    lowering the pattern, copying its data into C++, compiling the tile layout."""
    times = []
    for _ in range(repeats):
        _layout.clear_cache()
        t0 = time.perf_counter()
        _layout.compile_layout(pattern, L, L, 64, 64)
        times.append(time.perf_counter() - t0)
    _layout.clear_cache()
    return _median_ms(times), min(times) * 1e3


def call_overhead_us(threads: int, calls: int = 2000) -> dict:
    """Per-call time of ``sa.attention`` at H=1, L=64, D=64 (float32), median over 10 batches.
    ``empty``: a pattern with no allowed pair (``sa.Global([])``), so no tile is computed: the
    Python argument handling, the layout-cache lookup, the binding and the thread start-up.
    ``dense``: the same call with one 64 x 64 tile computed."""
    q, k, v = make_inputs(64, 1, 64, 1, "float32")
    q, k, v = q[0], k[0], v[0]  # (H=1, L, D)
    out = {}
    for label, pattern in (("empty", sa.Global([])), ("dense", sa.Dense())):
        for t in sorted({threads, 1}):
            sa.attention(q, k, v, pattern, threads=t)  # compiles and caches the layout
            per_batch = calls // 10
            batches = []
            for _ in range(10):
                t0 = time.perf_counter()
                for _ in range(per_batch):
                    sa.attention(q, k, v, pattern, threads=t)
                batches.append((time.perf_counter() - t0) / per_batch)
            out[f"{label}_us_threads{t}"] = statistics.median(batches) * 1e6
            out[f"{label}_us_threads{t}_min"] = min(batches) * 1e6
    return out


def _find(results, case, L, impl):
    for r in results:
        if r.case == case and r.L == L and r.impl == impl:
            return r
    return None


def interleaved_medians(calls: dict, rounds: int) -> dict:
    """Median seconds per call of each zero-argument call, timed in interleaved rounds after one
    warm-up each, so that a ratio of two of them sees the same background load."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _rate_block(args) -> dict:
    """GFLOP/s of torch SGEMM (4096³) and of our dense L=4096, window/BigBird/Longformer
    L=16384 calls, measured together in interleaved rounds (the rate-ratio targets)."""
    a = args
    calls, flops = {}, {}
    torch, _ = _import_torch(a.threads)
    rng = np.random.default_rng(1)
    ga, gb = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE), dtype=np.float32) for _ in range(2))
    if torch is not None:
        ta, tb = torch.from_numpy(ga), torch.from_numpy(gb)
        calls["sgemm"] = lambda: ta @ tb
    else:
        calls["sgemm"] = lambda: ga @ gb
    flops["sgemm"] = 2.0 * SGEMM_SIZE**3
    inputs = {L: make_inputs(L, a.heads, a.dim, a.batch, a.dtype, a.seed) for L in (4096, 16384)}
    for case, L in (("dense", 4096), ("window", 16384), ("bigbird", 16384), ("longformer", 16384)):
        pattern = case_pattern(case, L)
        q, k, v = inputs[L]
        calls[case] = functools.partial(sa.attention, q, k, v, pattern, threads=a.threads)
        flops[case] = 4.0 * a.dim * pattern.nnz(L, L) * a.heads * a.batch
    seconds = interleaved_medians(calls, a.repeats)
    return {name: flops[name] / seconds[name] / 1e9 for name in calls} | {
        "sgemm_library": "torch" if torch is not None else "numpy"
    }


def run_targets(args, suite: Suite) -> list[dict]:
    """Measure what the targets need and compare. Returns one row per target."""
    rows = []

    def row(name, value, goal, shown, passed, note=""):
        status = "n/a" if value is None else ("PASS" if passed else "MISS")
        rows.append(
            {
                "target": name,
                "measured": shown if value is not None else "-",
                "goal": goal,
                "value": value,
                "status": status,
                "note": note,
            }
        )

    plan = [
        ("dense", 4096, ["sdpa"]),
        ("causal", 4096, ["sdpa", "ort"]),
        ("window", 16384, ["flex", "sdpa_mask"]),
    ]
    for case, L, impls in plan:
        suite.run_entry(case, L, [i for i in impls if i in args.baselines])

    def ratio_row(name, case, L, impl, goal, threshold):
        r = _find(suite.results, case, L, impl)
        value = r.ratio if r is not None and r.ratio else None
        shown = f"{value:.2f}x ({r.ms:.0f} / {r.ms / value:.0f} ms)" if value else ""
        row(
            name,
            value,
            goal,
            shown,
            value is not None and value >= threshold,
            (r.note if r else "not run") if value is None else r.detail,
        )

    ratio_row(
        "dense L=4096: SDPA time / ours", "dense", 4096, "sdpa", ">= 1.2x", TARGETS["dense_vs_sdpa"]
    )
    ratio_row(
        "causal L=4096: SDPA is_causal time / ours",
        "causal",
        4096,
        "sdpa",
        ">= 1.2x",
        TARGETS["causal_vs_sdpa"],
    )
    ratio_row(
        "window ±256 L=16384: flex_attention time / ours",
        "window",
        16384,
        "flex",
        ">= 3x",
        TARGETS["window_vs_flex"],
    )
    ratio_row(
        "window ±256 L=16384: SDPA + bool mask time / ours",
        "window",
        16384,
        "sdpa_mask",
        ">= 25x",
        TARGETS["window_vs_sdpa_mask"],
    )

    suite.log("[targets] GFLOP/s: SGEMM and our calls, interleaved")
    rates = _rate_block(args)
    suite.rates = rates
    dense = rates["dense"]
    row(
        f"dense L=4096: our GFLOP/s / {rates['sgemm_library']} SGEMM 4096³ GFLOP/s",
        dense / rates["sgemm"],
        ">= 70 %",
        f"{100 * dense / rates['sgemm']:.0f} % ({dense:.0f} / {rates['sgemm']:.0f})",
        dense / rates["sgemm"] >= TARGETS["dense_vs_sgemm"],
    )
    for case, goal, threshold in (
        ("window", ">= 80 %", TARGETS["window_vs_dense"]),
        ("bigbird", ">= 70 %", TARGETS["sparse_vs_dense"]),
        ("longformer", ">= 70 %", TARGETS["sparse_vs_dense"]),
    ):
        frac = rates[case] / dense
        row(
            f"{case} L=16384: GFLOP/s / our dense GFLOP/s (L=4096)",
            frac,
            goal,
            f"{100 * frac:.0f} % ({rates[case]:.0f} / {dense:.0f})",
            frac >= threshold,
        )

    suite.log("[targets] layout compile at L=1,048,576")
    for case in ("window", "bigbird"):
        pattern = case_pattern(case, COMPILE_LENGTH)
        ms, best = layout_compile_ms(pattern, COMPILE_LENGTH)
        row(
            f"layout compile, {case} L=1,048,576 (empty cache)",
            ms,
            "< 10 ms",
            f"{ms:.1f} ms",
            ms < TARGETS["compile_ms"],
            f"{CASES[case].description}; best of 5: {best:.1f} ms",
        )
    case_pattern.cache_clear()  # drops a BlockSparse BigBird layout at 1M (256 MiB), if any
    gc.collect()

    suite.log("[targets] per-call overhead")
    overhead = call_overhead_us(args.threads)
    suite.overhead = overhead
    t = args.threads
    empty, best = overhead[f"empty_us_threads{t}"], overhead[f"empty_us_threads{t}_min"]
    row(
        f"per-call overhead H=1 L=64 D=64, threads={t} (no tile computed)",
        empty,
        "< 20 µs",
        f"{empty:.1f} µs",
        empty < TARGETS["overhead_us"],
        f"best batch {best:.1f} µs; with its one dense tile computed: "
        f"{overhead[f'dense_us_threads{t}']:.1f} µs; threads=1, no tile: "
        f"{overhead['empty_us_threads1']:.1f} µs",
    )

    suite.log("[targets] memory, window ±256 at L=262,144 (subprocess)")
    spec = {
        "kind": "memory",
        "impl": "ours",
        "case": "window",
        "L": MEMORY_LENGTH,
        "heads": 8,
        "dim": 64,
        "batch": 1,
        "dtype": "float32",
    }
    mem = suite.memory_probe = run_child(args, spec)
    if mem.get("ok"):
        used = mem["peak_mb"] - mem["import_rss_mb"]
        allowed = mem["inputs_mb"] + mem["outputs_mb"] + TARGETS["memory_slack_mb"]
        row(
            "memory, window ±256 L=262,144 (B=1 H=8 D=64): peak RSS - RSS after import",
            used,
            f"< inputs + outputs + 64 MB = {allowed:.0f} MB",
            f"{used:.0f} MB",
            used < allowed,
            f"inputs {mem['inputs_mb']:.0f} MB, output {mem['outputs_mb']:.0f} MB; the call's "
            f"own peak over its inputs: {mem['delta_mb']:.0f} MB",
        )
    else:
        row(
            "memory, window ±256 L=262,144",
            None,
            "< inputs + outputs + 64 MB",
            "",
            False,
            mem.get("error", ""),
        )

    suite.log(f"[targets] portable path ({PORTABLE_CASE} L={PORTABLE_LENGTH}, subprocesses)")
    spec = {
        "kind": "time",
        "impl": "ours",
        "case": PORTABLE_CASE,
        "L": PORTABLE_LENGTH,
        "repeats": 3,
    }
    fast = run_child(args, spec, env_remove=("SPARSE_ATTN_SIMD",))
    portable = run_child(args, spec, env_extra={"SPARSE_ATTN_SIMD": "generic"})
    suite.portable = {"default": fast, "generic": portable}
    if fast.get("ok") and portable.get("ok"):
        value = portable["ms"] / fast["ms"]
        row(
            f"portable path (SPARSE_ATTN_SIMD=generic) time / {fast['simd']}, {PORTABLE_CASE} "
            f"L={PORTABLE_LENGTH}",
            value,
            "<= 4x",
            f"{value:.2f}x ({portable['ms']:.0f} / {fast['ms']:.0f} ms)",
            value <= TARGETS["portable_ratio"],
            f"SIMD levels the two processes reported: {portable['simd']}, {fast['simd']}",
        )
    else:
        row(
            "portable path ratio",
            None,
            "<= 4x",
            "",
            False,
            fast.get("error") or portable.get("error", ""),
        )
    return rows


# ---- output -------------------------------------------------------------------------------------


def render_table(headers, rows, markdown: bool) -> str:
    cells = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def fmt(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _num(x, digits=3):
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


class _Notes:
    def __init__(self):
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def summary_table(results, baselines, ceiling, markdown: bool) -> tuple[str, list[str]]:
    """One row per (case, L): our time and rate, and each baseline as 'time (ratio)'."""
    notes = _Notes()
    keys = []
    for r in results:
        if (r.case, r.L) not in keys:
            keys.append((r.case, r.L))
    labels = {
        "numpy": "NumPy",
        "sdpa": "SDPA (dense / is_causal)",
        "sdpa_mask": "SDPA+mask",
        "flex": "flex",
        "ort": "ORT",
    }
    headers = ["case", "L", "density", "ours ms", "GFLOP/s", "% torch SGEMM", "Δpeak MB"] + [
        f"{labels[b]} ms (ratio)" for b in baselines
    ]
    gemm = ceiling.get("torch_gflops")
    rows = []
    for case, L in keys:
        ours = _find(results, case, L, "ours")
        row = [case, L, f"{ours.density:.4f}"]
        if ours.ms is None:
            row += [f"skip{notes.ref(ours.note)}", "-", "-", "-"]
        else:
            row += [
                _num(ours.ms),
                _num(ours.gflops),
                f"{100 * ours.gflops / gemm:.0f} %" if gemm else "-",
                _num(ours.peak_mb),
            ]
        for b in baselines:
            r = _find(results, case, L, b)
            if r is None:
                row.append("n/a")
            elif r.ms is None:
                row.append(f"skip{notes.ref(r.note)}")
            else:
                text = f"{_num(r.ms)} ({r.ratio:.2f}×)" if r.ratio else _num(r.ms)
                if r.note:
                    text += " " + notes.ref(r.note)
                row.append(text)
        rows.append(row)
    return render_table(headers, rows, markdown), notes.texts


def detail_table(results, markdown: bool) -> str:
    headers = [
        "case",
        "L",
        "impl",
        "what ran",
        "ms (median)",
        "runs",
        "useful GFLOP/s",
        "ratio",
        "Δpeak MB",
        "compile s",
        "max |Δ| vs ours",
    ]
    rows = []
    for r in results:
        if r.ms is None:
            continue
        rows.append(
            [
                r.case,
                r.L,
                r.impl,
                r.detail,
                _num(r.ms),
                len(r.times_ms),
                _num(r.gflops),
                f"{r.ratio:.2f}×" if r.ratio else "-",
                _num(r.peak_mb),
                _num(r.compile_s),
                f"{r.max_abs_err:.1e}" if r.max_abs_err is not None else "-",
            ]
        )
    return render_table(headers, rows, markdown)


def targets_table(rows, markdown: bool) -> str:
    return render_table(
        ["target", "measured", "goal", "status", "note"],
        [[r["target"], r["measured"], r["goal"], r["status"], r["note"]] for r in rows],
        markdown,
    )


def header_text(meta, ceiling, args, markdown: bool) -> str:
    gemm = (
        f"torch (MKL) {_num(ceiling.get('torch_gflops'))} GFLOP/s, NumPy "
        f"{_num(ceiling.get('numpy_gflops'))} GFLOP/s (float32 {SGEMM_SIZE}³, median of 3)"
    )
    lines = [
        f"date: {meta['date']}",
        f"command: {meta['command']}",
        (
            f"cpu: {meta['cpu']} ({meta['logical_cpus']} logical CPUs; {meta['cpu_flags']}); "
            f"threads: {meta['threads']}"
        ),
        (
            f"problem: {meta['shape']}, {meta['dtype']}; FLOPs = 4·D·nnz·H·B (allowed pairs "
            "only); ratio = baseline time / our time (above 1: sparse_attn is faster)"
        ),
        f"SGEMM ceiling: {gemm}",
        (
            f"load average (1, 5, 15 min) at start: {meta['load_average_start']}; at end: "
            f"{meta.get('load_average_end', '?')} (a shared machine: other processes compete)"
        ),
        (
            f"versions: sparse_attn {meta['sparse_attn']} (SIMD {meta['sparse_attn_simd']}), "
            f"numpy {meta['numpy']}, torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
            f"python {meta['python']}"
        ),
        (
            f"timing: one warm-up, then up to {args.repeats} timed runs per implementation "
            f"(at most 3 when a call takes > {LONG_CALL_S:g} s), interleaved across the "
            f"implementations of an entry; medians; entries estimated above {args.max_call_s:g} s "
            "per call are skipped"
        ),
        (
            "Δpeak MB: peak RSS during one cold call in a fresh process (VmHWM reset through "
            "/proc/self/clear_refs) minus RSS just before it: inputs excluded, output included; "
            "not measured for flex (its compile would dominate). % torch SGEMM uses the ceiling "
            "measured once at the start: under a changing background load it can pass 100 %; "
            "--targets measures that ratio interleaved"
        ),
    ]
    return "\n".join(("- " + ln) if markdown else ln for ln in lines)


def cases_text(cases, markdown: bool) -> str:
    lines = [f"{c}: {CASES[c].description}" for c in cases]
    return "\n".join(("- " + ln) if markdown else ln for ln in lines)


def write_plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in CASE_NAMES if any(r.case == c for r in results)]
    cols = min(3, len(cases))
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    impls = ("ours", *BASELINE_NAMES)
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # one colour per impl everywhere
    labels = {
        "ours": "sparse_attn",
        "sdpa": "SDPA (dense; is_causal for causal)",
        "sdpa_mask": "SDPA + bool mask",
        "flex": "flex_attention (compiled)",
        "ort": "ORT SparseAttention",
        "numpy": "NumPy",
    }
    for ax, case in zip(axes.flat, cases):
        for impl in impls:
            points = sorted(
                (r.L, r.ms)
                for r in results
                if r.case == case and r.impl == impl and r.ms is not None
            )
            if points:
                xs, ys = zip(*points)
                ax.loglog(
                    xs,
                    ys,
                    marker="o",
                    label=labels[impl],
                    color=colors[impl],
                    linewidth=2.5 if impl == "ours" else 1.2,
                )
        lengths = sorted({r.L for r in results if r.case == case})
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_title(f"{case}: {CASES[case].description}"[:60], fontsize=9)
        ax.set_xlabel("L")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------


def _names(text: str, allowed, what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m sparse_attn.bench",
        description="Benchmark sparse_attn against NumPy, PyTorch SDPA, FlexAttention and ONNX "
        "Runtime on the same problems (FLOPs on allowed pairs; ratio = baseline / ours).",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASE_NAMES),
        help=f"comma-separated, from {','.join(CASE_NAMES)} (default: all)",
    )
    p.add_argument(
        "--lengths",
        default=None,
        help="comma-separated sequence lengths (default 1024,4096,16384,65536; --quick: 1024,4096)",
    )
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per entry after one warm-up; the median is reported "
        "(default 5; --quick: 3)",
    )
    p.add_argument(
        "--baselines",
        default=None,
        help=f"comma-separated, from {','.join(BASELINE_NAMES)}; each used only when "
        "installed (default: all; --quick: all but flex)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a subset that finishes in about 2 minutes: L in {1024, 4096}, 3 runs, "
        "no flex compile, memory probed for sparse_attn only",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="measure the performance targets instead of the case grid and print a pass/miss table",
    )
    p.add_argument(
        "--memory",
        choices=("all", "ours", "none"),
        default=None,
        help="which implementations get a peak-memory probe in a subprocess "
        "(default all; --quick: ours; --targets: none, besides its own probe)",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="skip an entry whose time per call, extrapolated from the previous "
        "length, exceeds this (default 30)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every result as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time against L per case")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = p.parse_args(argv)
    args.cases = _names(args.cases, CASE_NAMES, "case")
    default_baselines = [b for b in BASELINE_NAMES if not (args.quick and b == "flex")]
    args.baselines = (
        _names(args.baselines, BASELINE_NAMES, "baseline")
        if args.baselines is not None
        else default_baselines
    )
    lengths = args.lengths or ",".join(map(str, QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    try:
        args.lengths = sorted({int(x) for x in lengths.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--lengths must be integers, got {lengths!r}") from None
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.memory is None:
        args.memory = "none" if args.targets else ("ours" if args.quick else "all")
    for name in ("heads", "dim", "batch", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    suite = Suite(args)
    meta = machine_info(args)
    suite.log("measuring the SGEMM ceiling ...")
    suite.ceiling = sgemm_ceiling(args.threads)
    target_rows = []
    if args.targets:
        target_rows = run_targets(args, suite)
    else:
        run_suite(args, suite)

    meta["load_average_end"] = _load_average()
    md = args.markdown
    out = [
        header_text(meta, suite.ceiling, args, md),
        "",
        "cases:" if not md else "Cases:",
        cases_text(args.cases if not args.targets else CASE_NAMES, md),
        "",
    ]
    summary, notes = summary_table(suite.results, args.baselines, suite.ceiling, md)
    out += [summary, ""]
    if notes:
        out += [f"[{i + 1}] {text}" + ("  " if md else "") for i, text in enumerate(notes)]
        out.append("")
    out += ["Details:" if md else "details:", "", detail_table(suite.results, md), ""]
    if target_rows:
        out += ["Targets:" if md else "targets:", "", targets_table(target_rows, md), ""]
    print("\n".join(out))

    if args.json:
        payload = {
            "meta": meta,
            "args": {k: v for k, v in vars(args).items()},
            "ceiling": suite.ceiling,
            "cases": {c: CASES[c].description for c in CASE_NAMES},
            "results": [dataclasses.asdict(r) for r in suite.results],
            "targets": target_rows,
            "overhead": suite.overhead,
            "memory_probe": suite.memory_probe,
            "portable": suite.portable,
            "rates_gflops": suite.rates,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.plot:
        write_plot(suite.results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
