"""Regression tests for the C core's hardening fixes (issue 6): each one reproduces a crash, an
undefined-behaviour report or a lost exception found by the fuzzers (fuzz/) or by review."""

import os
import sys

import numpy as np
import pytest

from mixllm import _C, ops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fuzz"))
import dlfake  # noqa: E402


class _FDP:
    """Stands in for atheris' FuzzedDataProvider where dlfake wants one: never mutates."""

    def ConsumeIntInRange(self, lo, hi):
        return hi

    def ConsumeBool(self):
        return False

    def ConsumeBytes(self, n):
        return b"\0" * n

    def PickValueInList(self, v):
        return v[0]


def _capsule_array(values, major=1):
    """A FakeArray over `values` whose capsule has a deleter written in Python (ctypes)."""
    cap, dev = dlfake.make_capsule(_FDP(), values, str(values.dtype), values.shape, mutate=False)
    managed = dlfake.LEDGER.made[-1][1]
    if major != 1:  # rebuild as a versioned capsule of another major version
        m = dlfake.DLManagedTensorVersioned()
        m.version = dlfake.DLPackVersion(major, 0)
        m.dl_tensor = managed.dl_tensor
        cap = dlfake.LEDGER.capsule(m, b"dltensor_versioned", True, (managed, dlfake.LEDGER.made[-1][4]))
    return dlfake.FakeArray(cap, dev)


def test_error_survives_a_python_deleter():
    """The bridge used to call the producer's deleter with the exception set: a deleter running
    Python code swallowed it and the op returned NULL without an exception (SystemError)."""
    dlfake.LEDGER.reset()
    w = _capsule_array(np.ones((4, 8), np.float32), major=0)
    with pytest.raises(ValueError, match="major version 0"):
        _C.quantize_weight(
            w, 4, 8, False, np.zeros((4, 8), np.uint8), np.zeros((4, 1), np.float32), np.zeros((4, 1), np.uint8)
        )
    dlfake.LEDGER.check()  # and the deleter ran exactly once
    x = _capsule_array(np.ones((2, 8), np.uint8))  # wrong dtype: error raised before release
    with pytest.raises(TypeError, match="expected dtype"):
        _C.quantize_activation(x, 8, np.zeros((2, 8), np.int8), np.zeros((2, 1), np.float32))
    dlfake.LEDGER.check()


def test_fake_capsule_round_trip():
    dlfake.LEDGER.reset()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 12)).astype(np.float32)
    q, s, z = np.zeros((5, 12), np.uint8), np.zeros((5, 2), np.float32), np.zeros((5, 2), np.uint8)
    _C.quantize_weight(_capsule_array(w), 4, 8, False, q, s, z)
    q2, s2, z2 = ops.quantize_weight(w, 4, 8)
    assert np.array_equal(q, q2) and np.array_equal(s, s2) and np.array_equal(z, z2)
    dlfake.LEDGER.check()


def test_blob_size_overflow_is_an_error():
    """(N/16) * G * section overflowed int64 (and wrapped to small sizes that a blob could match)."""
    with pytest.raises(ValueError, match="too large"):
        _C.cpu_blob_bytes(4, 2**31, 2**31, 1)
    assert _C.cpu_blob_bytes(4, 32, 256, 128) > 0


def test_huge_group_size_does_not_overflow():
    """ceil(K / g) was computed as (K + g - 1) / g, overflowing for g near 2^63."""
    w = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    q, s, z = np.zeros((3, 5), np.uint8), np.zeros((3, 1), np.float32), np.zeros((3, 1), np.uint8)
    _C.quantize_weight(w, 4, 2**63 - 1, False, q, s, z)
    q2, s2, z2 = ops.quantize_weight(w, 4, 5)
    assert np.array_equal(q, q2) and np.array_equal(s, s2)


def test_empty_array_with_absurd_extent_rejected():
    """Every extent is bounded, even when another one is 0 (ops compute K + 1 and the like)."""
    dlfake.LEDGER.reset()
    cap, dev = dlfake.make_capsule(_FDP(), None, "uint8", (0, 2**63 - 1), mutate=False)
    with pytest.raises(ValueError, match="too large"):
        _C.unpack_int4(dlfake.FakeArray(cap, dev), np.zeros((0, 4), np.uint8))
    dlfake.LEDGER.check()


def _qlinear_setup(N=24, K=64, M=3, g=32, seed=2):
    rng = np.random.default_rng(seed)
    qw = ops.QuantizedWeight.quantize(rng.standard_normal((N, K)).astype(np.float32), 4, g)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = ops.w4a8_linear(x, qw, impl="portable")
    return qw.cpu_blob(), x, ref


def test_parts_list_mutated_during_export():
    """cpu_qlinear walked the caller's list with borrowed references while running producers'
    __dlpack__: one that cleared the list freed the part tuples and their arrays (use after free;
    a segfault without sanitizers)."""
    blob, x, ref = _qlinear_setup()
    N = ref.shape[1]
    parts = []

    class Evil:
        def __dlpack_device__(self):
            return blob.__dlpack_device__()

        def __dlpack__(self, **kw):
            parts.clear()
            junk = [bytes(100 + i % 16) for i in range(5000)]  # reuse the freed memory
            del junk
            return blob.__dlpack__(**kw)

    parts.append((Evil(), 4, N, np.arange(N, dtype=np.int64)))
    out = np.zeros_like(ref)
    _C.cpu_qlinear(x, parts, 32, None, out, 1)
    np.testing.assert_array_equal(out, ref)


def test_out_index_changed_after_validation():
    """The kernel wrote y[:, out_index[i]] after validation; a producer exporting a later argument
    (or another thread, or `out` aliasing the index) could change the index in between: now the
    kernel uses a validated private copy."""
    blob, x, ref = _qlinear_setup()
    N = ref.shape[1]
    idx = np.arange(N, dtype=np.int64)
    bias = np.zeros(N, np.float32)

    class EvilBias:
        def __dlpack_device__(self):
            return bias.__dlpack_device__()

        def __dlpack__(self, **kw):
            idx[:] = 1 << 40  # far out of bounds
            return bias.__dlpack__(**kw)

    out = np.zeros_like(ref)
    _C.cpu_qlinear(x, [(blob, 4, N, idx)], 32, EvilBias(), out, 1)
    np.testing.assert_array_equal(out, ref)


def test_bits_per_group_aliasing_scale_out():
    """gptq read bits_per_group while writing scale_out; when both views share memory the bit-widths
    became scales (undefined shifts). It now reads a validated copy."""
    rng = np.random.default_rng(3)
    N, K, g = 6, 32, 8
    w = rng.standard_normal((N, K)).astype(np.float32)
    bpg = rng.integers(2, 8, (N, K // g), endpoint=True).astype(np.float32)
    ref = ops.gptq_quantize(w, None, 4, g, symmetric=False, clip=False, bits_per_group=bpg.copy())
    shared = bpg.copy()
    q, z = np.zeros((N, K), np.uint8), np.zeros((N, K // g), np.uint8)
    _C.gptq_quantize(w, None, 4, g, False, 0.01, True, 0, shared, q, shared, z)
    np.testing.assert_array_equal(q, ref[0])
    np.testing.assert_array_equal(shared, ref[1])


def test_nan_inputs_raise_without_undefined_casts():
    """NaN/Inf reached float->uint8 casts (undefined) before the error was reported."""
    x = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize_activation(x, 4)
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize_weight(x, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize_weight(x, 8, 4)


@pytest.mark.parametrize("offset", [2**63, 2**64 - 1])
def test_absurd_byte_offset_rejected(offset):
    """data + byte_offset used to be formed as a pointer first (undefined past PTRDIFF_MAX / on wrap)."""
    dlfake.LEDGER.reset()
    cap, dev = dlfake.make_capsule(_FDP(), np.zeros((2, 4), np.uint8), "uint8", (2, 4), mutate=False)
    dlfake.LEDGER.made[-1][1].dl_tensor.byte_offset = offset
    with pytest.raises(ValueError, match="byte_offset"):
        _C.unpack_int4(dlfake.FakeArray(cap, dev), np.zeros((2, 8), np.uint8))
    dlfake.LEDGER.check()


def test_woq_indices_changed_by_a_later_producer():
    """woq_linear validated the outlier columns / codebook codes while parsing the weight, then took
    x, bias and out: a later __dlpack__ could rewrite them into out-of-bounds indices. The checks
    now run after every array was taken."""
    N, K, M = 4, 8, 2
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, (N, K)).astype(np.uint8)
    codebook = rng.standard_normal((K, 4)).astype(np.float32)
    rowptr = np.array([0, 1, 1, 2, 2], np.int64)
    cols = np.array([3, 5], np.int64)
    vals = np.ones(2, np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = np.zeros(N, np.float32)

    class Evil:
        def __init__(self, victim, value):
            self.victim, self.value = victim, value

        def __dlpack_device__(self):
            return bias.__dlpack_device__()

        def __dlpack__(self, **kw):
            self.victim[0] = self.value
            return bias.__dlpack__(**kw)

    spec = ("codebook", 0, codes, codebook, None, rowptr, cols, vals)
    out = np.zeros((M, N), np.float32)
    _C.woq_linear(x, spec, bias, out)  # honest call works
    with pytest.raises(ValueError, match="cols"):
        _C.woq_linear(x, spec, Evil(cols, 1 << 40), out)
    cols[0] = 3
    with pytest.raises(ValueError, match="codes"):
        _C.woq_linear(x, spec, Evil(codes.reshape(-1), 200), out)


def test_misaligned_blob_rejected():
    """The prepacked layout is accessed through its section structs (4-byte aligned members): a blob
    viewed at an odd byte offset was read through a misaligned struct pointer (UBSan report from the
    fuzz replay). It is now refused at the boundary; fresh blobs are unaffected."""
    blob, x, ref = _qlinear_setup()
    N = ref.shape[1]
    shifted = np.zeros(blob.size + 1, np.uint8)[1:]
    shifted[:] = blob
    out = np.zeros_like(ref)
    with pytest.raises(ValueError, match="blob: expected an array aligned"):
        _C.cpu_qlinear(x, [(shifted, 4, N, None)], 32, None, out, 1)
    _C.cpu_qlinear(x, [(blob, 4, N, None)], 32, None, out, 1)
    np.testing.assert_array_equal(out, ref)
