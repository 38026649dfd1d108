"""Fake CUDA arrays for the bindings' CUDA glue, over the fake libcuda (engine/tests/fake_cuda).

Imported only by worker processes started with the fake's directory in LD_LIBRARY_PATH, so that
the engine's ``dlopen("libcuda.so.1")`` and ours (``ctypes.CDLL``) find the same fake library.

- ``FakeCudaArray``: device memory from the fake's ``cuMemAlloc_v2`` (host memory there), seen on
  the host through numpy, exported by DLPack as kDLCUDA with the duck-typed methods the bindings
  call on CUDA objects (``is_cuda``, ``is_contiguous``, ``contiguous``, ``copy_``, ``data_ptr``).
- ``consume``: the tensor factory (what torch.from_dlpack is for the package): reads a received
  tensor's capsule into a ``ReceivedArray`` and calls its deleter once that is dropped.
- ``allocate``: the CUDA allocator hook (what torch's caching allocator is for the package).

Every stream the engine passes (DLPack's ``stream=``, the allocator's ``stream``) is checked to be
a live stream object of the fake created in that device's primary context, and recorded: one
stream per device in a process (CUDA-2).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

KDL_CPU, KDL_CUDA = 1, 2
_STREAM_MAGIC = 0x53545245  # libcuda.c: struct stream {uint32 magic; struct ctx *ctx;}
_POINTER_ATTR_DEVICE_ORDINAL = 9

# ---- the fake driver -------------------------------------------------------------------------

lib = ctypes.CDLL("libcuda.so.1")
if not hasattr(lib, "fake_cuda_misuses"):
    raise RuntimeError("libcuda.so.1 is not the fake: is its directory first in LD_LIBRARY_PATH?")


def check(r: int, what: str) -> None:
    if r != 0:
        raise RuntimeError(f"fake libcuda: {what} failed with CUresult {r}")


check(lib.cuInit(0), "cuInit")


def count(name: str) -> int:
    """A counter of the fake (``fake_cuda_<name>``)."""
    f = getattr(lib, f"fake_cuda_{name}")
    f.restype = ctypes.c_longlong if name == "copies" else ctypes.c_int
    return int(f())


def primary_ctx(dev: int) -> int:
    c = ctypes.c_void_p()
    check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(c), ctypes.c_int(dev)), "cuDevicePrimaryCtxRetain")
    return int(c.value or 0)


@contextlib.contextmanager
def on_device(dev: int) -> Iterator[None]:
    """The device's primary context current on this thread (the previous one restored after)."""
    prev = ctypes.c_void_p()
    check(lib.cuCtxGetCurrent(ctypes.byref(prev)), "cuCtxGetCurrent")
    check(lib.cuCtxSetCurrent(ctypes.c_void_p(primary_ctx(dev))), "cuCtxSetCurrent")
    try:
        yield
    finally:
        check(lib.cuCtxSetCurrent(prev), "cuCtxSetCurrent")


def device_of(ptr: int) -> int:
    """The device the fake says owns a device address."""
    d = ctypes.c_int(-1)
    check(
        lib.cuPointerGetAttribute(ctypes.byref(d), _POINTER_ATTR_DEVICE_ORDINAL, ctypes.c_ulonglong(ptr)),
        f"cuPointerGetAttribute({ptr:#x})",
    )
    return d.value


streams: dict[int, set[int]] = {}  # device -> every stream handle the engine passed us


def check_stream(stream: Any, dev: int, who: str) -> None:
    assert isinstance(stream, int) and not isinstance(stream, bool), f"{who}: stream={stream!r}"
    assert stream not in (0, 1, 2), f"{who}: stream={stream} is a default stream, not the engine's"
    magic = ctypes.c_uint32.from_address(stream).value
    ctx = ctypes.c_void_p.from_address(stream + 8).value
    assert magic == _STREAM_MAGIC, f"{who}: {stream:#x} is not a live stream of the fake"
    assert ctx == primary_ctx(dev), f"{who}: stream {stream:#x} is not of device {dev}'s primary context"
    streams.setdefault(dev, set()).add(stream)
    assert len(streams[dev]) == 1, f"{who}: several streams for device {dev}: {streams[dev]}"


class Allocation:
    """``nbytes`` (at least 1) of device memory on ``dev``, freed when dropped."""

    live = 0  # allocations not yet freed

    def __init__(self, dev: int, nbytes: int, fill: int | None = None) -> None:
        p = ctypes.c_ulonglong()
        self.dev, self.nbytes = dev, max(nbytes, 1)
        with on_device(dev):
            check(lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(self.nbytes)), "cuMemAlloc_v2")
        self.ptr = int(p.value)
        Allocation.live += 1
        self.host = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))
        if fill is not None:
            self.host[:] = fill

    def data_ptr(self) -> int:
        return self.ptr

    def __del__(self) -> None:
        check(lib.cuMemFree_v2(ctypes.c_ulonglong(self.ptr)), "cuMemFree_v2")
        Allocation.live -= 1


# ---- DLPack ----------------------------------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.c_void_p),
]
# Called with the GIL held, so that what the engine's deleter drops is released at once.
_CALL_DELETER = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)

_api = ctypes.pythonapi
_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _CAPSULE_DESTRUCTOR]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
# The destructor gets a capsule being destroyed: a raw pointer, never a py_object.
_get_pointer_raw = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api)
)
_NAME = b"dltensor"
_USED = ctypes.create_string_buffer(b"used_dltensor")  # must outlive every renamed capsule

_CODES = {"i": 0, "u": 1, "f": 2, "c": 5, "b": 6}
_KINDS = {v: k for k, v in _CODES.items()}

_exported: dict[int, tuple[Any, ...]] = {}  # DLManagedTensor address -> what it keeps alive
deleter_errors: list[str] = []  # (an exception in a ctypes callback is only printed)


@DELETER
def _deleter(m: Any) -> None:
    addr = ctypes.cast(m, ctypes.c_void_p).value
    if _exported.pop(addr, None) is None:
        deleter_errors.append(f"deleter called for an unknown or already deleted tensor {addr:#x}")


@_CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule: int) -> None:
    # An unconsumed capsule still owns its tensor; a consumed one was renamed "used_dltensor".
    if _api.PyCapsule_IsValid(capsule, _NAME):
        m = _get_pointer_raw(capsule, _NAME)
        _deleter(ctypes.cast(m, ctypes.POINTER(DLManagedTensor)))


def _capsule(array: FakeCudaArray) -> Any:
    ndim = array.ndim
    shape = (ctypes.c_int64 * max(ndim, 1))(*array.shape)
    strides = (ctypes.c_int64 * max(ndim, 1))(*array.elem_strides)
    m = DLManagedTensor()
    m.dl_tensor.data = array.alloc.ptr
    m.dl_tensor.device = DLDevice(KDL_CUDA, array.dev)
    m.dl_tensor.ndim = ndim
    m.dl_tensor.dtype = DLDataType(_CODES[array.dtype.kind], array.dtype.itemsize * 8, 1)
    m.dl_tensor.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.byte_offset = array.offset
    m.manager_ctx = None
    m.deleter = ctypes.cast(_deleter, ctypes.c_void_p).value
    addr = ctypes.addressof(m)
    _exported[addr] = (m, shape, strides, array)  # the memory lives until the deleter runs
    return _api.PyCapsule_New(addr, _NAME, _capsule_destructor)


class FakeCudaArray:
    """A strided array in fake device memory: ``alloc`` seen from ``offset`` bytes with element
    strides, on the allocation's device."""

    is_cuda = True

    def __init__(
        self,
        alloc: Allocation,
        dtype: Any,
        shape: tuple[int, ...],
        elem_strides: tuple[int, ...] | None = None,
        offset: int = 0,
    ) -> None:
        self.alloc, self.dev, self.dtype = alloc, alloc.dev, np.dtype(dtype)
        self.shape, self.offset = tuple(shape), offset
        if elem_strides is None:
            elem_strides, step = [], 1
            for d in reversed(self.shape):
                elem_strides.insert(0, step)
                step *= d
        self.elem_strides = tuple(elem_strides)
        self.ndim = len(self.shape)
        self.dlpack_streams: list[Any] = []  # stream= of each __dlpack__ call
        self.copied_from: list[Any] = []  # copy_(other) calls
        numel = int(np.prod(self.shape)) if self.shape else 1
        last = sum((d - 1) * s for d, s in zip(self.shape, self.elem_strides, strict=True))
        span = 0 if numel == 0 else last + 1
        assert offset + span * self.dtype.itemsize <= alloc.nbytes, "view outside its allocation"

    @classmethod
    def empty(
        cls, dev: int, dtype: Any, shape: tuple[int, ...], margin: int = 0, fill: int = 0xA5
    ) -> FakeCudaArray:
        """A contiguous array with ``margin`` bytes of ``fill`` before and after it."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return cls(Allocation(dev, nbytes + 2 * margin, fill), dtype, shape, None, margin)

    @classmethod
    def of(cls, values: np.ndarray, dev: int, margin: int = 0) -> FakeCudaArray:
        a = cls.empty(dev, values.dtype, values.shape, margin)
        a.host[...] = values
        return a

    @property
    def host(self) -> np.ndarray:
        """The elements, seen through numpy (fake device memory is host memory)."""
        item = self.dtype.itemsize
        return np.ndarray(
            self.shape,
            self.dtype,
            buffer=self.alloc.host,
            offset=self.offset,
            strides=tuple(s * item for s in self.elem_strides),
        )

    def numpy(self) -> np.ndarray:
        return self.host.copy()

    def data_ptr(self) -> int:
        return self.alloc.ptr + self.offset

    def is_contiguous(self) -> bool:
        return self.ndim == 0 or 0 in self.shape or bool(self.host.flags.c_contiguous)

    def contiguous(self) -> FakeCudaArray:
        return FakeCudaArray.of(self.host, self.dev)

    def copy_(self, other: Any) -> FakeCudaArray:
        self.copied_from.append(other)
        src = other.host if isinstance(other, FakeCudaArray) else np.asarray(other)
        self.host[...] = src
        return self

    @property
    def T(self) -> FakeCudaArray:  # noqa: N802 (numpy's name)
        return FakeCudaArray(self.alloc, self.dtype, self.shape[::-1], self.elem_strides[::-1], self.offset)

    def __dlpack__(
        self, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None
    ) -> Any:
        check_stream(stream, self.dev, "__dlpack__")
        self.dlpack_streams.append(stream)
        return _capsule(self)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDL_CUDA, self.dev)


# ---- the consumer and the allocator ------------------------------------------------------------


class ReceivedArray:
    """A tensor the engine handed us (its DLPack capsule consumed); the deleter runs on drop."""

    live = 0

    def __init__(self, device: tuple[int, int], managed: int) -> None:
        self.managed = managed
        m = DLManagedTensor.from_address(managed)
        t = m.dl_tensor
        assert (t.device.device_type, t.device.device_id) == device, "capsule device != __dlpack_device__"
        self.is_cuda = device[0] == KDL_CUDA
        self.dev = t.device.device_id
        assert t.dtype.lanes == 1
        self.dtype = (
            np.dtype(f"{_KINDS[t.dtype.code]}{t.dtype.bits // 8}") if t.dtype.code != 6 else np.dtype(bool)
        )
        self.shape = tuple(t.shape[k] for k in range(t.ndim))
        assert not t.strides, "a received tensor is contiguous"
        self.ptr = (t.data or 0) + t.byte_offset
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        buf = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.ptr) if self.ptr else bytearray(1)
        self.host = np.frombuffer(buf, np.uint8, nbytes).view(self.dtype).reshape(self.shape)
        self._deleter = _CALL_DELETER(m.deleter) if m.deleter else None
        ReceivedArray.live += 1

    def data_ptr(self) -> int:
        return self.ptr

    def numpy(self) -> np.ndarray:
        return self.host.copy()

    def __del__(self) -> None:
        self.host = None  # type: ignore[assignment]
        if self._deleter is not None:
            self._deleter(self.managed)
        ReceivedArray.live -= 1


received_devices: list[tuple[int, int]] = []  # __dlpack_device__() of each received tensor
devices_after_export: list[tuple[int, int]] = []  # the same, asked again after __dlpack__()


def consume(received: Any) -> ReceivedArray:
    """The tensor factory: DLPack consumer of the bindings' ``Received``."""
    device = received.__dlpack_device__()
    received_devices.append(device)
    cap = received.__dlpack__()
    devices_after_export.append(received.__dlpack_device__())
    managed = _api.PyCapsule_GetPointer(cap, _NAME)
    assert managed, "not a dltensor capsule"
    # DLPack: the consumer renames the capsule and owns the deleter call from now on.
    assert _api.PyCapsule_SetName(cap, _USED) == 0
    return ReceivedArray(tuple(device), managed)


alloc_calls: list[tuple[int, int, int]] = []  # (device, nbytes, stream) of each allocator call
allocated: weakref.WeakSet[Allocation] = weakref.WeakSet()  # the allocator's, still alive


def allocate(device: int, nbytes: int, stream: int) -> Allocation:
    """The CUDA allocator hook: device memory for what the engine creates."""
    check_stream(stream, device, "allocator")
    alloc_calls.append((device, nbytes, stream))
    a = Allocation(device, nbytes)
    allocated.add(a)
    return a


def load() -> types.ModuleType:
    """Imports torch_parallel with our factory and allocator installed first: the package's own
    (torch's) are set at import, and the native hooks keep the first one set."""
    sys.modules["torch"] = None  # type: ignore[assignment]  # torch's CUDA cannot run on the fake
    spec = importlib.util.find_spec("torch_parallel")
    assert spec is not None and spec.submodule_search_locations is not None
    stub = types.ModuleType("torch_parallel")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_parallel"] = stub
    try:
        from torch_parallel import _native

        _native._set_tensor_factory(consume)
        _native._set_cuda_allocator(allocate)
    finally:
        del sys.modules["torch_parallel"]
    import torch_parallel

    return torch_parallel


def pattern(shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    """Deterministic values, exact in ``dtype``; a misplaced element shows."""
    n = int(np.prod(shape))
    v = (np.arange(n, dtype=np.int64) * 2654435761 + seed * 40503 + 17) % 65521
    return (v - 30000).astype(dtype).reshape(shape)
