"""SliM-LLM: the salience-weighted calibration op, GPTQ with that group quantizer, the bit allocation."""

import numpy as np
import pytest
import torch

from mixllm import ops
from mixllm.methods.baselines import LayerStats
from mixllm.methods.slim import (
    SliMConfig,
    allocation,
    group_salience,
    hinv_diag,
    rtn_blocks,
    sba_search,
    sqc_thresholds,
)


def slim_fit_ref(v, u, bits, thr, lam, norm, tau_range, tau_n):
    """NumPy reference of csrc/slim.c for one row (float32 rounding as the C code)."""
    v = np.asarray(v, np.float64)
    if bits == 1:
        m, a = v.mean(), np.abs(v).mean()
        return (np.float32(1), np.float32(m)) if not a > 0 else (np.float32(2 * a), np.float32(m - a))
    f = np.float32
    lo, hi = f(min(v.astype(f).min(), 0)), f(max(v.astype(f).max(), 0))
    if lo == 0 and hi == 0:
        lo, hi = f(-1), f(1)
    qmax = f(2**bits - 1)
    ps = (
        [1.0]
        + [1 + tau_range * i / tau_n for i in range(1, tau_n + 1)]
        + [1 - tau_range * i / tau_n for i in range(1, tau_n + 1)]
    )
    best, res = np.inf, (f(1), f(0))
    sal = v * v / (np.asarray(u, np.float64) ** 2)
    for p in ps:
        l, h = f(p * lo), f(p * hi)
        s = f((h - l) / qmax)
        if not s > 0:
            continue
        z = f(np.rint(-l / s))
        off = f(-z * s)
        q = np.clip(np.rint((v.astype(f) - off) / s), 0, qmax).astype(f)
        d = np.abs(q * s + off - v.astype(f)).astype(np.float64)
        e = d**norm
        if thr is not None:
            e = np.where(sal >= thr, lam * e, e)
        err = e.sum()
        if err < best:
            best, res = err, (s, off)
    return res


@pytest.mark.parametrize("bits,lam,thr_q", [(2, 1.0, None), (3, 4.0, 0.9), (4, 2.0, 0.5), (1, 1.0, None)])
def test_slim_calibrate_matches_reference(rng, bits, lam, thr_q):
    R, L = 6, 64
    w = (rng.standard_normal((R, L)) * rng.uniform(0.1, 2, (R, 1))).astype(np.float32)
    u = rng.uniform(0.2, 2.0, L)
    thr = None if thr_q is None else float(np.quantile(w.astype(np.float64) ** 2 / u**2, thr_q))
    s, o = ops.slim_calibrate(w, u, bits, thr, lam=lam, norm=2.4, tau_range=0.1, tau_n=10)
    for r in range(R):
        rs, ro = slim_fit_ref(w[r], u, bits, thr, lam, 2.4, 0.1, 10)
        np.testing.assert_allclose(s[r], rs, rtol=1e-5)
        np.testing.assert_allclose(o[r], ro, rtol=1e-5, atol=1e-6)


def test_slim_calibrate_search_never_worse_than_minmax(rng):
    w = rng.standard_normal((20, 128)).astype(np.float32)
    u = np.ones(128)

    def loss(s, o, bits):
        q = np.clip(np.rint((w - o[:, None]) / s[:, None]), 0, 2**bits - 1)
        return (np.abs(q * s[:, None] + o[:, None] - w) ** 2.4).sum(1)

    s0, o0 = ops.slim_calibrate(w, u, 2, tau_range=0.0, tau_n=1)
    s1, o1 = ops.slim_calibrate(w, u, 2, tau_range=0.1, tau_n=50)
    assert np.all(loss(s1, o1, 2) <= loss(s0, o0, 2) * (1 + 1e-6))
    assert np.any(loss(s1, o1, 2) < loss(s0, o0, 2) * 0.999)


def test_slim_calibrate_edge_cases():
    u = np.ones(4)
    s, o = ops.slim_calibrate(np.zeros((2, 4), np.float32), u, 2)  # zero-width group: finite, exact zero
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    q = np.clip(np.rint((0 - o) / s), 0, 3)
    np.testing.assert_allclose(q * s + o, 0, atol=1e-7)
    s, o = ops.slim_calibrate(np.full((1, 4), 0.5, np.float32), u, 1)  # 1-bit: levels mean -+ mean|v|
    assert (o[0], o[0] + s[0]) == (0.0, 1.0)
    s, o = ops.slim_calibrate(np.zeros((1, 4), np.float32), u, 1)  # all zero, 1-bit: exact zero
    assert s[0] == 1 and o[0] == 0


def test_slim_calibrate_errors(rng):
    w = rng.standard_normal((2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="bits"):
        ops.slim_calibrate(w, np.ones(8), 9)
    with pytest.raises(ValueError, match="u"):
        ops.slim_calibrate(w, np.ones(7), 2)
    with pytest.raises(ValueError, match="u"):
        ops.slim_calibrate(w, np.zeros(8), 2)
    with pytest.raises(ValueError, match="norm"):
        ops.slim_calibrate(w, np.ones(8), 2, norm=0)
    with pytest.raises(ValueError, match="tau_range"):
        ops.slim_calibrate(w, np.ones(8), 2, tau_range=1.5)
    with pytest.raises(ValueError, match="NaN"):
        ops.slim_calibrate(np.full((1, 8), np.nan, np.float32), np.ones(8), 2)
    with pytest.raises(TypeError):
        ops.slim_calibrate([[1.0]], np.ones(1), 2)


def slim_gptq_ref(w, H, bits_cols, g, thr, lam, norm, tau_range, tau_n, damp=0.01):
    """Textbook GPTQ (natural order, float64) with the SliM group quantizer (codes * scale + offset)."""
    W = np.asarray(w, np.float64).copy()
    N, K = W.shape
    H = np.asarray(H, np.float64).copy()
    H += damp * np.diag(H).mean() * np.eye(K)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    q = np.zeros((N, K), np.uint8)
    S = np.zeros((N, (K + g - 1) // g), np.float32)
    O = np.zeros_like(S)
    for i in range(K):
        j = i // g
        b = bits_cols[j]
        if i % g == 0:
            for n in range(N):
                S[n, j], O[n, j] = slim_fit_ref(
                    W[n, i : i + g],
                    np.diag(U)[i : i + g],
                    b,
                    None if thr is None else thr[j],
                    lam,
                    norm,
                    tau_range,
                    tau_n,
                )
        s, o = S[:, j], O[:, j]
        c = np.clip(np.rint((W[:, i].astype(np.float32) - o) / s), 0, 2**b - 1)
        q[:, i] = c
        err = (W[:, i] - (c.astype(np.float64) * s + o)) / U[i, i]
        W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
    return q, S, O


def hessian(rng, K, n=400):
    X = rng.standard_normal((n, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K))
    return 2 * X.T @ X / n, X


@pytest.mark.parametrize("N,K,g,bits", [(6, 64, 16, [2, 1, 3, 2]), (4, 72, 32, [3, 2, 4])])
def test_slim_gptq_matches_textbook_reference(rng, N, K, g, bits):
    w = rng.standard_normal((N, K)).astype(np.float32)
    H, _ = hessian(rng, K)
    bpg = np.broadcast_to(np.array(bits, np.float32), (N, len(bits)))
    u = hinv_diag(H)
    thr = sqc_thresholds(w, u, g)
    q, s, o = ops.slim_gptq_quantize(w, H, bpg, g, thresholds=thr, lam=3.0, tau_n=8)
    rq, rs, ro = slim_gptq_ref(w, H, bits, g, thr, 3.0, 2.4, 0.1, 8)
    assert (q == rq).mean() > 0.99  # float64 vs blocked summation order: ties may differ
    np.testing.assert_allclose(s, rs, rtol=1e-3)
    for j, b in enumerate(bits):  # codes stay in each group's range
        assert q[:, j * g : (j + 1) * g].max() <= 2**b - 1


def test_slim_gptq_lowers_output_error_and_no_hessian_is_rtn(rng):
    N, K, g = 16, 128, 32
    w = rng.standard_normal((N, K)).astype(np.float32)
    H, _ = hessian(rng, K)
    bpg = np.full((N, K // g), 2, np.float32)

    def out_err(q, s, o):
        idx = np.arange(K) // g
        d = q * s[:, idx] + o[:, idx] - w
        return np.einsum("nk,kl,nl->", d, H, d)

    e_rtn = out_err(*ops.slim_gptq_quantize(w, None, bpg, g, tau_range=0.0, tau_n=1))
    e_gptq = out_err(*ops.slim_gptq_quantize(w, H, bpg, g))
    assert e_gptq < 0.8 * e_rtn
    # H=None, no search: plain asymmetric round-to-nearest (same codes as quantize_weight)
    q, s, o = ops.slim_gptq_quantize(w, None, bpg, g, tau_range=0.0, tau_n=1)
    rq, rs, rz = ops.quantize_weight(w, 2, g)
    assert (q == rq).mean() > 0.999
    np.testing.assert_allclose(s, rs, rtol=1e-6)


def test_slim_gptq_errors(rng):
    w = rng.standard_normal((4, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="bits_per_group"):
        ops.slim_gptq_quantize(w, None, np.full((4, 2), 2.5, np.float32), 16)
    with pytest.raises(ValueError, match="bits_per_group"):
        ops.slim_gptq_quantize(w, None, np.full((4, 3), 2, np.float32), 16)
    with pytest.raises(ValueError, match="thresholds"):
        ops.slim_gptq_quantize(w, None, np.full((4, 2), 2, np.float32), 16, thresholds=np.ones(3))
    with pytest.raises(ValueError, match="group_size"):
        ops.slim_gptq_quantize(w, None, np.full((4, 2), 2, np.float32), 0)


def test_salience_and_allocation(rng):
    N, K, g = 8, 100, 32
    w = rng.standard_normal((N, K))
    H, X = hessian(rng, K)
    u = hinv_diag(H)
    U = np.linalg.cholesky(np.linalg.inv(H + 0.01 * np.diag(H).mean() * np.eye(K))).T
    np.testing.assert_allclose(u, np.diag(U), rtol=1e-8)
    sal = group_salience(w, u, g)
    e = w**2 / u**2
    np.testing.assert_allclose(sal, [e[:, j : j + g].sum() for j in range(0, K, g)], rtol=1e-12)
    cb = allocation(np.array([5.0, 1.0, 3.0, 9.0, 2.0]), 1, 2)
    assert cb.tolist() == [2, 1, 2, 3, 2]  # least salient -> 1 bit, most -> 3 bits, average kept
    cb, i, errs = sba_search(w.astype(np.float32), X.astype(np.float32), np.arange(8.0), 3, 12)
    assert i == 1 + int(np.argmin(errs)) and len(errs) == 3 and cb.mean() == 3
    # without inputs, the Hessian-weighted error picks the allocation
    cb2, i2, errs2 = sba_search(w.astype(np.float32), None, np.arange(8.0), 3, 12, H=H)
    assert len(errs2) == 3 and cb2.mean() == 3


def test_rtn_blocks_binarizes_one_bit(rng):
    w = rng.standard_normal((3, 8)).astype(np.float32)
    out = rtn_blocks(w, np.array([1]), 8)
    m, a = w.mean(1, keepdims=True), np.abs(w).mean(1, keepdims=True)
    np.testing.assert_allclose(out, np.where(w > m, m + a, m - a), rtol=1e-6)


def test_slim_config_layer(rng):
    torch.manual_seed(0)
    K, N = 128, 48
    lin = torch.nn.Linear(K, N)
    X = rng.standard_normal((512, K)).astype(np.float32) * np.exp(rng.standard_normal(K)).astype(np.float32)
    H = 2 * X.astype(np.float64).T @ X / len(X)
    st = LayerStats(H=H, X=X[:256], n=512)
    m = SliMConfig(bits=2, group_size=16).quantize_linear(lin, st)
    assert m.kind == "group" and abs(m.average_bits() - 2.0) < 1e-9  # equal-width groups: exact average
    assert set(np.unique(m.group_bits.numpy())) <= {1, 2, 3}
    with torch.no_grad():
        ref = lin(torch.from_numpy(X))
        err = ((m(torch.from_numpy(X)) - ref) ** 2).mean() / (ref**2).mean()
    assert err < 0.5
    with pytest.raises(ValueError, match="bits"):
        SliMConfig(bits=2.5)
    with pytest.raises(ValueError, match="bits"):
        SliMConfig(bits=1)
    assert SliMConfig(bits=3.0).bits == 3  # the CLI parses bits as a float
    with pytest.raises(TypeError, match="stats"):
        SliMConfig(bits=2).quantize_linear(lin, None)


def test_precomputed_factor_gives_the_same_gptq(rng):
    N, K, g = 8, 96, 32
    w = rng.standard_normal((N, K)).astype(np.float32)
    H, _ = hessian(rng, K)
    H[5, :] = H[:, 5] = 0  # a dead input
    U = ops.gptq_hinv_factor(H)
    np.testing.assert_allclose(np.triu(U), U)
    bpg = np.full((N, 3), 3, np.float32)
    a = ops.slim_gptq_quantize(w, H, bpg, g, tau_n=5)
    b = ops.slim_gptq_quantize(w, H, bpg, g, tau_n=5, U=U)
    assert (a[0] == b[0]).mean() > 0.99
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4)
    with pytest.raises(ValueError, match="U"):
        ops.slim_gptq_quantize(w, None, bpg, g, U=U)
    with pytest.raises(ValueError, match="U"):
        ops.slim_gptq_quantize(w, H, bpg, g, U=np.zeros((K, K)))
    with pytest.raises(ValueError, match="U"):
        ops.slim_gptq_quantize(w, H, bpg, g, group_order=True, U=U)
