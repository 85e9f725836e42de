"""Key- and query-sharded attention on Dask against one process: a long sliding window with global
tokens on a LocalCluster of worker processes (one thread each) and on the threaded scheduler,
against sa.attention with threads=2 and threads=1. Prints a Markdown report.

    python bench/dask_scaling.py                             # L = 262,144, H = 4, D = 64
    python bench/dask_scaling.py --length 65536 --repeat 1   # a quick run

Reports time, peak RSS per process, the task count, per-task compute time and bytes in/out, and
the bytes that moved between workers, for two placements of the inputs on the workers:
"co-located" (q, k, v blocks of one position on one worker, as a fused QKV projection leaves
them) and "independent" (q, k, v placed separately by the scheduler). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time

import numpy as np
import psutil
import sparse_attn as sa
from sparse_attn import dask as sad

MiB = 2**20


class PeakRSS:
    """Samples the resident set size of some processes every ``interval`` seconds in a thread."""

    def __init__(self, pids, interval=0.005):
        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.before = {pid: proc.memory_info().rss for pid, proc in self.procs.items()}
        self.peak = dict(self.before)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid, proc in self.procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def inputs(args, placement):
    """q, k, v as dask arrays drawn from seeded generators (the same values wherever computed).
    "co-located": slices of one (3, H, L, D) array, so the three blocks of a position are made
    by one task and stay on one worker; "independent": three arrays."""
    import dask.array as da

    rng = da.random.default_rng(0 if placement == "co-located" else 1)
    shape = (args.heads, args.length, args.dim)
    chunks = (args.head_chunk, args.chunk, args.dim)
    if placement == "co-located":
        qkv = rng.standard_normal((3, *shape), chunks=(3, *chunks), dtype=np.float32)
        return [qkv[n] for n in range(3)]
    return [rng.standard_normal(shape, chunks=chunks, dtype=np.float32) for _ in range(3)]


def pattern_of(args):
    return sa.SlidingWindow(args.window // 2) | sa.Global(range(args.globals))


def single_process(q, k, v, pattern, threads, repeat):
    """Best time, peak RSS and its growth during the call, and the output of sa.attention."""
    times, peak, grew, out = [], 0, 0, None
    for _ in range(repeat):
        out = None
        with PeakRSS([os.getpid()]) as rss:
            start = time.perf_counter()
            out = sa.attention(q, k, v, pattern, threads=threads)
            times.append(time.perf_counter() - start)
        peak = max(peak, rss.peak[os.getpid()])
        grew = max(grew, rss.peak[os.getpid()] - rss.before[os.getpid()])
    return {"time": min(times), "peak": peak, "grew": grew, "out": out}


def run_threaded(args, q, k, v, pattern):
    """The threaded scheduler with ``workers`` threads on in-memory NumPy inputs."""
    import dask
    import dask.array as da

    chunks = (args.head_chunk, args.chunk, args.dim)
    arrays = [da.from_array(x, chunks=chunks) for x in (q, k, v)]
    times, peak, grew = [], 0, 0
    for _ in range(args.repeat):
        out = sad.attention(*arrays, pattern, threads=1)
        with PeakRSS([os.getpid()]) as rss:
            start = time.perf_counter()
            (result,) = dask.compute(out, scheduler="threads", num_workers=args.workers)
            times.append(time.perf_counter() - start)
        del result
        peak = max(peak, rss.peak[os.getpid()])
        grew = max(grew, rss.peak[os.getpid()] - rss.before[os.getpid()])
    return {"time": min(times), "peak": peak, "grew": grew}


def isolated_tasks(args, q, k, v, pattern, repeat=5):
    """Best-of-``repeat`` times of single tasks run in this process with threads=1, which load
    from other processes disturbs less than the runs above: a diagonal chunk pair (the bulk of
    the window), its neighbour (the window's corner), a global-rows pair (16 query rows against a
    whole key chunk), a global-columns pair (a query chunk against 16 keys), and a merge of the
    first three results."""
    C, L = args.chunk, args.length
    n = L // C
    cases = {
        "diagonal": (2, 2),
        "neighbour": (2, 1),
        "global rows": (0, n - 1),
        "global columns": (n - 1, 0),
    }
    results = {}
    parts = []
    for name, (qc, kc) in cases.items():
        qs, ks = slice(qc * C, (qc + 1) * C), slice(kc * C, (kc + 1) * C)
        blocks = q[:1, qs], k[:1, ks], v[:1, ks]
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            out, lse = sa.attention(
                *blocks,
                pattern,
                query_offset=qc * C,
                key_offset=kc * C,
                total_lengths=(L, L),
                return_lse=True,
                threads=1,
            )
            times.append(time.perf_counter() - start)
        flops = task_flops_at(args, pattern, qc * C, kc * C, C, C, L)
        results[name] = (min(times), flops)
        parts.append((out, lse))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sa.merge_attention([p[0] for p in parts[:3]], [p[1] for p in parts[:3]])
        times.append(time.perf_counter() - start)
    results["merge of 3"] = (min(times), 0)
    return results


def task_flops_at(args, pattern, q0, k0, lq, lk, L):
    from sparse_attn.layout import compile_layout

    window = compile_layout(pattern, lq, lk, 64, 64, q0, k0, total=(L, L))
    return 4 * args.dim * window.nnz()


def block_bytes(array, index):
    """Bytes of the block of a dask array at ``index``."""
    shape = [array.chunks[d][i] for d, i in enumerate(index)]
    return int(np.prod(shape)) * array.dtype.itemsize


def run_cluster(args, pattern, placement, gather=False):
    """Inputs persisted on a LocalCluster, then the attention persisted there (timed)."""
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit=None,
        silence_logs=logging.CRITICAL,
    )
    client = distributed.Client(cluster)
    try:
        pids = list(client.run(os.getpid).values())
        qd, kd, vd = client.persist(inputs(args, placement))
        distributed.wait([qd, kd, vd])
        out = sad.attention(qd, kd, vd, pattern, threads=1)
        graph = dict(out.__dask_graph__())
        shard_keys = [
            key for key in graph if isinstance(key, tuple) and key[0].startswith(sad.SHARD_PREFIX)
        ]
        merge_keys = [
            key for key in graph if isinstance(key, tuple) and key[0].startswith(sad.MERGE_PREFIX)
        ]
        times, records, moved, peaks, held = [], None, 0, {}, {}
        result = None
        for _ in range(args.repeat):
            result = None
            log_before = client.run(lambda dask_worker: len(dask_worker.transfer_incoming_log))
            with PeakRSS(pids) as rss, distributed.get_task_stream(client) as stream:
                start = time.perf_counter()
                result = client.persist(out)
                distributed.wait(result)
                times.append(time.perf_counter() - start)
            peaks = {p: max(peaks.get(p, 0), rss.peak[p]) for p in pids}
            held = rss.before
            records = stream.data
            moved = sum(
                client.run(
                    lambda dask_worker, before=log_before: sum(
                        entry["total"]
                        for entry in list(dask_worker.transfer_incoming_log)[
                            before[dask_worker.address] :
                        ]
                    )
                ).values()
            )
        gathered, gather_time = None, None
        if gather:
            start = time.perf_counter()
            gathered = result.compute()
            gather_time = time.perf_counter() - start
    finally:
        client.close()
        cluster.close()

    def compute_time(record):
        return sum(s["stop"] - s["start"] for s in record["startstops"] if s["action"] == "compute")

    # Dask fuses each final merge with the task that picks its output (the key is renamed), so
    # tasks are told apart by the layer name their key contains.
    shard_records = [r for r in records if str(r["key"][0]).startswith(sad.SHARD_PREFIX)]
    merge_records = [r for r in records if sad.MERGE_PREFIX in str(r["key"])]
    bytes_in = []
    for key in shard_keys:
        hb, qc, kc = key[1:]
        kvb = hb * kd.numblocks[-3] // qd.numblocks[-3]
        bytes_in.append(
            block_bytes(qd, (hb, qc, 0))
            + block_bytes(kd, (kvb, kc, 0))
            + block_bytes(vd, (kvb, kc, 0))
        )
    return {
        "time": min(times),
        "times": times,
        "peaks": [peaks[p] for p in pids],
        "held": [held[p] for p in pids],
        "tasks": len(shard_keys),
        "merges": len(merge_keys),
        "all_tasks": len(records),
        "shard_times": [compute_time(r) for r in shard_records],
        "shard_flops": [task_flops(args, pattern, qd, kd, r["key"]) for r in shard_records],
        "merge_times": [compute_time(r) for r in merge_records],
        "bytes_in": bytes_in,
        "bytes_out": [r["nbytes"] for r in shard_records],
        "moved": moved,
        "gather": gather_time,
        "out": gathered,
    }


def task_flops(args, pattern, qd, kd, key):
    """4·D per allowed pair of the task's window (its heads of one head chunk)."""
    hb, qc, kc = key[1:]
    q0, k0 = sum(qd.chunks[-2][:qc]), sum(kd.chunks[-2][:kc])
    lq, lk = qd.chunks[-2][qc], kd.chunks[-2][kc]
    return task_flops_at(args, pattern, q0, k0, lq, lk, qd.shape[-2]) * qd.chunks[-3][hb]


def fit_cost(flops, seconds):
    """Least-squares ``seconds = fixed + flops / rate``: (fixed seconds, FLOP/s)."""
    slope, fixed = np.polyfit(np.asarray(flops, dtype=float), np.asarray(seconds), 1)
    return fixed, 1.0 / slope


def stats(values, scale=1.0):
    if not values:
        return "-"
    values = [v * scale for v in values]
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=262_144)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512, help="total window width")
    parser.add_argument("--globals", type=int, default=16, help="global tokens 0 .. n-1")
    parser.add_argument(
        "--chunk", type=int, default=32_768, help="query and key chunk (length / chunk >= 3)"
    )
    parser.add_argument("--head-chunk", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    pattern = pattern_of(args)
    L, H, D = args.length, args.heads, args.dim
    pairs = pattern.nnz(L, L) * H
    flops = 4 * D * pairs  # Q·Kᵀ and P·V: 2 FLOPs per multiply-add, D of each per allowed pair
    load_start = os.getloadavg()[0]
    q, k, v = (x.compute(scheduler="sync") for x in inputs(args, "co-located"))
    input_bytes = q.nbytes + k.nbytes + v.nbytes

    single = {t: single_process(q, k, v, pattern, t, args.repeat) for t in (1, 2)}
    reference = single[1]["out"]
    isolated = isolated_tasks(args, q, k, v, pattern)
    threaded = run_threaded(args, q, k, v, pattern)
    cluster = {
        "co-located": run_cluster(args, pattern, "co-located", gather=True),
        "independent": run_cluster(args, pattern, "independent"),
    }
    got = cluster["co-located"]["out"]
    err = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    gather_time = cluster["co-located"]["gather"]

    print(f"## Dask scaling: L = {L:,}, H = {H}, D = {D}, float32, {pattern!r}\n")
    print(
        f"Allowed pairs {pairs:,} ({pairs / (H * L * L):.3%} of H·L²), {flops / 1e9:.1f} GFLOP "
        f"(4·D per pair); q, k, v {input_bytes / MiB:.0f} MiB; chunks {args.chunk:,} queries × "
        f"{args.chunk:,} keys × {args.head_chunk} head; {os.cpu_count()} CPUs; load average "
        f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; best of "
        f"{args.repeat}.\n"
    )
    print("| run | time (s) | GFLOP/s | peak RSS (MiB) | RSS growth during the run (MiB) |")
    print("| --- | ---: | ---: | --- | --- |")
    for t in (1, 2):
        s = single[t]
        print(
            f"| `sa.attention`, one process, threads={t} | {s['time']:.2f} | "
            f"{flops / s['time'] / 1e9:.1f} | {s['peak'] / MiB:.0f} | {s['grew'] / MiB:.0f} |"
        )
    print(
        f"| `sparse_attn.dask`, threaded scheduler, {args.workers} threads × threads=1 | "
        f"{threaded['time']:.2f} | {flops / threaded['time'] / 1e9:.1f} | "
        f"{threaded['peak'] / MiB:.0f} | {threaded['grew'] / MiB:.0f} |"
    )
    for placement, c in cluster.items():
        peaks = ", ".join(f"{p / MiB:.0f}" for p in c["peaks"])
        grew = ", ".join(f"{(p - h) / MiB:.0f}" for p, h in zip(c["peaks"], c["held"]))
        print(
            f"| `sparse_attn.dask`, LocalCluster {args.workers} processes × 1 thread, inputs "
            f"{placement} | {c['time']:.2f} | {flops / c['time'] / 1e9:.1f} | {peaks} per worker "
            f"| {grew} per worker |"
        )
    print()
    c = cluster["co-located"]
    print(
        f"- Tasks: {c['tasks']} attention tasks (touched chunk pairs, of "
        f"{H // args.head_chunk * (L // args.chunk) ** 2} pairs), {c['merges']} merge tasks; "
        f"{c['all_tasks']} tasks ran (each final merge is fused with the task picking its output; "
        f"the output keys remain as aliases)."
    )
    print("- Per attention task, min / median / max (co-located run):")
    print(f"  - compute: {stats(c['shard_times'], 1e3)} ms")
    print(f"  - bytes in (q, k, v blocks): {stats(c['bytes_in'], 1 / MiB)} MiB")
    print(f"  - bytes out (out + lse): {stats(c['bytes_out'], 1 / MiB)} MiB")
    fixed, rate = fit_cost(c["shard_flops"], c["shard_times"])
    thin = [
        t for t, f in zip(c["shard_times"], c["shard_flops"]) if f < 0.01 * max(c["shard_flops"])
    ]
    print(
        f"  - work: {stats(c['shard_flops'], 1e-9)} GFLOP; a least-squares fit gives "
        f"{fixed * 1e3:.1f} ms + FLOPs / ({rate / 1e9:.1f} GFLOP/s) per task; the {len(thin)} "
        f"tasks with < 1 % of the largest task's work (window corners) take "
        f"{stats(thin, 1e3)} ms"
    )
    print(f"- Per merge task: compute {stats(c['merge_times'], 1e3)} ms.")
    print("- Single tasks alone in this process, threads=1, best of 5:")
    for name, (seconds, flops) in isolated.items():
        rate = f", {flops / seconds / 1e9:.1f} GFLOP/s" if flops else ""
        print(f"  - {name}: {seconds * 1e3:.1f} ms for {flops / 1e9:.3g} GFLOP{rate}")
    for placement, c in cluster.items():
        total = sum(c["shard_times"]) + sum(c["merge_times"])
        print(
            f"- Inputs {placement}: {c['moved'] / MiB:.0f} MiB moved between workers; task "
            f"compute {total:.2f} s in all ({total / args.workers:.2f} s per worker) against "
            f"{c['time']:.2f} s wall; runs {', '.join(f'{t:.2f}' for t in c['times'])} s."
        )
    print(
        f"- The co-located result gathered to the client in {gather_time:.2f} s; relative error "
        f"against the threads=1 call {err:.1e}."
    )


if __name__ == "__main__":
    main()
