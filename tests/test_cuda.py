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
from _cuda_common import DEV, DTYPES, RTOL, assert_close, make_weight, make_x  # noqa: E402,F401

from mixllm import cuda_ops, ops  # noqa: E402

CFGS = list(range(_cuda.NCFG))
# (M, N, K, g): tails in every dimension, K not a multiple of g, g not a multiple of 128
SHAPES = [
    (1, 16, 128, 128),
    (3, 37, 300, 128),
    (8, 130, 1000, 128),
    (17, 64, 256, 64),
    (33, 200, 520, 128),
    (70, 48, 384, 100),
    (130, 300, 129, 128),
    (5, 24, 1200, 300),
]
SMALL = SHAPES[:3]


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
# g = 128: K % 128 == 0 takes the flat kernel (K = 128; 384, an odd group count: a half-warp idle at the
# end; 5000 x 1024, more groups than the grid's warps: each warp steps on across rows), other K % 8 == 0
# the half-warp-per-group kernel (tails of 44, 104 and 8 columns)
@pytest.mark.parametrize(
    "M,K,g",
    [(1, 128, 128), (5, 300, 128), (9, 1000, 64), (3, 77, 128), (2, 4096, 4096), (7, 1000, 128), (4, 136, 128)]
    + [(3, 384, 128), (5000, 1024, 128)],
)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [128, 256, 64])  # the half-warp kernel, the vector one, the generic one
def test_act_quant_near_rounding_boundaries(rng, dtype, g):
    """The quantizer must round x / s exactly as the CPU op's IEEE division does (its multiply by
    1 / s keeps that, cuda/act_quant.cu code_of): 2M values, half of them within a few ulps of
    (k + 0.5) * s, groups of scales from 2^-140 (subnormal: 1 / s overflows, the division's fallback)
    to 2^20."""
    M, K = 512, 4096
    G = K // g
    s = (rng.uniform(0.5, 2.0, (M, G, 1)) * 2.0 ** rng.integers(-140, 20, (M, G, 1))).astype(np.float32)
    k = rng.integers(-127, 127, (M, G, g))
    near = ((k + 0.5) * s).astype(np.float32)
    near = near + rng.integers(-3, 4, near.shape).astype(np.float32) * np.spacing(near)
    x = np.where(rng.random((M, G, g)) < 0.5, near, rng.uniform(-127, 127, (M, G, g)) * s).astype(np.float32)
    x[:, :, 0] = 127 * s[:, :, 0]  # the group's max|x|: scale s (up to rounding)
    xt = torch.from_numpy(x.reshape(M, K)).to(DEV, dtype)
    if dtype != torch.float32 and not torch.isfinite(xt).all():
        xt = torch.nan_to_num(xt, posinf=0.0, neginf=0.0)
    q, sc = ops.quantize_activation(xt, g)
    q_cpu, s_cpu = ops.quantize_activation(xt.float().cpu().numpy(), g)
    np.testing.assert_array_equal(sc.cpu().numpy(), s_cpu)
    np.testing.assert_array_equal(q.cpu().numpy(), q_cpu)


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
        np.testing.assert_array_equal(qn[:, j * gp : j * gp + g], q_ref[:, j * g : (j + 1) * g])
        assert (qn[:, j * gp + g : (j + 1) * gp] == 0).all()
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
@pytest.mark.parametrize(
    "M,N,K,g", [(1, 16, 128, 128), (13, 300, 1000, 128), (70, 150, 640, 128), (129, 40, 520, 100), (5, 70, 1300, 256)]
)
def test_every_tile_config(rng, cfg, splits, M, N, K, g):
    """Mixed layer (4-bit + 8-bit rows, shuffled columns) under each forced configuration."""
    n8 = max(1, N // 10)
    perm = rng.permutation(N)
    W4, c4, s4, z4 = make_weight(rng, N - n8, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, n8, K, 8, g)
    i4 = torch.from_numpy(perm[: N - n8].copy()).to(DEV)
    i8 = torch.from_numpy(perm[N - n8 :].copy()).to(DEV)
    dtype = DTYPES[cfg % 3]
    xt, x32 = make_x(rng, M, K, dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    y = _run(xt, [(W4, i4), (W8, i8)], N, torch.from_numpy(bias).to(DEV), cfg, splits)
    y_ref = np.zeros((M, N))
    y_ref[:, perm[: N - n8]] = ref.qlinear(x32, c4, s4, z4, g)
    y_ref[:, perm[N - n8 :]] = ref.qlinear(x32, c8, s8, None, g)
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
    return _cuda.prepare(
        [(pw["wpack"], pw["meta"], W.bits, N, None)], bias, W.shape[1], min(W.group_size, W.shape[1]), 0, pdl
    )


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
    for (_, x32), y in zip(xs, ys):
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
def test_signature_table_and_keywords(rng):
    """Every _cuda entry point is declared in its argument table (csrc/cuda_module.c): the text
    signature, __signatures__ and the keywords it accepts come from that one declaration."""
    import inspect

    sigs = _cuda.__signatures__
    public = sorted(n for n in dir(_cuda) if not n.startswith("_") and callable(getattr(_cuda, n)))
    entries = ["act_quant", "geometry", "layout_bytes", "pack_weight", "plan", "plan_call", "prepare", "run"]
    assert sorted(sigs) == public == sorted(entries + ["run_rmsnorm", "run_silu_mul"])
    for name, args in sigs.items():
        assert list(inspect.signature(getattr(_cuda, name)).parameters) == [a[0] for a in args], name
    assert _cuda.geometry(K=300, g=128) == _cuda.geometry(300, 128) == (3, 128, 1, 384)
    with pytest.raises(TypeError, match="unexpected keyword argument 'group_size'"):
        _cuda.geometry(300, group_size=128)
    with pytest.raises(TypeError, match="multiple values for argument 'K'"):
        _cuda.geometry(300, K=300)
    with pytest.raises(TypeError, match="missing required argument 'g'"):
        _cuda.geometry(300)
    with pytest.raises(ValueError, match="K: expected an integer in"):
        _cuda.geometry(K=2**40, g=1)  # beyond 32 bits: still the ValueError of the range, not an OverflowError
    W, *_ = make_weight(rng, 16, 128, 4, 128)
    pw = cuda_ops.packed_weight(W, DEV)
    h = _cuda.prepare(parts=[(pw["wpack"], pw["meta"], 4, 16, None)], bias=None, K=128, g=128, stream=0)
    c, sp, nbytes, _ = _cuda.plan_call(h, M=3, cfg=-1, splits=0)
    xt = torch.randn(3, 128, device=DEV)
    y, y2 = torch.empty((3, 16), device=DEV), torch.empty((3, 16), device=DEV)
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    _cuda.run(h, xt, y, scratch, c, sp, 0)
    _cuda.run(handle=h, x=xt, y=y2, scratch=scratch, cfg=c, splits=sp, stream=0)
    torch.cuda.synchronize()
    assert torch.equal(y, y2)


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
    for bad_device in (-1, torch.cuda.device_count(), 63):  # a CUDA API error in the planner before
        with pytest.raises(ValueError, match="device: expected a CUDA device ordinal"):
            _cuda.plan(bad_device, 2, (16,), Kp, -1, 0)
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


@pytest.mark.parametrize("M", [1, 5, 16, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_projections_on_cuda_and_under_graph(rng, M, dtype):
    """mixllm.fuse on the GPU: a fused q/k/v group (odd widths, K not a multiple of the group)
    gives the CPU layers' outputs, and replays under a CUDA graph with its members' slices."""
    from mixllm.fuse import FusedProjection, SharedInputProjections
    from mixllm.nn import MixedLinear

    K, widths = 520, (200, 72, 72)
    cpu = [
        MixedLinear.from_linear(torch.nn.Linear(K, n, bias=True), rows8=rng.choice(n, n // 9, replace=False))
        for n in widths
    ]
    group = SharedInputProjections(MixedLinear.concat(cpu), ("q", "k", "v"), widths).to(DEV)
    members = [FusedProjection(group, i) for i in range(3)]
    xt, x32 = make_x(rng, M, K, dtype)
    refs = [m(torch.from_numpy(x32)).double().numpy() for m in cpu]
    for mem, r in zip(members, refs):
        y = mem(xt)
        assert y.dtype == dtype and y.shape == (M, r.shape[1])
        assert_close(y, r, dtype)
    assert group._pending is None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = [mem(xt) for mem in members]
    xn, xn32 = make_x(rng, M, K, dtype)
    xt.copy_(xn)
    g.replay()
    torch.cuda.synchronize()
    for y, m in zip(ys, cpu):
        assert_close(y, m(torch.from_numpy(xn32)).double().numpy(), dtype)
    # torch.compile (fullgraph): the members' slices of one custom-op call, same results
    torch._dynamo.reset()
    run = torch.compile(lambda x: [mem(x) for mem in members], backend="aot_eager", fullgraph=True)
    for y, m in zip(run(xt), cpu):
        assert_close(y, m(torch.from_numpy(xn32)).double().numpy(), dtype)
    assert group._pending is None


# ----------------------------------------------------------------------------- sm_90a wgmma path
SM90 = next(c for c in CFGS if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2].startswith("sm90") or c == CFGS[-1])
_HAS_SM90 = _cuda.plan(DEV.index, 1, (16,), 128, SM90, 1)[0] == SM90  # forced elsewhere: falls back
# the same kernel's few-token tiles with two consumer pairs on alternating stages
SM90_PAIRS = next(
    c for c in CFGS if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2] == "sm90_wgmma_pairs" or c == CFGS[-1]
)


def _mixed_parts(rng, N, K, g, frac8=0.1, perm=None, n8=None):
    """A mixed layer's parts (shuffled columns, or the 4-bit rows to perm[:N - n8], the 8-bit ones to the
    rest) and its two-step float64 reference as a function of x."""
    n8 = max(1, int(N * frac8)) if n8 is None else n8
    perm = rng.permutation(N) if perm is None else np.asarray(perm)
    W4, c4, s4, z4 = make_weight(rng, N - n8, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, n8, K, 8, g)
    parts = [
        (W4, torch.from_numpy(perm[: N - n8].copy()).to(DEV)),
        (W8, torch.from_numpy(perm[N - n8 :].copy()).to(DEV)),
    ]

    def y_ref(x32):
        y = np.zeros((x32.shape[0], N))
        y[:, perm[: N - n8]] = ref.qlinear(x32, c4, s4, z4, g)
        y[:, perm[N - n8 :]] = ref.qlinear(x32, c8, s8, None, g)
        return y

    return parts, y_ref


def _mixed(rng, M, N, K, g, dtype, frac8=0.1):
    parts, y_ref = _mixed_parts(rng, N, K, g, frac8)
    xt, x32 = make_x(rng, M, K, dtype)
    return xt, parts, y_ref(x32)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("pairs", [False, True], ids=["sm90", "sm90_pairs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "M,N,K,g",
    [
        (1, 16, 128, 128),
        (16, 200, 768, 128),
        (20, 300, 1000, 128),
        (33, 136, 640, 256),
        (64, 256, 384, 128),
        (65, 150, 520, 100),
        (130, 300, 1000, 128),
        (257, 1000, 520, 100),
        (128, 256, 384, 128),
        (300, 136, 640, 256),
    ],
)
def test_sm90_mixed_matches_reference(rng, pairs, dtype, splits, M, N, K, g):
    """The wgmma kernel, forced: mixed parts with shuffled columns, bias, M/N tails, split-K; every
    token tile (16, 32 and 64 up to 64 tokens, then 128 or 256; pairs: the few-token tiles with two
    consumer pairs on alternating stages, odd stage counts included)."""
    xt, parts, y_ref = _mixed(rng, M, N, K, g, dtype)
    bias = rng.standard_normal(N).astype(np.float32)
    y = _run(xt, parts, N, torch.from_numpy(bias).to(DEV), SM90_PAIRS if pairs else SM90, splits)
    assert_close(y, y_ref + bias, dtype)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("N", [1024, 1030])
def test_sm90_prefill_epilogue_column_runs(rng, dtype, splits, N):
    """The prefill tiles' epilogue through shared memory (each token's rows stored from a transposed tile): a
    mixed layer whose 8-bit rows sit in runs of 1-7 columns (columns otherwise in order), N = 1024 and 1030
    (rows of y not 16-byte aligned), bias, NaN-poisoned y and scratch, split-K's workspace, token tails,
    against float64."""
    K, g = 640, 128
    gaps = np.zeros(N, bool)
    for start in rng.choice(N - 8, 12, replace=False):  # runs of 1-7 8-bit columns, some unaligned
        gaps[start : start + rng.integers(1, 8)] = True
    perm = np.concatenate([np.flatnonzero(~gaps), np.flatnonzero(gaps)])
    parts, y_ref = _mixed_parts(rng, N, K, g, perm=perm, n8=int(gaps.sum()))
    bias = rng.standard_normal(N).astype(np.float32)
    h = cuda_ops.PreparedLinear(parts, N, torch.from_numpy(bias), DEV).handle
    for M in (300, 513):
        xt, x32 = make_x(rng, M, K, dtype)
        c, sp, nbytes, name = _cuda.plan_call(h, M, SM90, splits)
        assert name == "sm90_wgmma" and sp == splits
        scratch = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV)  # 0xFFFFFFFF is a NaN
        y = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
        _cuda.run(h, xt, y, scratch, c, sp, 0)
        torch.cuda.synchronize()
        assert_close(y, y_ref(x32) + bias, dtype)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("splits,N", [(1, 5120), (2, 2560), (3, 2560)])
def test_sm90_prefill_256_token_tiles_odd_stages(rng, splits, N):
    """The 256-token prefill tile: 7 stages (an odd count, its ring of 4 wrapping), split 7 / 4 + 3 /
    3 + 3 + 1, a token tail (500 tokens: 256 + 244), both parts, bias, against float64. N is chosen per
    split so that the launcher's wave rule takes the 256-token tile (80-120 CTAs of 256 tokens against
    160-240 of 128)."""
    M, K, g = 500, 896, 128
    xt, parts, y_ref = _mixed(rng, M, N, K, g, torch.bfloat16)
    bias = rng.standard_normal(N).astype(np.float32)
    y = _run(xt, parts, N, torch.from_numpy(bias).to(DEV), SM90, splits)
    assert_close(y, y_ref + bias, torch.bfloat16)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize(
    "M,K,splits,bm",
    [(1024, 256, 1, 256), (600, 384, 1, 128), (600, 128, 1, 128), (1000, 640, 3, 256)],
)
def test_sm90_prefill_grid_of_many_tiles(rng, M, K, splits, bm):
    """Prefill grids of 256-768 tiles (more than a Hopper GPU has SMs, so several rounds of CTAs on each SM),
    both parts, token tails (600 = 4 x 128 + 88, 1000 = 3 x 256 + 232), 1-stage tiles, split-K 2 + 2 + 1,
    bias, NaN-poisoned y and scratch, against float64. bm: the tile the launcher's wave rule picks there
    (64 row blocks), for the reader. (Written for a persistent version of these tiles, tried on
    2026-12-02 and not kept: docs/kernels.md.)"""
    N = 8000  # 800 8-bit rows (7 row blocks of 128) and 7200 4-bit ones (57)
    parts, y_ref = _mixed_parts(rng, N, K, 128)
    bias = rng.standard_normal(N).astype(np.float32)
    h = cuda_ops.PreparedLinear(parts, N, torch.from_numpy(bias), DEV).handle
    xt, x32 = make_x(rng, M, K, torch.bfloat16)
    c, sp, nbytes, name = _cuda.plan_call(h, M, SM90, splits)
    assert name == "sm90_wgmma" and sp == splits
    scratch = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV)  # 0xFFFFFFFF is a NaN
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    _cuda.run(h, xt, y, scratch, c, sp, 0)
    torch.cuda.synchronize()
    assert_close(y, y_ref(x32) + bias, torch.bfloat16)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("pairs", [False, True], ids=["sm90", "sm90_pairs"])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("M", [9, 16, 32, 40, 64])
def test_sm90_deep_k_wraps_the_rings(rng, pairs, splits, M):
    """Few-token tiles over 42 stages (21 per split): every ring (5 to 11 slots deep) wraps at least
    once, on both parts of a mixed layer, against float64."""
    xt, parts, y_ref = _mixed(rng, M, 200, 5300, 128, torch.bfloat16)
    y = _run(xt, parts, 200, None, SM90_PAIRS if pairs else SM90, splits)
    assert_close(y, y_ref, torch.bfloat16)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("cfg", ["sm90", "sm90_pairs"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [200, 40, 9])
def test_sm90_single_part(rng, cfg, bits, M):
    N, K, g = 200, 768, 128
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    xt, x32 = make_x(rng, M, K, torch.float32)
    y = _run(xt, [(W, None)], N, None, SM90_PAIRS if cfg == "sm90_pairs" else SM90, 1)
    assert_close(y, ref.qlinear(x32, codes, scale, zero, g), torch.float32)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
@pytest.mark.parametrize("pairs", [False, True], ids=["sm90", "sm90_pairs"])
@pytest.mark.parametrize("M", [9, 40, 300])
def test_sm90_pdl_calls_back_to_back(rng, pairs, M):
    """The wgmma kernel under programmatic dependent launch, few-token and prefill tiles (M = 300; they start
    while the activation quantizer runs; the producer waits before copying its output): calls back to back
    on new inputs, eagerly and replayed from a CUDA graph, bit-identical to launches without it and to
    float64."""
    N, K, g = 1000, 2100, 128
    xt, parts, y_ref = _mixed(rng, M, N, K, g, torch.bfloat16)
    xs = [xt] + [make_x(rng, M, K, torch.bfloat16)[0] for _ in range(5)]
    cfg = SM90_PAIRS if pairs else SM90
    with_pdl = cuda_ops.PreparedLinear(parts, N, None, DEV, pdl=True)
    without = cuda_ops.PreparedLinear(parts, N, None, DEV, pdl=False)
    want = [without(x, cfg=cfg) for x in xs]
    got = [with_pdl(x, cfg=cfg) for x in xs]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert_close(got[0], y_ref, torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [with_pdl(x, cfg=cfg) for x in xs]
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, want))


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
def test_sm90_large_matches_mma_sync(rng):
    """A prefill-sized layer (many CTAs, deep K): wgmma and mma.sync paths agree to fp32 rounding."""
    M, N, K, g = 1100, 2100, 4096, 128
    xt, parts, _ = _mixed(rng, 8, N, K, g, torch.float32)  # weights only; the reference is the other path
    xt = torch.randn((M, K), device=DEV)
    y80 = _run(xt, parts, N, None, 3, 1)
    for cfg in (SM90, SM90_PAIRS):
        y90 = _run(xt, parts, N, None, cfg, 1)
        err = (y90 - y80).abs().max().item() / y80.abs().max().item()
        assert err < 1e-5, (cfg, err)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
def test_planner_picks_sm90_for_large_m():
    assert _cuda.plan(DEV.index, 4096, (14336,), 4096, -1, 0)[0] == SM90
    assert _cuda.plan(DEV.index, 4096, (12903, 1433), 4096, -1, 0)[0] == SM90
    # its few-token tiles: from 9 tokens on layers from 4096 x 4096 up, not on smaller layers; the
    # decode kernel up to 8 tokens. Two consumer pairs (SM90_PAIRS) at 33-64 tokens, and at 9-32 where
    # K <= 4096.
    assert _cuda.plan(DEV.index, 8, (14336,), 4096, -1, 0)[0] not in (SM90, SM90_PAIRS)
    assert _cuda.plan(DEV.index, 9, (14336,), 4096, -1, 0)[0] == SM90_PAIRS
    assert _cuda.plan(DEV.index, 64, (14336,), 4096, -1, 0)[0] == SM90_PAIRS
    assert _cuda.plan(DEV.index, 8, (3687, 409), 4096, -1, 0)[0] not in (SM90, SM90_PAIRS)
    assert _cuda.plan(DEV.index, 9, (3687, 409), 4096, -1, 0)[0] == SM90_PAIRS
    assert _cuda.plan(DEV.index, 16, (1843, 205), 4096, -1, 0)[0] not in (SM90, SM90_PAIRS)  # 2048 x 4096
    assert _cuda.plan(DEV.index, 64, (576,), 640, -1, 0)[0] not in (SM90, SM90_PAIRS)
    assert _cuda.plan(DEV.index, 64, (1024,), 4096, -1, 0)[0] not in (SM90, SM90_PAIRS)
    assert _cuda.plan(DEV.index, 128, (14336,), 4096, -1, 0)[0] == SM90
    # split-K of the few-token tiles (bench/results/gpu_sm90_sweep_2026-12-01.log's best forced splits)
    assert _cuda.plan(DEV.index, 32, (7373, 819), 28672, -1, 0)[:2] == (SM90, 4)
    assert _cuda.plan(DEV.index, 64, (7373, 819), 28672, -1, 0)[:2] == (SM90_PAIRS, 2)
    assert _cuda.plan(DEV.index, 64, (25805, 2867), 8192, -1, 0)[:2] == (SM90_PAIRS, 1)
    assert _cuda.plan(DEV.index, 32, (25805, 2867), 8192, -1, 0)[0] == SM90
    # a few-token tile does the same work at any M up to its size, so the plan is the tile's: 28672 x 8192
    # once took 8 splits at 9-15 tokens (65 us at M = 9 against 51 at 16 with one split)
    for Ns, Kp in (((25805, 2867), 8192), ((7373, 819), 28672), ((14336,), 4096), ((3687, 409), 4096)):
        for lo, hi in ((9, 16), (17, 32), (33, 64)):
            plans = {_cuda.plan(DEV.index, M, Ns, Kp, -1, 0)[:2] for M in range(lo, hi + 1)}
            assert len(plans) == 1, (Ns, Kp, lo, hi, plans)


# ----------------------------------------------------------------------------- issue 14: the CPU path's promises
# Output indices are checked where they cannot be swapped behind the check (a private copy per
# prepared layer; every functional call), NaN/Inf show in the output (docs/readme_reliability.md,
# "NaN and Inf on the GPU"), and every bad input is a clear exception or a documented result.
def _mixed_layer(rng, N=256, n8=32, K=512, g=128):
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.02
    W4 = ops.QuantizedWeight.quantize(w[: N - n8], bits=4, group_size=g)
    W8 = ops.QuantizedWeight.quantize(w[N - n8 :], bits=8, group_size=g)
    return W4, W8, torch.arange(N - n8), torch.arange(N - n8, N)


def _bad_index_sets(i4, i8):
    """(name, index4, index8) that are not a permutation of the output columns."""
    N = i4.numel() + i8.numel()
    dup = i4.clone()
    dup[1] = dup[0]
    return [
        ("shifted", i4, i8 + 1),
        ("duplicate", dup, i8),
        ("out of range", i4, torch.full_like(i8, N)),
        ("negative", i4, i8 - N),
        ("all the same", torch.zeros_like(i4), torch.zeros_like(i8)),
    ]


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_fresh_bad_index_after_valid_call(rng, where):
    """The probe of issue 14: after one valid call, freshly made bad index tensors (which the caching
    allocator places at the address, and version 0, of the earlier ones) must still be refused.
    At main this passed silently (the check was cached by (data_ptr, _version, numel))."""
    W4, W8, i4, i8 = _mixed_layer(rng)
    x = torch.randn(8, 512, device=DEV, dtype=torch.bfloat16)
    dev = DEV if where == "cuda" else "cpu"
    y0 = ops.mixed_linear(x, W4, W8, i4.to(dev), i8.to(dev))
    torch.cuda.synchronize()
    for _name, b4, b8 in _bad_index_sets(i4, i8):
        ops.mixed_linear(x, W4, W8, i4.to(dev), i8.to(dev))  # valid call first, every time
        with pytest.raises(ValueError, match="permutation"):
            ops.mixed_linear(x, W4, W8, b4.to(dev), b8.to(dev))
            torch.cuda.synchronize()
    assert torch.equal(ops.mixed_linear(x, W4, W8, i4.to(dev), i8.to(dev)), y0)


def test_index_dtypes_shapes_and_devices(rng):
    W4, W8, i4, i8 = _mixed_layer(rng)
    x = torch.randn(3, 512, device=DEV)
    y = ops.mixed_linear(x, W4, W8, i4.to(DEV), i8.to(DEV))
    for f4, f8 in (
        (i4, i8),
        (i4.numpy(), i8.numpy()),
        (i4.int().to(DEV), i8.int().to(DEV)),
        (i4.to(torch.int16), i8.to(torch.int16)),
    ):  # any integer dtype, on the CPU or the GPU
        assert torch.equal(ops.mixed_linear(x, W4, W8, f4, f8), y)
    for bad in (i8.float(), i8.double().to(DEV), i8.bool(), i8.numpy().astype(np.float32)):
        with pytest.raises(TypeError, match="out_index: expected an integer dtype"):
            ops.mixed_linear(x, W4, W8, i4, bad)
    with pytest.raises(ValueError, match="out_index: expected shape"):
        ops.mixed_linear(x, W4, W8, i4, i8.reshape(4, 8))
    with pytest.raises(ValueError, match="out_index: expected shape"):
        ops.mixed_linear(x, W4, W8, i4, i8[:-1])
    with pytest.raises(ValueError, match="permutation"):  # checked even when there is nothing to compute
        ops.mixed_linear(x[:0], W4, W8, i4, i8 + 1)
    with pytest.raises(ValueError, match="permutation"):
        ops.mixed_linear(x.reshape(3, 1, 512)[:, :0], W4, W8, i4, i8 + 1)


def test_prepared_layer_owns_its_indices(rng):
    """PreparedLinear checks a private copy once: rewriting (or freeing) the caller's index tensors
    afterwards changes nothing. At main the handle read the caller's tensors in place."""
    W4, W8, i4, i8 = _mixed_layer(rng)
    a4, a8 = i4.to(DEV), i8.to(DEV)
    lin = cuda_ops.PreparedLinear([(W4, a4), (W8, a8)], 256, None, DEV)
    x = torch.randn(5, 512, device=DEV, dtype=torch.float16)
    y0 = lin(x)
    a8.add_(1)  # would name column 256 of a 256-column output
    a4.fill_(-7)
    y1 = lin(x)
    torch.cuda.synchronize()
    assert torch.equal(y0, y1)
    del a4, a8
    fresh = torch.full((1 << 20,), 255, dtype=torch.int64, device=DEV)  # reuse the freed blocks
    assert torch.equal(lin(x), y0)
    del fresh
    for _name, b4, b8 in _bad_index_sets(i4, i8):
        with pytest.raises(ValueError, match="permutation"):
            cuda_ops.PreparedLinear([(W4, b4.to(DEV)), (W8, b8.to(DEV))], 256, None, DEV)


def test_mixed_linear_emulated_on_cuda_without_kernels(rng, monkeypatch):
    """A MixedLinear on the GPU when the CUDA kernels are not available (a build without nvcc) runs
    its torch emulation; its weights are dequantized from host copies (the C ops read host memory)."""
    from mixllm.nn import MixedLinear

    lin = torch.nn.Linear(300, 130)
    m_cpu = MixedLinear.from_linear(lin, rows8=list(range(0, 130, 9)))
    xt, x32 = make_x(rng, 3, 300, torch.float32)
    monkeypatch.setattr(ops, "cuda_available", lambda: False)
    m = MixedLinear.from_linear(lin, rows8=list(range(0, 130, 9))).to(DEV)
    y = m(xt)
    assert y.is_cuda and "w" in m._cache
    torch.testing.assert_close(m._cache["w"].cpu(), m_cpu.dequantized_weight())
    assert_close(y, m_cpu(torch.from_numpy(x32)).double().numpy(), torch.float32)


def test_mixed_linear_module_index_ownership(rng):
    from mixllm.nn import MixedLinear

    lin = torch.nn.Linear(300, 130)
    m = MixedLinear.from_linear(lin, rows8=list(range(0, 130, 9))).to(DEV)
    x = torch.randn(4, 300, device=DEV)
    y0 = m(x)
    m.perm.add_(1)  # in place: the prepared layer keeps its checked copy until the cache is dropped
    assert torch.equal(m(x), y0)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["perm"] -= 1  # back to the valid permutation...
    sd["perm"][1] = sd["perm"][0]  # ...with one duplicate
    m.load_state_dict(sd)
    with pytest.raises(ValueError, match="permutation"):
        m(x)


def test_functional_index_check_under_graph_capture(rng):
    """Under capture no host synchronisation is possible: the check runs on the device at every
    replay and a bad index set gives an all-NaN output (no store outside y: the kernels skip
    out-of-range columns, see the memcheck run in scripts/gpu_fuzz.sh)."""
    W4, W8, i4, i8 = _mixed_layer(rng)
    a4, a8 = i4.to(DEV), i8.to(DEV)
    x = torch.randn(4, 512, device=DEV, dtype=torch.bfloat16)
    y_ref = ops.mixed_linear(x, W4, W8, a4, a8)  # packs the weights outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = ops.mixed_linear(x, W4, W8, a4, a8)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_ref)
    for name, b4, b8 in _bad_index_sets(i4, i8):
        a4.copy_(b4)
        a8.copy_(b8)
        g.replay()
        torch.cuda.synchronize()
        assert torch.isnan(y).all(), name
    a4.copy_(i4)
    a8.copy_(i8)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_ref)


def _poison(x, rows):
    """x with a NaN in rows[0], +Inf in rows[1], -Inf in rows[2] (one element each, different groups)."""
    x = x.clone()
    for r, (col, v) in zip(rows, ((5, float("nan")), (x.shape[1] - 1, float("inf")), (130, float("-inf")))):
        x[r, col % x.shape[1]] = v
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "M,N,K,g", [(7, 40, 300, 128), (9, 64, 256, 64), (5, 24, 1200, 300), (6, 40, 392, 128), (6, 40, 512, 128)]
)
def test_quantize_activation_nonfinite_group(rng, dtype, M, N, K, g):
    """A non-finite value makes its (token, group) scale NaN and its codes 0; other groups match
    the CPU op. At main the NaN was dropped (finite scale)."""
    xt, _ = make_x(rng, M, K, dtype)
    xt = _poison(xt, (1, 3, 4))
    q, s = ops.quantize_activation(xt, g)
    x32 = xt.float().cpu().numpy()
    bad = ~np.isfinite(np.pad(x32, ((0, 0), (0, (-K) % g))).reshape(M, -1, g)).all(-1)
    assert bad.sum() == 3
    sn, qn = s.cpu().numpy(), q.cpu().numpy()
    assert np.isnan(sn[bad]).all() and np.isfinite(sn[~bad]).all()
    clean = np.where(np.isfinite(x32), x32, 0)
    q_cpu, s_cpu = ops.quantize_activation(clean, g)
    for r, j in zip(*np.nonzero(bad)):
        assert (qn[r, j * g : (j + 1) * g] == 0).all()
        q_cpu[r, j * g : (j + 1) * g] = 0
    np.testing.assert_array_equal(qn, q_cpu)
    np.testing.assert_array_equal(sn[~bad], s_cpu[~bad])


def _apis(rng, N, K, g):
    """(name, public(x), forced(x, cfg, splits), reference(x32) float64 [M, N] or None) for each
    public GPU entry: ops.w4a8_linear, ops.w8a8_linear, ops.mixed_linear, MixedLinear."""
    from mixllm.nn import MixedLinear

    W4, c4, s4, z4 = make_weight(rng, N, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, N, K, 8, g)
    n8 = max(1, N // 8)
    perm = rng.permutation(N)
    Wm4, cm4, sm4, zm4 = make_weight(rng, N - n8, K, 4, g)
    Wm8, cm8, sm8, _ = make_weight(rng, n8, K, 8, g)
    i4, i8 = torch.from_numpy(perm[: N - n8].copy()).to(DEV), torch.from_numpy(perm[N - n8 :].copy()).to(DEV)

    def mixed_ref(x32):
        y = np.zeros((x32.shape[0], N))
        y[:, perm[: N - n8]] = ref.qlinear(x32, cm4, sm4, zm4, g)
        y[:, perm[N - n8 :]] = ref.qlinear(x32, cm8, sm8, None, g)
        return y

    mod = MixedLinear.from_linear(torch.nn.Linear(K, N, bias=False), rows8=list(range(0, N, 7)), group_size=g)
    mod = mod.to(DEV)
    return [
        (
            "w4a8",
            lambda x: ops.w4a8_linear(x, W4),
            lambda x, c, s: _run(x, [(W4, None)], N, None, c, s),
            lambda x32: ref.qlinear(x32, c4, s4, z4, g),
        ),
        (
            "w8a8",
            lambda x: ops.w8a8_linear(x, W8),
            lambda x, c, s: _run(x, [(W8, None)], N, None, c, s),
            lambda x32: ref.qlinear(x32, c8, s8, None, g),
        ),
        (
            "mixed",
            lambda x: ops.mixed_linear(x, Wm4, Wm8, i4, i8),
            lambda x, c, s: _run(x, [(Wm4, i4), (Wm8, i8)], N, None, c, s),
            mixed_ref,
        ),
        ("module", mod, None, None),
    ]


@pytest.mark.parametrize("cfg", CFGS)
def test_nonfinite_activations_give_nan_rows(rng, cfg):
    """NaN / +-Inf in a token's activations: that token's whole output row is NaN (what F.linear
    gives for NaN), every other row is bit-identical to the call without the bad values. Through
    every tile configuration, split-K, and every public entry. At main the rows came out finite."""
    M, N, K, g = 9, 70, 640, 128
    dtype = DTYPES[cfg % 3]
    xt, _ = make_x(rng, M, K, dtype)
    xbad = _poison(xt, (0, 4, 8))
    clean = torch.where(torch.isfinite(xbad), xbad, torch.zeros_like(xbad))
    rows = torch.tensor([r not in (0, 4, 8) for r in range(M)], device=DEV)
    for name, public, forced, reference in _apis(rng, N, K, g):
        calls = [public] if forced is None else [lambda x, sp=sp, forced=forced: forced(x, cfg, sp) for sp in (1, 3)]
        for f in calls:
            y, y_clean = f(xbad), f(clean)
            assert torch.isnan(y[~rows]).all(), name
            assert torch.isfinite(y[rows]).all() and torch.equal(y[rows], y_clean[rows]), name
            if reference is not None:
                assert_close(y_clean, reference(clean.float().cpu().numpy()), dtype)


@pytest.mark.skipif(not _HAS_SM90, reason="no sm_90a device")
def test_nonfinite_activations_sm90_large_m(rng):
    M, N, K, g = 300, 136, 640, 128
    xt, parts, y_ref = _mixed(rng, M, N, K, g, torch.bfloat16)
    xt = _poison(xt, (3, 150, 299))
    y = _run(xt, parts, N, None, SM90, 1)
    rows = np.ones(M, bool)
    rows[[3, 150, 299]] = False
    assert torch.isnan(y[torch.from_numpy(~rows).to(DEV)]).all()
    assert_close(y[torch.from_numpy(rows).to(DEV)], y_ref[rows], torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cfg", [-1, 0, SM90])
def test_nonfinite_weight_scales(rng, bits, cfg):
    """A weight row with a NaN scale gives NaN in its output column for every token; with an
    infinite scale the column has no finite value (NaN or +-Inf, as on the CPU); the other
    columns are unaffected."""
    M, N, K, g = 6, 48, 384, 128
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    xt, x32 = make_x(rng, M, K, torch.float32)
    y_ref = ref.qlinear(x32, codes, scale, zero, g)
    s = np.array(scale, copy=True)
    s[3, 1], s[17, 0], s[40, 2] = np.nan, np.inf, -np.inf
    Wb = ops.QuantizedWeight(bits, g, (N, K), W.qweight, s, W.zero)
    y = _run(xt, [(Wb, None)], N, None, cfg, 1).double().cpu().numpy()
    y_cpu = np.asarray((ops.w4a8_linear if bits == 4 else ops.w8a8_linear)(x32, Wb), np.float64)
    assert np.isnan(y[:, 3]).all() and np.isnan(y_cpu[:, 3]).all()
    for c in (17, 40):
        assert not np.isfinite(y[:, c]).any() and not np.isfinite(y_cpu[:, c]).any()
    ok = np.setdiff1d(np.arange(N), [3, 17, 40])
    assert_close(torch.from_numpy(y[:, ok]), y_ref[:, ok], torch.float32)


@pytest.mark.parametrize("api", ["w4a8", "w8a8", "mixed", "module"])
def test_bad_input_matrix(rng, api):
    """The CPU op's bad-input matrix (test_hardening / test_nn) through each public GPU entry: dtype,
    shape, non-contiguous, empty M, 3-D and 1-D inputs. Each is a clear exception or a documented,
    tested result."""
    N, K, g = 40, 256, 128
    f = {n: pub for n, pub, _, _ in _apis(rng, N, K, g)}[api]
    x = torch.randn(6, K, device=DEV)
    y = f(x)
    assert y.shape == (6, N) and y.dtype == x.dtype and y.device == DEV
    for bad_dtype in (torch.int32, torch.float64, torch.int8):
        with pytest.raises(TypeError, match="x: expected dtype"):
            f(x.to(bad_dtype))
    for shape in ((6, K - 1), (6, K + 128), (K - 1,)):
        with pytest.raises(ValueError, match="x: expected last dimension"):
            f(torch.randn(shape, device=DEV))
    # non-contiguous x: the same result as its contiguous copy
    xt = torch.randn(K, 6, device=DEV).t()
    assert torch.equal(f(xt), f(xt.contiguous()))
    xs = torch.randn(12, K, device=DEV)[::2]
    assert torch.equal(f(xs), f(xs.contiguous()))
    # empty M, 3-D and 1-D inputs: the leading dimensions are kept
    assert f(x[:0]).shape == (0, N)
    assert f(x.reshape(2, 3, K)[:, :0]).shape == (2, 0, N)
    y3 = f(x.reshape(2, 3, K))
    assert y3.shape == (2, 3, N) and torch.equal(y3.reshape(6, N), y)
    assert f(x[0]).shape == (N,) and torch.equal(f(x[0]), f(x[:1])[0])
    if api == "module":
        with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
            f(x.cpu().numpy())
        f.to("cpu")  # the same layer on the CPU computes the same function
        y_cpu = f(x.cpu()).double().numpy()
        f.to(DEV)
        np.testing.assert_allclose(y_cpu, y.double().cpu().numpy(), rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_device_mismatch(rng):
    """x on the GPU, weights / bias / indices on the CPU: they are copied to x's device once (the
    packed layout is cached per device) and the result equals the all-on-GPU call. A prepared layer
    refuses x on another device."""
    N, K, g = 64, 256, 128
    W, codes, scale, zero = make_weight(rng, N, K, 4, g)  # NumPy arrays: host memory
    Wd = ops.QuantizedWeight(4, g, (N, K), *(torch.from_numpy(a).to(DEV) for a in (W.qweight, W.scale, W.zero)))
    bias = torch.randn(N)
    x = torch.randn(5, K, device=DEV)
    y_host = ops.w4a8_linear(x, W, bias)
    y_dev = ops.w4a8_linear(x, Wd, bias.to(DEV))
    assert torch.equal(y_host, y_dev) and y_host.device == DEV
    lin = cuda_ops.PreparedLinear([(W, None)], N, bias, DEV)
    with pytest.raises(ValueError, match="x: expected a tensor on"):
        lin(x.cpu())
    with pytest.raises(ValueError, match="bias: expected shape"):
        ops.w4a8_linear(x, W, torch.zeros(N + 1))
    for hostile in (1.5, [0.0] * N, object()):  # an AttributeError at main (found by fuzz/cuda_targets.py)
        with pytest.raises(TypeError, match="bias: expected a torch tensor or NumPy array"):
            ops.w4a8_linear(x, W, hostile)
    W8, *_ = make_weight(rng, N, K, 8, g)
    with pytest.raises(ValueError, match="expected a 4-bit weight"):
        ops.w4a8_linear(x, W8)
    Wk, *_ = make_weight(rng, 8, K + 128, 8, g)
    with pytest.raises(ValueError, match="same K"):
        ops.mixed_linear(x, W, Wk, torch.arange(N), torch.arange(N, N + 8))


# ----------------------------------------------------------------------------- fused SiLU-mul (gated MLP down)
DECODE_CFG = next(c for c in CFGS if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2] == "decode_gemv")


def _silu_mul_eager(gu, K):
    return torch.nn.functional.silu(gu[..., :K]) * gu[..., K:]


@pytest.mark.parametrize("dtype", DTYPES)
# K % 128 == 0: the flat kernel (384: an odd group count; 2500 x 2048: more groups than the grid's
# warps, so each warp steps on across rows of the [M, 2K] input); K = 1000: the half-warp kernel
@pytest.mark.parametrize(
    "M,N,K", [(1, 64, 1024), (5, 200, 2048), (16, 96, 768), (3, 40, 384), (2500, 32, 2048), (300, 136, 1000)]
)
def test_silu_mul_equals_the_unfused_ops(rng, dtype, M, N, K):
    """PreparedLinear.silu_mul(gu) quantizes silu(gate) * up as the eager ops round it in gu's dtype:
    the same codes, so the same y, bit for bit, as the layer called on F.silu(gate) * up; for every
    tile configuration the planner can take here (forced), and against float64."""
    parts, y_ref = _mixed_parts(rng, N, K, 128)
    bias = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(DEV)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    gu = (torch.randn((M, 2 * K), device=DEV) * 3).to(dtype)
    h = _silu_mul_eager(gu, K)
    assert torch.equal(lin.silu_mul(gu), lin(h))
    for cfg in (0, SM90) + ((DECODE_CFG,) if M <= 16 else ()):
        assert torch.equal(lin.silu_mul(gu, cfg=cfg), lin(h, cfg=cfg))
    assert torch.equal(lin.silu_mul(gu, cfg=SM90, splits=3), lin(h, cfg=SM90, splits=3))
    want = y_ref(h.float().cpu().numpy()) + bias.double().cpu().numpy()  # h exactly: it is in dtype
    assert_close(lin.silu_mul(gu), want, dtype)


def test_silu_mul_strided_input_leading_dims_and_fallback(rng):
    N, K = 80, 512
    parts, _ = _mixed_parts(rng, N, K, 128)
    lin = cuda_ops.PreparedLinear(parts, N, None, DEV)
    buf = torch.randn((2, 3, 2 * K + 16), device=DEV).to(torch.bfloat16)
    gu = buf[..., : 2 * K]  # rows not contiguous
    y = lin.silu_mul(gu)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, lin(_silu_mul_eager(gu, K)))
    flat = torch.randn(4 * 2 * K + 8, device=DEV).to(torch.bfloat16)
    odd = flat[1 : 1 + 4 * 2 * K].view(4, 2 * K)  # contiguous, 2 bytes past a 16-byte boundary
    assert torch.equal(lin.silu_mul(odd), lin(_silu_mul_eager(odd, K)))
    # a layer outside the default geometry (group size 64) takes the unfused ops
    parts64, _ = _mixed_parts(rng, N, K, 64)
    lin64 = cuda_ops.PreparedLinear(parts64, N, None, DEV)
    assert torch.equal(lin64.silu_mul(gu), lin64(_silu_mul_eager(gu, K)))
    with pytest.raises(ValueError, match="gu: expected last dimension 2 \\* K"):
        lin.silu_mul(buf)
    with pytest.raises(TypeError, match="gu: expected dtype"):
        lin.silu_mul(gu.to(torch.int32))
    # the C entry refuses what the Python side routes elsewhere
    c, sp, nbytes, _ = _cuda.plan_call(lin.handle, 4, -1, 0)
    with pytest.raises(ValueError, match="gu: must be 16-byte aligned"):
        _cuda.run_silu_mul(
            lin.handle,
            odd,
            torch.empty((4, N), device=DEV, dtype=torch.bfloat16),
            torch.empty(nbytes, dtype=torch.uint8, device=DEV),
            c,
            sp,
            0,
        )
    c, sp, nbytes, _ = _cuda.plan_call(lin64.handle, 6, -1, 0)
    with pytest.raises(ValueError, match="gu: the fused SiLU-mul takes layers of group size 128"):
        _cuda.run_silu_mul(
            lin64.handle,
            gu.reshape(6, 2 * K).contiguous(),
            torch.empty((6, N), device=DEV, dtype=torch.bfloat16),
            torch.empty(nbytes, dtype=torch.uint8, device=DEV),
            c,
            sp,
            0,
        )


def test_silu_mul_in_a_cuda_graph(rng):
    N, K, M = 120, 1024, 4
    parts, _ = _mixed_parts(rng, N, K, 128)
    lin = cuda_ops.PreparedLinear(parts, N, None, DEV)
    gu = torch.randn((M, 2 * K), device=DEV).to(torch.bfloat16)
    want = lin(_silu_mul_eager(gu, K))
    lin.silu_mul(gu)  # plans before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin.silu_mul(gu)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------- fused RMSNorm (q/k/v, gate/up)
def _exact_sum_x(M, K, dtype, seed):
    """Tokens whose sum of squares is exact in float32 in any order (multiples of 1/8 up to 2 in size:
    squares are multiples of 2^-6, sums below 2^18), so the fused kernel's sum equals torch's bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 17, (M, K), generator=g).float() / 8).to(DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 64, 1024), (5, 200, 4096), (16, 96, 2048), (300, 136, 1024)])
def test_rmsnorm_equals_the_eager_ops_when_the_sum_is_exact(rng, dtype, M, N, K):
    """PreparedLinear.rmsnorm(x, w, eps) normalizes x in its activation quantizer as Hugging Face's
    LlamaRMSNorm does (mixllm.nn.rmsnorm_reference): with a sum of squares that no order can round, the
    same codes, so y bit-identical to the layer called on the eager norm's output, on every tile
    configuration the planner can take here (forced); and against float64."""
    from mixllm.nn import rmsnorm_reference

    parts, y_ref = _mixed_parts(rng, N, K, 128)
    bias = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(DEV)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    x = _exact_sum_x(M, K, dtype, seed=M + K)
    w = (torch.randn(K, device=DEV) * 0.5 + 1).to(dtype)
    h = rmsnorm_reference(x, w, 1e-5)
    assert torch.equal(lin.rmsnorm(x, w, 1e-5), lin(h))
    for cfg in (0, SM90) + ((DECODE_CFG,) if M <= 16 else ()):
        assert torch.equal(lin.rmsnorm(x, w, 1e-5, cfg=cfg), lin(h, cfg=cfg))
    assert torch.equal(lin.rmsnorm(x, w, 1e-5, cfg=SM90, splits=3), lin(h, cfg=SM90, splits=3))
    assert_close(lin.rmsnorm(x, w, 1e-5), y_ref(h.float().cpu().numpy()) + bias.double().cpu().numpy(), dtype)
    # eps reaches the kernel: another eps, another result (the mean square here is about 1/3)
    assert not torch.equal(lin.rmsnorm(x, w, 0.5), lin(h))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", [(7, 1000), (64, 4096), (3, 20008), (2, 40008)])
def test_rmsnorm_close_to_the_eager_ops(rng, dtype, M, K):
    """Any input (a partial last group at K = 1000, eight chunks per thread at K = 20008, the eager ops past
    the kernel's range at K = 40008): y within a code's step of the eager ops' (the float32 sum of squares
    runs in another order, so an element's rounding to the dtype can differ), and a non-finite token gives
    a NaN row as the eager ops do."""
    from mixllm.nn import rmsnorm_reference

    N = 72
    parts, _ = _mixed_parts(rng, N, K, 128)
    lin = cuda_ops.PreparedLinear(parts, N, None, DEV)
    x, _ = make_x(rng, M, K, dtype)
    w = (torch.randn(K, device=DEV) * 0.5 + 1).to(dtype)
    want = lin(rmsnorm_reference(x, w, 1e-6)).float()
    got = lin.rmsnorm(x, w, 1e-6).float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    x[M // 2, K // 3] = float("nan")
    got = lin.rmsnorm(x, w, 1e-6).float()
    assert torch.isnan(got[M // 2]).all()
    rows = [i for i in range(M) if i != M // 2]
    assert torch.isfinite(got[rows]).all() and (got[rows] - want[rows]).abs().max() <= 0.02 * want.abs().max()


def test_rmsnorm_strided_input_fallback_and_errors(rng):
    from mixllm.nn import rmsnorm_reference

    N, K = 80, 512
    parts, _ = _mixed_parts(rng, N, K, 128)
    lin = cuda_ops.PreparedLinear(parts, N, None, DEV)
    w = (torch.randn(K, device=DEV) + 1).to(torch.bfloat16)
    buf = (torch.randint(-8, 9, (2, 3, K + 16)).float() / 4).to(DEV, torch.bfloat16)
    x = buf[..., :K]  # rows not contiguous; exact sums
    y = lin.rmsnorm(x, w, 1e-5)
    assert y.shape == (2, 3, N)
    assert torch.equal(y, lin(rmsnorm_reference(x, w, 1e-5)))
    flat = (torch.randint(-8, 9, (4 * K + 8,)).float() / 4).to(DEV, torch.bfloat16)
    odd = flat[1 : 1 + 4 * K].view(4, K)  # contiguous, 2 bytes past a 16-byte boundary
    assert torch.equal(lin.rmsnorm(odd, w, 1e-5), lin(rmsnorm_reference(odd, w, 1e-5)))
    wodd = flat[1 : 1 + K]  # the norm's weight misaligned too
    assert torch.equal(lin.rmsnorm(odd, wodd, 1e-5), lin(rmsnorm_reference(odd, wodd, 1e-5)))
    # a layer outside the default geometry (group size 64) takes the eager ops
    parts64, _ = _mixed_parts(rng, N, K, 64)
    lin64 = cuda_ops.PreparedLinear(parts64, N, None, DEV)
    xr = torch.randn(5, K, device=DEV).to(torch.bfloat16)
    assert torch.equal(lin64.rmsnorm(xr, w, 1e-5), lin64(rmsnorm_reference(xr, w, 1e-5)))
    with pytest.raises(ValueError, match="x: expected last dimension 512"):
        lin.rmsnorm(buf, w, 1e-5)
    with pytest.raises(ValueError, match="w: expected a tensor of shape \\(512,\\)"):
        lin.rmsnorm(xr, w[:100], 1e-5)
    with pytest.raises(TypeError, match="w: expected dtype torch.bfloat16"):
        lin.rmsnorm(xr, w.float(), 1e-5)
    # the C entry refuses what the Python side routes elsewhere, and a bad eps
    c, sp, nbytes, _ = _cuda.plan_call(lin.handle, 4, -1, 0)

    def entry(h, xx, ww, eps, n=4):
        out = torch.empty((n, N), device=DEV, dtype=torch.bfloat16)
        _cuda.run_rmsnorm(h, xx, out, torch.empty(nbytes, dtype=torch.uint8, device=DEV), c, sp, 0, ww, eps)

    with pytest.raises(ValueError, match="x: must be 16-byte aligned"):
        entry(lin.handle, odd, w, 1e-5)
    with pytest.raises(ValueError, match="w: must be 16-byte aligned"):
        entry(lin.handle, odd.clone(), wodd, 1e-5)
    with pytest.raises(ValueError, match="eps: expected a float in \\[0, 1\\]"):
        entry(lin.handle, odd.clone(), w, -1.0)
    with pytest.raises(ValueError, match="eps: expected a float in \\[0, 1\\]"):
        entry(lin.handle, odd.clone(), w, float("nan"))
    with pytest.raises(TypeError, match="w: expected the dtype of x"):
        entry(lin.handle, odd.clone(), w.half(), 1e-5)
    with pytest.raises(ValueError, match="x: the fused RMSNorm takes layers of group size 128"):
        entry(lin64.handle, odd.clone(), w, 1e-5)


def test_rmsnorm_in_a_cuda_graph(rng):
    from mixllm.nn import rmsnorm_reference

    N, K, M = 120, 1024, 4
    parts, _ = _mixed_parts(rng, N, K, 128)
    lin = cuda_ops.PreparedLinear(parts, N, None, DEV)
    x = _exact_sum_x(M, K, torch.bfloat16, seed=3)
    w = (torch.randn(K, device=DEV) + 1).to(torch.bfloat16)
    want = lin(rmsnorm_reference(x, w, 1e-5))
    lin.rmsnorm(x, w, 1e-5)  # plans before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin.rmsnorm(x, w, 1e-5)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_fused_rmsnorm_model_on_cuda(rng):
    """A tiny Llama on the GPU, fused with and without its RMSNorms in the quantizers: the same logits up to
    the sum of squares' order, eager and under torch.compile."""
    pytest.importorskip("transformers")
    from _models import tiny_llama

    from mixllm.fuse import DeferredRMSNorm, fuse_projections
    from mixllm.nn import MixedLinear

    def build():
        m = tiny_llama(seed=5, hidden_size=256, intermediate_size=512, head_dim=64).to(torch.bfloat16)
        g = np.random.default_rng(0)
        for mod in list(m.modules()):
            for name, lin in list(mod.named_children()):
                if isinstance(lin, torch.nn.Linear) and name != "lm_head":
                    rows = g.choice(lin.out_features, lin.out_features // 8, replace=False)
                    setattr(mod, name, MixedLinear.from_linear(lin, rows))
        return m.to(DEV).eval()  # the quantized layers keep their float32 scales

    plain, model = build(), build()
    fuse_projections(plain, rmsnorm=False)
    fuse_projections(model)
    assert sum(isinstance(m, DeferredRMSNorm) for m in model.modules()) == 2 * len(model.model.layers)
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        want = plain(ids).logits.float()
        got = model(ids).logits.float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        torch._dynamo.reset()
        comp = torch.compile(model, fullgraph=True)(ids).logits.float()
        assert (comp - got).abs().max() <= 0.05 * want.abs().max()
