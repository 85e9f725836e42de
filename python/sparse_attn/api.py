"""The public attention functions: normalise arguments, compile (cached) layouts, call a kernel.
Validation with user-facing messages lives in _args.py; the arithmetic lives in C++."""

from __future__ import annotations

import numpy as np

from . import _args, _core, _device
from .layout import compile_layout
from .patterns import Pattern, as_head_patterns

__all__ = ["attention", "hard_attention", "attention_weights", "merge_attention"]

_TILE_Q = _core.build_info()["tile_q"]
_TILE_K = _core.build_info()["tile_k"]

# Plans of plain calls (no mask, bias or score options; q, k, v used in place), keyed by the
# arrays' shapes, strides and dtypes, the pattern and the thread count: a repeated small call
# then skips argument normalisation and the layout lookup. Bounded; cleared when full.
_PLAN_LIMIT = 256
_plans: dict = {}


class _Call:
    """One checked call: the kernel's configuration, operands and layouts."""

    def __init__(self, q, k, v, pattern, *, mask, bias, scale, score, score_params,
                 alibi_slopes, softcap, key_lengths, query_offset, key_offset, total_lengths,
                 device, threads):
        _device.require_cpu(_args.resolve_device(device))
        arrays = {"q": _args.as_float_array(q, "q"), "k": _args.as_float_array(k, "k")}
        if v is not None:
            arrays["v"] = _args.as_float_array(v, "v")
        self.dtype = _args.common_dtype(arrays)
        qa, ka = arrays["q"], arrays["k"]
        va = arrays.get("v")
        if va is None:  # weights only: an empty value head dim leaves the P.V product no work
            va = np.zeros(ka.shape[:-1] + (0,), dtype=self.dtype)
        self.problem = p = _args.problem_shape(qa, ka, va)
        self.q_arr, self.k_arr, self.v_arr = qa, ka, va
        self.score, additive = _args.resolve_score(score, score_params, p.dim_qk, self.dtype)
        default_scale = None if self.score == "dot" else 1.0
        self.scale = _args.resolve_scale(default_scale if scale is None else scale, p.dim_qk)
        self.threads = _args.resolve_threads(threads)
        q0, k0, totals = _args.resolve_offsets(query_offset, key_offset, total_lengths, p)
        heads = as_head_patterns(pattern, p.heads_q)
        compiled = {}
        for head in heads:
            if head not in compiled:
                compiled[head] = compile_layout(head, p.len_q, p.len_k, _TILE_Q, _TILE_K, q0, k0,
                                                total=totals).handle
        self.layouts = [compiled[head] for head in heads]
        b = p.batch_shape
        self.operands = {
            "q": _args.operand(qa, b, (p.heads_q, p.len_q, p.dim_qk), unit_col=True),
            "k": _args.operand(ka, b, (p.heads_kv, p.len_k, p.dim_qk), unit_col=True),
            "v": _args.operand(va, b, (p.heads_kv, p.len_k, p.dim_v), unit_col=True),
            "mask": _args.mask_operand(mask, p),
            "bias": _args.bias_operand(bias, p, self.dtype),
            "q_proj": None,
            "k_proj": None,
        }
        self.arrays = {
            "key_lengths": _args.key_lengths_array(key_lengths, p, k0, totals[1]),
            "alibi_slopes": _args.resolve_alibi(alibi_slopes, p.heads_q),
        }
        additive_dim = 0
        if additive is not None:
            wq, wk, w = additive
            additive_dim = w.shape[0]
            q_proj, k_proj = qa @ wq, ka @ wk  # projected once: O(L·D·A), then O(A) per pair
            self.operands["q_proj"] = _args.operand(q_proj, b, (p.heads_q, p.len_q, additive_dim),
                                                    unit_col=True)
            self.operands["k_proj"] = _args.operand(k_proj, b, (p.heads_kv, p.len_k, additive_dim),
                                                    unit_col=True)
            # scale · (w · tanh(...)) = (scale · w) · tanh(...): the kernel takes it folded in
            self.arrays["additive_w"] = np.ascontiguousarray(w * self.dtype.type(self.scale))
        self.config = dict(p.kernel_shape(), dtype=self.dtype.name, mode=0,
                           score=_args.SCORES[self.score], q0=q0, k0=k0, scale=self.scale,
                           softcap=_args.resolve_softcap(softcap), dropout_p=0.0, sample=False,
                           temperature=1.0, seed=0, additive_dim=additive_dim)
        self.inputs = {"q": q, "k": k, "v": v, "mask": mask, "bias": bias}

    def run(self, mode: str, **results) -> None:
        """Run one kernel pass; ``results`` are the C-contiguous arrays it fills."""
        config = dict(self.config, mode=_args.MODES[mode])
        _core.forward(config, self.operands, {**self.arrays, **results}, self.layouts,
                      self.threads)

    def plan(self) -> tuple:
        """What a repeated plain call reuses: everything but the arrays themselves."""
        p = self.problem
        operands = {n: (None,) + tuple(op[1:]) for n, op in self.operands.items() if op}
        return (dict(self.config, mode=_args.MODES["softmax"]), operands, dict(self.arrays),
                self.layouts, self.dtype, p.out_shape(), p.lse_shape(), p.squeeze)

    def user_shape(self, shape: tuple) -> tuple:
        """Drop the head axis for callers who passed 2-D (L, D) arrays."""
        return shape[1:] if self.problem.squeeze else shape

    def squeeze(self, array):
        return array[0] if array is not None and self.problem.squeeze else array


def attention(q, k, v, pattern=None, *, mask=None, bias=None, scale=None, score="dot",
              score_params=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
              key_lengths=None, return_lse=False, query_offset=0, key_offset=0,
              total_lengths=None, device="cpu", threads=None, out=None):
    """Softmax attention restricted to a sparsity pattern, computed block-sparse.

    ``softmax(s) · v`` over the allowed pairs (``pattern AND mask``, keys below
    ``key_lengths``), with ``s = softcap(scale · score(q, k)) + bias - slope_h · |i - j|``.

    Shapes follow ``scaled_dot_product_attention``: q ``(..., Hq, Lq, D)``, k ``(..., Hkv, Lk, D)``,
    v ``(..., Hkv, Lk, Dv)``; leading dimensions broadcast; ``Hq % Hkv == 0``; a 2-D ``(L, D)``
    input is one head. float32 in, float32 out (float32 accumulation); float64 in, float64 out.
    A query row with no allowed key gives zeros (and ``lse = -inf``), never NaN.

    score: ``"dot"`` (default scale ``1/sqrt(D)``), ``"cosine"`` (cosine similarity, default
        scale 1), ``"additive"`` (``w · tanh(q Wq + k Wk)`` with
        ``score_params=dict(wq=(D, A), wk=(D, A), w=(A,))``, default scale 1).
    alibi_slopes: one slope per query head; adds ``-slope · |i - j|`` (absolute positions),
        which equals ``slope · (j - i)`` on causal patterns. Never materialised.
    softcap: scores become ``softcap · tanh(s / softcap)`` (before bias and ALiBi).
    dropout_p, seed: training dropout on the probabilities (kept ones scaled by
        ``1 / (1 - dropout_p)``), drawn from ``(seed, batch, head, i, j)`` so the backward pass
        regenerates the same set; ``lse`` is that of the undropped softmax.
    query_offset, key_offset, total_lengths: this call is the window starting at these absolute
        positions of a problem of ``total_lengths = (Lq_total, Lk_total)``; patterns, ALiBi and
        random draws see absolute positions, ``key_lengths`` are absolute too. Used for sharding
        (see ``merge_attention``).
    Returns the output ``(..., Hq, Lq, Dv)``, and ``lse`` ``(..., Hq, Lq)`` (natural log of the
    softmax denominator) when ``return_lse=True``. ``out=`` is written only on success.
    """
    _check_v_and_seed(v, seed)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if (type(device) is not str or device != "cpu") and _device.select(
            _args.resolve_device(device), q, _device.gpu_unsupported(score)) == "cuda":
        _args.resolve_threads(threads)  # the GPU path: _device.py
        return _device.compute(
            "softmax", q, k, v, pattern, mask=mask, bias=bias, scale=scale, score=score,
            score_params=score_params, alibi_slopes=alibi_slopes, softcap=softcap,
            dropout_p=dropout_p, seed=seed, key_lengths=key_lengths, query_offset=query_offset,
            key_offset=key_offset, total_lengths=total_lengths, second=return_lse, out=out)
    plain = _is_plain(q, k, v, pattern, threads, mask, bias, scale, score, score_params,
                      alibi_slopes, softcap, dropout_p, key_lengths, query_offset, key_offset,
                      total_lengths, device)
    if plain:
        plan_key = (q.shape, q.strides, q.dtype, k.shape, k.strides, k.dtype, v.shape, v.strides,
                    v.dtype, pattern, threads)
        plan = _plans.get(plan_key)
        if plan is not None:
            return _run_plan(plan, q, k, v, threads, return_lse, out)
    call = _Call(q, k, v, pattern, mask=mask, bias=bias, scale=scale, score=score,
                 score_params=score_params, alibi_slopes=alibi_slopes, softcap=softcap,
                 key_lengths=key_lengths, query_offset=query_offset, key_offset=key_offset,
                 total_lengths=total_lengths, device=device, threads=threads)
    if plain and all(call.operands[n][0] is a for n, a in (("q", q), ("k", k), ("v", v))):
        if len(_plans) >= _PLAN_LIMIT:
            _plans.clear()
        _plans[plan_key] = call.plan()
    call.config["dropout_p"] = _args.resolve_probability(dropout_p, "dropout_p")
    call.config["seed"] = _args.resolve_seed(seed) if call.config["dropout_p"] > 0 else 0
    p = call.problem
    _args.check_out(out, call.user_shape(p.out_shape()), call.dtype, call.inputs)
    result = np.empty(p.out_shape(), dtype=call.dtype)
    lse = np.empty(p.lse_shape(), dtype=call.dtype) if return_lse else None
    if result.size or (lse is not None and lse.size):
        call.run("softmax", out=result, lse=lse)
    result, lse = call.squeeze(result), call.squeeze(lse)
    if out is not None:
        np.copyto(out, result)
        result = out
    return (result, lse) if return_lse else result


def _check_v_and_seed(v, seed) -> None:
    """What the kernels never read must still be valid: v=None would give an empty result, and
    a seed is checked even where dropout_p=0 or sample=False leaves it unused."""
    if v is None:
        raise TypeError("v must be an array (..., Hkv, Lk, Dv), got None")
    if seed is not None:
        _args.resolve_seed(seed)


def _is_plain(q, k, v, pattern, threads, mask, bias, scale, score, score_params, alibi_slopes,
              softcap, dropout_p, key_lengths, query_offset, key_offset, total_lengths, device):
    """True for a call with every option at its default and ndarray inputs: one a plan can
    serve. Types are checked exactly, so an array-valued argument never reaches ``==``."""
    defaults = (mask, bias, scale, score_params, alibi_slopes, softcap, key_lengths,
                total_lengths)
    return (all(x is None for x in defaults)
            and type(score) is str and score == "dot" and type(device) is str
            and device == "cpu" and type(dropout_p) is float and dropout_p == 0.0
            and type(query_offset) is int and query_offset == 0
            and type(key_offset) is int and key_offset == 0
            and (pattern is None or isinstance(pattern, Pattern))
            and (threads is None or type(threads) is int)
            and type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray
            and q.flags.aligned and k.flags.aligned and v.flags.aligned)  # else operand() copies


def _run_plan(plan, q, k, v, threads, return_lse, out):
    """A plain call whose arguments were checked before: same shapes, strides, dtypes."""
    config, operands, arrays, layouts, dtype, out_shape, lse_shape, squeeze = plan
    user_shape = out_shape[1:] if squeeze else out_shape
    _args.check_out(out, user_shape, dtype, {"q": q, "k": k, "v": v})
    result = np.empty(out_shape, dtype=dtype)
    lse = np.empty(lse_shape, dtype=dtype) if return_lse else None
    if result.size or (lse is not None and lse.size):
        ops = {"q": (q,) + operands["q"][1:], "k": (k,) + operands["k"][1:],
               "v": (v,) + operands["v"][1:], "mask": None, "bias": None, "q_proj": None,
               "k_proj": None}
        _core.forward(config, ops, {**arrays, "out": result, "lse": lse}, layouts,
                      _args.resolve_threads(threads))
    if squeeze:
        result, lse = result[0], (lse[0] if lse is not None else None)
    if out is not None:
        np.copyto(out, result)
        result = out
    return (result, lse) if return_lse else result


def hard_attention(q, k, v, pattern=None, *, sample=False, temperature=1.0, seed=None,
                   mask=None, bias=None, scale=None, score="dot", score_params=None,
                   alibi_slopes=None, softcap=None, key_lengths=None, query_offset=0,
                   key_offset=0, total_lengths=None, device="cpu", threads=None):
    """Hard attention: each query takes the value of one allowed key.

    ``sample=False``: the key with the largest score (ties: the lowest index).
    ``sample=True``: a key drawn from ``softmax(s / temperature)`` by the Gumbel-max trick,
    reproducible from ``seed`` (the same draws on every thread count).
    Scores are those of ``attention`` (same score, mask, bias, ALiBi, softcap arguments).

    Returns ``(out, idx)``: out ``(..., Hq, Lq, Dv)`` and ``idx`` ``(..., Hq, Lq)`` int64, the
    chosen key per query (``-1`` for a row with no allowed key, whose output is zeros).
    """
    _check_v_and_seed(v, seed)
    if (type(device) is not str or device != "cpu") and _device.select(
            _args.resolve_device(device), q, _device.gpu_unsupported(score)) == "cuda":
        _args.resolve_threads(threads)  # the GPU path: _device.py
        return _device.compute(
            "hard", q, k, v, pattern, sample=sample, temperature=temperature, seed=seed,
            mask=mask, bias=bias, scale=scale, score=score, score_params=score_params,
            alibi_slopes=alibi_slopes, softcap=softcap, key_lengths=key_lengths,
            query_offset=query_offset, key_offset=key_offset, total_lengths=total_lengths)
    call = _Call(q, k, v, pattern, mask=mask, bias=bias, scale=scale, score=score,
                 score_params=score_params, alibi_slopes=alibi_slopes, softcap=softcap,
                 key_lengths=key_lengths, query_offset=query_offset, key_offset=key_offset,
                 total_lengths=total_lengths, device=device, threads=threads)
    if not isinstance(sample, (bool, np.bool_)):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    call.config["sample"] = bool(sample)
    call.config["temperature"] = _args.resolve_temperature(temperature)
    call.config["seed"] = _args.resolve_seed(seed) if sample else 0
    p = call.problem
    result = np.empty(p.out_shape(), dtype=call.dtype)
    index = np.empty(p.lse_shape(), dtype=np.int64)
    if index.size:
        call.run("hard", out=result, index=index)
    return call.squeeze(result), call.squeeze(index)


def attention_weights(q, k, pattern=None, *, format="dense", mask=None, bias=None, scale=None,
                      score="dot", score_params=None, alibi_slopes=None, softcap=None,
                      key_lengths=None, query_offset=0, key_offset=0, total_lengths=None,
                      device="cpu", threads=None):
    """The normalised attention probabilities, for inspection (no dropout).

    ``format="dense"``: an array ``(..., Hq, Lq, Lk)`` (zeros outside the allowed pairs).
    ``format="csr"``: memory in proportion to the allowed pairs: an object array of shape
    ``(..., Hq)`` holding one ``scipy.sparse.csr_array`` (Lq, Lk) per (batch, head) when SciPy
    is installed, else one ``(indptr, indices, data)`` tuple. Every allowed pair is stored
    (its probability may be 0 when its bias is -inf); rows sum to 1, empty rows are empty.
    """
    if format not in ("dense", "csr"):
        raise ValueError(f"format must be 'dense' or 'csr', got {format!r}")
    call = _Call(q, k, None, pattern, mask=mask, bias=bias, scale=scale, score=score,
                 score_params=score_params, alibi_slopes=alibi_slopes, softcap=softcap,
                 key_lengths=key_lengths, query_offset=query_offset, key_offset=key_offset,
                 total_lengths=total_lengths, device=device, threads=threads)
    p = call.problem
    rows = p.batch * p.heads_q * p.len_q
    lse = np.empty(p.lse_shape(), dtype=call.dtype)
    empty_out = np.empty(p.out_shape(), dtype=call.dtype)  # Dv = 0: holds no element
    if rows:
        call.run("softmax", out=empty_out, lse=lse)
    if format == "dense":
        weights = np.zeros(p.scores_shape(), dtype=call.dtype)
        if rows and p.len_k:
            call.run("weights", lse=lse, weights=weights)
        return call.squeeze(weights)
    counts = np.zeros(rows, dtype=np.int64)
    if rows:
        call.run("count", row_counts=counts)
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    indices = np.empty(row_ptr[-1], dtype=np.int64)
    values = np.empty(row_ptr[-1], dtype=call.dtype)
    if row_ptr[-1]:
        call.run("weights", lse=lse, weights=values, csr_row_ptr=row_ptr, csr_col_index=indices)
    return call.squeeze(_split_csr(row_ptr, indices, values, p))


def _split_csr(row_ptr, indices, values, problem):
    """One CSR matrix per (batch, head), as views into the shared index and value arrays."""
    try:
        from scipy.sparse import csr_array
    except ImportError:  # SciPy is optional
        csr_array = None
    heads = problem.batch * problem.heads_q
    result = np.empty(heads, dtype=object)
    for n in range(heads):
        ptr = row_ptr[n * problem.len_q:(n + 1) * problem.len_q + 1]
        start, stop = ptr[0], ptr[-1]
        local = ptr - start
        parts = (local, indices[start:stop], values[start:stop])
        if csr_array is not None:
            result[n] = csr_array((parts[2], parts[1], parts[0]),
                                  shape=(problem.len_q, problem.len_k))
        else:
            result[n] = parts
    return result.reshape(problem.batch_shape + (problem.heads_q,))


def merge_attention(outs, lses):
    """Combine attention results computed over disjoint key shards into the result over all
    keys: the log-sum-exp merge of split-KV decoding and Ring Attention.

    ``outs[s]`` ``(..., Lq, Dv)`` and ``lses[s]`` ``(..., Lq)`` are one shard's output and
    ``lse`` (from ``attention(..., return_lse=True)``). Returns ``(out, lse)``; exact up to
    rounding; rows empty in every shard stay zero with ``lse = -inf``.
    """
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError("outs and lses must be lists of arrays, one per shard")
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"outs and lses must hold one array per shard (>= 1), got {len(outs)} and {len(lses)}"
        )
    outs = [_args.as_float_array(o, f"outs[{n}]") for n, o in enumerate(outs)]
    lses = [_args.as_float_array(s, f"lses[{n}]") for n, s in enumerate(lses)]
    dtype = _args.common_dtype({**{f"outs[{n}]": o for n, o in enumerate(outs)},
                                **{f"lses[{n}]": s for n, s in enumerate(lses)}}, "outs and lses")
    for n, (o, s) in enumerate(zip(outs, lses)):
        if o.ndim == 0 or o.shape != outs[0].shape or s.shape != lses[0].shape \
                or o.shape[:-1] != s.shape:
            raise ValueError(
                f"shard {n}: out {o.shape} and lse {s.shape} must match shard 0 "
                f"(out {outs[0].shape}, lse {lses[0].shape}) with lse = out.shape[:-1]"
            )
    stacked = np.stack(lses)
    top = np.max(stacked, axis=0)
    safe_top = np.where(np.isneginf(top), 0.0, top)  # an all-empty row: every weight is 0
    with np.errstate(invalid="ignore"):  # a NaN or +inf lse makes its row NaN, quietly
        weights = np.exp(stacked - safe_top)
        total = weights.sum(axis=0)
        empty = total == 0
        lse = np.where(empty, -np.inf, safe_top + np.log(np.where(empty, 1.0, total)))
        out = np.zeros(outs[0].shape, dtype=dtype)
        norm = np.where(empty, 1.0, total)
        for o, w in zip(outs, weights):
            out += o * (w / norm)[..., None]
    return out, lse.astype(dtype, copy=False)
