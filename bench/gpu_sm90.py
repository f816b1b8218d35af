"""The sm_90a wgmma prefill kernel (cuda/w4a8_sm90.cu) against the mma.sync path, bf16 F.linear
and torch._int_mm, on the issue-4 shapes at prefill M (H100).

Columns (us, medians of CUDA-graph replays over enough weight copies to exceed L2, as in
bench/gpu_linear.py): bf16 F.linear; _int_mm; _int_mm + per-token quant and rescale; the mixed
W4.4A8 layer (10% 8-bit rows, activation quantization included) on the wgmma kernel and on the
mma.sync tile w4x2_m64 that the planner used before (M <= 512: the faster of it and
w8x1_m128); W4A8 alone on the wgmma kernel; and the
wgmma layer's max difference from the mma.sync one (both without split-K), relative to max |y|.

  python bench/gpu_sm90.py [--ms 1024,4096] [--out DIR]
"""

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gpu_linear import SHAPES, copies, int_mm_q, rand_qweight, split_rows, time_graph  # noqa: E402

from mixllm import _cuda, cuda_ops  # noqa: E402

SM90 = next(c for c in range(_cuda.NCFG) if _cuda.plan(0, 1, (16,), 128, c, 1)[2].startswith("sm90"))
MMA = 3  # w4x2_m64, the mma.sync prefill tile


def mixed_calls(xs, mixed, i4, i8, N, M, cfg):
    """One W4.4 call per weight copy (4-bit part, 8-bit part), each on its own input, with tile config ``cfg``."""
    return [
        (lambda x=x, p=p: cuda_ops.qlinear(x, [(p[0], i4), (p[1], i8)], N, None, (M,), cfg=cfg))
        for x, p in zip(xs, mixed)
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    name = torch.cuda.get_device_name(dev)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    print(f"# {name}, {date}, torch {torch.__version__}; us per call")
    head = (
        f"{'N':>6} {'K':>6} {'M':>5} | {'bf16':>8} {'int_mm':>8} {'imm+q':>8} | {'w4.4 wg':>8} {'w4.4 mma':>8} "
        f"{'w4 wg':>8} | {'x bf16':>6} {'x imm':>6} {'x imm+q':>7} {'TOPS':>5} {'vs mma':>6} {'rel.diff':>8}"
    )
    print(head, flush=True)
    rows = []
    for N, K in shapes:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        nm = copies((N - n8) * K // 2 + n8 * K)
        mixed = [(rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)) for _ in range(nm)]
        w4 = [rand_qweight(N, K, 4, dev, gen) for _ in range(copies(N * K // 2))]
        w_bf16 = [
            torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
            for _ in range(copies(2 * N * K))
        ]
        w_i8 = [
            torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8, generator=gen) for _ in range(copies(N * K))
        ]
        sw = torch.rand((1, N), device=dev, generator=gen) * 1e-2
        for M in ms:
            nx = max(len(mixed), len(w4), len(w_bf16), len(w_i8))
            xs = [torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(nx)]
            xq = [torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8, generator=gen) for _ in w_i8]
            r = {"N": N, "K": K, "M": M}
            r["bf16"] = time_graph([(lambda x=xs[i], w=w: F.linear(x, w)) for i, w in enumerate(w_bf16)])
            r["int_mm"] = time_graph([(lambda a=xq[i], w=w: torch._int_mm(a, w.t())) for i, w in enumerate(w_i8)])
            r["int_mm+q"] = time_graph(
                [(lambda x=xs[i], w=w, sw=sw: int_mm_q(x, w.t(), sw)) for i, w in enumerate(w_i8)]
            )
            r["w4.4_wgmma"] = time_graph(mixed_calls(xs, mixed, i4, i8, N, M, SM90))
            r["w4.4_mma"] = time_graph(mixed_calls(xs, mixed, i4, i8, N, M, MMA))
            if M <= 512:  # below the prefill sizes the planner's mma.sync choice may be the 128-token tile
                r["w4.4_mma"] = min(r["w4.4_mma"], time_graph(mixed_calls(xs, mixed, i4, i8, N, M, 4)))
            r["w4_wgmma"] = time_graph(
                [
                    (lambda x=xs[i], w=w, N=N, M=M: cuda_ops.qlinear(x, [(w, None)], N, None, (M,), cfg=SM90))
                    for i, w in enumerate(w4)
                ]
            )
            r["plan"] = cuda_ops.plan(M, (N - n8, n8), K)[2]
            ya = cuda_ops.qlinear(xs[0], [(mixed[0][0], i4), (mixed[0][1], i8)], N, None, (M,), cfg=SM90).float()
            yb = cuda_ops.qlinear(
                xs[0], [(mixed[0][0], i4), (mixed[0][1], i8)], N, None, (M,), cfg=MMA, splits=1
            ).float()
            r["rel_diff"] = ((ya - yb).abs().max() / yb.abs().max()).item()
            t = r["w4.4_wgmma"]
            r["x_bf16"], r["x_int_mm"], r["x_int_mm+q"] = r["bf16"] / t, r["int_mm"] / t, r["int_mm+q"] / t
            r["x_mma"] = r["w4.4_mma"] / t
            r["TOPS"] = 2 * M * N * K / (t * 1e-3) / 1e12
            rows.append(r)
            print(
                f"{N:>6} {K:>6} {M:>5} | {r['bf16'] * 1e3:8.1f} {r['int_mm'] * 1e3:8.1f} {r['int_mm+q'] * 1e3:8.1f} | "
                f"{t * 1e3:8.1f} {r['w4.4_mma'] * 1e3:8.1f} {r['w4_wgmma'] * 1e3:8.1f} | {r['x_bf16']:6.2f} "
                f"{r['x_int_mm']:6.2f} {r['x_int_mm+q']:7.2f} {r['TOPS']:5.0f} {r['x_mma']:6.2f} {r['rel_diff']:8.1e} "
                f"{r['plan']}",
                flush=True,
            )
            del xs, xq
        del mixed, w4, w_bf16, w_i8
        torch.cuda.empty_cache()
    res = {"device": name, "date": date, "torch": torch.__version__, "units": "ms per call", "rows": rows}
    if args.out:
        with open(os.path.join(args.out, "gpu_sm90.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
