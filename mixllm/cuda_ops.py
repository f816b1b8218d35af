"""CUDA side of :mod:`mixllm.ops`: glue between torch CUDA tensors and ``mixllm._cuda``.

``mixllm.ops`` dispatches here when ``x`` is a CUDA tensor; nothing here is meant to be
called directly. Every launch goes to the caller's current stream, and every buffer is a
torch allocation (so the ops work inside CUDA graph capture). The GEMM layout of a weight
(cuda/pack_weights.cu) is built on first use per device and cached with the weight
(``QuantizedWeight.kernel_layout("cuda:<i>", ...)``).

Output indices (``out_index``, the mixed layer's column scatter) are validated where they cannot
be swapped behind the check's back: ``PreparedLinear`` (and so ``MixedLinear``) checks a private
copy once, when it is built; the functional ops (``ops.mixed_linear``) check every call, which costs
one host synchronisation per call (under CUDA graph capture, where a host synchronisation is not
allowed, the check runs on the device instead and a bad index set gives an all-NaN output).
The kernels also skip any store whose column lies outside ``y`` (cuda/w4a8.cu), whatever index
reaches them. Non-finite inputs: docs/readme_reliability.md, "NaN and Inf on the GPU".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.dlpack

from . import _cuda
from .nn import rmsnorm_reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _stream(device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _to(a, device, dtype, name):
    t = torch.as_tensor(a) if isinstance(a, np.ndarray) else a
    if not isinstance(t, torch.Tensor):  # (found by fuzz/cuda_targets.py: an AttributeError before)
        raise TypeError(f"{name}: expected a torch tensor or NumPy array, got {type(a).__name__}")
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
        _cuda.act_quant(x2d, g=group_size, gp=group_size, q_out=q, scale_out=scale, spg=1, stream=_stream(x2d.device))
    return q, scale


def packed_weight(weight, device):
    """The GEMM layout of ``weight`` (a QuantizedWeight) on ``device``, built once per device."""
    device = torch.device(device)
    key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return weight.kernel_layout(key, lambda: _pack(weight, device))


def _pack(weight, device):
    _refuse_capture(device, "weight: its GPU layout is built on first use")
    N, K = weight.shape
    g = min(weight.group_size, K)
    Kp = _cuda.geometry(K, g)[3]
    qdtype = torch.uint8 if weight.bits == 4 else torch.int8
    q = _to(weight.qweight, device, qdtype, "qweight")
    scale = _to(weight.scale, device, torch.float32, "scale")
    zero = _to(weight.zero, device, torch.uint8, "zero") if weight.bits == 4 else None
    wbytes, mbytes = _cuda.layout_bytes(weight.bits, N, K, g)  # the extension's sizes, never recomputed here
    wpack = torch.empty(wbytes, dtype=torch.uint8, device=device)
    meta = torch.empty(mbytes, dtype=torch.uint8, device=device)
    if N:
        _cuda.pack_weight(
            q, scale, zero, bits=weight.bits, K=K, g=g, wpack_out=wpack, meta_out=meta, stream=_stream(device)
        )
    return {"wpack": wpack, "meta": meta, "g": g, "Kp": Kp}


def _capturing(device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _refuse_capture(device, what):
    if _capturing(device):
        raise RuntimeError(
            f"{what}: make one call outside CUDA graph capture first (it builds state "
            "that a captured call would only fill when the graph is replayed)"
        )


def _out_index(idx, N, device):
    """A private int64 copy of ``idx`` on ``device``: what the caller holds may change after the
    check (or be freed and its address reused), the copy cannot."""
    if idx is None:
        return None
    t = torch.as_tensor(idx) if isinstance(idx, np.ndarray) else idx
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"out_index: expected a torch tensor or NumPy array, got {type(idx).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"out_index: expected an integer dtype, got {t.dtype}")
    if tuple(t.shape) != (N,):
        raise ValueError(f"out_index: expected shape ({N},), got {tuple(t.shape)}")
    return t.detach().to(device=device, dtype=torch.int64, copy=True).contiguous()


def _is_permutation(idxs, n_out):
    """0-d bool tensor on the indices' device: do ``idxs`` together name every column of
    0..n_out-1 exactly once? Torch ops only, no host synchronisation (capturable)."""
    allidx = torch.cat(idxs)
    if allidx.numel() != n_out:
        return torch.zeros((), dtype=torch.bool, device=allidx.device)
    inside = (allidx >= 0) & (allidx < n_out)
    count = torch.zeros(n_out, dtype=torch.int32, device=allidx.device)
    count.scatter_add_(0, torch.where(inside, allidx, 0), inside.to(torch.int32))
    return count.eq(1).all()


def _raw_stream_fn():
    f = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if f is not None:
        return f
    return lambda index: int(torch.cuda.current_stream(index).cuda_stream)


_raw_stream = _raw_stream_fn()
_to_capsule = torch.utils.dlpack.to_dlpack


class PreparedLinear:
    """A quantized layer (1 or 2 parts) validated once for one CUDA device.

    ``_cuda.prepare`` checks the packed parts, output indices and bias and
    keeps their DLPack tensors alive; a call then passes only ``x``, ``y`` and a scratch
    buffer, as raw DLPack capsules (no Python-level ``__dlpack__`` exchange), and runs on the
    caller's current stream (CUDA-graph capturable: every buffer is a torch allocation, no
    host synchronisation). ``MixedLinear`` keeps one per device: the fast path of decode.

    The output indices are copied (private, never handed out) and checked once, here: a host
    synchronisation, so build it outside CUDA graph capture. ``_per_call=True`` (the functional
    ops: a layer built for one call) allows building under capture; the check then runs on the
    device and a bad index set makes the call's output all NaN instead of raising.
    """

    def __init__(self, parts, n_out, bias, device, pdl: bool = True, _per_call: bool = False):
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        capturing = _capturing(device)
        if capturing and not _per_call:
            _refuse_capture(device, "PreparedLinear / MixedLinear: the layer is prepared on its first call")
        from .ops import check_parts  # the CPU layer's rules (mixllm/ops.py imports this module lazily)

        K, g = check_parts(parts, n_out)
        c_parts, idxs = [], []
        for w, idx in parts:
            pw = packed_weight(w, device)
            oi = _out_index(idx, w.shape[0], device)
            if oi is not None:
                idxs.append(oi)
            c_parts.append((pw["wpack"], pw["meta"], w.bits, w.shape[0], oi))
        self._bad = None  # set only when built under capture: 0-d bool "the index set is not a permutation"
        if idxs:
            if len(idxs) != len(parts):
                raise ValueError("parts: give out_index for every part or for none")
            ok = _is_permutation(idxs, n_out)
            if capturing:  # no host sync allowed: every store of a bad set is skipped, y set to NaN
                self._bad = ~ok
                for i, p in enumerate(c_parts):
                    c_parts[i] = p[:4] + (torch.where(ok, p[4], -1),)
            elif not bool(ok):
                raise ValueError("out_index: must be a permutation of the output columns")
        b = None
        if bias is not None:
            b = _to(bias, device, torch.float32, "bias")
            if tuple(b.shape) != (n_out,):
                raise ValueError(f"bias: expected shape ({n_out},), got {tuple(b.shape)}")
        # pdl=False: launch the GEMM without programmatic dependent launch (for comparisons)
        self.handle = _cuda.prepare(c_parts, bias=b, K=K, g=g, stream=_stream(device), pdl=bool(pdl))
        self.K, self.g, self.n_out, self.device, self.index = K, g, n_out, device, device.index
        self._plans = {}

    def plan(self, M, cfg=-1, splits=0):
        """(cfg, splits, scratch_bytes, name) for M tokens (cached per M)."""
        key = (M, cfg, splits)
        p = self._plans.get(key)
        if p is None:
            p = _cuda.plan_call(self.handle, M, int(cfg), int(splits))
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[key] = p
        return p

    def _check_input(self, x, name="x", width=None, what=""):
        """x's dtype, device and last dimension (``width``, default K; ``what`` names it in the message)."""
        width = self.K if width is None else width
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self.device}, got {x.device}")
        if x.shape[-1] != width:
            raise ValueError(f"{name}: expected last dimension {what}{width}, got shape {tuple(x.shape)}")

    def __call__(self, x, cfg=-1, splits=0):
        self._check_input(x)
        x2 = x.reshape(-1, self.K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return self._launch(_cuda.run, x2, x.shape[:-1], cfg, splits)

    def _launch(self, entry, x2, lead, cfg, splits, *extra):
        """y [*lead, n_out] from the 2-D input x2 through the C entry (run, run_silu_mul, or run_rmsnorm with
        its ``extra`` arguments)."""
        M = x2.shape[0]
        y = torch.empty((M, self.n_out), dtype=x2.dtype, device=self.device)
        if M:
            c, sp, nbytes, _ = self.plan(M, cfg, splits)
            scratch = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            # positional: the per-call path (keywords would cost a name lookup per argument)
            entry(
                self.handle, _to_capsule(x2), _to_capsule(y), _to_capsule(scratch), c, sp,
                _raw_stream(self.index), *extra,
            )  # fmt: skip
            if self._bad is not None:
                y.masked_fill_(self._bad, float("nan"))
        return y.reshape(*lead, self.n_out)

    def silu_mul(self, gu, cfg=-1, splits=0):
        """``self(F.silu(gu[..., :K]) * gu[..., K:])`` (the down projection of a gated MLP whose gate and up
        projections are one fused layer), equal to it bit for bit on gu's dtype, without storing the
        product: the activation quantizer reads gu. Layers outside the default geometry (group size 128,
        K a multiple of 8) take the unfused ops."""
        self._check_input(gu, "gu", 2 * self.K, "2 * K = ")
        if self.g != 128 or self.K % 8:
            return self(torch.nn.functional.silu(gu[..., : self.K]) * gu[..., self.K :], cfg, splits)
        g2 = _aligned16(gu.reshape(-1, 2 * self.K))
        return self._launch(_cuda.run_silu_mul, g2, gu.shape[:-1], cfg, splits)

    def rmsnorm(self, x, w, eps, cfg=-1, splits=0):
        """``self(rmsnorm(x))`` for a Llama-style RMSNorm of weight ``w`` (x's dtype, [K]) and ``eps``:
        ``w * (x * rsqrt(mean(x^2) + eps))`` with the sum of squares in float32 and both products rounded
        to x's dtype, as Hugging Face's ``LlamaRMSNorm`` computes it (``mixllm.nn.rmsnorm_reference``), without
        storing the normalized x: the activation quantizer reads x. The sum of squares runs in another
        order than torch's reduction, so an element's rounding can differ from the eager ops in rare
        cases. Layers outside the kernel's geometry (group size 128, K a multiple of 8, at most 32768)
        take the eager ops."""
        self._check_input(x)
        if not isinstance(w, torch.Tensor) or w.shape != (self.K,):
            raise ValueError(f"w: expected a tensor of shape ({self.K},), got {getattr(w, 'shape', type(w).__name__)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"w: expected dtype {x.dtype} on {x.device} (x's), got {w.dtype} on {w.device}")
        if self.g != 128 or self.K % 8 or self.K > 32768:
            return self(rmsnorm_reference(x, w, eps), cfg, splits)
        x2, w = _aligned16(x.reshape(-1, self.K)), _aligned16(w)
        return self._launch(_cuda.run_rmsnorm, x2, x.shape[:-1], cfg, splits, _to_capsule(w), float(eps))


def _aligned16(t):
    """t contiguous and starting 16-byte aligned (the fused quantizers' 16-byte loads; a view at an odd
    offset is copied)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def qlinear(x2d, parts, n_out, bias, lead, cfg: int = -1, splits: int = 0):
    """``y = x2d W^T + bias`` over the quantized row parts; ``y`` has x's dtype, shape lead + (n_out,).

    ``parts``: list of ``(QuantizedWeight, out_index or None)``; ``cfg`` / ``splits`` force a tile
    configuration / split-K factor (tests), -1 / 0 let the planner choose. Validates the parts on
    every call (the out_index check: one host synchronisation, see the module docstring);
    ``PreparedLinear`` does it once.
    """
    if x2d.dtype not in _FLOATS:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x2d.dtype}")
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"parts: the CUDA kernels take 1 or 2 parts, got {len(parts)}")
    if n_out == 0:
        for w, idx in parts:
            _out_index(idx, w.shape[0], x2d.device)
        return torch.empty((*lead, n_out), dtype=x2d.dtype, device=x2d.device)
    lin = PreparedLinear(parts, n_out, bias, x2d.device, _per_call=True)
    return lin(x2d, cfg, splits).reshape(*lead, n_out)


def plan(M, Ns, K, group_size=128, cfg=-1, splits=0, device=None):
    """(cfg, splits, name) the planner picks for M tokens over parts of Ns rows (for tests/benchmarks)."""
    dev = torch.cuda.current_device() if device is None else torch.device(device).index
    g = min(group_size, K)
    Kp = _cuda.geometry(K, g)[3]
    return _cuda.plan(dev, M, tuple(Ns), Kp, cfg, splits)
