"""Backward-pass benchmark: sparse_attn's backward against its own forward, and against PyTorch
autograd through ``scaled_dot_product_attention`` given the same mask, in the same run.

    python bench/backward.py                       # L=4096, H=8, D=64, float32, 2 threads
    python bench/backward.py --length 1024 --patterns dense,window,causal

FLOPs are counted on allowed pairs only, per head: forward 2·(D + Dv) (Q·Kᵀ, P·V), backward
2·(3·D + 2·Dv) (S, dP, dV, dK, dQ); PyTorch computes every pair (a bool mask is applied after
the products), so its rate is quoted on the same count. Times are the best of ``--repeats``
interleaved runs. The pattern "window" is SlidingWindow(256) (+-256), as in the forward suite.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import sparse_attn as sa
from sparse_attn.reference import allowed_mask

PATTERNS = {
    "dense": sa.Dense(),
    "causal": sa.Causal(),
    "window": sa.SlidingWindow(256),
    "longformer": sa.SlidingWindow(256) | sa.Global(range(16)),
}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_step(torch, q, k, v, g, mask):
    """One SDPA forward under autograd, then its backward: (forward seconds, backward seconds)."""
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    middle = time.perf_counter()
    out.backward(g)
    return middle - start, time.perf_counter() - middle


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--patterns", default="dense,window")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args()
    B, H, L, D, threads = args.batch, args.heads, args.length, args.dim, args.threads

    try:
        import torch
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)

    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(4))
    print(f"backward benchmark: B={B} H={H} L={L} D={D} float32, {threads} threads, "
          f"{cpu_name()}, simd={sa.build_info()['simd']}, sparse_attn {sa.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else ", no torch"))
    print()
    print("| pattern | density | sa forward | sa backward | backward / forward | sa backward "
          "GFLOP/s | torch forward | torch backward | torch backward / sa backward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.patterns.split(","):
        pattern = PATTERNS[name]
        pairs = pattern.nnz(L, L) * B * H
        out, lse = sa.attention(q, k, v, pattern, return_lse=True, threads=threads)  # warm-up
        sa.attention_backward(q, k, v, out, lse, g, pattern, threads=threads)

        def forward(pattern=pattern):
            sa.attention(q, k, v, pattern, return_lse=True, threads=threads)

        def backward(pattern=pattern, out=out, lse=lse):
            sa.attention_backward(q, k, v, out, lse, g, pattern, threads=threads)

        t_torch = None
        if torch is not None:
            tensors = [torch.from_numpy(a) for a in (q, k, v, g)]
            mask = None if name == "dense" else torch.from_numpy(allowed_mask(pattern, L, L, 1)[0])
            torch_step(torch, *tensors, mask)  # warm-up
        t_fwd = t_bwd = float("inf")
        for _ in range(args.repeats):  # interleaved: the machine's noise hits every column alike
            t_fwd = min(t_fwd, best_time(forward, 1))
            t_bwd = min(t_bwd, best_time(backward, 1))
            if torch is not None:
                step = torch_step(torch, *tensors, mask)
                t_torch = step if t_torch is None else tuple(map(min, t_torch, step))
        gflops = 2 * pairs * (3 * D + 2 * D) / t_bwd / 1e9
        torch_cols = (f"{t_torch[0]:.3f} s | {t_torch[1]:.3f} s | {t_torch[1] / t_bwd:.1f}x"
                      if t_torch else "- | - | -")
        print(f"| {name} | {pairs / (B * H * L * L):.3f} | {t_fwd:.3f} s | {t_bwd:.3f} s | "
              f"{t_bwd / t_fwd:.2f} | {gflops:.1f} | {torch_cols} |")


if __name__ == "__main__":
    main()
