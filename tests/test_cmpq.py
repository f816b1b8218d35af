"""CMPQ: the weighted 1-D k-means op, channel bit allocation, outliers, the codebook layer."""

import numpy as np
import pytest
import torch

from mixllm import ops
from mixllm.methods.baselines import LayerStats
from mixllm.methods.cmpq import CMPQConfig, channel_bits


def kmeans_ref(x, k, w=None, iters=50):
    """Float64 Lloyd's algorithm with the op's init (weighted quantiles) and tie rule (lower cluster)."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None or not np.sum(w) > 0 else np.asarray(w, np.float64)
    o = np.argsort(x, kind="stable")
    xs, ws = x[o], w[o]
    cw = np.cumsum(ws)
    c = np.array([xs[np.searchsorted(cw, cw[-1] * (i + 0.5) / k, side="right")] for i in range(k)])
    assign = lambda v, c: np.array([sum(vi > 0.5 * (c[q] + c[q + 1]) for q in range(k - 1)) for vi in v])
    for _ in range(iters):
        a = assign(x, c)
        new = c.copy()
        for i in range(k):
            m = a == i
            if w[m].sum() > 0:
                new[i] = (w[m] * x[m]).sum() / w[m].sum()
        new = np.sort(new)
        if np.array_equal(new, c):
            break
        c = new
    return c, assign(x, c)


@pytest.mark.parametrize("R,n,k,weighted", [(4, 50, 4, False), (3, 200, 8, True), (2, 17, 16, False), (5, 64, 2, True)])
def test_kmeans_matches_reference(rng, R, n, k, weighted):
    x = (rng.standard_normal((R, n)) * rng.uniform(0.5, 2, (R, 1))).astype(np.float32)
    w = rng.uniform(0, 2, (R, n)).astype(np.float32) if weighted else None
    c, q = ops.kmeans1d(x, k, weight=w, iters=100)
    assert c.shape == (R, k) and q.shape == (R, n) and q.dtype == np.uint8
    for r in range(R):
        rc, rq = kmeans_ref(x[r], k, None if w is None else w[r], iters=100)
        np.testing.assert_allclose(c[r], rc, rtol=1e-5, atol=1e-6)
        assert (q[r] == rq).mean() > 0.98  # a value exactly on a midpoint may round either way
        assert np.all(np.diff(c[r]) >= 0)


def test_kmeans_codes_are_nearest_and_better_than_uniform(rng):
    x = rng.standard_normal((8, 300)).astype(np.float32) ** 3  # heavy tails: non-uniform levels pay
    c, q = ops.kmeans1d(x, 4)
    deq = np.take_along_axis(c, q.astype(np.int64), 1)
    d_all = np.abs(x[:, :, None] - c[:, None, :])
    np.testing.assert_allclose(np.abs(x - deq), d_all.min(2), atol=1e-6)
    qu, su, zu = ops.quantize_weight(x, 2, 300)
    uni = ops.dequantize_weight(qu, su, zu, 300)
    assert ((deq - x) ** 2).sum() < 0.7 * ((uni - x) ** 2).sum()


def test_kmeans_weights_levels_and_edge_cases(rng):
    x = np.array([[0, 0, 0, 10, 10, 10]], np.float32)
    c, q = ops.kmeans1d(x, 2, weight=np.array([[1, 1, 1, 0, 0, 0]], np.float32))
    assert c[0, 0] == 0 and q[0, 3] == 1  # zero-weight values still get (their nearest) code
    c, q = ops.kmeans1d(np.full((2, 5), 3.0, np.float32), 4)  # constant rows: every level the value
    np.testing.assert_array_equal(c, 3.0)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    c, q = ops.kmeans1d(x, 8, levels=np.array([2, 4, 8]))
    assert q[0].max() <= 1 and q[1].max() <= 3
    assert c[0, 2] == c[0, 7] == c[0, 1]  # unused levels repeat the last one
    c1, q1 = ops.kmeans1d(x, 8)
    c2, q2 = ops.kmeans1d(x, 8)
    np.testing.assert_array_equal(c1, c2)  # deterministic
    c, q = ops.kmeans1d(torch.from_numpy(x), 4)  # torch in, torch out
    assert isinstance(c, torch.Tensor) and c.dtype == torch.float32


def test_kmeans_errors(rng):
    x = rng.standard_normal((2, 10)).astype(np.float32)
    with pytest.raises(ValueError, match="k"):
        ops.kmeans1d(x, 0)
    with pytest.raises(ValueError, match="k"):
        ops.kmeans1d(x, 257)
    with pytest.raises(ValueError, match="levels"):
        ops.kmeans1d(x, 4, levels=np.array([4, 5]))
    with pytest.raises(ValueError, match="weight"):
        ops.kmeans1d(x, 4, weight=-np.ones((2, 10), np.float32))
    with pytest.raises(ValueError, match="weight"):
        ops.kmeans1d(x, 4, weight=np.ones((2, 9), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ops.kmeans1d(np.full((1, 3), np.inf, np.float32), 2)
    with pytest.raises(ValueError, match="2-D"):
        ops.kmeans1d(np.ones(5, np.float32), 2)
    with pytest.raises(TypeError):
        ops.kmeans1d("x", 2)


def test_channel_bits():
    act = np.array([5.0, 1.0, 3.0, 9.0, 2.0, 0.5, 7.0, 4.0])
    assert channel_bits(act, 2).tolist() == [2] * 8
    cb = channel_bits(act, 2.25)  # top 2 of 8 by activation norm get 3 bits
    assert cb.tolist() == [2, 2, 2, 3, 2, 2, 3, 2] and cb.mean() == 2.25
    assert channel_bits(act, 3.5).mean() == 3.5 and channel_bits(act, 4).tolist() == [4] * 8


def test_cmpq_layer(rng):
    torch.manual_seed(0)
    K, N = 64, 96
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.mul_(torch.from_numpy(rng.standard_t(3, (N, K)).astype(np.float32)))  # heavy-tailed
    X = (rng.standard_normal((256, K)) * np.exp(rng.standard_normal(K))).astype(np.float32)
    st = LayerStats(H=2 * X.astype(np.float64).T @ X / len(X), X=None, n=256)
    cfg = CMPQConfig(bits=2.5, act_outlier_ratio=0.02, quant_outlier_ratio=0.01)
    m = cfg.quantize_linear(lin, st)
    assert m.kind == "codebook" and m.average_bits() == 2.5
    act = np.sqrt(np.diag(st.H))
    top = int(np.argmax(act))
    assert m.channel_bits[top] == 3
    W = m.dequantize().numpy()
    w = lin.weight.detach().numpy()
    # activation outliers: the whole top channel is kept exactly (16-bit)
    np.testing.assert_allclose(W[:, top], w[:, top].astype(np.float16).astype(np.float32))
    n_quant = int(round(0.01 * N * K))
    assert m.cols.numel() == N + n_quant  # one channel of N plus the quantization outliers
    with torch.no_grad():
        y, ref = m(torch.from_numpy(X)), lin(torch.from_numpy(X))
    e_cmpq = ((y - ref) ** 2).mean() / (ref**2).mean()
    from mixllm.methods.baselines import RTNConfig

    with torch.no_grad():
        e_rtn2 = ((RTNConfig(2, 64).quantize_linear(lin)(torch.from_numpy(X)) - ref) ** 2).mean() / (ref**2).mean()
    assert e_cmpq < e_rtn2
    for bad in (1.5, 4.5, "3"):
        with pytest.raises(ValueError, match="bits"):
            CMPQConfig(bits=bad)
    with pytest.raises(ValueError, match="act_outlier_ratio"):
        CMPQConfig(bits=3, act_outlier_ratio=0.7)
