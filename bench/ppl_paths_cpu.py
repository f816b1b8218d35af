"""How far float32 rounding alone moves the perplexity of one quantized model (CPU only).

The default model (SmolLM2-135M-Instruct) quantized with MixLLM W4.4A8 (32 calibration windows of 512
tokens, seed 0), evaluated on the first 16384 tokens of the wiki text in windows of 512, three ways:
through the C kernels (the CPU path), through ``MixedLinear._forward_emulated`` (the same function in
float32 torch ops: fake-quantized activations times the dequantized weight), and through that
emulation with the product in float64. The C path and the GPU path differ only in float32 summation
order; this shows how much such differences alone move the perplexity (a layer's outputs 1e-7 apart
flip a few int8 activation codes in the next layer).

    python3 bench/ppl_paths_cpu.py [--model-cache /tmp/q.pt] [--out results.json]

``--model-cache``: a file (outside the repository) that keeps the quantized model between runs
(``torch.save`` of the whole module; quantizing takes minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixllm import data  # noqa: E402
from mixllm.eval import perplexity  # noqa: E402
from mixllm.methods.mixllm import MixLLMConfig  # noqa: E402
from mixllm.nn import MixedLinear  # noqa: E402


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def forward_float64(self, x):
    """``MixedLinear._forward_emulated`` with the product in float64 (same float32 scales and codes)."""
    return self._forward_emulated(x, torch.float64)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-cache", help="keep the quantized model in this file between runs")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", help="write the perplexities here (JSON)")
    args = ap.parse_args(argv)
    t_all = time.time()
    model, tok = data.load_model()
    model.eval()
    ev = tok(data.evaluation_text("wiki"), return_tensors="pt").input_ids[0][: args.eval_tokens]
    if args.model_cache and os.path.exists(args.model_cache):
        model = torch.load(args.model_cache, weights_only=False).eval()
        log("quantized model from", args.model_cache)
    else:
        calib = data.calibration_samples(tok, 32, 512, seed=0, text=data.calibration_text())
        t0 = time.time()
        MixLLMConfig(bits=4.4, n_calib=32, progress=False).apply(model, calib)
        log(f"quantized in {time.time() - t0:.0f} s")
        if args.model_cache:
            torch.save(model, args.model_cache + ".tmp")
            os.replace(args.model_cache + ".tmp", args.model_cache)
    res = {"threads": torch.get_num_threads(), "eval_tokens": int(ev.numel())}
    paths = {
        "c_kernels": MixedLinear.forward,
        "emulated_fp32": MixedLinear._forward_emulated,
        "emulated_fp64": forward_float64,
    }
    original = MixedLinear.forward
    try:
        for name, fwd in paths.items():
            MixedLinear.forward = fwd
            t0 = time.time()
            res[name] = perplexity(model, ev, 512, progress=False)
            log(f"{name}: perplexity {res[name]:.4f} ({time.time() - t0:.0f} s)")
    finally:
        MixedLinear.forward = original
    for name in ("emulated_fp32", "emulated_fp64"):
        log(f"{name} vs c_kernels: {100 * (res[name] / res['c_kernels'] - 1):+.3f}%")
    res["total_s"] = time.time() - t_all
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
