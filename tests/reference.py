"""NumPy oracles for the C and CUDA paths (docs/spec.md §1-3).

Quantizer references compute in float32 with the same operations as csrc/quant.c
(true division, round-half-to-even), so integer codes must match exactly; the GEMM and
salience references accumulate in float64.
"""

import numpy as np


def ngroups(K, g):
    return (K + g - 1) // g


def asym_quant(w, bits, g):
    w = np.asarray(w, np.float32)
    N, K = w.shape
    G = ngroups(K, g)
    qmax = np.float32(2**bits - 1)
    q = np.zeros((N, K), np.uint8)
    scale = np.zeros((N, G), np.float32)
    zero = np.zeros((N, G), np.uint8)
    for j in range(G):
        blk = w[:, j * g : (j + 1) * g]
        lo = np.minimum(blk.min(1), np.float32(0))
        hi = np.maximum(blk.max(1), np.float32(0))
        s = ((hi - lo) / qmax).astype(np.float32)
        dead = ~(s > 0)
        s = np.where(dead, np.float32(1), s).astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, qmax).astype(np.float32)
        z = np.where(dead, np.float32(0), z)
        q[:, j * g : (j + 1) * g] = np.clip(np.rint(blk / s[:, None]) + z[:, None], 0, qmax)
        scale[:, j], zero[:, j] = s, z
    return q, scale, zero


def sym_quant(w, bits, g):
    w = np.asarray(w, np.float32)
    N, K = w.shape
    G = ngroups(K, g)
    qmax = np.float32(2 ** (bits - 1) - 1)
    q = np.zeros((N, K), np.int8)
    scale = np.zeros((N, G), np.float32)
    for j in range(G):
        blk = w[:, j * g : (j + 1) * g]
        s = (np.abs(blk).max(1) / qmax).astype(np.float32)
        s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        q[:, j * g : (j + 1) * g] = np.clip(np.rint(blk / s[:, None]), -qmax, qmax)
        scale[:, j] = s
    return q, scale


def dequant(q, scale, zero, g):
    q = q.astype(np.float64)
    K = q.shape[1]
    cols = np.arange(K) // g
    z = 0.0 if zero is None else zero.astype(np.float64)[:, cols]
    return (q - z) * scale.astype(np.float64)[:, cols]


def act_quant(x, g):
    return sym_quant(np.asarray(x, np.float32), 8, g)


def qlinear(x, q, scale, zero, g, bias=None):
    """Two-step dequantized GEMM in float64: sum_j Sw Sa * sum_k (Wq - z) Aq."""
    aq, sa = act_quant(x, g)
    K = x.shape[1]
    G = ngroups(K, g)
    y = np.zeros((x.shape[0], q.shape[0]), np.float64)
    for j in range(G):
        sl = slice(j * g, (j + 1) * g)
        wq = q[:, sl].astype(np.float64) - (0.0 if zero is None else zero[:, j : j + 1].astype(np.float64))
        y += (
            (aq[:, sl].astype(np.float64) @ wq.T) * sa[:, j : j + 1].astype(np.float64) * scale[:, j].astype(np.float64)
        )
    if bias is not None:
        y += bias.astype(np.float64)
    return y


def salience(grads, delta):
    """sum_d |t_d + t_d^2/2| with t_d = rowwise dot(grad_d, delta)."""
    acc = np.zeros(delta.shape[0])
    for gr in grads:
        t = (gr.astype(np.float64) * delta.astype(np.float64)).sum(1)
        acc += np.abs(t + 0.5 * t * t)
    return acc


def gptq(w, H, bits, g, damp=0.01):
    """Textbook GPTQ (no blocking, natural group order, no clip), asymmetric, float64."""
    W = np.asarray(w, np.float64).copy()
    N, K = W.shape
    H = np.asarray(H, np.float64).copy()
    dead = np.diag(H) <= 0
    mean = np.where(dead, 1.0, np.diag(H)).mean()
    H[dead, dead] = 1.0
    W[:, dead] = 0
    H += damp * mean * np.eye(K)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    G = ngroups(K, g)
    q = np.zeros((N, K), np.uint8)
    scale = np.zeros((N, G), np.float32)
    zero = np.zeros((N, G), np.uint8)
    for i in range(K):
        j = i // g
        if i % g == 0:
            _, s, z = asym_quant(W[:, i : i + g].astype(np.float32), bits, g)
            scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
        s, z = scale[:, j], zero[:, j].astype(np.float32)
        qmax = 2**bits - 1
        c = np.clip(np.rint(W[:, i].astype(np.float32) / s) + z, 0, qmax)
        q[:, i] = c
        dq = (c - z).astype(np.float64) * s
        err = (W[:, i] - dq) / U[i, i]
        W[:, i + 1 :] -= np.outer(err, U[i, i + 1 :])
    return q, scale, zero
