"""What this build of sparse_attn contains, and whether a GPU is usable."""

from __future__ import annotations

from . import _core
from ._version import __version__


def build_info() -> dict:
    """The kernels this build has: the CPU SIMD level in use and the ones compiled in,
    OpenMP, the tile sizes, and whether CUDA kernels were compiled (with their architectures,
    the CUDA runtime version, the usable GPUs and, when there are none, why)."""
    info = dict(_core.build_info())
    info["version"] = __version__
    cuda = getattr(_core, "cuda", None)
    if cuda is not None:
        count, why = cuda.device_count()
        info["cuda_architectures"] = cuda.architectures
        info["cuda_runtime_version"] = cuda.runtime_version
        info["cuda_devices"] = count
        info["cuda_unavailable_reason"] = why or None
    return info


def cuda_available() -> bool:
    """True when this build has CUDA kernels and ``cudaGetDeviceCount`` finds a GPU."""
    from . import _device

    return _device.cuda_available()
