"""Calibration statistics for the quantizers: per-feature salience (docs/spec.md §3) and GPTQ Hessians.

One pass over the calibration sequences, one sequence at a time:
  * a forward hook on every target ``nn.Linear`` adds ``2 X^T X`` of its input to the layer's Hessian
    (:class:`mixllm.hessian.HessianAccumulator`; layers fed the same tensor, e.g. q/k/v, share one matrix);
  * with salience on, the LM loss of the sequence on itself (labels = inputs, mean over tokens, as the
    reference) is back-propagated; a hook on each layer's output takes that sequence's output gradient
    ``g`` [S, N] and, with the layer's input ``X`` [S, K] and low-bit quantization error
    ``delta = Q(W) - W``, adds ``S_c += |t_c + t_c^2 / 2|`` with ``t = (g * (X @ delta^T)).sum(0)``
    (``ops.salience_accumulate_io``): this is ``t_c = G_c . delta_c`` for the weight gradient
    ``G = g^T X``, which is never formed. Everything stays on the layer's device; parameters get no
    ``.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .hessian import HessianAccumulator

__all__ = ["Calibration", "target_linears", "calibrate", "rtn_delta"]


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
) -> Calibration:
    """Run the calibration pass over ``samples`` (LongTensor [n, seq_len] of token ids).

    ``delta_fn(name, layer)`` gives the quantization error used for salience (default: round-to-
    nearest ``salience_bits``-bit, group ``group_size``, as the reference's searcher does).
    Everything is accumulated on each layer's own device (a model split over GPUs works as is).
    ``cache_deltas``: keep every layer's ``delta`` for the whole pass (default: on the host only; on a
    GPU it is recomputed per sequence, which keeps the memory at the model's plus one layer's).
    """
    if not isinstance(samples, torch.Tensor) or samples.dtype not in (torch.int64, torch.int32):
        raise TypeError("samples: expected an integer torch.Tensor [n, seq_len] of token ids")
    if samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] < 2:
        raise ValueError(f"samples: expected shape [n >= 1, seq_len >= 2], got {tuple(samples.shape)}")
    layers = list(layers) if layers is not None else target_linears(model)
    names = [n for n, _ in layers]
    cal = Calibration(names=names, salience_bits=salience_bits)
    if not (hessian or salience):
        return cal
    emb = model.get_input_embeddings()
    device = emb.weight.device

    deltas: Dict[str, torch.Tensor] = {}
    acc: Dict[str, torch.Tensor] = {}

    def delta_of(name, m, dtype):
        d = deltas.get(name)
        if d is None:
            d = delta_fn(name, m).to(m.weight.device) if delta_fn else rtn_delta(m.weight, salience_bits, group_size)
            keep = cache_deltas if cache_deltas is not None else (delta_fn is not None or not m.weight.is_cuda)
            d = d.to(dtype)
            if keep:
                deltas[name] = d
        return d

    if salience:
        for name, m in layers:
            acc[name] = torch.zeros(m.out_features, dtype=torch.float64, device=m.weight.device)

    H: Dict[str, HessianAccumulator] = {}
    share: Dict[str, str] = {}  # layer -> the layer whose Hessian it uses (same input tensor)
    first_inputs: Dict[str, torch.Tensor] = {}
    state = {"sample": 0}

    def fwd_hook(name):
        def hook(mod, inp, out):
            x = inp[0].detach()
            if hessian:
                if state["sample"] == 0:
                    for other, xo in first_inputs.items():
                        if other not in share and xo is inp[0]:  # same tensor object: share
                            share[name] = other
                            break
                    first_inputs[name] = inp[0]
                if name not in share:
                    H.setdefault(name, HessianAccumulator(x.shape[-1], device=x.device)).add(x)
            if salience and out.requires_grad:

                def grad_hook(g, x=x, mod=mod):
                    x2 = x.reshape(-1, x.shape[-1])
                    # the GEMM x @ delta^T in the activations' precision on GPUs (bf16 / fp16), else float32
                    dt = x2.dtype if (x2.is_cuda and x2.dtype in (torch.bfloat16, torch.float16)) else torch.float32
                    ops.salience_accumulate_io(acc[name], x2, g.reshape(-1, g.shape[-1]), delta_of(name, mod, dt))

                out.register_hook(grad_hook)

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in layers]
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for i in tqdm(range(samples.shape[0]), desc="calibration", disable=not progress):
            state["sample"] = i
            ids = samples[i : i + 1].to(device)
            if salience:
                e = emb(ids).detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = model(inputs_embeds=e, labels=ids, use_cache=False).loss
                torch.autograd.grad(loss, e)
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            first_inputs.clear() if i == 0 else None
            cal.n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    cal.n_samples = int(samples.shape[0])
    if hessian:
        for name, a in H.items():
            H[name] = a.hessian("cpu")
        for name in names:
            cal.hessians[name] = H[share.get(name, name)]
    if salience:
        cal.salience = {n: a.cpu().numpy() for n, a in acc.items()}
    return cal
