"""Quantized linear layers on the GPU against bf16 F.linear and torch._int_mm (issue 4).

One call measures, for each weight shape (N x K) and token count M, in the same run:
  bf16      F.linear with bf16 weights
  int_mm    torch._int_mm (cuBLASLt int8, B passed as the transpose of an [N, K] int8 tensor)
  int_mm+q  the same plus a per-token int8 quantization of x and the float rescale of the result
  w8a8      mixllm W8A8 (8-bit symmetric g128 weights, int8 g128 activations)
  w4a8      mixllm W4A8 (4-bit asymmetric g128)
  w4.4a8    mixllm mixed layer, a random 10% of the rows 8-bit (each part in column order)
  fp8       FP8 W8A8: torch._scaled_mm, e4m3 weights and activations, per-token and per-channel
            float32 scales, bf16 out (the GEMM alone, activations quantized outside the timing;
            M < 16 padded to 16 rows)
  aq        mixllm's activation quantization alone (part of the three rows above)
and the roofline floor of the W4.4A8 layer: max(bytes / streaming bandwidth, 2MNK / int8 rate).
The streaming bandwidth is what a read really reaches: the best of a read-only reduction over
4 GiB (torch.sum) and the bf16 GEMV's effective rate at M = 1 (weight bytes / time) on any shape of
the run; the device-to-device copy rate (read + write) is reported beside it. `%floor` is the
floor over the W4.4A8 time: the fraction of the streaming bandwidth (or of the int8 rate) reached.

Times are medians of CUDA-event timings of CUDA-graph replays (no launch overhead from Python);
each replay runs the op on several weight/input copies, as many as needed to exceed the L2 cache
(so that no timing comes from a cache-resident weight), cycling through them for at least 12 calls
at M <= 64 (so that the replay's own start-up is shared alike on every shape). M <= 16 for _int_mm
is padded to 17 rows (cuBLASLt's int8 path needs M > 16 there).

  python bench/gpu_linear.py [--quick] [--out DIR]
Prints a table; writes JSON (device, date, all times) to $OUT (if set) and bench/results/.
"""

import argparse
import datetime
import functools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixllm import cuda_ops, ops  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
MS = [1, 16, 64, 1024, 4096]
L2_FLUSH = 160 << 20  # bytes of distinct weights per replay


MIN_CALLS = 12  # calls per graph replay at decode sizes (M <= 64), at least


def min_calls(M):
    """Calls per replay for M tokens: at decode sizes a replay's own start (a few us) is shared by at
    least MIN_CALLS calls on every shape (one or two weight copies per replay, the 70B shapes, used to
    carry half or all of it); prefill calls take milliseconds and run once per copy (longer replays
    there only heat the GPU)."""
    return MIN_CALLS if M <= 64 else 1


def time_graph(fn_list, reps=15, min_calls=1):
    """Median ms per call of a graph that calls each fn in fn_list once, the list repeated to at least
    ``min_calls`` calls. The copies of one cycle exceed L2 together, so no call finds its weight still
    cached from the cycle before."""
    fn_list = list(fn_list) * -(-min_calls // max(1, len(fn_list)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:  # warm up (and pack weights, check indices) outside capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fn_list))
    del g
    return statistics.median(times)


def cfg_index(name):
    """The tile configuration index of the extension's configuration called ``name`` (e.g. decode_gemv)."""
    from mixllm import _cuda

    return next(c for c in range(_cuda.NCFG) if _cuda.plan(0, 1, (16,), 128, c, 1)[2] == name)


def copies(nbytes):
    return max(1, min(12, -(-L2_FLUSH // max(nbytes, 1))))


def rand_qweight(N, K, bits, dev, gen):
    G = -(-K // 128)
    scale = (torch.rand((N, G), device=dev, generator=gen) * 1e-2 + 1e-3).float()
    if bits == 4:
        q = torch.randint(0, 256, (N, (K + 1) // 2), device=dev, dtype=torch.uint8, generator=gen)
        zero = torch.randint(0, 16, (N, G), device=dev, dtype=torch.uint8, generator=gen)
    else:
        q = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8, generator=gen)
        zero = None
    return ops.QuantizedWeight(bits, 128, (N, K), q, scale, zero)


def split_rows(N, n8, dev, gen):
    """Output columns of the 4-bit and 8-bit rows: a random 10% in 8-bit, each part in ascending
    column order, as mixllm.nn.MixedLinear stores them."""
    perm = torch.randperm(N, device=dev, generator=gen)
    return torch.sort(perm[n8:]).values.contiguous(), torch.sort(perm[:n8]).values.contiguous()


def measure_rates(dev):
    """(read-only streaming B/s, int8 ops/s, copy B/s): sum over 4 GiB of random floats,
    _int_mm at 8192^3, a 1 GiB device-to-device copy counting read + write."""
    big = torch.rand(1 << 30, device=dev)  # 4 GiB of float32, not zeros
    acc = torch.empty((), device=dev)
    t = time_graph([lambda big=big, acc=acc: torch.sum(big, dim=(0,), out=acc)], reps=10)
    read_bw = big.numel() * 4 / (t * 1e-3)
    del big
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    t = time_graph([lambda dst=dst, buf=buf: dst.copy_(buf)], reps=10)
    copy_bw = 2 * buf.numel() / (t * 1e-3)
    del buf, dst
    a = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=dev)
    b = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=dev)
    t = time_graph([lambda: torch._int_mm(a, b.t())], reps=10)
    return read_bw, 2 * 8192**3 / (t * 1e-3), copy_bw


def int_mm_q(x, wq_t, sw):
    """Per-token int8 quantization of x, _int_mm, float rescale: a plain W8A8 layer in PyTorch."""
    sx = x.abs().amax(1, keepdim=True).float().clamp_min(1e-8) / 127
    xq = torch.round(x.float() / sx).clamp_(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, wq_t).float() * sx * sw).to(x.dtype)


def w44_bytes(N, K, M):
    """Bytes a W4.4A8 call must move: codes (10% of rows 8-bit), meta, bf16 x and y."""
    n8 = N // 10
    G = -(-K // 128)
    return (N - n8) * K / 2 + n8 * K + (-(-(N - n8) // 16) + -(-n8 // 16)) * G * 80 + M * K * 2 + M * N * 2


def set_floor(r, bw, i8):
    r["floor"] = max(w44_bytes(r["N"], r["K"], r["M"]) / bw, 2 * r["M"] * r["N"] * r["K"] / i8) * 1e3
    r["frac_floor"] = r["floor"] / r["w4.4a8"]


def bench_shape(N, K, ms, dev, gen, rates, quick):
    bw, i8 = rates[0], rates[1]
    rows = []
    n8 = N // 10
    w_bf16 = [
        torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies(2 * N * K))
    ]
    w_i8 = [torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8, generator=gen) for _ in range(copies(N * K))]
    sw = torch.rand((1, N), device=dev, generator=gen) * 1e-2
    w_f8 = [
        (torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) * 0.02).to(torch.float8_e4m3fn)
        for _ in range(copies(N * K))
    ]
    sw8 = torch.rand((1, N), device=dev, generator=gen) * 1e-2 + 1e-3
    w8 = [rand_qweight(N, K, 8, dev, gen) for _ in range(copies(N * K))]
    w4 = [rand_qweight(N, K, 4, dev, gen) for _ in range(copies(N * K // 2))]
    i4, i8x = split_rows(N, n8, dev, gen)
    mixed = [
        (rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen))
        for _ in range(copies((N - n8) * K // 2 + n8 * K))
    ]
    p8 = [cuda_ops.PreparedLinear([(w, None)], N, None, dev) for w in w8]
    p4 = [cuda_ops.PreparedLinear([(w, None)], N, None, dev) for w in w4]
    pmix = [cuda_ops.PreparedLinear([(p[0], i4), (p[1], i8x)], N, None, dev) for p in mixed]
    for M in ms:
        nx = max(len(w_bf16), len(w4), len(mixed))
        xs = [torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(nx)]
        xs17 = [torch.randn((max(M, 17), K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(len(w_i8))]
        xq17 = [
            torch.randint(-127, 128, (max(M, 17), K), device=dev, dtype=torch.int8, generator=gen)
            for _ in range(len(w_i8))
        ]
        r = {"N": N, "K": K, "M": M}
        tg = functools.partial(time_graph, min_calls=min_calls(M))
        r["bf16"] = tg([(lambda x=xs[i], w=w: F.linear(x, w)) for i, w in enumerate(w_bf16)])
        M16 = max(M, 16)
        x8 = [torch.randn((M16, K), device=dev, generator=gen).to(torch.float8_e4m3fn) for _ in w_f8]
        sx8 = torch.rand((M16, 1), device=dev, generator=gen) + 0.5
        r["fp8"] = tg(
            [
                (
                    lambda a=x8[i], w=w, s=sx8: torch._scaled_mm(
                        a, w.t(), scale_a=s, scale_b=sw8, out_dtype=torch.bfloat16
                    )
                )
                for i, w in enumerate(w_f8)
            ]
        )
        r["int_mm"] = tg([(lambda a=xq17[i], w=w: torch._int_mm(a, w.t())) for i, w in enumerate(w_i8)])
        r["int_mm+q"] = tg([(lambda x=xs17[i], w=w: int_mm_q(x, w.t(), sw)) for i, w in enumerate(w_i8)])
        # layers prepared once (as MixedLinear does): the graphs hold only the kernels
        r["w8a8"] = tg([(lambda x=xs[i], l=l: l(x)) for i, l in enumerate(p8)])
        r["w4a8"] = tg([(lambda x=xs[i], l=l: l(x)) for i, l in enumerate(p4)])
        r["w4.4a8"] = tg([(lambda x=xs[i], l=l: l(x)) for i, l in enumerate(pmix)])
        r["aq"] = tg([(lambda x=x: cuda_ops.quantize_activation(x, 128)) for x in xs])
        cfg = pmix[0].plan(M)
        r["plan"] = f"{cfg[3]}/s{cfg[1]}"
        nbytes = w44_bytes(N, K, M)
        set_floor(r, bw, i8)
        r["x_bf16"] = r["bf16"] / r["w4.4a8"]
        r["x_fp8"] = r["fp8"] / r["w4.4a8"]
        r["bf16_TBps"] = 2 * N * K / (r["bf16"] * 1e-3) / 1e12
        r["x_int_mm"] = r["int_mm"] / r["w4.4a8"]
        r["x_int_mm+q"] = r["int_mm+q"] / r["w4.4a8"]
        r["w4.4_TBps"] = nbytes / (r["w4.4a8"] * 1e-3) / 1e12
        r["w4.4_TOPS"] = 2 * M * N * K / (r["w4.4a8"] * 1e-3) / 1e12
        rows.append(r)
        print(fmt_row(r), flush=True)
        del xs, xs17, xq17, x8
    return rows


HEAD = (
    f"{'N':>6} {'K':>6} {'M':>5} | {'bf16':>8} {'fp8':>8} {'int_mm':>8} {'imm+q':>8} {'w8a8':>8} {'w4a8':>8} "
    f"{'w4.4a8':>8} {'aq':>6} {'floor':>7} | {'x bf16':>6} {'x fp8':>6} {'x imm':>6} {'x imm+q':>7} {'%floor':>6} "
    f"{'TB/s':>5} {'TOPS':>5} plan"
)


def fmt_row(r):
    us = lambda k: f"{r[k] * 1e3:8.1f}"  # noqa: E731
    return (
        f"{r['N']:>6} {r['K']:>6} {r['M']:>5} | {us('bf16')} {us('fp8')} {us('int_mm')} {us('int_mm+q')} "
        f"{us('w8a8')} {us('w4a8')} {us('w4.4a8')} {r['aq'] * 1e3:6.1f} {r['floor'] * 1e3:7.1f} | "
        f"{r['x_bf16']:6.2f} {r['x_fp8']:6.2f} {r['x_int_mm']:6.2f} {r['x_int_mm+q']:7.2f} "
        f"{100 * r['frac_floor']:5.0f}% {r['w4.4_TBps']:5.2f} {r['w4.4_TOPS']:5.0f} {r['plan']}"
    )


def _time_or_inf(t, c):
    """t(c), or inf where configuration c refuses the call (e.g. the decode kernel above 64 tokens)."""
    try:
        return t(c)
    except (RuntimeError, ValueError):
        return float("inf")


def tune(dev, gen, shapes=None, ms=None):
    """W4.4A8 time of every tile configuration (auto split-K) against the planner's choice, on the 70B
    shapes (or ``shapes``) at ``ms`` tokens; weights in enough copies to exceed L2 (sweep_cells)."""
    from mixllm import _cuda

    names = [_cuda.plan(0, 1, (16,), 128, c, 1)[2] for c in range(_cuda.NCFG)]
    print("# tune: W4.4A8 us per tile configuration (auto split-K); * = fastest")
    print(f"{'N':>6} {'K':>6} {'M':>5} | " + " ".join(f"{n:>10}" for n in names) + " |  auto (plan) | bf16")
    for N, K in shapes or SHAPES[4:6]:
        for M, r, t, plan in sweep_cells(N, K, ms or MS, dev, gen):
            ts = [_time_or_inf(t, c) for c in range(_cuda.NCFG)]
            best = min(range(len(ts)), key=ts.__getitem__)
            cells = " ".join(f"{v * 1e3:9.1f}" + ("*" if i == best else " ") for i, v in enumerate(ts))
            auto = f"{t(-1) * 1e3:5.1f} ({plan(M, -1)[3]})"
            print(f"{N:>6} {K:>6} {M:>5} | {cells} | {auto} | {r['bf16'] * 1e3:.1f}", flush=True)


def profile_decode(dev, gen):
    """One W4.4A8 call of the decode kernel and one of the planner's choice per 70B shape at M = 1,
    between cudaProfilerStart/Stop (for ncu)."""

    decode = cfg_index("decode_gemv")
    calls = []
    for N, K in SHAPES[4:6]:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        p = (rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen))
        lin = cuda_ops.PreparedLinear([(p[0], i4), (p[1], i8)], N, None, dev)
        x = torch.randn((1, K), device=dev, dtype=torch.bfloat16, generator=gen)
        calls += [(lambda lin=lin, x=x: lin(x, cfg=decode)), (lambda lin=lin, x=x: lin(x))]
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def profile(dev, gen, shapes=None, ms=None, cfgs=None):
    """One W4.4A8 call per (shape, M, configuration) between cudaProfilerStart/Stop (for ncu): by
    default the planner's choice at M = 1, 16, 64, 4096 on 28672 x 8192; ``cfgs``: configuration
    names to force instead (e.g. sm90_wgmma,decode_gemv)."""

    forced = [cfg_index(n) for n in cfgs or ()]
    calls = []
    for N, K in shapes or [(28672, 8192)]:
        n8 = N // 10
        i4, i8 = split_rows(N, n8, dev, gen)
        w4, w8 = rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)
        lin = cuda_ops.PreparedLinear([(w4, i4), (w8, i8)], N, None, dev)
        for M in ms or (1, 16, 64, 4096):
            x = torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen)
            calls += [(lambda lin=lin, x=x, c=c: lin(x, cfg=c)) for c in forced or [-1]]
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for f in calls:
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, three M values")
    ap.add_argument("--tune", action="store_true", help="time every tile configuration, then exit")
    ap.add_argument("--profile", action="store_true", help="one W4.4A8 call per shape, M (and --cfgs) for ncu")
    ap.add_argument("--cfgs", help="with --profile: configuration names to force, e.g. sm90_wgmma,decode_gemv")
    ap.add_argument("--decode", action="store_true", help="decode kernel vs the mma.sync tiles, M <= 64, then exit")
    ap.add_argument(
        "--sm90-sweep", action="store_true", help="wgmma kernel's two configurations vs the planner and bf16"
    )
    ap.add_argument("--profile-decode", action="store_true", help="decode kernel and planner's choice, 70B, M=1 (ncu)")
    ap.add_argument("--shapes", help="N x K list to run, e.g. 28672x8192,8192x28672 (default: all)")
    ap.add_argument("--ms", help="token counts to run, e.g. 1,16,64 (default: %s)" % ",".join(map(str, MS)))
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    ms = [int(v) for v in args.ms.split(",")] if args.ms else None
    if args.tune:
        return tune(dev, gen, shapes, ms)
    if args.profile_decode:
        return profile_decode(dev, gen)
    if args.profile:
        return profile(dev, gen, shapes, ms, args.cfgs.split(",") if args.cfgs else None)
    if args.decode:
        return decode_sweep(dev, gen, args.out, shapes, ms)
    if args.sm90_sweep:
        return sm90_sweep(dev, gen, args.out, shapes, ms)
    torch.backends.cuda.matmul.allow_tf32 = False
    rates = measure_rates(dev)
    name = torch.cuda.get_device_name(dev)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    print(
        f"# {name}, {date}, torch {torch.__version__}; read-only stream {rates[0] / 1e12:.2f} TB/s, "
        f"copy {rates[2] / 1e12:.2f} TB/s, _int_mm 8192^3 {rates[1] / 1e12:.0f} TOPS; times in us "
        "(median of CUDA-graph replays); floor here from the read-only rate, final table below from the "
        "best streaming rate"
    )
    print(HEAD)
    shapes = shapes or (SHAPES[4:6] if args.quick else SHAPES)
    ms = ms or ([1, 64, 4096] if args.quick else MS)
    rows = []
    for N, K in shapes:
        rows += bench_shape(N, K, ms, dev, gen, rates, args.quick)
        torch.cuda.empty_cache()
    # the streaming floor: the best read rate seen (reduction, or cuBLAS bf16 GEMV at M = 1)
    gemv_bw = max([r["bf16_TBps"] * 1e12 for r in rows if r["M"] == 1] or [0.0])
    stream_bw = max(rates[0], gemv_bw)
    for r in rows:
        set_floor(r, stream_bw, rates[1])
    res = {
        "device": name,
        "date": date,
        "torch": torch.__version__,
        "read_Bps": rates[0],
        "copy_Bps": rates[2],
        "bf16_gemv_Bps": gemv_bw,
        "stream_Bps": stream_bw,
        "int8_ops": rates[1],
        "units": "ms per call",
        "rows": rows,
    }
    write_json(res, "gpu_linear", date, args.out)
    print(
        f"\n# streaming floor: {stream_bw / 1e12:.2f} TB/s (read-only sum {rates[0] / 1e12:.2f}, "
        f"bf16 GEMV {gemv_bw / 1e12:.2f}; copy {rates[2] / 1e12:.2f})"
    )
    print_goals(rows)
    print("\n" + HEAD)
    for r in rows:
        print(fmt_row(r))


def script_start(doc):
    """The small bench scripts' start: their --out option (default $OUT), the CUDA device and a generator
    seeded with 0. Returns (args, dev, gen)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    return args, dev, gen


def write_json(res, stem, date, out):
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(here, exist_ok=True)
    paths = [os.path.join(here, f"{stem}_{date[:10]}.json")]
    if out:
        os.makedirs(out, exist_ok=True)  # a missing --out directory must not lose a finished run
        paths.append(os.path.join(out, f"{stem}.json"))
    for p in paths:
        with open(p, "w") as f:
            json.dump(res, f, indent=1)


def print_goals(rows):
    """The goals of issue 11 (W4.4A8 mixed layer), met or not, with the measured ratios."""

    def line(what, rs, key, goal):
        if rs:
            v = min(r[key] for r in rs)
            print(f"{'MET ' if v >= goal else 'not '} {what}: min {v:.2f}x (goal {goal}x) over {len(rs)} rows")

    big = [r for r in rows if (r["N"], r["K"]) in ((28672, 8192), (8192, 28672))]
    small = [r for r in rows if r["K"] == 4096 or r["N"] == 4096]
    small = [r for r in small if (r["N"], r["K"]) not in ((28672, 8192), (8192, 28672))]
    print("\n# goals (issue 11, W4.4A8 mixed layer):")
    line("decode 70B shapes M=1 vs bf16", [r for r in big if r["M"] == 1], "x_bf16", 3.0)
    line("decode 70B shapes M=16..64 vs bf16", [r for r in big if 16 <= r["M"] <= 64], "x_bf16", 2.5)
    line("decode 4096-wide shapes M=1..16 vs bf16", [r for r in small if r["M"] <= 16], "x_bf16", 2.0)
    line("decode 70B shapes M=1..16 vs FP8", [r for r in big if r["M"] <= 16], "x_fp8", 1.6)
    line("prefill M>=1024 vs _int_mm", [r for r in rows if r["M"] >= 1024], "x_int_mm", 1.0)
    line("prefill 70B shapes M=4096 vs bf16", [r for r in big if r["M"] == 4096], "x_bf16", 1.6)
    dec = [r for r in rows if r["M"] <= 64]
    if dec:
        print(
            f"      decode M<=64: fraction of the streaming floor {min(r['frac_floor'] for r in dec):.2f} .. "
            f"{max(r['frac_floor'] for r in dec):.2f} (goal 0.85)"
        )
    pre = [r for r in rows if r["M"] >= 1024]
    if pre:
        print(
            f"      prefill M>=1024 vs FP8 _scaled_mm: {min(r['x_fp8'] for r in pre):.2f} .. "
            f"{max(r['x_fp8'] for r in pre):.2f}x"
        )


def sweep_start(dev, what, units, columns):
    """Print a sweep's title and column header (N, K, M, bf16, then ``columns``); (device name, date)."""
    name = torch.cuda.get_device_name(dev)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    print(f"# {what}, {name}, {date}: {units}")
    print(f"{'N':>6} {'K':>6} {'M':>3} | {'bf16':>7} " + columns)
    return name, date


def sweep_cells(N, K, ms, dev, gen):
    """The sweeps' cells of one shape: a W4.4A8 layer (a random 10% of the rows 8-bit) and bf16
    weights, each in enough copies to exceed L2; per M yields (M, a row holding the bf16 time,
    t(cfg, splits=0) -> ms of the W4.4A8 layer, the layer's plan function)."""
    n8 = N // 10
    i4, i8 = split_rows(N, n8, dev, gen)
    nc = copies((N - n8) * K // 2 + n8 * K)
    mixed = [(rand_qweight(N - n8, K, 4, dev, gen), rand_qweight(n8, K, 8, dev, gen)) for _ in range(nc)]
    pl = [cuda_ops.PreparedLinear([(p[0], i4), (p[1], i8)], N, None, dev) for p in mixed]
    wb = [torch.randn((N, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(copies(2 * N * K))]
    for M in ms:
        xs = [torch.randn((M, K), device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(max(nc, len(wb)))]

        mc = min_calls(M)

        def t(c, sp=0, xs=xs, pl=pl, mc=mc):
            return time_graph(
                [(lambda x=xs[i], l=l: l(x, cfg=c, splits=sp)) for i, l in enumerate(pl)], reps=9, min_calls=mc
            )

        r = {"N": N, "K": K, "M": M}
        r["bf16"] = time_graph(
            [(lambda x=xs[i], w=w: F.linear(x, w)) for i, w in enumerate(wb)], reps=9, min_calls=min_calls(M)
        )
        yield M, r, t, pl[0].plan
        del xs
    del mixed, pl, wb
    torch.cuda.empty_cache()


DECODE_FORCED = (2, 4, 8, 16, 33, 34, 36, 38, 40)  # warps per tile; 32 + w: two 4-bit tiles of w warps per block


def decode_sweep(dev, gen, out, shapes=None, ms=None):
    """The decode kernel (planner's choice and forced block layouts, M <= 16) against the best
    mma.sync tile (auto split-K) and bf16, M = 1..64, on every shape plus a small one."""
    from mixllm import _cuda

    decode = cfg_index("decode_gemv")
    mma = [c for c in range(_cuda.NCFG) if _cuda.plan(0, 1, (16,), 128, c, 1)[2].startswith("w")]
    name, date = sweep_start(
        dev,
        "decode sweep",
        "W4.4A8 us; 'mma' = best mma.sync tile (auto split-K); s<n> = forced splits",
        f"{'mma':>7} {'cfg':>11} | {'dec':>7} {'s':>3} | "
        + " ".join(f"{'s' + str(k):>6}" for k in DECODE_FORCED)
        + " | x bf16  x mma",
    )
    rows = []
    for N, K in shapes or [(1024, 4096)] + SHAPES:
        for M, r, t, plan in sweep_cells(N, K, ms or (1, 4, 16, 32, 64), dev, gen):
            tm = {
                c: t(c)
                for c in mma
                if (c in (0, 6) and M <= 8)
                or (c in (1, 7) and M <= 16)
                or (c in (2, 8) and 8 < M <= 32)
                or (c in (3, 9) and M > 16)
            }
            r["mma_cfg"] = min(tm, key=tm.get)
            r["mma"] = tm[r["mma_cfg"]]
            r["decode"] = t(decode)
            r["decode_splits"] = plan(M, decode)[1]
            forced = DECODE_FORCED if M <= 16 else ()
            for k in forced:
                r[f"s{k}"] = t(decode, k)
            rows.append(r)
            print(
                f"{N:>6} {K:>6} {M:>3} | {r['bf16'] * 1e3:7.1f} {r['mma'] * 1e3:7.1f} "
                f"{_cuda.plan(0, 1, (16,), 128, r['mma_cfg'], 1)[2]:>11} | {r['decode'] * 1e3:7.1f} "
                f"{r['decode_splits']:>3} | "
                + " ".join(f"{r[f's{k}'] * 1e3:6.1f}" if f"s{k}" in r else f"{'':>6}" for k in DECODE_FORCED)
                + f" | {r['bf16'] / r['decode']:6.2f} {r['mma'] / r['decode']:6.2f}",
                flush=True,
            )
    write_json({"device": name, "date": date, "units": "ms per call", "rows": rows}, "gpu_decode_sweep", date, out)


SM90_FORCED = (1, 2, 3, 4, 6)  # split-K factors of the forced wgmma runs (M <= 64)


def sm90_sweep(dev, gen, out, shapes=None, ms=None):
    """The wgmma kernel's two configurations, forced: "w" = one consumer warpgroup pair (its few-token
    tiles of 16, 32, 64 tokens, then 128 or 256), "W" = two pairs on alternating stages (the few-token
    tiles; above 64 tokens the same kernel as "w"); at M <= 64 at each split-K factor of SM90_FORCED,
    above at the planner's; against the planner's choice and bf16, every shape."""

    kinds = {"w": cfg_index("sm90_wgmma"), "W": cfg_index("sm90_wgmma_pairs")}
    name, date = sweep_start(
        dev,
        "wgmma sweep",
        "W4.4A8 us; 'auto' = the planner's choice; w<s> / W<s> = one / two consumer pairs, s splits (0: the planner's)",
        f"{'auto':>7} {'cfg':>15} | best w, best W  (splits) | x bf16 of w, W, auto",
    )
    rows = []
    for N, K in shapes or SHAPES:
        for M, r, t, plan in sweep_cells(N, K, ms or (1, 8, 16, 32, 48, 64, 128, 256, 1024, 4096), dev, gen):
            r["auto"] = t(-1)
            r["auto_plan"] = list(plan(M, -1))
            best = {}
            splits = SM90_FORCED if M <= 64 else (0,)
            for kind, c in kinds.items():
                for k in splits:
                    r[f"{kind}{k}"] = t(c, k)
                best[kind] = min(splits, key=lambda k: r[f"{kind}{k}"])
                r[f"best_{kind}"] = best[kind]
            rows.append(r)
            bw, bW = r[f"w{best['w']}"], r[f"W{best['W']}"]
            print(
                f"{N:>6} {K:>6} {M:>4} | {r['bf16'] * 1e3:7.1f} {r['auto'] * 1e3:7.1f} "
                f"{r['auto_plan'][3]:>15} | {bw * 1e3:7.1f} {bW * 1e3:7.1f} ({best['w']}, {best['W']}) | "
                f"{r['bf16'] / bw:5.2f} {r['bf16'] / bW:5.2f} {r['bf16'] / r['auto']:5.2f}",
                flush=True,
            )
    write_json({"device": name, "date": date, "units": "ms per call", "rows": rows}, "gpu_sm90_sweep", date, out)


if __name__ == "__main__":
    main()
