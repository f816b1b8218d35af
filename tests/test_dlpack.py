"""The DLPack bridge (csrc/dlpack_bridge.c): protocol, ownership and clear errors."""

import gc
import sys

import numpy as np
import pytest
import torch

from mixllm import _C, ops


class Wrapper:
    """An array-like exposing only the DLPack protocol, delegating to `base`."""

    def __init__(self, base, capsule=None, device=None, raise_in_dlpack=None):
        self.base, self.capsule, self.device, self.raise_in_dlpack = base, capsule, device, raise_in_dlpack
        self.calls = 0

    def __dlpack__(self, **kw):
        self.calls += 1
        if self.raise_in_dlpack:
            raise self.raise_in_dlpack
        return self.capsule if self.capsule is not None else self.base.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.device if self.device is not None else self.base.__dlpack_device__()


def quantize_act(x):
    q = np.zeros((1, 4), np.int8)
    s = np.zeros((1, 1), np.float32)
    _C.quantize_activation(x, 4, q, s)
    return q


def test_foreign_object_through_protocol_only():
    x = Wrapper(np.array([[1.0, -2.0, 0.5, 0.0]], np.float32))
    np.testing.assert_array_equal(quantize_act(x), [[64, -127, 32, 0]])
    assert x.calls == 1


def test_producer_without_max_version_supported():
    class Legacy(Wrapper):
        def __dlpack__(self, stream=None):  # rejects max_version: bridge falls back
            return self.base.__dlpack__()

    np.testing.assert_array_equal(quantize_act(Legacy(np.ones((1, 4), np.float32))), [[127] * 4])


def test_consumed_capsule_rejected():
    base = torch.ones(1, 4)
    cap = base.__dlpack__()
    quantize_act(Wrapper(base, capsule=cap))  # consumes it
    with pytest.raises(TypeError, match='unused "dltensor" capsule'):
        quantize_act(Wrapper(base, capsule=cap))


def test_raw_capsule_taken_once():
    """A raw DLPack capsule (the C-level exchange MixedLinear uses per call) is accepted as an
    argument, consumed once (its deleter runs once: no leak), and refused when reused."""
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    before = sys.getrefcount(x)
    for _ in range(50):
        np.testing.assert_array_equal(quantize_act(torch.utils.dlpack.to_dlpack(x)), [[64, -127, 32, 0]])
    gc.collect()
    assert sys.getrefcount(x) == before
    cap = torch.utils.dlpack.to_dlpack(x)
    quantize_act(cap)
    with pytest.raises(TypeError, match="unused"):
        quantize_act(cap)
    q = np.zeros((1, 4), np.int8)
    with pytest.raises(TypeError, match="x: expected dtype"):  # capsules get the same checks
        _C.quantize_activation(
            torch.utils.dlpack.to_dlpack(torch.ones(1, 4, dtype=torch.int32)), 4, q, np.zeros((1, 1), np.float32)
        )


def test_garbage_from_dlpack():
    with pytest.raises(TypeError, match="capsule"):
        quantize_act(Wrapper(np.ones((1, 4), np.float32), capsule=object()))
    with pytest.raises(TypeError, match="could not export"):
        quantize_act(Wrapper(np.ones((1, 4), np.float32), raise_in_dlpack=RuntimeError("boom")))
    with pytest.raises(TypeError, match="device_type, device_id"):
        quantize_act(Wrapper(np.ones((1, 4), np.float32), device="cpu"))
    with pytest.raises(ValueError, match="CPU or a CUDA device"):
        quantize_act(Wrapper(np.ones((1, 4), np.float32), device=(14, 0)))
    with pytest.raises(TypeError, match="supporting DLPack"):
        quantize_act([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(TypeError, match="got None"):
        quantize_act(None)


def test_device_mismatch_between_query_and_tensor():
    with pytest.raises(ValueError, match="device"):
        quantize_act(Wrapper(np.ones((1, 4), np.float32), device=(2, 0)))


def test_no_leak_and_deleter_called_once():
    x = torch.ones(1, 4)
    before = sys.getrefcount(x)
    for _ in range(200):
        quantize_act(x)
    gc.collect()
    assert sys.getrefcount(x) == before
    # a torch tensor's storage is shared with its exports; the bridge must have released them all
    assert x._base is None and x.untyped_storage().nbytes() == 16


def test_byte_offset_views():
    big = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    view = big[3:4]  # non-zero storage offset
    np.testing.assert_array_equal(quantize_act(view), quantize_act(view.clone()))


def test_zero_size_arrays():
    q, s = ops.quantize_activation(np.zeros((0, 8), np.float32), 4)
    assert q.shape == (0, 8) and s.shape == (0, 2)


# ---- the argument layer (csrc/args.c): one declared table per entry point
def _qw_args(rng):
    w = rng.standard_normal((3, 10)).astype(np.float32)
    return w, np.zeros((3, 10), np.uint8), np.zeros((3, 3), np.float32), np.zeros((3, 3), np.uint8)


def test_keywords_give_the_positional_result():
    rng = np.random.default_rng(11)
    w, q, s, z = _qw_args(rng)
    _C.quantize_weight(w, 4, 4, False, q, s, z)
    q2, s2, z2 = np.zeros_like(q), np.zeros_like(s), np.zeros_like(z)
    _C.quantize_weight(w, 4, zero_out=z2, scale_out=s2, q_out=q2, symmetric=False, group_size=4)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(z, z2)
    ref = ops.quantize_weight(w, 4, 4)
    np.testing.assert_array_equal(q, ref[0])


def test_argument_errors_name_the_argument():
    rng = np.random.default_rng(12)
    w, q, s, z = _qw_args(rng)
    with pytest.raises(TypeError, match="missing required argument 'zero_out'"):
        _C.quantize_weight(w, 4, 4, False, q, s)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        _C.quantize_weight(w, 4, 4, False, q, s, z, bogus=1)
    with pytest.raises(TypeError, match="multiple values for argument 'w'"):
        _C.quantize_weight(w, 4, 4, False, q, s, z, w=w)
    with pytest.raises(TypeError, match="at most 7 arguments"):
        _C.quantize_weight(w, 4, 4, False, q, s, z, None)
    with pytest.raises(TypeError, match="group_size: expected an integer, got float"):
        _C.quantize_weight(w, 4, 4.0, False, q, s, z)
    with pytest.raises(ValueError, match="group_size: expected a positive integer, got 0"):
        _C.quantize_weight(w, 4, 0, False, q, s, z)
    with pytest.raises(OverflowError, match="bits"):  # a C int, as PyArg_ParseTuple's "i" had it
        _C.quantize_weight(w, 2**40, 4, False, q, s, z)
    with pytest.raises(ValueError, match="k: expected 1..256 levels, got 300"):
        _C.kmeans1d(w, None, 300, None, 10, np.zeros((3, 300), np.float32), np.zeros((3, 10), np.uint8))
    with pytest.raises(TypeError, match="damp: expected a float, got str"):
        _C.gptq_quantize(w, None, 4, 4, False, "0.01", True, 0, None, q, s, z)
    with pytest.raises(TypeError, match="q_out: expected an array, got None"):
        _C.quantize_weight(w, 4, 4, False, None, s, z)


def test_signature_table_matches_the_callables():
    import inspect

    sigs = _C.__signatures__
    public = sorted(n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n)))
    assert sorted(sigs) == public and len(public) == 16
    for name, args in sigs.items():
        params = list(inspect.signature(getattr(_C, name)).parameters)
        assert params == [a[0] for a in args], name
        for _arg, kind, cons in args:
            assert kind in ("array", "int", "float", "bool", "object")
            if kind == "array":
                assert cons["dtypes"] and isinstance(cons["output"], bool)
            if kind == "int":
                assert cons["min"] <= cons["max"]
    qa = {a[0]: a for a in sigs["quantize_activation"]}
    assert qa["x"][2]["dtypes"] == ("float32", "float16", "bfloat16") and qa["x"][2]["ndim"] == 2
    assert qa["q_out"][2]["output"] and not qa["x"][2]["output"]
    assert qa["group_size"][2]["min"] == 1
    assert inspect.signature(_C.slim_gptq).parameters["U"].default is None
