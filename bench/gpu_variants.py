"""Decode-shape check of the CUDA layer's launch option (one GPU call, a few seconds): the
W4.4A8 mixed layer timed as CUDA-graph replays with and without programmatic dependent launch
(pdl), against bf16 F.linear, on the 70B, Llama-3-8B and the default model's shapes, at small M.

    python3 bench/gpu_variants.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_linear import copies, min_calls, rand_qweight, split_rows, time_graph  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixllm import cuda_ops  # noqa: E402

SHAPES = [
    (28672, 8192),
    (8192, 28672),
    (4096, 4096),
    (6144, 4096),
    (28672, 4096),
    (14336, 4096),
    (4096, 14336),
    (1024, 4096),
    (576, 576),
    (1536, 576),
    (576, 1536),
    (192, 576),
]
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


def tune(dev, gen, ms):
    """W4.4A8 us of every mma.sync tile configuration (auto split-K, and split-K off) at small M."""
    from mixllm import _cuda

    names = [_cuda.plan(0, 1, (16,), 128, c, 1)[2] for c in range(_cuda.NCFG)]
    print(f"{'N':>6} {'K':>6} {'M':>3} split | " + " ".join(f"{n:>11}" for n in names) + " | auto")
    rows = []
    for N, K in SHAPES:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        nc = copies((N - n8) * K // 2 + n8 * K)
        ls = [
            cuda_ops.PreparedLinear(
                [(rand_qweight(N - n8, K, 4, dev, gen), i4), (rand_qweight(n8, K, 8, dev, gen), i8)], N, None, dev
            )
            for _ in range(nc)
        ]
        for M in ms:
            xs = [torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in ls]
            for sp in (0, 1):
                ts = [
                    time_graph(
                        [(lambda x=xs[i], l=l, c=c, sp=sp: l(x, cfg=c, splits=sp)) for i, l in enumerate(ls)], reps=7
                    )
                    * 1e3
                    for c in list(range(_cuda.NCFG)) + [-1]
                ]
                rows.append({"N": N, "K": K, "M": M, "splits": "auto" if sp == 0 else 1, "us": ts})
                print(
                    f"{N:>6} {K:>6} {M:>3} {'auto' if sp == 0 else '1':>5} | "
                    + " ".join(f"{t:11.1f}" for t in ts[:-1])
                    + f" | {ts[-1]:.1f}",
                    flush=True,
                )
        del ls
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tune", action="store_true", help="every tile configuration at small M")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    if args.profile:
        return profile(dev, gen)
    if args.tune:
        rows = tune(dev, gen, [int(m) for m in args.ms.split(",")])
        if args.out:
            with open(os.path.join(args.out, "gpu_tune_small_m.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
        return
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>3} | {'bf16':>7} | " + " ".join(f"{v:>20}" for v in VARIANTS) + " | plan")
    for N, K in SHAPES:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        nc = copies((N - n8) * K // 2 + n8 * K)
        mixed = [(rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)) for _ in range(nc)]
        wb = [torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(copies(2 * N * K))]
        layers = {
            v: [cuda_ops.PreparedLinear([(p[0], i4), (p[1], i8)], N, None, dev, **kw) for p in mixed]
            for v, (kw, _) in VARIANTS.items()
        }
        for M in [int(m) for m in args.ms.split(",")]:
            xs = [
                torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen)
                for _ in range(max(len(mixed), len(wb)))
            ]
            r = {"N": N, "K": K, "M": M}
            mc = min_calls(M)
            bf16 = [(lambda x=xs[i], w=w: F.linear(x, w)) for i, w in enumerate(wb)]
            r["bf16"] = time_graph(bf16, min_calls=mc) * 1e3
            for v, (_, ckw) in VARIANTS.items():
                r[v] = (
                    time_graph([(lambda x=xs[i], l=l, c=ckw: l(x, **c)) for i, l in enumerate(layers[v])], min_calls=mc)
                    * 1e3
                )
            p = layers["pdl"][0].plan(M)
            r["plan"] = f"{p[3]}/s{p[1]}"
            rows.append(r)
            print(
                f"{N:>6} {K:>6} {M:>3} | {r['bf16']:7.1f} | "
                + " ".join(f"{r[v]:20.1f}" for v in VARIANTS)
                + f" | {r['plan']}",
                flush=True,
            )
        del mixed, wb, layers
        torch.cuda.empty_cache()
    if args.out:
        with open(os.path.join(args.out, "gpu_variants.json"), "w") as f:
            date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
            json.dump({"device": torch.cuda.get_device_name(), "date": date, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
