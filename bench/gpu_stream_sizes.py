"""How fast a read of a given size can stream on this GPU: the streaming floor for a layer's bytes.

bench/gpu_linear.py's floor divides a layer's bytes by the best streaming rate of a 4 GiB read (and of the
bf16 GEMV on the largest shape). A 70B layer at M = 1 reads about 139 MB in about 30 us, where a kernel's
start and tail (first bytes, the last blocks) weigh more than in 4 GiB. This measures, per size, the
read-only rate of torch.sum over float32 buffers and of cuBLAS's bf16 GEMV (F.linear at M = 1) whose weight
has about that many bytes, each as the median of CUDA-graph replays that rotate through enough copies to
exceed L2 (bench/gpu_linear.py's time_graph, at least 12 calls per replay).

    python3 bench/gpu_stream_sizes.py [--out DIR]      # JSON to DIR and bench/results/
"""

import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_linear import script_start, time_graph, write_json  # noqa: E402

L2_ROTATE = 240 << 20  # bytes of distinct buffers per replay cycle: several times the H200's 60 MB L2
GEMV_SHAPES = [(4096, 4096), (8192, 4096), (8192, 8192), (16384, 8192), (28672, 8192)]
SUM_MB = [16, 35, 70, 139, 278, 556, 4096]


def copies(nbytes):
    return max(1, -(-L2_ROTATE // nbytes))


def main():
    args, dev, gen = script_start(__doc__)
    rows = []
    for mb in SUM_MB:
        n = (mb << 20) // 4
        bufs = [torch.rand(n, device=dev, generator=gen) for _ in range(copies(4 * n))]
        acc = torch.empty((), device=dev)
        t = time_graph([(lambda b=b, a=acc: torch.sum(b, dim=(0,), out=a)) for b in bufs], reps=15, min_calls=12)
        rows.append({"kind": "torch.sum", "MB": 4 * n / 1e6, "us": t * 1e3, "TBps": 4 * n / (t * 1e-3) / 1e12})
        print(rows[-1], flush=True)
        del bufs
    for N, K in GEMV_SHAPES:
        ws = [torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(copies(2 * N * K))]
        x = torch.randn((1, K), device=dev, dtype=torch.bfloat16, generator=gen)
        t = time_graph([(lambda w=w, x=x: F.linear(x, w)) for w in ws], reps=15, min_calls=12)
        nbytes = 2 * N * K
        rows.append({"kind": "bf16 GEMV", "N": N, "K": K, "MB": nbytes / 1e6, "us": t * 1e3, "TBps": nbytes / t / 1e9})
        print(rows[-1], flush=True)
        del ws
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    res = {"device": torch.cuda.get_device_name(dev), "date": date, "torch": torch.__version__, "rows": rows}
    write_json(res, "gpu_stream_sizes", date, args.out)


if __name__ == "__main__":
    main()
