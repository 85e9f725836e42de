"""The GPU path of the attention API: device choice, device arrays and the CUDA backend call.

NumPy inputs are copied to the device and the result copied back; arrays that already live on
a GPU (``__dlpack__`` or ``__cuda_array_interface__``: PyTorch, CuPy, ...) are read in place and
the result is an array of the same kind. The backend is ``_core.cuda`` (the CUDA runtime); the
tests swap in ``_cuda_emu`` (the same kernels on the SIMT emulator). Argument checks and
messages are those of ``_args``; no attention arithmetic happens here.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from . import _args, _core
from .layout import compile_layout
from .patterns import as_head_patterns

GPU_DTYPES = ("float32", "float16", "bfloat16")
_TILE = 64  # the CUDA kernels' query and key tile: csrc/cuda/forward_params.h

# DLPack device types (dlpack.h) that CUDA kernels can read.
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
# DLPack (type code, bits) and __cuda_array_interface__ type strings, by dtype name.
_DLPACK_DTYPES = {
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64", (4, 16): "bfloat16",
    (6, 8): "bool", (1, 8): "uint8", (0, 32): "int32", (0, 64): "int64",
}
_CAI_DTYPES = {
    "<f2": "float16", "<f4": "float32", "<f8": "float64", "|b1": "bool", "|u1": "uint8",
    "<i4": "int32", "<i8": "int64",
}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "bool": 1, "uint8": 1,
             "int32": 4, "int64": 8}

_override = threading.local()  # tests: run the GPU path on another backend (the emulator)


def _backend():
    """The module that runs CUDA kernels, or None when this build has none."""
    forced = getattr(_override, "backend", None)
    if forced is not None:
        return forced
    return getattr(_core, "cuda", None)


@contextlib.contextmanager
def use_backend(module):
    """Route this thread's GPU calls to ``module`` (``sparse_attn._cuda_emu`` in the tests)."""
    previous = getattr(_override, "backend", None)
    _override.backend = module
    try:
        yield module
    finally:
        _override.backend = previous


def unavailable_reason() -> str | None:
    """Why no GPU can be used, or None when one can."""
    backend = _backend()
    if backend is None:
        return ("this build of sparse_attn has no CUDA kernels (it was built without a CUDA "
                "compiler, or with SPARSE_ATTN_CUDA=OFF)")
    count, why = backend.device_count()
    return None if count > 0 else why or "no CUDA device is present"


def cuda_available() -> bool:
    return unavailable_reason() is None


def gpu_unsupported(score="dot") -> list:
    """The options of a call that the CUDA kernels do not implement: the additive score."""
    return ["score='additive'"] if isinstance(score, str) and score == "additive" else []


def select(device: str, q, unsupported=()) -> str:
    """'cpu' or 'cuda' for a validated ``device`` argument ('cpu', 'cuda' or 'auto');
    ``unsupported`` names the options of the call that only the CPU implements."""
    if device == "cuda":
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"device='cuda' cannot be used: {why}")
        if unsupported:
            raise NotImplementedError(
                f"device='cuda' does not implement {', '.join(unsupported)} yet; use "
                "device='cpu', or device='auto' (which computes such calls on the CPU)"
            )
        return "cuda"
    if device == "auto":
        if unsupported or not cuda_available():
            return "cpu"
        # float64 is computed on the CPU; arrays already on a GPU stay there.
        return "cuda" if _is_device_array(q) or _dtype_name(q) in GPU_DTYPES else "cpu"
    return "cpu"


def require_cpu(device: str) -> None:
    """For the functions only the CPU implements: device='cuda' is refused (with the reason
    when no GPU is usable at all); 'auto' and 'cpu' compute on the CPU."""
    if device == "cuda":
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"device='cuda' cannot be used: {why}")
        raise NotImplementedError(
            "this function has no GPU implementation yet; use device='cpu' or 'auto'")


def _dtype_name(x) -> str | None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:  # torch dtypes: "torch.float16"
        return str(dtype).rsplit(".", 1)[-1]


# ---- device arrays ------------------------------------------------------------------------------


@dataclass
class _DeviceView:
    """An array in device memory: address, shape, strides in elements, dtype name, device."""

    ptr: int
    shape: tuple
    strides: tuple
    dtype: str
    device: int
    owner: object  # keeps the memory (and a DLPack capsule) alive
    stream: int | None = None  # __cuda_array_interface__: the producer's stream

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def shape_stand_in(self) -> np.ndarray:
        """A memoryless NumPy array of this shape, for the shape checks of _args."""
        return np.broadcast_to(np.empty((), dtype=np.uint8), self.shape)


def _is_device_array(x) -> bool:
    if hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray):
        return True
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is None or isinstance(x, np.ndarray):
        return False
    try:
        return dlpack_device()[0] in (_DL_CUDA, _DL_CUDA_MANAGED)
    except Exception:  # noqa: BLE001 - a producer that cannot say is not a device array
        return False


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _device_view(x, name: str, backend, stream: int) -> _DeviceView:
    """Reads a device array's description without copying it: DLPack first, then CAI."""
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None and dlpack_device()[0] in (_DL_CUDA, _DL_CUDA_MANAGED):
        try:  # the producer makes the data ready on our stream (1: the legacy default stream)
            capsule = x.__dlpack__(stream=stream or 1)
        except TypeError:
            capsule = x.__dlpack__()
        info = backend.dlpack_info(capsule)
        dtype = _DLPACK_DTYPES.get((info["code"], info["bits"]))
        if dtype is None or info["lanes"] != 1:
            raise TypeError(f"{name}: unsupported DLPack dtype (code {info['code']}, "
                            f"{info['bits']} bits, {info['lanes']} lanes)")
        shape = tuple(int(n) for n in info["shape"])
        strides = info["strides"] if info["strides"] is not None else _contiguous_strides(shape)
        return _DeviceView(info["ptr"], shape, tuple(int(s) for s in strides), dtype,
                           int(info["device_id"]), (x, capsule))
    cai = x.__cuda_array_interface__
    dtype = _CAI_DTYPES.get(cai["typestr"])
    if dtype is None:
        raise TypeError(f"{name}: unsupported dtype {cai['typestr']!r} in __cuda_array_interface__")
    shape = tuple(int(n) for n in cai["shape"])
    if cai.get("strides") is None:
        strides = _contiguous_strides(shape)
    else:
        if any(s % _ITEMSIZE[dtype] for s in cai["strides"]):
            raise ValueError(f"{name}: strides {cai['strides']} are not whole elements")
        strides = tuple(s // _ITEMSIZE[dtype] for s in cai["strides"])
    ptr = int(cai["data"][0])
    device = backend.device_of(ptr) if ptr else backend.current_device()
    cai_stream = cai.get("stream")
    return _DeviceView(ptr, shape, strides, dtype, device, x, cai_stream)


def _device_operand(view: _DeviceView, batch_shape: tuple, tail: tuple, *, unit_col: bool):
    """The kernel's view of a device array broadcast to batch_shape + tail (shapes already
    checked): ``(address, batch_offsets, stride_head, stride_row, stride_col)`` in elements."""
    full = tuple(batch_shape) + tuple(tail)
    pad = len(full) - view.ndim
    shape = (1,) * pad + view.shape
    strides = [0 if n == 1 and m != 1 else s
               for n, m, s in zip(shape, full, (0,) * pad + view.strides)]
    if unit_col and full[-1] > 1 and strides[-1] != 1:
        raise ValueError("q, k and v on the device need unit stride along their last axis "
                         f"(got stride {strides[-1]}); pass contiguous arrays")
    if unit_col and full[-1] <= 1:
        strides[-1] = 1
    nb = len(batch_shape)
    offsets = np.zeros(batch_shape, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(batch_shape, strides[:nb])):
        index_shape = [1] * nb
        index_shape[axis] = n
        offsets = offsets + (np.arange(n, dtype=np.int64) * s).reshape(index_shape)
    return (view.ptr, np.ascontiguousarray(offsets.reshape(-1)), strides[nb], strides[nb + 1],
            strides[nb + 2])


class DeviceArray:
    """A result in device memory, returned when the inputs were device arrays of a kind this
    module cannot allocate (neither PyTorch nor CuPy). Exposes ``__cuda_array_interface__``
    (so CuPy, Numba or PyTorch can wrap it without a copy) and ``to_numpy()``."""

    def __init__(self, shape: tuple, dtype: str, backend, device: int):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self._backend = backend
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        with _on_device(backend, device):
            self._buffer = backend.DeviceBuffer(nbytes)

    @property
    def ptr(self) -> int:
        return self._buffer.ptr

    @property
    def __cuda_array_interface__(self) -> dict:
        typestr = {"float32": "<f4", "float16": "<f2"}.get(self.dtype, "<V2")
        return {"shape": self.shape, "typestr": typestr, "data": (self.ptr, False),
                "strides": None, "version": 3}

    def to_numpy(self) -> np.ndarray:
        host = np.empty(self.shape, dtype=_numpy_dtype(self.dtype))
        self._buffer.download(host.ctypes.data, host.nbytes)
        return host

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # the NumPy bfloat16 type; only needed for bfloat16 results

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _empty_like(template, shape: tuple, dtype: str, backend, device: int):
    """A new device array of template's kind (PyTorch, CuPy, else DeviceArray)."""
    library = type(template).__module__.split(".")[0]
    if library == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=template.device)
    if library == "cupy" and dtype != "bfloat16":
        import cupy

        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=dtype)
    return DeviceArray(shape, dtype, backend, device)


def _current_stream(template, device: int) -> int:
    """The library's current stream for template's kind, else 0 (the legacy default stream)."""
    library = type(template).__module__.split(".")[0]
    if library == "torch":
        import torch

        return int(torch.cuda.current_stream(device).cuda_stream)
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(device):
            return int(cupy.cuda.get_current_stream().ptr)
    return 0


@contextlib.contextmanager
def _on_device(backend, device: int):
    previous = backend.current_device()
    if previous != device:
        backend.set_device(device)
    try:
        yield
    finally:
        if previous != device:
            backend.set_device(previous)


# ---- host arrays --------------------------------------------------------------------------------


def _host_array(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything asarray cannot take is a type error
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from None
    return arr


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    """[low, high) addresses of the memory a strided view touches (size > 0)."""
    low = high = a.__array_interface__["data"][0]
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            low += (n - 1) * s
        else:
            high += (n - 1) * s
    return low, high + a.itemsize


def _upload(backend, spec, keep: list):
    """A host operand ``(view, offsets, strides...)`` with view's memory copied to the device,
    strides unchanged: ``(device address, offsets, strides...)``."""
    if spec is None:
        return None
    view = spec[0]
    if view.size == 0:  # never read; NumPy may give an empty view any strides
        buffer = backend.DeviceBuffer(max(view.itemsize, 1))
        keep.append(buffer)
        return (buffer.ptr,) + ((spec[1], 0, 0, 1) if len(spec) == 5 else ())
    low, high = _byte_bounds(view)
    buffer = backend.DeviceBuffer(high - low)
    buffer.upload(low, high - low)
    keep.append(buffer)
    return (buffer.ptr + view.__array_interface__["data"][0] - low,) + tuple(spec[1:])


# ---- device copies of compiled layouts -----------------------------------------------------------

_layout_copies: dict = {}  # (backend id, device) -> WeakKeyDictionary(layout handle -> copy)
_layout_lock = threading.Lock()


def _device_layouts(backend, device: int, handles: list) -> list:
    with _layout_lock:
        copies = _layout_copies.setdefault((id(backend), device), weakref.WeakKeyDictionary())
        result = []
        for handle in handles:
            copy = copies.get(handle)
            if copy is None:
                copy = copies[handle] = backend.DeviceLayout(handle)
            result.append(copy)
        return result


# ---- the attention call -------------------------------------------------------------------------


def _head_layouts(pattern, problem, q0: int, k0: int, totals: tuple) -> list:
    """The compiled layout handle of each query head (layouts shared by equal patterns)."""
    heads = as_head_patterns(pattern, problem.heads_q)
    compiled = {}
    for head in heads:
        if head not in compiled:
            compiled[head] = compile_layout(head, problem.len_q, problem.len_k, _TILE, _TILE, q0,
                                            k0, total=totals)
    return [compiled[head].handle for head in heads]


def compute(mode: str, q, k, v, pattern, *, mask=None, bias=None, scale=None, score="dot",
            score_params=None, alibi_slopes=None, softcap=None, dropout_p=0.0, seed=None,
            sample=False, temperature=1.0, key_lengths=None, query_offset=0, key_offset=0,
            total_lengths=None, second=False, out=None):
    """``attention`` (mode "softmax") or ``hard_attention`` (mode "hard") on the GPU, with the
    arguments and results of those functions. ``second``: also return lse (softmax; float32)
    or the chosen keys (hard; int64)."""
    backend = _backend()
    named = {"q": q, "k": k, "v": v}
    template = next((x for x in named.values() if _is_device_array(x)), None)
    device = _device_id(template, backend) if template is not None else backend.current_device()
    stream = _current_stream(template, device) if template is not None else 0
    views = {n: _device_view(x, n, backend, stream) if _is_device_array(x) else _host_array(x, n)
             for n, x in named.items()}
    dtypes = {n: a.dtype if isinstance(a, _DeviceView) else a.dtype.name for n, a in views.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"q, k, v must share one dtype, got {listed}")
    dtype = dtypes["q"]
    if dtype not in GPU_DTYPES:
        raise TypeError(
            f"q: dtype {dtype} is not supported on the GPU; pass float32, float16 or bfloat16 "
            "(or use device='cpu' for float64)"
        )
    devices = {a.device for a in views.values() if isinstance(a, _DeviceView)}
    if devices - {device}:
        raise ValueError(f"q, k, v are on different devices: {sorted(devices | {device})}")

    shapes = {n: (a.shape_stand_in() if isinstance(a, _DeviceView) else a)
              for n, a in views.items()}
    problem = _args.problem_shape(shapes["q"], shapes["k"], shapes["v"])
    config = _config(mode, problem, dtype, scale=scale, score=score, score_params=score_params,
                     softcap=softcap,
                     dropout_p=dropout_p, seed=seed, sample=sample, temperature=temperature)
    q0, k0, totals = _args.resolve_offsets(query_offset, key_offset, total_lengths, problem)
    config.update(q0=q0, k0=k0)
    slopes = _args.resolve_alibi(alibi_slopes, problem.heads_q)
    handles = _head_layouts(pattern, problem, q0, k0, totals)
    out_shape, row_shape = problem.out_shape(), problem.lse_shape()
    user_shape = out_shape[1:] if problem.squeeze else out_shape
    user_row_shape = row_shape[1:] if problem.squeeze else row_shape
    second_name, second_dtype = ("lse", "float32") if mode == "softmax" else ("index", "int64")
    if template is None:
        np_dtype = views["q"].dtype
        _args.check_out(out, user_shape, np_dtype,
                        {"q": q, "k": k, "v": v, "mask": mask, "bias": bias})
    b = problem.batch_shape
    tails = {"q": (problem.heads_q, problem.len_q, problem.dim_qk),
             "k": (problem.heads_kv, problem.len_k, problem.dim_qk),
             "v": (problem.heads_kv, problem.len_k, problem.dim_v)}

    with _on_device(backend, device):
        keep: list = []
        operands = {
            n: _device_operand(a, b, tails[n], unit_col=True) if isinstance(a, _DeviceView)
            else _upload(backend, _args.operand(a, b, tails[n], unit_col=True), keep)
            for n, a in views.items()
        }
        operands["mask"] = _mask_operand(mask, problem, backend, stream, keep)
        operands["bias"] = _bias_operand(bias, problem, dtype, backend, stream, keep)
        lengths = _key_lengths(key_lengths, problem, k0, totals[1], backend, stream)
        addresses = {
            "key_lengths": _upload(backend, (lengths,), keep)[0] if lengths is not None else 0,
            "alibi_slopes": _upload(backend, (slopes.astype(np.float32),), keep)[0]
            if slopes is not None else 0,
            "lse": 0,
            "index": 0,
        }

        if template is None:  # NumPy in, NumPy out: compute into device buffers, copy back
            result = np.empty(out_shape, dtype=np_dtype)
            extra = np.empty(row_shape, dtype=second_dtype) if second or mode == "hard" else None
            buffers = {"out": backend.DeviceBuffer(result.nbytes)}
            if extra is not None:
                buffers[second_name] = backend.DeviceBuffer(extra.nbytes)
            addresses.update({n: buffer.ptr for n, buffer in buffers.items()})
        else:  # device arrays in: results of the same kind, written in place
            result = _device_out(out, user_shape, dtype, backend, stream, device)
            if result is None:
                result = _empty_like(template, user_shape, dtype, backend, device)
            extra = _empty_like(template, user_row_shape, second_dtype, backend, device) \
                if second or mode == "hard" else None
            addresses["out"] = _address(result, backend, stream)
            if extra is not None:
                addresses[second_name] = _address(extra, backend, stream)

        if problem.batch * problem.heads_q * problem.len_q:
            for a in views.values():  # a producer's stream named by __cuda_array_interface__
                if isinstance(a, _DeviceView) and a.stream not in (None, stream):
                    backend.stream_synchronize(a.stream)
            backend.forward(config, operands, addresses,
                            _device_layouts(backend, device, handles), device, stream)
            if template is None:
                buffers["out"].download(result.ctypes.data, result.nbytes)
                if extra is not None:
                    buffers[second_name].download(extra.ctypes.data, extra.nbytes)

    if template is None:
        if problem.squeeze:
            result, extra = result[0], (extra[0] if extra is not None else None)
        if out is not None:
            np.copyto(out, result)
            result = out
    return (result, extra) if second or mode == "hard" else result


def _config(mode: str, problem, dtype: str, *, scale, score, score_params, softcap, dropout_p,
            seed, sample, temperature) -> dict:
    """The kernel's sizes and options, checked as the CPU path checks them."""
    score, _ = _args.resolve_score(score, score_params, problem.dim_qk, np.dtype(np.float32))
    default_scale = None if score == "dot" else 1.0
    config = dict(problem.kernel_shape(), dtype=dtype, mode=mode, score=score,
                  scale=_args.resolve_scale(default_scale if scale is None else scale,
                                            problem.dim_qk),
                  softcap=_args.resolve_softcap(softcap), dropout_p=0.0, sample=False,
                  temperature=1.0, seed=0)
    if mode == "softmax":
        config["dropout_p"] = _args.resolve_probability(dropout_p, "dropout_p")
        config["seed"] = _args.resolve_seed(seed) if config["dropout_p"] > 0 else 0
    else:
        if not isinstance(sample, (bool, np.bool_)):
            raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
        config["sample"] = bool(sample)
        config["temperature"] = _args.resolve_temperature(temperature)
        config["seed"] = _args.resolve_seed(seed) if sample else 0
    return config


def _device_id(x, backend) -> int:
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if dlpack_device is not None and dlpack_device()[0] in (_DL_CUDA, _DL_CUDA_MANAGED):
        return int(dlpack_device()[1])
    ptr = int(x.__cuda_array_interface__["data"][0])
    return backend.device_of(ptr) if ptr else backend.current_device()


def _address(x, backend, stream: int) -> int:
    """The device address of an array this module allocated or checked (C-contiguous)."""
    if isinstance(x, DeviceArray):
        return x.ptr
    return _device_view(x, "out", backend, stream).ptr


def _device_out(out, shape: tuple, dtype: str, backend, stream: int, device: int):
    """Checks a device ``out=`` (same shape and dtype, C-contiguous, on the device of q) and
    returns it: the kernel writes it in place (on a failed launch it may be partly written)."""
    if out is None:
        return None
    if not _is_device_array(out):
        raise TypeError(f"out must be a device array like q, got {type(out).__name__}")
    view = _device_view(out, "out", backend, stream)
    if view.shape != tuple(shape) or view.dtype != dtype:
        raise ValueError(f"out must have shape {tuple(shape)} and dtype {dtype}, got "
                         f"{view.shape} {view.dtype}")
    if view.strides != _contiguous_strides(view.shape) or view.device != device:
        raise ValueError("out must be C-contiguous and on the device of q")
    return out


def _mask_operand(mask, problem, backend, stream: int, keep: list):
    if mask is None or not _is_device_array(mask):
        return _upload(backend, _args.mask_operand(mask, problem), keep)
    view = _device_view(mask, "mask", backend, stream)
    if view.dtype not in ("bool", "uint8"):
        raise TypeError(f"mask must be a bool array (True = may attend), got dtype {view.dtype}")
    _args.check_broadcast(view.shape_stand_in(), problem.scores_shape(), "mask")
    keep.append(view)
    return _device_operand(view, problem.batch_shape, problem.scores_shape()[-3:], unit_col=False)


def _bias_operand(bias, problem, dtype: str, backend, stream: int, keep: list):
    if bias is None:
        return None
    if not _is_device_array(bias):
        return _upload(backend, _args.bias_operand(bias, problem, _numpy_dtype(dtype)), keep)
    view = _device_view(bias, "bias", backend, stream)
    if view.dtype != dtype:
        raise TypeError(f"bias on the device must have the dtype of q ({dtype}), got {view.dtype}")
    _args.check_broadcast(view.shape_stand_in(), problem.scores_shape(), "bias")
    keep.append(view)
    return _device_operand(view, problem.batch_shape, problem.scores_shape()[-3:], unit_col=False)


def _key_lengths(key_lengths, problem, key_offset: int, total_k: int, backend, stream: int):
    """key_lengths as a host int64 array (a device array is copied to the host to be checked)."""
    if key_lengths is not None and _is_device_array(key_lengths):
        view = _device_view(key_lengths, "key_lengths", backend, stream)
        if not view.dtype.startswith("int"):
            raise TypeError(f"key_lengths must be an integer array, got dtype {view.dtype}")
        if view.strides != _contiguous_strides(view.shape):
            raise ValueError("key_lengths on the device must be contiguous")
        host = np.empty(view.shape, dtype=view.dtype)
        if host.nbytes:
            backend.copy_to_host(host.ctypes.data, view.ptr, host.nbytes)
        key_lengths = host
    return _args.key_lengths_array(key_lengths, problem, key_offset, total_k)
