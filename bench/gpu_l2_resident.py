"""How much of a decode-size W4.4A8 layer's time is its weight's trip from DRAM: the layer (M = 1) timed
with its weight resident in L2 (one copy, called back to back) and right after a 256 MB read that evicts
it, with an idle stretch (a sleep kernel, standing in for attention) between the two or not.

    python3 bench/gpu_l2_resident.py [--out DIR]      # JSON to DIR and bench/results/
"""

import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_linear import rand_qweight, script_start, split_rows, time_graph, write_json  # noqa: E402

from mixllm import cuda_ops  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (14336, 4096), (28672, 4096)]
SLEEP_US = (0, 4, 10)


def main():
    args, dev, gen = script_start(__doc__)
    flush = torch.rand(64 << 20, device=dev)  # 256 MB of float32: several times the L2
    acc = torch.empty((), device=dev)
    rows = []
    for N, K in SHAPES:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        layer = cuda_ops.PreparedLinear(
            [(rand_qweight(N - n8, K, 4, dev, gen), i4), (rand_qweight(n8, K, 8, dev, gen), i8)], N, None, dev
        )
        x = torch.randn((1, K), device=dev, dtype=torch.bfloat16, generator=gen)
        r = {"N": N, "K": K, "resident_us": time_graph([lambda f=layer, a=x: f(a)], reps=15, min_calls=12) * 1e3}
        for us in SLEEP_US:

            def before(us=us):
                torch.sum(flush, dim=(0,), out=acc)
                if us:
                    torch.cuda._sleep(int(us * 1800))  # cycles at about 1.8 GHz

            t0 = time_graph([before], reps=15)
            t1 = time_graph([lambda b=before, f=layer, a=x: (b(), f(a))], reps=15)
            r[f"after_flush_sleep{us}_us"] = (t1 - t0) * 1e3
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        rows.append(r)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    res = {"device": torch.cuda.get_device_name(dev), "date": date, "rows": rows}
    write_json(res, "gpu_l2_resident", date, args.out)


if __name__ == "__main__":
    main()
