"""Drawing a pattern as a PNG with matplotlib, which is imported only here, only when called.

Small problems are drawn pair by pair from ``to_mask``; large ones, or any call with ``block``,
tile by tile from the compiled layout, so Lq x Lk is never materialised. No pattern logic here.
"""

from __future__ import annotations

import math
import os
import textwrap

import numpy as np

from .patterns import Pattern, _check_block, _check_int

__all__ = ["plot_pattern"]

_MAX_PAIR_SIDE = 1024  # up to this many queries and keys, draw the pairs themselves
_MAX_TILE_SIDE = 4096  # more tiles per side than this cannot show in a figure's pixels
_AUTO_BLOCK = 64  # the smallest tile chosen automatically: the core's largest tile
_PANELS_PER_ROW = 4  # per-head patterns get one panel per head
_PANEL_INCHES = 4.5
_MIN_WIDTH_INCHES = 6.0  # room for the title above a single panel
_COLORS = ["white", "#9ecae1", "#08519c"]  # indexed by tile kind: empty, partial, full/allowed
_TITLE_CHARS_PER_INCH = 10  # the title wraps to the figure width, at most three lines


def _auto_block(Lq: int, Lk: int) -> int:
    """The smallest tile of 64 times a power of two that keeps the picture to 1024 tiles a side."""
    block = _AUTO_BLOCK
    while math.ceil(max(Lq, Lk) / block) > _MAX_PAIR_SIDE:
        block *= 2
    return block


def _pictures(pattern: Pattern, Lq: int, Lk: int, block) -> tuple[list[np.ndarray], int]:
    """Per head a uint8 image of tile kinds (a pair counts as a full tile of 1), and the tile."""
    if block is None and max(Lq, Lk) <= _MAX_PAIR_SIDE:
        masks = pattern.to_mask(Lq, Lk).reshape(-1, Lq, Lk)
        return [2 * mask.astype(np.uint8) for mask in masks], 1
    block = _auto_block(Lq, Lk) if block is None else _check_block(block)
    if math.ceil(max(Lq, Lk) / block) > _MAX_TILE_SIDE:
        raise ValueError(
            f"block={block} gives more than {_MAX_TILE_SIDE} tiles a side for Lq={Lq}, Lk={Lk}; "
            "choose a larger block"
        )
    return pattern._tile_kinds(Lq, Lk, block), block


def plot_pattern(pattern, L, path, *, Lk=None, block=None) -> None:
    """Write a PNG picture of ``pattern`` for ``L`` queries and ``Lk`` (default ``L``) keys.

    With ``block`` (at most 64 or a multiple of 64), the picture shows block x block tiles as
    full, partial or empty, from the compiled layout. Without it, it shows the allowed pairs
    while ``L`` and ``Lk`` are at most 1024, and tiles of 64 times a power of two above. A
    per-head pattern gets one panel per head. Needs matplotlib (``pip install sparse_attn[plot]``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError("plot_pattern needs matplotlib: pip install sparse_attn[plot]") from error

    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    if not (isinstance(path, (str, os.PathLike)) or hasattr(path, "write")):
        raise TypeError(f"path must be a file name or a binary file, got {type(path).__name__}")
    Lq = _check_int(L, "L", minimum=1)
    Lk = Lq if Lk is None else _check_int(Lk, "Lk", minimum=1)
    pictures, unit = _pictures(pattern, Lq, Lk, block)

    columns = min(len(pictures), _PANELS_PER_ROW)
    rows = math.ceil(len(pictures) / columns)
    # An Agg canvas of our own: no pyplot, so the caller's matplotlib backend is left alone.
    width = max(_PANEL_INCHES * columns, _MIN_WIDTH_INCHES)
    figure = Figure(figsize=(width, _PANEL_INCHES * rows + 1.0), layout="constrained")
    FigureCanvasAgg(figure)
    colormap = ListedColormap(_COLORS)
    for h, picture in enumerate(pictures):
        axes = figure.add_subplot(rows, columns, h + 1)
        tiles_q, tiles_k = picture.shape
        axes.imshow(
            picture,
            cmap=colormap,
            vmin=0,
            vmax=2,
            interpolation="nearest",
            extent=(0, tiles_k * unit, tiles_q * unit, 0),
        )
        axes.set_xlim(0, Lk)  # edge tiles may reach past the sequence
        axes.set_ylim(Lq, 0)
        axes.set_xlabel("key j")
        axes.set_ylabel("query i")
        if pattern.num_heads is not None:
            axes.set_title(f"head {h}")

    chars = int(_TITLE_CHARS_PER_INCH * width)
    title = textwrap.fill(textwrap.shorten(repr(pattern), 3 * chars), chars)
    scale = "pairs" if unit == 1 else f"tiles of {unit} x {unit}"
    figure.suptitle(f"{title}\n{Lq} queries x {Lk} keys, {scale}")
    if unit == 1:
        legend = [Patch(color=_COLORS[2], label="allowed")]
    else:
        legend = [Patch(color=_COLORS[2], label="full"), Patch(color=_COLORS[1], label="partial")]
    figure.legend(handles=legend, loc="outside lower center", ncols=len(legend), frameon=False)
    figure.savefig(path, dpi=120)
