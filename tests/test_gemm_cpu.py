"""CPU quantized linear layers (docs/spec.md §2, §5) against the float64 two-step reference."""

import numpy as np
import pytest
import reference as ref
import torch

from mixllm import _C, ops

IMPLS = ops.cpu_impls()
SHAPES = [  # (M, N, K, g): tiles are 16 rows x 8 tokens; K tails, odd sizes, M = 1
    (1, 16, 128, 128),
    (1, 37, 300, 128),
    (3, 5, 7, 128),
    (9, 64, 256, 64),
    (17, 33, 1000, 128),
    (8, 16, 136, 40),
    (2, 300, 129, 128),
    (0, 16, 128, 128),
]


def make_weight(rng, N, K, bits, g):
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    codes, scale, zero = ops.quantize_weight(w, bits, g)
    return ops.QuantizedWeight.from_codes(codes, scale, zero, bits, g), codes, scale, zero


def assert_close(y, y_ref, x_scale=1.0):
    tol = 2e-5 * (np.abs(y_ref).max() + 1e-3)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,N,K,g", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_matches_reference(rng, impl, M, N, K, g, bits):
    W, codes, scale, zero = make_weight(rng, N, K, bits, g)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    fn = ops.w4a8_linear if bits == 4 else ops.w8a8_linear
    y = fn(x, W, bias, impl=impl)
    assert y.shape == (M, N) and y.dtype == np.float32
    if M:
        assert_close(y, ref.qlinear(x, codes, scale, zero, g, bias))


def _mixed_layer(rng, N, K, g):
    """A random layer with a random 10% (at least one) of its rows in 8-bit: the two parts, their row
    indices, and a float64 reference ``ref_fn(x, bias)`` of the whole layer in the original row order."""
    n8 = max(1, N // 10)
    perm = rng.permutation(N)
    idx8, idx4 = perm[:n8], perm[n8:]
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    q8, s8, _ = ops.quantize_weight(w[idx8], 8, g)
    q4, s4, z4 = ops.quantize_weight(w[idx4], 4, g)
    W8 = ops.QuantizedWeight.from_codes(q8, s8, None, 8, g)
    W4 = ops.QuantizedWeight.from_codes(q4, s4, z4, 4, g) if len(idx4) else None

    def ref_fn(x, bias):
        y = np.zeros((x.shape[0], N))
        y[:, idx8] = ref.qlinear(x, q8, s8, None, g, bias[idx8])
        if W4:
            y[:, idx4] = ref.qlinear(x, q4, s4, z4, g, bias[idx4])
        return y

    return W4, W8, (idx4 if W4 else None), idx8, ref_fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,N,K,g", SHAPES[:7])
def test_mixed_linear_original_order(rng, impl, M, N, K, g):
    W4, W8, idx4, idx8, ref_fn = _mixed_layer(rng, N, K, g)
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    y = ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl)
    assert_close(y, ref_fn(x, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_inputs_and_outputs(rng, dtype):
    W, codes, scale, zero = make_weight(rng, 48, 256, 4, 128)
    x = torch.from_numpy(rng.standard_normal((3, 2, 256)).astype(np.float32)).to(dtype)
    y = ops.w4a8_linear(x, W)
    assert y.dtype == dtype and y.shape == (3, 2, 48)
    y_ref = ref.qlinear(x.float().reshape(6, 256).numpy(), codes, scale, zero, 128).reshape(3, 2, 48)
    eps = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]
    np.testing.assert_allclose(y.float().numpy(), y_ref, atol=eps * np.abs(y_ref).max(), rtol=eps)


def test_non_contiguous_activation(rng):
    W, codes, scale, zero = make_weight(rng, 16, 128, 4, 128)
    x = torch.from_numpy(rng.standard_normal((128, 6)).astype(np.float32)).t()
    y = ops.w4a8_linear(x, W)
    np.testing.assert_allclose(y.numpy(), ops.w4a8_linear(x.contiguous(), W).numpy())


def test_poisoned_output_fully_written(rng):
    """Every output element is written (none left from the buffer's previous contents)."""
    W, *_ = make_weight(rng, 37, 300, 4, 128)
    x = rng.standard_normal((11, 300)).astype(np.float32)
    out = np.full((11, 37), np.nan, np.float32)
    _C.cpu_qlinear(x, [(W.cpu_blob(), 4, 37, None)], 128, None, out, 0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("M", [2, 300])  # few activations are quantized before the threads start, many by them
def test_nan_activation_raises(rng, M):
    W, *_ = make_weight(rng, 16, 128, 8, 128)
    x = np.zeros((M, 128), np.float32)
    x[M - 1, 5] = np.nan
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        ops.w8a8_linear(x, W)
    x[M - 1, 5] = np.inf
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        ops.mixed_linear(x, None, W, None, np.arange(16))


class TestBadArguments:
    def setup_method(self):
        rng = np.random.default_rng(0)
        self.W4, *_ = make_weight(rng, 16, 128, 4, 64)
        self.W8, *_ = make_weight(rng, 4, 128, 8, 64)
        self.x = np.ones((2, 128), np.float32)

    def test_wrong_k(self):
        with pytest.raises(ValueError, match="x: expected last dimension 128"):
            ops.w4a8_linear(np.ones((2, 127), np.float32), self.W4)

    def test_wrong_weight_type_or_bits(self):
        with pytest.raises(TypeError, match="weight: expected a mixllm.ops.QuantizedWeight"):
            ops.w4a8_linear(self.x, np.ones((16, 64), np.uint8))
        with pytest.raises(ValueError, match="weight: expected a 4-bit weight"):
            ops.w4a8_linear(self.x, self.W8)

    def test_int_input(self):
        with pytest.raises(TypeError, match="x: expected dtype"):
            ops.w4a8_linear(np.ones((2, 128), np.int64), self.W4)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
            ops.w4a8_linear(self.x, self.W4, np.ones(3, np.float32))

    def test_index_not_a_permutation(self):
        with pytest.raises(ValueError, match="out_index: must be a permutation"):
            ops.mixed_linear(self.x, self.W4, self.W8, np.arange(16), np.array([0, 1, 2, 3]))
        with pytest.raises(ValueError, match="out_index"):
            ops.mixed_linear(self.x, self.W4, self.W8, np.arange(16), np.array([16, 17, 18, 99]))

    def test_index_float_or_bool_dtype(self):
        # float / bool indices are refused, never truncated to integers (as on the GPU path)
        idx4, idx8 = np.arange(16), np.arange(16, 20)
        for bad in (np.float32, np.float64, bool):
            with pytest.raises(TypeError, match="out_index: expected an integer dtype"):
                ops.mixed_linear(self.x, self.W4, self.W8, idx4.astype(bad), idx8)
            with pytest.raises(TypeError, match="out_index: expected an integer dtype"):
                ops.mixed_linear(self.x, self.W4, self.W8, idx4, idx8.astype(bad))
        torch = pytest.importorskip("torch")
        with pytest.raises(TypeError, match="out_index: expected an integer dtype"):
            ops.mixed_linear(torch.ones(2, 128), self.W4, self.W8, torch.arange(16.0), torch.arange(16, 20))
        y = ops.mixed_linear(self.x, self.W4, self.W8, idx4.astype(np.int32), idx8.astype(np.uint8))
        np.testing.assert_array_equal(y, ops.mixed_linear(self.x, self.W4, self.W8, idx4, idx8))

    def test_index_wrong_length(self):
        with pytest.raises(ValueError, match="out_index: expected size 16"):
            ops.mixed_linear(self.x, self.W4, self.W8, np.arange(15), np.arange(15, 20))

    def test_bad_impl(self):
        with pytest.raises(ValueError, match="impl"):
            ops.w4a8_linear(self.x, self.W4, impl="sse9")

    def test_quantized_weight_validation(self):
        with pytest.raises(ValueError, match="qweight: expected shape"):
            ops.QuantizedWeight(
                4,
                64,
                (16, 128),
                np.zeros((16, 63), np.uint8),
                np.zeros((16, 2), np.float32),
                np.zeros((16, 2), np.uint8),
            )
        with pytest.raises(ValueError, match="bits"):
            ops.QuantizedWeight(
                3,
                64,
                (16, 128),
                np.zeros((16, 64), np.uint8),
                np.zeros((16, 2), np.float32),
                np.zeros((16, 2), np.uint8),
            )

    def test_wrong_blob_size_at_c_level(self):
        with pytest.raises(ValueError, match="blob"):
            _C.cpu_qlinear(self.x, [(np.zeros(10, np.uint8), 4, 16, None)], 64, None, np.zeros((2, 16), np.float32), 0)

    def test_cuda_path_without_gpu_is_clear(self):
        if torch.cuda.is_available():
            pytest.skip("has a GPU")
        with pytest.raises((RuntimeError, AssertionError)):
            ops.w4a8_linear(torch.ones(2, 128, device="cuda"), self.W4)


@pytest.mark.parametrize(
    "M,N,K,g",
    [(1, 37, 300, 128), (9, 64, 256, 64), (6, 33, 1000, 128), (5, 20, 136, 40), (3, 33, 768, 256), (4, 40, 1100, 512)],
)
def test_impls_bit_identical(rng, M, N, K, g):
    """Every implementation computes the same integer group sums and the same float steps in the same
    order (csrc/gemm_cpu.c), so outputs agree bit for bit, not just within a tolerance."""
    n8 = max(1, N // 10)
    perm = rng.permutation(N)
    idx8, idx4 = perm[:n8], perm[n8:]
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    W8 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx8], 8, g), 8, g)
    W4 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx4], 4, g), 4, g)
    x = (rng.standard_normal((M, K)) * 3).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    ys = {impl: ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)


@pytest.mark.parametrize("g", [256, 512])
def test_extreme_activation_sums_bit_identical(rng, g):
    """Groups of equal activations quantize to codes of +-127 everywhere, so every group's code sum is at
    its extreme (+-127 * g): the 4-bit zero-point product z * sum takes the int16 multiply-add of the
    VNNI path up to g = 256 and the int32 multiply above (csrc/gemm_cpu.c); both must stay exact."""
    M, N, K = 4, 40, 2 * g
    W4, W8, idx4, idx8, ref_fn = _mixed_layer(rng, N, K, g)
    sign = np.where(rng.random((M, K // g)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = np.repeat(sign * 3.0, g, axis=1)
    bias = rng.standard_normal(N).astype(np.float32)
    ys = {impl: ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)
    assert_close(ys["portable"], ref_fn(x, bias))


# Shapes that reach every blocking path of the SIMD kernels (csrc/gemm_cpu.c): K blocks with a partial
# last block (G = 11 groups; blocks of 4, 5 or 10 groups, by path and width), token passes and tiles
# with remainders (M = 70: a pass of 64 + 6, tiles of 4 + 2; M = 263 > 256), an odd number of 8-k steps
# per group (g = 40: 5 steps, one past a block of 4), a K tail inside the last group, and work items
# holding both 4- and 8-bit row blocks (N = 300).
BLOCKING_SHAPES = [
    (70, 40, 11 * 128 - 5, 128),
    (6, 300, 700, 128),
    (5, 37, 200, 40),
    (2, 16, 128, 128),
    (263, 20, 256, 128),
    (20, 40, 17 * 128 + 60, 128),  # VNNI: 4-bit K blocks of 16 groups + 2, 8-bit 8 + 8 + 2; last group partial
    (100, 40, 576, 128),  # VNNI, 2 threads, 4 row blocks: work items of 8-token chunks, the last one 4 tokens
]


@pytest.mark.parametrize("M,N,K,g", BLOCKING_SHAPES)
def test_blocking_paths_bit_identical_and_accurate(rng, M, N, K, g):
    W4, W8, idx4, idx8, ref_fn = _mixed_layer(rng, N, K, g)
    x = (rng.standard_normal((M, K)) * 2).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    ys = {impl: ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)
    assert_close(ys["portable"], ref_fn(x, bias))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_activation_several_tokens(rng, impl):
    """Strided x through the token-tiled paths (M >= 2), for both weight widths."""
    for bits in (4, 8):
        W, *_ = make_weight(rng, 40, 384, bits, 128)
        x = torch.from_numpy(rng.standard_normal((384, 2 * 11)).astype(np.float32)).t()[::2]  # [11, 384], strided
        assert not x.is_contiguous()
        fn = ops.w4a8_linear if bits == 4 else ops.w8a8_linear
        np.testing.assert_array_equal(fn(x, W, impl=impl).numpy(), fn(x.contiguous(), W, impl=impl).numpy())


def test_prepared_layer_refuses_bad_parts(rng):
    """ops.check_parts (shared by the CPU and CUDA prepared layers): clear errors naming `parts`."""
    W, *_ = make_weight(rng, 16, 256, 4, 128)
    W2, *_ = make_weight(rng, 16, 384, 4, 128)
    with pytest.raises(ValueError, match="parts: at least one"):
        ops.PreparedCPULinear([], 16)
    with pytest.raises(TypeError, match="parts: expected mixllm.ops.QuantizedWeight"):
        ops.PreparedCPULinear([(np.zeros((16, 256)), None)], 16)
    with pytest.raises(ValueError, match="parts: every part needs the same K"):
        ops.PreparedCPULinear([(W, np.arange(16)), (W2, np.arange(16, 32))], 32)
    with pytest.raises(ValueError, match="n_out=20"):
        ops.PreparedCPULinear([(W, None)], 20)
    assert ops.check_parts([(W, None)], 16) == (256, 128)


def _sorted_mixed_layer(rng, N, K, g, n8, contiguous=False):
    """Like _mixed_layer, with each part's rows in ascending output order as MixedLinear stores them
    (the VNNI stores then take a masked store or an expand per block instead of a scatter); with
    ``contiguous`` the 8-bit rows are the first n8 outputs, so every 4-bit block's columns are
    consecutive."""
    idx8 = np.arange(n8) if contiguous else np.sort(rng.permutation(N)[:n8])
    idx4 = np.setdiff1d(np.arange(N), idx8)
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    q8, s8, _ = ops.quantize_weight(w[idx8], 8, g)
    q4, s4, z4 = ops.quantize_weight(w[idx4], 4, g)
    W8 = ops.QuantizedWeight.from_codes(q8, s8, None, 8, g)
    W4 = ops.QuantizedWeight.from_codes(q4, s4, z4, 4, g)

    def ref_fn(x, bias):
        y = np.zeros((x.shape[0], N))
        y[:, idx8] = ref.qlinear(x, q8, s8, None, g, bias[idx8])
        y[:, idx4] = ref.qlinear(x, q4, s4, z4, g, bias[idx4])
        return y

    return W4, W8, idx4, idx8, ref_fn


# The VNNI driver (csrc/gemm_cpu.c): K blocks of up to 42 (4-bit) / 22 (8-bit) groups of 128, so G = 46
# has a partial last block on both; M = 19 gives token tiles of 8 + 8 + 3 (the weight prefetch cursor,
# per-tile stores), M = 263 a second pass of 256 tokens, M = 1 and 5 a single narrow tile; N = 77 and 300
# end in partial row blocks; K = 45 * 128 + 37 ends in a partial group.
VNNI_SHAPES = [
    (19, 77, 45 * 128 + 37, 128),
    (263, 40, 300, 128),
    (5, 300, 1000, 128),
    (1, 77, 2000, 128),
    (9, 50, 640, 64),
]


@pytest.mark.parametrize("M,N,K,g", VNNI_SHAPES)
@pytest.mark.parametrize("contiguous", [False, True])
def test_sorted_mixed_layers_bit_identical_and_accurate(rng, M, N, K, g, contiguous):
    W4, W8, idx4, idx8, ref_fn = _sorted_mixed_layer(rng, N, K, g, max(1, N // 10), contiguous)
    x = (rng.standard_normal((M, K)) * 2).astype(np.float32)
    for bias in (None, rng.standard_normal(N).astype(np.float32)):
        ys = {impl: ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl) for impl in IMPLS}
        for impl, y in ys.items():
            np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)
        assert_close(ys["portable"], ref_fn(x, np.zeros(N, np.float32) if bias is None else bias))


@pytest.mark.parametrize("M,N,K,g", VNNI_SHAPES)
def test_all_8bit_layer_bit_identical_and_accurate(rng, M, N, K, g):
    """A layer of 8-bit parts only (the VNNI path shifts the weights to u8 and takes 128 * sum(a) off,
    as in mixed layers) must give the portable path's bits."""
    W, codes, scale, zero = make_weight(rng, N, K, 8, g)
    x = (rng.standard_normal((M, K)) * 2).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    ys = {impl: ops.w8a8_linear(x, W, bias, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)
    assert_close(ys["portable"], ref.qlinear(x, codes, scale, zero, g, bias))
    # two 8-bit parts with an output index: the same bits as one part
    perm = rng.permutation(N)
    a, b = np.sort(perm[: N // 2]), np.sort(perm[N // 2 :])
    W8a = ops.QuantizedWeight.from_codes(codes[a], scale[a], None, 8, g)
    W8b = ops.QuantizedWeight.from_codes(codes[b], scale[b], None, 8, g)
    for impl in IMPLS:
        f = ops.PreparedCPULinear([(W8a, torch.from_numpy(a)), (W8b, torch.from_numpy(b))], N, impl=impl)
        y2 = f(torch.from_numpy(x)).numpy() + bias
        np.testing.assert_allclose(y2, ys["portable"], rtol=1e-6, atol=1e-6 * np.abs(ys["portable"]).max())


@pytest.mark.parametrize("g", [128, 256, 512])
def test_all_8bit_extreme_activation_sums_bit_identical(rng, g):
    """An 8-bit layer with every group's code sum at its extreme (+-127 * g): the VNNI path's per-token
    term 128 * sum(a) takes the int16 multiply-add up to g = 256 and the int32 path above."""
    M, N, K = 9, 40, 3 * g
    W, codes, scale, zero = make_weight(rng, N, K, 8, g)
    sign = np.where(rng.random((M, K // g)) < 0.5, -1.0, 1.0).astype(np.float32)
    x = np.repeat(sign * 3.0, g, axis=1)
    ys = {impl: ops.w8a8_linear(x, W, None, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=impl)
    assert_close(ys["portable"], ref.qlinear(x, codes, scale, zero, g, np.zeros(N, np.float32)))


@pytest.mark.parametrize("bits,N,K,g", [(4, 40, 300, 128), (8, 40, 300, 128), (8, 16, 136, 40), (4, 16, 136, 40)])
def test_blob_size(bits, N, K, g):
    """Sections (csrc/layout_cpu.h): codes, then 4-bit zero points and scales (128 bytes), 8-bit scales
    alone (64 bytes); whole cache lines."""
    Lp = (g + 7) // 8 * 8
    code = Lp // (8 if bits == 4 else 4) * 64
    section = code + (128 if bits == 4 else 64)
    assert section % 64 == 0
    assert _C.cpu_blob_bytes(bits, N, K, g) == -(-N // 16) * -(-K // g) * section


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_several_tiles(rng, dtype):
    """Non-float32 outputs through the per-tile stores of the VNNI path (M = 19: three token tiles)."""
    W4, W8, idx4, idx8, _ = _sorted_mixed_layer(rng, 50, 640, 128, 5)
    x = torch.from_numpy(rng.standard_normal((19, 640)).astype(np.float32)).to(dtype)
    ys = {
        impl: ops.PreparedCPULinear([(W4, torch.from_numpy(idx4)), (W8, torch.from_numpy(idx8))], 50, impl=impl)(x)
        for impl in IMPLS
    }
    for impl, y in ys.items():
        assert y.dtype == dtype
        assert torch.equal(y.view(torch.int16), ys["portable"].view(torch.int16)), impl


@pytest.mark.parametrize("M", range(1, 17))
def test_every_token_tile_width_bit_identical(rng, M):
    """The VNNI tiles are compiled per token count MB and tile width TW (csrc/gemm_cpu.c: rb_avx512):
    M < 8 is one narrow tile (TW = MB = M), M = 9..15 a full tile of 8 and a remainder of M - 8 tokens
    laid out 8 wide (TW = 8); 4-bit, 8-bit and mixed layers give the portable path's bits."""
    N, K, g = 40, 300, 128
    x = (rng.standard_normal((M, K)) * 2).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    for bits in (4, 8):
        W, codes, scale, zero = make_weight(rng, N, K, bits, g)
        fn = ops.w4a8_linear if bits == 4 else ops.w8a8_linear
        ys = {impl: fn(x, W, bias, impl=impl) for impl in IMPLS}
        for impl, y in ys.items():
            np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=f"{impl} {bits}")
        assert_close(ys["portable"], ref.qlinear(x, codes, scale, zero, g, bias))
    W4, W8, idx4, idx8, ref_fn = _sorted_mixed_layer(rng, N, K, g, 5, False)
    ys = {impl: ops.mixed_linear(x, W4, W8, idx4, idx8, bias, impl=impl) for impl in IMPLS}
    for impl, y in ys.items():
        np.testing.assert_array_equal(y.view(np.uint32), ys["portable"].view(np.uint32), err_msg=f"{impl} mixed")
    assert_close(ys["portable"], ref_fn(x, bias))
