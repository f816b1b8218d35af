"""Hand-made DLPack producers for the fuzzers: capsules built with ctypes, so that every field the
bridge (csrc/dlpack_bridge.c) reads can be set to anything -- dtype code/bits/lanes, ndim, shape and
strides (NULL, zero, negative), byte_offset, data (NULL, misaligned), device, version, read-only
flag, capsule name -- while the memory behind `data` stays honest (always as large as the claimed
shape needs), so that any out-of-bounds access is the consumer's fault.

Ownership is checked after every call: a capsule the consumer renamed to "used_*" must have had its
deleter called exactly once, any other capsule never (`Ledger.check`).
"""

import ctypes
from ctypes import POINTER, Structure, c_char_p, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

import numpy as np


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, c_void_p)


class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", DELETER)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", c_void_p),
        ("deleter", DELETER),
        ("flags", c_uint64),
        ("dl_tensor", DLTensor),
    ]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [c_void_p, c_char_p, c_void_p]
_PyCapsule_GetName = ctypes.pythonapi.PyCapsule_GetName
_PyCapsule_GetName.restype = c_char_p
_PyCapsule_GetName.argtypes = [ctypes.py_object]

# DLPack (code, bits) of the dtypes the fuzzers draw; NumPy name -> element size.
DL_DTYPES = {
    "float32": (2, 32),
    "float16": (2, 16),
    "bfloat16": (4, 16),
    "float64": (2, 64),
    "int8": (0, 8),
    "uint8": (1, 8),
    "int32": (0, 32),
    "int64": (0, 64),
    "int16": (0, 16),
    "uint16": (1, 16),
    "bool": (6, 8),
    "complex64": (5, 64),
}
VALID_NAMES = (b"dltensor", b"dltensor_versioned")


class Ledger:
    """Deleter calls per managed tensor, and every capsule made during one fuzz input."""

    def __init__(self):
        self.calls = {}
        self.made = []  # (capsule, managed struct, original name, has deleter, keep-alive objects)
        self._cb = DELETER(self._deleted)

    def _deleted(self, addr):
        self.calls[addr] = self.calls.get(addr, 0) + 1

    def capsule(self, managed, name, with_deleter, keep):
        if with_deleter:
            managed.deleter = self._cb
        cname = ctypes.c_char_p(name) if name is not None else None
        cap = _PyCapsule_New(ctypes.addressof(managed), cname, None)
        self.made.append((cap, managed, name, with_deleter, (keep, cname)))
        return cap

    def check(self):
        """Ownership protocol: renamed (consumed) -> deleter called once; otherwise never."""
        for cap, managed, name, with_deleter, _ in self.made:
            now = _PyCapsule_GetName(cap)
            n = self.calls.get(ctypes.addressof(managed), 0)
            consumed = name in VALID_NAMES and now == b"used_" + name
            if now != name and not consumed:
                raise AssertionError(f"capsule renamed from {name!r} to {now!r}")
            want = 1 if (consumed and with_deleter) else 0
            if n != want:
                raise AssertionError(
                    f"deleter of a {'consumed' if consumed else 'unconsumed'} {name!r} capsule "
                    f"called {n} times (want {want})"
                )

    def reset(self):
        self.made.clear()
        self.calls.clear()


LEDGER = Ledger()


def make_capsule(fdp, values, dtype_name, shape, *, mutate=True):
    """A capsule describing `values` (a NumPy array with the claimed dtype's itemsize, or None for
    garbage bytes) with fields mutated by `fdp`. Returns (capsule, device tuple it claims)."""
    code, bits = DL_DTYPES.get(dtype_name, (2, 32))
    es = max(1, bits // 8)
    shape = list(shape)
    m = lambda p: mutate and fdp.ConsumeIntInRange(0, 99) < p
    if m(10):  # another shape, kept honest below
        shape = [fdp.ConsumeIntInRange(-2, 6) for _ in range(fdp.ConsumeIntInRange(0, 5))]
        if m(20) and shape:
            shape[fdp.ConsumeIntInRange(0, len(shape) - 1)] = fdp.PickValueInList([2**40, 2**62, 2**63 - 1])
    numel = 1
    for s in shape:
        numel *= max(s, 0)
    if numel * es > (1 << 20):  # keep the memory honest: huge claims become empty arrays
        shape[0] = 0
        numel = 0
    offset = fdp.ConsumeIntInRange(0, 64) if m(30) else 0
    buf = np.zeros(offset + numel * es + 64, np.uint8)
    if values is not None and numel and np.asarray(values).nbytes == numel * es:
        buf[offset : offset + numel * es] = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    else:
        buf[offset : offset + numel * es] = np.frombuffer(
            fdp.ConsumeBytes(numel * es).ljust(numel * es, b"\0"), np.uint8
        )
    base = buf.ctypes.data
    split = fdp.ConsumeIntInRange(0, offset) if offset else 0
    data = base + split
    if m(4):
        data = 0  # NULL data pointer
    ndim = len(shape)
    if m(5):
        ndim = fdp.PickValueInList([-1, 0, 5, 100, -(2**31)])
    shp = (c_int64 * max(4, len(shape)))(*shape)
    strides = None
    if m(40):
        st = [0] * len(shape)
        acc = 1
        for d in range(len(shape) - 1, -1, -1):
            st[d] = acc
            acc *= max(shape[d], 0)
        if m(50):
            for d in range(len(st)):
                if fdp.ConsumeBool():
                    st[d] = fdp.PickValueInList([0, -1, -st[d], 2 * st[d], 2**62, -(2**63)])
        strides = (c_int64 * max(4, len(st)))(*st)
    tensor = DLTensor()
    tensor.data = data
    dev = (1, 0)
    if m(6):
        dev = (fdp.PickValueInList([1, 2, 3, 13, 0, -1, 2**31 - 1]), fdp.PickValueInList([0, 1, -1, 7]))
    tensor.device = DLDevice(*dev)
    tensor.ndim = ndim
    tensor.dtype = DLDataType(code, bits, 1)
    if m(8):
        tensor.dtype = DLDataType(
            fdp.ConsumeIntInRange(0, 255),
            fdp.PickValueInList([0, 1, 8, 16, 32, 64, 128, 255]),
            fdp.PickValueInList([1, 1, 0, 2, 65535]),
        )
    tensor.shape = ctypes.cast(shp, POINTER(c_int64)) if not m(3) else None
    tensor.strides = ctypes.cast(strides, POINTER(c_int64)) if strides is not None else None
    tensor.byte_offset = offset - split
    if m(3):
        tensor.byte_offset = fdp.PickValueInList([2**64 - 1, 2**63, 2**64 - base])
    versioned = fdp.ConsumeBool() if mutate else False
    if versioned:
        managed = DLManagedTensorVersioned()
        managed.version = DLPackVersion(1 if not m(5) else fdp.PickValueInList([0, 2, 2**32 - 1]), 0)
        managed.flags = 1 if m(15) else 0
        managed.dl_tensor = tensor
    else:
        managed = DLManagedTensor()
        managed.dl_tensor = tensor
    name = VALID_NAMES[versioned]
    if m(6):
        name = fdp.PickValueInList([b"used_dltensor", b"used_dltensor_versioned", b"garbage", None])
    cap = LEDGER.capsule(managed, name, not m(5), (buf, shp, strides))
    claimed = dev
    if m(5):
        claimed = fdp.PickValueInList([(1, 0), (2, 0), (1,), "cpu", (1, "x"), (2**70, 0), None])
    return cap, claimed


class FakeArray:
    """An object speaking the DLPack protocol with a hand-made capsule (or a hostile behaviour)."""

    def __init__(self, capsule, device, behaviour="ok", on_export=None):
        self.capsule, self.device, self.behaviour, self.on_export = capsule, device, behaviour, on_export

    def __dlpack_device__(self):
        if self.behaviour == "device_raises":
            raise RuntimeError("no device")
        return self.device

    def __dlpack__(self, stream=None, max_version=None, **kw):
        if self.on_export is not None:
            self.on_export()
        b = self.behaviour
        if b == "raises":
            raise RuntimeError("export failed")
        if b == "raises_bad_str":
            raise BadStrError()
        if b == "typeerror_on_max_version" and max_version is not None:
            raise TypeError("unexpected keyword max_version")
        if b == "returns_int":
            return 12345
        if b == "returns_none":
            return None
        return self.capsule  # the same capsule on every call: a second request sees it consumed


class BadStrError(Exception):
    def __str__(self):
        raise ValueError("__str__ failed too")


BEHAVIOURS = [
    "ok",
    "ok",
    "ok",
    "ok",
    "raises",
    "raises_bad_str",
    "typeerror_on_max_version",
    "returns_int",
    "returns_none",
    "device_raises",
]
