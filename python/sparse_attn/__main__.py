"""`python -m sparse_attn`: a short demo on built-in data.

Runs a Longformer-like pattern (sliding window + global tokens) and a strided pattern at
L = 4096, prints each pattern's density and tile picture, checks the result against dense
NumPy attention with the same mask, and times both.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparse_attn as sa


def numpy_masked_attention(q, k, v, allowed):
    """Plain NumPy: the full L x L score matrix, masked, softmaxed, times V."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="sequence length L")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    L, H, D = args.length, args.heads, args.dim

    info = sa.build_info()
    print(f"sparse_attn {sa.__version__}: CPU kernels '{info['simd']}', "
          f"{sa.get_num_threads()} threads, CUDA kernels {'built' if info['cuda_compiled'] else 'not built'}"
          f", GPU {'usable' if sa.cuda_available() else 'not usable'}")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((H, L, D), dtype=np.float32) for _ in range(3))
    patterns = {
        "Longformer-like: window ±128 + 8 global tokens": sa.SlidingWindow(128)
        | sa.Global(range(8)),
        "strided: stride 64 | local window ±32": sa.Strided(64) | sa.SlidingWindow(32),
    }
    for title, pattern in patterns.items():
        print(f"\n== {title}\n{pattern!r}")
        print(f"density {pattern.density(L, L):.2%} of {L}x{L}; blocks of {L // 16} "
              f"('#' all allowed, '+' some, '.' none):")
        print(pattern.to_string(L, L, block=L // 16))
        sa.attention(q, k, v, pattern)  # compiles and caches the layout
        ours, t_ours = best_of(lambda: sa.attention(q, k, v, pattern), args.repeats)
        allowed = pattern.to_mask(L, L)
        dense, t_numpy = best_of(lambda: numpy_masked_attention(q, k, v, allowed),
                                 max(1, args.repeats // 2))
        err = np.linalg.norm(ours - dense) / np.linalg.norm(dense)
        print(f"sparse_attn {t_ours * 1e3:8.1f} ms | NumPy dense+mask {t_numpy * 1e3:8.1f} ms | "
              f"speed-up {t_numpy / t_ours:5.1f}x | relative error vs NumPy {err:.1e}")
        if not err < 1e-4:
            raise SystemExit(f"mismatch against NumPy: relative error {err:.2e}")
    print("\nok")


if __name__ == "__main__":
    main()
