"""Shared by the CUDA test files (imported only after they have skipped themselves where no GPU is present):
the device, tolerances, and the random weights / activations / comparison they all use."""

import numpy as np
import torch

from mixllm import ops

DEV = torch.device("cuda", torch.cuda.current_device())
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


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
