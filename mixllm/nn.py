"""``MixedLinear``: the MixLLM layer (docs/spec.md §5), a drop-in replacement for ``nn.Linear``.

Output features are split into an 8-bit part (symmetric, group-wise) and a 4-bit part (asymmetric,
group-wise, two codes per byte). The permutation ``perm`` lists the 8-bit rows first, so each part's
rows are contiguous in memory; ``ops.mixed_linear`` writes each part's columns back to their original
output positions, so the layer computes the same function, in the same feature order, as the
``nn.Linear`` it replaces. Activations are quantized once per token and group to int8 (``act_bits=8``)
or left in float (``weight_only=True``: the weights are dequantized once and cached).

All state lives in registered buffers, so ``state_dict`` / ``load_state_dict`` / ``.to(device)``
behave as for any module. The kernels' prepacked layouts, and the layer prepared for them (its
constant arrays checked and converted once, so that a call passes only ``x`` and ``y`` into C), are
rebuilt lazily per device after ``.to()`` / ``load_state_dict``.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["MixedLinear"]

# torch.compile: traced code reaches a layer through the custom op below, which holds the layer's
# key (an int: a graph can keep it as a constant), not the layer; the op looks the layer up here at
# run time and runs its eager forward (the prepared kernels and their per-device caches).
_LAYERS: "dict[int, weakref.ref]" = {}
_KEYS = itertools.count()


def _register(layer: "MixedLinear") -> int:
    key = next(_KEYS)
    _LAYERS[key] = weakref.ref(layer, lambda _, key=key: _LAYERS.pop(key, None))
    return key


def _layer(key: int, op: str) -> "MixedLinear":
    """The live layer registered under ``key`` (the custom ops below run its eager forward)."""
    ref = _LAYERS.get(key)
    m = ref() if ref is not None else None
    if m is None:
        raise RuntimeError(f"mixllm::{op}: layer {key} no longer exists")
    return m


def _fake_output(x, layer, out_features):
    """The custom ops' output under tracing: x's leading dimensions, out_features columns."""
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("mixllm::mixed_linear", mutates_args=())
def _mixed_linear_op(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    # a fresh tensor: a custom op's output may not alias its input or be shared
    return _layer(layer, "mixed_linear")._forward_eager(x)


@torch.library.custom_op("mixllm::mixed_linear_silu_mul", mutates_args=())
def _mixed_linear_silu_mul_op(gu: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return _layer(layer, "mixed_linear_silu_mul")._forward_silu_mul_eager(gu)


_mixed_linear_op.register_fake(_fake_output)
_mixed_linear_silu_mul_op.register_fake(_fake_output)


def rmsnorm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's ``LlamaRMSNorm`` (Mistral's, Qwen2's and Qwen3's are the same): the eager ops that
    ``MixedLinear.forward_rmsnorm`` stands for."""
    v = x.to(torch.float32)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return w * v.to(x.dtype)


class MixedLinear(nn.Module):
    """``y = x W^T + b`` with ``n8`` output features in 8-bit and the rest in 4-bit.

    Buffers: ``perm`` int64 [N] (original indices: the 8-bit rows first), ``qweight4`` uint8
    [N - n8, ceil(K/2)], ``scale4`` float32 [N - n8, G], ``zero4`` uint8 [N - n8, G], ``qweight8`` int8
    [n8, K], ``scale8`` float32 [n8, G], ``bias`` float32 [N] (optional). ``G = ceil(K / group_size)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n8: int = 0,
        bias: bool = True,
        group_size: int = 128,
        weight_only: bool = False,
        device=None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(n8, bool) or not isinstance(n8, (int, np.integer)) or not 0 <= n8 <= out_features:
            raise ValueError(f"n8: expected an integer in [0, {out_features}], got {n8!r}")
        self.in_features, self.out_features, self.n8 = int(in_features), int(out_features), int(n8)
        self.group_size, self.weight_only = int(group_size), bool(weight_only)
        K, n4 = self.in_features, self.out_features - self.n8
        G = (K + min(group_size, K) - 1) // min(group_size, K)
        kw = dict(device=device)
        self.register_buffer("perm", torch.arange(out_features, dtype=torch.int64, **kw))
        self.register_buffer("qweight4", torch.zeros(n4, (K + 1) // 2, dtype=torch.uint8, **kw))
        self.register_buffer("scale4", torch.ones(n4, G, dtype=torch.float32, **kw))
        self.register_buffer("zero4", torch.zeros(n4, G, dtype=torch.uint8, **kw))
        self.register_buffer("qweight8", torch.zeros(self.n8, K, dtype=torch.int8, **kw))
        self.register_buffer("scale8", torch.ones(self.n8, G, dtype=torch.float32, **kw))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, **kw))
        else:
            self.bias = None
        self._cache = {}
        self._op_key = _register(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rows8: Sequence[int] = (),
        group_size: int = 128,
        q4=None,
        q8=None,
        weight_only: bool = False,
    ) -> "MixedLinear":
        """Quantize ``linear``: rows ``rows8`` in 8-bit, the others in 4-bit.

        ``q4`` / ``q8``: optional ``(codes, scale, zero)`` for *all* N rows, as returned by
        ``ops.gptq_quantize`` / ``ops.quantize_weight`` (e.g. GPTQ results); the rows are picked
        from them. Without them, round-to-nearest is used.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected torch.nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach().float().cpu()
        N, K = W.shape
        rows8 = torch.as_tensor(np.asarray(rows8, dtype=np.int64).reshape(-1))
        if rows8.numel() and (int(rows8.min()) < 0 or int(rows8.max()) >= N):
            raise ValueError(f"rows8: indices must lie in [0, {N})")
        if torch.unique(rows8).numel() != rows8.numel():
            raise ValueError("rows8: duplicate indices")
        rows8 = torch.sort(rows8).values
        mask = torch.ones(N, dtype=torch.bool)
        mask[rows8] = False
        rows4 = torch.nonzero(mask).flatten()
        m = cls(
            K, N, n8=int(rows8.numel()), bias=linear.bias is not None, group_size=group_size, weight_only=weight_only
        )
        m.perm.copy_(torch.cat([rows8, rows4]))
        if rows4.numel():
            codes, s, z = q4 if q4 is not None else ops.quantize_weight(W[rows4], 4, group_size)
            if q4 is not None:
                codes, s, z = (torch.as_tensor(np.asarray(a))[rows4] for a in (codes, s, z))
            m.qweight4.copy_(ops.pack_int4(torch.as_tensor(np.asarray(codes)).contiguous()))
            m.scale4.copy_(torch.as_tensor(np.asarray(s)))
            m.zero4.copy_(torch.as_tensor(np.asarray(z)))
        if rows8.numel():
            codes, s, _ = q8 if q8 is not None else ops.quantize_weight(W[rows8], 8, group_size)
            if q8 is not None:
                codes, s = (torch.as_tensor(np.asarray(a))[rows8] for a in (codes, s))
            m.qweight8.copy_(torch.as_tensor(np.asarray(codes)))
            m.scale8.copy_(torch.as_tensor(np.asarray(s)))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    @classmethod
    def concat(cls, layers: Sequence["MixedLinear"]) -> "MixedLinear":
        """One layer whose outputs are ``layers``' outputs side by side (the same rows, codes and
        scales: the same function). The layers must share ``in_features``, ``group_size``,
        ``weight_only``, having a bias or not, and device. Used by ``mixllm.fuse.fuse_projections``
        for sibling layers that read one input."""
        layers = list(layers)
        if not layers or not all(isinstance(m, MixedLinear) for m in layers):
            raise TypeError("layers: expected a non-empty sequence of MixedLinear")
        first = layers[0]
        shared = lambda m: {  # noqa: E731
            "in_features": m.in_features,
            "group_size": m.group_size,
            "weight_only": m.weight_only,
            "has_bias": m.bias is not None,
        }
        for name in shared(first):
            vals = {shared(m)[name] for m in layers}
            if len(vals) > 1:
                raise ValueError(f"layers: expected one {name}, got {sorted(vals)}")
        devices = {m.perm.device for m in layers}
        if len(devices) > 1:
            raise ValueError(f"layers: expected one device, got {sorted(map(str, devices))}")
        has_bias = first.bias is not None
        out = cls(
            first.in_features,
            sum(m.out_features for m in layers),
            n8=sum(m.n8 for m in layers),
            bias=has_bias,
            group_size=first.group_size,
            weight_only=first.weight_only,
            device=first.perm.device,
        )
        offsets = [0]
        for m in layers:
            offsets.append(offsets[-1] + m.out_features)
        with torch.no_grad():
            # each part's rows keep their order (ascending output index, as from_linear stores them)
            rows8 = [m.perm[: m.n8] + o for m, o in zip(layers, offsets)]
            rows4 = [m.perm[m.n8 :] + o for m, o in zip(layers, offsets)]
            out.perm.copy_(torch.cat(rows8 + rows4))
            for name in ("qweight4", "scale4", "zero4", "qweight8", "scale8"):
                getattr(out, name).copy_(torch.cat([getattr(m, name) for m in layers]))
            if has_bias:
                out.bias.copy_(torch.cat([m.bias for m in layers]))
        return out

    def output_slice(self, start: int, stop: int) -> "MixedLinear":
        """The layer of output features ``start:stop`` (the inverse of ``concat``)."""
        for name, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an integer, got {v!r}")
        if not 0 <= start < stop <= self.out_features:
            raise ValueError(f"start, stop: expected 0 <= start < stop <= {self.out_features}, got {start}, {stop}")
        with torch.no_grad():
            in8 = (self.perm[: self.n8] >= start) & (self.perm[: self.n8] < stop)
            in4 = (self.perm[self.n8 :] >= start) & (self.perm[self.n8 :] < stop)
            out = MixedLinear(
                self.in_features,
                stop - start,
                n8=int(in8.sum()),
                bias=self.bias is not None,
                group_size=self.group_size,
                weight_only=self.weight_only,
                device=self.perm.device,
            )
            out.perm.copy_(torch.cat([self.perm[: self.n8][in8], self.perm[self.n8 :][in4]]) - start)
            out.qweight8.copy_(self.qweight8[in8])
            out.scale8.copy_(self.scale8[in8])
            out.qweight4.copy_(self.qweight4[in4])
            out.scale4.copy_(self.scale4[in4])
            out.zero4.copy_(self.zero4[in4])
            if self.bias is not None:
                out.bias.copy_(self.bias[start:stop])
        return out

    # ------------------------------------------------------------------ state
    def get_config(self) -> dict:
        """Constructor arguments (what ``mixllm.save`` records to rebuild the layer)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n8": self.n8,
            "bias": self.bias is not None,
            "group_size": self.group_size,
            "weight_only": self.weight_only,
        }

    @classmethod
    def from_config(cls, config: dict) -> "MixedLinear":
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict, got {type(config).__name__}")
        return cls(**config)

    @property
    def n4(self) -> int:
        return self.out_features - self.n8

    def _apply(self, fn, *args, **kwargs):
        # Any device/dtype move invalidates the kernels' prepacked layouts.
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def __setstate__(self, state):
        # copy.deepcopy / pickle: a copy gets its own kernel caches and its own key for torch.compile
        super().__setstate__(state)
        self._cache = {}
        self._op_key = _register(self)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_cache"] = {}  # prepared kernel handles are per process and device: never copied
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cache = {}
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _parts(self):
        parts = self._cache.get("parts")
        if parts is None:
            w4 = w8 = None
            if self.n4:
                w4 = ops.QuantizedWeight(
                    4, self.group_size, (self.n4, self.in_features), self.qweight4, self.scale4, self.zero4
                )
            if self.n8:
                w8 = ops.QuantizedWeight(
                    8, self.group_size, (self.n8, self.in_features), self.qweight8, self.scale8, None
                )
            # private copies of the output indices (not views of ``perm``): the prepared GPU layer
            # checks them once, so no one else may hold them; in-place edits of ``perm`` take
            # effect after load_state_dict / .to(), which drop this cache
            parts = (w4, w8, self.perm[self.n8 :].clone(), self.perm[: self.n8].clone())
            self._cache["parts"] = parts
        return parts

    def _part_list(self):
        """The present parts as (weight, output indices) pairs, as the prepared layers take them."""
        w4, w8, i4, i8 = self._parts()
        return [(w, i) for w, i in ((w4, i4), (w8, i8)) if w is not None]

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 [N, K] weight this layer represents, in the original row order."""
        W = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.perm.device)
        w4, w8, i4, i8 = self._parts()
        for w, idx in ((w4, i4), (w8, i8)):
            if w is not None:
                # the C ops read host memory: a layer kept on a GPU (e.g. without the CUDA extension,
                # where forward emulates the kernels) dequantizes from host copies
                if torch.is_tensor(w.qweight) and w.qweight.device.type != "cpu":
                    w = ops.QuantizedWeight(
                        w.bits,
                        w.group_size,
                        w.shape,
                        w.qweight.cpu(),
                        w.scale.cpu(),
                        None if w.zero is None else w.zero.cpu(),
                    )
                W[idx] = torch.as_tensor(w.dequantize()).to(W.device)
        return W

    def weight_bytes(self) -> int:
        """Bytes of the quantized state (codes, scales, zeros, permutation; bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "bias")

    @property
    def avg_bits(self) -> float:
        return (8 * self.n8 + 4 * self.n4) / self.out_features

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op for the compiler (see _mixed_linear_op)
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
            return _mixed_linear_op(x, self._op_key, self.out_features)
        return self._forward_eager(x)

    def forward_silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """``self(F.silu(gu[..., :K]) * gu[..., K:])``, K = in_features: the down projection of a gated MLP
        fed by its fused gate/up output (mixllm.fuse). On a GPU with our kernels the activation quantizer
        reads gu, and the product (rounded in gu's dtype as the eager ops round it) is never stored; the
        result is bit-identical to the unfused ops. Elsewhere it runs them."""
        K = self.in_features
        if torch.compiler.is_compiling():
            if gu.shape[-1] != 2 * K:
                raise ValueError(f"gu: expected last dimension 2 * K = {2 * K}, got shape {tuple(gu.shape)}")
            return _mixed_linear_silu_mul_op(gu, self._op_key, self.out_features)
        return self._forward_silu_mul_eager(gu)

    def _forward_silu_mul_eager(self, gu: torch.Tensor) -> torch.Tensor:
        if not isinstance(gu, torch.Tensor):
            raise TypeError(f"gu: expected a torch.Tensor, got {type(gu).__name__}")
        K = self.in_features
        if gu.shape[-1] != 2 * K:
            raise ValueError(f"gu: expected last dimension 2 * K = {2 * K}, got shape {tuple(gu.shape)}")
        if gu.is_cuda and not self.weight_only and ops.cuda_available():
            return self._prepared(gu.device).silu_mul(gu)
        return self._forward_eager(F.silu(gu[..., :K]) * gu[..., K:])

    def forward_rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """``self(rmsnorm_reference(x, w, eps))``: a projection fed by a Llama-style RMSNorm of weight ``w``
        (mixllm.fuse). On a GPU with our kernels the activation quantizer reads x and normalizes it as it
        quantizes (the normalized x is never stored; one kernel instead of the eager norm's several); the
        sum of squares runs in another order than torch's, so an element's rounding to x's dtype can
        differ from the eager ops in rare cases. Elsewhere it runs the eager ops, and so does a traced
        model: under torch.compile the norm stays in the graph, where the compiler fuses it with the
        residual add before it (measured: the fused kernel gained nothing there; docs/kernels.md)."""
        if torch.compiler.is_compiling():
            return self.forward(rmsnorm_reference(x, w, eps))
        return self._forward_rmsnorm_eager(x, w, eps)

    def _forward_rmsnorm_eager(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if (
            x.is_cuda
            and not self.weight_only
            and ops.cuda_available()
            and isinstance(w, torch.Tensor)
            and w.dtype == x.dtype
            and w.device == x.device
        ):
            return self._prepared(x.device).rmsnorm(x, w, eps)
        return self._forward_eager(rmsnorm_reference(x, w, eps))

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        lin = self._cache.get("cpu")
        if lin is not None and not x.is_cuda:  # the common CPU call: the prepared layer checks x itself
            return lin(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if self.weight_only:
            W = self._cache.get("w")
            if W is None:
                W = self._cache["w"] = self.dequantized_weight()
            return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.is_cuda:
            if not ops.cuda_available():
                return self._forward_emulated(x)
            return self._prepared(x.device)(x)
        if self.perm.is_cuda:  # CPU input to a layer kept on the GPU: the functional op copies per call
            w4, w8, i4, i8 = self._parts()
            return ops.mixed_linear(x, w4, w8, i4, i8, self.bias)
        return self._prepared_cpu()(x)

    def _prepared_cpu(self):
        """The layer checked and converted once for the CPU kernels (mixllm.ops.PreparedCPULinear):
        per call only x and y cross into C; bit-identical to ops.mixed_linear."""
        lin = self._cache.get("cpu")
        if lin is None:
            lin = self._cache["cpu"] = ops.PreparedCPULinear(self._part_list(), self.out_features, self.bias)
        return lin

    def _prepared(self, device):
        """The layer validated once for ``device`` (mixllm.cuda_ops.PreparedLinear): per call only
        x, y and a scratch buffer cross into C."""
        key = ("cuda", device)
        lin = self._cache.get(key)
        if lin is None:
            from .cuda_ops import PreparedLinear

            lin = self._cache[key] = PreparedLinear(self._part_list(), self.out_features, self.bias, device)
        return lin

    def _forward_emulated(self, x, dtype=torch.float32):
        """Same math in torch ops (fake-quantized activations), for devices without our kernels;
        ``dtype``: the product's (float64 measures what float32 rounding alone changes,
        bench/ppl_paths_cpu.py). Scales and codes are float32 in either case."""
        W = self._cache.get("w")
        if W is None:
            W = self._cache["w"] = self.dequantized_weight()
        K, g = self.in_features, min(self.group_size, self.in_features)
        xf = x.float().reshape(-1, K)
        pad = (-K) % g
        xp = F.pad(xf, (0, pad)).reshape(xf.shape[0], -1, g)
        s = xp.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        xq = (torch.round(xp / s).clamp(-127, 127).to(dtype) * s.to(dtype)).reshape(xf.shape[0], -1)[:, :K]
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.linear(xq, W.to(dtype), bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        mode = "weight_only" if self.weight_only else "act_bits=8"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n8={self.n8} "
            f"({100 * self.n8 / self.out_features:.1f}% 8-bit, {self.avg_bits:.2f} bits), "
            f"group_size={self.group_size}, bias={self.bias is not None}, {mode}"
        )
