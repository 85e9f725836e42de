"""Compiled layouts: a pattern lowered to primitives and compiled by the C++ layout compiler
for one problem window, cached. Holds no attention logic and no kernel calls."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from . import _core

__all__ = ["CompiledLayout", "compile_layout", "clear_cache", "cache_info"]

_CACHE_SIZE = 256
_cache: OrderedDict = OrderedDict()
_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


class CompiledLayout:
    """The key tiles each query tile visits, for one (pattern, sizes, tiles, offsets).

    ``kinds()`` is the dense (query tile, key tile) picture: 0 = no allowed pair,
    1 = partial (the predicate is evaluated inside), 2 = full (no mask work).
    """

    __slots__ = ("handle", "len_q", "len_k", "tile_q", "tile_k", "q0", "k0")

    def __init__(self, handle, len_q, len_k, tile_q, tile_k, q0, k0):
        self.handle = handle
        self.len_q, self.len_k = len_q, len_k
        self.tile_q, self.tile_k = tile_q, tile_k
        self.q0, self.k0 = q0, k0

    @property
    def num_listed(self) -> int:
        """Number of (query tile, key tile) pairs with at least one allowed pair."""
        return self.handle.num_listed

    def kinds(self) -> np.ndarray:
        return self.handle.kinds()

    def nnz(self) -> int:
        return int(self.handle.count_allowed())

    def empty_rows(self) -> int:
        return int(self.handle.count_empty_rows())

    def __repr__(self) -> str:
        return (
            f"CompiledLayout(len_q={self.len_q}, len_k={self.len_k}, tile=({self.tile_q}, "
            f"{self.tile_k}), offset=({self.q0}, {self.k0}), listed_tiles={self.num_listed})"
        )


def _lowered_program(pattern, total_q: int, total_k: int):
    nodes = pattern._lower(total_q, total_k)
    table = np.array([node[:5] for node in nodes], dtype=np.int64).reshape(len(nodes), 5)
    data = [node[5] for node in nodes]
    return table, data


def compile_layout(pattern, len_q: int, len_k: int, tile_q: int = 64, tile_k: int = 64,
                   q0: int = 0, k0: int = 0, total=None) -> CompiledLayout:
    """Compile (or fetch from the cache) the layout of a head-agnostic pattern.

    ``len_q x len_k`` is the window at absolute offsets ``(q0, k0)`` of a problem of size
    ``total = (total_q, total_k)`` (default: the window ends the problem).
    """
    total_q, total_k = total if total is not None else (q0 + len_q, k0 + len_k)
    key = (pattern, len_q, len_k, tile_q, tile_k, q0, k0, total_q, total_k)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return hit
    table, data = _lowered_program(pattern, total_q, total_k)
    handle = _core.compile_layout(table, data, len_q, len_k, tile_q, tile_k, q0, k0)
    layout = CompiledLayout(handle, len_q, len_k, tile_q, tile_k, q0, k0)
    with _lock:
        _stats["misses"] += 1
        _cache[key] = layout
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return layout


def clear_cache() -> None:
    """Drop every cached layout."""
    with _lock:
        _cache.clear()


def cache_info() -> dict:
    """Hits, misses and the number of cached layouts."""
    with _lock:
        return {**_stats, "size": len(_cache), "max_size": _CACHE_SIZE}
