"""The op surface of mixllm (docs/spec.md §7): thin wrappers over the C core ``mixllm._C``
(and ``mixllm._cuda`` for CUDA tensors where it was built).

Every op takes DLPack arrays (torch tensors on CPU/CUDA, NumPy arrays), allocates its
outputs with the caller's own array library, and returns them as that type. Inputs that
are not C-contiguous are copied to contiguous memory first (never read with wrong strides).
Bad arguments raise ``TypeError`` / ``ValueError`` naming the argument.

Formats (docs/spec.md §1), for a weight ``W[N, K]`` with group size ``g`` and ``G = ceil(K / g)``:
  * asymmetric b-bit: ``codes`` uint8 [N, K] in 0..2^b-1, ``scale`` float32 [N, G], ``zero`` uint8 [N, G]
  * symmetric 8-bit: ``codes`` int8 [N, K] in -127..127, ``scale`` float32 [N, G], no zero point
  * activations: int8 [M, K] and float32 scales [M, G], per token and group (symmetric)
  * packed 4-bit: uint8 [N, ceil(K/2)], low nibble = even k, high nibble = odd k
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import _C

__all__ = [
    "quantize_weight",
    "dequantize_weight",
    "quantize_activation",
    "pack_int4",
    "unpack_int4",
    "salience_accumulate",
    "salience_accumulate_io",
    "gptq_quantize",
    "QuantizedWeight",
    "w4a8_linear",
    "w8a8_linear",
    "mixed_linear",
    "PreparedCPULinear",
    "cpu_impls",
    "cuda_available",
]

_IMPLS = {"auto": 0, "portable": 1, "avx2": 2, "avx512vnni": 3}


# ----------------------------------------------------------------------------- helpers
def _is_torch(a) -> bool:
    return type(a).__module__.startswith("torch")


def _check_array(a, name):
    if not (hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__")):
        raise TypeError(f"{name}: expected a torch tensor or NumPy array, got {type(a).__name__}")


def _contig(a, name):
    _check_array(a, name)
    if _is_torch(a):
        return a.detach().contiguous()
    return np.ascontiguousarray(a)


def _on_cuda(a) -> bool:
    return _is_torch(a) and a.is_cuda


def _np_dtype(name):
    return {
        "float32": np.float32,
        "float64": np.float64,
        "int8": np.int8,
        "uint8": np.uint8,
        "int64": np.int64,
        "float16": np.float16,
    }[name]


def _empty(ref, shape, dtype: str):
    """Uninitialised array of the caller's library, on the caller's device."""
    if _is_torch(ref):
        import torch

        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=ref.device)
    return np.empty(tuple(shape), dtype=_np_dtype(dtype))


def _zeros(ref, shape, dtype: str):
    if _is_torch(ref):
        import torch

        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=ref.device)
    return np.zeros(tuple(shape), dtype=_np_dtype(dtype))


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


def _as_float32(a, name):
    a = _contig(a, name)
    if _dtype_name(a) != "float32":
        a = a.float() if _is_torch(a) else a.astype(np.float32)
    return a


def _check_group(group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive integer, got {group_size!r}")
    return int(group_size)


def _check_2d(a, name):
    if len(a.shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array, got {len(a.shape)}-D")


def _ngroups(K, g):
    return (K + g - 1) // g


def cuda_available() -> bool:
    """True when the CUDA extension was built (it may still find no GPU at run time)."""
    try:
        from . import _cuda  # noqa: F401

        return True
    except ImportError:
        return False


def _cuda_ops():
    try:
        from . import cuda_ops
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError(
            "mixllm was built without CUDA kernels; reinstall where nvcc is available (MIXLLM_CUDA=1 pip install .)"
        ) from e
    return cuda_ops


def cpu_impls() -> list:
    """CPU implementations of the quantized GEMM available on this machine."""
    return [k for k, v in _IMPLS.items() if k != "auto" and _C.cpu_has(v)]


# ----------------------------------------------------------------------------- formats
def quantize_weight(w, bits: int = 4, group_size: int = 128, symmetric: Optional[bool] = None):
    """Round-to-nearest group-wise quantization of ``w`` [N, K] (docs/spec.md §1).

    Asymmetric (default for bits < 8): returns ``(codes uint8, scale float32 [N,G], zero uint8 [N,G])``.
    Symmetric (default for bits == 8): returns ``(codes int8, scale, None)``.
    Raises ``ValueError`` on NaN/Inf weights.
    """
    group_size = _check_group(group_size)
    symmetric = (bits == 8) if symmetric is None else bool(symmetric)
    w = _as_float32(w, "w")
    _check_2d(w, "w")
    if _on_cuda(w):
        raise ValueError("w: weight quantization runs on the CPU; pass w.cpu()")
    N, K = w.shape
    G = _ngroups(K, group_size)
    q = _empty(w, (N, K), "int8" if symmetric else "uint8")
    scale = _empty(w, (N, G), "float32")
    zero = _zeros(w, (N, G), "uint8")
    _C.quantize_weight(
        w, bits=int(bits), group_size=group_size, symmetric=symmetric, q_out=q, scale_out=scale, zero_out=zero
    )
    return q, scale, (None if symmetric else zero)


def dequantize_weight(codes, scale, zero, group_size: int = 128):
    """Float32 ``(codes - zero) * scale`` per group; ``zero=None`` for symmetric codes."""
    group_size = _check_group(group_size)
    codes = _contig(codes, "q")
    _check_2d(codes, "q")
    out = _empty(codes, codes.shape, "float32")
    _C.dequantize_weight(
        codes, _contig(scale, "scale"), None if zero is None else _contig(zero, "zero"), group_size, out
    )
    return out


def quantize_activation(x, group_size: int = 128):
    """Dynamic int8 quantization per token and per group of ``group_size`` along K.

    ``x`` [M, K] float32/float16/bfloat16 -> ``(codes int8 [M, K], scale float32 [M, G])``.
    On CUDA tensors this runs the CUDA kernel on the current stream.
    """
    group_size = _check_group(group_size)
    x = _contig(x, "x")
    _check_2d(x, "x")
    if _on_cuda(x):
        return _cuda_ops().quantize_activation(x, group_size)
    M, K = x.shape
    q = _empty(x, (M, K), "int8")
    scale = _empty(x, (M, _ngroups(K, group_size)), "float32")
    _C.quantize_activation(x, group_size, q, scale)
    return q, scale


def pack_int4(codes):
    """uint8 codes [N, K] in 0..15 -> packed uint8 [N, ceil(K/2)] (low nibble = even k)."""
    codes = _contig(codes, "q")
    _check_2d(codes, "q")
    out = _empty(codes, (codes.shape[0], (codes.shape[1] + 1) // 2), "uint8")
    _C.pack_int4(codes, out)
    return out


def unpack_int4(packed, k: int):
    """Inverse of :func:`pack_int4`; ``k`` is the unpacked length of each row."""
    packed = _contig(packed, "packed")
    _check_2d(packed, "packed")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k: expected a non-negative integer, got {k!r}")
    out = _empty(packed, (packed.shape[0], int(k)), "uint8")
    _C.unpack_int4(packed, out)
    return out


def salience_accumulate(acc, grad, delta):
    """In place: ``acc[c] += |t + t^2/2|`` with ``t = grad[c] . delta[c]`` (docs/spec.md §3).

    ``acc`` float64 [N] (CPU), ``grad`` [N, K] float32/16/bf16, ``delta`` float32 [N, K].
    Returns ``acc``.
    """
    _check_array(acc, "acc")
    grad = _contig(grad, "grad")
    delta = _as_float32(delta, "delta")
    _C.salience_accumulate(acc, grad, delta)
    return acc


SALIENCE_KINDS = ("taylor", "fisher", "restore")
# kinds taken at the quantized point: the calibration pass runs every target layer at W + delta
QUANTIZED_POINT_KINDS = ("restore",)


def salience_accumulate_io(acc, x, grad_out, delta, kind: str = "taylor", u=None):
    """In place, for one calibration sequence, with ``u = x @ delta^T`` [S, N] (each token's output
    change when row ``c`` is quantized) and ``t = (grad_out * u).sum(0)``:

    * ``kind="taylor"`` (MixLLM's, the default): ``acc[c] += |t_c + t_c^2/2|`` — the same ``t_c = G_c .
      delta_c`` as :func:`salience_accumulate` without forming the weight gradient ``G = grad_out^T x``
      (mixllm/calib.py);
    * ``kind="fisher"``: ``acc[c] += sum_tokens (grad_out[s, c] * u[s, c])^2 / 2`` — the second-order
      term with a per-token empirical Fisher instead of the per-sequence one: no cancellation of signs
      across the tokens of a sequence (docs/method.md "Allocation ablations");
    * ``kind="restore"``: ``acc[c] += t_c - t_c^2/2`` (signed) — for ``grad_out`` taken at the
      *quantized* point (every layer at ``W + delta``), the predicted drop of the loss when row ``c``
      alone is restored (moved by ``-delta_c``): first order ``t_c``, second order with the
      per-sequence Fisher (docs/method.md "Salience at the quantized point").

    torch tensors on one device (CPU or CUDA): ``acc`` float64 [N], ``x`` [S, K] (the layer's input),
    ``grad_out`` [S, N] (the gradient of the loss w.r.t. the layer's output), ``delta`` [N, K]. The GEMM
    runs in ``delta``'s dtype (float32; bfloat16 halves its cost on GPUs), the products are summed in
    float64. ``u``: the product ``x @ delta^T`` [S, N] when the caller already has it (the quantized-point
    pass computes it in the forward); then it is used as is and ``delta`` may be None. Returns ``acc``.
    """
    import torch

    if kind not in SALIENCE_KINDS:
        raise ValueError(f"kind: expected one of {SALIENCE_KINDS}, got {kind!r}")
    if delta is None and u is None:
        raise TypeError("delta: expected a torch tensor (or u = x @ delta^T)")
    named = [(acc, "acc"), (x, "x"), (grad_out, "grad_out")]
    named += [(a, n) for a, n in ((delta, "delta"), (u, "u")) if a is not None]
    for a, name in named:
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(a).__name__}")
    if acc.dtype != torch.float64 or acc.dim() != 1:
        raise ValueError("acc: expected a float64 vector [N]")
    if x.dim() != 2 or grad_out.dim() != 2 or (delta is not None and delta.dim() != 2):
        raise ValueError("x, grad_out, delta: expected 2-D tensors [S, K], [S, N], [N, K]")
    N = acc.shape[0]
    K = delta.shape[1] if delta is not None else x.shape[1]
    if (
        grad_out.shape != (x.shape[0], N)
        or x.shape[1] != K
        or (delta is not None and delta.shape[0] != N)
        or (u is not None and u.shape != (x.shape[0], N))
    ):
        raise ValueError(
            f"shapes: acc {tuple(acc.shape)}, x {tuple(x.shape)}, grad_out {tuple(grad_out.shape)}, "
            f"delta {None if delta is None else tuple(delta.shape)}, u {None if u is None else tuple(u.shape)} "
            "do not fit acc [N], x [S, K], grad_out [S, N], delta [N, K], u [S, N]"
        )
    if len({a.device for a, _ in named}) != 1:
        raise ValueError("acc, x, grad_out, delta, u: expected tensors on one device")
    xd = x.to(delta.dtype) @ delta.T if u is None else u
    gu = grad_out.to(torch.float64) * xd.to(torch.float64)
    if kind == "fisher":
        acc.add_(gu.square().sum(0), alpha=0.5)
        return acc
    t = gu.sum(0)
    if kind == "restore":
        acc.add_(t - 0.5 * t * t)
        return acc
    acc.add_((t + 0.5 * t * t).abs_())
    return acc


def gptq_quantize(
    w,
    H=None,
    bits: int = 4,
    group_size: int = 128,
    symmetric: Optional[bool] = None,
    damp: float = 0.01,
    group_order: bool = True,
    clip: bool = True,
    clip_grid: int = 20,
    bits_per_group=None,
):
    """GPTQ quantization of ``w`` [N, K] with Hessian ``H`` [K, K] (``2 X^T X`` of calibration inputs).

    Column-by-column error compensation through the Cholesky factor of ``H^-1`` (damped by
    ``damp * mean(diag H)``), groups quantized in descending order of their ``diag(H)`` mass when
    ``group_order``, and per group a clipping search over range shrink factors ``1 - i/100``
    (``i <= clip_grid``) minimising the ``diag(H)``-weighted error when ``clip``. ``H=None`` gives
    round-to-nearest (plus the clipping search if ``clip``). ``bits_per_group`` (float32 [N, G] of
    integers) gives each group its own bit-width (SliM-LLM). Returns ``(codes, scale, zero|None)``
    in the formats of :func:`quantize_weight`.
    """
    group_size = _check_group(group_size)
    symmetric = (bits == 8) if symmetric is None else bool(symmetric)
    w = _as_float32(w, "w")
    _check_2d(w, "w")
    N, K = w.shape
    G = _ngroups(K, group_size)
    if H is not None:
        H = _contig(H, "H")
        if _dtype_name(H) != "float64":
            H = H.double() if _is_torch(H) else H.astype(np.float64)
        if _is_torch(H) and _is_torch(w) is False:
            H = H.cpu().numpy()
    if bits_per_group is not None:
        bits_per_group = _as_float32(bits_per_group, "bits_per_group")
    q = _empty(w, (N, K), "int8" if symmetric else "uint8")
    scale = _empty(w, (N, G), "float32")
    zero = _zeros(w, (N, G), "uint8")
    _C.gptq_quantize(
        w,
        H,
        bits=int(bits),
        group_size=group_size,
        symmetric=symmetric,
        damp=float(damp),
        group_order=bool(group_order),
        clip_grid=int(clip_grid) if clip else 0,
        bits_per_group=bits_per_group,
        q_out=q,
        scale_out=scale,
        zero_out=zero,
    )
    return q, scale, (None if symmetric else zero)


# ----------------------------------------------------------------------------- linear
@dataclass
class QuantizedWeight:
    """A quantized [N, K] weight in the canonical (serialised) format.

    ``qweight``: packed 4-bit uint8 [N, ceil(K/2)] (bits=4) or int8 codes [N, K] (bits=8);
    ``scale`` float32 [N, G]; ``zero`` uint8 [N, G] (bits=4) or None (bits=8).
    Kernel-specific layouts are derived from it on first use per device and cached.
    """

    bits: int
    group_size: int
    shape: tuple
    qweight: Any
    scale: Any
    zero: Any = None
    _packed: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits: the linear kernels take 4- or 8-bit weights, got {self.bits}")
        self.group_size = _check_group(self.group_size)
        N, K = (int(s) for s in self.shape)
        self.shape = (N, K)
        if K <= 0 or N < 0:
            raise ValueError(f"shape: expected (N >= 0, K > 0), got {self.shape}")
        G = _ngroups(K, min(self.group_size, K))
        want_q = (N, (K + 1) // 2) if self.bits == 4 else (N, K)
        if tuple(self.qweight.shape) != want_q:
            raise ValueError(f"qweight: expected shape {want_q}, got {tuple(self.qweight.shape)}")
        if tuple(self.scale.shape) != (N, G):
            raise ValueError(f"scale: expected shape {(N, G)}, got {tuple(self.scale.shape)}")
        if self.bits == 4 and (self.zero is None or tuple(self.zero.shape) != (N, G)):
            raise ValueError(f"zero: expected shape {(N, G)} for 4-bit weights")

    @classmethod
    def from_codes(cls, codes, scale, zero, bits: int, group_size: int):
        """From unpacked codes (uint8 for 4-bit, int8 for 8-bit) as returned by the quantizers."""
        qweight = pack_int4(codes) if bits == 4 else _contig(codes, "codes")
        return cls(
            bits,
            group_size,
            tuple(codes.shape),
            qweight,
            _contig(scale, "scale"),
            None if bits == 8 else _contig(zero, "zero"),
        )

    @classmethod
    def quantize(cls, w, bits: int = 4, group_size: int = 128):
        """Round-to-nearest convenience constructor."""
        q, s, z = quantize_weight(w, bits, group_size)
        return cls.from_codes(q, s, z, bits, group_size)

    @property
    def codes(self):
        return unpack_int4(self.qweight, self.shape[1]) if self.bits == 4 else self.qweight

    def dequantize(self):
        return dequantize_weight(self.codes, self.scale, self.zero, self.group_size)

    def nbytes(self) -> int:
        """Bytes of the canonical format (codes + scales + zero points)."""
        return sum(
            int(np.prod(a.shape)) * (a.element_size() if _is_torch(a) else a.itemsize)
            for a in (self.qweight, self.scale, self.zero)
            if a is not None
        )

    def kernel_layout(self, key: str, build):
        """The kernel layout cached under ``key`` (``"cpu"``, ``"cuda:<i>"``), made by ``build()`` on
        first use (mixllm/cuda_ops.py builds the CUDA ones through this)."""
        v = self._packed.get(key)
        if v is None:
            v = self._packed[key] = build()
        return v

    def cpu_blob(self):
        """The CPU kernels' prepacked layout (csrc/gemm_cpu.c), built once."""
        blob = self._packed.get("cpu")
        if blob is None:
            N, K = self.shape
            g = min(self.group_size, K)
            codes = self.codes
            ref = codes
            if _is_torch(codes) and codes.is_cuda:
                codes, ref = codes.cpu(), codes.cpu()
            blob = _empty(ref, (_C.cpu_blob_bytes(self.bits, N, K, g),), "uint8")
            scale = self.scale.cpu() if _on_cuda(self.scale) else self.scale
            zero = None if self.zero is None else (self.zero.cpu() if _on_cuda(self.zero) else self.zero)
            _C.cpu_prepack(
                _contig(codes, "codes"),
                _contig(scale, "scale"),
                None if zero is None else _contig(zero, "zero"),
                self.bits,
                g,
                blob,
            )
            self._packed["cpu"] = blob
        return blob


def _flatten_x(x, K):
    x = _contig(x, "x")
    if len(x.shape) < 1 or x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K}, got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-1])
    M = int(np.prod(lead)) if lead else 1
    return x.reshape(M, K), lead


def _bias32(bias, n):
    if bias is None:
        return None
    b = _as_float32(bias, "bias")
    if tuple(b.shape) != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(b.shape)}")
    return b


def _index(idx, name):
    idx = _contig(idx, name)
    if not _dtype_name(idx).startswith(("int", "uint")):  # a float / bool index would be truncated silently
        raise TypeError(f"{name}: expected an integer dtype, got {_dtype_name(idx)}")
    if _dtype_name(idx) != "int64":
        idx = idx.long() if _is_torch(idx) else idx.astype(np.int64)
    return idx


def _linear(x, parts, n_out, K, g, bias, impl):
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {sorted(_IMPLS)}, got {impl!r}")
    x2, lead = _flatten_x(x, K)
    if _dtype_name(x2) not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {_dtype_name(x2)}")
    if _on_cuda(x2):
        return _cuda_ops().qlinear(x2, parts, n_out, bias, lead)
    out = _empty(x2, (x2.shape[0], n_out), _dtype_name(x2))
    c_parts = [
        (w.cpu_blob(), w.bits, w.shape[0], None if idx is None else _index(idx, "out_index")) for w, idx in parts
    ]
    _C.cpu_qlinear(x2, c_parts, g, _bias32(bias, n_out), out, _IMPLS[impl])
    return out.reshape(*lead, n_out)


def check_parts(parts, n_out: int):
    """The parts of a prepared layer (CPU and CUDA): ``[(QuantizedWeight, out_index or None), ...]``, one K
    and group size, rows adding up to ``n_out``. Returns ``(K, group_size)``."""
    if not parts:
        raise ValueError("parts: at least one part is required")
    for w, _ in parts:
        if not isinstance(w, QuantizedWeight):
            raise TypeError(f"parts: expected mixllm.ops.QuantizedWeight parts, got {type(w).__name__}")
    K = parts[0][0].shape[1]
    g = min(parts[0][0].group_size, K)
    for w, _ in parts:
        if w.shape[1] != K or min(w.group_size, K) != g:
            raise ValueError("parts: every part needs the same K and group_size")
    if sum(w.shape[0] for w, _ in parts) != n_out:
        raise ValueError(f"parts: their rows must add up to n_out={n_out}")
    return K, g


class PreparedCPULinear:
    """A quantized layer (1 or 2 parts) checked and converted once for the CPU kernels: the CPU
    counterpart of ``mixllm.cuda_ops.PreparedLinear`` and the fast path of ``MixedLinear`` on the CPU.

    ``parts``: ``[(QuantizedWeight, out_index or None), ...]`` as for :func:`mixed_linear`. The
    constant arrays (prepacked blobs, output indices, bias) become NumPy arrays here, once: a torch
    tensor crosses into C through its ``__dlpack__`` method, which costs several times the C kernel
    itself on small layers at one token. A call passes only ``x`` and ``y``, as raw DLPack capsules
    (``torch.utils.dlpack.to_dlpack``), and gives the same bits as :func:`mixed_linear`.

    The output indices are private int64 copies, checked here to be a permutation (the C op checks
    them again each call, at O(N)). The bias is read where it lies (a NumPy view when it is a float32
    CPU tensor), so in-place edits of it take effect, as in :func:`mixed_linear`; a prepared layer
    does not see later changes of the weights: build a new one (``MixedLinear`` drops its own on
    ``.to()`` / ``load_state_dict``).
    """

    def __init__(self, parts, n_out, bias=None, impl: str = "auto"):
        import torch
        from torch.utils.dlpack import to_dlpack

        if impl not in _IMPLS:
            raise ValueError(f"impl: expected one of {sorted(_IMPLS)}, got {impl!r}")
        K, g = check_parts(parts, n_out)
        c_parts, idxs = [], []
        for w, idx in parts:
            blob = _to_np_cpu(w.cpu_blob(), "blob", np.uint8)
            oi = None
            if idx is not None:
                oi = np.array(_to_np_cpu(_index(idx, "out_index"), "out_index", np.int64), copy=True)
                if oi.shape != (w.shape[0],):
                    raise ValueError(f"out_index: expected shape ({w.shape[0]},), got {oi.shape}")
                idxs.append(oi)
            c_parts.append((blob, w.bits, w.shape[0], oi))
        if idxs:
            if len(idxs) != len(parts):
                raise ValueError("parts: give out_index for every part or for none")
            allidx = np.concatenate(idxs)
            if (
                allidx.min(initial=0) < 0
                or allidx.max(initial=0) >= n_out
                or np.bincount(allidx, minlength=n_out).max(initial=1) != 1
            ):
                raise ValueError("out_index: must be a permutation of the output columns")
        elif len(parts) != 1:
            raise ValueError("parts: out_index is required unless one part covers all outputs")
        b = _bias32(bias, n_out)
        if b is not None:
            b = _to_np_cpu(b, "bias", np.float32)  # a view of a float32 CPU tensor, not a copy
        self._c_parts, self._bias, self._impl = c_parts, b, _IMPLS[impl]
        self.K, self.g, self.n_out = K, g, n_out
        self._torch, self._to_capsule = torch, to_dlpack
        self._floats = (torch.float32, torch.float16, torch.bfloat16)

    def __call__(self, x):
        """``y = x W^T + b`` for a CPU torch tensor ``x`` [..., K] (float32/16/bf16), in ``x``'s dtype."""
        torch = self._torch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in self._floats:
            raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {_dtype_name(x)}")
        if not x.is_cpu:
            raise ValueError(f"x: expected a CPU tensor, got one on {x.device}")
        shape = x.shape
        if not shape or shape[-1] != self.K:
            raise ValueError(f"x: expected last dimension {self.K}, got shape {tuple(shape)}")
        x2 = x.detach()
        x2 = x2.view(-1, self.K) if x2.is_contiguous() else x2.reshape(-1, self.K).contiguous()
        out = torch.empty((x2.shape[0], self.n_out), dtype=x2.dtype)
        _C.cpu_qlinear(self._to_capsule(x2), self._c_parts, self.g, self._bias, self._to_capsule(out), self._impl)
        return out.view(*shape[:-1], self.n_out)


def _check_weight(w, bits, name):
    if not isinstance(w, QuantizedWeight):
        raise TypeError(f"{name}: expected a mixllm.ops.QuantizedWeight, got {type(w).__name__}")
    if w.bits != bits:
        raise ValueError(f"{name}: expected a {bits}-bit weight, got {w.bits}-bit")


def w4a8_linear(x, weight: QuantizedWeight, bias=None, impl: str = "auto"):
    """``y = x W^T + b`` with 4-bit group-wise asymmetric weights and int8 per-token-group activations.

    ``x`` [..., K] float32/float16/bfloat16; output has ``x``'s dtype, shape [..., N].
    Two-step dequantization: per group ``(Wq - z) . Aq`` in int32, then ``* Sw * Sa`` in float32.
    """
    _check_weight(weight, 4, "weight")
    N, K = weight.shape
    return _linear(x, [(weight, None)], N, K, min(weight.group_size, K), bias, impl)


def w8a8_linear(x, weight: QuantizedWeight, bias=None, impl: str = "auto"):
    """Like :func:`w4a8_linear` with 8-bit symmetric group-wise weights."""
    _check_weight(weight, 8, "weight")
    N, K = weight.shape
    return _linear(x, [(weight, None)], N, K, min(weight.group_size, K), bias, impl)


def mixed_linear(
    x, w4: Optional[QuantizedWeight], w8: Optional[QuantizedWeight], index4, index8, bias=None, impl: str = "auto"
):
    """The MixLLM layer (docs/spec.md §5): 4-bit rows ``w4`` and 8-bit rows ``w8`` of one weight.

    ``index4`` / ``index8`` (int64) give each part's rows' output columns; together they are a
    permutation of ``0..N-1``, so ``y`` comes out in the original feature order. The activations
    are quantized once and shared. Either part may be ``None`` (all rows in the other one).
    """
    parts = []
    for w, idx, bits, name in ((w4, index4, 4, "w4"), (w8, index8, 8, "w8")):
        if w is None:
            continue
        _check_weight(w, bits, name)
        if idx is None:
            raise ValueError(f"index{bits}: required with {name}")
        parts.append((w, idx))
    if not parts:
        raise ValueError("w4, w8: at least one part is required")
    K = parts[0][0].shape[1]
    g = parts[0][0].group_size
    for w, _ in parts:
        if w.shape[1] != K or w.group_size != g:
            raise ValueError("w4, w8: both parts need the same K and group_size")
    n_out = sum(w.shape[0] for w, _ in parts)
    return _linear(x, parts, n_out, K, min(g, K), bias, impl)


# ----------------------------------------------------------------------------- sister methods
# Ops of SliM-LLM, CMPQ and the weight-only layer (issue 5): csrc/cluster.c, csrc/slim.c, csrc/woq.c.
__all__ += ["kmeans1d", "slim_calibrate", "slim_gptq_quantize", "gptq_hinv_factor", "woq_dequantize", "woq_linear"]


def _check_int(v, name, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name}: expected an integer in {lo}..{hi}, got {v!r}")
    return int(v)


def _to_np_cpu(a, name, dtype):
    """A C-contiguous NumPy array of ``dtype`` (torch CPU tensors are converted)."""
    _check_array(a, name)
    if _is_torch(a):
        if a.is_cuda:
            raise ValueError(f"{name}: this op runs on the CPU; pass {name}.cpu()")
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(a, dtype=dtype)


def kmeans1d(x, k: int, weight=None, levels=None, iters: int = 50):
    """Weighted 1-D k-means of every row of ``x`` [R, n] into ``k`` levels (CMPQ's clustered levels).

    ``weight`` [R, n] (>= 0, optional) weighs each value; zero-weight values do not move the levels but
    get codes. ``levels`` (int [R], optional) gives row r only ``levels[r] <= k`` levels (the rest of its
    row of centroids repeats the last level). Deterministic: starts at the weighted quantiles
    ``(i + 0.5) / k``, runs at most ``iters`` Lloyd steps. Returns ``(centroids float32 [R, k] ascending,
    codes uint8 [R, n])`` with each value coded to its nearest level (ties to the lower one).
    """
    k = _check_int(k, "k", 1, 256)
    iters = _check_int(iters, "iters", 0, 100000)
    x = _as_float32(x, "x")
    _check_2d(x, "x")
    if _on_cuda(x):
        raise ValueError("x: k-means runs on the CPU; pass x.cpu()")
    R, n = x.shape
    if weight is not None:
        weight = _as_float32(weight, "weight")
    if levels is not None:
        levels = _contig(levels, "levels")
        if _dtype_name(levels) != "int32":
            levels = levels.int() if _is_torch(levels) else levels.astype(np.int32)
    cent = _empty(x, (R, k), "float32")
    codes = _empty(x, (R, n), "uint8")
    _C.kmeans1d(x, weight=weight, k=k, levels=levels, iters=iters, centroids_out=cent, codes_out=codes)
    return cent, codes


def _slim_args(lam, norm, tau_range, tau_n):
    """SliM-LLM's loss settings as the C entry points' keywords."""
    return dict(lam=float(lam), norm=float(norm), tau_range=float(tau_range), tau_n=_check_int(tau_n, "tau_n", 1, 1000))


def slim_calibrate(
    w, u, bits: int, threshold=None, lam: float = 1.0, norm: float = 2.4, tau_range: float = 0.1, tau_n: int = 50
):
    """SliM-LLM's salience-weighted quantizer calibration for one group ``w`` [R, len] (one row each).

    ``u`` [len] (positive) is the matching diagonal of the upper Cholesky factor of ``H^-1``; element
    salience is ``w^2 / u^2`` and values with salience ``>= threshold`` count ``lam`` times in the loss
    ``sum |dequant - w|^norm``. Searches the range factor ``p`` over ``1`` then ``(1, 1 + tau_range]`` and
    ``[1 - tau_range, 1)`` in ``tau_n`` steps each. Returns ``(scale, offset)`` float32 [R] with
    ``dequant = code * scale + offset``; ``bits == 1`` binarizes (levels ``mean +- mean|w|``).
    """
    bits = _check_int(bits, "bits", 1, 8)
    w = _to_np_cpu(w, "w", np.float32)
    _check_2d(w, "w")
    u = _to_np_cpu(u, "u", np.float64)
    R = w.shape[0]
    scale = np.empty(R, np.float32)
    offset = np.empty(R, np.float32)
    _C.slim_calibrate(
        w,
        u,
        bits=bits,
        threshold=None if threshold is None else float(threshold),
        **_slim_args(lam, norm, tau_range, tau_n),
        scale_out=scale,
        offset_out=offset,
    )
    return scale, offset


def slim_gptq_quantize(
    w,
    H,
    bits_per_group,
    group_size: int = 128,
    damp: float = 0.01,
    group_order: bool = False,
    thresholds=None,
    lam: float = 1.0,
    norm: float = 2.4,
    tau_range: float = 0.1,
    tau_n: int = 50,
    U=None,
):
    """GPTQ (the shared C implementation) with per-group bit-widths and SliM-LLM's calibration per group.

    ``w`` [N, K], ``H`` [K, K] float64 or None (no error compensation), ``bits_per_group`` [N, G]
    integers in 1..8, ``thresholds`` [G] salience thresholds (see :func:`slim_calibrate`) or None.
    ``U`` (optional, float64 [K, K]): the upper Cholesky factor of the damped ``H^-1`` (see
    :func:`gptq_hinv_factor`), which skips the C factorization (natural column order only).
    Returns ``(codes uint8 [N, K], scale float32 [N, G], offset float32 [N, G])`` with
    ``dequant = code * scale + offset`` per group (NumPy arrays).
    """
    group_size = _check_group(group_size)
    w = _to_np_cpu(w, "w", np.float32)
    _check_2d(w, "w")
    N, K = w.shape
    G = _ngroups(K, group_size)
    if H is not None:
        H = _to_np_cpu(H, "H", np.float64)
    bpg = _to_np_cpu(bits_per_group, "bits_per_group", np.float32)
    thr = None if thresholds is None else _to_np_cpu(thresholds, "thresholds", np.float64)
    q = np.empty((N, K), np.uint8)
    scale = np.empty((N, G), np.float32)
    offset = np.empty((N, G), np.float32)
    if U is not None:
        U = _to_np_cpu(U, "U", np.float64)
    _C.slim_gptq(
        w,
        H,
        bits_per_group=bpg,
        group_size=group_size,
        damp=float(damp),
        group_order=bool(group_order),
        thresholds=thr,
        **_slim_args(lam, norm, tau_range, tau_n),
        q_out=q,
        scale_out=scale,
        offset_out=offset,
        U=U,
    )
    return q, scale, offset


def gptq_hinv_factor(H, damp: float = 0.01):
    """Upper Cholesky factor ``U`` of ``(H' + damp * mean(diag H') I)^-1`` with ``H'`` = ``H`` whose dead
    inputs (``diag <= 0``) get 1 on the diagonal — what the C GPTQ computes — via LAPACK (torch).
    float64 NumPy [K, K]."""
    import torch

    H = np.array(_to_np_cpu(H, "H", np.float64), copy=True)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H: expected a square 2-D array, got shape {H.shape}")
    d = np.diag(H).copy()
    dead = d <= 0
    H[dead, dead] = 1.0
    Ht = torch.from_numpy(H)
    Ht.diagonal().add_(damp * float(np.mean(np.diag(H))))
    L, info = torch.linalg.cholesky_ex(Ht)
    if int(info) != 0:
        raise ValueError("H: not positive definite even after damping; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).numpy().copy()


def _woq_spec(kind, codes, group_size=0, scale=None, offset=None, codebook=None, rowptr=None, cols=None, vals=None):
    if kind not in ("group", "codebook"):
        raise ValueError(f"kind: expected 'group' or 'codebook', got {kind!r}")
    codes = _contig(codes, "codes")
    if (rowptr is None) != (cols is None) or (cols is None) != (vals is None):
        raise ValueError("rowptr, cols, vals: give all three (sparse part) or none")
    sp = (
        (None, None, None)
        if rowptr is None
        else (_index(rowptr, "rowptr"), _index(cols, "cols"), _as_float32(vals, "vals"))
    )
    if kind == "group":
        if scale is None or offset is None:
            raise ValueError("scale, offset: required for kind='group'")
        return (
            "group",
            _check_group(group_size),
            codes,
            _as_float32(scale, "scale"),
            _as_float32(offset, "offset"),
            *sp,
        )
    if codebook is None:
        raise ValueError("codebook: required for kind='codebook'")
    return ("codebook", 0, codes, _as_float32(codebook, "codebook"), None, *sp)


def woq_dequantize(
    kind: str, codes, group_size: int = 0, scale=None, offset=None, codebook=None, rowptr=None, cols=None, vals=None
):
    """Float32 [N, K] weight of a weight-only format (CPU).

    ``kind='group'``: ``W[n,k] = codes[n,k] * scale[n,k//g] + offset[n,k//g]`` (per-group bits are just
    code ranges); ``kind='codebook'``: ``W[n,k] = codebook[k, codes[n,k]]`` (levels per input channel).
    An optional sparse part (CSR by output row: ``rowptr`` [N+1], ``cols`` [nnz] int64, ``vals`` [nnz])
    replaces ``W[n, cols]`` with ``vals`` (16-bit outliers).
    """
    spec = _woq_spec(kind, codes, group_size, scale, offset, codebook, rowptr, cols, vals)
    codes = spec[2]
    _check_2d(codes, "codes")
    if _on_cuda(codes):
        raise ValueError("codes: woq_dequantize runs on the CPU (mixllm.nn_weight_only dequantizes on CUDA)")
    out = _empty(codes, codes.shape, "float32")
    _C.woq_dequantize(spec, out)
    return out


def woq_linear(
    x,
    kind: str,
    codes,
    group_size: int = 0,
    scale=None,
    offset=None,
    codebook=None,
    rowptr=None,
    cols=None,
    vals=None,
    bias=None,
):
    """``y = x W^T + b`` dequantizing ``W`` (see :func:`woq_dequantize`) on the fly, one output row at a
    time (CPU). ``x`` [..., K] float32/float16/bfloat16; ``y`` has ``x``'s dtype, shape [..., N]."""
    spec = _woq_spec(kind, codes, group_size, scale, offset, codebook, rowptr, cols, vals)
    codes = spec[2]
    _check_2d(codes, "codes")
    N, K = codes.shape
    x2, lead = _flatten_x(x, K)
    if _dtype_name(x2) not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {_dtype_name(x2)}")
    if _on_cuda(x2):
        raise ValueError("x: woq_linear runs on the CPU (mixllm.nn_weight_only handles CUDA)")
    out = _empty(x2, (x2.shape[0], N), _dtype_name(x2))
    _C.woq_linear(x2, spec, _bias32(bias, N), out)
    return out.reshape(*lead, N)
