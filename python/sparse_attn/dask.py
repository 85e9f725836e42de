"""Attention over ``dask.array`` inputs: one task per (query chunk, key chunk) pair that the
pattern touches, each a call of ``sparse_attn.attention`` at its offsets, merged per query chunk
by ``merge_attention``. Holds graph construction only: no attention arithmetic, no kernels.

Dask is an optional dependency (``pip install "sparse_attn[dask]"``), imported on first use.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator

import numpy as np

from . import _args, _core
from .api import attention as _attention
from .api import merge_attention
from .layout import _lowered_program
from .patterns import as_head_patterns

__all__ = ["attention", "touched_chunks"]

# The kernels' tiles (key tiles are at most 64 wide): planning compiles windows with them.
_TILE_Q = _core.build_info()["tile_q"]
_TILE_K = _core.build_info()["tile_k"]
# Planning reads dense (query tile, key tile) pictures up to this many cells (one byte each):
# L = 524,288 square. Larger problems bisect the key chunks instead.
_TILE_CELLS = 2**26

# The options sa.attention takes that a sharded call cannot pass on, with the reason.
_UNSUPPORTED = {
    "mask": "a mask would have to be cut into (query chunk, key chunk) blocks; express it as a "
    "pattern (sa.Mask, sa.BlockSparse, sa.Documents, ...) instead",
    "bias": "a bias would have to be cut into (query chunk, key chunk) blocks",
    "dropout_p": "dropout draws depend on the batch and head indices of each call, which are "
    "local to a chunk",
    "seed": "seed is only used with dropout_p, which is not supported",
    "out": "the result is a dask array; store it with .compute() or da.store",
    "query_offset": "the shards' offsets are set by the chunking",
    "key_offset": "the shards' offsets are set by the chunking",
    "total_lengths": "the total lengths are those of the dask arrays",
}

_DEFAULTS = {"dropout_p": 0.0, "query_offset": 0, "key_offset": 0}  # the others default to None

SHARD_PREFIX = "sparse-attention-shard-"  # the layer of the (query chunk, key chunk) tasks
MERGE_PREFIX = "sparse-attention-merge-"
OUT_PREFIX = "sparse-attention-"
LSE_PREFIX = "sparse-attention-lse-"


def _require_dask():
    try:
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph
    except ImportError as error:
        raise ImportError(
            "sparse_attn.dask needs Dask: install the extra with "
            'pip install "sparse_attn[dask]" (dask[array], distributed)'
        ) from error
    return da, HighLevelGraph


def attention(
    q,
    k,
    v,
    pattern=None,
    *,
    mask=None,
    bias=None,
    scale=None,
    score="dot",
    score_params=None,
    alibi_slopes=None,
    softcap=None,
    key_lengths=None,
    return_lse=False,
    device="cpu",
    threads=None,
    split_every=8,
    **unsupported,
):
    """``sparse_attn.attention`` over ``dask.array`` inputs, sharded over keys and queries.

    q ``(..., Hq, Lq, D)``, k ``(..., Hkv, Lk, D)``, v ``(..., Hkv, Lk, Dv)`` as in
    ``sparse_attn.attention`` (NumPy inputs are wrapped as one chunk). Chunks along the batch
    dimensions, the heads and both lengths define the shards; the head dims are rechunked to one
    chunk, v takes k's key chunks, and the query heads are split where needed so each chunk of
    them meets whole chunks of key/value heads (grouped-query attention).

    The graph holds one task per (batch block, head block, query chunk, key chunk) whose tiles
    hold an allowed pair (decided from compiled layouts, without computing attention; key chunks
    past every ``key_lengths`` of a batch block are skipped too), each
    ``sa.attention(..., query_offset=, key_offset=, total_lengths=, return_lse=True)``, then a
    ``merge_attention`` tree (fan-in ``split_every``) per query chunk. Rows that no key chunk
    touches give zeros and ``lse = -inf``.

    Passed through: ``pattern`` (a Pattern, a per-head Pattern or a list with one per query
    head), ``scale``, ``score``, ``score_params``, ``alibi_slopes``, ``softcap``,
    ``key_lengths`` (a NumPy array over the batch), ``device`` and ``threads`` (per task; the
    library default is used when None: on ``distributed`` workers ``OMP_NUM_THREADS=1``).
    ``mask``, ``bias``, dropout and ``out`` raise ``NotImplementedError``.

    Returns a dask array ``(..., Hq, Lq, Dv)``, and the lse ``(..., Hq, Lq)`` when
    ``return_lse=True``.
    """
    _refuse(mask=mask, bias=bias, **unsupported)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int >= 2, got {split_every!r}")
    da, HighLevelGraph = _require_dask()
    q, k, v, squeeze = _aligned_operands(da, q, k, v)
    batch_shape = tuple(max(q.shape[d], k.shape[d], v.shape[d]) for d in range(q.ndim - 3))
    Hq, Lq, D = q.shape[-3:]
    Hkv, Lk, Dv = k.shape[-3], k.shape[-2], v.shape[-1]
    totals = (Lq, Lk)

    options = {
        "scale": scale,
        "score": score,
        "score_params": score_params,
        "softcap": softcap,
        "device": device,
        "threads": threads,
    }
    dtype = _probe(q, k, v, pattern, options, alibi_slopes, totals)
    key_limits = _key_limits(key_lengths, batch_shape, Hq, Hkv, Lq, Lk, D, Dv)
    heads = as_head_patterns(pattern, Hq)
    slopes = _args.resolve_alibi(alibi_slopes, Hq)

    q, k, v, batch_chunks = _unify_batch_chunks(q, k, v, batch_shape)
    q, k, v, head_pairs = _unify_head_chunks(q, k, v, Hq, Hkv)
    v = v.rechunk({v.ndim - 2: k.chunks[-2]})
    q_edges, k_edges = _edges(q.chunks[-2]), _edges(k.chunks[-2])

    touched = {}  # distinct head pattern -> (query chunk, key chunk) bool matrix
    for head in set(heads):
        touched[head] = touched_chunks(head, q_edges, k_edges, totals)

    from dask.base import tokenize

    token = tokenize(q, k, v, heads, options, slopes, key_lengths, return_lse, split_every)
    shard_name, merge_name = SHARD_PREFIX + token, MERGE_PREFIX + token
    out_name, lse_name = OUT_PREFIX + token, LSE_PREFIX + token
    shards, merges, outs, lses = {}, {}, {}, {}
    for bidx in np.ndindex(*[len(c) for c in batch_chunks]):
        bslices = tuple(_block_slice(batch_chunks[d], b) for d, b in enumerate(bidx))
        block_batch = tuple(s.stop - s.start for s in bslices)
        limits = None if key_limits is None else key_limits[bslices]
        live_keys = (
            np.asarray(k_edges[:-1]) < (limits.max() if limits.size else 0)
            if limits is not None
            else np.ones(len(k_edges) - 1, dtype=bool)
        )
        q_b = tuple(b if q.shape[d] == batch_shape[d] else 0 for d, b in enumerate(bidx))
        k_b = tuple(b if k.shape[d] == batch_shape[d] else 0 for d, b in enumerate(bidx))
        v_b = tuple(b if v.shape[d] == batch_shape[d] else 0 for d, b in enumerate(bidx))
        for hb, (h0, h1, kvb) in enumerate(head_pairs):
            block_heads = heads[h0:h1]
            block_pattern = block_heads[0] if len(set(block_heads)) == 1 else list(block_heads)
            block_touched = (
                functools.reduce(operator.or_, (touched[h] for h in set(block_heads)))
                & live_keys[None, :]
            )
            run = functools.partial(
                _shard,
                patterns=block_pattern,
                totals=totals,
                key_lengths=None if limits is None else np.array(limits),
                alibi_slopes=None if slopes is None else slopes[h0:h1],
                options=options,
            )
            for qc in range(len(q_edges) - 1):
                index = (*bidx, hb, qc)
                parts = []
                for kc in np.nonzero(block_touched[qc])[0].tolist():
                    key = (shard_name, *index, kc)
                    shards[key] = (
                        functools.partial(run, q0=q_edges[qc], k0=k_edges[kc]),
                        (q.name, *q_b, hb, qc, 0),
                        (k.name, *k_b, kvb, kc, 0),
                        (v.name, *v_b, kvb, kc, 0),
                    )
                    parts.append(key)
                rows = q_edges[qc + 1] - q_edges[qc]
                shape = (*block_batch, h1 - h0, rows)
                final = _merge_tree(merges, merge_name, index, parts, split_every, shape, Dv, dtype)
                outs[(out_name, *index, 0)] = (operator.getitem, final, 0)
                lses[(lse_name, *index)] = (operator.getitem, final, 1)

    inputs = {name: x for x in (q, k, v) for name in x.__dask_layers__()}
    layers, dependencies = {}, {}
    for x in inputs.values():
        layers.update(x.dask.layers)
        dependencies.update(x.dask.dependencies)
    layers[shard_name], dependencies[shard_name] = shards, set(inputs)
    layers[merge_name], dependencies[merge_name] = merges, {shard_name}
    layers[out_name], dependencies[out_name] = outs, {shard_name, merge_name}
    layers[lse_name], dependencies[lse_name] = lses, {shard_name, merge_name}
    lead_chunks = (*batch_chunks, q.chunks[-3], q.chunks[-2])
    meta = np.empty((0,) * len(lead_chunks), dtype=dtype)
    if not return_lse:
        del layers[lse_name], dependencies[lse_name]
    graph = HighLevelGraph(layers, dependencies)
    out = da.Array(graph, out_name, (*lead_chunks, (Dv,)), meta=meta[..., None])
    lse = da.Array(graph, lse_name, lead_chunks, meta=meta) if return_lse else None
    if squeeze:
        out, lse = out[0], (lse[0] if lse is not None else None)
    return (out, lse) if return_lse else out


def touched_chunks(pattern, q_edges, k_edges, totals) -> np.ndarray:
    """Bool ``(query chunks, key chunks)``: True where the chunk pair holds an allowed pair of
    the head-agnostic ``pattern`` in a problem of ``totals = (Lq, Lk)``; chunk ``c`` spans
    ``[edges[c], edges[c + 1])``. Decided from layouts compiled with the kernels' tiles (not
    cached), never by computing attention; the cost grows with the listed tiles.

    Up to ``_TILE_CELLS`` (query tile, key tile) cells, each query chunk's layout against all keys
    is read tile by tile: a key chunk is touched when a tile wholly inside it is listed, and a
    chunk met only by listed tiles straddling its edges is decided by compiling its own window.
    Beyond that the key chunks are bisected per query chunk (see ``_bisect_key_chunks``).
    """
    Lq, Lk = totals
    q_edges = [int(e) for e in q_edges]
    k_edges = [int(e) for e in k_edges]
    touched = np.zeros((len(q_edges) - 1, len(k_edges) - 1), dtype=bool)
    if Lq == 0 or Lk == 0:
        return touched
    table, data = _lowered_program(pattern, Lq, Lk)

    def window(q0, q1, k0, k1):
        return _core.compile_layout(table, data, q1 - q0, k1 - k0, _TILE_Q, _TILE_K, q0, k0)

    tiles = -(-Lk // _TILE_K)
    if -(-Lq // _TILE_Q) * tiles > _TILE_CELLS:
        for qc, (q0, q1) in enumerate(zip(q_edges[:-1], q_edges[1:])):
            if q1 > q0:
                _bisect_key_chunks(window, q0, q1, k_edges, touched[qc])
        return touched
    k_lo, k_hi = np.array(k_edges[:-1]), np.array(k_edges[1:])
    # Tiles [first_inner, end_inner) lie wholly inside a key chunk (the last tile may be short).
    first_inner = -(-k_lo // _TILE_K)
    end_inner = np.maximum(first_inner, np.where(k_hi == Lk, tiles, k_hi // _TILE_K))
    nonempty = k_hi > k_lo
    edge_tiles = (np.minimum(k_lo // _TILE_K, tiles - 1), np.maximum(k_hi - 1, 0) // _TILE_K)
    for qc, (q0, q1) in enumerate(zip(q_edges[:-1], q_edges[1:])):
        if q1 == q0:
            continue
        layout = window(q0, q1, 0, Lk)
        if layout.num_listed == 0:
            continue
        listed = layout.kinds().any(axis=0)
        counts = np.concatenate([[0], np.cumsum(listed)])
        row = (counts[end_inner] > counts[first_inner]) & nonempty
        straddling = (listed[edge_tiles[0]] | listed[edge_tiles[1]]) & nonempty & ~row
        for kc in np.nonzero(straddling)[0].tolist():
            row[kc] = window(q0, q1, k_edges[kc], k_edges[kc + 1]).num_listed > 0
        touched[qc] = row
    return touched


def _bisect_key_chunks(window, q0, q1, k_edges, row) -> None:
    """Mark in ``row`` the key chunks that rows [q0, q1) touch: the window of a run of key chunks
    is compiled; a run with no listed tile is dropped, a run whose every tile is listed keeps each
    chunk holding a whole tile, any other run is halved, down to single chunks. The cost is the
    listed tiles times the depth (log2 of the key chunks)."""
    runs = [(0, len(k_edges) - 1)]
    while runs:
        a, b = runs.pop()
        k0, k1 = k_edges[a], k_edges[b]
        if k1 == k0:
            continue
        layout = window(q0, q1, k0, k1)
        if layout.num_listed == 0:
            continue
        if b - a == 1:
            row[a] = True
        elif layout.num_listed == layout.num_q_tiles * layout.num_k_tiles:
            for c in range(a, b):  # a chunk holding a whole tile holds an allowed pair
                c0, c1 = k_edges[c], k_edges[c + 1]
                tile0 = k0 + -(-(c0 - k0) // _TILE_K) * _TILE_K  # the first tile edge >= c0
                if tile0 + _TILE_K <= c1 or (c1 == k1 and tile0 < c1):
                    row[c] = True
                elif c1 > c0:
                    runs.append((c, c + 1))
        else:
            middle = (a + b) // 2
            runs += [(a, middle), (middle, b)]


# ---- tasks (module-level functions: they pickle by reference) ------------------------------------


def _shard(q, k, v, *, patterns, q0, k0, totals, key_lengths, alibi_slopes, options):
    """One (query chunk, key chunk) pair: its output and lse."""
    q, k, v, key_lengths, alibi_slopes = map(_canonical, (q, k, v, key_lengths, alibi_slopes))
    if options.get("score_params") is not None:
        params = {name: _canonical(np.asarray(a)) for name, a in options["score_params"].items()}
        options = {**options, "score_params": params}
    return _attention(
        q,
        k,
        v,
        patterns,
        query_offset=q0,
        key_offset=k0,
        total_lengths=totals,
        key_lengths=key_lengths,
        alibi_slopes=alibi_slopes,
        return_lse=True,
        **options,
    )


def _canonical(array):
    """The array viewed with NumPy's own dtype instance: an unpickled array (one that reached a
    worker process) carries a copy of its dtype, which the bindings' identity check refuses
    ("operand has the wrong dtype", "bad array for additive_w"). A view: nothing is copied."""
    if not isinstance(array, np.ndarray):
        return array
    return array.view(np.dtype(array.dtype.str))


def _merge(parts):
    """Merge (out, lse) results over disjoint key shards."""
    if len(parts) == 1:
        return parts[0]
    return merge_attention([p[0] for p in parts], [p[1] for p in parts])


def _untouched(shape, dim_v, dtype):
    """A query chunk no key chunk touches: zeros and lse = -inf."""
    return np.zeros((*shape, dim_v), dtype=dtype), np.full(shape, -np.inf, dtype=dtype)


# ---- graph and argument helpers ----------------------------------------------------------------


def _merge_tree(merges, name, index, parts, split_every, shape, dim_v, dtype):
    """Add merge tasks for ``parts`` to ``merges``; return the key of the merged result."""
    if not parts:
        key = (name, 0, *index)
        merges[key] = (_untouched, shape, dim_v, dtype)
        return key
    level = 0
    while len(parts) > 1:
        level += 1
        groups = [parts[g : g + split_every] for g in range(0, len(parts), split_every)]
        parts = []
        for g, group in enumerate(groups):
            key = (name, level, *index, g)
            merges[key] = (_merge, list(group))
            parts.append(key)
    return parts[0]


def _refuse(**options) -> None:
    """NotImplementedError for an option of sa.attention set away from its default here."""
    for name, value in options.items():
        if name not in _UNSUPPORTED:
            raise TypeError(
                f"sparse_attn.dask.attention got an unexpected keyword argument {name!r}"
            )
        default = _DEFAULTS.get(name)
        if value is default or (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and value == default
        ):
            continue
        raise NotImplementedError(
            f"sparse_attn.dask.attention does not support {name}=: {_UNSUPPORTED[name]}"
        )


def _as_dask(da, x, name):
    if x is None:
        raise TypeError(f"{name} must be an array (..., H, L, D), got None")
    if not hasattr(x, "__dask_graph__"):
        x = da.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (L, D) or (..., H, L, D), got shape {x.shape}"
        )
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes()")
    return x


def _aligned_operands(da, q, k, v):
    """q, k, v as dask arrays of one ndim (a head axis added to 2-D ones, batch axes of size 1
    prepended) with whole head dims, and whether the caller's 2-D q asks for a 2-D result."""
    arrays = [_as_dask(da, x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    squeeze = arrays[0].ndim == 2 and max(x.ndim for x in arrays) <= 3  # as sa.attention
    arrays = [x[None] if x.ndim == 2 else x for x in arrays]
    ndim = max(x.ndim for x in arrays)
    arrays = [x[(None,) * (ndim - x.ndim)] if x.ndim < ndim else x for x in arrays]
    return (*[x.rechunk({ndim - 1: -1}) for x in arrays], squeeze)


def _probe(q, k, v, pattern, options, alibi_slopes, totals):
    """Check the arguments with the library's own messages on a one-row problem of the same
    heads, dims and dtypes (and the pattern at the full size); return the output dtype."""
    nb = q.ndim - 3
    for name, x, y in (("q, k", q, k), ("q, v", q, v), ("k, v", k, v)):
        try:
            np.broadcast_shapes(x.shape[:nb], y.shape[:nb])
        except ValueError:
            raise ValueError(
                f"the leading (batch) dimensions of {name} do not broadcast: {x.shape}, {y.shape}"
            ) from None
    if k.shape[-2] != v.shape[-2] or k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k and v must agree on heads and length: k {k.shape}, v {v.shape}")
    Lq, Lk = totals
    lead = (1,) * nb
    probe_q = np.zeros((*lead, q.shape[-3], min(Lq, 1), q.shape[-1]), dtype=q.dtype)
    probe_k = np.zeros((*lead, k.shape[-3], min(Lk, 1), k.shape[-1]), dtype=k.dtype)
    probe_v = np.zeros((*lead, v.shape[-3], min(Lk, 1), v.shape[-1]), dtype=v.dtype)
    out = _attention(
        probe_q,
        probe_k,
        probe_v,
        pattern,
        alibi_slopes=alibi_slopes,
        total_lengths=totals,
        **options,
    )
    return out.dtype


def _key_limits(key_lengths, batch_shape, Hq, Hkv, Lq, Lk, D, Dv):
    """key_lengths checked and broadcast to the batch shape (None when not given)."""
    if key_lengths is None:
        return None
    if hasattr(key_lengths, "__dask_graph__"):
        raise TypeError(
            "key_lengths must be a NumPy array (it decides which key chunks run); compute it first"
        )
    problem = _args.Problem(batch_shape, Hq, Hkv, Lq, Lk, D, Dv, False)
    _args.key_lengths_array(key_lengths, problem, 0, Lk)  # raises with the library's messages
    return np.broadcast_to(np.asarray(key_lengths, dtype=np.int64), batch_shape)


def _edges(chunks) -> list:
    return [0, *np.cumsum(chunks).tolist()]


def _block_slice(chunks, b) -> slice:
    start = sum(chunks[:b])
    return slice(start, start + chunks[b])


def _unify_batch_chunks(q, k, v, batch_shape):
    """One chunking per batch axis for every operand that has the full size there (operands
    of size 1 broadcast and keep their single chunk)."""
    chunks = []
    for d, size in enumerate(batch_shape):
        full = [x for x in (q, k, v) if x.shape[d] == size]
        chunks.append(full[0].chunks[d] if size != 1 or full else (size,))

    def rechunk(x):
        target = {
            d: chunks[d]
            for d, size in enumerate(batch_shape)
            if x.shape[d] == size and x.chunks[d] != chunks[d]
        }
        return x.rechunk(target) if target else x

    return rechunk(q), rechunk(k), rechunk(v), chunks


def _unify_head_chunks(q, k, v, Hq, Hkv):
    """Split query-head chunks so each lies inside one group of ``Hq / Hkv`` query heads or is
    made of whole groups; rechunk k and v heads to match. Returns, per query-head chunk,
    ``(first head, end head, key/value head chunk)``."""
    group = Hq // Hkv
    edges = set(_edges(q.chunks[-3]))
    for e in list(edges):
        if e % group:  # a chunk edge inside a group: make the group's own edges chunk edges too
            edges.update({e - e % group, min(e - e % group + group, Hq)})
    q_edges = sorted(edges)
    kv_edges = sorted({e // group for e in q_edges if e % group == 0})
    q = _rechunk_axis(q, q.ndim - 3, q_edges)
    k = _rechunk_axis(k, k.ndim - 3, kv_edges)
    v = _rechunk_axis(v, v.ndim - 3, kv_edges)
    pairs = []
    for h0, h1 in zip(q_edges[:-1], q_edges[1:]):
        pairs.append((h0, h1, kv_edges.index(h0 // group)))
    return q, k, v, pairs


def _rechunk_axis(x, axis, edges):
    chunks = tuple(int(b - a) for a, b in zip(edges[:-1], edges[1:]))
    if not chunks:  # a zero-size axis
        chunks = (0,)
    return x if x.chunks[axis] == chunks else x.rechunk({axis: chunks})
