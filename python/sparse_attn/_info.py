"""What this build of sparse_attn contains, and whether a GPU is usable."""

from __future__ import annotations

from . import _core
from ._version import __version__


def build_info() -> dict:
    """The kernels this build has: the CPU SIMD level in use and the ones compiled in,
    OpenMP, the tile sizes, and whether CUDA kernels were compiled."""
    info = dict(_core.build_info())
    info["version"] = __version__
    return info


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a usable GPU is present."""
    return bool(_core.build_info()["cuda_compiled"])
