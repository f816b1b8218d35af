"""The decode GEMM (cuda/w4a8_decode.cu, configuration MIXC_CFG_DECODE) against the float64
reference and the CPU op: tails in M, N and K, group sizes below, at and above the 128-column
stage, float32/float16/bfloat16, every forced warp count, outputs poisoned with NaN, the
planner's choice, determinism. Skipped without the extension or a GPU.
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

DECODE = next(c for c in range(_cuda.NCFG) if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2] == "decode_gemv")
# the wgmma kernel where it runs (a forced configuration falls back elsewhere), else None
SM90 = next((c for c in range(_cuda.NCFG) if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2] == "sm90_wgmma"), None)
SM90_PAIRS = next(
    (c for c in range(_cuda.NCFG) if _cuda.plan(DEV.index, 1, (16,), 128, c, 1)[2] == "sm90_wgmma_pairs"), None
)


def mixed_layer(rng, N, K, g, n8=None, bias=True):
    n8 = max(1, N // 10) if n8 is None else n8
    perm = rng.permutation(N)
    W4, c4, s4, z4 = make_weight(rng, N - n8, K, 4, g)
    W8, c8, s8, _ = make_weight(rng, n8, K, 8, g)
    i4 = torch.from_numpy(perm[: N - n8].copy()).to(DEV)
    i8 = torch.from_numpy(perm[N - n8 :].copy()).to(DEV)
    b = rng.standard_normal(N).astype(np.float32) if bias else None

    def reference(x32):
        y = np.zeros((x32.shape[0], N))
        y[:, perm[: N - n8]] = ref.qlinear(x32, c4, s4, z4, g)
        y[:, perm[N - n8 :]] = ref.qlinear(x32, c8, s8, None, g)
        return y + (b if bias else 0.0)

    parts = [(W4, i4), (W8, i8)]
    return parts, (torch.from_numpy(b).to(DEV) if bias else None), reference


@pytest.mark.parametrize(
    "M,N,K,g",
    [
        (1, 16, 128, 128),
        (1, 300, 1000, 128),
        (3, 37, 300, 128),
        (8, 130, 1000, 128),
        (13, 200, 520, 64),
        (16, 96, 1200, 256),
        (31, 70, 640, 100),
        (33, 150, 384, 128),
        (64, 40, 1500, 128),
        (70, 48, 256, 128),
    ],
)
def test_decode_mixed_matches_reference(rng, M, N, K, g):
    parts, bias, reference = mixed_layer(rng, N, K, g)
    for dtype in DTYPES:
        xt, x32 = make_x(rng, M, K, dtype)
        y = cuda_ops.qlinear(xt, parts, N, bias, (M,), cfg=DECODE)
        assert y.shape == (M, N) and y.dtype == dtype
        assert_close(y, reference(x32), dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kw", [1, 2, 3, 8, 16, 33, 35, 40])
def test_decode_every_warp_count(rng, bits, kw):
    """Forced warps per row tile (the 'splits' of this configuration; from 33 on two 4-bit tiles
    per block, kw - 32 warps each), one part, no out_index; more warps than stages leaves some
    warps without work, an odd tile count half of the last paired block."""
    M, N, K, g = 5, 50, 1000, 128
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    xt, x32 = make_x(rng, M, K, torch.float32)
    y = cuda_ops.qlinear(xt, [(W, None)], N, None, (M,), cfg=DECODE, splits=kw)
    assert_close(y, ref.qlinear(x32, codes, scale, zero, g), torch.float32)
    fn = ops.w4a8_linear if bits == 4 else ops.w8a8_linear
    assert_close(y, np.asarray(fn(x32, W), np.float64), torch.float32)  # the CPU op: same function


@pytest.mark.parametrize("M", [1, 7, 16, 20, 40])
@pytest.mark.parametrize("case", ["q15_z0", "q0_z15", "random_extremes"])
@pytest.mark.parametrize("kernel", ["decode", "sm90", "sm90_pairs"])
def test_decode_extreme_codes_and_zero_points(rng, M, case, kernel):
    """The decode kernel's 4-bit tiles multiply the raw codes (unsigned) and subtract z * sum(a) as a
    second MMA of -z; the wgmma kernel's few-token tiles form (q - z) fragments: the largest sums
    (codes 15, zero 0, activations at +-127) and every zero point 0..15, against the float64
    reference, with a partial last group."""
    cfg = {"decode": DECODE, "sm90": SM90, "sm90_pairs": SM90_PAIRS}[kernel]
    if cfg is None:
        pytest.skip("no sm_90a device")
    N, K, g = 48, 1000, 128
    G = -(-K // g)
    if case == "q15_z0":
        codes, zero = np.full((N, K), 15, np.uint8), np.zeros((N, G), np.uint8)
    elif case == "q0_z15":
        codes, zero = np.zeros((N, K), np.uint8), np.full((N, G), 15, np.uint8)
    else:
        codes = rng.choice(np.array([0, 15], np.uint8), size=(N, K))
        zero = rng.integers(0, 16, size=(N, G)).astype(np.uint8)
    scale = (rng.random((N, G)).astype(np.float32) + 0.5) * 0.01
    W = ops.QuantizedWeight.from_codes(codes, scale, zero, 4, g)
    # every activation at +-max|x| of its group: codes +-127
    x = np.where(rng.random((M, K)) < 0.5, -1.0, 1.0).astype(np.float32)
    if case == "q15_z0":
        x = np.abs(x)
    xt = torch.from_numpy(x).to(DEV)
    y = cuda_ops.qlinear(xt, [(W, None)], N, None, (M,), cfg=cfg)
    assert_close(y, ref.qlinear(x, codes, scale, zero, g), torch.float32)


@pytest.mark.parametrize("M", [1, 9, 40])
def test_decode_poisoned_outputs_fully_written(rng, M):
    N, K, g = 90, 700, 128
    parts, bias, reference = mixed_layer(rng, N, K, g)
    xt, x32 = make_x(rng, M, K, torch.bfloat16)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    c, sp, nbytes, name = lin.plan(M, DECODE)
    assert c == DECODE and name == "decode_gemv"
    y = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    scratch = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV)
    _cuda.run(lin.handle, xt, y, scratch, c, sp, 0)
    torch.cuda.synchronize()
    assert_close(y, reference(x32), torch.bfloat16)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("kw", [2, 5, 34, 37])
def test_decode_mixed_forced_layouts(rng, M, kw):
    """A mixed layer with an odd number of 4-bit tiles (7) and one 8-bit tile, each block layout."""
    N, K, g = 110, 1300, 128
    parts, bias, reference = mixed_layer(rng, N, K, g, n8=11)
    xt, x32 = make_x(rng, M, K, torch.float16)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    c, sp, nbytes, _ = lin.plan(M, DECODE, kw)
    assert (c, sp) == (DECODE, kw)
    assert nbytes < M * 1408 + M * 11 * 4 + 64  # codes and scales only: no split-K workspace
    assert_close(lin(xt, DECODE, kw), reference(x32), torch.float16)


def test_decode_deterministic_and_agrees_with_mma_path(rng):
    M, N, K, g = 4, 260, 2048, 128
    parts, bias, reference = mixed_layer(rng, N, K, g)
    xt, x32 = make_x(rng, M, K, torch.float32)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    y1, y2 = lin(xt, DECODE), lin(xt, DECODE)
    assert torch.equal(y1, y2)
    y_mma = lin(xt, 0)  # the mma.sync 8-token tile
    assert_close(y1, reference(x32), torch.float32)
    torch.testing.assert_close(y1, y_mma, rtol=1e-5, atol=1e-4 * float(y_mma.abs().max()))


def test_planner_picks_decode_for_few_tokens():
    for M in (1, 8, 16):
        c, kw, _ = _cuda.plan(DEV.index, M, (12903, 1433), 4096, -1, 0)
        if M == 16 and _cuda.plan(DEV.index, 16, (12903, 1433), 4096, -1, 0)[2].startswith("sm90_wgmma"):
            continue  # 9-16 tokens on a layer of this size: the wgmma kernel's 16-token tile (tests/test_cuda.py)
        assert c == DECODE and 1 <= kw <= 8
    for Ns, Kp in (((25805, 2867), 8192), ((7373, 819), 28672)):  # 70B-sized: decode up to 8 tokens
        for M in (1, 8):
            c, kw, _ = _cuda.plan(DEV.index, M, Ns, Kp, -1, 0)
            assert c == DECODE and 1 <= kw <= 8
        assert _cuda.plan(DEV.index, 16, Ns, Kp, -1, 0)[0] != DECODE
    assert _cuda.plan(DEV.index, 32, (4096,), 4096, -1, 0)[0] != DECODE
    assert _cuda.plan(DEV.index, 4096, (14336,), 4096, -1, 0)[0] != DECODE
    # forced: clamped to the most warps per block (16 from 1 to 16 tokens, 8 above)
    assert _cuda.plan(DEV.index, 1, (4096,), 4096, DECODE, 20)[:2] == (DECODE, 16)
    assert _cuda.plan(DEV.index, 1, (4096,), 4096, DECODE, 99)[:2] == (DECODE, 40)
    assert _cuda.plan(DEV.index, 64, (4096,), 4096, DECODE, 99)[:2] == (DECODE, 36)
    assert _cuda.plan(DEV.index, 64, (4096,), 4096, DECODE, 12)[:2] == (DECODE, 8)


def test_decode_graph_capture(rng):
    """The decode path inside a CUDA graph (as in graph decode) gives the eager result."""
    M, N, K, g = 1, 512, 1024, 128
    parts, bias, reference = mixed_layer(rng, N, K, g)
    lin = cuda_ops.PreparedLinear(parts, N, bias, DEV)
    x = make_x(rng, M, K, torch.bfloat16)[0]
    y_eager = lin(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x)
    torch.cuda.current_stream().wait_stream(s)
    g_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_):
        y = lin(x)
    x2, x2_32 = make_x(rng, M, K, torch.bfloat16)
    x.copy_(x2)
    g_.replay()
    torch.cuda.synchronize()
    assert_close(y, reference(x2_32), torch.bfloat16)
    assert not torch.equal(y, y_eager)
