"""Weight-only quantized linear layer (SliM-LLM, CMPQ and the RTN/GPTQ baselines).

``WeightOnlyLinear`` is a drop-in for ``nn.Linear``: same in/out features, same output. Its weight is
held in one of two forms (csrc/woq.c):

* ``kind="group"``: uint8 codes with per-group ``scale`` and ``offset`` (``W = code * scale + offset``
  for the group of ``group_size`` input features of one output row) and the bit-width of each group
  (``group_bits`` [N, G]; SliM-LLM mixes 1/2/3 bits; RTN/GPTQ use one width).
* ``kind="codebook"``: uint8 codes into a table of levels per input channel (``codebook`` [K, L],
  ``channel_bits`` [K]; CMPQ), plus a sparse part of 16-bit outliers (CSR by output row) that replaces
  the coded value at those positions.

Scales, offsets, codebooks and outlier values are stored in float16 (their size is counted as such).
Codes are kept unpacked (one byte each) in memory; :meth:`WeightOnlyLinear.nbytes` reports the packed
size (each code at its own bit-width), which is what the model-size figures use.

Forward on the CPU: the C op ``woq_linear`` (dequantize one row on the fly, dot with every token) for
short inputs (decode), and for longer ones the float32 weight dequantized once by ``woq_dequantize``
and cached, then the BLAS GEMM. On CUDA: dequantize with torch ops, then one GEMM in ``x``'s dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["WeightOnlyLinear"]

_FUSED_MAX_TOKENS = 8  # at most this many tokens: on-the-fly C op; more: cached dequantized weight + GEMM


class WeightOnlyLinear(nn.Module):
    """Weight-only quantized ``nn.Linear`` replacement; build it with :meth:`from_group` /
    :meth:`from_codebook` (or :meth:`from_linear` for plain round-to-nearest)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        kind: str = "group",
        group_size: int = 128,
        levels: int = 16,
        nnz: int = 0,
        method: str = "",
    ):
        super().__init__()
        if kind not in ("group", "codebook"):
            raise ValueError(f"kind: expected 'group' or 'codebook', got {kind!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError("in_features, out_features: expected positive integers")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.kind, self.method = kind, method
        N, K = self.out_features, self.in_features
        self.register_buffer("codes", torch.zeros(N, K, dtype=torch.uint8))
        if kind == "group":
            self.group_size = int(group_size)
            if self.group_size <= 0:
                raise ValueError(f"group_size: expected a positive integer, got {group_size!r}")
            G = math.ceil(K / self.group_size)
            self.register_buffer("scale", torch.ones(N, G, dtype=torch.float16))
            self.register_buffer("offset", torch.zeros(N, G, dtype=torch.float16))
            self.register_buffer("group_bits", torch.full((N, G), 4, dtype=torch.uint8))
        else:
            self.group_size = 0
            self.register_buffer("codebook", torch.zeros(K, int(levels), dtype=torch.float16))
            self.register_buffer("channel_bits", torch.full((K,), 4, dtype=torch.uint8))
        self.register_buffer("rowptr", torch.zeros(N + 1, dtype=torch.int64))
        self.register_buffer("cols", torch.zeros(int(nnz), dtype=torch.int64))
        self.register_buffer("vals", torch.zeros(int(nnz), dtype=torch.float16))
        if bias:
            self.bias = nn.Parameter(torch.zeros(N), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._wcache = None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _sparse(n_rows, outliers):
        """outliers: None or (rows, cols, values) -> CSR (rowptr, cols, vals) sorted by row, then col."""
        if outliers is None or len(outliers[0]) == 0:
            return torch.zeros(n_rows + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        r, c, v = (torch.as_tensor(np.asarray(a)) for a in outliers)
        order = torch.argsort(r.long() * (c.max().item() + 1) + c.long())
        r, c, v = r.long()[order], c.long()[order], v.float()[order]
        rowptr = torch.zeros(n_rows + 1, dtype=torch.int64)
        rowptr[1:] = torch.cumsum(torch.bincount(r, minlength=n_rows), 0)
        return rowptr, c, v

    @classmethod
    def from_group(cls, linear: nn.Linear, codes, scale, offset, group_bits, group_size: int, method: str = ""):
        """From group-wise codes (``dequant = code * scale + offset`` per group) of ``linear``'s weight."""
        N, K = linear.out_features, linear.in_features
        m = cls(K, N, linear.bias is not None, "group", group_size, method=method)
        codes = torch.as_tensor(np.asarray(codes)).to(torch.uint8)
        if tuple(codes.shape) != (N, K):
            raise ValueError(f"codes: expected shape {(N, K)}, got {tuple(codes.shape)}")
        m.codes.copy_(codes)
        m.scale.copy_(torch.as_tensor(np.asarray(scale, np.float32)).half())
        m.offset.copy_(torch.as_tensor(np.asarray(offset, np.float32)).half())
        gb = torch.as_tensor(np.asarray(group_bits)).to(torch.uint8)
        m.group_bits.copy_(gb.expand_as(m.group_bits) if gb.dim() < 2 else gb)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    @classmethod
    def from_codebook(cls, linear: nn.Linear, codes, codebook, channel_bits, outliers=None, method: str = ""):
        """From per-input-channel codebooks: ``W[n, k] = codebook[k, codes[n, k]]``; ``outliers`` is
        ``(rows, cols, values)`` of weights kept in 16-bit."""
        N, K = linear.out_features, linear.in_features
        codebook = torch.as_tensor(np.asarray(codebook, np.float32))
        rowptr, cols, vals = cls._sparse(N, outliers)
        m = cls(K, N, linear.bias is not None, "codebook", levels=codebook.shape[1], nnz=len(cols), method=method)
        m.codes.copy_(torch.as_tensor(np.asarray(codes)).to(torch.uint8))
        m.codebook.copy_(codebook.half())
        m.channel_bits.copy_(torch.as_tensor(np.asarray(channel_bits)).to(torch.uint8))
        m.rowptr.copy_(rowptr)
        m.cols.copy_(cols)
        m.vals.copy_(vals.half())
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128):
        """Round-to-nearest asymmetric ``bits``-bit quantization of ``linear`` (docs/spec.md §1 format)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float().cpu().numpy()
        q, s, z = ops.quantize_weight(w, int(bits), group_size, symmetric=False)
        return cls.from_group(linear, q, s, -z.astype(np.float32) * s, bits, group_size, method="rtn")

    # ------------------------------------------------------------------ weight
    def _spec_args(self):
        sp = dict(rowptr=self.rowptr, cols=self.cols, vals=self.vals.float()) if self.cols.numel() else {}
        if self.kind == "group":
            return dict(
                kind="group",
                codes=self.codes,
                group_size=self.group_size,
                scale=self.scale.float(),
                offset=self.offset.float(),
                **sp,
            )
        return dict(kind="codebook", codes=self.codes, codebook=self.codebook.float(), **sp)

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight this layer computes with."""
        if self.codes.is_cuda:
            return self._dequantize_torch()
        return ops.woq_dequantize(**self._spec_args())

    def _dequantize_torch(self) -> torch.Tensor:
        N, K = self.codes.shape
        if self.kind == "group":
            idx = torch.arange(K, device=self.codes.device) // self.group_size
            w = self.codes.float() * self.scale.float()[:, idx] + self.offset.float()[:, idx]
        else:
            w = self.codebook.float()[torch.arange(K, device=self.codes.device)[None, :], self.codes.long()]
        if self.cols.numel():
            rows = torch.repeat_interleave(torch.arange(N, device=w.device), torch.diff(self.rowptr))
            w[rows, self.cols] = self.vals.float()
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got {tuple(x.shape)}")
        if x.is_cuda:
            return F.linear(
                x, self._dequantize_torch().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            )
        tokens = x.numel() // self.in_features
        if tokens <= _FUSED_MAX_TOKENS and self._wcache is None:
            return ops.woq_linear(x, bias=self.bias, **self._spec_args())
        if self._wcache is None:
            self._wcache = self.dequantize()
        w = self._wcache if x.dtype == torch.float32 else self._wcache.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def clear_cache(self):
        self._wcache = None

    def _apply(self, fn, *args, **kwargs):
        self._wcache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Outlier count and codebook width vary per layer: take the stored shapes.
        for name in ("cols", "vals", "codebook"):
            key = prefix + name
            if key in state_dict and hasattr(self, name) and getattr(self, name).shape != state_dict[key].shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        self._wcache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # ------------------------------------------------------------------ accounting
    def code_bits(self) -> int:
        """Bits of the packed codes (each code at its own group's / channel's bit-width)."""
        N, K = self.codes.shape
        if self.kind == "group":
            g = self.group_size
            widths = torch.tensor([min(g, K - j * g) for j in range(self.group_bits.shape[1])], dtype=torch.int64)
            return int((self.group_bits.long().cpu() * widths[None, :]).sum())
        return int(self.channel_bits.long().cpu().sum()) * N

    def average_bits(self) -> float:
        """Average code bits per weight (the method's budget; metadata not included)."""
        return self.code_bits() / float(self.codes.numel())

    def nbytes(self) -> int:
        """Packed size: codes at their bit-widths, fp16 scales/offsets or codebooks (only the levels a
        channel uses), the per-group/-channel widths (1 byte each), outliers (fp16 value + int16 column,
        int32 row pointers) and a fp16 bias."""
        N, K = self.codes.shape
        b = self.code_bits() / 8
        if self.kind == "group":
            b += self.scale.numel() * 4 + self.group_bits.shape[1]
        else:
            b += int((2 ** self.channel_bits.long().cpu()).sum()) * 2 + K
        if self.cols.numel():
            b += self.cols.numel() * 4 + (N + 1) * 4
        if self.bias is not None:
            b += N * 2
        return int(math.ceil(b))

    # ------------------------------------------------------------------ mixllm.io contract
    def get_config(self) -> dict:
        """Constructor arguments (mixllm.io saves them in mixllm.json)."""
        return dict(
            in_features=self.in_features,
            out_features=self.out_features,
            bias=self.bias is not None,
            kind=self.kind,
            group_size=self.group_size if self.kind == "group" else 128,
            levels=int(self.codebook.shape[1]) if self.kind == "codebook" else 16,
            nnz=int(self.cols.numel()),
            method=self.method,
        )

    @classmethod
    def from_config(cls, cfg: dict) -> "WeightOnlyLinear":
        return cls(**cfg)

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kind={self.kind}, avg_bits={self.average_bits():.3f}"
        )
        if self.kind == "group":
            s += f", group_size={self.group_size}"
        if self.cols.numel():
            s += f", outliers={self.cols.numel()}"
        if self.method:
            s += f", method={self.method}"
        return s


try:  # make saved models loadable by mixllm.load
    from .io import register_module as _register
except ImportError:  # pragma: no cover - io not present in a partial checkout
    _register = None
if _register is not None:
    _register(WeightOnlyLinear)
