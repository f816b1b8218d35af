"""CPU benchmark: mixllm mixed_linear (10% 8-bit rows, 90% 4-bit, g128, int8 activations)
against torch fp32 F.linear, measured in the same run.

    python bench/cpu_linear.py [--reps 20] [--impl auto] [--json bench/results/cpu_linear.json]

Times are medians over repetitions after a warm-up; ratios are fp32 time / mixllm time
(> 1 means mixllm is faster). Weights are random (this measures speed, not accuracy).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from mixllm import ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)
MS = [1, 16, 128]


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--impl", default="auto", choices=["auto"] + ops.cpu_impls())
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for N, K in SHAPES:
        w = torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32) * 0.02)
        n8 = N // 10
        perm = torch.from_numpy(rng.permutation(N))
        idx8, idx4 = perm[:n8], perm[n8:]
        W8 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx8], 8, 128), 8, 128)
        W4 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx4], 4, 128), 4, 128)
        W8.cpu_blob(), W4.cpu_blob()
        for M in MS:
            x = torch.randn(M, K)
            t_ref = median_time(lambda: F.linear(x, w), args.reps)
            t_mix = median_time(lambda: ops.mixed_linear(x, W4, W8, idx4, idx8, impl=args.impl), args.reps)
            rows.append(dict(N=N, K=K, M=M, fp32_ms=t_ref * 1e3, mixed_ms=t_mix * 1e3, speedup=t_ref / t_mix))
            r = rows[-1]
            print(f"N={N:6d} K={K:6d} M={M:4d}  fp32 {r['fp32_ms']:8.3f} ms  W4.4A8 {r['mixed_ms']:8.3f} ms  "
                  f"x{r['speedup']:.2f}", flush=True)
    meta = dict(date=datetime.date.today().isoformat(), cpu=cpu_name(), cores=os.cpu_count(),
                torch=torch.__version__, torch_threads=torch.get_num_threads(), impl=args.impl,
                impls_available=ops.cpu_impls())
    print("\n| N x K | M | fp32 F.linear (ms) | mixllm W4.4A8 (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']}x{r['K']} | {r['M']} | {r['fp32_ms']:.3f} | {r['mixed_ms']:.3f} | {r['speedup']:.2f}x |")
    print(f"\n{meta}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
