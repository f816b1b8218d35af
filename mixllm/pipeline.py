"""Block-by-block quantization on the quantized prefix (GPTQ paper §4, "true sequential"), shared by
MixLLM, GPTQ and SliM-LLM; memory bounded by one block, its Hessians and the calibration set's hidden
states, not by the model.

:func:`run_blockwise` runs the calibration samples once up to the first transformer block, then for
each block: (optionally) onloads it to the compute device, groups its selected linears by the tensor
they read (q/k/v, o, gate/up, down in a Llama block), and for each group in turn runs the samples
through the block (earlier groups already quantized) to accumulate the group's Hessian
(:class:`mixllm.hessian.HessianAccumulator`), hands it to the method's ``quantize_group`` and swaps
what that returns in; a last pass gives the block's outputs, the next block's inputs; the method's
``finish_block`` runs (e.g. writes the block's results to the cache) and an offloaded block goes back
to the host. A ``restore(block)`` hook lets a resumed run skip the blocks it already finished.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .calib import _input_device, _no_cache_kwargs  # the calibration pass's own rules, shared
from .modules import set_module

__all__ = ["find_blocks", "run_blockwise", "PhaseTimer"]


def _cuda_on() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class PhaseTimer:
    """Wall time per phase, in total and per block (CUDA is synchronised at phase edges), and the peak
    GPU memory (current device) of each block (``blocks[i]["peak_gpu_gb"]``) and of everything before
    the first block (``peak_gpu_gb_before_blocks``). Peak statistics are reset at block edges."""

    def __init__(self):
        self.total: Dict[str, float] = defaultdict(float)
        self.blocks: List[Dict[str, float]] = []
        self.peak_gpu_gb_before_blocks = 0.0

    def new_block(self):
        if _cuda_on() and not self.blocks:
            self.peak_gpu_gb_before_blocks = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        self.blocks.append(defaultdict(float))

    def end_block(self):
        if _cuda_on() and self.blocks:
            self.blocks[-1]["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()

    def peak_gpu_gb(self) -> float:
        """The peak over everything timed so far (and since the last reset)."""
        now = torch.cuda.max_memory_allocated() / 1e9 if _cuda_on() else 0.0
        return max([self.peak_gpu_gb_before_blocks, now] + [b.get("peak_gpu_gb", 0.0) for b in self.blocks])

    @contextmanager
    def __call__(self, phase: str):
        if _cuda_on():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if _cuda_on():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.total[phase] += dt
            if self.blocks:
                self.blocks[-1][phase] += dt


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, names) -> Optional[tuple]:
    """The ``nn.ModuleList`` of transformer blocks holding every selected linear: ``(prefix, list)``,
    or None when the selected linears are not all inside one such list."""
    best = None
    for pname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            inside = [n for n in names if n.startswith(pname + ".")]
            if len(inside) == len(names) and (best is None or len(pname) > len(best[0])):
                best = (pname, mod)
    return best


def _to(obj, dev):
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, tuple):
        return tuple(_to(o, dev) for o in obj)
    if isinstance(obj, list):
        return [_to(o, dev) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    return obj


def _device_of(mod: nn.Module, default):
    p = next(iter(mod.parameters()), None)
    return p.device if p is not None else default


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    samples: List[torch.Tensor],
    names: List[str],
    quantize_group: Callable[[int, List[str], object], Optional[Dict[str, nn.Module]]],
    device=None,
    offload: bool = False,
    true_sequential: bool = True,
    keep_tokens: int = 0,
    seed: int = 0,
    restore: Optional[Callable[[int, List[str]], bool]] = None,
    finish_block: Optional[Callable[[int, List[str]], None]] = None,
    timer: Optional[PhaseTimer] = None,
    progress: bool = True,
    desc: str = "quantize",
) -> Optional[List[str]]:
    """Quantize the linears ``names`` block by block (see the module docstring).

    ``samples``: token-id tensors [1, seq_len]. ``quantize_group(block, names, acc)`` gets the group's
    :class:`~mixllm.hessian.HessianAccumulator` and returns the modules to swap in now (by full name; or
    None when it changed the layers in place). ``device``: where blocks run (default: where each block's
    parameters are); ``offload``: blocks live on the host and are moved to ``device`` one at a time.
    ``true_sequential``: one pass per group inside a block (False: all of a block's Hessians from one
    pass of the unquantized block). ``keep_tokens``: input rows kept per group (SliM-LLM's search).
    ``restore(block, names)``: True when the block's results were restored (its calibration is skipped);
    ``finish_block(block, names)``: after the block's outputs were computed.
    Returns the names of the quantized linears, or None when the model has no list of blocks holding
    every selected linear (the caller falls back to a one-pass calibration).
    """
    from tqdm.auto import tqdm

    timer = timer or PhaseTimer()
    found = find_blocks(model, names)
    if found is None:
        return None
    prefix, blocks = found
    emb_dev = _input_device(model)
    fwd_kwargs = _no_cache_kwargs(model)  # no KV cache (Hugging Face models)
    dev = torch.device(device) if device is not None else None
    if offload and dev is None:
        raise ValueError("device: offload=True needs the compute device")

    # 1. inputs of block 0 (positional and keyword arguments of each call), kept on the compute device
    inputs = []

    def grab(mod, args, kwargs):
        inputs.append((args, kwargs))
        raise _Stop

    b0_dev = dev if dev is not None else _device_of(blocks[0], emb_dev)
    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with timer("forward"):  # everything before block 0 runs where it is (an offloaded model: the host)
            for s in samples:
                try:
                    model(s.to(emb_dev), **fwd_kwargs)
                except _Stop:
                    pass
    finally:
        h.remove()
    if len(inputs) != len(samples):
        return None
    inputs = [_to(a, b0_dev) for a in inputs]
    total_tokens = sum(s.numel() for s in samples)
    keep_p = min(1.0, keep_tokens / max(total_tokens, 1))
    gen = torch.Generator().manual_seed(seed)
    done: List[str] = []
    last = max(i for i in range(len(blocks)) if any(n.startswith(f"{prefix}.{i}.") for n in names))
    bar = tqdm(range(last + 1), desc=desc, unit="block", disable=not progress)
    for bi in bar:
        timer.new_block()
        block = blocks[bi]
        if offload:
            with timer("onload"):
                block.to(dev)
        bdev = _device_of(block, b0_dev)
        inputs = [_to(a, bdev) for a in inputs]
        bpre = f"{prefix}.{bi}."
        lin = {n[len(bpre) :]: model.get_submodule(n) for n in names if n.startswith(bpre)}
        if lin and not (restore is not None and restore(bi, [bpre + r for r in lin])):
            _calibrate_block(
                block, bi, bpre, lin, inputs, quantize_group, model, true_sequential, keep_p, gen, bdev, timer, bar
            )
        with timer("forward"):  # the quantized block's outputs feed the next block
            new_inputs = []
            for args, kwargs in inputs:
                o = block(*args, **kwargs)
                o = o[0] if isinstance(o, (tuple, list)) else o
                new_inputs.append(((o,) + tuple(args[1:]), kwargs))
            inputs = new_inputs
        if finish_block is not None:
            with timer("swap"):
                finish_block(bi, [bpre + r for r in lin])
        if offload:
            with timer("onload"):
                block.to("cpu")
        timer.end_block()
        done.extend(bpre + r for r in lin)
    return done


def _calibrate_block(
    block, bi, bpre, lin, inputs, quantize_group, model, true_sequential, keep_p, gen, bdev, timer, bar
):
    from .hessian import HessianAccumulator

    # group the block's linears by the tensor they read, in first-use order (one call)
    seen, order = [], []

    def rec(rel):
        def f(mod, args):
            x = args[0]
            for gi, t in enumerate(seen):
                if t is x:
                    order[gi].append(rel)
                    return
            seen.append(x)  # keeps the tensor alive so identity checks cannot alias
            order.append([rel])

        return f

    hs = [m.register_forward_pre_hook(rec(r)) for r, m in lin.items()]
    try:
        with timer("forward"):
            block(*inputs[0][0], **inputs[0][1])
    finally:
        for hh in hs:
            hh.remove()
    seen.clear()
    missing = [r for r in lin if not any(r in g for g in order)]
    if missing:
        order.append(missing)  # not reached by the forward pass: their inputs never change (H = 0)
    passes = [[g] for g in order] if true_sequential else [order]
    for groups in passes:
        accs = [HessianAccumulator(lin[g[0]].in_features, device=bdev, keep_p=keep_p, generator=gen) for g in groups]
        hks = [lin[g[0]].register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0])) for g, acc in zip(groups, accs)]
        try:
            with timer("hessian"):
                for args, kwargs in inputs:
                    block(*args, **kwargs)
        finally:
            for hh in hks:
                hh.remove()
        for g, acc in zip(groups, accs):
            new = quantize_group(bi, [bpre + r for r in g], acc)
            acc.free()
            for name, mod in (new or {}).items():
                set_module(model, name, mod)
                lin[name[len(bpre) :]] = mod
            bar.set_postfix_str("+".join(r.rsplit(".", 1)[-1] for r in g))
