"""The public attention functions: normalise arguments, compile (cached) layouts, call a kernel.
Validation with user-facing messages lives in _args.py; the arithmetic lives in C++."""

from __future__ import annotations

import numpy as np

from . import _args, _core, _device
from .layout import compile_layout
from .patterns import as_head_patterns

__all__ = ["attention"]

_TILE_Q = _core.build_info()["tile_q"]
_TILE_K = _core.build_info()["tile_k"]


def _head_layouts(pattern, problem: _args.Problem) -> list:
    heads = as_head_patterns(pattern, problem.heads_q)
    compiled = {}
    for p in heads:
        if p not in compiled:
            compiled[p] = compile_layout(p, problem.len_q, problem.len_k, _TILE_Q, _TILE_K).handle
    return [compiled[p] for p in heads]


def attention(q, k, v, pattern=None, *, mask=None, bias=None, scale=None, key_lengths=None,
              return_lse=False, device="cpu", threads=None, out=None):
    """Softmax attention restricted to a sparsity pattern: ``softmax(scale·q·kᵀ + bias) · v``
    over the allowed pairs (``pattern AND mask``, keys below ``key_lengths``).

    Shapes follow ``scaled_dot_product_attention``: q ``(..., Hq, Lq, D)``, k ``(..., Hkv, Lk, D)``,
    v ``(..., Hkv, Lk, Dv)``; leading dimensions broadcast; ``Hq % Hkv == 0``; a 2-D ``(L, D)``
    input is one head. float32 in, float32 out (float32 accumulation); float64 in, float64 out.
    A query row with no allowed key gives zeros (and ``lse = -inf``), never NaN.

    Returns the output ``(..., Hq, Lq, Dv)``, and ``lse`` ``(..., Hq, Lq)`` (natural log of the
    softmax denominator) when ``return_lse=True``. ``out=`` is written only on success.
    """
    if _device.select(_args.resolve_device(device), q) == "cuda":  # the GPU path: _device.py
        _args.resolve_threads(threads)
        return _device.attention(q, k, v, pattern, mask=mask, bias=bias, scale=scale,
                                 key_lengths=key_lengths, return_lse=return_lse, out=out,
                                 head_layouts=_head_layouts)
    arrays = {"q": _args.as_float_array(q, "q"), "k": _args.as_float_array(k, "k"),
              "v": _args.as_float_array(v, "v")}
    dtype = _args.common_dtype(arrays)
    qa, ka, va = arrays["q"], arrays["k"], arrays["v"]
    problem = _args.problem_shape(qa, ka, va)
    scale_value = _args.resolve_scale(scale, problem.dim_qk)
    num_threads = _args.resolve_threads(threads)
    layouts = _head_layouts(pattern, problem)
    mask_op = _args.mask_operand(mask, problem)
    bias_op = _args.bias_operand(bias, problem, dtype)
    lengths = _args.key_lengths_array(key_lengths, problem)
    out_shape = problem.out_shape()
    user_shape = out_shape[1:] if problem.squeeze else out_shape
    _args.check_out(out, user_shape, dtype, {"q": q, "k": k, "v": v, "mask": mask, "bias": bias})

    result = np.empty(out_shape, dtype=dtype)
    lse = np.empty(problem.lse_shape(), dtype=dtype) if return_lse else None
    if result.size or (lse is not None and lse.size):
        b, tail_q = problem.batch_shape, (problem.heads_q, problem.len_q, problem.dim_qk)
        tail_k = (problem.heads_kv, problem.len_k, problem.dim_qk)
        tail_v = (problem.heads_kv, problem.len_k, problem.dim_v)
        _core.forward(
            problem.kernel_shape(),
            _args.operand(qa, b, tail_q, unit_col=True),
            _args.operand(ka, b, tail_k, unit_col=True),
            _args.operand(va, b, tail_v, unit_col=True),
            mask_op, bias_op, lengths, scale_value, result, lse, layouts, num_threads,
        )
    if problem.squeeze:
        result, lse = result[0], (lse[0] if lse is not None else None)
    if out is not None:
        np.copyto(out, result)
        result = out
    return (result, lse) if return_lse else result
