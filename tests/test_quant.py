"""Number formats (docs/spec.md §1): codes equal the NumPy oracle exactly; errors are clear."""

import numpy as np
import pytest
import reference as ref
import torch

from mixllm import _C, ops

SHAPES = [(1, 1), (3, 128), (7, 300), (16, 257), (33, 1000)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("g", [128, 32, 64])
def test_asym_matches_reference(rng, bits, N, K, g):
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 3)).astype(np.float32)
    q, s, z = ops.quantize_weight(w, bits, g, symmetric=False)
    rq, rs, rz = ref.asym_quant(w, bits, g)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(z, rz)
    assert q.max() <= 2**bits - 1
    # rounding error: at most one step (a clamped edge value), half a step on average
    err = np.abs(ops.dequantize_weight(q, s, z, g) - w)
    step = s[:, np.arange(K) // g]
    assert np.all(err <= step * (1 + 1e-5))
    assert (err / step).mean() <= 0.5


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("g", [128, 50])
def test_sym8_matches_reference(rng, N, K, g):
    w = rng.standard_normal((N, K)).astype(np.float32)
    q, s, z = ops.quantize_weight(w, 8, g)
    assert z is None and q.dtype == np.int8
    rq, rs = ref.sym_quant(w, 8, g)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    assert q.min() >= -127
    np.testing.assert_allclose(ops.dequantize_weight(q, s, None, g), ref.dequant(rq, rs, None, g), rtol=1e-6)


def test_torch_inputs_give_torch_outputs_equal_to_numpy(rng):
    w = rng.standard_normal((9, 200)).astype(np.float32)
    qt, st, zt = ops.quantize_weight(torch.from_numpy(w), 4, 64)
    qn, sn, zn = ops.quantize_weight(w, 4, 64)
    assert isinstance(qt, torch.Tensor) and qt.dtype == torch.uint8
    np.testing.assert_array_equal(qt.numpy(), qn)
    np.testing.assert_array_equal(st.numpy(), sn)
    np.testing.assert_array_equal(zt.numpy(), zn)


def test_non_contiguous_inputs_are_copied_not_misread(rng):
    w = rng.standard_normal((200, 9)).astype(np.float32)
    q1, s1, z1 = ops.quantize_weight(w.T, 4, 64)  # transposed view
    q2, s2, z2 = ops.quantize_weight(np.ascontiguousarray(w.T), 4, 64)
    np.testing.assert_array_equal(q1, q2)
    qt, _, _ = ops.quantize_weight(torch.from_numpy(w).t(), 4, 64)
    np.testing.assert_array_equal(qt.numpy(), q2)
    big = rng.standard_normal((10, 400)).astype(np.float32)
    np.testing.assert_array_equal(
        ops.quantize_weight(big[::2, ::2], 4, 64)[0], ops.quantize_weight(big[::2, ::2].copy(), 4, 64)[0]
    )


def test_c_core_rejects_strided_arrays():
    w = np.zeros((8, 8), np.float32)
    q = np.zeros((8, 4), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.quantize_weight(w[:, ::2], 4, 4, False, q, np.zeros((8, 1), np.float32), np.zeros((8, 1), np.uint8))


def test_constant_and_zero_groups_are_exact():
    w = np.zeros((4, 256), np.float32)
    w[1] = 0.7  # constant positive group
    w[2, :128] = -3.0  # constant negative group, zero group after it
    for bits in (2, 3, 4):
        q, s, z = ops.quantize_weight(w, bits, 128)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        np.testing.assert_allclose(ops.dequantize_weight(q, s, z, 128), w, atol=1e-6)
    q, s, _ = ops.quantize_weight(w, 8, 128)
    np.testing.assert_allclose(ops.dequantize_weight(q, s, None, 128), w, atol=1e-6)
    aq, sa = ops.quantize_activation(w, 128)
    assert np.all(sa > 0)
    np.testing.assert_allclose(aq * np.repeat(sa, 128, 1), w, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_raise(bad):
    w = np.ones((3, 10), np.float32)
    w[1, 4] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_weight(w, 4, 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_weight(w, 8, 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.quantize_activation(w, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,g", [(1, 128, 128), (5, 300, 128), (17, 1000, 64), (2, 7, 128)])
def test_activation_quant_matches_reference(rng, dtype, M, K, g):
    x = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32) * 4).to(dtype)
    q, s = ops.quantize_activation(x, g)
    assert q.dtype == torch.int8 and s.shape == (M, ref.ngroups(K, g))
    rq, rs = ref.act_quant(x.float().numpy(), g)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy(), rs)


@pytest.mark.parametrize("N,K", [(1, 1), (3, 7), (5, 128), (2, 0)])
def test_pack_unpack_roundtrip(rng, N, K):
    q = rng.integers(0, 16, (N, K), dtype=np.uint8)
    p = ops.pack_int4(q)
    assert p.shape == (N, (K + 1) // 2)
    if K:
        assert p[0, 0] & 15 == q[0, 0]
    if K > 1:
        assert p[0, 0] >> 4 == q[0, 1]
    np.testing.assert_array_equal(ops.unpack_int4(p, K), q)
    np.testing.assert_array_equal(ops.unpack_int4(torch.from_numpy(p), K).numpy(), q)


def test_pack_rejects_codes_over_15():
    with pytest.raises(ValueError, match="0..15"):
        ops.pack_int4(np.full((2, 2), 16, np.uint8))


class TestBadArguments:
    w = np.ones((4, 16), np.float32)

    def test_wrong_type(self):
        with pytest.raises(TypeError, match="w: expected"):
            ops.quantize_weight([[1.0, 2.0]], 4, 8)

    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match="q: expected dtype uint8"):
            ops.pack_int4(np.ones((2, 2), np.int32))
        with pytest.raises(TypeError, match="x: expected dtype float32 or float16 or bfloat16"):
            ops.quantize_activation(np.ones((2, 2), np.int32), 2)

    def test_wrong_ndim(self):
        with pytest.raises(ValueError, match="2-D"):
            ops.quantize_weight(np.ones(4, np.float32), 4, 8)
        with pytest.raises(ValueError, match="2-D"):
            ops.quantize_activation(np.ones((1, 2, 3), np.float32), 8)

    @pytest.mark.parametrize("bits", [0, 9, -1])
    def test_bad_bits(self, bits):
        with pytest.raises(ValueError, match="bits"):
            ops.quantize_weight(self.w, bits, 8, symmetric=False)

    @pytest.mark.parametrize("g", [0, -4, 2.5, True])
    def test_bad_group_size(self, g):
        with pytest.raises(ValueError, match="group_size"):
            ops.quantize_weight(self.w, 4, g)

    def test_wrong_output_shape_at_c_level(self):
        with pytest.raises(ValueError, match="scale_out: expected size 2 in dimension 1"):
            _C.quantize_weight(
                self.w,
                4,
                8,
                False,
                np.zeros((4, 16), np.uint8),
                np.zeros((4, 3), np.float32),
                np.zeros((4, 2), np.uint8),
            )

    def test_readonly_output_rejected(self):
        q = np.zeros((4, 16), np.uint8)
        q.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            _C.quantize_weight(self.w, 4, 8, False, q, np.zeros((4, 2), np.float32), np.zeros((4, 2), np.uint8))

    def test_readonly_input_accepted(self):
        w = self.w.copy()
        w.flags.writeable = False
        q, s, z = ops.quantize_weight(w, 4, 8)
        assert q.shape == (4, 16)

    def test_dequantize_shape_mismatch(self):
        q, s, z = ops.quantize_weight(self.w, 4, 8)
        with pytest.raises(ValueError, match="scale"):
            ops.dequantize_weight(q, s[:, :1], z, 8)
