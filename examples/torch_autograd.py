"""sparse_attn inside PyTorch autograd on the CPU: ``attention_vjp`` wrapped as a
``torch.autograd.Function``, checked against PyTorch's own autograd through
``scaled_dot_product_attention`` given the same mask (as a dense bool matrix).

    python examples/torch_autograd.py

Prints the max error of the output and of each gradient per case; exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import sparse_attn as sa
import torch
from sparse_attn.reference import allowed_mask

# Max error relative to the largest magnitude of PyTorch's result.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


class SparseAttention(torch.autograd.Function):
    """out = sa.attention(q, k, v, pattern, **kwargs); backward through sa.attention_backward."""

    @staticmethod
    def forward(ctx, q, k, v, pattern, kwargs):
        out, vjp = sa.attention_vjp(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(),
                                    pattern, **kwargs)
        ctx.vjp = vjp
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk, dv = ctx.vjp(grad_out.detach().numpy())
        return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), None, None


def sparse_attention(q, k, v, pattern=None, **kwargs):
    return SparseAttention.apply(q, k, v, pattern, kwargs)


def check(pattern, dtype, *, batch=2, heads=8, kv_heads=2, length=257, dim=64, seed=0) -> bool:
    torch.manual_seed(seed)
    shape_q, shape_kv = (batch, heads, length, dim), (batch, kv_heads, length, dim)
    q, k, v = (torch.randn(s, dtype=dtype) for s in (shape_q, shape_kv, shape_kv))
    weight = torch.randn(shape_q, dtype=dtype)  # loss = sum(out * weight)

    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(*ours, pattern)
    (out * weight).sum().backward()

    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = torch.from_numpy(allowed_mask(pattern, length, length, 1)[0])
    expected = torch.nn.functional.scaled_dot_product_attention(*theirs, attn_mask=mask,
                                                                enable_gqa=True)
    (expected * weight).sum().backward()

    ok = True
    pairs = [("out", out, expected)] + [
        (f"d{name}", a.grad, b.grad) for name, a, b in zip("qkv", ours, theirs)
    ]
    for name, a, b in pairs:
        error = ((a - b).abs().max() / b.abs().max()).item()
        good = error <= TOLERANCE[dtype]
        ok &= good
        print(f"{dtype!s:14} {pattern!r:48} {name:4} max error {error:.2e}"
              f"{'' if good else '  MISMATCH'}")
    return ok


def main() -> int:
    patterns = [None, sa.Causal(), sa.SlidingWindow(32) | sa.Global([0, 100]),
                sa.Strided(8) | sa.SlidingWindow(4)]
    results = [check(p, dtype) for dtype in (torch.float32, torch.float64) for p in patterns]
    ok = all(results)  # every case runs and prints, mismatch or not
    print("all gradients agree with PyTorch autograd" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
