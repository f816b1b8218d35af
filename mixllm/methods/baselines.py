"""Weight-only baselines (RTN, GPTQ) and what the weight-only methods share.

Both SliM-LLM and CMPQ compare against round-to-nearest and GPTQ at the same group size, so they live
beside them. Every weight-only config here has the same shape:

* ``config.quantize_linear(linear, stats) -> WeightOnlyLinear`` quantizes one ``nn.Linear`` from its
  calibration statistics (:class:`LayerStats`: the Hessian ``H = 2 X^T X / n`` of its inputs and a
  sample of input rows);
* ``config.apply(model, calib)`` swaps every ``nn.Linear`` inside the transformer blocks for its
  quantized version. Methods whose result depends on the inputs' exact values (GPTQ, SliM-LLM:
  ``config.sequential = True``) are calibrated *sequentially* as in the GPTQ paper (§4, "true
  sequential"): block by block on the outputs of the already-quantized blocks, and inside a block
  one group of linears at a time (the linears that read the same input: q/k/v, o, gate/up, down),
  each on inputs produced by the already-quantized linears before it (:func:`sequential_quantize`).
  Otherwise (RTN, CMPQ, or ``sequential=False``) the statistics of every layer are collected in one
  pass of the full-precision model (:func:`collect_stats`, an entry to the one calibration pass
  :func:`mixllm.calib.collect`).

``calib``: token ids [n, L], a list of 1-D/2-D token-id tensors (one sequence each), or an object with
a ``samples`` attribute holding either (:func:`mixllm.calib.calibration_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..calib import Calibration, calibration_windows, collect
from ..gptq import gptq
from ..hessian import HessianAccumulator
from ..modules import replace_modules
from ..nn_weight_only import WeightOnlyLinear
from ..pipeline import run_blockwise
from . import validate
from .base import WeightOnlyConfig, register

__all__ = [
    "RTNConfig",
    "GPTQConfig",
    "LayerStats",
    "collect_stats",
    "default_filter",
    "quantize_weight_only",
    "sequential_quantize",
]


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input: ``H = 2 X^T X / n`` (float64 [K, K]) and up
    to ``keep_tokens`` input rows drawn at random (float32 [T, K], for output-error searches)."""

    H: np.ndarray
    X: Optional[np.ndarray]
    n: int


def default_filter(name: str, module: nn.Module) -> bool:
    """Every ``nn.Linear`` inside the transformer blocks (``lm_head`` and embeddings stay 16-bit)."""
    return isinstance(module, nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name


def collect_stats(
    model: nn.Module, calib, filter_fn: Callable = default_filter, keep_tokens: int = 1024, seed: int = 0
) -> Dict[str, LayerStats]:
    """Per selected linear, its :class:`LayerStats` from one pass of the full-precision model over the
    calibration windows (:func:`mixllm.calib.collect`): the Hessian and up to about ``keep_tokens``
    input rows drawn at random (one generator seeded with ``seed``)."""
    windows = calibration_windows(calib)
    layers = [(n, m) for n, m in model.named_modules() if filter_fn(n, m)]
    if not layers:
        raise ValueError("model: no nn.Linear layers matched the filter")
    total_tokens = sum(w.numel() for w in windows)
    keep_p = min(1.0, keep_tokens / max(total_tokens, 1))
    acc, _ = collect(model, windows, layers, keep_p=keep_p, seed=seed)
    return {n: _layer_stats(a) for n, a in acc.items()}


def _layer_stats(acc: HessianAccumulator) -> LayerStats:
    X = acc.sample_rows()
    return LayerStats(H=acc.hessian("cpu").numpy(), X=None if X is None else X.numpy(), n=acc.n)


def sequential_quantize(
    model: nn.Module, config, calib, filter_fn: Callable = default_filter, progress: bool = True
) -> Optional[Dict[str, nn.Module]]:
    """GPTQ-style sequential calibration (GPTQ paper §4 and its ``--true-sequential`` option) through
    :func:`mixllm.pipeline.run_blockwise`: block by block, inside a block one group of linears at a time
    (the linears that read the same input), each group's ``H`` (and rows for SliM-LLM's search) from
    the samples run through the partly quantized block; the group is quantized with
    ``config.quantize_linear`` and swapped in. Memory: the hidden states of the calibration set.

    Returns the quantized modules by name (already swapped in), or None when the model has no
    ``nn.ModuleList`` of blocks holding every selected linear (the caller falls back to one pass).
    """
    samples = calibration_windows(calib)
    names = [n for n, m in model.named_modules() if filter_fn(n, m)]
    if not names:
        raise ValueError("model: no nn.Linear layers matched the filter")
    out_new: Dict[str, nn.Module] = {}

    def quantize_group(bi, group, acc):
        st = _layer_stats(acc)
        new = {n: config.quantize_linear(model.get_submodule(n), st) for n in group}
        out_new.update(new)
        return new

    done = run_blockwise(
        model,
        samples,
        names,
        quantize_group,
        keep_tokens=getattr(config, "keep_tokens", 0),
        seed=getattr(config, "seed", 0),
        progress=progress,
        desc=f"{getattr(config, 'name', 'quantize')} (sequential)",
    )
    return None if done is None else out_new


def _stats_from_calibration(cal, model, filter_fn):
    """LayerStats from a mixllm.calib.Calibration (Hessians only: no input rows)."""
    out = {}
    for n, m in model.named_modules():
        if filter_fn(n, m):
            H = cal.hessians.get(n)
            if H is None:
                raise ValueError(f"calib: the Calibration has no Hessian for {n!r}")
            H = H.numpy() if isinstance(H, torch.Tensor) else np.asarray(H)
            out[n] = LayerStats(H=H, X=None, n=int(getattr(cal, "n_tokens", 0)))
    return out


def quantize_weight_only(
    model: nn.Module, config, calib=None, filter_fn: Callable = default_filter, verbose: bool = False
) -> dict:
    """Quantize every selected linear of ``model`` in place with ``config.quantize_linear``; returns
    the report (``avg_bits``: code bits per quantized weight; ``quantized_bytes``: packed size of the
    quantized layers; ``n_layers``; ``calibration``: "sequential" or "one-pass").

    Calibration samples and ``config.sequential``: layer-by-layer on the quantized prefix
    (:func:`sequential_quantize`); precomputed ``LayerStats`` / a ``Calibration`` / no ``sequential``:
    every layer from the full-precision model's inputs."""
    is_stats = isinstance(calib, dict) and calib and all(isinstance(v, LayerStats) for v in calib.values())
    if (
        getattr(config, "sequential", False)
        and config.needs_calibration()
        and not is_stats
        and not isinstance(calib, Calibration)
    ):
        new = sequential_quantize(model, config, calib, filter_fn, progress=getattr(config, "progress", True))
        if new is not None:
            return _report(new, "sequential")
    if isinstance(calib, dict) and calib and all(isinstance(v, LayerStats) for v in calib.values()):
        stats = {n: calib[n] for n, m in model.named_modules() if filter_fn(n, m)}  # precomputed (bench sweeps)
    elif not config.needs_calibration():
        stats = {n: None for n, m in model.named_modules() if filter_fn(n, m)}
    elif isinstance(calib, Calibration):
        stats = _stats_from_calibration(calib, model, filter_fn)
    else:
        stats = collect_stats(
            model, calib, filter_fn, keep_tokens=getattr(config, "keep_tokens", 1024), seed=getattr(config, "seed", 0)
        )
    new = {}
    for name in list(stats):
        lin = model.get_submodule(name)
        new[name] = config.quantize_linear(lin, stats.pop(name))
        if verbose:
            print(f"{name}: {new[name].extra_repr()}", flush=True)
    replace_modules(model, new)
    return _report(new, "one-pass" if config.needs_calibration() else "none")


def _report(new, how):
    n_w = sum(m.codes.numel() for m in new.values())
    return {
        "avg_bits": sum(m.code_bits() for m in new.values()) / max(n_w, 1),
        "quantized_bytes": sum(m.nbytes() for m in new.values()),
        "quantized_params": n_w,
        "n_layers": len(new),
        "calibration": how,
    }


def _weight(linear):
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
    return linear.weight.detach().float().cpu().numpy()


@register("rtn", calibration=False)
@dataclass
class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest weight-only quantization: asymmetric ``bits``-bit, groups of ``group_size``
    along the input features (docs/spec.md §1 format, min/max range)."""

    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        self.bits = validate.integer_in("bits", self.bits, 2, 8)
        self.group_size = validate.group_size(self.group_size)

    def quantize_linear(self, linear: nn.Linear, stats: Optional[LayerStats] = None) -> WeightOnlyLinear:
        w = _weight(linear)
        q, s, z = ops.quantize_weight(w, self.bits, self.group_size, symmetric=False)
        return WeightOnlyLinear.from_group(
            linear, q, s, -z.astype(np.float32) * s, self.bits, self.group_size, method=self.name
        )


@register("gptq")
@dataclass
class GPTQConfig(WeightOnlyConfig):
    """GPTQ weight-only baseline (Frantar et al. 2022) on the project's C implementation: asymmetric
    ``bits``-bit groups of ``group_size``, Hessian ``2 X^T X / n`` damped by ``damp * mean(diag H)``.
    The vanilla algorithm by default; ``group_order`` / ``clip`` turn on the MixLLM refinements.
    ``sequential``: calibrate block by block on the quantized prefix as the GPTQ paper does (default;
    False: every layer from the full-precision model's inputs in one pass, which overfits small
    calibration sets: see docs/method.md)."""

    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    group_order: bool = False
    clip: bool = False
    sequential: bool = True
    keep_tokens: int = 0
    seed: int = 0

    def __post_init__(self):
        self.bits = validate.integer_in("bits", self.bits, 2, 8)
        self.group_size = validate.group_size(self.group_size)
        self.damp = validate.non_negative("damp", self.damp)

    def quantize_linear(self, linear: nn.Linear, stats: LayerStats) -> WeightOnlyLinear:
        if not isinstance(stats, LayerStats):
            raise TypeError("stats: GPTQ needs the layer's calibration statistics (LayerStats)")
        if linear.weight.is_cuda:  # the PyTorch GPTQ on the layer's GPU (same codes as the C GPTQ, mixllm/gptq.py)
            q, s, z = gptq(
                linear.weight.detach().float(),
                torch.as_tensor(stats.H, device=linear.weight.device),
                self.bits,
                self.group_size,
                symmetric=False,
                damp=self.damp,
                group_order=self.group_order,
                clip_grid=20 if self.clip else 0,
                impl="torch",
            )
            q, s, z = q.cpu().numpy(), s.cpu().numpy(), z.cpu().numpy()
            return WeightOnlyLinear.from_group(
                linear, q, s, -z.astype(np.float32) * s, self.bits, self.group_size, method=self.name
            )
        w = _weight(linear)
        if not self.group_order and not self.clip:
            # the same GPTQ (csrc/gptq.c) with the H^-1 factor from LAPACK and min/max groups:
            # codes equal ops.gptq_quantize's, offsets are -zero * scale
            U = ops.gptq_hinv_factor(stats.H, self.damp)
            G = -(-w.shape[1] // self.group_size)
            bpg = np.full((w.shape[0], G), self.bits, np.float32)
            q, s, off = ops.slim_gptq_quantize(
                w, stats.H, bpg, self.group_size, damp=self.damp, norm=2.0, tau_range=0.0, tau_n=1, U=U
            )
            return WeightOnlyLinear.from_group(linear, q, s, off, self.bits, self.group_size, method=self.name)
        q, s, z = ops.gptq_quantize(
            w,
            stats.H,
            self.bits,
            self.group_size,
            symmetric=False,
            damp=self.damp,
            group_order=self.group_order,
            clip=self.clip,
        )
        return WeightOnlyLinear.from_group(
            linear, q, s, -z.astype(np.float32) * s, self.bits, self.group_size, method=self.name
        )
