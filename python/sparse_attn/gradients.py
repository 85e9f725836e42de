"""Gradients of attention: ``attention_backward`` (the block-sparse backward kernel) and
``attention_vjp`` (forward plus a closure for the backward, the shape autograd wrappers want).
Argument checks name the public argument; the arithmetic lives in C++ (csrc/cpu/backward.cpp)."""

from __future__ import annotations

import numbers
import secrets

import numpy as np

from . import _args, _core
from .api import _head_layouts, attention

__all__ = ["attention_backward", "attention_vjp"]

_SCORES = ("dot", "cosine", "additive")
_SEED_MASK = (1 << 64) - 1


def _resolve_score(score) -> str:
    if not isinstance(score, str):
        raise TypeError(f"score must be one of {_SCORES}, got {type(score).__name__}")
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if score != "dot":
        raise NotImplementedError(
            f"attention_backward: score={score!r} has no backward yet (only 'dot')"
        )
    return score


def _resolve_dropout(dropout_p, seed) -> tuple[float, int]:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    if seed is None:
        if dropout_p > 0:
            raise ValueError(
                "seed: dropout_p > 0 needs the seed the forward call used, to regenerate its "
                "dropped set"
            )
        return float(dropout_p), 0
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return float(dropout_p), int(seed) & _SEED_MASK


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_like(arrays: dict, dtype: np.dtype, shapes: dict) -> None:
    """``out``, ``lse`` and ``grad_out`` must have q's dtype and the forward's result shapes."""
    for name, a in arrays.items():
        if a.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of q ({dtype}), got {a.dtype}")
        if a.shape != shapes[name]:
            raise ValueError(
                f"{name} must have the shape the forward returned, {shapes[name]}, got {a.shape}"
            )


def _sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting added or stretched, giving ``shape``."""
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def attention_backward(q, k, v, out, lse, grad_out, pattern=None, *, mask=None, bias=None,
                       scale=None, score="dot", key_lengths=None, dropout_p=0.0, seed=None,
                       return_dbias=False, threads=None):
    """Gradients of ``attention`` with respect to q, k, v (and bias): ``(dq, dk, dv)``.

    ``out`` and ``lse`` are what ``attention(..., return_lse=True)`` returned for the same
    arguments, and ``grad_out`` is dL/d(out) (same shape as ``out``). The other arguments must be
    the forward call's. FlashAttention-2 style: the probabilities are recomputed tile by tile
    from ``lse`` and only the pattern's listed tiles are visited; nothing of size Lq x Lk is
    stored (except ``dbias``).

    Gradients have the shapes and dtype of the inputs: over broadcast leading dimensions and the
    query heads of a grouped-query group they are summed. Query rows with no allowed key
    contribute nothing. With ``dropout_p > 0`` the forward's ``seed`` regenerates its dropped
    set. ``return_dbias=True`` (needs ``bias``) appends ``dbias`` with the shape of ``bias``, in
    q's dtype. The result is bitwise reproducible, and the same for every thread count.
    """
    arrays = {name: _args.as_float_array(x, name) for name, x in
              (("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("grad_out", grad_out))}
    qa, ka, va = arrays["q"], arrays["k"], arrays["v"]
    dtype = _args.common_dtype({"q": qa, "k": ka, "v": va})
    problem = _args.problem_shape(qa, ka, va)
    out_shape, lse_shape = problem.out_shape(), problem.lse_shape()
    if problem.squeeze:
        out_shape, lse_shape = out_shape[1:], lse_shape[1:]
    _check_like({name: arrays[name] for name in ("out", "lse", "grad_out")}, dtype,
                {"out": out_shape, "lse": lse_shape, "grad_out": out_shape})
    _resolve_score(score)
    scale_value = _args.resolve_scale(scale, problem.dim_qk)
    num_threads = _args.resolve_threads(threads)
    dropout_value, seed_value = _resolve_dropout(dropout_p, seed)
    if _check_bool(return_dbias, "return_dbias") and bias is None:
        raise ValueError("return_dbias=True needs a bias (there is nothing to differentiate)")
    layouts = _head_layouts(pattern, problem)
    mask_op = _args.mask_operand(mask, problem)
    bias_op = _args.bias_operand(bias, problem, dtype)
    lengths = _args.key_lengths_array(key_lengths, problem)

    b, (Hq, Hkv) = problem.batch_shape, (problem.heads_q, problem.heads_kv)
    Lq, Lk, D, Dv = problem.len_q, problem.len_k, problem.dim_qk, problem.dim_v
    dq = np.empty(b + (Hq, Lq, D), dtype=dtype)
    dk = np.empty(b + (Hkv, Lk, D), dtype=dtype)
    dv = np.empty(b + (Hkv, Lk, Dv), dtype=dtype)
    dbias = np.zeros(problem.scores_shape(), dtype=dtype) if return_dbias else None
    if dq.size or dk.size or dv.size:
        kernel_problem = (
            problem.kernel_shape(),
            _args.operand(qa, b, (Hq, Lq, D), unit_col=True),
            _args.operand(ka, b, (Hkv, Lk, D), unit_col=True),
            _args.operand(va, b, (Hkv, Lk, Dv), unit_col=True),
            mask_op, bias_op, lengths, scale_value, layouts, num_threads,
        )
        _core.backward(
            kernel_problem,
            _args.operand(arrays["out"], b, (Hq, Lq, Dv), unit_col=True),
            _args.operand(arrays["grad_out"], b, (Hq, Lq, Dv), unit_col=True),
            np.ascontiguousarray(np.broadcast_to(arrays["lse"], problem.lse_shape())),
            dropout_value, seed_value, dq, dk, dv, dbias,
        )
    grads = (_sum_to_shape(dq, qa.shape), _sum_to_shape(dk, ka.shape),
             _sum_to_shape(dv, va.shape))
    if return_dbias:
        grads += (_sum_to_shape(dbias, np.shape(bias)),)
    return grads


# Keyword arguments of attention_vjp that only the backward takes, and those only the forward.
_BACKWARD_ONLY = ("return_dbias",)
_FORWARD_ONLY = ("device",)
_REFUSED = ("out", "return_lse")


def attention_vjp(q, k, v, pattern=None, **kwargs):
    """Run the forward and return ``(out, vjp)``, where ``vjp(grad_out) -> (dq, dk, dv)``.

    ``kwargs`` are ``attention``'s (mask, bias, scale, key_lengths, dropout_p, seed, threads,
    device, ...) plus ``return_dbias`` (then ``vjp`` also returns dbias). With ``dropout_p > 0``
    and no ``seed``, a seed is drawn once and used by both passes. ``vjp`` reads q, k, v, the
    returned ``out`` and the saved lse when it is called: do not modify them in place before.
    """
    for name in _REFUSED:
        if name in kwargs:
            raise TypeError(f"attention_vjp: {name}= is not accepted (the forward's result is "
                            "returned, with its lse kept for the backward)")
    forward_kwargs = {n: x for n, x in kwargs.items() if n not in _BACKWARD_ONLY}
    backward_kwargs = {n: x for n, x in kwargs.items() if n not in _FORWARD_ONLY}
    dropout_p = kwargs.get("dropout_p", 0.0)
    _resolve_dropout(dropout_p, kwargs.get("seed", 0))
    if dropout_p and kwargs.get("seed") is None:
        forward_kwargs["seed"] = backward_kwargs["seed"] = secrets.randbits(63)
    if not dropout_p:  # a forward without dropout need not know the arguments
        for name in ("dropout_p", "seed"):
            forward_kwargs.pop(name, None)
    if kwargs.get("score", "dot") == "dot":
        forward_kwargs.pop("score", None)
    _resolve_score(kwargs.get("score", "dot"))
    if "return_dbias" in kwargs:
        _check_bool(kwargs["return_dbias"], "return_dbias")

    out, lse = attention(q, k, v, pattern, return_lse=True, **forward_kwargs)

    def vjp(grad_out):
        """Gradients of ``sum(out * grad_out)`` with respect to q, k, v (and bias)."""
        return attention_backward(q, k, v, out, lse, grad_out, pattern, **backward_kwargs)

    return out, vjp
