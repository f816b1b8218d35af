"""Calibration statistics for every method: the one pass that hooks the layers, accumulates GPTQ
Hessians (:class:`mixllm.hessian.HessianAccumulator`), keeps sampled input rows and, for MixLLM, the
per-feature salience (docs/spec.md §3).

:func:`collect` is the one pass, one calibration window (a sequence of token ids) at a time:
  * a forward hook on every target ``nn.Linear`` adds ``2 X^T X`` of its input to the layer's Hessian
    (with ``share_inputs``, layers fed the same tensor, e.g. q/k/v, share one matrix) and, with
    ``keep_p``, keeps a random sample of its input rows (SliM-LLM's search reads layer outputs);
  * with salience on (:class:`_Salience`), the LM loss of the window on itself (labels = inputs, mean over
    tokens, as the reference) is back-propagated; a hook on each layer's output takes that window's
    output gradient ``g`` [S, N] and, with the layer's input ``X`` [S, K] and low-bit quantization error
    ``delta = Q(W) - W``, adds ``S_c += |t_c + t_c^2 / 2|`` with ``t = (g * (X @ delta^T)).sum(0)``
    (``ops.salience_accumulate_io``): this is ``t_c = G_c . delta_c`` for the weight gradient
    ``G = g^T X``, which is never formed. Everything stays on the layer's device; parameters get no
    ``.grad``.

Two entry points read it: :func:`calibrate` (MixLLM: a :class:`Calibration` with Hessians and salience)
and :func:`mixllm.methods.baselines.collect_stats` (the weight-only methods: per-layer ``LayerStats``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .hessian import HessianAccumulator

__all__ = ["Calibration", "target_linears", "calibrate", "collect", "calibration_windows", "rtn_delta"]


def target_linears(model: nn.Module, include_lm_head: bool = False) -> List[Tuple[str, nn.Linear]]:
    """The layers quantized by default: every ``nn.Linear`` except the output head (docs/spec.md §4)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and (include_lm_head or m is not head)]
    if not out:
        raise ValueError("model has no nn.Linear layers to quantize")
    return out


def rtn_delta(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """``dequant(quant(W)) - W`` for round-to-nearest asymmetric group-wise quantization (float32), on
    ``weight``'s device: the C op on the host, the same float32 arithmetic in torch on a GPU."""
    if weight.is_cuda:
        return _rtn_dequant_torch(weight.detach().float(), bits, group_size) - weight.detach().float()
    W = weight.detach().float().cpu().contiguous()
    q, s, z = ops.quantize_weight(W, bits, group_size)
    return ops.dequantize_weight(q, s, z, group_size) - W


def _rtn_dequant_torch(W: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """csrc/quant.c ``mix_quantize_asym`` + ``mix_dequantize`` in torch (same float32 operations)."""
    N, K = W.shape
    g = min(group_size, K) if K % group_size else group_size
    pad = (-K) % g
    Wp = torch.nn.functional.pad(W, (0, pad)).reshape(N, -1, g)
    if pad:  # padding must not widen the last group's range
        last = W[:, (K // g) * g :]
        lo = torch.cat([Wp[:, :-1].amin(-1), last.amin(-1, keepdim=True)], 1)
        hi = torch.cat([Wp[:, :-1].amax(-1), last.amax(-1, keepdim=True)], 1)
    else:
        lo, hi = Wp.amin(-1), Wp.amax(-1)
    qmax = float(2**bits - 1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    s = (hi - lo) / torch.full_like(hi, qmax)  # a tensor divisor: CUDA divides by a scalar via its reciprocal
    ok = s > 0
    s = torch.where(ok, s, torch.ones_like(s))
    z = torch.where(ok, torch.round(-lo / s).clamp(0.0, qmax), torch.zeros_like(s))
    q = (torch.round(Wp / s[..., None]) + z[..., None]).clamp_(0.0, qmax)
    return ((q - z[..., None]) * s[..., None]).reshape(N, -1)[:, :K]


@dataclass
class Calibration:
    """What one calibration pass measured, reusable across budgets (e.g. a bit-budget sweep).

    ``hessians[name]``: float64 [K, K] ``2 X^T X / n_tokens`` (shared objects for layers with the same
    input); ``salience[name]``: float64 [N] summed over sequences, or absent; ``quant_cache``:
    quantizer results memoised by the methods (full-matrix GPTQ codes per bit-width).
    """

    names: List[str]
    hessians: Dict[str, torch.Tensor] = field(default_factory=dict)
    salience: Dict[str, np.ndarray] = field(default_factory=dict)
    n_samples: int = 0
    n_tokens: int = 0
    salience_bits: int = 4
    quant_cache: Dict = field(default_factory=dict, repr=False)

    def groups(self) -> List[List[str]]:
        """Layers grouped by shared Hessian (same input), in layer order."""
        out: Dict[int, List[str]] = {}
        for n in self.names:
            if n in self.hessians:
                out.setdefault(id(self.hessians[n]), []).append(n)
        return list(out.values())


def calibration_windows(calib) -> List[torch.Tensor]:
    """The calibration windows as LongTensors [1, L]: from token ids [n, L] or [L], a list of 1-D / 2-D
    token-id tensors (one window each, lengths may differ), or an object with a ``samples`` /
    ``input_ids`` attribute holding either."""
    if calib is None:
        raise ValueError("calib: these methods need calibration samples (a list of token-id tensors)")
    for attr in ("samples", "input_ids"):
        if hasattr(calib, attr) and not isinstance(calib, torch.Tensor):
            calib = getattr(calib, attr)
    if isinstance(calib, torch.Tensor):
        calib = [calib[i] for i in range(calib.shape[0])] if calib.dim() == 2 else [calib]
    out = [torch.as_tensor(s).reshape(1, -1).long() for s in calib]
    if not out:
        raise ValueError("calib: got no samples")
    return out


class _Salience:
    """MixLLM's salience (docs/spec.md §3) of every layer, summed over the windows: float64 [N] per
    layer on the layer's device, fed by :meth:`hook` from the backward pass of each window's LM loss.

    ``delta_fn(name, layer)`` gives the quantization error (default: round-to-nearest ``bits``-bit,
    group ``group_size``); ``cache_deltas``: keep every layer's ``delta`` for the whole pass (default:
    on the host only; on a GPU it is recomputed per window, which keeps the memory at the model's plus
    one layer's)."""

    def __init__(
        self, layers, bits: int, group_size: int, delta_fn=None, cache_deltas: Optional[bool] = None, kind="taylor"
    ):
        if kind not in ops.SALIENCE_KINDS:
            raise ValueError(f"salience_kind: expected one of {ops.SALIENCE_KINDS}, got {kind!r}")
        self.bits, self.group_size, self.kind = bits, group_size, kind
        self.delta_fn, self.cache_deltas = delta_fn, cache_deltas
        self.deltas: Dict[str, torch.Tensor] = {}
        self.acc = {n: torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device) for n, m in layers}

    def delta(self, name: str, mod: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        d = self.deltas.get(name)
        if d is None:
            if self.delta_fn:
                d = self.delta_fn(name, mod).to(mod.weight.device)
            else:
                d = rtn_delta(mod.weight, self.bits, self.group_size)
            keep = self.cache_deltas
            if keep is None:
                keep = self.delta_fn is not None or not mod.weight.is_cuda
            d = d.to(dtype)
            if keep:
                self.deltas[name] = d
        return d

    def hook(self, name: str, mod: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> Optional[torch.Tensor]:
        """From the forward hook of layer ``name`` (input ``x``, output ``out``): add this window's
        salience (e.g. ``|t_c + t_c^2 / 2|``) once the output's gradient ``g`` arrives. For the kinds
        taken at the quantized point (``ops.QUANTIZED_POINT_KINDS``) returns the output of ``W + delta``,
        ``out + x @ delta^T``, which the forward hook puts in place of ``out``."""
        if not out.requires_grad:
            return None
        x2 = x.detach().reshape(-1, x.shape[-1])
        # the GEMM x @ delta^T in the activations' precision on GPUs (bf16 / fp16), else float32
        dt = x2.dtype if (x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16)) else torch.float32
        new_out = u = None
        if self.kind in ops.QUANTIZED_POINT_KINDS:
            u = x.reshape(-1, x.shape[-1]).to(dt) @ self.delta(name, mod, dt).T
            new_out = out + u.reshape(out.shape).to(out.dtype)
            u = u.detach()  # kept for the backward instead of a second delta and GEMM

        def grad_hook(g):
            d = self.delta(name, mod, dt) if u is None else None
            ops.salience_accumulate_io(self.acc[name], x2, g.reshape(-1, g.shape[-1]), d, kind=self.kind, u=u)

        (out if new_out is None else new_out).register_hook(grad_hook)
        return new_out

    @staticmethod
    def run_window(model: nn.Module, ids: torch.Tensor) -> None:
        """Forward and backward of the window's LM loss on itself, gradients to the embeddings only."""
        e = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = model(inputs_embeds=e, labels=ids, use_cache=False).loss
        torch.autograd.grad(loss, e)

    def result(self) -> Dict[str, np.ndarray]:
        return {n: a.cpu().numpy() for n, a in self.acc.items()}


def _input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embeddings' device (a model split over devices), else the
    first parameter's."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def _no_cache_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` for models that take it (Hugging Face): calibration needs no KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def collect(
    model: nn.Module,
    windows: Sequence[torch.Tensor],
    layers: Sequence[Tuple[str, nn.Linear]],
    hessian: bool = True,
    share_inputs: bool = False,
    keep_p: float = 0.0,
    seed: int = 0,
    salience: Optional[_Salience] = None,
    progress: bool = False,
) -> Tuple[Dict[str, HessianAccumulator], int]:
    """The one calibration pass: every window (LongTensor [1, L], see :func:`calibration_windows`)
    through ``model`` (put in eval mode, parameters frozen; both restored) with hooks on ``layers``.

    Returns ``(accumulators, n_tokens)``: with ``hessian``, one :class:`HessianAccumulator` per layer
    name (with ``share_inputs``, the same object for layers whose input is the same tensor; a layer
    that never ran gets an empty one: zero Hessian, ``n = 0``), each keeping input rows with
    probability ``keep_p`` (one generator seeded with ``seed`` for the pass). ``salience``: a
    :class:`_Salience` (or any object with its ``hook(name, layer, x, out)`` and ``run_window(model,
    ids)``; ``x`` is the live input: detach it before keeping it), fed by the backward pass of each
    window's loss (the model must then be a Hugging Face causal LM)."""
    layers = list(layers)
    device = _input_device(model)
    fwd_kwargs = _no_cache_kwargs(model)
    gen = torch.Generator().manual_seed(seed)
    H: Dict[str, HessianAccumulator] = {}
    share: Dict[str, str] = {}  # layer -> the layer whose Hessian it uses (same input tensor)
    first_inputs: Dict[str, torch.Tensor] = {}
    state = {"window": 0}

    def fwd_hook(name):
        def hook(mod, inp, out):
            x = inp[0].detach()
            if hessian:
                if share_inputs and state["window"] == 0:
                    for other, xo in first_inputs.items():
                        if other not in share and xo is inp[0]:  # same tensor object: share
                            share[name] = other
                            break
                    first_inputs[name] = inp[0]
                if name not in share:
                    if name not in H:
                        H[name] = HessianAccumulator(x.shape[-1], device=x.device, keep_p=keep_p, generator=gen)
                    H[name].add(x)
            if salience is not None:
                # the live input: a quantized-point salience's output change x @ delta^T must pass
                # gradients back to the earlier layers (it returns the replaced output, else None)
                return salience.hook(name, mod, inp[0], out)
            return None

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in layers]
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_tokens = 0
    try:
        for i, w in enumerate(tqdm(windows, desc="calibration", disable=not progress)):
            state["window"] = i
            ids = w.to(device)
            if salience is not None:
                salience.run_window(model, ids)
            else:
                with torch.no_grad():
                    model(ids, **fwd_kwargs)
            if i == 0:
                first_inputs.clear()
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    if not hessian:
        return {}, n_tokens
    for name, m in layers:
        if name not in share and name not in H:  # never called
            H[name] = HessianAccumulator(m.in_features)
    return {name: H[share.get(name, name)] for name, _ in layers}, n_tokens


def calibrate(
    model: nn.Module,
    samples: torch.Tensor,
    layers: Optional[Sequence[Tuple[str, nn.Linear]]] = None,
    hessian: bool = True,
    salience: bool = True,
    salience_bits: int = 4,
    group_size: int = 128,
    delta_fn: Optional[Callable[[str, nn.Linear], torch.Tensor]] = None,
    progress: bool = True,
    cache_deltas: Optional[bool] = None,
    salience_kind: str = "taylor",
) -> Calibration:
    """MixLLM's calibration pass over ``samples`` (integer tensor [n, seq_len] of token ids): Hessians
    of the target layers (layers reading the same input share one) and salience.

    ``delta_fn(name, layer)`` gives the quantization error used for salience (default: round-to-
    nearest ``salience_bits``-bit, group ``group_size``, as the reference's searcher does).
    Everything is accumulated on each layer's own device (a model split over GPUs works as is).
    ``cache_deltas``: keep every layer's ``delta`` for the whole pass (default: on the host only; on a
    GPU it is recomputed per sequence, which keeps the memory at the model's plus one layer's).
    ``salience_kind``: ``"taylor"`` (MixLLM's ``|t + t^2/2|`` per sequence), ``"fisher"`` (per-token
    empirical Fisher term) or ``"restore"`` (taken at the quantized point: every layer of ``layers``
    runs at ``W + delta`` during the pass, so it refuses ``hessian=True``), see
    :func:`mixllm.ops.salience_accumulate_io`.
    """
    if not isinstance(samples, torch.Tensor) or samples.dtype not in (torch.int64, torch.int32):
        raise TypeError("samples: expected an integer torch.Tensor [n, seq_len] of token ids")
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] < 2:
        raise ValueError(f"samples: expected shape [n >= 1, seq_len >= 2], got {tuple(samples.shape)}")
    if hessian and salience and salience_kind in ops.QUANTIZED_POINT_KINDS:
        raise ValueError(
            f"salience_kind={salience_kind!r} runs the layers at W + delta, so the Hessians of the same pass "
            "would be the quantized model's: compute them in a pass of their own (hessian=False here)"
        )
    layers = list(layers) if layers is not None else target_linears(model)
    cal = Calibration(names=[n for n, _ in layers], salience_bits=salience_bits)
    if not (hessian or salience):
        return cal
    sal = _Salience(layers, salience_bits, group_size, delta_fn, cache_deltas, salience_kind) if salience else None
    acc, cal.n_tokens = collect(
        model, calibration_windows(samples), layers, hessian=hessian, share_inputs=True, salience=sal, progress=progress
    )
    cal.n_samples = int(samples.shape[0])
    host = {id(a): a.hessian("cpu") for a in acc.values()}  # one host copy per shared accumulator
    cal.hessians = {name: host[id(a)] for name, a in acc.items()}
    if sal is not None:
        cal.salience = sal.result()
    return cal
