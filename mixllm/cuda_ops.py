"""CUDA side of :mod:`mixllm.ops`: glue between torch CUDA tensors and ``mixllm._cuda``.

``mixllm.ops`` dispatches here when ``x`` is a CUDA tensor; nothing here is meant to be
called directly. Every launch goes to the caller's current stream, and every buffer is a
torch allocation (so the ops work inside CUDA graph capture). The GEMM layout of a weight
(cuda/w8a8.cu) is built on first use per device and cached in ``weight._packed["cuda:<i>"]``.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _cuda

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_checked_index = {}  # (data_ptr, version, n_out, ...) of validated out_index sets


def _stream(device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _to(a, device, dtype):
    t = torch.as_tensor(a) if isinstance(a, np.ndarray) else a
    return t.detach().to(device=device, dtype=dtype).contiguous()


def quantize_activation(x2d, group_size):
    """int8 codes [M, K] and float32 scales [M, G] of ``x2d`` (CUDA, float32/16/bf16)."""
    if x2d.dtype not in _FLOATS:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x2d.dtype}")
    M, K = x2d.shape
    G = (K + group_size - 1) // group_size
    q = torch.empty((M, K), dtype=torch.int8, device=x2d.device)
    scale = torch.empty((M, G), dtype=torch.float32, device=x2d.device)
    if M and K:
        _cuda.act_quant(x2d, group_size, group_size, q, scale, 1, _stream(x2d.device))
    return q, scale


def packed_weight(weight, device):
    """The GEMM layout of ``weight`` (a QuantizedWeight) on ``device``, built once."""
    device = torch.device(device)
    key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    entry = weight._packed.get(key)
    if entry is None:
        N, K = weight.shape
        g = min(weight.group_size, K)
        G, gp, spg, Kp = _cuda.geometry(K, g)
        qdtype = torch.uint8 if weight.bits == 4 else torch.int8
        q = _to(weight.qweight, device, qdtype)
        scale = _to(weight.scale, device, torch.float32)
        zero = _to(weight.zero, device, torch.uint8) if weight.bits == 4 else None
        nt = (N + 15) // 16
        wpack = torch.empty(nt * 16 * Kp * weight.bits // 8, dtype=torch.uint8, device=device)
        meta = torch.empty(nt * G * 80, dtype=torch.uint8, device=device)
        if N:
            _cuda.pack_weight(q, scale, zero, weight.bits, K, g, wpack, meta, _stream(device))
        entry = {"wpack": wpack, "meta": meta, "g": g, "Kp": Kp}
        weight._packed[key] = entry
    return entry


def _out_index(idx, N, device):
    if idx is None:
        return None
    t = torch.as_tensor(idx) if isinstance(idx, np.ndarray) else idx
    t = t.detach().to(device=device, dtype=torch.int64).contiguous()
    if tuple(t.shape) != (N,):
        raise ValueError(f"out_index: expected shape ({N},), got {tuple(t.shape)}")
    return t


def _check_permutation(idxs, n_out):
    """out_index sets must cover every column once (the GEMM writes each column once and
    reads nothing back); checked on the GPU once per index tensor version."""
    key = tuple((i.data_ptr(), i._version, i.numel()) for i in idxs) + (n_out,)
    if key in _checked_index:
        return
    allidx = torch.cat(idxs)
    ok = allidx.numel() == n_out and bool(
        ((allidx >= 0) & (allidx < n_out)).all() and torch.bincount(allidx.clamp(0, max(n_out - 1, 0)),
                                                                    minlength=n_out).eq(1).all())
    if not ok:
        raise ValueError("out_index: must be a permutation of the output columns")
    if len(_checked_index) > 4096:
        _checked_index.clear()
    _checked_index[key] = True


def qlinear(x2d, parts, n_out, bias, lead, cfg: int = -1, splits: int = 0):
    """``y = x2d W^T + bias`` over the quantized row parts; ``y`` has x's dtype, shape lead + (n_out,).

    ``parts``: list of ``(QuantizedWeight, out_index or None)``; ``cfg`` / ``splits`` force a
    tile configuration / split-K factor (tests), -1 / 0 let the planner choose.
    """
    if x2d.dtype not in _FLOATS:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x2d.dtype}")
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"parts: the CUDA kernels take 1 or 2 parts, got {len(parts)}")
    device = x2d.device
    M, K = x2d.shape
    g = min(parts[0][0].group_size, K)
    for w, _ in parts:
        if w.shape[1] != K or min(w.group_size, K) != g:
            raise ValueError("parts: every part needs the input's K and the same group_size")
    G, gp, spg, Kp = _cuda.geometry(K, g)
    y = torch.empty((M, n_out), dtype=x2d.dtype, device=device)
    if M == 0 or n_out == 0:
        return y.reshape(*lead, n_out)
    c_parts, idxs = [], []
    for w, idx in parts:
        pw = packed_weight(w, device)
        oi = _out_index(idx, w.shape[0], device)
        if oi is not None:
            idxs.append(oi)
        c_parts.append((pw["wpack"], pw["meta"], w.bits, w.shape[0], oi))
    if idxs:
        if len(idxs) != len(parts):
            raise ValueError("parts: give out_index for every part or for none")
        _check_permutation(idxs, n_out)
    b = None
    if bias is not None:
        b = _to(bias, device, torch.float32)
        if tuple(b.shape) != (n_out,):
            raise ValueError(f"bias: expected shape ({n_out},), got {tuple(b.shape)}")
    stream = _stream(device)
    xq = torch.empty((M, Kp), dtype=torch.int8, device=device)
    sa = torch.empty((M, Kp // 128), dtype=torch.float32, device=device)
    _cuda.act_quant(x2d, g, gp, xq, sa, spg, stream)
    cfg, splits, _ = _cuda.plan(device.index, M, tuple(w.shape[0] for w, _ in parts), Kp, int(cfg), int(splits))
    ws = torch.empty(splits * M * n_out, dtype=torch.float32, device=device) if splits > 1 else None
    _cuda.qlinear(xq, sa, g, c_parts, b, y, ws, cfg, splits, stream)
    return y.reshape(*lead, n_out)


def plan(M, Ns, K, group_size=128, cfg=-1, splits=0, device=None):
    """(cfg, splits, name) the planner picks for M tokens over parts of Ns rows (for tests/benchmarks)."""
    dev = torch.cuda.current_device() if device is None else torch.device(device).index
    g = min(group_size, K)
    Kp = _cuda.geometry(K, g)[3]
    return _cuda.plan(dev, M, tuple(Ns), Kp, cfg, splits)
