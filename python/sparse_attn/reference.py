"""The NumPy float64 oracle: masked softmax attention computed the plain way, mask materialised.

Every test checks the C++ kernels against this module, so it stays short and obviously correct.
It shares nothing with the C++ core: masks come from the patterns' own NumPy ``to_mask``.
Never a code path that users are routed to.
"""

from __future__ import annotations

import math

import numpy as np

from .patterns import as_head_patterns

__all__ = ["allowed_mask", "attention", "softmax_weights"]


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
