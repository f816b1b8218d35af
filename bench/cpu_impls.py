"""The CPU kernel implementations side by side: every path this CPU has (``ops.cpu_impls()``: AVX2,
AVX-512 VNNI) forced, timed interleaved in one process on the same weights, so that ``impl="auto"``
(csrc/gemm_cpu.c: resolve) can be checked against what is fastest on a given CPU.

  OMP_NUM_THREADS=2 python3 bench/cpu_impls.py --json bench/results/cpu_impls_<cpu>_<date>.json

Per shape and token count M: the mixed W4.4A8 layer (10% of the rows 8-bit, as bench/cpu_linear.py) and
the all-8-bit layer, medians of ``--reps`` interleaved calls; before every call a 96 MB buffer is
rewritten so that each call reads its weights from memory, as in a model's forward pass.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import torch
from cpu_linear import cpu_name  # bench/ is on sys.path when this script runs

from mixllm import ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576), (576, 576)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--ms", default="1,4,16,128")
    ap.add_argument("--json", default=None)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    impls = [i for i in ops.cpu_impls() if i != "portable"]
    if not impls:
        raise SystemExit("no SIMD implementation on this CPU: nothing to compare")
    torch.manual_seed(0)
    flush = torch.empty(96 << 20, dtype=torch.uint8)
    rows = []
    print(f"{cpu_name()}, {os.environ.get('OMP_NUM_THREADS', 'default')} threads; impls {impls}; ms per call")
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        perm = torch.randperm(N)
        i8, i4 = torch.sort(perm[: N // 10]).values, torch.sort(perm[N // 10 :]).values  # as MixedLinear stores them
        W4 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[i4], 4, 128), 4, 128)
        W8 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[i8], 8, 128), 8, 128)
        W8all = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w, 8, 128), 8, 128)
        fns = {}
        for impl in impls:
            fns[("mixed", impl)] = ops.PreparedCPULinear([(W4, i4), (W8, i8)], N, impl=impl)
            fns[("w8a8", impl)] = ops.PreparedCPULinear([(W8all, None)], N, impl=impl)
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K)
            times = {k: [] for k in fns}
            for _ in range(args.reps):
                for k, f in fns.items():
                    flush.add_(1)
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
            r = dict(N=N, K=K, M=M, **{f"{a}_{i}_ms": float(np.median(v)) * 1e3 for (a, i), v in times.items()})
            rows.append(r)
            cells = "  ".join(f"{a} {i} {r[f'{a}_{i}_ms']:.3f}" for a, i in fns)
            print(f"{N}x{K} M={M}: {cells}", flush=True)
    if args.json:
        meta = dict(
            date=datetime.date.today().isoformat(),
            cpu=cpu_name(),
            threads=os.environ.get("OMP_NUM_THREADS"),
            torch=torch.__version__,
            impls=impls,
            reps=args.reps,
            timing="interleaved, median, 96 MB rewritten before every call (weights from memory)",
            note=args.note,
            load_average=os.getloadavg(),
        )
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
