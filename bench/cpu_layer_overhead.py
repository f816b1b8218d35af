"""Per-call cost of MixedLinear on the CPU: the prepared layer against the functional op (issue 16).

For each layer shape of the default model (SmolLM2-135M: 576 hidden, 1536 MLP, 192 k/v; no bias; 10% of
the rows 8-bit, random weights: speed does not depend on the values) and each M, times interleaved in one
process, repeated, minimum per call:
  * ``functional``: ``ops.mixed_linear(x, w4, w8, index4, index8)`` with the layer's torch tensors, which is
    what ``MixedLinear.forward`` called before the prepared layer (every constant array crosses into C
    through torch's ``__dlpack__`` each call, indices checked and converted each call);
  * ``prepared``: ``MixedLinear.forward`` (``ops.PreparedCPULinear``: constants converted once);
  * ``c_numpy``: ``_C.cpu_qlinear`` on NumPy arrays prepared beforehand (the kernel with the cheapest
    boundary: a floor for the Python side);
  * ``fp32``: the float32 ``nn.Linear`` the layer replaces, called as a module like ``prepared`` (both
    pay ``nn.Module.__call__``).
"one block" sums the seven layers of a transformer block. Outputs of ``prepared`` and ``functional`` are
checked bit-identical first.

    OMP_NUM_THREADS=1 python3 bench/cpu_layer_overhead.py --json bench/results/cpu_layer_overhead_2026-11-30.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np
import torch

from mixllm import _C, ops
from mixllm.nn import MixedLinear

BLOCK = [
    ("q_proj", 576, 576),
    ("k_proj", 192, 576),
    ("v_proj", 192, 576),
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("up_proj", 1536, 576),
    ("down_proj", 576, 1536),
]
SHAPES = {"576x576": (576, 576), "192x576": (192, 576), "1536x576": (1536, 576), "576x1536": (576, 1536)}


def _layer(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.02)
    rows8 = torch.randperm(N, generator=g)[: N // 10].numpy()
    return lin, MixedLinear.from_linear(lin, rows8)


def _variants(lin, m, x):
    w4, w8, i4, i8 = m._parts()
    xn = x.numpy()
    yn = np.empty((x.shape[0], m.out_features), np.float32)
    c_parts = [(w.cpu_blob().numpy(), w.bits, w.shape[0], i.numpy()) for w, i in ((w4, i4), (w8, i8))]
    g = min(m.group_size, m.in_features)
    y_p, y_f = m(x), ops.mixed_linear(x, w4, w8, i4, i8, m.bias)
    assert torch.equal(y_p, y_f), "prepared and functional outputs differ"
    _C.cpu_qlinear(xn, c_parts, g, None, yn, 0)
    assert np.array_equal(yn, y_p.numpy()), "C call on NumPy arrays differs"
    return {
        "functional": lambda: ops.mixed_linear(x, w4, w8, i4, i8, m.bias),
        "prepared": lambda: m(x),
        "c_numpy": lambda: _C.cpu_qlinear(xn, c_parts, g, None, yn, 0),
        "fp32": lambda: lin(x),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="1,512", help="token counts M, comma-separated")
    ap.add_argument("--reps", type=int, default=20, help="interleaved repetitions (the minimum is kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ms = [int(v) for v in args.ms.split(",")]
    layers = {name: _layer(N, K, i) for i, (name, (N, K)) in enumerate(SHAPES.items())}
    rows = []
    for M in ms:
        inner = 200 if M == 1 else max(1, 2048 // M)
        fns = {}
        for name, (lin, m) in layers.items():
            x = torch.randn(M, m.in_features)
            fns[name] = _variants(lin, m, x)
        best = {(s, v): float("inf") for s in fns for v in fns[s]}
        for _ in range(args.reps):
            for s, vs in fns.items():
                for v, f in vs.items():
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        f()
                    best[(s, v)] = min(best[(s, v)], (time.perf_counter() - t0) / inner)
        per = {s: {v: best[(s, v)] * 1e6 for v in fns[s]} for s in fns}
        block = {v: sum(per[f"{N}x{K}"][v] for _, N, K in BLOCK) for v in next(iter(per.values()))}
        for s, d in list(per.items()) + [("one block (7 layers)", block)]:
            row = {
                "shape": s,
                "M": M,
                **{f"{v}_us": round(t, 2) for v, t in d.items()},
                "prepared_speedup": round(d["functional"] / d["prepared"], 2),
                "prepared_vs_fp32": round(d["fp32"] / d["prepared"], 2),
                "functional_vs_fp32": round(d["fp32"] / d["functional"], 2),
            }
            rows.append(row)
            print(
                f"{s:>22} M={M:<4} functional {d['functional']:9.1f} us  prepared {d['prepared']:9.1f} us  "
                f"C+NumPy {d['c_numpy']:9.1f} us  fp32 {d['fp32']:9.1f} us  speedup {row['prepared_speedup']:.2f}x  "
                f"vs fp32 {row['functional_vs_fp32']:.2f}x -> {row['prepared_vs_fp32']:.2f}x",
                flush=True,
            )
    if args.json:
        out = {
            "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
            "reps": args.reps,
            "stat": "minimum per call over interleaved repetitions",
            "note": "shared machine (other agents running); times are minima",
            "rows": rows,
        }
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
