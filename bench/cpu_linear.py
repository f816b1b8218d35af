"""CPU benchmark: mixllm's quantized linear layers against PyTorch's own CPU paths, in one process.

    python3 bench/cpu_linear.py [--reps 15] [--impl auto] [--shapes llama|small|all] [--ms 1,16,128]
                                [--stat median|min] [--clock wall|thread] [--order fixed|shuffle]
                                [--json bench/results/cpu_linear.json]

Columns (all without bias, float32 activations in and out):
  fp32    torch ``F.linear`` (oneDNN / MKL sgemm)
  int8    PyTorch dynamic int8: ``torch.ao.quantization.quantize_dynamic`` of an ``nn.Linear`` on the
          fbgemm engine (int8 weights per tensor, activations quantized to uint8 per call)
  W4.4A8  mixllm's layer: 10% of the rows 8-bit, 90% 4-bit, g128, int8 activations per token and
          group, quantized inside the call; timed through ``ops.PreparedCPULinear``, the path that
          ``MixedLinear`` takes on the CPU (``ops.mixed_linear`` gives the same bits, plus per-call
          Python checks and conversions: bench/cpu_layer_overhead.py measures those)
  W8A8    the same over all N rows at 8 bits (the 8-bit part alone, at the full layer size)

The contenders run interleaved: every repetition times each of them once, in turn, so that load
from other processes on a shared machine hits all of them alike: fp32, int8, W4.4A8, W8A8 (``--order
fixed``, the default), or in a fresh random order per repetition (``--order shuffle``, seeded). A call
starts right after another contender's, and the OpenMP threads of the previous call's library (torch's,
or mixllm's own runtime) still spin on the cores for a while: measured on a 2-core VM, a mixllm call at
M = 1 ran about 10% slower right after an int8 call than after its own, and the int8 call 9% slower
after a mixllm call. The fixed order always puts int8 after fp32 (torch's own pool) and W4.4A8 after
int8; the shuffled one spreads that cost, which falls hardest on torch's short calls (the default
model's layers); the tables report medians (or with
--stat min the minima) over repetitions (after a warm-up) and their ratios (``x int8`` = int8 time /
mixllm time: > 1 means mixllm is faster). Weights are random: this measures speed, not accuracy.

Shapes: ``llama`` = 4096x4096, 11008x4096, 4096x11008 (N x K); ``small`` = the linear layers of the
default model (hidden 576, MLP 1536, 3 KV heads of 64: q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536), where per-call overheads weigh most; M = 512 is its evaluation window.
"""

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mixllm import ops

SHAPES = {
    "llama": [(4096, 4096), (11008, 4096), (4096, 11008)],  # (N, K)
    "small": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
# One block of the default model: q, o (576x576), k, v (192x576), gate, up (1536x576), down (576x1536).
BLOCK = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def block_totals(rows):
    """Per M, the summed time of one default-model block's seven linear layers (when all were measured)."""
    out = []
    for M in sorted({r["M"] for r in rows}):
        got = {(r["N"], r["K"]): r for r in rows if r["M"] == M and (r["N"], r["K"]) in BLOCK}
        if len(got) != len(BLOCK):
            continue
        tot = {c: sum(BLOCK[s] * got[s][c + "_ms"] for s in BLOCK) for c in ("fp32", "int8", "mixed", "w8a8")}
        out.append(
            dict(
                M=M,
                **{c + "_ms": v for c, v in tot.items()},
                mixed_vs_fp32=tot["fp32"] / tot["mixed"],
                mixed_vs_int8=tot["int8"] / tot["mixed"],
                w8a8_vs_int8=tot["int8"] / tot["w8a8"],
            )
        )
    return out


def interleaved_times(fns, reps, stat="median", clock=time.perf_counter, order="fixed", rng=None):
    """Median (or minimum) seconds of each callable, timed round-robin (one call of each per repetition,
    in a random order per repetition with ``order="shuffle"``, else in the order given)."""
    for f in fns.values():  # warm-up (packing, first-touch, thread pools)
        f()
    ts = {k: [] for k in fns}
    rng = rng or random.Random(0)
    for _ in range(reps):
        keys = list(fns)
        if order == "shuffle":
            rng.shuffle(keys)
        for k in keys:
            f = fns[k]
            t0 = clock()
            f()
            ts[k].append(clock() - t0)
    return {k: (min(v) if stat == "min" else statistics.median(v)) for k, v in ts.items()}


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni") if f in have]
    except OSError:
        pass
    return []


def int8_linear(w):
    """PyTorch's dynamic int8 linear layer (fbgemm) holding the float weight ``w`` [N, K]."""
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--impl", default="auto", choices=["auto"] + ops.cpu_impls())
    ap.add_argument("--shapes", default="llama", choices=["llama", "small", "all"])
    ap.add_argument("--ms", default=None, help="comma-separated token counts (default 1,16,128; small: 1,16,128,512)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument(
        "--stat",
        default="median",
        choices=["median", "min"],
        help="min: the fastest repetition, the robust figure on a loaded, shared machine",
    )
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "thread"],
        help="thread: CPU time of the calling thread, which leaves out the time it is descheduled on a "
        "shared machine; only with one thread on both sides (OMP_NUM_THREADS=1), where all work runs on it",
    )
    ap.add_argument(
        "--order",
        default="fixed",
        choices=["fixed", "shuffle"],
        help="per repetition, call the contenders always as fp32, int8, W4.4A8, W8A8 (default) or in a random order",
    )
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine shared')")
    args = ap.parse_args()
    if args.clock == "thread":
        if os.environ.get("OMP_NUM_THREADS") != "1":
            ap.error("--clock thread needs OMP_NUM_THREADS=1 (every kernel then runs on the calling thread)")
        torch.set_num_threads(1)
    torch.backends.quantized.engine = "fbgemm"
    load_before = os.getloadavg()
    shapes = SHAPES["llama"] + SHAPES["small"] if args.shapes == "all" else SHAPES[args.shapes]
    rng = np.random.default_rng(0)
    order_rng = random.Random(0)
    rows = []
    for N, K in shapes:
        ms = [int(m) for m in args.ms.split(",")] if args.ms else ([1, 16, 128] if K >= 4096 else [1, 16, 128, 512])
        w = torch.from_numpy(rng.standard_normal((N, K), dtype=np.float32) * 0.02)
        n8 = N // 10
        perm = torch.from_numpy(rng.permutation(N))
        # each part's rows in ascending output order, as MixedLinear.from_linear stores them
        idx8, idx4 = torch.sort(perm[:n8]).values, torch.sort(perm[n8:]).values
        W8 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx8], 8, 128), 8, 128)
        W4 = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w[idx4], 4, 128), 4, 128)
        W8all = ops.QuantizedWeight.from_codes(*ops.quantize_weight(w, 8, 128), 8, 128)
        mixed = ops.PreparedCPULinear([(W4, idx4), (W8, idx8)], N, impl=args.impl)
        w8a8 = ops.PreparedCPULinear([(W8all, None)], N, impl=args.impl)
        q8 = int8_linear(w)
        for M in ms:
            x = torch.randn(M, K)
            t = interleaved_times(
                {
                    "fp32": lambda x=x, w=w: F.linear(x, w),
                    "int8": lambda x=x, q8=q8: q8(x),
                    "mixed": lambda x=x, f=mixed: f(x),
                    "w8a8": lambda x=x, f=w8a8: f(x),
                },
                args.reps,
                args.stat,
                time.thread_time if args.clock == "thread" else time.perf_counter,
                args.order,
                order_rng,
            )
            r = dict(
                N=N,
                K=K,
                M=M,
                fp32_ms=t["fp32"] * 1e3,
                int8_ms=t["int8"] * 1e3,
                mixed_ms=t["mixed"] * 1e3,
                w8a8_ms=t["w8a8"] * 1e3,
                mixed_vs_fp32=t["fp32"] / t["mixed"],
                mixed_vs_int8=t["int8"] / t["mixed"],
                w8a8_vs_int8=t["int8"] / t["w8a8"],
            )
            rows.append(r)
            print(
                f"N={N:6d} K={K:6d} M={M:4d}  fp32 {r['fp32_ms']:8.3f}  int8 {r['int8_ms']:8.3f}  "
                f"W4.4A8 {r['mixed_ms']:8.3f} (x{r['mixed_vs_int8']:.2f} int8, x{r['mixed_vs_fp32']:.2f} fp32)  "
                f"W8A8 {r['w8a8_ms']:8.3f} (x{r['w8a8_vs_int8']:.2f} int8)  ms",
                flush=True,
            )
    command = "python3 bench/cpu_linear.py " + " ".join(sys.argv[1:])
    meta = dict(
        date=datetime.date.today().isoformat(),
        cpu=cpu_name(),
        cpu_flags=cpu_flags(),
        cores=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        quantized_engine=torch.backends.quantized.engine,
        impl=args.impl,
        impls_available=ops.cpu_impls(),
        reps=args.reps,
        timing=f"interleaved ({args.order} order), {args.stat} of {args.reps} repetitions, "
        + ("CPU time of the calling thread" if args.clock == "thread" else "wall clock"),
        mixllm_path="ops.PreparedCPULinear (MixedLinear's CPU path)",
        load_average_before=list(load_before),
        load_average_after=list(os.getloadavg()),
        note=args.note,
    )
    print(
        "\n| N x K | M | fp32 F.linear (ms) | int8 dynamic (ms) | mixllm W4.4A8 (ms) | vs fp32 | vs int8 "
        "| mixllm W8A8 (ms) | W8A8 vs int8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['N']}x{r['K']} | {r['M']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | {r['mixed_ms']:.3f} | "
            f"{r['mixed_vs_fp32']:.2f}x | {r['mixed_vs_int8']:.2f}x | {r['w8a8_ms']:.3f} | {r['w8a8_vs_int8']:.2f}x |"
        )
    blocks = block_totals(rows)
    if blocks:
        print("\nOne default-model block (q, k, v, o, gate, up, down summed):")
        for b in blocks:
            print(
                f"| block | {b['M']} | {b['fp32_ms']:.3f} | {b['int8_ms']:.3f} | {b['mixed_ms']:.3f} | "
                f"{b['mixed_vs_fp32']:.2f}x | {b['mixed_vs_int8']:.2f}x | {b['w8a8_ms']:.3f} | "
                f"{b['w8a8_vs_int8']:.2f}x |"
            )
    print(f"\n{meta}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(dict(meta=meta, command=command, rows=rows, block_totals=blocks), f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
