"""The NumPy float64 oracle: masked softmax attention computed the plain way, mask materialised.

Every test checks the C++ kernels against this module, so it stays short and obviously correct.
It shares nothing with the C++ core: masks come from the patterns' own NumPy ``to_mask``.
Never a code path that users are routed to.
"""

from __future__ import annotations

import math

import numpy as np

from .patterns import as_head_patterns

__all__ = [
    "allowed_mask",
    "attention",
    "attention_backward",
    "dropout_keep",
    "softmax_weights",
]


def allowed_mask(pattern, Lq: int, Lk: int, num_heads: int) -> np.ndarray:
    """The pattern's allowed pairs for each query head, as a bool array (num_heads, Lq, Lk)."""
    heads = as_head_patterns(pattern, num_heads)
    return np.stack([head.to_mask(Lq, Lk) for head in heads])


def _as_heads(x, name: str) -> np.ndarray:
    """``x`` as float64 with a head axis: (L, D) becomes (1, L, D)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (L, D), got shape {x.shape}")
    return x[None] if x.ndim == 2 else x


def _scores_and_allowed(q, k, pattern, mask, bias, scale, key_lengths, lead=()):
    """Scores (..., Hq, Lq, Lk) and the allowed pairs, both at the full broadcast shape.

    The leading shape broadcasts those of ``q``, ``k`` and ``lead`` (the leading shape of ``v``).
    """
    q, k = _as_heads(q, "q"), _as_heads(k, "k")
    (Hq, Lq, D), (Hkv, Lk, Dk) = q.shape[-3:], k.shape[-3:]
    if D != Dk:
        raise ValueError(f"q and k must share the head dimension, got q {q.shape}, k {k.shape}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if scale is None:
        if D == 0:
            raise ValueError("the default scale 1/sqrt(D) needs a head dimension D >= 1")
        scale = 1.0 / math.sqrt(D)

    # Query head h reads key/value head h // (Hq // Hkv).
    k = np.repeat(k, Hq // Hkv, axis=-3)
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], lead)
    shape = (*batch, Hq, Lq, Lk)
    scores = np.broadcast_to(scale * (q @ np.swapaxes(k, -1, -2)), shape)
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, dtype=np.float64), shape)

    allowed = np.broadcast_to(allowed_mask(pattern, Lq, Lk, Hq), shape)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array, got {mask.dtype}")
        allowed = allowed & np.broadcast_to(mask, shape)
    if key_lengths is not None:
        key_lengths = np.asarray(key_lengths)
        if key_lengths.dtype.kind not in "iu":
            raise TypeError(f"key_lengths must be ints, got {key_lengths.dtype}")
        lengths = np.broadcast_to(key_lengths, batch)[..., None, None, None]
        allowed = allowed & (np.arange(Lk) < lengths)
    return scores, allowed


def _softmax(scores: np.ndarray, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities over the allowed keys and the natural log-sum-exp of each row.

    A row with no allowed key, or only -inf scores, gets probabilities 0 and lse -inf.
    """
    masked = np.where(allowed, scores, -np.inf)
    row_max = np.max(masked, axis=-1, initial=-np.inf)
    # Shifting by a finite row maximum keeps exp <= 1; empty rows shift by 0 and exp(-inf) = 0.
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(masked - shift[..., None])
    row_sum = weights.sum(axis=-1)
    nonempty = row_sum > 0
    probs = weights / np.where(nonempty, row_sum, 1.0)[..., None]
    lse = np.where(nonempty, shift + np.log(np.where(nonempty, row_sum, 1.0)), -np.inf)
    return probs, lse


def softmax_weights(
    q, k, pattern=None, *, mask=None, bias=None, scale=None, key_lengths=None
) -> np.ndarray:
    """The normalised attention probabilities (..., Hq, Lq, Lk); rows with no allowed key are 0.

    Arguments as for ``attention``.
    """
    probs, _ = _softmax(*_scores_and_allowed(q, k, pattern, mask, bias, scale, key_lengths))
    return probs


def attention(
    q,
    k,
    v,
    pattern=None,
    *,
    mask=None,
    bias=None,
    scale=None,
    key_lengths=None,
    return_lse=False,
):
    """Masked softmax attention in float64.

    Shapes follow PyTorch's SDPA: q (..., Hq, Lq, D), k (..., Hkv, Lk, D), v (..., Hkv, Lk, Dv);
    leading dimensions broadcast, ``Hq % Hkv == 0``, and a 2-D (L, D) input is one head (a 2-D q
    gives a 2-D output unless k or v bring leading dimensions).

    The allowed pairs are ``pattern`` (None, a Pattern or one Pattern per query head) AND ``mask``
    (bool, broadcastable to (..., Hq, Lq, Lk)) AND ``j < key_lengths`` (ints broadcastable to the
    leading shape). Scores are ``scale * q . k + bias`` (``bias`` broadcastable to
    (..., Hq, Lq, Lk), may hold -inf; ``scale`` defaults to 1/sqrt(D)).

    Returns the output (..., Hq, Lq, Dv), and with ``return_lse`` also the natural log-sum-exp of
    the allowed scores (..., Hq, Lq). Rows with no allowed key give 0 and lse -inf.
    """
    one_head = np.ndim(q) == 2
    q, k, v = _as_heads(q, "q"), _as_heads(k, "k"), _as_heads(v, "v")
    if v.shape[-3:-1] != k.shape[-3:-1]:
        raise ValueError(f"v must have the heads and length of k, got k {k.shape}, v {v.shape}")
    scores, allowed = _scores_and_allowed(
        q, k, pattern, mask, bias, scale, key_lengths, lead=v.shape[:-3]
    )
    probs, lse = _softmax(scores, allowed)
    out = probs @ np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)

    if one_head and out.ndim == 3:  # a 2-D q with no leading dimensions from k or v
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


# ---- dropout and gradients ----------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_DROPOUT_STREAM = 3  # RandomStream::Dropout in csrc/core/random.h


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dropout_keep(batch_shape, num_heads: int, Lq: int, Lk: int, dropout_p: float, seed: int):
    """The pairs dropout keeps, as a bool array (*batch_shape, num_heads, Lq, Lk); small sizes only.

    (i, j) of batch entry b (flattened, C order) and query head h is kept iff
    ``((random_bits(seed, Dropout, b, h, i, j) >> 40) / 2**24) >= dropout_p``, where random_bits
    folds each counter into SplitMix64's finaliser (csrc/core/random.h, written out again here).
    """
    batch_shape = tuple(batch_shape)
    shape = (math.prod(batch_shape), num_heads, Lq, Lk)
    counters = [np.arange(n, dtype=np.uint64).reshape([-1 if a == i else 1 for a in range(4)])
                for i, n in enumerate(shape)]
    stream = (int(seed) & _MASK64) ^ (_DROPOUT_STREAM << 56)
    h = _mix64(np.full((1, 1, 1, 1), stream, dtype=np.uint64))
    for counter in counters:
        h = _mix64(h ^ counter)
    uniform = (h >> np.uint64(40)).astype(np.float64) / 2.0**24
    return (uniform >= dropout_p).reshape(*batch_shape, num_heads, Lq, Lk)


def _sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting added or stretched, giving ``shape``."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def attention_backward(
    q,
    k,
    v,
    out,
    lse,
    grad_out,
    pattern=None,
    *,
    mask=None,
    bias=None,
    scale=None,
    score="dot",
    key_lengths=None,
    dropout_p=0.0,
    seed=None,
    return_dbias=False,
    threads=None,
):
    """Gradients of ``attention`` in float64 from the materialised probabilities.

    Returns ``(dq, dk, dv)`` with the shapes of ``q``, ``k``, ``v`` (and ``dbias`` with the shape
    of ``bias`` when ``return_dbias``): gradients over broadcast or grouped axes are summed.
    Arguments as for ``sparse_attn.attention_backward``; this oracle recomputes everything from
    ``q``, ``k``, ``v`` and only checks the shapes of ``out`` and ``lse``. With ``dropout_p > 0``
    the kept set is ``dropout_keep(...)`` for ``seed``. ``threads`` is accepted and ignored.
    """
    if score != "dot":
        raise NotImplementedError(f"reference.attention_backward: score={score!r}")
    q_shape, k_shape, v_shape = np.shape(q), np.shape(k), np.shape(v)
    q, k, v = _as_heads(q, "q"), _as_heads(k, "k"), _as_heads(v, "v")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores, allowed = _scores_and_allowed(
        q, k, pattern, mask, bias, scale, key_lengths, lead=v.shape[:-3]
    )
    probs, _ = _softmax(scores, allowed)
    batch, (Hq, Lq, Lk) = probs.shape[:-3], probs.shape[-3:]
    Hkv, group = k.shape[-3], Hq // k.shape[-3]
    if np.shape(out)[-2:] != (Lq, v.shape[-1]) or np.shape(lse)[-1:] != (Lq,):
        raise ValueError(f"out {np.shape(out)} or lse {np.shape(lse)} do not fit q and v")

    grad_out = np.broadcast_to(_as_heads(grad_out, "grad_out"), (*batch, Hq, Lq, v.shape[-1]))
    q_full = np.broadcast_to(q, (*batch, Hq, Lq, q.shape[-1]))
    k_full = np.repeat(k, group, axis=-3)
    v_full = np.repeat(v, group, axis=-3)

    # out = (probs * kept / (1 - p)) @ v; dS = P * (dP - rowsum(P * dP)) with dP through dropout.
    kept_scale = np.ones(())
    if dropout_p:
        kept_scale = dropout_keep(batch, Hq, Lq, Lk, dropout_p, seed) / (1.0 - dropout_p)
    dv = np.swapaxes(probs * kept_scale, -1, -2) @ grad_out
    dprobs = (grad_out @ np.swapaxes(v_full, -1, -2)) * kept_scale
    dscores = probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True))
    dq = scale * (dscores @ k_full)
    dk = scale * (np.swapaxes(dscores, -1, -2) @ q_full)

    def per_kv_head(grad):  # query head h reads kv head h // group: sum each group
        return grad.reshape(*grad.shape[:-3], Hkv, group, *grad.shape[-2:]).sum(axis=-3)

    grads = (
        _sum_to_shape(dq, q_shape),
        _sum_to_shape(per_kv_head(dk), k_shape),
        _sum_to_shape(per_kv_head(dv), v_shape),
    )
    if return_dbias:
        if bias is None:
            raise ValueError("return_dbias=True needs a bias")
        grads += (_sum_to_shape(dscores, np.shape(bias)),)
    return grads
