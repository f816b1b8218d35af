"""GPTQ (shared C implementation) and the MixLLM salience reduction (docs/spec.md §2b, §3)."""

import numpy as np
import pytest
import reference as ref
import torch

from mixllm import ops


def hessian(rng, K, n=512):
    # correlated inputs, like real activations, so error compensation matters
    X = rng.standard_normal((n, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K))
    return 2 * X.T @ X / n, X


@pytest.mark.parametrize("N,K,g,bits", [(8, 64, 16, 4), (5, 100, 32, 3), (3, 40, 128, 2)])
def test_gptq_matches_textbook_reference(rng, N, K, g, bits):
    w = rng.standard_normal((N, K)).astype(np.float32)
    H, _ = hessian(rng, K)
    q, s, z = ops.gptq_quantize(w, H, bits, g, group_order=False, clip=False)
    rq, rs, rz = ref.gptq(w, H, bits, g)
    # same algorithm in float64 with a different summation order: codes agree except at exact ties
    assert (q == rq).mean() > 0.995
    np.testing.assert_allclose(s, rs, rtol=1e-4)


def test_gptq_lowers_output_error_vs_rtn(rng):
    N, K, g = 32, 256, 64
    w = rng.standard_normal((N, K)).astype(np.float32)
    H, X = hessian(rng, K)

    def out_err(q, s, z):
        d = ref.dequant(q, s, z, g) - w
        return np.einsum("nk,kl,nl->", d, H, d)

    e_rtn = out_err(*ops.quantize_weight(w, 3, g))
    e_gptq = out_err(*ops.gptq_quantize(w, H, 3, g, clip=False, group_order=False))
    e_full = out_err(*ops.gptq_quantize(w, H, 3, g))
    assert e_gptq < 0.8 * e_rtn
    assert e_full < 0.8 * e_rtn


def test_no_hessian_no_clip_is_rtn(rng):
    w = rng.standard_normal((7, 300)).astype(np.float32)
    for bits, sym in ((4, False), (8, True)):
        a = ops.gptq_quantize(w, None, bits, 128, symmetric=sym, clip=False)
        b = ops.quantize_weight(w, bits, 128, symmetric=sym)
        for x, y in zip(a, b):
            if x is not None:
                np.testing.assert_array_equal(x, y)


def test_clip_search_never_worse_than_rtn(rng):
    w = rng.standard_normal((16, 256)).astype(np.float32) ** 3  # heavy tails: clipping helps
    rq, rs, rz = ops.quantize_weight(w, 3, 128)
    cq, cs, cz = ops.gptq_quantize(w, None, 3, 128, clip=True)
    e_r = ((ref.dequant(rq, rs, rz, 128) - w) ** 2).reshape(16, 2, 128).sum(2)
    e_c = ((ref.dequant(cq, cs, cz, 128) - w) ** 2).reshape(16, 2, 128).sum(2)
    assert np.all(e_c <= e_r * (1 + 1e-6))
    assert e_c.sum() < 0.95 * e_r.sum()


def test_gptq_symmetric_8bit_and_group_order(rng):
    w = rng.standard_normal((6, 96)).astype(np.float32)
    H, _ = hessian(rng, 96)
    q, s, z = ops.gptq_quantize(w, H, 8, 32)
    assert q.dtype == np.int8 and z is None and q.min() >= -127
    assert np.abs(ref.dequant(q, s, None, 32) - w).max() < 0.1


def test_bits_per_group(rng):
    w = rng.standard_normal((4, 64)).astype(np.float32)
    bpg = np.array([[2, 3], [4, 2], [3, 3], [2, 4]], np.float32)
    q, s, z = ops.gptq_quantize(w, None, 3, 32, clip=False, bits_per_group=bpg)
    for n in range(4):
        for j in range(2):
            b = int(bpg[n, j])
            rq, rs, rz = ref.asym_quant(w[n : n + 1, 32 * j : 32 * (j + 1)], b, 32)
            np.testing.assert_array_equal(q[n : n + 1, 32 * j : 32 * (j + 1)], rq)


def test_gptq_dead_inputs_and_errors(rng):
    w = rng.standard_normal((4, 32)).astype(np.float32)
    H, _ = hessian(rng, 32)
    H[3, :] = 0
    H[:, 3] = 0
    q, s, z = ops.gptq_quantize(w, H, 4, 16)
    assert ref.dequant(q, s, z, 16)[:, 3] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="H: expected size 32"):
        ops.gptq_quantize(w, np.eye(31), 4, 16)
    with pytest.raises(ValueError, match="positive definite"):
        ops.gptq_quantize(w, 2 * np.ones((32, 32)) - np.eye(32), 4, 16, damp=0.0)
    bad = H.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.gptq_quantize(w, bad, 4, 16)
    with pytest.raises(ValueError, match="bits_per_group"):
        ops.gptq_quantize(w, None, 4, 16, bits_per_group=np.full((4, 2), 2.5, np.float32))


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_salience_accumulate_matches_reference(rng, gdtype):
    N, K = 13, 77
    delta = (rng.standard_normal((N, K)) * 0.01).astype(np.float32)
    grads = [rng.standard_normal((N, K)).astype(np.float32) * 3 for _ in range(4)]
    acc = np.zeros(N)
    for gr in grads:
        ops.salience_accumulate(acc, torch.from_numpy(gr).to(gdtype), delta)
    expect = ref.salience([torch.from_numpy(gr).to(gdtype).float().numpy() for gr in grads], delta)
    np.testing.assert_allclose(acc, expect, rtol=1e-9)
    acc_t = torch.zeros(N, dtype=torch.float64)
    ops.salience_accumulate(acc_t, torch.from_numpy(grads[0]), torch.from_numpy(delta))
    np.testing.assert_allclose(acc_t.numpy(), ref.salience(grads[:1], delta), rtol=1e-9)


def test_salience_errors():
    with pytest.raises(TypeError, match="acc: expected dtype float64"):
        ops.salience_accumulate(np.zeros(3, np.float32), np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="acc: expected size 3"):
        ops.salience_accumulate(np.zeros(2), np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="delta"):
        ops.salience_accumulate(np.zeros(3), np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32))
