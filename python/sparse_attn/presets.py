"""Sparsity patterns of published models, built from the primitives of ``patterns``.

A preset is a pattern whose ``repr`` names the preset and its parameters; ``compose(Lq, Lk)``
shows the union/intersection of primitives it lowers to. No new element rule lives here.
"""

from __future__ import annotations

from functools import reduce
from operator import or_

from .patterns import (
    Causal,
    Fixed,
    Global,
    Pattern,
    RandomBlocks,
    SlidingWindow,
    Strided,
    _BlockWindow,
    _check_bool,
    _check_draws,
    _check_int,
    _int_sequence,
    _sizes,
)

__all__ = ["BigBird", "Longformer", "SparseTransformer"]


class _Preset(Pattern):
    """A named composition of primitives; subclasses define ``_compose`` for validated sizes."""

    __slots__ = ()

    def _compose(self, Lq: int, Lk: int) -> Pattern:
        raise NotImplementedError

    def compose(self, Lq, Lk=None) -> Pattern:
        """The union/intersection of primitives this preset stands for at sizes (Lq, Lk)."""
        return self._compose(*_sizes(Lq, Lk))

    def _nodes(self, Lq, Lk):
        return self._compose(Lq, Lk)._nodes(Lq, Lk)

    def _mask(self, Lq, Lk):
        return self._compose(Lq, Lk)._mask(Lq, Lk)


class Longformer(_Preset):
    """Longformer attention (Beltagy, Peters and Cohan 2020, "Longformer: The Long-Document
    Transformer", section 3.1): a sliding window, dilated or not, OR symmetric global attention.

    ``window`` is the paper's ``w``, the TOTAL width of the window: each token attends to
    ``w / 2`` tokens on each side and to itself (``|i - j| <= w / 2``); ``window`` must be even.
    With ``dilation = d > 1`` the window has gaps of size ``d - 1``: token ``i`` attends to
    ``i ± k * d`` for ``k = 0 .. w / 2`` (``Strided(d, reach=d * w / 2)``), a receptive field of
    ``d * w``. ``global_tokens`` (e.g. [CLS], question tokens) attend to every key and every query
    attends to them (``Global(global_tokens)``). Non-causal, like the paper's encoder; for the
    autoregressive setting intersect with ``Causal()``.
    """

    __slots__ = _params = ("window", "global_tokens", "dilation")

    def __init__(self, window, global_tokens=(), dilation=1):
        window = _check_int(window, "window", minimum=0)
        if window % 2:
            raise ValueError(
                f"window is Longformer's total width w (w/2 on each side) and must be even, "
                f"got {window}"
            )
        tokens = tuple(sorted(set(_int_sequence(global_tokens, "global_tokens").tolist())))
        dilation = _check_int(dilation, "dilation", minimum=1)
        self._set_fields(window=window, global_tokens=tokens, dilation=dilation)

    def __repr__(self):
        return (
            f"Longformer(window={self.window}, global_tokens={list(self.global_tokens)}, "
            f"dilation={self.dilation})"
        )

    def _compose(self, Lq, Lk):
        half = self.window // 2
        if self.dilation == 1:
            local = SlidingWindow(half)
        else:
            local = Strided(self.dilation, reach=self.dilation * half)
        return local | Global(self.global_tokens) if self.global_tokens else local


class BigBird(_Preset):
    """BigBird block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
    Sequences", section 2 and appendix D), ITC style, at the level of ``block x block`` blocks.

    With query block ``qb = i // block`` and key block ``kb = j // block``, (i, j) is allowed iff
    - window: ``|kb - qb| <= (window_blocks - 1) / 2`` (``window_blocks`` is odd: 3 means the
      block itself and one on each side, the paper's setting), or
    - global: ``i`` or ``j`` lies in the first ``global_blocks`` blocks (``i < global_blocks *
      block`` or ``j < global_blocks * block``): those tokens attend everywhere and are attended by
      everyone (the paper's implementation makes the first and the last block global; here they
      sit at the start), or
    - random: ``kb`` is one of ``random_blocks`` key blocks drawn for ``qb`` by
      ``RandomBlocks(random_blocks, block, seed, exclude_first=global_blocks,
      exclude_radius=(window_blocks - 1) / 2)``: distinct, and never a window or global block.
    The paper's base setting is ``block=64, window_blocks=3, global_blocks=2, random_blocks=3``.
    Global blocks beyond the sequence are dropped.
    """

    __slots__ = _params = ("block", "window_blocks", "global_blocks", "random_blocks", "seed")

    def __init__(self, block, window_blocks=3, global_blocks=2, random_blocks=3, seed=0):
        window_blocks = _check_int(window_blocks, "window_blocks", minimum=1)
        if window_blocks % 2 == 0:
            raise ValueError(
                f"window_blocks must be odd (a window centred on the query block), got "
                f"{window_blocks}"
            )
        self._set_fields(
            block=_check_int(block, "block", minimum=1),
            window_blocks=window_blocks,
            global_blocks=_check_int(global_blocks, "global_blocks", minimum=0),
            random_blocks=_check_draws(random_blocks, "random_blocks"),
            seed=_check_int(seed, "seed", minimum=0),
        )

    def _compose(self, Lq, Lk):
        radius = (self.window_blocks - 1) // 2
        parts = [_BlockWindow(self.block, radius, radius)]
        global_tokens = min(self.global_blocks * self.block, max(Lq, Lk))
        if global_tokens:
            parts.append(Global(range(global_tokens)))
        if self.random_blocks:
            parts.append(
                RandomBlocks(
                    self.random_blocks,
                    self.block,
                    self.seed,
                    exclude_first=self.global_blocks,
                    exclude_radius=radius,
                )
            )
        return reduce(or_, parts)


class SparseTransformer(_Preset):
    """The factorised patterns of the Sparse Transformer (Child, Gray, Radford and Sutskever
    2019, "Generating Long Sequences with Sparse Transformers", section 4.2), merged into one
    head (the paper's "merged" variant; it also spreads the two halves over separate heads).

    - ``kind="strided"`` with stride ``l``: ``i - j < l`` (the previous ``l`` positions, A(1))
      or ``(i - j) % l == 0`` (every ``l``-th position, A(2)); ``summary`` must be None.
    - ``kind="fixed"``: ``Fixed(stride, summary)``: ``j // l == i // l`` or
      ``j % l >= l - summary`` (``summary`` is the paper's ``c``; default 1).
    ``causal=True`` (the paper's autoregressive setting) intersects with ``j <= i``; with
    ``causal=False`` the strided local part becomes ``|i - j| < l``.
    """

    __slots__ = _params = ("kind", "stride", "summary", "causal")

    def __init__(self, kind, stride, summary=None, causal=True):
        if kind not in ("strided", "fixed"):
            raise ValueError(f"kind must be 'strided' or 'fixed', got {kind!r}")
        stride = _check_int(stride, "stride", minimum=1)
        if kind == "strided" and summary is not None:
            raise ValueError("summary applies to kind='fixed' only")
        if kind == "fixed":
            summary = 1 if summary is None else _check_int(summary, "summary", minimum=0)
            if summary > stride:
                raise ValueError(f"summary must be at most stride ({stride}), got {summary}")
        self._set_fields(
            kind=kind, stride=stride, summary=summary, causal=_check_bool(causal, "causal")
        )

    def _compose(self, Lq, Lk):
        if self.kind == "fixed":
            fixed = Fixed(self.stride, self.summary)
            return fixed & Causal() if self.causal else fixed
        if self.causal:
            return SlidingWindow(self.stride - 1, 0) | (Strided(self.stride) & Causal())
        return SlidingWindow(self.stride - 1) | Strided(self.stride)
