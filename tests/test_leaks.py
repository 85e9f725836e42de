"""No leaks: 10,000 small calls of every kind (each public function, the options that allocate
on the C++ side, calls that raise) keep the resident memory of a fresh interpreter flat once
the caches are warm (the layout cache and the plan cache are bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

LEAK_PROBE = textwrap.dedent(
    """
    import json, os, time
    import numpy as np
    import sparse_attn as sa

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 70, 16)).astype(np.float32) for _ in range(3))
    mask = rng.random((70, 70)) < 0.8
    bias = rng.standard_normal((3, 70, 70)).astype(np.float32)
    wq, wk, w = (rng.standard_normal(s) for s in ((16, 4), (16, 4), (4,)))
    layer = sa.MultiHeadAttention(16, 2, patterns=sa.Causal())
    x = rng.standard_normal((2, 30, 16)).astype(np.float32)
    o, l = sa.attention(q, k, v, return_lse=True)

    def refused(i):
        try:
            sa.attention(q, k, v[..., :5, :])
        except ValueError:
            pass
        try:
            sa.hard_attention(q, k, v, sample=True, temperature=-1.0)
        except ValueError:
            pass

    calls = [
        lambda i: sa.attention(q, k, v, sa.SlidingWindow(i % 50)),  # 50 layouts, re-used
        lambda i: sa.attention(q, k, v, sa.Causal(), mask=mask, bias=bias, return_lse=True,
                               key_lengths=[i % 71, 70]),
        lambda i: sa.attention(q, k, v, score="cosine", alibi_slopes=[0.1, 0.2, 0.3],
                               softcap=5.0, dropout_p=0.1, seed=i),
        lambda i: sa.attention(q, k, v, score="additive", score_params=dict(wq=wq, wk=wk, w=w)),
        lambda i: sa.hard_attention(q, k, v, sa.Global([i % 70]), sample=True, seed=i),
        lambda i: sa.attention_weights(q, k, sa.SlidingWindow(3), format="csr"),
        lambda i: sa.attention_weights(q[..., :20, :], k, sa.BigBird(8, seed=i % 7)),
        lambda i: sa.merge_attention([o, o], [l, l]),
        lambda i: layer(x),
        refused,
    ]

    def run(start, stop):
        for i in range(start, stop):
            calls[i % len(calls)](i)

    start = time.perf_counter()
    run(0, 1000)
    warm = rss()
    run(1000, 10000)
    print(json.dumps(dict(warm=warm, end=rss(), seconds=time.perf_counter() - start)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer's quarantine holds freed memory (RSS is not flat)",
)
def test_ten_thousand_calls_keep_memory_flat():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # see conftest.py
    done = subprocess.run(
        [sys.executable, "-c", LEAK_PROBE],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (m["end"] - m["warm"]) / 2**20
    assert growth < 3.0, f"RSS grew by {growth:.2f} MB over calls 1,000 to 10,000"
