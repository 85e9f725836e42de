"""The real CUDA backend (sparse_attn._core.cuda) as this machine has it. Without a usable GPU
(no driver, no device, or a build without CUDA): the package imports and the CPU path works,
cuda_available() is False, build_info() says why, device="cuda" raises a RuntimeError that says
why, and device="auto" computes on the CPU. With a GPU: the kernels against the reference.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import sparse_attn as sa
from sparse_attn import _core, _device, reference

HAS_GPU = sa.cuda_available()
no_gpu = pytest.mark.skipif(HAS_GPU, reason="a GPU is usable here")
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="no usable GPU here")


def small_problem(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, 70, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, 90, 16)).astype(dtype)
    v = rng.standard_normal((2, 3, 90, 8)).astype(dtype)
    return q, k, v


def test_build_info_tells_the_truth():
    info = sa.build_info()
    assert info["cuda_compiled"] == hasattr(_core, "cuda")
    if info["cuda_compiled"]:
        assert info["cuda_devices"] >= 0
        assert isinstance(info["cuda_runtime_version"], int) and info["cuda_runtime_version"] > 0
        assert info["cuda_architectures"]
        assert (info["cuda_unavailable_reason"] is None) == (info["cuda_devices"] > 0)
        assert sa.cuda_available() == (info["cuda_devices"] > 0)
    else:
        assert not sa.cuda_available()


def test_import_and_cpu_attention_in_a_fresh_process():
    """Importing loads no CUDA driver: the static runtime only looks for one when first asked."""
    code = (
        "import numpy as np, sparse_attn as sa\n"
        "q = np.ones((5, 4), np.float32)\n"
        "out = sa.attention(q, q, q, sa.Causal())\n"
        "assert np.allclose(out, 1.0), out\n"
        "print(sa.cuda_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, env=dict(os.environ), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(HAS_GPU)


@no_gpu
def test_device_cuda_raises_and_says_why():
    q, k, v = small_problem()
    with pytest.raises(RuntimeError, match="device='cuda' cannot be used") as excinfo:
        sa.attention(q, k, v, device="cuda")
    reason = _device.unavailable_reason()
    assert reason and reason in str(excinfo.value)
    if sa.build_info()["cuda_compiled"]:
        assert reason == sa.build_info()["cuda_unavailable_reason"]
        # this project's build machines: a toolkit, no driver (cudaErrorInsufficientDriver)
        assert "driver" in reason or "device" in reason


@no_gpu
def test_device_auto_falls_back_to_the_cpu():
    q, k, v = small_problem()
    out, lse = sa.attention(q, k, v, sa.SlidingWindow(9), return_lse=True, device="auto")
    cpu_out, cpu_lse = sa.attention(q, k, v, sa.SlidingWindow(9), return_lse=True, device="cpu")
    np.testing.assert_array_equal(out, cpu_out)
    np.testing.assert_array_equal(lse, cpu_lse)


def test_a_build_without_cuda_says_so(monkeypatch):
    monkeypatch.delattr(_core, "cuda", raising=False)
    assert not sa.cuda_available()
    q, k, v = small_problem()
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        sa.attention(q, k, v, device="cuda")
    np.testing.assert_array_equal(sa.attention(q, k, v, device="auto"),
                                  sa.attention(q, k, v, device="cpu"))


@pytest.mark.parametrize("device", ["gpu", 0, "cuda:0"])
def test_bad_device_arguments(device):
    q, k, v = small_problem()
    with pytest.raises((TypeError, ValueError), match="device must be"):
        sa.attention(q, k, v, device=device)


@no_gpu
@pytest.mark.skipif(not hasattr(_core, "cuda"), reason="built without CUDA")
def test_backend_calls_fail_cleanly_without_a_driver():
    count, why = _core.cuda.device_count()
    assert count == 0 and why
    with pytest.raises((RuntimeError, MemoryError)):
        _core.cuda.DeviceBuffer(1024)
    # and the CPU path still works after the failed CUDA calls
    q, k, v = small_problem()
    assert np.isfinite(sa.attention(q, k, v)).all()


# ---- on a real GPU (skipped on this project's build machines) ------------------------------------


@gpu_only
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize("pattern", [None, sa.Causal(), sa.SlidingWindow(7) | sa.Global([0, 5]),
                                     sa.Strided(4, 40) & sa.Causal(10)])
def test_real_gpu_matches_the_reference(pattern, dtype, tol):
    q, k, v = small_problem(dtype, seed=3)
    mask = np.random.default_rng(4).random((70, 90)) < 0.9
    out, lse = sa.attention(q, k, v, pattern, mask=mask, key_lengths=[90, 50], return_lse=True,
                            device="cuda")
    f64 = [a.astype(np.float64) for a in (q, k, v)]
    ref, ref_lse = reference.attention(*f64, pattern, mask=mask, key_lengths=[90, 50],
                                       return_lse=True)
    assert np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref) <= tol
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert np.abs(lse[finite] - ref_lse[finite]).max() < 1e-4
