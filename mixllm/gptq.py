"""GPTQ in PyTorch, for CUDA tensors (and as a float64 CPU cross-check of the C implementation).

The algorithm and its every rounding step mirror ``csrc/gptq.c`` (``ops.gptq_quantize``, the CPU
reference path): columns are processed in blocks of 128 in the permuted order (groups in descending
``diag(H)`` mass when ``group_order``); a group's scale/zero are chosen when its first column comes up,
from the row's current (partly error-compensated) values, by the clipping search over range factors
``1 - i/100`` (``i <= clip_grid``) minimising the ``diag(H)``-weighted squared error; each column's
error, divided by ``U[p, p]`` (``U`` = upper Cholesky factor of the damped ``H^-1``), is pushed onto the
rest of the block at once and onto the later blocks by one rank-128 update. Scales, zero points and
codes are computed in float32 exactly as the C code does, so with ``dtype=torch.float64`` the codes are
those of the C GPTQ up to the summation order of float64 sums (ties only).

Rows are independent given ``H``, so each row can have its own format: ``bits`` and ``symmetric`` may
be per-row tensors (MixLLM quantizes a layer's 4-bit asymmetric and 8-bit symmetric rows in one pass).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["gptq_torch", "gptq", "hinv_factor"]

COL_BLOCK = 128  # columns per lazy-batch block (csrc/gptq.c COL_BLOCK): also fixes when groups are fitted


def _group_order(diag: np.ndarray, K: int, g: int, group_order: bool) -> np.ndarray:
    G = -(-K // g)
    if not group_order:
        return np.arange(G)
    # the C code sums each group's diagonal left to right (cumsum is sequential) and insertion-sorts
    # by that mass, descending and stable
    mass = np.array([np.cumsum(diag[j * g : min(K, (j + 1) * g)])[-1] for j in range(G)])
    return np.argsort(-mass, kind="stable")


def hinv_factor(H: torch.Tensor, perm: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H'[perm][:, perm] + damp * mean(diag H') I)^-1``, ``H'`` = ``H`` with 1 on
    the diagonal of dead inputs (``diag <= 0``), as csrc/gptq.c computes it (via cuSOLVER / LAPACK)."""
    Hp = H[perm][:, perm].clone()
    d = Hp.diagonal()
    d[d <= 0] = 1.0
    d.add_(damp * float(d.mean()))
    L, info = torch.linalg.cholesky_ex(Hp)
    if int(info) != 0:
        raise ValueError("H: not positive definite even after damping; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _per_row(v, N, dtype, device, name):
    t = torch.as_tensor(v, device=device)
    if t.dim() == 0:
        t = t.expand(N)
    if t.shape != (N,):
        raise ValueError(f"{name}: expected a scalar or a tensor of shape [{N}], got {tuple(t.shape)}")
    return t.to(dtype)


@torch.no_grad()
def gptq_torch(
    w: torch.Tensor,
    H: Optional[torch.Tensor],
    bits: Union[int, torch.Tensor] = 4,
    group_size: int = 128,
    symmetric: Union[bool, torch.Tensor, None] = None,
    damp: float = 0.01,
    group_order: bool = True,
    clip_grid: int = 20,
    dtype: torch.dtype = torch.float64,
    row_chunk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [N, K] on ``w``'s device; see the module docstring.

    ``bits``: int or int tensor [N] (2..8); ``symmetric``: bool or bool tensor [N] (default: ``bits == 8``);
    ``clip_grid``: 0 turns the clipping search off; ``dtype``: float64 (codes as the C GPTQ) or float32
    (faster on GPUs without fast float64); ``row_chunk``: rows per pass (0: all; bounds the memory of the
    clipping search). Returns ``(codes int16 [N, K], scale float32 [N, G], zero uint8 [N, G])``: asymmetric
    rows have codes ``0..2^b-1`` and their zero point, symmetric rows codes ``-(2^(b-1)-1)..`` and zero 0.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError("w: expected a 2-D torch tensor")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive integer, got {group_size!r}")
    dev = w.device
    N, K = w.shape
    g = group_size
    G = -(-K // g)
    bits_r = _per_row(bits, N, torch.int64, dev, "bits")
    if int(bits_r.min()) < 2 or int(bits_r.max()) > 8:
        raise ValueError("bits: expected integers in 2..8")
    sym_r = (bits_r == 8) if symmetric is None else _per_row(symmetric, N, torch.bool, dev, "symmetric")
    w32 = w.detach().to(torch.float32)
    if not torch.isfinite(w32).all():
        raise ValueError("w: NaN or Inf weights")
    if H is not None:
        H = H.detach().to(device=dev, dtype=torch.float64)
        if H.shape != (K, K):
            raise ValueError(f"H: expected shape [{K}, {K}], got {tuple(H.shape)}")
        if not torch.isfinite(H).all():
            raise ValueError("H: NaN or Inf")
        diag = H.diagonal().clone()
    else:
        diag = torch.ones(K, dtype=torch.float64, device=dev)
    diag_np = diag.cpu().numpy()
    gorder = _group_order(diag_np, K, g, group_order and H is not None)
    perm_np = np.concatenate([np.arange(j * g, min(K, (j + 1) * g)) for j in gorder])
    perm = torch.from_numpy(perm_np).to(dev)
    U = hinv_factor(H, perm, damp).to(dtype) if H is not None else None
    dg = diag[perm]  # the clip search weights: the undamped diagonal (dead inputs keep theirs)
    dead = (diag <= 0) if H is not None else torch.zeros(K, dtype=torch.bool, device=dev)

    codes = torch.empty(N, K, dtype=torch.int16, device=dev)
    scale = torch.empty(N, G, dtype=torch.float32, device=dev)
    zero = torch.zeros(N, G, dtype=torch.uint8, device=dev)
    grid = np.float32(1) - np.arange(clip_grid + 1, dtype=np.float32) / np.float32(100)  # C: 1.f - (float)i/100.f
    grid = torch.from_numpy(grid).to(dev)
    step = row_chunk if row_chunk and row_chunk > 0 else N
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        W = w32[r0:r1].clone()
        W[:, dead] = 0
        W = W[:, perm].to(dtype)
        c, s, z = _gptq_rows(W, U, dg, perm_np, g, bits_r[r0:r1], sym_r[r0:r1], grid, clip_grid > 0)
        codes[r0:r1, perm] = c
        scale[r0:r1], zero[r0:r1] = s, z
    return codes, scale, zero


def _gptq_rows(W, U, dg, perm, g, bits, sym, grid, search):
    """The column loop over permuted rows ``W`` (modified in place)."""
    R, K = W.shape
    G = -(-K // g)
    dev = W.device
    qmax_a = (2**bits - 1).to(torch.float32)
    qmax_s = (2 ** (bits - 1) - 1).to(torch.float32)
    cmin = torch.where(sym, -qmax_s, torch.zeros_like(qmax_s))
    cmax = torch.where(sym, qmax_s, qmax_a)
    out_c = torch.empty(R, K, dtype=torch.int16, device=dev)
    out_s = torch.empty(R, G, dtype=torch.float32, device=dev)
    out_z = torch.zeros(R, G, dtype=torch.uint8, device=dev)
    s = z = None
    for b0 in range(0, K, COL_BLOCK):
        b1 = min(b0 + COL_BLOCK, K)
        E = torch.empty(R, b1 - b0, dtype=W.dtype, device=dev) if U is not None else None
        for p in range(b0, b1):
            k = int(perm[p])
            if k % g == 0 or p == 0:  # a group starts; its columns are contiguous in permuted order
                j = k // g
                ln = min(g, K - j * g)
                s, z = _fit_group(W[:, p : p + ln], dg[p : p + ln], sym, qmax_a, qmax_s, cmin, cmax, grid, search)
                out_s[:, j] = s
                out_z[:, j] = z.to(torch.uint8)
                s64, z64 = s.double(), z.double()
            q = torch.round(W[:, p].float() / s).add_(z).clamp_(cmin, cmax)
            out_c[:, p] = q.to(torch.int16)
            if U is None:
                continue
            dq = (q.double() - z64) * s64
            err = (W[:, p] - dq.to(W.dtype)) / U[p, p]
            E[:, p - b0] = err
            if p + 1 < b1:
                W[:, p + 1 : b1].sub_(err[:, None] * U[p, p + 1 : b1][None, :])
        if U is not None and b1 < K:
            W[:, b1:].sub_(E @ U[b0:b1, b1:])
    return out_c, out_s, out_z


def _fit_group(v, d, sym, qmax_a, qmax_s, cmin, cmax, grid, search):
    """Scale and zero point per row of the group ``v`` [R, len] (csrc/gptq.c ``group_params``): float32
    range arithmetic, float64 ``d``-weighted error, the first grid point with the smallest error."""
    vf = v.float()
    lo, hi = vf.amin(1), vf.amax(1)
    amax = vf.abs().amax(1)
    P = grid if search else grid[:1]
    lo_p = torch.clamp(lo[:, None] * P[None, :], max=0.0)  # [R, P]
    hi_p = torch.clamp(hi[:, None] * P[None, :], min=0.0)
    s_a = (hi_p - lo_p) / qmax_a[:, None]
    ok = s_a > 0
    s_a1 = torch.where(ok, s_a, torch.ones_like(s_a))
    z_a = torch.where(ok, torch.round(-lo_p / s_a1).clamp(min=0.0).minimum(qmax_a[:, None]), torch.zeros_like(s_a))
    s_s = (amax[:, None] * P[None, :]) / qmax_s[:, None]
    s_s = torch.where(s_s > 0, s_s, torch.ones_like(s_s))
    S = torch.where(sym[:, None], s_s, s_a1)
    Z = torch.where(sym[:, None], torch.zeros_like(z_a), z_a)
    if P.numel() == 1:
        return S[:, 0], Z[:, 0]
    q = torch.round(vf[:, None, :] / S[:, :, None]).add_(Z[:, :, None])
    q = torch.maximum(torch.minimum(q, cmax[:, None, None]), cmin[:, None, None])
    dq = (q.double() - Z.double()[:, :, None]) * S.double()[:, :, None]
    err = (d.to(torch.float64)[None, None, :] * (dq - v.double()[:, None, :]) ** 2).sum(-1)
    best = torch.argmin(err, dim=1)  # the first minimum, as the C code's strict "<"
    idx = best[:, None]
    return S.gather(1, idx)[:, 0], Z.gather(1, idx)[:, 0]


def gptq(
    w: torch.Tensor,
    H,
    bits: int = 4,
    group_size: int = 128,
    symmetric: Optional[bool] = None,
    damp: float = 0.01,
    group_order: bool = True,
    clip_grid: int = 20,
    impl: str = "auto",
    dtype: torch.dtype = torch.float64,
):
    """One entry point for both implementations, in the formats of :func:`mixllm.ops.gptq_quantize`
    (``codes`` uint8 / int8, ``scale``, ``zero`` or None). ``impl``: ``"c"`` (the reference, host),
    ``"torch"`` (on ``w``'s device), ``"auto"`` (torch for CUDA tensors, C otherwise). Results are on
    ``w``'s device."""
    from . import ops

    if impl not in ("auto", "c", "torch"):
        raise ValueError(f"impl: expected 'auto', 'c' or 'torch', got {impl!r}")
    symmetric = (bits == 8) if symmetric is None else bool(symmetric)
    use_torch = impl == "torch" or (impl == "auto" and isinstance(w, torch.Tensor) and w.is_cuda)
    if not use_torch:
        dev = w.device if isinstance(w, torch.Tensor) else None
        wc = w.detach().float().cpu() if isinstance(w, torch.Tensor) else w
        Hc = H.detach().cpu() if isinstance(H, torch.Tensor) else H
        q, s, z = ops.gptq_quantize(
            wc,
            Hc,
            bits,
            group_size,
            symmetric=symmetric,
            damp=damp,
            group_order=group_order,
            clip=clip_grid > 0,
            clip_grid=max(clip_grid, 1),
        )
        if dev is not None:
            q, s = q.to(dev), s.to(dev)
            z = None if z is None else z.to(dev)
        return q, s, z
    H = None if H is None else torch.as_tensor(H)
    c, s, z = gptq_torch(w, H, bits, group_size, symmetric, damp, group_order, clip_grid, dtype)
    return (c.to(torch.int8), s, None) if symmetric else (c.to(torch.uint8), s, z)
