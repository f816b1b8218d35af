"""Calibration statistics for the quantizers: per-feature salience (docs/spec.md §3) and GPTQ Hessians.

One pass over the calibration sequences, one sequence at a time:
  * a forward hook on every target ``nn.Linear`` adds ``2 X^T X`` of its input to the layer's Hessian
    (layers fed the same tensor, e.g. q/k/v, share one matrix);
  * with salience on, the LM loss of the sequence on itself (labels = inputs, mean over tokens, as the
    reference) is back-propagated; a hook on each layer's output forms that sequence's weight gradient
    ``G = grad_output^T @ X`` and the C op ``ops.salience_accumulate`` reduces it at once against the
    layer's low-bit quantization error ``delta = Q(W) - W``: ``S_c += |g_c . delta_c + (g_c . delta_c)^2 / 2|``.
    Per-sample gradients are never stored; parameters get no ``.grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops

__all__ = ["Calibration", "target_linears", "calibrate", "rtn_delta"]


def target_linears(model: nn.Module, include_lm_head: bool = False) -> List[Tuple[str, nn.Linear]]:
    """The layers quantized by default: every ``nn.Linear`` except the output head (docs/spec.md §4)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and (include_lm_head or m is not head)]
    if not out:
        raise ValueError("model has no nn.Linear layers to quantize")
    return out


def rtn_delta(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """``dequant(quant(W)) - W`` for round-to-nearest asymmetric group-wise quantization (float32)."""
    W = weight.detach().float().cpu().contiguous()
    q, s, z = ops.quantize_weight(W, bits, group_size)
    return ops.dequantize_weight(q, s, z, group_size) - W


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


def calibrate(model: nn.Module, samples: torch.Tensor, layers: Optional[Sequence[Tuple[str, nn.Linear]]] = None,
              hessian: bool = True, salience: bool = True, salience_bits: int = 4, group_size: int = 128,
              delta_fn: Optional[Callable[[str, nn.Linear], torch.Tensor]] = None,
              progress: bool = True) -> Calibration:
    """Run the calibration pass over ``samples`` (LongTensor [n, seq_len] of token ids).

    ``delta_fn(name, layer)`` gives the quantization error used for salience (default: round-to-
    nearest ``salience_bits``-bit, group ``group_size``, as the reference's searcher does).
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
    device = next(model.parameters()).device

    deltas: Dict[str, torch.Tensor] = {}
    acc: Dict[str, torch.Tensor] = {}
    if salience:
        it = tqdm(layers, desc="salience: quantization error", disable=not progress, leave=False)
        for name, m in it:
            deltas[name] = (delta_fn(name, m) if delta_fn else rtn_delta(m.weight, salience_bits, group_size))
            deltas[name] = deltas[name].float().cpu().contiguous()
            acc[name] = torch.zeros(m.out_features, dtype=torch.float64)

    H: Dict[str, torch.Tensor] = {}
    share: Dict[str, str] = {}      # layer -> the layer whose Hessian it uses (same input tensor)
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
                    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
                    h = H.get(name)
                    xtx = (x2.T @ x2).to(torch.float64).cpu()
                    H[name] = xtx if h is None else h.add_(xtx)
            if salience and out.requires_grad:
                def grad_hook(g, x=x):
                    G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                    ops.salience_accumulate(acc[name], G.cpu(), deltas[name])
                out.register_hook(grad_hook)
        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in layers]
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    try:
        for i in tqdm(range(samples.shape[0]), desc="calibration", disable=not progress):
            state["sample"] = i
            ids = samples[i:i + 1].to(device)
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
        for name, h in H.items():
            h.mul_(2.0 / cal.n_tokens)
        for name in names:
            cal.hessians[name] = H[share.get(name, name)]
    if salience:
        cal.salience = {n: a.numpy() for n, a in acc.items()}
    return cal
