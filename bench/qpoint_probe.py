"""Probe (issue 15): MixLLM's salience taken at the float model vs a signed gain taken at the 4-bit model,
with round-to-nearest parts (no GPTQ), so that only the choice of 8-bit rows differs between the rows.

  python3 bench/qpoint_probe.py MODEL N_CALIB EVAL_TOKENS      e.g. gemma3-270m 8 4096

Rows: all 4-bit; MixLLM's global / per-layer / random 10% (salience |t + t^2/2| per window on the float
model, delta = RTN 4-bit minus W); "qpoint": every target layer at its RTN 4-bit weights, the upgrade
direction d = W - W4 per row, t = (g * (x @ d^T)).sum(0) per window and the gain -(t + t^2/2) summed with
its sign (the first- and second-order change of the loss when row c goes back to full precision, at the
point the model actually is), ranked globally ("qpoint") or per layer. The layers are MixedLinear (int8
activations, as everywhere). Perplexity per text and per-window paired differences. Findings and numbers:
docs/method.md, "Allocation ablations".
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
from e2e import window_nll  # bench/ is on sys.path when this script runs

from mixllm import data
from mixllm.calib import calibrate, rtn_delta, target_linears
from mixllm.methods.mixllm import allocate
from mixllm.modules import set_module
from mixllm.nn import MixedLinear


def window_nlls(model, ids: torch.Tensor, seq_len: int = 512) -> np.ndarray:
    """Mean token NLL per disjoint window (bench/e2e.py's scoring)."""
    return np.array([total / n for total, n in window_nll(model, ids, seq_len, "cpu")])


def quantized_point_gain(base, calib: torch.Tensor) -> dict:
    """Per target row: -(t + t^2/2) summed over the windows, at the all-4-bit (RTN) model."""
    qm = copy.deepcopy(base)
    layers = dict(target_linears(qm))
    up = {}
    for n, m in layers.items():
        d4 = rtn_delta(m.weight, 4, 128)
        with torch.no_grad():
            m.weight.add_(d4)
        up[n] = -d4  # back towards full precision
    acc = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in layers.items()}

    def forward_hook(n):
        def hook(mod, inp, out):
            x = inp[0]
            if not out.requires_grad:
                return

            def grad_hook(g):
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                t = (g.reshape(-1, g.shape[-1]).float() * (x2 @ up[n].T)).sum(0).double()
                acc[n].add_(t + t * t / 2)

            out.register_hook(grad_hook)

        return hook

    hooks = [m.register_forward_hook(forward_hook(n)) for n, m in layers.items()]
    try:
        for i in range(calib.shape[0]):
            ids = calib[i : i + 1]
            e = qm.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = qm(inputs_embeds=e, labels=ids, use_cache=False).loss
            torch.autograd.grad(loss, e)
    finally:
        for h in hooks:
            h.remove()
    return {n: (-a).numpy() for n, a in acc.items()}


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    name, n_calib, n_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    base, tok = data.load_model(name)
    calib = data.calibration_samples(tok, n_calib, 512, seed=0)
    evals = {t: tok(data.evaluation_text(t), return_tensors="pt").input_ids[0][:n_tokens] for t in ("wiki", "news")}
    layers = target_linears(base)
    t0 = time.time()
    std = calibrate(base, calib, layers, hessian=False, salience=True, progress=False).salience
    print("float-point salience", round(time.time() - t0), "s", flush=True)
    gain = quantized_point_gain(base, calib)
    print("quantized-point gain", round(time.time() - t0), "s", flush=True)
    configs = {
        "all4": {n: np.zeros(0, np.int64) for n, _ in layers},
        "global": allocate(layers, std, 0.1, "global"),
        "per_layer": allocate(layers, std, 0.1, "per_layer"),
        "random": allocate(layers, std, 0.1, "random"),
        "qpoint": allocate(layers, gain, 0.1, "global"),
        "qpoint_per_layer": allocate(layers, gain, 0.1, "per_layer"),
    }
    fp = {t: window_nlls(base, ids) for t, ids in evals.items()}
    print("fp32", {t: round(float(np.exp(v.mean())), 3) for t, v in fp.items()}, flush=True)
    res = {}
    for key, rows8 in configs.items():
        model = copy.deepcopy(base)
        for n, m in layers:
            set_module(model, n, MixedLinear.from_linear(m, rows8[n], group_size=128))
        res[key] = {t: window_nlls(model, ids) for t, ids in evals.items()}
        print(key, {t: round(float(np.exp(v.mean())), 3) for t, v in res[key].items()}, flush=True)
    pairs = [
        ("global", "per_layer"),
        ("qpoint", "global"),
        ("qpoint", "per_layer"),
        ("per_layer", "random"),
        ("qpoint_per_layer", "per_layer"),
    ]
    for t in evals:
        for a, b in pairs:
            d = res[a][t] - res[b][t]
            se = d.std(ddof=1) / np.sqrt(len(d))
            print(t, a, "vs", b, f"{d.mean():+.4f} ± {se:.4f} ({(d < 0).sum()}/{len(d)})")


if __name__ == "__main__":
    main()
