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
    "hard_attention",
    "softmax_weights",
]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic), as in csrc/core/random.h."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dropout_keep(seed: int, dropout_p: float, batch_shape: tuple, heads: int, Lq: int, Lk: int,
                 query_offset: int = 0, key_offset: int = 0) -> np.ndarray:
    """The kept (query, key) pairs of ``attention(..., dropout_p, seed)``: bool array
    ``batch_shape + (heads, Lq, Lk)``. The draw for (flattened batch b, query head h, absolute
    i, j) is ``mix(mix(mix(mix(mix(seed ^ 3 << 56) ^ b) ^ h) ^ i) ^ j)``; its top 24 bits as a
    uniform u in [0, 1) keep the pair iff u >= dropout_p."""
    batch = int(np.prod(batch_shape, dtype=np.int64))
    b = np.arange(batch, dtype=np.uint64)[:, None, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None, None]
    i = (query_offset + np.arange(Lq, dtype=np.uint64))[None, None, :, None]
    j = (key_offset + np.arange(Lk, dtype=np.uint64))[None, None, None, :]
    x = _mix64(np.uint64(seed) ^ (np.uint64(3) << np.uint64(56)))
    x = _mix64(_mix64(_mix64(_mix64(x ^ b) ^ h) ^ i) ^ j)
    u = (x >> np.uint64(40)).astype(np.float64) / 16777216.0
    return (u >= np.float32(dropout_p)).reshape(tuple(batch_shape) + (heads, Lq, Lk))


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


def _raw_scores(q, k, score, score_params):
    """score(q, k) before scale: dot products, cosine similarities or Bahdanau's additive score."""
    if score == "dot":
        return q @ np.swapaxes(k, -1, -2)
    if score == "cosine":
        qn, kn = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1)
        qn, kn = np.where(qn > 0, qn, np.inf), np.where(kn > 0, kn, np.inf)  # zero vector: 0
        return (q / qn[..., None]) @ np.swapaxes(k / kn[..., None], -1, -2)
    if score == "additive":
        wq, wk, w = (np.asarray(score_params[n], dtype=np.float64) for n in ("wq", "wk", "w"))
        qp, kp = q @ wq, k @ wk  # (..., Lq, A), (..., Lk, A)
        return np.tanh(qp[..., :, None, :] + kp[..., None, :, :]) @ w
    raise ValueError(f"unknown score {score!r}")


def _scores_and_allowed(q, k, pattern, mask, bias, scale, key_lengths, lead=(), *,
                        score="dot", score_params=None, softcap=None, alibi_slopes=None,
                        query_offset=0, key_offset=0):
    """Scores (..., Hq, Lq, Lk) and the allowed pairs, both at the full broadcast shape.

    The leading shape broadcasts those of ``q``, ``k`` and ``lead`` (the leading shape of ``v``).
    Scores are ``softcap(scale * score(q, k)) + bias - slope_h * |i - j|`` with absolute
    positions ``i = query_offset + row``, ``j = key_offset + column``.
    """
    q, k = _as_heads(q, "q"), _as_heads(k, "k")
    (Hq, Lq, D), (Hkv, Lk, Dk) = q.shape[-3:], k.shape[-3:]
    if D != Dk:
        raise ValueError(f"q and k must share the head dimension, got q {q.shape}, k {k.shape}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if scale is None and score != "dot":
        scale = 1.0
    if scale is None:
        if D == 0:
            raise ValueError("the default scale 1/sqrt(D) needs a head dimension D >= 1")
        scale = 1.0 / math.sqrt(D)

    # Query head h reads key/value head h // (Hq // Hkv).
    k = np.repeat(k, Hq // Hkv, axis=-3)
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], lead)
    shape = (*batch, Hq, Lq, Lk)
    scores = scale * _raw_scores(q, k, score, score_params)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.broadcast_to(scores, shape)
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, dtype=np.float64), shape)
    i = query_offset + np.arange(Lq)[:, None]
    j = key_offset + np.arange(Lk)[None, :]
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)[:, None, None]
        scores = scores - slopes * np.abs(i - j)

    total_q, total_k = query_offset + Lq, key_offset + Lk
    full = allowed_mask(pattern, total_q, total_k, Hq)
    allowed = np.broadcast_to(full[:, query_offset:, key_offset:], shape)
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
        allowed = allowed & (j < lengths)
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
    q, k, pattern=None, *, mask=None, bias=None, scale=None, key_lengths=None, **variants
) -> np.ndarray:
    """The normalised attention probabilities (..., Hq, Lq, Lk); rows with no allowed key are 0.

    Arguments as for ``attention``.
    """
    probs, _ = _softmax(
        *_scores_and_allowed(q, k, pattern, mask, bias, scale, key_lengths, **variants)
    )
    return probs


def hard_attention(q, k, v, pattern=None, *, mask=None, bias=None, scale=None, key_lengths=None,
                   **variants):
    """Argmax hard attention: (out, idx), idx the allowed key of largest score (ties: the lowest
    index), -1 and a zero output for a row with no allowed key."""
    one_head = np.ndim(q) == 2
    q, k, v = _as_heads(q, "q"), _as_heads(k, "k"), _as_heads(v, "v")
    scores, allowed = _scores_and_allowed(
        q, k, pattern, mask, bias, scale, key_lengths, lead=v.shape[:-3], **variants
    )
    masked = np.where(allowed, scores, -np.inf)
    idx = np.argmax(masked, axis=-1)  # the first maximum: the lowest index
    empty = ~np.any(allowed & (masked > -np.inf), axis=-1)
    idx = np.where(empty, -1, idx)
    values = np.broadcast_to(np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3),
                             idx.shape[:-1] + v.shape[-2:])
    out = np.take_along_axis(values, np.maximum(idx, 0)[..., None], axis=-2)
    out = np.where(empty[..., None], 0.0, out)
    if one_head and out.ndim == 3:
        out, idx = out[0], idx[0]
    return out, idx


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
    dropout_keep=None,
    dropout_p=0.0,
    **variants,
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

    ``variants``: ``score`` ("dot", "cosine", "additive" with ``score_params``), ``softcap``,
    ``alibi_slopes``, ``query_offset``, ``key_offset`` as in ``sparse_attn.attention``.
    ``dropout_keep`` (bool, broadcastable to (..., Hq, Lq, Lk)) with ``dropout_p``: probabilities
    outside it are dropped and the kept ones scaled by 1 / (1 - dropout_p); lse is undropped.
    """
    one_head = np.ndim(q) == 2
    q, k, v = _as_heads(q, "q"), _as_heads(k, "k"), _as_heads(v, "v")
    if v.shape[-3:-1] != k.shape[-3:-1]:
        raise ValueError(f"v must have the heads and length of k, got k {k.shape}, v {v.shape}")
    scores, allowed = _scores_and_allowed(
        q, k, pattern, mask, bias, scale, key_lengths, lead=v.shape[:-3], **variants
    )
    probs, lse = _softmax(scores, allowed)
    if dropout_keep is not None:
        probs = np.where(dropout_keep, probs / (1.0 - dropout_p), 0.0)
    out = probs @ np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)

    if one_head and out.ndim == 3:  # a 2-D q with no leading dimensions from k or v
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting added or stretched, giving ``shape``."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length, and 1 / length (0 for a zero row, whose cosine is 0)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    inv = np.where(norm > 0, 1.0 / np.where(norm > 0, norm, 1.0), 0.0)
    return x * inv, inv


def attention_backward(q, k, v, out, lse, grad_out, pattern=None, *, mask=None, bias=None,
                       scale=None, score="dot", score_params=None, alibi_slopes=None,
                       softcap=None, dropout_p=0.0, seed=None, key_lengths=None, query_offset=0,
                       key_offset=0, return_dbias=False, return_dscore_params=False,
                       threads=None):
    """Gradients of ``attention`` in float64, by the chain rule on the materialised matrices.

    Returns ``(dq, dk, dv)`` with the shapes of ``q``, ``k``, ``v`` (gradients over broadcast
    axes and over the query heads of a grouped-query group are summed), then ``dbias`` (shape of
    ``bias``) when ``return_dbias``, then ``{"wq", "wk", "w"}`` gradients when
    ``return_dscore_params`` (score "additive"). Arguments as for
    ``sparse_attn.attention_backward``; this oracle recomputes everything from ``q``, ``k``,
    ``v`` (``out`` and ``lse`` only have their shapes checked, ``threads`` is ignored) and
    regenerates the dropped set with ``dropout_keep``.

        s1 = scale * score(q, k);  s = softcap(s1) + bias - alibi;  P = softmax(s over allowed)
        out = (P * keep / (1 - p)) @ v
        dS = P * (dP - rowsum(P * dP)),  dP = (grad_out @ v^T) * keep / (1 - p)
    """
    shapes = {"q": np.shape(q), "k": np.shape(k), "v": np.shape(v)}
    q, k, v = _as_heads(q, "q"), _as_heads(k, "k"), _as_heads(v, "v")
    (Hq, Lq, D), (Hkv, Lk, Dv) = q.shape[-3:], v.shape[-3:]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 / math.sqrt(D) if score == "dot" else 1.0
    variants = {"score": score, "score_params": score_params, "softcap": softcap,
                "alibi_slopes": alibi_slopes, "query_offset": query_offset,
                "key_offset": key_offset}
    scores, allowed = _scores_and_allowed(q, k, pattern, mask, bias, scale, key_lengths,
                                          lead=v.shape[:-3], **variants)
    probs, _ = _softmax(scores, allowed)
    batch = probs.shape[:-3]
    if np.shape(out)[-2:] != (Lq, Dv) or np.shape(lse)[-1:] != (Lq,):
        raise ValueError(f"out {np.shape(out)} or lse {np.shape(lse)} do not fit q and v")

    grad_out = np.broadcast_to(_as_heads(grad_out, "grad_out"), (*batch, Hq, Lq, Dv))
    q = np.broadcast_to(q, (*batch, Hq, Lq, D))
    k = np.broadcast_to(np.repeat(k, group, axis=-3), (*batch, Hq, Lk, D))
    v = np.repeat(v, group, axis=-3)
    kept = np.ones(())
    if dropout_p:
        keep = dropout_keep(seed, dropout_p, batch, Hq, Lq, Lk, query_offset, key_offset)
        kept = keep / (1.0 - dropout_p)

    dv = np.swapaxes(probs * kept, -1, -2) @ grad_out
    dprobs = (grad_out @ np.swapaxes(v, -1, -2)) * kept
    dscores = probs * (dprobs - (probs * dprobs).sum(axis=-1, keepdims=True))  # d/d(s)
    draw = dscores
    if softcap is not None:  # s = softcap * tanh(s1 / softcap)
        s1 = scale * _raw_scores(q, k, score, score_params)
        draw = draw * (1.0 - np.tanh(s1 / softcap) ** 2)
    draw = scale * draw  # d/d(score(q, k))

    dparams = None
    if score == "dot":
        dq, dk = draw @ k, np.swapaxes(draw, -1, -2) @ q
    elif score == "cosine":
        (qn, q_inv), (kn, k_inv) = _unit_rows(q), _unit_rows(k)
        dqn, dkn = draw @ kn, np.swapaxes(draw, -1, -2) @ qn
        dq = (dqn - (dqn * qn).sum(axis=-1, keepdims=True) * qn) * q_inv
        dk = (dkn - (dkn * kn).sum(axis=-1, keepdims=True) * kn) * k_inv
    elif score == "additive":
        wq, wk, w = (np.asarray(score_params[n], dtype=np.float64) for n in ("wq", "wk", "w"))
        qp, kp = q @ wq, k @ wk
        t = np.tanh(qp[..., :, None, :] + kp[..., None, :, :])  # (..., Lq, Lk, A)
        du = draw[..., None] * w * (1.0 - t**2)
        dqp, dkp = du.sum(axis=-2), du.sum(axis=-3)
        dq, dk = dqp @ wq.T, dkp @ wk.T

        def rows(a):  # every (batch, head, row)
            return a.reshape(-1, a.shape[-1])

        dparams = {
            "wq": rows(q).T @ rows(dqp),
            "wk": rows(k).T @ rows(dkp),
            "w": rows(draw[..., None] * t).sum(axis=0),
        }
    else:
        raise ValueError(f"unknown score {score!r}")

    def per_kv_head(grad):  # query head h reads kv head h // group: sum over each group
        return grad.reshape(*grad.shape[:-3], Hkv, group, *grad.shape[-2:]).sum(axis=-3)

    grads = (
        _sum_to_shape(dq, shapes["q"]),
        _sum_to_shape(per_kv_head(dk), shapes["k"]),
        _sum_to_shape(per_kv_head(dv), shapes["v"]),
    )
    if return_dbias:
        if bias is None:
            raise ValueError("return_dbias=True needs a bias")
        grads += (_sum_to_shape(dscores, np.shape(bias)),)
    if return_dscore_params:
        if dparams is None:
            raise ValueError("return_dscore_params=True needs score='additive'")
        grads += (dparams,)
    return grads
