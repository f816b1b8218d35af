"""Decode-shape check of the CUDA layer's launch option (one GPU call, a few seconds): the
W4.4A8 mixed layer timed as CUDA-graph replays with and without programmatic dependent launch
(pdl), against bf16 F.linear, on the 70B shapes and the default model's shapes, at small M.

    python3 bench/gpu_variants.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_linear import copies, rand_qweight, split_rows, time_graph  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixllm import cuda_ops  # noqa: E402

SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (576, 576), (1536, 576), (576, 1536), (192, 576)]
VARIANTS = {  # name: (PreparedLinear kwargs, call kwargs)
    "pdl": ({}, {}),
    "no pdl": ({"pdl": False}, {}),
}


def profile(dev, gen):
    """One call per variant at M = 1 between cudaProfilerStart/Stop (run under ncu)."""
    for N, K in [(576, 576), (28672, 8192)]:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        w4, w8 = rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)
        x = torch.randn((1, K), device=dev, dtype=torch.bfloat16, generator=gen)
        ls = {v: cuda_ops.PreparedLinear([(w4, i4), (w8, i8)], N, None, dev, **kw) for v, (kw, _) in VARIANTS.items()}
        for v, (_, ckw) in VARIANTS.items():
            ls[v](x, **ckw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for v, (_, ckw) in VARIANTS.items():
            ls[v](x, **ckw)
            torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if args.profile:
        return profile(dev, gen)
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>3} | {'bf16':>7} | " + " ".join(f"{v:>20}" for v in VARIANTS) + " | plan")
    for N, K in SHAPES:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        nc = copies((N - n8) * K // 2 + n8 * K)
        mixed = [(rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)) for _ in range(nc)]
        wb = [torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(copies(2 * N * K))]
        layers = {v: [cuda_ops.PreparedLinear([(p[0], i4), (p[1], i8)], N, None, dev, **kw) for p in mixed]
                  for v, (kw, _) in VARIANTS.items()}
        for M in [int(m) for m in args.ms.split(",")]:
            xs = [torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen)
                  for _ in range(max(len(mixed), len(wb)))]
            r = {"N": N, "K": K, "M": M}
            r["bf16"] = time_graph([(lambda x=xs[i], w=w: F.linear(x, w)) for i, w in enumerate(wb)]) * 1e3
            for v, (_, ckw) in VARIANTS.items():
                r[v] = time_graph([(lambda x=xs[i], l=l, c=ckw: l(x, **c)) for i, l in enumerate(layers[v])]) * 1e3
            p = layers["pdl"][0].plan(M)
            r["plan"] = f"{p[3]}/s{p[1]}"
            rows.append(r)
            print(f"{N:>6} {K:>6} {M:>3} | {r['bf16']:7.1f} | " + " ".join(f"{r[v]:20.1f}" for v in VARIANTS)
                  + f" | {r['plan']}", flush=True)
        del mixed, wb, layers
        torch.cuda.empty_cache()
    if args.out:
        with open(os.path.join(args.out, "gpu_variants.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
