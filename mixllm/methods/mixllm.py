"""MixLLM (arXiv 2412.14590): global salience-ranked mixed precision between output features.

Pipeline of :meth:`MixLLMConfig.apply` (block by block, the default with GPTQ and token ids):
  1. salience pass (``mixllm.calib.calibrate``, full forward + backward per sequence on the unquantized
     model): per-feature salience ``S_c`` (docs/spec.md §3), accumulated on each layer's device;
  2. global allocation (docs/spec.md §4): all ``(layer, c, S_c)`` of the model are ranked together and the
     most salient output features get 8 bits until the 8-bit weights reach the budget's share of all
     weights; the rest get 4 bits (ablations: ``selection="per_layer"`` takes the top share inside each
     layer, ``"random"`` a seeded random choice of the same size);
  3. block by block on the quantized prefix (``mixllm.pipeline.run_blockwise``): each group of linears'
     Hessian ``2 X^T X``, then GPTQ with group reordering and a clipping search (docs/spec.md §2b) of its
     rows, 4-bit asymmetric and 8-bit symmetric by the allocation, in one pass (rows are independent
     given the Hessian); the block's weights are replaced by their dequantized values for the later
     groups and blocks (weight-quantized prefix; activations stay in float during calibration), and at
     the end of the block its linears become :class:`mixllm.nn.MixedLinear` (W4A8 + W8A8). Finished
     blocks are written to ``cache_dir``, so a killed run resumes from the last finished block.

With a :class:`mixllm.calib.Calibration` (or ``sequential=False`` / ``gptq=False``) the Hessians come from
one pass of the full-precision model and both bit-widths are quantized for all rows (kept in
``calib.quant_cache``, so a budget sweep only picks rows).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import ops
from ..cache import DiskCache, derive_key, fingerprint
from ..calib import Calibration, calibrate, rtn_delta, target_linears
from ..gptq import gptq as gptq_any
from ..gptq import gptq_torch
from ..modules import set_module
from ..nn import MixedLinear
from ..pipeline import PhaseTimer, run_blockwise
from ..plotting import plot_budget, plot_fractions  # noqa: F401  (re-exported: the CLI and notebooks use them here)
from ..report import budget_breakdown, format_breakdown, make_report  # noqa: F401
from . import validate
from .base import QuantConfig, register

__all__ = ["MixLLMConfig", "allocate", "plot_fractions", "budget_breakdown", "format_breakdown", "plot_budget"]

GAIN_METRICS = ("nll", "kl")
_SELECTIONS = ("global", "per_bit", "global_floor", "per_layer", "random", "measured")


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
        selection: ``"global"`` (MixLLM: one ranking over all layers by salience), ``"per_bit"`` (one
            ranking over all layers by salience per weight bit spent, ``S_c / in_features``: a greedy
            knapsack, since an 8-bit row of a layer of input width K costs 4 K extra bits),
            ``"global_floor"`` (half the budget as the same share of every layer's rows, top
            salience inside each, the other half by the global ranking over the remaining rows),
            ``"per_layer"`` (the same share in every layer, top salience inside each), ``"random"``
            (ablations; docs/method.md "Allocation ablations"), or ``"measured"``: each layer's
            saliences rescaled to sum to its *measured gain* (the drop of the mean token NLL on
            ``gain_windows`` held-out calibration windows when that layer alone is 8-bit and every
            other 4-bit: one forward pass of those windows per layer), then the per-bit knapsack. It
            runs the one-pass pipeline (every layer's Hessian held at once) and needs token ids; it
            was measured to help with 128 x 2048 calibration tokens and to hurt with 32 x 512
            (docs/method.md "Measured layer gains").
        gain_windows: with ``selection="measured"``, how many of the calibration windows (the last
            ones) are held out from the Hessians and the salience to measure the layer gains.
        gain_metric: with ``selection="measured"``, what a layer's gain is the drop of: ``"nll"`` (the
            mean token NLL of the held-out windows' own next tokens) or ``"kl"`` (the mean KL divergence
            from the float model's next-token distribution, over the whole vocabulary at every position:
            it does not depend on which token happened to come next, so it is less noisy; the float
            model's log-probabilities of the held-out windows are kept in bfloat16 on the model's device,
            ``gain_windows x seq_len x vocabulary x 2`` bytes). docs/method.md "KL gains, and a third text".
        salience_bits: bit-width of the quantizer whose error ``delta`` enters the salience
            (the low bit-width, 4).
        salience_kind: the salience estimator (:func:`mixllm.ops.salience_accumulate_io`): ``"taylor"``
            (MixLLM's ``|t + t^2/2|`` per sequence, ``t_c = G_c . delta_c``) or ``"fisher"`` (the
            second-order term with a per-token empirical Fisher, ``sum_tokens (g_c (x . delta_c))^2 / 2``;
            an ablation, docs/method.md "Allocation ablations"), or ``"restore"`` (taken at the
            quantized point: the pass runs every layer at ``W + delta``, and row ``c`` scores the
            predicted loss drop of restoring it alone, ``sum_sequences t_c - t_c^2 / 2``, signed;
            docs/method.md "Salience at the quantized point").
        salience_delta: the quantization error ``delta`` in the salience: ``"rtn"`` (round-to-nearest
            ``salience_bits``-bit, as the reference's searcher) or ``"gptq"`` (the ``salience_bits``-bit
            GPTQ (+ clip, with ``clip``) codes minus ``W``, on Hessians from one pass of the float model:
            the error of the quantizer actually used; costs one more calibration pass and a GPTQ of every
            layer, and holds every layer's Hessian at once; needs token ids, not a ``Calibration``).
        include_lm_head: quantize the output head too (default: it stays in float, docs/spec.md §4).
        only: regular expression: quantize only the target layers whose name it matches
            (``re.search``; e.g. ``r"layers\.(0|1)\."``); ``None``: all of them.
        row_multiple: round every layer's 8-bit row count to a multiple of this (kernels that need
            tiles of rows); the achieved average is reported.
        cache_dir: directory where salience and quantizer results are kept between runs, keyed by a
            hash of the weights, the calibration tokens and every setting that changes them (``None``:
            off; the CLI uses ``~/.cache/mixllm/calib``). The salience serves every budget; the
            block-by-block pass writes each finished block, so a killed run resumes where it stopped.
        progress: show tqdm progress bars (with ETA).
        sequential: with GPTQ and token ids, calibrate block by block on the quantized prefix (memory:
            one block, its Hessians and the calibration hidden states); False: Hessians of every layer
            from one pass of the full-precision model (all kept on the host).
        device: where the work runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``; None: where the model is). The
            model is moved there, unless ``offload``.
        offload: keep the model on the host and move one block at a time to ``device`` for the
            block-by-block pass (the salience pass runs the model where it is: on the host, or split
            over GPUs by accelerate's ``device_map``).
        gptq_impl: ``"auto"`` (PyTorch GPTQ for layers on a GPU, the C GPTQ on the host), ``"c"`` or
            ``"torch"``.
        gptq_dtype: precision of the PyTorch GPTQ, ``"float64"`` (codes as the C GPTQ) or ``"float32"``.
        true_sequential: inside a block, one calibration pass per group of linears (q/k/v, o, gate/up,
            down), each on the outputs of the groups already quantized; False: one pass per block.
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
    gain_windows: int = 4
    gain_metric: str = "nll"
    salience_bits: int = 4
    salience_kind: str = "taylor"
    salience_delta: str = "rtn"
    include_lm_head: bool = False
    only: Optional[str] = None
    row_multiple: int = 1
    cache_dir: Optional[str] = None
    progress: bool = True
    sequential: bool = True
    device: Optional[str] = None
    offload: bool = False
    gptq_impl: str = "auto"
    gptq_dtype: str = "float64"
    true_sequential: bool = True

    def __post_init__(self):
        f = self.fraction_8bit()  # validates bits / fraction
        del f
        for name in ("group_size", "n_calib", "seq_len", "row_multiple", "gain_windows"):
            validate.positive_int(name, getattr(self, name))
        if self.seq_len < 2:
            raise ValueError("seq_len: expected at least 2 tokens")
        if self.act_bits != 8:
            raise ValueError(
                f"act_bits: only 8-bit activations are implemented (or weight_only=True), got {self.act_bits!r}"
            )
        validate.one_of("selection", self.selection, _SELECTIONS)
        validate.one_of("gain_metric", self.gain_metric, GAIN_METRICS)
        validate.one_of("salience_bits", self.salience_bits, (2, 3, 4))
        validate.one_of("salience_kind", self.salience_kind, ops.SALIENCE_KINDS)
        validate.one_of("salience_delta", self.salience_delta, ("rtn", "gptq"))
        validate.non_negative("damp", self.damp)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        validate.one_of("gptq_impl", self.gptq_impl, ("auto", "c", "torch"))
        validate.one_of("gptq_dtype", self.gptq_dtype, ("float64", "float32"))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device: expected a torch device string, got {self.device!r}") from None
        if self.offload and self.device is None:
            raise ValueError("offload: needs device= (where the blocks run)")

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
    def apply(
        self,
        model: nn.Module,
        calib=None,
        timer: Optional[PhaseTimer] = None,
        salience: Optional[Dict[str, np.ndarray]] = None,
    ) -> Dict[str, Any]:
        """Quantize ``model`` in place; ``calib``: token ids [n, seq_len] or a :class:`Calibration`.
        ``timer`` (optional :class:`mixllm.pipeline.PhaseTimer`) collects the time of each phase.
        ``salience``: a precomputed salience per layer name (float [out_features]) used instead of the
        salience pass (e.g. one pass reused for several budgets, or an estimator of your own)."""
        layers = target_linears(model, self.include_lm_head)
        if self.only:
            layers = [(n, m) for n, m in layers if re.search(self.only, n)]
            if not layers:
                raise ValueError(f"only: no layer name matches {self.only!r}")
        if salience is not None:
            salience = _check_salience(salience, layers)
        if calib is not None and not isinstance(calib, (Calibration, torch.Tensor)):
            raise TypeError(f"calib: expected token ids or a Calibration, got {type(calib).__name__}")
        if self.device is not None and not self.offload:
            model.to(self.device)
        timer = timer if timer is not None else PhaseTimer()
        if self.selection == "measured" and 0 < self.fraction_8bit() < 1:
            if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[0] <= self.gain_windows:
                raise ValueError(
                    f'selection="measured": calib must be token ids [n, seq_len] with more than '
                    f"gain_windows={self.gain_windows} windows (the last ones measure the layer gains)"
                )
            return self._apply_one_pass(model, layers, calib, timer, salience)
        if isinstance(calib, torch.Tensor) and self.sequential and self.gptq:
            rep = self._apply_blockwise(model, layers, calib, timer, salience)
            if rep is not None:
                return rep
        return self._apply_one_pass(model, layers, calib, timer, salience)

    def _impl(self, device) -> str:
        if self.gptq_impl != "auto":
            return self.gptq_impl
        return "torch" if torch.device(device).type == "cuda" else "c"

    def _salience(self, model, layers, ids, base_key, timer) -> Dict[str, np.ndarray]:
        """Salience of ``layers`` (read from ``cache_dir`` when there)."""
        dev = model.get_input_embeddings().weight.device
        kind = () if self.salience_kind == "taylor" else (self.salience_kind,)  # keeps the older keys valid
        if self.salience_delta == "gptq":
            kind += ("gptq-delta", self.clip, float(self.damp), self._impl(dev.type), self.gptq_dtype)
        disk = (
            DiskCache(
                self.cache_dir, derive_key(base_key, "salience", self.group_size, self.salience_bits, dev.type, *kind)
            )
            if self.cache_dir
            else None
        )
        sal = {k: v.numpy() for k, v in disk.read("salience.safetensors").items()} if disk else {}
        if all(n in sal for n, _ in layers):
            return sal
        deltas = self._gptq_deltas(model, layers, ids, timer) if self.salience_delta == "gptq" else None
        with timer("salience"):
            cal = calibrate(
                model,
                ids,
                layers,
                hessian=False,
                salience=True,
                salience_bits=self.salience_bits,
                group_size=self.group_size,
                delta_fn=None if deltas is None else (lambda n, m, d=deltas: d[n]),
                progress=self.progress,
                salience_kind=self.salience_kind,
            )
        sal.update(cal.salience)
        if disk is not None:
            disk.write("salience.safetensors", {k: torch.as_tensor(np.asarray(v)) for k, v in sal.items()})
        return sal

    def _gptq_group(self, mods, g, H, bits):
        """``bits``-bit GPTQ (+ clip) of the layers ``g`` sharing the Hessian ``H`` (round-to-nearest when
        ``H`` is None) in one call over their stacked rows; host ``(codes, scale, zero)`` per layer."""
        W = torch.cat([mods[n].weight.detach().float() for n in g]).contiguous()
        q, sc, z = gptq_any(
            W,
            H,
            bits,
            self.group_size,
            damp=self.damp,
            clip_grid=20 if self.clip else 0,
            impl=self._impl(W.device.type),
            dtype=torch.float64 if self.gptq_dtype == "float64" else torch.float32,
        )
        q, sc, z = q.cpu(), sc.cpu(), None if z is None else z.cpu()
        out, r0 = [], 0
        for n in g:
            r1 = r0 + mods[n].out_features
            out.append((q[r0:r1].clone(), sc[r0:r1].clone(), None if z is None else z[r0:r1].clone()))
            r0 = r1
        return out

    def _gptq_deltas(self, model, layers, ids, timer) -> Dict[str, torch.Tensor]:
        """``salience_delta="gptq"``: per layer, the ``salience_bits``-bit GPTQ (+ clip) codes of ``W``
        dequantized, minus ``W`` (float32, on the layer's device), on Hessians from one pass of the float
        model (layers reading the same input share one Hessian and one GPTQ call, as in one-pass mode)."""
        with timer("hessian"):
            cal = calibrate(model, ids, layers, hessian=True, salience=False, progress=self.progress)
        mods = dict(layers)
        out: Dict[str, torch.Tensor] = {}
        for g in cal.groups():
            with timer("gptq"):
                parts = self._gptq_group(mods, g, cal.hessians[g[0]], self.salience_bits)
            for n, (q, sc, z) in zip(g, parts):
                w = mods[n].weight.detach().float()
                out[n] = ops.dequantize_weight(q, sc, z, self.group_size).to(w.device) - w
            cal.hessians = {k: v for k, v in cal.hessians.items() if k not in g}  # free as we go
        for n, m in layers:  # layers the forward pass never reached (no Hessian): round-to-nearest
            if n not in out:
                out[n] = rtn_delta(m.weight, self.salience_bits, self.group_size)
        return out

    def _apply_blockwise(self, model, layers, ids, timer, given=None) -> Optional[Dict[str, Any]]:
        names = [n for n, _ in layers]
        mods = dict(layers)
        frac = self.fraction_8bit()
        need_sal = 0 < frac < 1 and self.selection != "random"
        base = fingerprint(layers, ids) if self.cache_dir else ""
        if given is not None:
            sal = given
        else:
            sal = self._salience(model, layers, ids, base, timer) if need_sal else {}
        rows8 = allocate(layers, sal, frac, self.selection, self.seed, self.row_multiple)
        run_dev = torch.device(self.device) if self.device is not None else None
        if self.offload:  # the salience pass ran where the model was; blocks now come from the host
            model.to("cpu")
        disk = None
        if self.cache_dir:
            dev_type = (run_dev or mods[names[0]].weight.device).type
            disk = DiskCache(
                self.cache_dir,
                derive_key(
                    base,
                    "blocks",
                    frac,
                    self.selection,
                    self.seed,
                    self.row_multiple,
                    self.group_size,
                    self.clip,
                    float(self.damp),
                    self.salience_bits,
                    self.true_sequential,
                    self._impl(dev_type),
                    self.gptq_dtype,
                    dev_type,
                    self.weight_only,
                    _rows_digest(names, rows8),  # the salience (its kind, delta, or one passed in) via the rows
                ),
            )
        built: Dict[str, MixedLinear] = {}
        gdtype = torch.float64 if self.gptq_dtype == "float64" else torch.float32

        def quantize_group(bi, group, acc):
            lins = [model.get_submodule(n) for n in group]
            dev = lins[0].weight.device
            with timer("gptq"):
                H = acc.hessian()
                W = torch.cat([m.weight.detach().to(torch.float32) for m in lins])
                off = np.cumsum([0] + [m.out_features for m in lins])
                r8 = np.concatenate([rows8[n] + off[i] for i, n in enumerate(group)]).astype(np.int64)
                parts = _gptq_rows(W, H, r8, self.group_size, float(self.damp), self.clip, self._impl(dev.type), gdtype)
                del H, W
            with timer("swap"):
                is8 = parts["is8"]
                c8 = np.concatenate([[0], np.cumsum(is8.numpy())])
                c4 = np.arange(len(c8)) - c8
                for i, (n, m) in enumerate(zip(group, lins)):
                    a, b = off[i], off[i + 1]
                    part = {"is8": is8[a:b]}
                    for k in ("codes4", "scale4", "zero4"):
                        part[k] = parts[k][c4[a] : c4[b]]
                    for k in ("codes8", "scale8"):
                        part[k] = parts[k][c8[a] : c8[b]]
                    q = _mixed_from_rows(m, part, self.group_size, self.weight_only)
                    _use_as_prefix(m, q)
                    built[n] = q

        def restore(bi, todo):
            if disk is None:
                return False
            t = disk.read(f"block_{bi:05d}.safetensors")
            if not t or not all(f"{n}.perm" in t for n in todo):
                return False
            with timer("swap"):
                for n in todo:
                    m = model.get_submodule(n)
                    q = MixedLinear(
                        m.in_features,
                        m.out_features,
                        n8=int(t[f"{n}.qweight8"].shape[0]),
                        bias=m.bias is not None,
                        group_size=self.group_size,
                        weight_only=self.weight_only,
                    )
                    q.load_state_dict({k[len(n) + 1 :]: v for k, v in t.items() if k.startswith(n + ".")})
                    _use_as_prefix(m, q)
                    built[n] = q
            return True

        def finish_block(bi, todo):
            todo = [n for n in todo if n in built]
            if disk is not None and todo:
                disk.write(
                    f"block_{bi:05d}.safetensors",
                    {f"{n}.{k}": v for n in todo for k, v in built[n].state_dict().items()},
                )
            for n in todo:
                old = model.get_submodule(n)
                set_module(model, n, built.pop(n).to(old.weight.device))
                old.to("meta")  # the caller's layer list still refers to it: free its weights now

        done = run_blockwise(
            model,
            [ids[i : i + 1] for i in range(ids.shape[0])],
            names,
            quantize_group,
            device=run_dev,
            offload=self.offload,
            true_sequential=self.true_sequential,
            restore=restore,
            finish_block=finish_block,
            timer=timer,
            progress=self.progress,
            desc="MixLLM blocks",
        )
        if done is None:
            return None
        per_layer = {n: {"in": m.in_features, "out": m.out_features, "n8": int(len(rows8[n]))} for n, m in layers}
        return make_report(model, per_layer, self)

    def _apply_one_pass(self, model, layers, calib, timer, given=None) -> Dict[str, Any]:
        """Hessians from one pass of the full-precision model. Both bit-widths are quantized for *all*
        rows of a layer (GPTQ treats rows independently given the Hessian, so this equals quantizing
        each part on its own) and kept in ``calib.quant_cache`` (and in ``cache_dir``): any other budget
        or selection then only picks rows."""
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
        gain_ids = None
        if self.selection == "measured" and need_sal:  # apply() checked that ids hold enough windows
            ids, gain_ids = ids[: -self.gain_windows], ids[-self.gain_windows :]
        store = cal.quant_cache if cal is not None else {}
        if self.salience_delta == "gptq" and need_sal and given is None:
            if ids is None:
                raise ValueError(
                    'salience_delta="gptq": needs token ids as calib (a Calibration\'s salience is that of '
                    "the round-to-nearest delta), or salience="
                )
            given = self._salience(model, layers, ids, fingerprint(layers, ids) if self.cache_dir else "", timer)
        sal = dict(cal.salience) if cal is not None and self.salience_delta == "rtn" else {}
        if given is not None:
            sal.update(given)
        disk = base = None
        if self.cache_dir and ids is not None:
            base = fingerprint(layers, ids)
            disk = DiskCache(
                self.cache_dir, derive_key(base, "one-pass", self.group_size, self.gptq, self.clip, float(self.damp))
            )
            if need_sal:
                sal.update(self._salience(model, layers, ids, base, timer))
            for b in need:
                store.update(_load_quant(disk, b, names, qkey))
        miss_sal = need_sal and any(n not in sal for n in names)
        if miss_sal and self.salience_kind in ops.QUANTIZED_POINT_KINDS and ids is not None:
            # its own pass: that pass runs the layers at W + delta, the Hessians must be the float model's
            sal.update(self._salience(model, layers, ids, base or "", timer))
            miss_sal = False
        miss_q = {b: [n for n in names if ("q", b, n) + qkey not in store] for b in need}
        need_h = self.gptq and any(miss_q.values()) and not (cal is not None and all(n in cal.hessians for n in names))
        if miss_sal or need_h:
            if ids is None:
                raise ValueError(
                    "calib: this configuration needs calibration data (token ids), or a "
                    "Calibration with salience and Hessians"
                )
            with timer("salience" if miss_sal else "hessian"):
                new = calibrate(
                    model,
                    ids,
                    layers,
                    hessian=need_h,
                    salience=miss_sal,
                    salience_bits=self.salience_bits,
                    group_size=self.group_size,
                    progress=self.progress,
                    salience_kind=self.salience_kind,
                )
            if cal is None:
                cal = new
                cal.quant_cache = store
            else:
                cal.hessians.update(new.hessians)
            if miss_sal:
                sal.update(new.salience)
                cal.salience.update(new.salience)
        groups = cal.groups() if (self.gptq and cal is not None) else [[n] for n in names]
        todo = [(b, g) for b in need for g in groups if any(n in miss_q[b] for n in g)]
        for b, g in tqdm(todo, desc="GPTQ" if self.gptq else "RTN", disable=not self.progress or not todo):
            with timer("gptq"):
                parts = self._gptq_group(mods, g, cal.hessians[g[0]] if self.gptq else None, b)
            for n, part in zip(g, parts):
                store[("q", b, n) + qkey] = part
        if disk is not None and todo:
            for b in need:
                _save_quant(disk, b, {n: store[("q", b, n) + qkey] for n in names})

        selection, gains = self.selection, None
        if gain_ids is not None:

            def part(name, rows8):
                q4, q8 = store[("q", 4, name) + qkey], store[("q", 8, name) + qkey]
                return MixedLinear.from_linear(
                    mods[name], rows8, self.group_size, q4=q4, q8=q8, weight_only=self.weight_only
                )

            with timer("layer gains"):
                gains = measure_layer_gains(model, layers, part, gain_ids, self.progress, metric=self.gain_metric)
            sal, selection = rescale_to_gains(layers, sal, gains), "per_bit"
        rows8 = allocate(layers, sal, frac, selection, self.seed, self.row_multiple)
        per_layer = {}
        for name, m in layers:
            q4 = store.get(("q", 4, name) + qkey)
            q8 = store.get(("q", 8, name) + qkey)
            new_mod = MixedLinear.from_linear(
                m, rows8[name], self.group_size, q4=q4, q8=q8, weight_only=self.weight_only
            )
            set_module(model, name, new_mod)
            per_layer[name] = {"in": m.in_features, "out": m.out_features, "n8": int(len(rows8[name]))}
            if gains is not None:
                per_layer[name]["gain"] = gains[name]
        return make_report(model, per_layer, self)


def _mean_token_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token NLL of a causal LM over the windows ``ids`` [n, seq_len] (float64 sum)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for w in ids:
            x = w[None].to(dev)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            nll = -torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
            total += float(nll.double().sum())
            count += nll.numel()
    return total / count


def _log_prob_chunks(model: nn.Module, window: torch.Tensor, chunk: int = 256):
    """The next-token log-probabilities of ``model`` on one window, float32, ``chunk`` positions at a
    time (so that at most a few [chunk, vocabulary] float32 tensors exist at once)."""
    dev = next(model.parameters()).device
    logits = model(input_ids=window[None].to(dev), use_cache=False).logits[0, :-1]
    for i in range(0, logits.shape[0], chunk):
        yield torch.log_softmax(logits[i : i + chunk].float(), -1)


def float_log_probs(model: nn.Module, ids: torch.Tensor) -> List[torch.Tensor]:
    """The next-token log-probabilities of ``model`` on each window of ``ids`` [n, seq_len]: n tensors
    [seq_len - 1, vocabulary] in bfloat16 on the model's device (the reference of :func:`_mean_token_kl`)."""
    with torch.no_grad():
        return [torch.cat([c.bfloat16() for c in _log_prob_chunks(model, w)]) for w in ids]


def _mean_token_kl(model: nn.Module, ids: torch.Tensor, reference: List[torch.Tensor]) -> float:
    """Mean over the positions of the windows ``ids`` of KL(reference || model) in nats, the sum
    over the whole vocabulary (float64 sum over positions)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w, ref in zip(ids, reference):
            i = 0
            for logq in _log_prob_chunks(model, w):
                logp = ref[i : i + logq.shape[0]].float()
                i += logq.shape[0]
                kl = (logp.exp() * (logp - logq)).sum(-1)
                total += float(kl.double().sum())
                count += kl.numel()
    return total / count


def measure_layer_gains(
    model: nn.Module,
    layers,
    part,
    ids: torch.Tensor,
    progress: bool = False,
    rows8=None,
    skip=(),
    metric: str = "nll",
    reference: Optional[List[torch.Tensor]] = None,
) -> Dict[str, float]:
    """The measured gain of each layer: the drop of the loss on ``ids`` when that layer alone is 8-bit
    (``part(name, all rows)``) and every other is 4-bit (``part(name, no rows)``), or, given ``rows8``
    (8-bit rows per layer name; missing: none), every other is as ``rows8`` says. Layers named in
    ``skip`` are not measured (absent from the result).

    ``metric``: ``"nll"``, the mean token NLL of the windows' own next tokens, or ``"kl"``, the mean KL
    divergence from the float model's next-token distributions: ``reference``
    (:func:`float_log_probs` of the float model on ``ids``), or, if None, those of ``model`` as it is
    passed in (its target layers must then still be the float ones).

    Leaves every layer of ``model`` at ``rows8`` (default: 4 bits). docs/method.md "Measured layer
    gains" has why: the summed row saliences rank layers poorly against this (Spearman 0.2-0.3 on both
    bundled models)."""
    validate.one_of("metric", metric, GAIN_METRICS)
    none = np.zeros(0, np.int64)
    rows8 = rows8 or {}
    model.eval()
    if metric == "kl":
        if reference is None:
            reference = float_log_probs(model, ids)
        elif len(reference) != len(ids) or any(r.dim() != 2 or r.shape[0] != ids.shape[1] - 1 for r in reference):
            raise ValueError(
                f"reference: expected {len(ids)} windows of log-probabilities [{ids.shape[1] - 1}, vocabulary], "
                f"got {[tuple(r.shape) for r in reference]}"
            )

        def loss(m):
            return _mean_token_kl(m, ids, reference)
    else:
        loss = functools.partial(_mean_token_nll, ids=ids)
    for name, _ in layers:
        set_module(model, name, part(name, np.asarray(rows8.get(name, none), np.int64)))
    base = loss(model)
    gains = {}
    for name, m in tqdm([lm for lm in layers if lm[0] not in skip], desc="layer gains", disable=not progress):
        four = model.get_submodule(name)
        set_module(model, name, part(name, np.arange(m.out_features, dtype=np.int64)))
        gains[name] = base - loss(model)
        set_module(model, name, four)
    return gains


def rescale_to_gains(layers, salience: Dict[str, np.ndarray], gains: Dict[str, float]) -> Dict[str, np.ndarray]:
    """Each layer's row saliences scaled to sum to its measured gain (all zero where the gain is not
    positive): the ranking inside a layer stays the salience's, the layer's total is the measurement."""
    out = {}
    for name, _ in layers:
        s = np.asarray(salience[name], dtype=np.float64)
        total = float(s.sum())
        g = max(float(gains[name]), 0.0)
        out[name] = s * (g / total) if total > 0 else np.full_like(s, g / max(len(s), 1))
    return out


def _rows_digest(names, rows8) -> str:
    """A digest of the allocation (every layer's 8-bit rows), for the block cache's key."""
    h = hashlib.blake2b(digest_size=16)
    for n in names:
        h.update(n.encode() + b"\0" + np.ascontiguousarray(rows8[n], dtype=np.int64).tobytes())
    return h.hexdigest()


def _check_salience(salience, layers) -> Dict[str, np.ndarray]:
    """``salience`` as float64 arrays, one per target layer, each [out_features] and finite."""
    if not isinstance(salience, dict):
        raise TypeError(f"salience: expected a dict of layer name -> array, got {type(salience).__name__}")
    out = {}
    for n, m in layers:
        if n not in salience:
            raise ValueError(f"salience: no entry for layer {n!r}")
        a = salience[n]
        a = (a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)).astype(np.float64)
        if a.shape != (m.out_features,) or not np.all(np.isfinite(a)):
            raise ValueError(f"salience[{n!r}]: expected {m.out_features} finite values, got shape {a.shape}")
        out[n] = a
    return out


def _load_quant(disk, bits, names, qkey):
    t = disk.read(f"q{bits}.safetensors")
    return {
        ("q", bits, n) + qkey: (t[f"{n}.codes"], t[f"{n}.scale"], t.get(f"{n}.zero"))
        for n in names
        if f"{n}.codes" in t
    }


def _save_quant(disk, bits, results):
    t = {}
    for n, (c, s, z) in results.items():
        t[f"{n}.codes"], t[f"{n}.scale"] = torch.as_tensor(c), torch.as_tensor(s)
        if z is not None:
            t[f"{n}.zero"] = torch.as_tensor(z)
    disk.write(f"q{bits}.safetensors", t)


def _gptq_rows(W, H, rows8, group_size, damp, clip, impl, dtype):
    """GPTQ of ``W`` [N, K] with 8-bit symmetric rows ``rows8`` and 4-bit asymmetric others: one pass of
    the PyTorch GPTQ with per-row formats, or the C GPTQ once per row set. Returns host tensors
    ``codes4, scale4, zero4`` (4-bit rows, in row order) and ``codes8, scale8``, plus ``rows8``/``rows4``."""
    N = W.shape[0]
    is8 = torch.zeros(N, dtype=torch.bool)
    is8[torch.as_tensor(rows8, dtype=torch.int64)] = True
    r8, r4 = torch.nonzero(is8).flatten(), torch.nonzero(~is8).flatten()
    grid = 20 if clip else 0
    if impl == "torch":
        bits = torch.where(is8, 8, 4).to(W.device)
        c, s, z = gptq_torch(W, H, bits, group_size, None, damp, True, grid, dtype)
        c, s, z = c.cpu(), s.cpu(), z.cpu()
        return {
            "codes4": c[r4].to(torch.uint8),
            "scale4": s[r4],
            "zero4": z[r4],
            "codes8": c[r8].to(torch.int8),
            "scale8": s[r8],
            "is8": is8,
        }
    out = {"is8": is8}
    Wc, Hc = W.cpu(), None if H is None else H.cpu()
    for rows, bits, tag in ((r4, 4, "4"), (r8, 8, "8")):
        if rows.numel():
            q, s, z = gptq_any(Wc[rows].contiguous(), Hc, bits, group_size, damp=damp, clip_grid=grid, impl="c")
        else:
            K = W.shape[1]
            G = -(-K // group_size)
            q = torch.zeros(0, K, dtype=torch.uint8 if bits == 4 else torch.int8)
            s, z = torch.zeros(0, G), torch.zeros(0, G, dtype=torch.uint8)
        out["codes" + tag], out["scale" + tag] = q, s
        if bits == 4:
            out["zero4"] = z
    return out


def _mixed_from_rows(linear, part, group_size, weight_only) -> MixedLinear:
    """A host :class:`MixedLinear` from one layer's slice of :func:`_gptq_rows`'s output."""
    N, K = linear.out_features, linear.in_features
    is8 = part["is8"]
    n8 = int(is8.sum())
    m = MixedLinear(K, N, n8=n8, bias=linear.bias is not None, group_size=group_size, weight_only=weight_only)
    m.perm.copy_(torch.cat([torch.nonzero(is8).flatten(), torch.nonzero(~is8).flatten()]))
    if N - n8:
        m.qweight4.copy_(ops.pack_int4(part["codes4"].contiguous()))
        m.scale4.copy_(part["scale4"])
        m.zero4.copy_(part["zero4"])
    if n8:
        m.qweight8.copy_(part["codes8"])
        m.scale8.copy_(part["scale8"])
    if linear.bias is not None:
        m.bias.copy_(linear.bias.detach().float().cpu())
    return m


def _use_as_prefix(linear: nn.Linear, q: MixedLinear) -> None:
    """Give ``linear`` the weights ``q`` represents, for the forward passes of the later groups and blocks
    (the same values whether ``q`` was just computed or restored from the cache)."""
    with torch.no_grad():
        linear.weight.copy_(q.dequantized_weight().to(linear.weight.device, linear.weight.dtype))


def allocate(
    layers,
    salience: Dict[str, np.ndarray],
    fraction: float,
    selection: str = "global",
    seed: int = 0,
    row_multiple: int = 1,
) -> Dict[str, np.ndarray]:
    """8-bit rows per layer: sorted int64 indices.

    The budget counts weights, not features: features are taken in order of decreasing salience
    (over the whole model for ``"global"``) while their weights fit in ``fraction`` of all weights,
    so the average is ``4 + 4 * fraction`` bits even though layers have different input widths.
    ``"per_bit"`` ranks by ``S_c / in_features`` instead (salience per extra bit of an 8-bit row).
    ``"global_floor"`` first gives every layer its ``fraction / 2`` most salient rows (a floor), then
    ranks the other rows globally for what is left of the budget.
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
        if selection in ("global", "per_bit", "global_floor"):
            s = np.concatenate([np.asarray(salience[n], dtype=np.float64) for n in names])
            if not np.all(np.isfinite(s)):
                raise ValueError("salience: non-finite values (check the calibration data / model)")
            if selection == "per_bit":  # greedy knapsack: value per unit of cost (K weights per row)
                s = s / np.array([K[names[i]] for i in layer_id], dtype=np.float64)
            if selection == "global_floor":  # the floor's rows first (their weights fit in half the budget)
                off = np.cumsum([0] + [N[n] for n in names])
                for i, n in enumerate(names):
                    s[off[i] + np.argsort(-salience[n], kind="stable")[: int(fraction / 2 * N[n])]] = np.inf
            order = np.argsort(-s, kind="stable")
        else:
            order = np.random.default_rng(seed).permutation(len(row))
        cost = np.array([K[names[i]] for i in layer_id[order]], dtype=np.float64)
        take = order[: int(np.searchsorted(np.cumsum(cost), budget, side="right"))]
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
