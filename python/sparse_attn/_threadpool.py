"""threadpoolctl support: a controller that reads and sets the library's default kernel thread
count, so ``threadpool_limits(1)`` (as joblib and scikit-learn use around nested parallel code)
reaches the kernels. The kernels pass an explicit thread count to OpenMP, so the controller
threadpoolctl has for libgomp alone would not. Registered only where threadpoolctl is installed.
"""

from __future__ import annotations

import os


def register() -> bool:
    """Register the controller; False when threadpoolctl (3.0 or later) is not installed."""
    try:
        import threadpoolctl
    except ImportError:
        return False
    if not hasattr(threadpoolctl, "register"):  # before threadpoolctl 3.0
        return False
    from . import _args, _core
    from ._version import __version__

    ours = os.path.realpath(_core.__file__)

    class SparseAttnController(threadpoolctl.LibController):
        """The default of ``sa.set_num_threads``; ``user_api="openmp"`` since the kernels are
        OpenMP loops, so ``threadpool_limits(n, user_api="openmp")`` limits them too."""

        user_api = "openmp"
        internal_api = "sparse_attn"
        filename_prefixes = ("_core.",)
        check_symbols = ("PyInit__core",)

        def get_version(self):
            # threadpoolctl skips a library whose controller raises OSError here: another
            # package's extension module may also be called _core.
            if os.path.realpath(self.filepath) != ours:
                raise OSError(f"{self.filepath} is not sparse_attn's extension")
            return __version__

        def get_num_threads(self):
            return _args.get_num_threads()

        def set_num_threads(self, num_threads):
            # threadpoolctl's limits are advisory: clamp rather than raise inside its `with`
            _args.set_num_threads(max(1, min(int(num_threads), _args.MAX_THREADS)))

    threadpoolctl.register(SparseAttnController)
    return True
