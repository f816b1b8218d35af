"""CUDA kernels (cuda/, mixllm._cuda) against the CPU ops and the float64 reference.

Skipped where the extension was not built or no GPU is present. Covers every tile
configuration, forced split-K, tails (N, K, M not multiples of the tiles, K not a multiple of
the group), float32/float16/bfloat16, the mixed layer's column scatter, outputs poisoned with
NaN before the kernels write them, streams and graph capture, and the errors a user can trigger.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
_cuda = pytest.importorskip("mixllm._cuda")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import reference as ref  # noqa: E402
from mixllm import cuda_ops, ops  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CFGS = list(range(_cuda.NCFG))
# (M, N, K, g): tails in every dimension, K not a multiple of g, g not a multiple of 128
SHAPES = [(1, 16, 128, 128), (3, 37, 300, 128), (8, 130, 1000, 128), (17, 64, 256, 64),
          (33, 200, 520, 128), (70, 48, 384, 100), (130, 300, 129, 128), (5, 24, 1200, 300)]
SMALL = SHAPES[:3]


def make_weight(rng, N, K, bits, g):
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    codes, scale, zero = ops.quantize_weight(w, bits, g)
    return ops.QuantizedWeight.from_codes(codes, scale, zero, bits, g), codes, scale, zero


def make_x(rng, M, K, dtype):
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, ::7] *= 8.0  # outlier channels, as in real activations
    xt = torch.from_numpy(x).to(DEV, dtype)
    return xt, xt.float().cpu().numpy()


def assert_close(y, y_ref, dtype):
    y = y.float().cpu().numpy().astype(np.float64)
    assert np.isfinite(y).all()
    atol = 2e-5 * (np.abs(y_ref).max() + 1e-3)
    np.testing.assert_allclose(y, y_ref, atol=atol, rtol=RTOL[dtype])


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,g", [(1, 128, 128), (5, 300, 128), (9, 1000, 64), (3, 77, 128), (2, 4096, 4096)])
def test_act_quant_matches_cpu(rng, dtype, M, K, g):
    xt, x32 = make_x(rng, M, K, dtype)
    xt[0, : min(K, g)] = 0  # an all-zero group gets scale 1
    if M > 1:  # exact ties x / s = k + 0.5 must round half to even
        s = float(xt[1, :g].float().abs().max()) / 127.0
        xt[1, 1:5] = torch.tensor([0.5, 1.5, 2.5, -2.5], device=DEV) * s
    x32 = xt.float().cpu().numpy()
    q, s = ops.quantize_activation(xt, g)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (M, K)
    q_cpu, s_cpu = ops.quantize_activation(x32, g)
    np.testing.assert_array_equal(q.cpu().numpy(), q_cpu)
    np.testing.assert_array_equal(s.cpu().numpy(), s_cpu)
    q_ref, s_ref = ref.act_quant(x32, g)
    np.testing.assert_array_equal(q.cpu().numpy(), q_ref)


def test_act_quant_padded_layout(rng):
    M, K, g = 4, 300, 100
    xt, x32 = make_x(rng, M, K, torch.float16)
    G, gp, spg, Kp = _cuda.geometry(K, g)
    assert (G, gp, spg, Kp) == (3, 128, 1, 384)
    q = torch.full((M, Kp), 99, dtype=torch.int8, device=DEV)
    sa = torch.full((M, Kp // 128), float("nan"), device=DEV)
    _cuda.act_quant(xt, g, gp, q, sa, spg, 0)
    torch.cuda.synchronize()
    q_ref, s_ref = ref.act_quant(x32, g)
    qn = q.cpu().numpy()
    for j in range(G):
        np.testing.assert_array_equal(qn[:, j * gp: j * gp + g], q_ref[:, j * g:(j + 1) * g])
        assert (qn[:, j * gp + g:(j + 1) * gp] == 0).all()
    np.testing.assert_array_equal(sa.cpu().numpy(), s_ref)


# ----------------------------------------------------------------------------- linear
def _run(x, parts, n_out, bias, cfg=-1, splits=0):
    return cuda_ops.qlinear(x, parts, n_out, bias, (x.shape[0],), cfg=cfg, splits=splits)


@pytest.mark.parametrize("M,N,K,g", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_matches_reference(rng, M, N, K, g, bits):
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    bias = rng.standard_normal(N).astype(np.float32)
    for dtype in DTYPES:
        xt, x32 = make_x(rng, M, K, dtype)
        fn = ops.w4a8_linear if bits == 4 else ops.w8a8_linear
        y = fn(xt, W, torch.from_numpy(bias).to(DEV))
        assert y.shape == (M, N) and y.dtype == dtype and y.is_cuda
        y_ref = ref.qlinear(x32, codes, scale, zero, g, bias)
        assert_close(y, y_ref, dtype)
        if dtype == torch.float32:  # the CPU op computes the same function
            assert_close(y, np.asarray(fn(x32, W, bias), np.float64), dtype)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("splits", [1, 3, 0])
@pytest.mark.parametrize("M,N,K,g", [(1, 16, 128, 128), (13, 300, 1000, 128), (70, 150, 640, 128),
                                     (129, 40, 520, 100), (5, 70, 1300, 256)])
def test_every_tile_config(rng, cfg, splits, M, N, K, g):
    """Mixed layer (4-bit + 8-bit rows, shuffled columns) under each forced configuration."""
    n8 = max(1, N // 10)
    perm = rng.permutation(N)
    W4, c4, s4, z4 = make_weight(rng, N - n8, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, n8, K, 8, g)
    i4 = torch.from_numpy(perm[: N - n8].copy()).to(DEV)
    i8 = torch.from_numpy(perm[N - n8:].copy()).to(DEV)
    dtype = DTYPES[cfg % 3]
    xt, x32 = make_x(rng, M, K, dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    y = _run(xt, [(W4, i4), (W8, i8)], N, torch.from_numpy(bias).to(DEV), cfg, splits)
    y_ref = np.zeros((M, N))
    y_ref[:, perm[: N - n8]] = ref.qlinear(x32, c4, s4, z4, g)
    y_ref[:, perm[N - n8:]] = ref.qlinear(x32, c8, s8, None, g)
    assert_close(y, y_ref + bias, dtype)


def test_mixed_matches_cpu_op(rng):
    M, N, K, g = 9, 96, 640, 128
    perm = rng.permutation(N)
    W4, *_ = make_weight(rng, 86, K, 4, g)
    W8, *_ = make_weight(rng, 10, K, 8, g)
    i4, i8 = perm[:86].copy(), perm[86:].copy()
    xt, x32 = make_x(rng, M, K, torch.float32)
    y = ops.mixed_linear(xt, W4, W8, torch.from_numpy(i4).to(DEV), torch.from_numpy(i8).to(DEV))
    y_cpu = ops.mixed_linear(x32, W4, W8, i4, i8)
    assert_close(y, np.asarray(y_cpu, np.float64), torch.float32)


def _prepared(W, N, bias=None, pdl=True):
    pw = cuda_ops.packed_weight(W, DEV)
    return _cuda.prepare([(pw["wpack"], pw["meta"], W.bits, N, None)], bias, W.shape[1],
                         min(W.group_size, W.shape[1]), 0, pdl)


@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("splits", [1, 4])
def test_poisoned_outputs_fully_written(rng, cfg, splits):
    """Call the kernels on NaN-filled y and scratch: every element must be written."""
    M, N, K, g = 19, 90, 700, 128
    W, codes, scale, zero = make_weight(rng, N, K, 4, g)
    xt, x32 = make_x(rng, M, K, torch.bfloat16)
    h = _prepared(W, N)
    c, sp, nbytes, _ = _cuda.plan_call(h, M, cfg, splits)
    scratch = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV)  # 0xFFFFFFFF is a NaN
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    _cuda.run(h, xt, y, scratch, c, sp, 0)
    torch.cuda.synchronize()
    assert_close(y, ref.qlinear(x32, codes, scale, zero, g), torch.bfloat16)


@pytest.mark.parametrize("M,splits", [(1, 5), (3, 2), (16, 8), (40, 3)])
def test_deterministic_with_and_without_pdl(rng, M, splits):
    """The split-K reduction sums in a fixed order: y is bit-identical on every call, with
    programmatic dependent launch or without."""
    N, K, g = 200, 1400, 128
    W, codes, scale, zero = make_weight(rng, N, K, 4, g)
    bias = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(DEV)
    xt, x32 = make_x(rng, M, K, torch.float16)
    outs = []
    for pdl in (True, False):
        h = _prepared(W, N, bias, pdl)
        c, sp, nbytes, _ = _cuda.plan_call(h, M, -1, splits)
        for _rep in range(2):
            y = torch.empty((M, N), dtype=torch.float16, device=DEV)
            _cuda.run(h, xt, y, torch.empty(nbytes, dtype=torch.uint8, device=DEV), c, sp, 0)
            outs.append(y)
    for y in outs[1:]:
        assert torch.equal(y, outs[0])
    assert_close(outs[0], ref.qlinear(x32, codes, scale, zero, g) + bias.cpu().numpy(), torch.float16)


def test_back_to_back_calls_of_one_layer(rng):
    """Many launches of one layer in a row (PDL lets each GEMM start before the kernel before
    it ends; the allocator recycles scratch buffers between calls): every result must be right."""
    N, K, g, M = 96, 2048, 128, 2
    W, codes, scale, zero = make_weight(rng, N, K, 4, g)
    lin = cuda_ops.PreparedLinear([(W, None)], N, None, DEV)
    assert lin.plan(M)[1] > 1  # split-K: each call's partials go through its own scratch
    xs = [make_x(rng, M, K, torch.bfloat16) for _ in range(40)]
    ys = [lin(xt) for xt, _ in xs]
    torch.cuda.synchronize()
    for (xt, x32), y in zip(xs, ys):
        assert_close(y, ref.qlinear(x32, codes, scale, zero, g), torch.bfloat16)


def test_large_group_slow_conversion(rng):
    """g = K = 1000 > 256: the int32 -> float conversion falls back to the exact instruction."""
    M, N, K = 4, 40, 1000
    W, codes, scale, zero = make_weight(rng, N, K, 8, K)
    xt, x32 = make_x(rng, M, K, torch.float32)
    y = ops.w8a8_linear(xt, W)
    assert_close(y, ref.qlinear(x32, codes, scale, None, K), torch.float32)


def test_leading_dims_and_side_stream(rng):
    N, K = 64, 256
    W, codes, scale, zero = make_weight(rng, N, K, 4, 128)
    xt, x32 = make_x(rng, 6, K, torch.float16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = ops.w4a8_linear(xt.reshape(2, 3, K), W)
    s.synchronize()
    assert y.shape == (2, 3, N)
    assert_close(y.reshape(6, N), ref.qlinear(x32, codes, scale, zero, 128), torch.float16)


def test_cuda_graph_capture(rng):
    N, K = 128, 512
    W, codes, scale, zero = make_weight(rng, N, K, 4, 128)
    xt, _ = make_x(rng, 4, K, torch.bfloat16)
    ops.w4a8_linear(xt, W)  # packs the weight outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.w4a8_linear(xt, W)
    xn, x32 = make_x(rng, 4, K, torch.bfloat16)
    xt.copy_(xn)
    g.replay()
    torch.cuda.synchronize()
    assert_close(y, ref.qlinear(x32, codes, scale, zero, 128), torch.bfloat16)


def test_empty_inputs(rng):
    W, *_ = make_weight(rng, 16, 128, 4, 128)
    y = ops.w4a8_linear(torch.zeros((0, 128), device=DEV, dtype=torch.float16), W)
    assert y.shape == (0, 16)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise(rng):
    W, *_ = make_weight(rng, 16, 128, 4, 128)
    W8, *_ = make_weight(rng, 4, 128, 8, 128)
    x = torch.randn(2, 128, device=DEV)
    with pytest.raises(ValueError, match="last dimension"):
        ops.w4a8_linear(torch.randn(2, 100, device=DEV), W)
    with pytest.raises(TypeError, match="dtype"):
        ops.w4a8_linear(x.to(torch.int32), W)
    with pytest.raises(ValueError, match="permutation"):
        ops.mixed_linear(x, W, W8, torch.arange(16, device=DEV), torch.arange(4, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        ops.w4a8_linear(x, W, torch.zeros(3, device=DEV))
    G, gp, spg, Kp = _cuda.geometry(128, 128)
    xq = torch.zeros((2, Kp), dtype=torch.int8, device=DEV)
    sa = torch.ones((2, Kp // 128), device=DEV)
    y = torch.empty((2, 16), device=DEV)
    pw = cuda_ops.packed_weight(W, DEV)
    part = [(pw["wpack"], pw["meta"], 4, 16, None)]
    with pytest.raises(ValueError, match="CUDA"):
        _cuda.act_quant(x.cpu(), 128, 128, xq, sa, 1, 0)
    with pytest.raises(ValueError, match="wpack"):
        _cuda.prepare([(pw["wpack"][:-16], pw["meta"], 4, 16, None)], None, 128, 128, 0)
    with pytest.raises(ValueError, match="out_index is required"):
        _cuda.prepare(part + part, None, 128, 128, 0)
    with pytest.raises(ValueError, match="bias"):
        _cuda.prepare(part, torch.zeros(3, device=DEV), 128, 128, 0)
    h = _cuda.prepare(part, None, 128, 128, 0)
    c, sp, nbytes, _ = _cuda.plan_call(h, 2, 0, 1)
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    with pytest.raises(TypeError, match="handle"):
        _cuda.run(object(), x, y, scratch, c, sp, 0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        _cuda.run(h, xq, y, scratch, c, sp, 0)
    with pytest.raises(ValueError, match="scratch"):
        _cuda.run(h, x, y, None, c, sp, 0)
    with pytest.raises(ValueError, match="scratch"):
        _cuda.run(h, x, y, scratch[:-1], c, sp, 0)
    with pytest.raises(ValueError, match="cfg"):
        _cuda.plan_call(h, 2, 99, 1)
    with pytest.raises(ValueError, match="cfg"):
        _cuda.plan(DEV.index, 2, (16,), Kp, 99, 0)
    with pytest.raises(ValueError, match="y"):
        _cuda.run(h, x, torch.empty((2, 17), device=DEV), scratch, c, sp, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _cuda.run(h, x, torch.empty((16, 2), device=DEV).t(), scratch, c, sp, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _cuda.run(h, torch.randn(128, 2, device=DEV).t(), y, scratch, c, sp, 0)
    used = torch.utils.dlpack.to_dlpack(x)
    _cuda.run(h, used, y, scratch, c, sp, 0)  # a raw capsule is taken once...
    with pytest.raises(TypeError, match="unused"):
        _cuda.run(h, used, y, scratch, c, sp, 0)  # ...and refused after that


def test_mixed_linear_module_graph_and_cache(rng):
    """MixedLinear on CUDA: the prepared handle is built once per device, gives the CPU
    module's output, replays under a CUDA graph, and is rebuilt after load_state_dict."""
    from mixllm.nn import MixedLinear
    lin = torch.nn.Linear(300, 130)
    m = MixedLinear.from_linear(lin, rows8=list(range(0, 130, 9)))
    xt, x32 = make_x(rng, 3, 300, torch.float32)
    y_cpu = m(torch.from_numpy(x32)).double().numpy()
    m = m.to(DEV)
    y = m(xt)
    assert ("cuda", DEV) in m._cache
    assert_close(y, y_cpu, torch.float32)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = m(xt)
    xn, xn32 = make_x(rng, 3, 300, torch.float32)
    xt.copy_(xn)
    g.replay()
    torch.cuda.synchronize()
    m_cpu = MixedLinear.from_linear(lin, rows8=list(range(0, 130, 9)))
    assert_close(yg, m_cpu(torch.from_numpy(xn32)).double().numpy(), torch.float32)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["bias"] += 1.0
    m.load_state_dict(sd)
    assert ("cuda", DEV) not in m._cache
    assert_close(m(xt), m_cpu(torch.from_numpy(xn32)).double().numpy() + 1.0, torch.float32)


# ----------------------------------------------------------------------------- sm_90a wgmma path
SM90 = next(c for c in CFGS if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2].startswith("sm90") or
            c == CFGS[-1])
_HAS_SM90 = _cuda.plan(DEV.index, 1, (16,), 128, SM90, 1)[0] == SM90  # forced elsewhere: falls back


def _mixed(rng, M, N, K, g, dtype, frac8=0.1):
    n8 = max(1, int(N * frac8))
    perm = rng.permutation(N)
    W4, c4, s4, z4 = make_weight(rng, N - n8, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, n8, K, 8, g)
    parts = [(W4, torch.from_numpy(perm[: N - n8].copy()).to(DEV)), (W8, torch.from_numpy(perm[N - n8:].copy()).to(DEV))]
    xt, x32 = make_x(rng, M, K, dtype)
    y_ref = np.zeros((M, N))
    y_ref[:, perm[: N - n8]] = ref.qlinear(x32, c4, s4, z4, g)
    y_ref[:, perm[N - n8:]] = ref.qlinear(x32, c8, s8, None, g)
    return xt, parts, y_ref


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("M,N,K,g", [(1, 16, 128, 128), (130, 300, 1000, 128), (257, 1000, 520, 100),
                                     (128, 256, 384, 128), (300, 136, 640, 256)])
def test_sm90_mixed_matches_reference(rng, dtype, splits, M, N, K, g):
    """The wgmma kernel, forced: mixed parts with shuffled columns, bias, M/N tails, split-K."""
    xt, parts, y_ref = _mixed(rng, M, N, K, g, dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    y = _run(xt, parts, N, torch.from_numpy(bias).to(DEV), SM90, splits)
    assert_close(y, y_ref + bias, dtype)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("bits", [4, 8])
def test_sm90_single_part(rng, bits):
    M, N, K, g = 200, 200, 768, 128
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    xt, x32 = make_x(rng, M, K, torch.float32)
    y = _run(xt, [(W, None)], N, None, SM90, 1)
    assert_close(y, ref.qlinear(x32, codes, scale, zero, g), torch.float32)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
def test_sm90_large_matches_mma_sync(rng):
    """A prefill-sized layer (many CTAs, deep K): wgmma and mma.sync paths agree to fp32 rounding."""
    M, N, K, g = 1100, 2100, 4096, 128
    xt, parts, _ = _mixed(rng, 8, N, K, g, torch.float32)  # weights only; the reference is the other path
    xt = torch.randn((M, K), device=DEV)
    y90 = _run(xt, parts, N, None, SM90, 1)
    y80 = _run(xt, parts, N, None, 3, 1)
    err = (y90 - y80).abs().max().item() / y80.abs().max().item()
    assert err < 1e-5, err


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
def test_planner_picks_sm90_for_large_m():
    assert _cuda.plan(DEV.index, 4096, (14336,), 4096, -1, 0)[0] == SM90
    assert _cuda.plan(DEV.index, 4096, (12903, 1433), 4096, -1, 0)[0] == SM90
    assert _cuda.plan(DEV.index, 16, (14336,), 4096, -1, 0)[0] != SM90
