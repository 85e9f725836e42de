"""MultiHeadAttention: the Q, K, V and output projections of multi-head attention as NumPy
weights around ``sparse_attn.attention``, with per-head patterns and grouped-query attention.
Only projections, head reshapes, weights and their files live here; the attention is ``api``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from .api import attention
from .patterns import _check_int, as_head_patterns

__all__ = ["MultiHeadAttention"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FILE_FORMAT = 1  # the layout of the .npz that save() writes: "config" (JSON) + one array per param
_WEIGHTS = ("wq", "wk", "wv", "wo")  # drawn from the seed in this order, so layers reproduce
# Arguments of sa.attention the layer sets itself: the pattern is the layer's, and out= would
# receive the per-head attention output, not the layer's.
_OWN_ARGUMENTS = ("pattern", "out")


def _check_dtype(dtype) -> np.dtype:
    try:
        # np.dtype(None) is float64, and None == np.dtype(...) compares as a dtype: refuse None
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _check_real_array(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float (or int) array, got dtype {array.dtype}")
    return array


def _split_heads(a: np.ndarray, heads: int) -> np.ndarray:
    """(..., L, heads * d) -> (..., heads, L, d), a view with unit innermost stride."""
    # d is spelled out: an empty batch or sequence leaves -1 nothing to infer from
    return np.swapaxes(a.reshape(*a.shape[:-1], heads, a.shape[-1] // heads), -2, -3)


def _merge_heads(a: np.ndarray) -> np.ndarray:
    """(..., heads, L, d) -> (..., L, heads * d)."""
    a = np.swapaxes(a, -2, -3)
    return a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])


class MultiHeadAttention:
    """Multi-head (self or cross) attention with NumPy weights, over sparsity patterns.

    ``layer(x)`` is self-attention and ``layer(x, context)`` cross attention::

        q = x @ wq + bq            # (..., L, embed_dim), split into num_heads heads of head_dim
        k = context @ wk + bk      # (..., S, kv_heads * head_dim)
        v = value @ wv + bv        # value defaults to context, context to x
        y = merge(sa.attention(q, k, v, patterns, **kwargs)) @ wo + bo

    Weights are stored ``(in_features, out_features)`` and applied as ``y = x @ W + b`` (the
    transpose of ``torch.nn.Linear.weight``). They are drawn reproducibly from ``seed``: Glorot /
    Xavier uniform per matrix, ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``, biases zero.
    The same seed gives the same weights in float32 and float64 (drawn in float64, then rounded).

    ``patterns`` is None (dense), one Pattern (a per-head one is split over the heads) or a list
    with one Pattern per query head. ``kv_heads`` < ``num_heads`` is grouped-query attention:
    query head ``h`` reads key/value head ``h // (num_heads // kv_heads)``. ``kdim`` and ``vdim``
    are the feature sizes of the key and value inputs (default ``embed_dim``).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        *,
        kv_heads=None,
        patterns=None,
        bias=True,
        seed=0,
        dtype=np.float32,
        kdim=None,
        vdim=None,
    ):
        embed_dim = _check_int(embed_dim, "embed_dim", minimum=1)
        num_heads = _check_int(num_heads, "num_heads", minimum=1)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        kv_heads = num_heads if kv_heads is None else _check_int(kv_heads, "kv_heads", minimum=1)
        if num_heads % kv_heads:
            raise ValueError(
                f"kv_heads ({kv_heads}) must divide num_heads ({num_heads}) "
                "(grouped-query attention)"
            )
        kdim = embed_dim if kdim is None else _check_int(kdim, "kdim", minimum=1)
        vdim = embed_dim if vdim is None else _check_int(vdim, "vdim", minimum=1)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        seed = _check_int(seed, "seed", minimum=0)
        dtype = _check_dtype(dtype)
        if patterns is not None:
            try:
                patterns = as_head_patterns(patterns, num_heads)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"patterns: {exc}") from None

        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim, self.bias, self.dtype = kdim, vdim, bool(bias), dtype
        self.patterns = patterns  # None (dense) or a tuple of one Pattern per query head
        self._params = self._initial_params(seed)

    # ---- weights -------------------------------------------------------------------------------

    def param_shapes(self) -> dict:
        """The name and shape of every parameter, in the order ``params`` lists them."""
        embed, kv_features = self.embed_dim, self.kv_heads * self.head_dim
        shapes = {
            "wq": (embed, embed),
            "wk": (self.kdim, kv_features),
            "wv": (self.vdim, kv_features),
            "wo": (embed, embed),
        }
        if self.bias:
            shapes.update(bq=(embed,), bk=(kv_features,), bv=(kv_features,), bo=(embed,))
        return shapes

    def _initial_params(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        params = {}
        for name, shape in self.param_shapes().items():
            if name in _WEIGHTS:
                bound = math.sqrt(6.0 / (shape[0] + shape[1]))  # Glorot: fan_in + fan_out
                params[name] = rng.uniform(-bound, bound, shape).astype(self.dtype)
            else:
                params[name] = np.zeros(shape, dtype=self.dtype)
        return params

    @property
    def params(self) -> dict:
        """The parameters by name (a new dict holding the layer's own arrays: editing an array in
        place changes the layer; replace arrays with ``load_params``)."""
        return dict(self._params)

    def load_params(self, params) -> None:
        """Replace every parameter from a mapping name -> array (copied, cast to the layer's dtype).

        The names must be exactly those of ``param_shapes()``; nothing changes unless all pass.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping name -> array, got {type(params).__name__}")
        shapes = self.param_shapes()
        unknown = sorted(set(params) - set(shapes), key=str)
        missing = [name for name in shapes if name not in params]
        if unknown:
            hint = " (this layer has bias=False)" if not self.bias else ""
            raise ValueError(
                f"params: unknown parameter(s) {unknown}{hint}; expected {list(shapes)}"
            )
        if missing:
            raise ValueError(f"params: missing parameter(s) {missing}; expected {list(shapes)}")
        loaded = {}
        for name, shape in shapes.items():
            array = _check_real_array(params[name], name)
            if array.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
            loaded[name] = np.array(array, dtype=self.dtype, order="C", copy=True)
        self._params = loaded

    def _config(self) -> dict:
        return {
            "format": _FILE_FORMAT,
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "kv_heads": self.kv_heads,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "bias": self.bias,
            "dtype": self.dtype.name,
        }

    def save(self, path) -> None:
        """Write the configuration and the parameters to an ``.npz`` file (``np.savez`` appends
        ``.npz`` to a path without it). Patterns are not saved: pass them to ``load``."""
        np.savez(path, config=np.array(json.dumps(self._config())), **self._params)

    @classmethod
    def load(cls, path, *, patterns=None) -> MultiHeadAttention:
        """A layer from a file written by ``save``, with the given ``patterns`` (default dense)."""
        with np.load(path, allow_pickle=False) as data:
            if "config" not in data.files:
                raise ValueError(f"{path}: not a MultiHeadAttention file (no 'config' entry)")
            config = json.loads(str(data["config"]))
            params = {name: data[name] for name in data.files if name != "config"}
        if config.pop("format", None) != _FILE_FORMAT:
            raise ValueError(f"{path}: unknown MultiHeadAttention file format")
        layer = cls(config.pop("embed_dim"), config.pop("num_heads"), patterns=patterns, **config)
        layer.load_params(params)
        return layer

    # ---- the layer -----------------------------------------------------------------------------

    def _input(self, value, name: str, features: int, features_name: str) -> np.ndarray:
        """``value`` as the layer's dtype with shape (..., length, features)."""
        array = _check_real_array(value, name)
        if array.ndim < 2 or array.shape[-1] != features:
            raise ValueError(
                f"{name} must have shape (..., length, {features_name}={features}), "
                f"got {array.shape}"
            )
        return array.astype(self.dtype, copy=False)

    def _project(self, array: np.ndarray, name: str) -> np.ndarray:
        out = array @ self._params[f"w{name}"]
        if self.bias:
            out += self._params[f"b{name}"]
        return out

    def __call__(self, x, context=None, *, value=None, **attention_kwargs):
        """Attention of ``x`` (..., L, embed_dim) over ``context`` (..., S, kdim; default ``x``),
        whose values come from ``value`` (..., S, vdim; default ``context``).

        Inputs are converted to the layer's dtype (float or int arrays); leading dimensions
        broadcast. Keyword arguments go to ``sa.attention`` (``mask``, ``bias``, ``key_lengths``,
        ``scale``, ``threads``, ``return_lse``, ...), whose shapes are those of the per-head
        problem: ``mask`` and ``bias`` broadcast to (..., num_heads, L, S).

        Returns ``y`` (..., L, embed_dim) in the layer's dtype, and with ``return_lse=True`` also
        the log-sum-exp of each head's scores (..., num_heads, L).
        """
        for name in _OWN_ARGUMENTS:
            if name in attention_kwargs:
                raise TypeError(
                    f"MultiHeadAttention does not take {name}= "
                    "(patterns are set on the layer; the output is returned)"
                )
        if value is not None and context is None:
            raise ValueError("value needs context: pass layer(x, context, value=...)")
        keys_from = "x" if context is None else "context"
        values_from = keys_from if value is None else "value"
        x = self._input(x, "x", self.embed_dim, "embed_dim")
        if keys_from == "x" and (self.kdim, self.vdim) != (self.embed_dim,) * 2:
            raise ValueError(
                f"self-attention reads keys and values from x, but kdim={self.kdim}, "
                f"vdim={self.vdim} differ from embed_dim={self.embed_dim}: pass a context"
            )
        if values_from == "context" and self.vdim != self.kdim:
            raise ValueError(
                f"vdim={self.vdim} differs from kdim={self.kdim}: pass the values' input as "
                "value=..."
            )
        context = x if context is None else self._input(context, "context", self.kdim, "kdim")
        value = context if value is None else self._input(value, "value", self.vdim, "vdim")
        if value.shape[-2] != context.shape[-2]:
            raise ValueError(
                f"value and context must have the same length: context {context.shape}, "
                f"value {value.shape}"
            )
        try:
            np.broadcast_shapes(x.shape[:-2], context.shape[:-2], value.shape[:-2])
        except ValueError:
            raise ValueError(
                f"the leading dimensions of x {x.shape}, context {context.shape} and value "
                f"{value.shape} do not broadcast"
            ) from None

        q = _split_heads(self._project(x, "q"), self.num_heads)
        k = _split_heads(self._project(context, "k"), self.kv_heads)
        v = _split_heads(self._project(value, "v"), self.kv_heads)
        result = attention(q, k, v, self.patterns, **attention_kwargs)
        heads, lse = result if attention_kwargs.get("return_lse") else (result, None)
        y = self._project(_merge_heads(heads), "o")
        return (y, lse) if lse is not None else y

    def __repr__(self):
        extras = "".join(
            f", {name}={getattr(self, name)}"
            for name, default in (
                ("kv_heads", self.num_heads),
                ("kdim", self.embed_dim),
                ("vdim", self.embed_dim),
            )
            if getattr(self, name) != default
        )
        if self.patterns is None:
            patterns = ""
        elif len(set(self.patterns)) == 1:
            patterns = f", patterns={self.patterns[0]!r}"
        else:
            patterns = f", patterns={list(self.patterns)!r}"
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{extras}, "
            f"bias={self.bias}, dtype={self.dtype.name}{patterns})"
        )
