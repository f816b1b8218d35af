"""SliM-LLM (Huang et al., arXiv 2405.14917): salience-driven mixed precision over weight groups.

Per linear layer (weight ``W`` [N, K], groups of ``group_size`` input columns spanning all rows):

1. Salience (§3.2): element salience ``delta_ij = w_ij^2 / [U]_jj^2`` with ``U`` the upper Cholesky
   factor of the damped ``H^-1`` (GPTQ's OBS error term); a group's salience is its sum.
2. Salience-determined bit allocation, SBA (§3.2): groups ranked by salience; the ``i`` least salient
   get ``bits - 1``, the ``i`` most salient ``bits + 1``, the rest ``bits`` (the layer average stays at
   ``bits`` for equal-width groups). ``i`` is searched over ``1 .. G//2 - 1`` minimising
   ``KL(softmax(X W_q^T) || softmax(X W^T))`` on calibration inputs, with ``W_q`` the round-to-nearest
   (1-bit: binarized) weight — the reference implementation's "activation-aware search".
3. Salience-weighted quantizer calibration, SQC (§3.3): inside GPTQ, each row's group range is scaled
   by the ``p`` in ``[1 - 0.1, 1 + 0.1]`` minimising ``sum |err|^2.4`` with the salient elements' error
   (``|z-score| > 2`` of the group's element salience) weighted by ``lam``. C op: csrc/slim.c.
4. GPTQ with those per-group bit-widths (the project's C GPTQ through a group-quantizer hook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..nn_weight_only import WeightOnlyLinear
from . import validate
from .base import WeightOnlyConfig, register
from .baselines import LayerStats, _weight

__all__ = ["SliMConfig", "hinv_diag", "group_salience", "sba_search", "sqc_thresholds", "rtn_blocks"]


def hinv_diag(H: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Diagonal of the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (dead inputs: 1 on
    the diagonal, as in GPTQ)."""
    H = np.array(H, dtype=np.float64, copy=True)
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, dead] = 1.0
    Ht = torch.from_numpy(H)
    Ht.diagonal().add_(damp * float(np.mean(np.diag(H))))
    L = torch.linalg.cholesky(Ht)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    return U.diagonal().numpy().copy()


def group_salience(w: np.ndarray, u: np.ndarray, group_size: int) -> np.ndarray:
    """Sum of ``w^2 / u^2`` over each group of columns (all rows)."""
    e = (w.astype(np.float64) ** 2) / (u[None, :] ** 2)
    K = w.shape[1]
    return np.array([e[:, j : j + group_size].sum() for j in range(0, K, group_size)])


def sqc_thresholds(w: np.ndarray, u: np.ndarray, group_size: int, z: float = 2.0) -> np.ndarray:
    """Per group: the salience threshold of the elements with ``|z-score| > z`` (inf when none)."""
    e = (w.astype(np.float64) ** 2) / (u[None, :] ** 2)
    out = []
    for j in range(0, w.shape[1], group_size):
        b = e[:, j : j + group_size]
        sd = b.std(ddof=1) if b.size > 1 else 0.0
        out_mask = np.abs(b - b.mean()) > z * sd if sd > 0 else np.zeros(b.shape, bool)
        if not out_mask.any():
            out.append(np.inf)
            continue
        # salience is >= 0 and right-skewed, so the outliers are the top values; cut halfway between
        # the smallest outlier and the largest non-outlier so that rounding cannot flip the boundary one
        lo = b[out_mask].min()
        below = b[~out_mask & (b < lo)]
        out.append(0.5 * (lo + below.max()) if below.size else lo)
    return np.array(out, dtype=np.float64)


def rtn_blocks(w: np.ndarray, col_bits: np.ndarray, group_size: int) -> np.ndarray:
    """Round-to-nearest dequantized weight with bit-width ``col_bits[j]`` for column group ``j``
    (per row min/max asymmetric; 1-bit: ``sign(w - mean) * mean|w| + mean``)."""
    out = np.empty_like(w, dtype=np.float32)
    for j, b in enumerate(col_bits):
        blk = w[:, j * group_size : (j + 1) * group_size].astype(np.float32)
        if b == 1:
            m = blk.mean(1, keepdims=True)
            a = np.abs(blk).mean(1, keepdims=True)
            out[:, j * group_size : (j + 1) * group_size] = np.where(
                blk - m > 0, m + a, np.where(blk - m < 0, m - a, m)
            )
            continue
        qmax = 2 ** int(b) - 1
        lo = np.minimum(blk.min(1, keepdims=True), 0)
        hi = np.maximum(blk.max(1, keepdims=True), 0)
        both0 = (lo == 0) & (hi == 0)
        lo, hi = np.where(both0, -1, lo), np.where(both0, 1, hi)
        s = (hi - lo) / qmax
        z = np.round(-lo / s)
        out[:, j * group_size : (j + 1) * group_size] = (np.clip(np.round(blk / s) + z, 0, qmax) - z) * s
    return out


def _kl_rows(q_logits: torch.Tensor, p_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(q) || softmax(p)) (probabilities clamped at 1e-6 as the reference)."""
    pq = torch.softmax(q_logits, -1).clamp_min(1e-6)
    pp = torch.softmax(p_logits, -1).clamp_min(1e-6)
    return float((pq * (pq.log() - pp.log())).sum(-1).mean())


def allocation(sal: np.ndarray, i: int, bits: int) -> np.ndarray:
    """Column-group bits: the ``i`` least salient groups ``bits - 1``, the ``i`` most ``bits + 1``."""
    order = np.argsort(sal, kind="stable")
    cb = np.full(len(sal), bits, dtype=np.int64)
    if i > 0:
        cb[order[:i]] = bits - 1
        cb[order[-i:]] = bits + 1
    return cb


def sba_search(
    w: np.ndarray, X: Optional[np.ndarray], sal: np.ndarray, bits: int, group_size: int, H: Optional[np.ndarray] = None
):
    """SliM-LLM's bit-allocation search; returns ``(column-group bits, chosen i, error per candidate)``.

    With calibration rows ``X``: the reference's KL divergence of the layer outputs. Without them (a
    :class:`mixllm.calib.Calibration` keeps only Hessians) and with ``H``: the expected squared output
    error ``tr((W_q - W) H (W_q - W)^T)`` instead.
    """
    G = len(sal)
    cands = list(range(1, G // 2))
    have_x = X is not None and X.shape[0] > 0
    if not cands or (not have_x and H is None):
        return allocation(sal, 0, bits), 0, []
    errs = []
    if have_x:
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        ref = Xt @ torch.from_numpy(w.astype(np.float32)).T
    for i in cands:
        wq = rtn_blocks(w, allocation(sal, i, bits), group_size)
        if have_x:
            errs.append(_kl_rows(Xt @ torch.from_numpy(wq).T, ref))
        else:
            D = torch.from_numpy((wq - w).astype(np.float64))
            errs.append(float(((D @ torch.from_numpy(np.asarray(H, np.float64))) * D).sum()))
    best = cands[int(np.argmin(errs))]
    return allocation(sal, best, bits), best, errs


@register("slim")
@dataclass
class SliMConfig(WeightOnlyConfig):
    """SliM-LLM weight-only quantization at an integer average ``bits`` (groups get ``bits - 1``,
    ``bits``, ``bits + 1``; 1-bit groups are binarized).

    ``group_size``: columns per group (paper: 128). ``sba``: search the allocation (False: uniform
    ``bits``, i.e. GPTQ + SQC). ``sqc``: salience-weighted calibration (False: min/max range).
    ``lam``: weight of the salient elements' error in SQC (reference implementation default 1);
    ``norm``, ``tau_range``, ``tau_n``: SQC loss exponent and search grid (reference: 2.4, 0.1, 50).
    ``damp``: GPTQ damping fraction. ``keep_tokens``: calibration rows kept per layer for the SBA search.
    ``sequential``: calibrate block by block on the quantized prefix (GPTQ paper; the SliM-LLM code runs
    its GPTQ the same way); False: every layer from the full-precision model's inputs in one pass.
    """

    bits: int = 2
    group_size: int = 128
    sba: bool = True
    sqc: bool = True
    lam: float = 1.0
    norm: float = 2.4
    tau_range: float = 0.1
    tau_n: int = 50
    damp: float = 0.01
    sequential: bool = True
    keep_tokens: int = 1024
    seed: int = 0

    def __post_init__(self):
        try:
            self.bits = validate.integer_in("bits", self.bits, 2, 7)
        except ValueError:
            raise ValueError(f"bits: SliM-LLM takes an integer average in 2..7, got {self.bits!r}") from None
        self.group_size = validate.group_size(self.group_size)
        self.lam = validate.non_negative("lam", self.lam)

    def quantize_linear(self, linear: nn.Linear, stats: LayerStats) -> WeightOnlyLinear:
        if not isinstance(stats, LayerStats):
            raise TypeError("stats: SliM-LLM needs the layer's calibration statistics (LayerStats)")
        w = _weight(linear)
        N, K = w.shape
        g = self.group_size
        U = ops.gptq_hinv_factor(stats.H, self.damp)  # LAPACK; the C GPTQ reuses it
        u = np.diag(U).copy()
        sal = group_salience(w, u, g)
        if self.sba:
            col_bits, _, _ = sba_search(w, stats.X, sal, self.bits, g, stats.H)
        else:
            col_bits = allocation(sal, 0, self.bits)
        bpg = np.broadcast_to(col_bits.astype(np.float32), (N, len(col_bits)))
        thr = sqc_thresholds(w, u, g) if self.sqc else None
        tau_range, tau_n = (self.tau_range, self.tau_n) if self.sqc else (0.0, 1)
        q, s, off = ops.slim_gptq_quantize(
            w,
            stats.H,
            bpg,
            g,
            damp=self.damp,
            thresholds=thr,
            lam=self.lam,
            norm=self.norm,
            tau_range=tau_range,
            tau_n=tau_n,
            U=U,
        )
        return WeightOnlyLinear.from_group(
            linear, q, s, off, np.ascontiguousarray(bpg).astype(np.uint8), g, method=self.name
        )
