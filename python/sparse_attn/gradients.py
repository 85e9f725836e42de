"""Gradients of attention: ``attention_backward`` (the block-sparse backward kernel) and
``attention_vjp`` (the forward plus a closure for the backward, the shape autograd wrappers
want). Argument checks name the public argument; the arithmetic lives in C++."""

from __future__ import annotations

import numpy as np

from . import _args, _core
from .api import _Call, attention

__all__ = ["attention_backward", "attention_vjp"]


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _forward_result(x, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``out``, ``lse`` or ``grad_out``: q's dtype and the shape the forward returned."""
    a = _args.as_float_array(x, name)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of q ({dtype}), got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have the shape the forward returned, {shape}, got {a.shape}")
    return a


def _sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting added or stretched, giving ``shape``."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return np.asarray(grad).reshape(shape)  # a 0-d sum is an array too


def _unit_rows(x, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` scaled to unit length, and 1 / length (0 for a zero row, whose cosine
    score is 0 as in the forward)."""
    a = _args.as_float_array(x, name)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    inv = np.divide(1, norm, out=np.zeros_like(norm), where=norm > 0)
    return a * inv, inv


def _through_unit_rows(grad_unit: np.ndarray, unit: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """The gradient of x from that of x / |x|: (g - (g . u) u) / |x|."""
    return (grad_unit - (grad_unit * unit).sum(axis=-1, keepdims=True) * unit) * inv


def attention_backward(q, k, v, out, lse, grad_out, pattern=None, *, mask=None, bias=None,
                       scale=None, score="dot", score_params=None, alibi_slopes=None,
                       softcap=None, dropout_p=0.0, seed=None, key_lengths=None,
                       query_offset=0, key_offset=0, total_lengths=None, return_dbias=False,
                       return_dscore_params=False, device="cpu", threads=None):
    """Gradients of ``attention`` with respect to q, k, v (and bias): ``(dq, dk, dv)``.

    ``out`` and ``lse`` are what ``attention(..., return_lse=True)`` returned, ``grad_out`` is
    dL/d(out) (the shape of ``out``), and every other argument must be the forward call's (with
    ``dropout_p > 0``, its ``seed``: the dropped set is regenerated, not stored).
    FlashAttention-2 style: the probabilities are recomputed tile by tile from ``lse``, only the
    pattern's listed tiles are visited, and nothing of size Lq x Lk is stored except ``dbias``.

    Every score ("dot", "cosine", "additive"), softcap, ALiBi, bias, mask, key_lengths, dropout
    and offsets are supported. Gradients have the shapes and dtype of q, k, v: over broadcast
    leading dimensions and over the query heads of a grouped-query group they are summed. Query
    rows with no allowed key contribute nothing. ``return_dbias=True`` (needs ``bias``) appends
    ``dbias``, the shape of ``bias`` in q's dtype; ``return_dscore_params=True`` (score
    "additive") then appends ``{"wq": ..., "wk": ..., "w": ...}``, the gradients of
    ``score_params``. The result is bitwise reproducible and the same for every thread count.
    """
    cosine = isinstance(score, str) and score == "cosine"
    if cosine:  # cosine scores are dot products of unit rows: differentiate those, then chain
        (q, q_inv), (k, k_inv) = _unit_rows(q, "q"), _unit_rows(k, "k")
        score, scale = "dot", 1.0 if scale is None else scale
    call = _Call(q, k, v, pattern, mask=mask, bias=bias, scale=scale, score=score,
                 score_params=score_params, alibi_slopes=alibi_slopes, softcap=softcap,
                 key_lengths=key_lengths, query_offset=query_offset, key_offset=key_offset,
                 total_lengths=total_lengths, device=device, threads=threads)
    p, dtype = call.problem, call.dtype
    out = _forward_result(out, "out", call.user_shape(p.out_shape()), dtype)
    lse = _forward_result(lse, "lse", call.user_shape(p.lse_shape()), dtype)
    grad_out = _forward_result(grad_out, "grad_out", call.user_shape(p.out_shape()), dtype)
    dropout_p = _args.resolve_probability(dropout_p, "dropout_p")
    if dropout_p > 0 and seed is None:
        raise ValueError("seed: dropout_p > 0 needs the forward call's seed, to regenerate its "
                         "dropped set")
    call.config["dropout_p"] = dropout_p
    call.config["seed"] = _args.resolve_seed(seed) if dropout_p > 0 else 0
    if _check_bool(return_dbias, "return_dbias") and bias is None:
        raise ValueError("return_dbias=True needs a bias (there is nothing to differentiate)")
    additive = call.score == "additive"
    if _check_bool(return_dscore_params, "return_dscore_params") and not additive:
        raise ValueError("return_dscore_params=True needs score='additive' (the only score "
                         "with parameters)")

    b = p.batch_shape
    dq = np.empty(b + (p.heads_q, p.len_q, p.dim_qk), dtype=dtype)
    dk = np.empty(b + (p.heads_kv, p.len_k, p.dim_qk), dtype=dtype)
    dv = np.empty(b + (p.heads_kv, p.len_k, p.dim_v), dtype=dtype)
    dbias = np.zeros(p.scores_shape(), dtype=dtype) if return_dbias else None
    grads = {"dq": dq, "dk": dk, "dv": dv, "dbias": dbias}
    if additive:  # the kernel differentiates the projections; chained through Wq, Wk below
        A = call.config["additive_dim"]
        grads = {"dv": dv, "dbias": dbias,
                 "d_q_proj": np.zeros(b + (p.heads_q, p.len_q, A), dtype),
                 "d_k_proj": np.zeros(b + (p.heads_kv, p.len_k, A), dtype),
                 "d_additive_w": np.zeros(A, dtype)}
    if dq.size or dk.size or dv.size:
        rows = (p.heads_q, p.len_q, p.dim_v)
        grads["out"] = _args.operand(out, b, rows, unit_col=True)
        grads["grad_out"] = _args.operand(grad_out, b, rows, unit_col=True)
        lse_rows = np.empty(p.lse_shape(), dtype=dtype)  # contiguous, one per (batch, head, row)
        lse_rows[...] = lse
        config = dict(call.config, mode=_args.MODES["softmax"])
        _core.backward(config, call.operands, {**call.arrays, "lse": lse_rows}, call.layouts,
                       call.threads, grads)
    dparams = None
    if additive:
        dq, dk, dparams = _through_projections(call, score_params, grads)
    dq, dk = _sum_to_shape(dq, call.q_arr.shape), _sum_to_shape(dk, call.k_arr.shape)
    if cosine:
        dq, dk = _through_unit_rows(dq, q, q_inv), _through_unit_rows(dk, k, k_inv)
    result = (dq, dk, _sum_to_shape(dv, call.v_arr.shape))
    if return_dbias:
        result += (_sum_to_shape(dbias, np.shape(bias)),)
    if return_dscore_params:
        result += (dparams,)
    return result


def _through_projections(call, score_params, grads: dict):
    """The additive score's gradients from those of its projections q_proj = q Wq and
    k_proj = k Wk, and of the kernel's weights w * scale: (dq, dk, {"wq", "wk", "w"}), dq and dk
    at the full broadcast shape."""
    p, b = call.problem, call.problem.batch_shape
    _, (wq, wk, _) = _args.resolve_score("additive", score_params, p.dim_qk, call.dtype)
    d_q_proj, d_k_proj = grads["d_q_proj"], grads["d_k_proj"]
    q = np.broadcast_to(call.q_arr, b + (p.heads_q, p.len_q, p.dim_qk))
    k = np.broadcast_to(call.k_arr, b + (p.heads_kv, p.len_k, p.dim_qk))
    def rows(a):  # every (batch, head, row)
        return a.reshape(-1, a.shape[-1])

    dparams = {"wq": rows(q).T @ rows(d_q_proj), "wk": rows(k).T @ rows(d_k_proj),
               "w": grads["d_additive_w"] * call.dtype.type(call.scale)}
    return d_q_proj @ wq.T, d_k_proj @ wk.T, dparams


# Keyword arguments that only one of the two passes takes.
_BACKWARD_ONLY = ("return_dbias", "return_dscore_params")
_FORWARD_ONLY = ()
_REFUSED = ("out", "return_lse")


def attention_vjp(q, k, v, pattern=None, **kwargs):
    """Run the forward and return ``(out, vjp)``, where ``vjp(grad_out) -> (dq, dk, dv)``.

    ``kwargs`` are ``attention``'s (mask, bias, scale, score, softcap, dropout_p, seed,
    key_lengths, threads, ...) plus ``return_dbias`` and ``return_dscore_params`` (then ``vjp``
    also returns dbias, and the gradients of the additive score's parameters). With
    ``dropout_p > 0`` and no ``seed``, one seed is drawn and used by both passes. ``vjp`` reads
    q, k, v, the returned ``out`` and the saved lse when called: do not modify them in between.
    """
    for name in _REFUSED:
        if name in kwargs:
            raise TypeError(f"attention_vjp: {name}= is not accepted (the forward's output is "
                            "returned and its lse kept for the backward)")
    for name in _BACKWARD_ONLY:
        if name in kwargs:
            _check_bool(kwargs[name], name)
    forward_kwargs = {n: x for n, x in kwargs.items() if n not in _BACKWARD_ONLY}
    backward_kwargs = {n: x for n, x in kwargs.items() if n not in _FORWARD_ONLY}
    if kwargs.get("dropout_p", 0.0) and kwargs.get("seed") is None:
        forward_kwargs["seed"] = backward_kwargs["seed"] = _args.resolve_seed(None)

    out, lse = attention(q, k, v, pattern, return_lse=True, **forward_kwargs)

    def vjp(grad_out):
        """Gradients of ``sum(out * grad_out)`` with respect to q, k, v (and bias)."""
        return attention_backward(q, k, v, out, lse, grad_out, pattern, **backward_kwargs)

    return out, vjp
