"""Argument normalisation for the public API: dtype and shape checks with messages that name
the argument, broadcasting, and the strided operand descriptions the kernels read.
Nothing here computes attention and nothing the caller passed is modified."""

from __future__ import annotations

import math
import numbers
import os
import threading
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_real(dtype: np.dtype) -> bool:
    """Float or integer, not bool: what a bias, ALiBi slopes or score weights may hold."""
    return dtype != np.bool_ and (np.issubdtype(dtype, np.floating)
                                  or np.issubdtype(dtype, np.integer))


def as_float_array(x, name: str) -> np.ndarray:
    """``np.asarray`` with a dtype check: float32 and float64 pass, everything else is refused."""
    if isinstance(x, np.ma.MaskedArray):  # asarray would drop the mask without a word
        raise TypeError(f"{name}: masked arrays are not supported; pass {name}.filled(...)")
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything asarray cannot take is a type error
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from None
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: dtype {arr.dtype} is not supported; pass float32 or float64 "
            f"(convert with {name}.astype(np.float32))"
        )
    return arr


def common_dtype(arrays: dict, what: str = "q, k, v") -> np.dtype:
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{n}={a.dtype}" for n, a in arrays.items())
        raise TypeError(f"{what} must share one dtype, got {listed}")
    return dtypes.pop()


@dataclass(frozen=True)
class Problem:
    """Shapes of one attention call after broadcasting."""

    batch_shape: tuple
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    dim_qk: int
    dim_v: int
    squeeze: bool  # the caller passed 2-D (L, D) arrays: drop the head axis on return

    @property
    def batch(self) -> int:
        return math.prod(self.batch_shape)

    def kernel_shape(self) -> dict:
        return dict(batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    len_q=self.len_q, len_k=self.len_k, dim_qk=self.dim_qk, dim_v=self.dim_v)

    def out_shape(self) -> tuple:
        return self.batch_shape + (self.heads_q, self.len_q, self.dim_v)

    def lse_shape(self) -> tuple:
        return self.batch_shape + (self.heads_q, self.len_q)

    def scores_shape(self) -> tuple:
        return self.batch_shape + (self.heads_q, self.len_q, self.len_k)


def problem_shape(q: np.ndarray, k: np.ndarray, v: np.ndarray | None) -> Problem:
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a is not None and a.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (L, D) or (..., H, L, D), "
                f"got shape {a.shape}"
            )
    q3, k3 = _with_head_axis(q), _with_head_axis(k)
    v3 = _with_head_axis(v) if v is not None else None
    heads_q, len_q, dim_qk = q3.shape[-3:]
    heads_kv, len_k, dim_k = k3.shape[-3:]
    if dim_k != dim_qk:
        raise ValueError(f"q and k must have the same head dim: q {q.shape}, k {k.shape}")
    dim_v = dim_qk
    if v3 is not None:
        heads_v, len_v, dim_v = v3.shape[-3:]
        if (heads_v, len_v) != (heads_kv, len_k):
            raise ValueError(
                f"k and v must agree on heads and length: k {k.shape}, v {v.shape}"
            )
    if dim_qk == 0:
        raise ValueError(f"the head dim of q and k must be >= 1, got q {q.shape}")
    if heads_q == 0 or heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"the query heads must be a positive multiple of the key/value heads (grouped-query "
            f"attention): Hq={heads_q}, Hkv={heads_kv} (q {q.shape}, k {k.shape})"
        )
    leads = [a.shape[:-3] for a in (q3, k3, v3) if a is not None]
    try:  # equal leading shapes (the common case) need no broadcasting
        same = all(lead == leads[0] for lead in leads)
        batch_shape = leads[0] if same else tuple(np.broadcast_shapes(*leads))
    except ValueError:
        shapes = ", ".join(str(a.shape) for a in (q, k, v) if a is not None)
        raise ValueError(f"the leading (batch) dimensions of q, k, v do not broadcast: {shapes}")
    # A 2-D q gives a 2-D result unless k or v bring batch dimensions.
    squeeze = q.ndim == 2 and batch_shape == ()
    return Problem(batch_shape, heads_q, heads_kv, len_q, len_k, dim_qk, dim_v, squeeze)


def _with_head_axis(a: np.ndarray) -> np.ndarray:
    return a[None] if a.ndim == 2 else a


_NO_BATCH_OFFSETS = np.zeros(1, dtype=np.int64)
_NO_BATCH_OFFSETS.flags.writeable = False


def operand(a: np.ndarray, batch_shape: tuple, tail: tuple, *, unit_col: bool) -> tuple:
    """The kernel's view of ``a`` broadcast to ``batch_shape + tail`` (tail = (H, rows, cols)):
    ``(array, batch_offsets, stride_head, stride_row, stride_col)`` in elements. Broadcast
    and grouped axes get stride 0; only a non-unit innermost stride forces a copy."""
    itemsize = a.itemsize
    if unit_col and a.shape[-1] > 1 and a.strides[-1] != itemsize:
        a = np.ascontiguousarray(a)
    if not a.flags.aligned or any(s % itemsize for s in a.strides):
        a = np.array(a, order="C")  # a copy: the kernels load whole, aligned elements
    target = batch_shape + tail
    view = a if a.shape == target else np.broadcast_to(a, target)
    strides = [s // itemsize for s in view.strides]
    if unit_col and (tail[-1] <= 1 or view.size == 0):
        strides[-1] = 1  # a single column, or an empty array, is never stepped over
    nb = len(batch_shape)
    if nb == 0:
        offsets = _NO_BATCH_OFFSETS
    else:
        offsets = np.zeros(batch_shape, dtype=np.int64)
        for axis, (n, s) in enumerate(zip(batch_shape, strides[:nb])):
            shape = [1] * nb
            shape[axis] = n
            offsets = offsets + (np.arange(n, dtype=np.int64) * s).reshape(shape)
        offsets = np.ascontiguousarray(offsets.reshape(-1))
    return (view, offsets, strides[nb], strides[nb + 1], strides[nb + 2])


def check_broadcast(arr: np.ndarray, target: tuple, name: str) -> None:
    try:
        shape = np.broadcast_shapes(arr.shape, target)
    except ValueError:
        shape = None
    if shape != tuple(target):
        raise ValueError(
            f"{name} of shape {arr.shape} does not broadcast to (..., Hq, Lq, Lk) = {target}"
        )


def mask_operand(mask, problem: Problem):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array (True = may attend), got dtype {m.dtype}")
    target = problem.scores_shape()
    check_broadcast(m, target, "mask")
    return operand(m.view(np.uint8), problem.batch_shape, target[-3:], unit_col=False)


def bias_operand(bias, problem: Problem, dtype: np.dtype):
    if bias is None:
        return None
    b = np.asarray(bias)
    if not _is_real(b.dtype):
        raise TypeError(f"bias must be a real (float) array, got dtype {b.dtype}")
    target = problem.scores_shape()
    check_broadcast(b, target, "bias")
    return operand(b.astype(dtype, copy=False), problem.batch_shape, target[-3:], unit_col=False)


def key_lengths_array(key_lengths, problem: Problem, key_offset: int = 0,
                      total_k: int | None = None):
    """Per flattened batch index, the local key limit: keys at absolute position >= length
    are padding."""
    if key_lengths is None:
        return None
    total_k = problem.len_k if total_k is None else total_k
    kl = np.asarray(key_lengths)
    if not np.issubdtype(kl.dtype, np.integer) or kl.dtype == np.bool_:
        raise TypeError(f"key_lengths must be an integer array, got dtype {kl.dtype}")
    try:
        kl = np.broadcast_to(kl, problem.batch_shape)
    except ValueError:
        raise ValueError(
            f"key_lengths of shape {kl.shape} does not broadcast to the batch shape "
            f"{problem.batch_shape}"
        ) from None
    if kl.size and (kl.min() < 0 or kl.max() > total_k):
        raise ValueError(
            f"key_lengths must lie in [0, Lk={total_k}], got values in "
            f"[{kl.min()}, {kl.max()}]"
        )
    local = np.clip(kl.reshape(-1).astype(np.int64) - key_offset, 0, problem.len_k)
    return np.ascontiguousarray(local, dtype=np.int64)


def resolve_scale(scale, dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def resolve_device(device) -> str:
    """The validated device argument; whether a GPU is usable is decided by _device.select."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu', 'cuda' or 'auto', got {type(device).__name__}")
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return device


def check_out(out, shape: tuple, dtype: np.dtype, inputs: dict) -> None:
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"out must have shape {shape} and dtype {dtype}, got {out.shape} {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, a in inputs.items():
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"out must not overlap the input {name}")


# Threads: a process default from SPARSE_ATTN_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs.
# At most MAX_THREADS: OpenMP ends the process when it cannot create a thread it was asked for.
MAX_THREADS = 1024
_threads_lock = threading.Lock()
_default_threads: list = []


def _threads_from_env() -> int:
    for var in ("SPARSE_ATTN_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), MAX_THREADS)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


def get_num_threads() -> int:
    """The number of kernel threads a call uses when ``threads=None``."""
    with _threads_lock:
        if not _default_threads:
            _default_threads.append(_threads_from_env())
        return _default_threads[0]


def set_num_threads(n: int) -> None:
    """Set the process-wide default number of kernel threads."""
    n = resolve_threads(n)
    with _threads_lock:
        _default_threads[:] = [n]


def resolve_threads(threads) -> int:
    if threads is None:
        return get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must lie in [1, {MAX_THREADS}], got {threads}")
    return int(threads)


SCORES = {"dot": 0, "cosine": 1, "additive": 2}
MODES = {"softmax": 0, "hard": 1, "weights": 2, "count": 3}


def resolve_score(score, score_params, dim: int, dtype: np.dtype):
    """The score kind, and for "additive" the checked (wq, wk, w) in the input dtype."""
    if not isinstance(score, str):
        raise TypeError(f"score must be a string, got {type(score).__name__}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {sorted(SCORES)}, got {score!r}")
    if score != "additive":
        if score_params is not None:
            raise ValueError(f"score_params is only used with score='additive', not {score!r}")
        return score, None
    if not isinstance(score_params, dict) or set(score_params) != {"wq", "wk", "w"}:
        raise ValueError("score='additive' needs score_params=dict(wq=(D, A), wk=(D, A), w=(A,))")
    wq, wk, w = (np.asarray(score_params[n]) for n in ("wq", "wk", "w"))
    for name, arr in (("wq", wq), ("wk", wk), ("w", w)):
        if not _is_real(arr.dtype):
            raise TypeError(f"score_params[{name!r}] must be a real array, got dtype {arr.dtype}")
    if wq.ndim != 2 or wk.ndim != 2 or w.ndim != 1 or wq.shape != wk.shape \
            or wq.shape[0] != dim or wq.shape[1] != w.shape[0] or w.shape[0] == 0:
        raise ValueError(
            f"score_params must hold wq (D, A), wk (D, A), w (A,) with D={dim} and A >= 1, got "
            f"wq {wq.shape}, wk {wk.shape}, w {w.shape}"
        )
    return score, tuple(a.astype(dtype, copy=False) for a in (wq, wk, w))


def resolve_softcap(softcap):
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be positive and finite, got {softcap}")
    return float(softcap)


def resolve_alibi(alibi_slopes, heads_q: int):
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if not _is_real(slopes.dtype):
        raise TypeError(f"alibi_slopes must be real numbers, got dtype {slopes.dtype}")
    if slopes.shape != (heads_q,):
        raise ValueError(
            f"alibi_slopes must hold one slope per query head: shape ({heads_q},), got "
            f"{slopes.shape}"
        )
    if not np.all(np.isfinite(slopes)):
        raise ValueError("alibi_slopes must be finite")
    return np.array(slopes, dtype=np.float64)  # a copy: aligned, whatever the caller's buffer


def resolve_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return float(value)


def resolve_seed(seed) -> int:
    """A seed for the counter-based draws; None draws a fresh one from the OS."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not (0 <= seed < 2**64):
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return int(seed)


def resolve_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


def resolve_offsets(query_offset, key_offset, total_lengths, problem: Problem):
    """Absolute positions of this call's first query and key inside a larger problem, and the
    full problem's lengths (for patterns that depend on them)."""
    q0 = _non_negative_int(query_offset, "query_offset")
    k0 = _non_negative_int(key_offset, "key_offset")
    if total_lengths is None:
        if q0 + problem.len_q > _POSITION_LIMIT or k0 + problem.len_k > _POSITION_LIMIT:
            raise ValueError(
                f"query_offset + Lq and key_offset + Lk must be at most 2**62, got "
                f"query_offset={q0}, Lq={problem.len_q}, key_offset={k0}, Lk={problem.len_k}"
            )
        return q0, k0, (q0 + problem.len_q, k0 + problem.len_k)
    if not isinstance(total_lengths, (tuple, list)) or len(total_lengths) != 2:
        raise TypeError("total_lengths must be a pair (total Lq, total Lk)")
    tq = _non_negative_int(total_lengths[0], "total_lengths[0]")
    tk = _non_negative_int(total_lengths[1], "total_lengths[1]")
    if q0 + problem.len_q > tq or k0 + problem.len_k > tk:
        raise ValueError(
            f"the window (query_offset={q0}, Lq={problem.len_q}; key_offset={k0}, "
            f"Lk={problem.len_k}) does not fit in total_lengths={tuple(total_lengths)}"
        )
    return q0, k0, (tq, tk)


_POSITION_LIMIT = 2**62  # as for pattern parameters: i + offset never overflows int64


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _POSITION_LIMIT:
        raise ValueError(f"{name} must lie in [0, 2**62], got {value}")
    return int(value)
