"""The one accumulator of GPTQ Hessians ``H = 2 X^T X / n`` for every method (MixLLM, GPTQ, SliM-LLM,
CMPQ's statistics) and every pass (one-pass calibration, block-by-block calibration).

Each call's ``X^T X`` is formed in float32 on the input's device (a GEMM) and summed in float64 there,
so nothing crosses to the host until :meth:`HessianAccumulator.hessian` is asked for it on the host.
Optionally a random sample of input rows is kept (SliM-LLM's allocation search reads layer outputs).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """``2 X^T X / n`` of one layer input, accumulated over forward calls.

    ``device``: where the float64 sum lives (default: the device of the first input); ``keep_p``: the
    probability of keeping each input row (float32, host), drawn with ``generator``.
    """

    def __init__(self, K: int, device=None, keep_p: float = 0.0, generator: Optional[torch.Generator] = None):
        if isinstance(K, bool) or not isinstance(K, int) or K <= 0:
            raise ValueError(f"K: expected a positive integer, got {K!r}")
        self.K = K
        self.device = None if device is None else torch.device(device)
        self.sum: Optional[torch.Tensor] = None
        self.n = 0
        self.keep_p = float(keep_p)
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.rows = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[1] != self.K:
            raise ValueError(f"x: expected last dimension {self.K}, got {x.shape[1]}")
        dev = self.device or x.device
        x2 = x.to(device=dev, dtype=torch.float32)
        xtx = (x2.T @ x2).to(torch.float64)
        if self.sum is None:
            self.sum = xtx
        else:
            self.sum.add_(xtx)
        self.n += x2.shape[0]
        if self.keep_p > 0:
            sel = torch.rand(x2.shape[0], generator=self.gen) < self.keep_p
            self.rows.append(x2[sel.to(dev)].float().cpu())

    def hessian(self, device=None) -> torch.Tensor:
        """float64 [K, K] ``2 X^T X / n`` (zeros when nothing was added), on ``device`` (default: where it
        was accumulated)."""
        if self.sum is None:
            H = torch.zeros(self.K, self.K, dtype=torch.float64, device=device or self.device or "cpu")
        else:
            H = self.sum * (2.0 / max(self.n, 1))
        return H if device is None else H.to(device)

    def sample_rows(self):
        """The kept input rows, float32 [T, K] on the host, or None."""
        return torch.cat(self.rows) if self.rows else None

    def free(self) -> None:
        self.sum, self.rows = None, []
