"""Huge sizes: indices are 64-bit throughout, and memory grows with L, never with Lq * Lk.

- more than 2**32 (query, key) pairs per call on sparse patterns (default run, seconds);
- a window pattern at L = 1,048,576, D = 64 whose peak memory stays within inputs + outputs +
  256 MB, measured in a fresh interpreter (default run, a few seconds, ~1.1 GB);
- q with more than 2**31 elements (slow: ~9.5 GB and ~1.5 minutes on 2 cores; run with
  ``pytest -m slow``).
Results are checked row by row against a float64 computation of the same rows in NumPy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sparse_attn as sa


def window_rows(q, k, v, rows, left, right, scale, group=1):
    """Exact (float64) output and lse of the given (batch, head, row) of a sliding-window call,
    from the rows' own keys only."""
    outs, lses = [], []
    L = k.shape[-2]
    for b, h, i in rows:
        lo, hi = max(0, i - left), min(L, i + right + 1)
        keys = k[b, h // group, lo:hi].astype(np.float64)
        s = keys @ q[b, h, i].astype(np.float64) * scale
        top = s.max()
        p = np.exp(s - top)
        outs.append(p @ v[b, h // group, lo:hi].astype(np.float64) / p.sum())
        lses.append(top + np.log(p.sum()))
    return np.array(outs), np.array(lses)


def sample_rows(rng, B, H, L, count=40):
    """Rows at both ends of every axis (the largest offsets) and random ones."""
    rows = {(B - 1, H - 1, L - 1), (0, 0, 0), (B - 1, H - 1, L - 64), (0, H - 1, L // 2)}
    while len(rows) < count:
        rows.add((int(rng.integers(B)), int(rng.integers(H)), int(rng.integers(L))))
    return sorted(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_more_than_2_32_pairs_on_a_window(dtype):
    B, H, Hkv, L, D, Dv = 2, 4, 2, 2**16 + 37, 8, 3  # B*H*L*L = 2**35.0...
    assert B * H * L * L > 2**32
    rng = np.random.default_rng(7)
    q = rng.standard_normal((B, H, L, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, L, Dv)).astype(dtype)
    out, lse = sa.attention(q, k, v, sa.SlidingWindow(5, 2), return_lse=True)
    rows = sample_rows(rng, B, H, L)
    expected_out, expected_lse = window_rows(q, k, v, rows, 5, 2, D**-0.5, group=H // Hkv)
    got_out = np.array([out[r] for r in rows])
    got_lse = np.array([lse[r] for r in rows])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got_out, expected_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(got_lse, expected_lse, rtol=tol, atol=tol)


def test_pair_counts_beyond_2_32():
    """Counting allowed pairs (nnz, density, the CSR weights' sizes) in 64 bits."""
    L = 2**17 + 3
    assert sa.Dense().nnz(L) == L * L > 2**34
    assert sa.Causal().nnz(L) == L * (L + 1) // 2 > 2**33
    assert sa.SlidingWindow(2).nnz(L) == 5 * L - 6
    assert sa.Dense().density(L) == 1.0
    q = np.ones((1, 1, L, 1), np.float32)
    matrix = sa.attention_weights(q, q, sa.SlidingWindow(1), format="csr")[0, 0]
    assert (matrix.nnz if hasattr(matrix, "nnz") else len(matrix[1])) == 3 * L - 2


MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, resource, time
    import numpy as np
    import sparse_attn as sa

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    L, D = 1 << 20, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, L, D), dtype=np.float32) for _ in range(3))
    sa.attention(q[..., :1000, :], k, v, sa.SlidingWindow(64))  # libraries loaded, layout cache
    base = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out, lse = sa.attention(q, k, v, sa.SlidingWindow(64), return_lse=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(base=base, peak_before=peak_before, peak=peak, seconds=seconds,
                          inputs=3 * q.nbytes, outputs=out.nbytes + lse.nbytes)))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer's shadow memory and quarantine add to the peak",
)
def test_memory_is_linear_in_the_length():
    """L = 1,048,576, D = 64, float32, a window of 129 keys: the call's peak memory beyond the
    inputs (already resident) is its outputs plus at most 256 MB (measured: ~2 MB)."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["peak_before"] <= m["base"] + 64 * 2**20, "the baseline is not the peak so far"
    extra = m["peak"] - m["base"] - m["outputs"]
    assert extra <= 256 * 2**20, (
        f"peak {m['peak'] / 2**20:.0f} MB: {extra / 2**20:.0f} MB beyond inputs "
        f"({m['inputs'] / 2**20:.0f} MB) and outputs ({m['outputs'] / 2**20:.0f} MB)"
    )


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.fixture
def slow_selected(request):
    """Slow tests run only when asked for (``pytest -m slow``), not in the default run."""
    expression = request.config.getoption("markexpr") or ""
    if "slow" not in expression or "not slow" in expression:
        pytest.skip("slow (~1.5 min, ~10 GB): run with pytest -m slow")


@pytest.mark.slow
@pytest.mark.skipif(available_memory() < 12 * 2**30, reason="needs ~10 GB of free memory")
def test_more_than_2_31_elements_in_q(slow_selected):
    """q of 2**31 + 18944 float32 elements (8 GB): offsets past 2**31 elements are right.
    Grouped-query keys and a 2-wide value head keep the other arrays small (~1.1 GB)."""
    B, H, Hkv, D, Dv = 1, 8, 1, 64, 2
    L = 2**22 + 37
    assert B * H * L * D > 2**31 and B * H * L * L > 2**32
    rng = np.random.default_rng(3)
    q = np.empty((B, H, L, D), np.float32)
    for h in range(H):  # uniform floats: the quickest to draw, and every row differs
        rng.random(out=q[0, h], dtype=np.float32)
        q[0, h] -= 0.5
    k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, Dv), dtype=np.float32)
    out, lse = sa.attention(q, k, v, sa.SlidingWindow(4), return_lse=True)
    rows = sample_rows(rng, B, H, L) + [(0, H - 1, L - 1 - i) for i in range(1, 70)]
    expected_out, expected_lse = window_rows(q, k, v, rows, 4, 4, D**-0.5, group=H)
    np.testing.assert_allclose(np.array([out[r] for r in rows]), expected_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array([lse[r] for r in rows]), expected_lse, rtol=1e-5, atol=1e-5)
