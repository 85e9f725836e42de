"""sparse_attn.dask: attention over dask arrays chunked along batch, heads, queries and keys equals
the single call (relative error <= 2e-5 float32, lse within 1e-4) for every pattern kind and
chunkings that cut 64-wide tiles; the graph holds one task per touched (query chunk, key chunk)
pair; unsupported options are refused; a 2-process LocalCluster gives the same result.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask
import sparse_attn as sa
from sparse_attn import dask as sad

REL_TOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}
LSE_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}

Lq, Lk = 203, 330  # odd sizes: the last 64-tile of each axis is short


def patterns(rng) -> dict:
    """One of every pattern kind at (Lq, Lk), by name."""
    return {
        "dense": sa.Dense(),
        "causal": sa.Causal(),
        "causal_bottom_right": sa.Causal(Lk - Lq),
        "window": sa.SlidingWindow(20, 45),
        "strided": sa.Strided(37),
        "strided_reach": sa.Strided(5, reach=90),
        "global": sa.Global([0, 150, 301]),
        "global_cols": sa.Global([7, 200], rows=False),
        "block_sparse": sa.BlockSparse(rng.random((7, 11)) < 0.25, 32),
        "mask": sa.Mask(rng.random((Lq, Lk)) < 0.002),
        "random": sa.Random(3, seed=1),
        "random_blocks": sa.RandomBlocks(2, 50, seed=3),
        "documents": sa.Documents([90, 0, 40, 60]),  # rows >= 190 attend nowhere
        "longformer": sa.Longformer(16, [5, 100]),
        "bigbird": sa.BigBird(32, 3, 1, 1, seed=2),
        "sparse_transformer": sa.SparseTransformer("strided", stride=40),
        "union": sa.SlidingWindow(10) | sa.Strided(64) | sa.Global([250]),
        "intersection": sa.Causal() & sa.Random(4, seed=5),
    }


CHUNKINGS = {  # (query chunks, key chunks)
    "single": (Lq, Lk),
    "tile_aligned": ((64, 64, 75), (64, 128, 138)),
    "cut_tiles": ((50, 1, 90, 62), (70, 1, 129, 100, 30)),
    "small": (37, 29),
}


def operands(rng, batch=(2,), hq=4, hkv=2, d=16, dv=8, dtype=np.float32):
    q = rng.standard_normal((*batch, hq, Lq, d)).astype(dtype)
    k = rng.standard_normal((*batch, hkv, Lk, d)).astype(dtype)
    v = rng.standard_normal((*batch, hkv, Lk, dv)).astype(dtype)
    return q, k, v


def compare(result, single, dtype=np.float32) -> None:
    (out, lse), (out1, lse1) = result, single
    dtype = np.dtype(dtype)
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == out1.shape and lse.shape == lse1.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse1))
    assert np.all(out[np.isneginf(lse)] == 0)
    norm = np.linalg.norm(out1.astype(np.float64))
    diff = np.linalg.norm(out.astype(np.float64) - out1)
    assert diff <= REL_TOL[dtype] * max(norm, 1.0), f"relative error {diff / norm:.3g}"
    finite = ~np.isneginf(lse1)
    np.testing.assert_allclose(lse[finite], lse1[finite], rtol=0, atol=LSE_TOL[dtype])


def shard_keys(graph) -> list:
    return [
        key for key in dict(graph) if isinstance(key, tuple) and key[0].startswith(sad.SHARD_PREFIX)
    ]


def expected_pairs(masks, out_chunks, k_chunks, key_lengths=None) -> int:
    """Touched (batch block, head block, query chunk, key chunk) blocks, from the dense masks
    ``masks (Hq, Lq, Lk)``, the result's chunks and the key chunks."""
    *batch_chunks, head_chunks, q_chunks, _ = out_chunks
    edges = [np.cumsum((0, *c)) for c in (*batch_chunks, head_chunks, q_chunks, k_chunks)]
    batch_shape = tuple(int(e[-1]) for e in edges[:-3])
    limits = np.broadcast_to(Lk if key_lengths is None else key_lengths, batch_shape)
    count = 0
    for index in np.ndindex(*(len(e) - 1 for e in edges)):
        b = tuple(slice(e[i], e[i + 1]) for e, i in zip(edges[:-3], index[:-3]))
        h, qc, kc = (slice(e[i], e[i + 1]) for e, i in zip(edges[-3:], index[-3:]))
        live = kc.start < (limits[b].max() if limits[b].size else 0)
        count += bool(live and masks[h, qc, kc].any())
    return count


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("name", list(patterns(np.random.default_rng(0))))
def test_every_pattern_and_chunking_equals_the_single_call(name, chunking):
    rng = np.random.default_rng(zlib.crc32(f"{name} {chunking}".encode()))  # stable per case
    pattern = patterns(np.random.default_rng(0))[name]
    q, k, v = operands(rng)
    q_chunks, k_chunks = CHUNKINGS[chunking]
    qd = da.from_array(q, chunks=(1, 2, q_chunks, -1))
    kd = da.from_array(k, chunks=(1, 1, k_chunks, -1))
    vd = da.from_array(v, chunks=(2, 2, k_chunks, 4))  # other chunks: rechunked to k's
    out, lse = sad.attention(qd, kd, vd, pattern, return_lse=True, threads=1)
    assert len(shard_keys(out.dask)) == expected_pairs(
        np.broadcast_to(pattern.to_mask(Lq, Lk), (4, Lq, Lk)), out.chunks, kd.chunks[-2]
    )
    result = dask.compute(out, lse, scheduler="sync")
    compare(result, sa.attention(q, k, v, pattern, return_lse=True))


@pytest.mark.parametrize("bisect", [False, True], ids=["tile_picture", "bisection"])
def test_touched_chunks_match_the_dense_mask(bisect, monkeypatch):
    """Both planning paths (dense tile pictures; bisection, used for large problems) find
    exactly the chunk pairs that hold an allowed pair, for every pattern and chunking."""
    if bisect:
        monkeypatch.setattr(sad, "_TILE_CELLS", 0)
    for name, pattern in patterns(np.random.default_rng(0)).items():
        mask = pattern.to_mask(Lq, Lk)
        for q_chunks, k_chunks in CHUNKINGS.values():
            q_edges = np.cumsum((0, *da.core.normalize_chunks(q_chunks, (Lq,))[0]))
            k_edges = np.cumsum((0, *da.core.normalize_chunks(k_chunks, (Lk,))[0]))
            expected = [
                [mask[a:b, c:d].any() for c, d in zip(k_edges[:-1], k_edges[1:])]
                for a, b in zip(q_edges[:-1], q_edges[1:])
            ]
            got = sad.touched_chunks(pattern, q_edges, k_edges, (Lq, Lk))
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} {q_chunks} {k_chunks}")


def test_options_per_head_patterns_and_gqa_head_chunks():
    """key_lengths, ALiBi, softcap, scale, cosine score, a list of per-head patterns, and
    query-head chunks that cut a group of 3 query heads per key/value head."""
    rng = np.random.default_rng(7)
    q, k, v = operands(rng, batch=(3,), hq=6, hkv=2)
    pool = patterns(rng)
    heads = [pool[n] for n in ("window", "causal", "documents", "random", "dense", "global")]
    options = {
        "key_lengths": np.array([330, 100, 3]),
        "alibi_slopes": np.linspace(0.01, 0.2, 6),
        "softcap": 5.0,
        "scale": 0.3,
    }
    for score in ("dot", "cosine"):
        qd = da.from_array(q, chunks=(2, (1, 4, 1), (70, 133), -1))
        kd = da.from_array(k, chunks=(1, 2, (128, 2, 200), -1))
        vd = da.from_array(v, chunks=(3, 1, 100, -1))
        out, lse = sad.attention(qd, kd, vd, heads, score=score, return_lse=True, **options)
        assert out.chunks[1] == (1, 2, 2, 1)  # (1, 4, 1) split at the group edges 3
        masks = np.stack([h.to_mask(Lq, Lk) for h in heads])
        assert len(shard_keys(out.dask)) == expected_pairs(
            masks, out.chunks, kd.chunks[-2], options["key_lengths"]
        )
        result = dask.compute(out, lse, scheduler="threads")
        compare(result, sa.attention(q, k, v, heads, score=score, return_lse=True, **options))


def test_per_head_block_sparse_float64_and_broadcast_batch():
    rng = np.random.default_rng(8)
    q, k, v = operands(rng, batch=(2, 3), hq=2, hkv=1, dtype=np.float64)
    k, v = k[:1], v[:, :1]  # k (1, 3, ...), v (2, 1, ...): broadcast over the batch
    layout = rng.random((2, 7, 11)) < 0.3
    pattern = sa.BlockSparse(layout, 32)
    out, lse = sad.attention(
        da.from_array(q, chunks=(1, 2, 1, 100, 8)),
        da.from_array(k, chunks=(1, 1, 1, 64, 8)),
        v,
        pattern,
        return_lse=True,
    )
    assert out.shape == (2, 3, 2, Lq, 8)
    result = dask.compute(out, lse, scheduler="threads")
    compare(result, sa.attention(q, k, v, pattern, return_lse=True), np.float64)


def test_two_dimensional_inputs_and_no_lse():
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((n, 5)).astype(np.float32) for n in (Lq, Lk, Lk))
    pattern = sa.Longformer(30, [0])
    out = sad.attention(
        da.from_array(q, chunks=(60, 5)),
        da.from_array(k, chunks=(45, 2)),
        da.from_array(v, chunks=(80, 5)),
        pattern,
    )
    assert out.shape == (Lq, 5) and out.chunks[0] == (60, 60, 60, 23)
    single = sa.attention(q, k, v, pattern, return_lse=True)
    compare((out.compute(scheduler="sync"), single[1]), single)


def test_untouched_query_chunks_give_zeros_and_minus_inf():
    rng = np.random.default_rng(10)
    q, k, v = operands(rng, batch=(1,), hq=1, hkv=1)
    pattern = sa.Documents([64])  # queries >= 64 meet no document
    out, lse = sad.attention(
        da.from_array(q, chunks=(1, 1, 64, -1)),
        da.from_array(k, chunks=(1, 1, 64, -1)),
        v,
        pattern,
        return_lse=True,
    )
    assert len(shard_keys(out.dask)) == 1
    out, lse = dask.compute(out, lse, scheduler="sync")
    assert np.all(out[..., 64:, :] == 0) and np.all(np.isneginf(lse[..., 64:]))
    compare((out, lse), sa.attention(q, k, v, pattern, return_lse=True))


def test_merge_tree_over_many_key_chunks():
    rng = np.random.default_rng(11)
    q, k, _v = operands(rng, batch=(1,), hq=2, hkv=2)
    qd = da.from_array(q, chunks=(1, 2, 101, -1))
    kd = da.from_array(k, chunks=(1, 2, 11, -1))  # 30 key chunks, merged 3 at a time
    out, lse = sad.attention(qd, kd, kd, sa.Dense(), return_lse=True, split_every=3)
    merges = [
        key
        for key in dict(out.dask)
        if isinstance(key, tuple) and key[0].startswith(sad.MERGE_PREFIX)
    ]
    assert len(shard_keys(out.dask)) == 3 * 30
    assert len(merges) == 3 * (10 + 4 + 2 + 1)  # 30 -> 10 -> 4 -> 2 -> 1 per query chunk
    compare(
        dask.compute(out, lse, scheduler="threads"), sa.attention(q, k, k, None, return_lse=True)
    )


def test_head_dim_chunks_are_rechunked():
    rng = np.random.default_rng(12)
    q, k, v = operands(rng, batch=(1,), hq=1, hkv=1, d=16)
    out = sad.attention(
        da.from_array(q, chunks=(1, 1, 100, 4)),
        da.from_array(k, chunks=(1, 1, 100, 5)),
        v,
        sa.Causal(),
    )
    np.testing.assert_allclose(
        out.compute(scheduler="sync"), sa.attention(q, k, v, sa.Causal()), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    "option",
    [
        {"mask": np.ones((Lq, Lk), bool)},
        {"bias": np.zeros((Lq, Lk), np.float32)},
        {"dropout_p": 0.1},
        {"out": np.zeros(3)},
        {"query_offset": 5},
        {"total_lengths": (Lq, Lk)},
    ],
)
def test_unsupported_options_are_refused_by_name(option):
    q, k, v = operands(np.random.default_rng(13), batch=(1,))
    (name,) = option
    with pytest.raises(NotImplementedError, match=name):
        sad.attention(da.from_array(q), k, v, **option)


def test_bad_arguments_raise_the_library_errors():
    q, k, v = operands(np.random.default_rng(14), batch=(1,))
    with pytest.raises(TypeError, match="unexpected keyword argument 'windw'"):
        sad.attention(q, k, v, windw=3)
    with pytest.raises(ValueError, match="mask of shape"):
        sad.attention(q, k, v, sa.Mask(np.ones((5, 5), bool)))
    with pytest.raises(TypeError, match="share one dtype"):
        sad.attention(q, k.astype(np.float64), v)
    with pytest.raises(ValueError, match="key_lengths"):
        sad.attention(q, k, v, key_lengths=[Lk + 1])
    with pytest.raises(ValueError, match="split_every"):
        sad.attention(q, k, v, split_every=1)


def test_missing_dask_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dask.array", None)  # "import dask.array" now fails
    q, k, v = operands(np.random.default_rng(15), batch=(1,))
    with pytest.raises(ImportError, match=r"sparse_attn\[dask\]"):
        sad.attention(q, k, v)


def test_local_cluster_with_two_worker_processes():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(16)
    q, k, v = operands(rng, batch=(1,), hq=2, hkv=1)
    pattern = sa.Longformer(40, [3, 150]) | sa.Random(2, seed=4)
    qd = da.from_array(q, chunks=(1, 1, 70, -1))
    kd = da.from_array(k, chunks=(1, 1, 90, -1))
    vd = da.from_array(v, chunks=(1, 1, 90, -1))
    out, lse = sad.attention(qd, kd, vd, pattern, return_lse=True, threads=1)
    # Arrays that reach a worker process are unpickled: the additive score's weights, ALiBi
    # slopes and key_lengths travel inside the tasks.
    d = q.shape[-1]
    options = {
        "score": "additive",
        "score_params": {
            "wq": rng.standard_normal((d, 6)).astype(np.float32),
            "wk": rng.standard_normal((d, 6)).astype(np.float32),
            "w": rng.standard_normal(6).astype(np.float32),
        },
        "alibi_slopes": np.array([0.05, 0.1]),
        "key_lengths": np.array([250]),
    }
    out2, lse2 = sad.attention(qd, kd, vd, pattern, return_lse=True, threads=1, **options)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result = client.compute([out, lse], sync=True)
        result2 = client.compute([out2, lse2], sync=True)
        assert len(client.run(lambda: 1)) == 2  # two worker processes ran
    compare(tuple(result), sa.attention(q, k, v, pattern, return_lse=True))
    compare(tuple(result2), sa.attention(q, k, v, pattern, return_lse=True, **options))
