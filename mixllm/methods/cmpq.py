"""CMPQ (Chen et al., arXiv 2410.13056, "Adapting to Any Bit-Width: Channel-Wise Mixed-Precision
Quantization for LLMs"): weight-only, any average bit-width in [2, 4].

Per linear layer (weight ``W`` [N, K]; a *channel* is an input channel, a column of ``W``, because
that is where activation outliers live):

1. Channel-wise precision from activation statistics: channels ranked by the L2 norm of their
   calibration activations (``sqrt(diag(X^T X))``); for a budget ``b`` the top ``b - floor(b)``
   fraction gets ``floor(b) + 1`` bits, the rest ``floor(b)`` (an integer ``b``: every channel ``b``).
2. Non-uniform quantization: each channel's weights are clustered into ``2^bits`` levels by 1-D
   k-means (C op ``kmeans1d``, csrc/cluster.c); a channel's codebook is its sorted levels.
3. Activation-based outliers: all weights of the ``act_outlier_ratio`` fraction of channels with the
   largest activation norms (at least one channel) are kept in 16-bit.
4. Quantization-based outliers: after clustering, the ``quant_outlier_ratio`` fraction of weights with
   the largest activation-weighted quantization error ``|w - Q(w)| * ||x_k||`` are kept in 16-bit,
   and their channels are re-clustered without them.
Outliers are excluded from the clustering (weight 0) and stored as a sparse fp16 part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from .. import ops
from ..nn_weight_only import WeightOnlyLinear
from . import validate
from .base import WeightOnlyConfig, register
from .baselines import LayerStats, _weight

__all__ = ["CMPQConfig", "channel_bits"]


def channel_bits(act_norm: np.ndarray, bits: float) -> np.ndarray:
    """Bit-width per input channel for an average of ``bits`` (ties in the ranking: lower index first)."""
    K = len(act_norm)
    lo = int(math.floor(bits + 1e-9))
    n_hi = int(round((bits - lo) * K))
    cb = np.full(K, lo, dtype=np.int64)
    if n_hi > 0:
        order = np.argsort(-np.asarray(act_norm, dtype=np.float64), kind="stable")
        cb[order[:n_hi]] = lo + 1
    return cb


@register("cmpq")
@dataclass
class CMPQConfig(WeightOnlyConfig):
    """CMPQ weight-only quantization at any average ``bits`` in [2, 4] (codes only; codebooks and the
    16-bit outliers come on top and are counted in the model size).

    ``act_outlier_ratio``: fraction of input channels (highest activation norm) kept in 16-bit.
    ``quant_outlier_ratio``: fraction of weights with the largest activation-weighted k-means error kept
    in 16-bit. ``iters``: k-means iterations.
    """

    bits: float = 2.5
    act_outlier_ratio: float = 0.002
    quant_outlier_ratio: float = 0.003
    iters: int = 50
    keep_tokens: int = 0
    seed: int = 0

    def __post_init__(self):
        try:
            self.bits = validate.number_in("bits", self.bits, 2, 4)
        except ValueError:
            raise ValueError(f"bits: CMPQ takes an average bit-width in [2, 4], got {self.bits!r}") from None
        for n in ("act_outlier_ratio", "quant_outlier_ratio"):
            setattr(self, n, validate.number_in(n, getattr(self, n), 0, 0.5, hi_open=True))

    def quantize_linear(self, linear: nn.Linear, stats: LayerStats) -> WeightOnlyLinear:
        if not isinstance(stats, LayerStats):
            raise TypeError("stats: CMPQ needs the layer's calibration statistics (LayerStats)")
        w = _weight(linear)
        N, K = w.shape
        act = np.sqrt(np.maximum(np.diag(stats.H), 0.0))
        cb = channel_bits(act, self.bits)
        kmax = 2 ** int(cb.max())
        wt = w.T.copy()  # [K, N]: one clustering problem per input channel
        mask = np.ones_like(wt, dtype=np.float32)  # 0: outlier kept in 16-bit
        if self.act_outlier_ratio > 0:
            n_ch = max(1, int(round(self.act_outlier_ratio * K)))
            mask[np.argsort(-act, kind="stable")[:n_ch], :] = 0
        levels = (2**cb).astype(np.int32)
        cent, codes = ops.kmeans1d(wt, kmax, weight=mask, levels=levels, iters=self.iters)
        if self.quant_outlier_ratio > 0:
            deq = np.take_along_axis(cent, codes.astype(np.int64), axis=1)
            err = np.abs(deq - wt) * act[:, None] * mask
            n_out = int(round(self.quant_outlier_ratio * N * K))
            if n_out > 0:
                flat = np.argpartition(-err.ravel(), n_out - 1)[:n_out]
                mask.ravel()[flat] = 0
                ch = np.unique(flat // N)
                c2, q2 = ops.kmeans1d(wt[ch], kmax, weight=mask[ch], levels=levels[ch], iters=self.iters)
                cent[ch], codes[ch] = c2, q2
        kk, nn_ = np.nonzero(mask == 0)  # channel, row
        outliers = (nn_, kk, wt[kk, nn_])
        return WeightOnlyLinear.from_codebook(linear, codes.T, cent, cb, outliers=outliers, method=self.name)
