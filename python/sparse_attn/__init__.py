"""sparse_attn: masked softmax attention over sparsity patterns, computed block-sparse."""

from ._version import __version__
from ._args import get_num_threads, set_num_threads
from .api import attention, attention_weights, hard_attention, merge_attention
from .gradients import attention_backward, attention_vjp
from .layers import MultiHeadAttention
from .patterns import (
    BlockSparse,
    Causal,
    Dense,
    Documents,
    Fixed,
    Global,
    Intersection,
    Mask,
    Pattern,
    Random,
    RandomBlocks,
    SlidingWindow,
    Strided,
    Union,
)
from .presets import BigBird, Longformer, SparseTransformer
from .plot import plot_pattern
from ._info import build_info, cuda_available
from ._threadpool import register as _register_threadpoolctl

_register_threadpoolctl()  # threadpool_limits() reaches the kernels, if threadpoolctl is installed

__all__ = [
    "__version__",
    "attention",
    "attention_backward",
    "attention_vjp",
    "attention_weights",
    "hard_attention",
    "merge_attention",
    "MultiHeadAttention",
    "build_info",
    "cuda_available",
    "get_num_threads",
    "set_num_threads",
    "plot_pattern",
    "Pattern",
    "Dense",
    "Causal",
    "SlidingWindow",
    "Strided",
    "Global",
    "BlockSparse",
    "Mask",
    "Union",
    "Intersection",
    "Random",
    "RandomBlocks",
    "Fixed",
    "Documents",
    "Longformer",
    "BigBird",
    "SparseTransformer",
]
