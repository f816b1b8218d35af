"""Concurrency: the C ops release the GIL around their loops, so several Python threads run them
at once (each with its own OpenMP team). Results must be bit-identical to serial calls."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mixllm import ops

THREADS = 8
ROUNDS = 3  # each thread calls its op this many times, interleaving with the others


def _run_concurrently(fns):
    """Run every fn from its own thread, all released at once; returns their results in order."""
    start = threading.Barrier(len(fns))

    def go(fn):
        start.wait()
        return [fn() for _ in range(ROUNDS)]

    with ThreadPoolExecutor(len(fns)) as ex:
        return list(ex.map(go, fns))


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif a is None:
        assert b is None
    else:
        a = a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        b = b.float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def _check(fns):
    """Every fn's results from the concurrent rounds equal its serial result; returns how many
    results were compared (len(fns) x ROUNDS when every thread ran all its rounds)."""
    serial = [fn() for fn in fns]
    compared = 0
    for i, results in enumerate(_run_concurrently(fns)):
        for r in results:
            _same(r, serial[i])
            compared += 1
    return compared


def test_quantize_weight_threads(rng):
    ws = [rng.standard_normal((96, 300)).astype(np.float32) for _ in range(THREADS)]
    fns = [lambda w=w, i=i: ops.quantize_weight(w, bits=(4, 8, 3, 2)[i % 4], group_size=128) for i, w in enumerate(ws)]
    assert _check(fns) == len(fns) * ROUNDS


def test_quantize_activation_threads(rng):
    xs = [rng.standard_normal((64, 384)).astype(np.float32) for _ in range(THREADS)]
    xs[1] = torch.from_numpy(xs[1]).to(torch.bfloat16)
    xs[2] = xs[2].astype(np.float16)
    fns = [lambda x=x: ops.quantize_activation(x, 128) for x in xs]
    assert _check(fns) == len(fns) * ROUNDS


def test_gptq_threads(rng):
    K = 96
    args = []
    for _ in range(THREADS):
        X = rng.standard_normal((256, K))
        args.append((rng.standard_normal((40, K)).astype(np.float32), 2 * X.T @ X / len(X)))
    fns = [
        lambda w=w, H=H, i=i: ops.gptq_quantize(w, H, bits=4 if i % 2 else 8, group_size=32, clip_grid=5)
        for i, (w, H) in enumerate(args)
    ]
    assert _check(fns) == len(fns) * ROUNDS


def test_salience_accumulate_threads(rng):
    grads = [rng.standard_normal((128, 256)).astype(np.float32) for _ in range(THREADS)]
    deltas = [rng.standard_normal((128, 256)).astype(np.float32) * 1e-2 for _ in range(THREADS)]
    # in place: each call gets a fresh accumulator that already holds something
    fns = [lambda g=g, d=d: ops.salience_accumulate(np.full(128, 0.5), g, d) for g, d in zip(grads, deltas)]
    assert _check(fns) == len(fns) * ROUNDS


@pytest.mark.parametrize("impl", ["auto", "portable"])
def test_linear_threads(rng, impl):
    if impl not in ops.cpu_impls() + ["auto"]:
        pytest.skip(f"{impl} not available")
    K, N4, N8 = 256, 48, 16
    W = rng.standard_normal((N4 + N8, K)).astype(np.float32)
    perm = rng.permutation(N4 + N8)
    w4 = ops.QuantizedWeight.quantize(W[perm[:N4]], 4, 128)
    w8 = ops.QuantizedWeight.quantize(W[perm[N4:]], 8, 128)
    w4.cpu_blob(), w8.cpu_blob()  # the prepacked layout is shared by all threads
    idx4, idx8 = perm[:N4].astype(np.int64), perm[N4:].astype(np.int64)
    bias = rng.standard_normal(N4 + N8).astype(np.float32)
    xs = [rng.standard_normal((m, K)).astype(np.float32) for m in (1, 3, 8, 17, 33, 5, 64, 2)]
    fns = []
    for i, x in enumerate(xs):
        if i % 3 == 0:
            fns.append(lambda x=x: ops.w4a8_linear(x, w4, impl=impl))
        elif i % 3 == 1:
            fns.append(lambda x=x: ops.w8a8_linear(x, w8, bias=bias[perm[N4:]], impl=impl))
        else:
            fns.append(lambda x=x: ops.mixed_linear(x, w4, w8, idx4, idx8, bias=bias, impl=impl))
    assert _check(fns) == len(fns) * ROUNDS


def test_mixed_ops_threads(rng):
    """Different ops at the same time, sharing read-only inputs."""
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    qw = ops.QuantizedWeight.quantize(w, 4, 128)
    qw.cpu_blob()
    fns = [
        lambda: ops.quantize_weight(w, 4, 128),
        lambda: ops.quantize_activation(x, 128),
        lambda: ops.w4a8_linear(x, qw),
        lambda: ops.gptq_quantize(w, None, 4, 128),
        lambda: ops.pack_int4(ops.quantize_weight(w, 4, 128)[0]),
        lambda: qw.dequantize(),
        lambda: ops.salience_accumulate(np.zeros(64), w, w),
        lambda: ops.quantize_weight(w, 8, 64),
    ]
    assert _check(fns) == len(fns) * ROUNDS
