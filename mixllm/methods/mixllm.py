"""MixLLM (arXiv 2412.14590): global salience-ranked mixed precision between output features.

Pipeline of :meth:`MixLLMConfig.apply`:
  1. calibration pass (``mixllm.calib.calibrate``): per-feature salience ``S_c`` (docs/spec.md §3) and the GPTQ
     Hessians ``2 X^T X`` of every target layer;
  2. global allocation (docs/spec.md §4): all ``(layer, c, S_c)`` of the model are ranked together and the
     most salient output features get 8 bits until the 8-bit weights reach the budget's share of all
     weights; the rest get 4 bits (ablations: ``selection="per_layer"`` takes the top share inside each
     layer, ``"random"`` a seeded random choice of the same size);
  3. both parts quantized as the reference does (docs/spec.md §2b): GPTQ with group reordering and a clipping
     search, 4-bit asymmetric and 8-bit symmetric, group-wise;
  4. every target ``nn.Linear`` replaced by a :class:`mixllm.nn.MixedLinear` (W4A8 + W8A8).
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..calib import Calibration, calibrate, target_linears
from ..modules import set_module
from ..nn import MixedLinear
from . import validate
from .base import QuantConfig, register

__all__ = ["MixLLMConfig", "allocate", "plot_fractions"]

_SELECTIONS = ("global", "per_layer", "random")


@register("mixllm")
@dataclass
class MixLLMConfig(QuantConfig):
    r"""Configuration of MixLLM quantization (defaults: the reference's evaluation configuration,
    except the calibration size, reduced for CPUs).

    Attributes:
        bits: the budget. Average weight bit-width in [4, 8] (``4.4`` = 10% of the weights in 8-bit,
            ``4`` = all 4-bit, ``8`` = all 8-bit), or percentages per bit-width ``{8: 10, 4: 90}``.
        fraction: alternative to ``bits``: the share of weights in 8-bit, in [0, 1] (overrides ``bits``).
        group_size: quantization group along the input dimension, for both weight parts and for the
            activations (docs/spec.md §1).
        act_bits: activation bits when ``weight_only`` is False; 8 (dynamic, symmetric, per token and
            group) is what the kernels implement.
        weight_only: keep activations in float (W4.x A16); the layer dequantizes its weights once.
        gptq: quantize weights with GPTQ (Hessian from the calibration inputs, group reordering);
            off: round-to-nearest.
        clip: per-group clipping search over range shrink factors (weighted by ``diag(H)`` under GPTQ,
            plain weight error without it).
        damp: GPTQ dampening, as a fraction of ``mean(diag H)``.
        n_calib: number of calibration sequences (the reference: 128 of WikiText-2).
        seq_len: tokens per calibration sequence (the reference: the model's context, 2048+).
        seed: seed of the calibration windows and of ``selection="random"``.
        selection: ``"global"`` (MixLLM: one ranking over all layers), ``"per_layer"`` (the same
            share in every layer, top salience inside each) or ``"random"`` (ablations).
        salience_bits: bit-width of the quantizer whose error ``delta`` enters the salience
            (the low bit-width, 4).
        include_lm_head: quantize the output head too (default: it stays in float, docs/spec.md §4).
        only: regular expression: quantize only the target layers whose name it matches
            (``re.search``; e.g. ``r"layers\.(0|1)\."``); ``None``: all of them.
        row_multiple: round every layer's 8-bit row count to a multiple of this (kernels that need
            tiles of rows); the achieved average is reported.
        cache_dir: directory where salience and quantizer results are kept between runs, keyed by a
            hash of the weights, the calibration tokens and the quantizer settings (``None``: off;
            the CLI uses ``~/.cache/mixllm/calib``). Lets several budgets share one GPTQ pass.
        progress: show tqdm progress bars.
    """
    bits: Union[float, Dict[int, float]] = 4.4
    fraction: Optional[float] = None
    group_size: int = 128
    act_bits: int = 8
    weight_only: bool = False
    gptq: bool = True
    clip: bool = True
    damp: float = 0.01
    n_calib: int = 32
    seq_len: int = 512
    seed: int = 0
    selection: str = "global"
    salience_bits: int = 4
    include_lm_head: bool = False
    only: Optional[str] = None
    row_multiple: int = 1
    cache_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        f = self.fraction_8bit()  # validates bits / fraction
        del f
        for name in ("group_size", "n_calib", "seq_len", "row_multiple"):
            validate.positive_int(name, getattr(self, name))
        if self.seq_len < 2:
            raise ValueError("seq_len: expected at least 2 tokens")
        if self.act_bits != 8:
            raise ValueError(f"act_bits: only 8-bit activations are implemented (or weight_only=True), "
                             f"got {self.act_bits!r}")
        validate.one_of("selection", self.selection, _SELECTIONS)
        validate.one_of("salience_bits", self.salience_bits, (2, 3, 4))
        validate.non_negative("damp", self.damp)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")

    # ------------------------------------------------------------------ budget
    def fraction_8bit(self) -> float:
        """Share of the weights that get 8 bits."""
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
                raise ValueError(f"fraction: expected a number in [0, 1], got {f!r}")
            return float(f)
        b = self.bits
        if isinstance(b, dict):
            keys = {int(k) for k in b}
            if not keys <= {4, 8}:
                raise ValueError(f"bits: percentages are supported for 4 and 8 bits, got {sorted(keys)}")
            pct = {int(k): float(v) for k, v in b.items()}
            if any(v < 0 for v in pct.values()) or abs(sum(pct.values()) - 100) > 1e-6:
                raise ValueError(f"bits: percentages must be non-negative and sum to 100, got {b}")
            return pct.get(8, 0.0) / 100
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 4 <= b <= 8:
            raise ValueError(f"bits: expected an average bit-width in [4, 8] or {{8: p, 4: 100 - p}}, got {b!r}")
        return (float(b) - 4) / 4

    def needs_calibration(self) -> bool:
        f = self.fraction_8bit()
        return self.gptq or 0 < f < 1

    # ------------------------------------------------------------------ apply
    def apply(self, model: nn.Module, calib=None) -> Dict[str, Any]:
        """Quantize ``model`` in place; ``calib``: token ids [n, seq_len] or a :class:`Calibration`.

        Both bit-widths are quantized for *all* rows of a layer (GPTQ treats rows independently given
        the Hessian, so this equals quantizing each part on its own) and kept in ``calib.quant_cache``
        (and in ``cache_dir``): any other budget or selection then only picks rows.
        """
        layers = target_linears(model, self.include_lm_head)
        if self.only:
            layers = [(n, m) for n, m in layers if re.search(self.only, n)]
            if not layers:
                raise ValueError(f"only: no layer name matches {self.only!r}")
        names = [n for n, _ in layers]
        mods = dict(layers)
        frac = self.fraction_8bit()
        need_sal = 0 < frac < 1 and self.selection != "random"
        need = [b for b, on in ((4, frac < 1), (8, frac > 0)) if on]
        qkey = (self.group_size, self.gptq, self.clip, float(self.damp))
        cal = calib if isinstance(calib, Calibration) else None
        ids = None if cal is not None else calib
        if ids is not None and not isinstance(ids, torch.Tensor):
            raise TypeError(f"calib: expected token ids or a Calibration, got {type(ids).__name__}")
        store = cal.quant_cache if cal is not None else {}
        sal = dict(cal.salience) if cal is not None else {}
        disk = None
        if self.cache_dir and ids is not None:
            disk = _DiskCache(self.cache_dir, _cache_key(layers, ids, self), _cache_key(layers, ids, self, False))
        if disk is not None:
            sal.update({n: v for n, v in disk.load_salience().items() if n in mods})
            for b in need:
                store.update(disk.load_quant(b, names, qkey))
        miss_sal = need_sal and any(n not in sal for n in names)
        miss_q = {b: [n for n in names if ("q", b, n) + qkey not in store] for b in need}
        need_h = self.gptq and any(miss_q.values()) and not (cal is not None and all(n in cal.hessians for n in names))
        if miss_sal or need_h:
            if ids is None:
                raise ValueError("calib: this configuration needs calibration data (token ids), or a "
                                 "Calibration with salience and Hessians")
            new = calibrate(model, ids, layers, hessian=need_h, salience=miss_sal,
                            salience_bits=self.salience_bits, group_size=self.group_size, progress=self.progress)
            if cal is None:
                cal = new
                cal.quant_cache = store
            else:
                cal.hessians.update(new.hessians)
            if miss_sal:
                sal.update(new.salience)
                cal.salience.update(new.salience)
                if disk is not None:
                    disk.save_salience(sal)
        groups = cal.groups() if (self.gptq and cal is not None) else [[n] for n in names]
        todo = [(b, g) for b in need for g in groups if any(n in miss_q[b] for n in g)]
        for b, g in tqdm(todo, desc="GPTQ" if self.gptq else "RTN", disable=not self.progress or not todo):
            H = cal.hessians[g[0]] if self.gptq else None
            W = torch.cat([mods[n].weight.detach().float().cpu() for n in g]).contiguous()
            q, sc, z = ops.gptq_quantize(W, H, b, self.group_size, damp=self.damp, clip=self.clip)
            r0 = 0
            for n in g:
                r1 = r0 + mods[n].out_features
                store[("q", b, n) + qkey] = (q[r0:r1].clone(), sc[r0:r1].clone(), None if z is None else z[r0:r1].clone())
                r0 = r1
        if disk is not None and todo:
            for b in need:
                disk.save_quant(b, {n: store[("q", b, n) + qkey] for n in names}, qkey)

        rows8 = allocate(layers, sal, frac, self.selection, self.seed, self.row_multiple)
        per_layer = {}
        for name, m in layers:
            q4 = store.get(("q", 4, name) + qkey)
            q8 = store.get(("q", 8, name) + qkey)
            new_mod = MixedLinear.from_linear(m, rows8[name], self.group_size, q4=q4, q8=q8,
                                              weight_only=self.weight_only)
            set_module(model, name, new_mod)
            per_layer[name] = {"in": m.in_features, "out": m.out_features, "n8": int(len(rows8[name]))}
        return make_report(model, per_layer, self)


def _cache_key(layers, ids, cfg, quantizer: bool = True) -> str:
    """Fingerprint of the weights, the calibration tokens and the quantizer settings (``quantizer``
    False: only what the salience depends on)."""
    h = hashlib.blake2b(digest_size=16)
    for n, m in layers:
        h.update(n.encode())
        h.update(m.weight.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(ids.detach().cpu().long().contiguous().numpy().tobytes())
    if quantizer:
        h.update(repr((cfg.group_size, cfg.gptq, cfg.clip, float(cfg.damp), cfg.salience_bits, 1)).encode())
    else:
        h.update(repr(("salience", cfg.group_size, cfg.salience_bits, 1)).encode())
    return h.hexdigest()


class _DiskCache:
    """Full-matrix quantizer results of one (model, calibration, quantizer) triple under
    ``cache_dir/<key>/``, and the salience of one (model, calibration) pair under
    ``cache_dir/<salience key>/``, as safetensors files (each written to a temp file, then renamed)."""

    def __init__(self, root, key, sal_key=None):
        root = pathlib.Path(os.path.expanduser(str(root)))
        self.dir = root / key
        self.sal_dir = root / (sal_key or key)

    def _read(self, fname, d=None):
        from safetensors.torch import load_file
        f = (d or self.dir) / fname
        if not f.exists():
            return {}
        try:
            return load_file(str(f))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return {}

    def _write(self, fname, tensors, d=None):
        from safetensors.torch import save_file
        d = d or self.dir
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", dir=d)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, d / fname)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_salience(self):
        t = self._read("salience.safetensors", self.sal_dir)
        if not t and self.sal_dir != self.dir:  # entries written before salience had its own key
            t = self._read("salience.safetensors")
            if t:
                self._write("salience.safetensors", t, self.sal_dir)
        return {k: v.numpy() for k, v in t.items()}

    def save_salience(self, sal):
        self._write("salience.safetensors", {k: torch.as_tensor(np.asarray(v)) for k, v in sal.items()},
                    self.sal_dir)

    def load_quant(self, bits, names, qkey):
        t = self._read(f"q{bits}.safetensors")
        out = {}
        for n in names:
            if f"{n}.codes" in t:
                out[("q", bits, n) + qkey] = (t[f"{n}.codes"], t[f"{n}.scale"], t.get(f"{n}.zero"))
        return out

    def save_quant(self, bits, results, qkey):
        t = {}
        for n, (c, s, z) in results.items():
            t[f"{n}.codes"], t[f"{n}.scale"] = torch.as_tensor(c), torch.as_tensor(s)
            if z is not None:
                t[f"{n}.zero"] = torch.as_tensor(z)
        self._write(f"q{bits}.safetensors", t)


def allocate(layers, salience: Dict[str, np.ndarray], fraction: float, selection: str = "global",
             seed: int = 0, row_multiple: int = 1) -> Dict[str, np.ndarray]:
    """8-bit rows per layer: sorted int64 indices.

    The budget counts weights, not features: features are taken in order of decreasing salience
    (over the whole model for ``"global"``) while their weights fit in ``fraction`` of all weights,
    so the average is ``4 + 4 * fraction`` bits even though layers have different input widths.
    """
    if selection not in _SELECTIONS:
        raise ValueError(f"selection: expected one of {_SELECTIONS}, got {selection!r}")
    names = [n for n, _ in layers]
    N = {n: m.out_features for n, m in layers}
    K = {n: m.in_features for n, m in layers}
    total = sum(N[n] * K[n] for n in names)
    budget = fraction * total
    if fraction <= 0:
        return {n: np.zeros(0, np.int64) for n in names}
    if fraction >= 1:
        return {n: np.arange(N[n], dtype=np.int64) for n in names}
    if selection == "per_layer":
        out = {}
        for n in names:
            k = int(round(fraction * N[n]))
            out[n] = np.sort(np.argsort(-salience[n], kind="stable")[:k]).astype(np.int64)
    else:
        layer_id = np.concatenate([np.full(N[n], i) for i, n in enumerate(names)])
        row = np.concatenate([np.arange(N[n]) for n in names])
        if selection == "global":
            s = np.concatenate([np.asarray(salience[n], dtype=np.float64) for n in names])
            if not np.all(np.isfinite(s)):
                raise ValueError("salience: non-finite values (check the calibration data / model)")
            order = np.argsort(-s, kind="stable")
        else:
            order = np.random.default_rng(seed).permutation(len(row))
        cost = np.array([K[names[i]] for i in layer_id[order]], dtype=np.float64)
        take = order[:int(np.searchsorted(np.cumsum(cost), budget, side="right"))]
        out = {n: np.zeros(0, np.int64) for n in names}
        for i, n in enumerate(names):
            out[n] = np.sort(row[take[layer_id[take] == i]]).astype(np.int64)
    if row_multiple > 1:
        for n in names:
            k = min(N[n], int(round(len(out[n]) / row_multiple)) * row_multiple)
            if k != len(out[n]):
                if selection == "random":
                    rank = np.random.default_rng(seed + 1).permutation(N[n])
                else:
                    rank = np.argsort(-salience[n], kind="stable")
                out[n] = np.sort(rank[:k]).astype(np.int64)
    return out


def make_report(model: nn.Module, per_layer: Dict[str, Dict[str, int]], config=None) -> Dict[str, Any]:
    """Achieved bits, per-layer 8-bit fractions and sizes in bytes."""
    w_total = sum(v["in"] * v["out"] for v in per_layer.values())
    w8 = sum(v["in"] * v["n8"] for v in per_layer.values())
    feats = sum(v["out"] for v in per_layer.values())
    f8 = sum(v["n8"] for v in per_layer.values())
    qbytes = sum(m.weight_bytes() for m in model.modules() if isinstance(m, MixedLinear))
    total = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied embeddings count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for v in per_layer.values():
        v["frac8"] = v["n8"] / v["out"]
    return {
        "avg_bits": 4 + 4 * w8 / max(w_total, 1),
        "frac8_weights": w8 / max(w_total, 1),
        "frac8_features": f8 / max(feats, 1),
        "quantized_params": w_total,
        "quantized_linear_bytes": qbytes,
        "quantized_linear_bits_incl_scales": 8 * qbytes / max(w_total, 1),
        "fp16_linear_bytes": 2 * w_total,
        "model_bytes": total,
        "layers": per_layer,
    }


def plot_fractions(report: Dict[str, Any], path: Union[str, os.PathLike], title: str = "") -> str:
    """PNG of the per-layer share of 8-bit output features (cf. the paper's Figure 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import re

    layers = report["layers"]
    kinds: Dict[str, List] = {}
    for name, v in layers.items():
        m = re.search(r"\.(\d+)\.", name)
        blk = int(m.group(1)) if m else -1
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((blk, 100 * v["n8"] / v["out"]))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(kinds), 1)
    for i, (kind, pts) in enumerate(kinds.items()):
        pts.sort()
        ax.bar([p[0] + (i - len(kinds) / 2) * width for p in pts], [p[1] for p in pts], width, label=kind)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("8-bit output features (%)")
    ax.set_title(title or f"MixLLM: 8-bit share per layer (average {report['avg_bits']:.2f} bits)")
    ax.legend(ncol=min(len(kinds), 7), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
