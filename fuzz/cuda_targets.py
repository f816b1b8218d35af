"""Fuzz targets for every entry point of mixllm._cuda, plus the public ops on CUDA tensors.

Meant to run under ``compute-sanitizer --tool memcheck`` (scripts/gpu_fuzz.sh does, in one call):
the sanitizer sees every out-of-bounds or misaligned device access, this driver sees everything
else. Each target draws a *consistent* call from the input bytes (shapes that agree, honest
weights, a permutation as out_index) and then mutates some of it: an array may become another
dtype, shape, device (CPU / NumPy), a non-contiguous / zero-stride / misaligned view, an empty
tensor, a raw DLPack capsule or a hostile object; scalars may go out of range; out_index may hold
duplicates, negative or out-of-range values; activations may hold NaN / Inf. The contract
checked: the call returns or raises one of EXPECTED, and the device is still healthy afterwards
(a synchronize raises nothing). A CUDA error or any other exception is a finding; its input is
saved (--save DIR) and can be replayed.

The entry points and their argument names come from the extension's declared argument tables,
``mixllm._cuda.__signatures__`` (csrc/cuda_module.c), as fuzz/targets.py does for ``mixllm._C``: any
call may pass some of its arguments by keyword (sometimes a duplicate or unknown one, a TypeError),
and an entry point without a dedicated target is fuzzed by a generic one built from its table.

Inputs are byte strings (the same role as libFuzzer's): the seeds under fuzz/corpus/cuda_<target>/
plus N random ones from random.Random(target), so a sweep replays exactly.

  python fuzz/cuda_targets.py list
  python fuzz/cuda_targets.py sweep N [--save DIR] [--only NAME] [--seconds S]
                                   seeds + N random inputs per target (at most S seconds per target)
  python fuzz/cuda_targets.py replay NAME FILE...                  one input again

The stream argument of the raw entry points is a cudaStream_t (a pointer): it is only ever a real
stream here; a made-up handle cannot be checked by any consumer (as with a producer that lies about
its memory).
"""

import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.utils.dlpack

from mixllm import _cuda, cuda_ops, ops

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = (TypeError, ValueError, OverflowError, MemoryError, BufferError)
DRY = os.environ.get("MIXLLM_FUZZ_DRY") == "1"  # exercise the harness on a machine without a GPU
DEV = torch.device("cpu") if DRY else torch.device("cuda", torch.cuda.current_device())
STATS = {"inputs": 0, "ok": 0, "errors": 0, "findings": 0}


class Bytes:
    """A FuzzedDataProvider over a byte string (the subset the targets use); 0s once exhausted,
    so a short input is a correct call."""

    def __init__(self, data: bytes):
        self.d, self.i = data, 0

    def ConsumeIntInRange(self, lo, hi):
        span = hi - lo
        if span <= 0:
            return lo
        n = (span.bit_length() + 7) // 8
        v = int.from_bytes(self.d[self.i : self.i + n].ljust(n, b"\0"), "little")
        self.i += n
        return lo + v % (span + 1)

    def ConsumeBool(self):
        return self.ConsumeIntInRange(0, 1) == 1

    def PickValueInList(self, values):
        return values[self.ConsumeIntInRange(0, len(values) - 1)]


FLOATS = [torch.float32, torch.float16, torch.bfloat16]
OTHER = [torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.int16]


def values(fdp, dtype, shape, lo=0, hi=1):
    """Honest contents: normal floats (sometimes NaN / Inf / huge), integers in [lo, hi]."""
    g = torch.Generator().manual_seed(fdp.ConsumeIntInRange(0, 2**31))
    if dtype.is_floating_point:
        scale = fdp.PickValueInList([1.0, 1.0, 1e-30, 1e4, 3e38])
        v = torch.randn(shape, generator=g) * scale
        if v.numel() and fdp.ConsumeIntInRange(0, 5) == 0:
            v.view(-1)[fdp.ConsumeIntInRange(0, v.numel() - 1)] = fdp.PickValueInList(
                [float("nan"), float("inf"), float("-inf")]
            )
        return v.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


def hostile(fdp):
    return fdp.PickValueInList([None, 0, 1.5, "array", b"x", [1, 2], object(), np.float32(1.0)])


def arr(fdp, dtype, shape, lo=0, hi=1, out=False):
    """The CUDA tensor a correct call would pass, or a mutation of it."""
    mode = fdp.ConsumeIntInRange(0, 31)
    if mode < 20:  # correct
        t = values(fdp, dtype, shape, lo, hi).to(DEV)
        return torch.empty_like(t) if out else t
    if mode == 20:  # wrong dtype
        return values(fdp, fdp.PickValueInList(FLOATS + OTHER), shape, 0, 3).to(DEV)
    if mode == 21:  # wrong shape
        shp = tuple(fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 3)))
        return torch.zeros(shp, dtype=dtype, device=DEV)
    if mode == 22:  # host memory
        t = values(fdp, dtype, shape, lo, hi)
        return t.numpy() if fdp.ConsumeBool() and dtype != torch.bfloat16 else t
    if mode == 23 and len(shape) == 2:  # transposed view
        return values(fdp, dtype, shape[::-1], lo, hi).to(DEV).t()
    if mode == 24:  # every other element
        big = values(fdp, dtype, tuple(2 * s for s in shape), lo, hi).to(DEV)
        return big[tuple(slice(0, 2 * s, 2) for s in shape)]
    if mode == 25:  # misaligned: one element into a larger buffer
        n = int(np.prod(shape))
        flat = values(fdp, dtype, (n + 1,), lo, hi).to(DEV)
        return flat[1:].view(shape)
    if mode == 26:  # zero strides
        return values(fdp, dtype, (1,) * len(shape), lo, hi).to(DEV).expand(*shape)
    if mode == 27:  # empty
        return torch.empty((0,) * len(shape), dtype=dtype, device=DEV)
    if mode == 28:  # a raw capsule (taken once)
        return torch.utils.dlpack.to_dlpack(values(fdp, dtype, shape, lo, hi).to(DEV))
    if mode == 29:  # one element short / long
        n = max(int(np.prod(shape)) + fdp.PickValueInList([-1, 1, 16]), 0)
        return (
            torch.zeros(n, dtype=dtype, device=DEV)
            if len(shape) == 1
            else torch.zeros(
                (max(shape[0] + fdp.PickValueInList([-1, 1]), 0),) + tuple(shape[1:]), dtype=dtype, device=DEV
            )
        )
    return hostile(fdp)


def scalar(fdp, good, bad=(-1, 0, 2**31, 2**62, 2**63 - 1, 2**63, -(2**63), 1.5, "4", None)):
    return good if fdp.ConsumeIntInRange(0, 15) else fdp.PickValueInList(list(bad))


def stream(fdp):
    """A real stream: the legacy default (0), the current one, or a side stream."""
    k = fdp.ConsumeIntInRange(0, 3)
    if k == 0:
        return 0
    if DRY:
        return 0
    if k == 3:
        return int(_SIDE.cuda_stream)
    return int(torch.cuda.current_stream().cuda_stream)


_SIDE = None if DRY else torch.cuda.Stream()


def shape_mk(fdp):
    """(M, N, K, g): small, with tails; sometimes a K not a multiple of g, g not a multiple of 128."""
    M = fdp.PickValueInList([1, 2, 3, 5, 8, 9, 17, 33, 70, 130, 0])
    N = fdp.PickValueInList([16, 1, 7, 40, 130, 64, 300])
    K = fdp.PickValueInList([128, 256, 300, 77, 520, 1000, 64])
    g = min(fdp.PickValueInList([128, 64, 100, 256, 32, 1, 1000]), K)
    return M, N, K, g


def permutation(fdp, n):
    g = torch.Generator().manual_seed(fdp.ConsumeIntInRange(0, 2**31))
    return torch.randperm(n, generator=g)


def bad_index(fdp, idx, n_out):
    """idx, or idx with a duplicate / negative / out-of-range entry / garbage / wrong dtype."""
    k = fdp.ConsumeIntInRange(0, 11)
    if k < 6 or idx.numel() == 0:
        return idx
    idx = idx.clone()
    j = fdp.ConsumeIntInRange(0, idx.numel() - 1)
    if k == 6:
        idx[j] = idx[(j + 1) % idx.numel()]
    elif k == 7:
        idx[j] = -fdp.ConsumeIntInRange(1, 2**40)
    elif k == 8:
        idx[j] = n_out + fdp.ConsumeIntInRange(0, 2**40)
    elif k == 9:
        idx = values(fdp, torch.int64, tuple(idx.shape), -(2**62), 2**62)
    elif k == 10:
        idx = idx + 1
    else:
        idx = idx.to(fdp.PickValueInList([torch.int32, torch.float32, torch.int16, torch.bool]))
    return idx


def weight(fdp, bits, N, K, g):
    codes = values(fdp, torch.int64, (N, K), 0 if bits == 4 else -127, 15 if bits == 4 else 127)
    G = (K + g - 1) // g
    scale = values(fdp, torch.float32, (N, G)).abs() * 0.01
    if fdp.ConsumeIntInRange(0, 7) == 0 and scale.numel():
        scale.view(-1)[fdp.ConsumeIntInRange(0, scale.numel() - 1)] = fdp.PickValueInList(
            [float("nan"), float("inf"), 0.0, -1.0]
        )
    zero = values(fdp, torch.uint8, (N, G), 0, 15) if bits == 4 else None
    c = codes.to(torch.uint8) if bits == 4 else codes.to(torch.int8)
    return ops.QuantizedWeight.from_codes(c, scale, zero, bits, g)


# ----------------------------------------------------------------------------- calls
SIGNATURES = _cuda.__signatures__  # entry point -> [(name, kind, constraints)], declared in csrc/cuda_module.c


def call(fdp, f, *args):
    """f(*args), with some trailing arguments passed by the keyword names of f's declared table;
    sometimes a duplicate or unknown keyword (both must raise TypeError)."""
    names = [a[0] for a in SIGNATURES.get(getattr(f, "__name__", ""), ())]
    if not names or fdp.ConsumeIntInRange(0, 3):
        return f(*args)
    cut = fdp.ConsumeIntInRange(0, min(len(args), len(names)))
    kw = dict(zip(names[cut:], args[cut:]))
    head = list(args[:cut]) + list(args[len(names) :])  # extra positionals stay (wrong arity)
    bad = fdp.ConsumeIntInRange(0, 15)
    if bad == 0:
        kw["no_such_argument"] = 1
    elif bad == 1 and cut:
        kw[names[0]] = args[0]  # given twice
    return f(*head, **kw)


# ----------------------------------------------------------------------------- targets
def t_geometry(fdp):
    K = scalar(fdp, fdp.PickValueInList([1, 128, 300, 4096, 0x7FFFFF80]))
    g = scalar(fdp, fdp.PickValueInList([1, 64, 128, 300, 4096]))
    return call(fdp, _cuda.geometry, K, g)


def t_layout_bytes(fdp):
    bits = scalar(fdp, fdp.PickValueInList([4, 8]), (2, 3, 16, -4, None))
    N = scalar(fdp, fdp.PickValueInList([0, 1, 16, 300, 1 << 40]))
    K = scalar(fdp, fdp.PickValueInList([1, 128, 300, 0x7FFFFF80]))
    g = scalar(fdp, fdp.PickValueInList([1, 128, 300]))
    return call(fdp, _cuda.layout_bytes, bits, N, K, g)


def t_plan(fdp):
    dev = scalar(fdp, DEV.index, (-1, 1, 7, 63, 64, 1000, 2**31, None))
    M = scalar(fdp, fdp.PickValueInList([0, 1, 8, 64, 256, 4096]))
    Ns = tuple(scalar(fdp, fdp.PickValueInList([0, 16, 300, 14336])) for _ in range(fdp.ConsumeIntInRange(1, 2)))
    if fdp.ConsumeIntInRange(0, 15) == 0:
        Ns = fdp.PickValueInList([(), (1, 2, 3), [16], None])
    Kp = scalar(fdp, fdp.PickValueInList([128, 256, 4096, 8192]), (0, 100, -128, 2**62, 2**40))
    cfg = scalar(fdp, fdp.ConsumeIntInRange(-1, _cuda.NCFG - 1), (-5, _cuda.NCFG, 99, 2**31))
    splits = scalar(fdp, fdp.ConsumeIntInRange(0, 8), (-1, 99, 2**31, 1 << 20))
    return call(fdp, _cuda.plan, dev, M, Ns, Kp, cfg, splits)


def t_act_quant(fdp):
    M, _, K, g = shape_mk(fdp)
    padded = fdp.ConsumeBool()
    G, gp, spg, Kp = _cuda.geometry(K, g)
    if not padded:
        gp, spg, qp, sp = g, 1, K, G
    else:
        qp, sp = Kp, Kp // 128
    if fdp.ConsumeIntInRange(0, 7) == 0:  # a hand-made layout
        gp = scalar(fdp, fdp.PickValueInList([g, g + 1, 128, 256]), (0, -1, 2**62, 2**63 - 1))
        spg = scalar(fdp, fdp.PickValueInList([1, 2, 3]), (0, -1, 2**31 - 1))
        qp = fdp.PickValueInList([K, Kp, K + 4, 1])
        sp = fdp.PickValueInList([G, Kp // 128, 1, 2 * G])
    x = arr(fdp, fdp.PickValueInList(FLOATS), (M, K))
    q = arr(fdp, torch.int8, (M, qp), out=True)
    s = arr(fdp, torch.float32, (M, sp), out=True)
    return call(fdp, _cuda.act_quant, x, scalar(fdp, g, (0, -1, 2**62, 2**63 - 1)), gp, q, s, spg, stream(fdp))


def t_pack_weight(fdp):
    _, N, K, g = shape_mk(fdp)
    bits = fdp.PickValueInList([4, 8])
    W = weight(fdp, bits, N, K, g)
    G = (K + g - 1) // g
    wb, mb = _cuda.layout_bytes(bits, N, K, g)
    q = arr(
        fdp,
        torch.uint8 if bits == 4 else torch.int8,
        (N, (K + 1) // 2 if bits == 4 else K),
        0,
        15 if bits == 4 else 127,
    )
    if isinstance(q, torch.Tensor) and q.shape == W.qweight.shape and q.dtype == W.qweight.dtype and q.is_cuda:
        q = W.qweight.to(DEV)
    sc = arr(fdp, torch.float32, (N, G))
    z = arr(fdp, torch.uint8, (N, G), 0, 15) if bits == 4 or fdp.ConsumeIntInRange(0, 7) == 0 else None
    wp = arr(fdp, torch.uint8, (wb,), out=True)
    me = arr(fdp, torch.uint8, (mb,), out=True)
    return call(
        fdp,
        _cuda.pack_weight,
        q,
        sc,
        z,
        scalar(fdp, bits, (2, 16, -4)),
        scalar(fdp, K),
        scalar(fdp, g),
        wp,
        me,
        stream(fdp),
    )


def _layer(fdp, N, K, g, nparts):
    """Packed parts (as prepare takes them) with an index set that may be bad."""
    perm = permutation(fdp, N)
    if nparts == 2:
        n8 = fdp.ConsumeIntInRange(1, N - 1)
        rows = [(4, N - n8, perm[: N - n8]), (8, n8, perm[N - n8 :])]
    else:
        rows = [(fdp.PickValueInList([4, 8]), N, perm)]
    parts = []
    for bits, n, idx in rows:
        pw = cuda_ops.packed_weight(weight(fdp, bits, n, K, g), DEV)
        oi = bad_index(fdp, idx, N).to(DEV) if (nparts == 2 or fdp.ConsumeBool()) else None
        wp, me = pw["wpack"], pw["meta"]
        if fdp.ConsumeIntInRange(0, 15) == 0:  # garbage codes and scales of the right size
            wp, me = (
                values(fdp, torch.uint8, tuple(wp.shape), 0, 255).to(DEV),
                values(fdp, torch.uint8, tuple(me.shape), 0, 255).to(DEV),
            )
        if fdp.ConsumeIntInRange(0, 15) == 0:
            wp = arr(fdp, torch.uint8, tuple(wp.shape))
        if fdp.ConsumeIntInRange(0, 15) == 0:
            me = arr(fdp, torch.uint8, tuple(me.shape))
        parts.append((wp, me, scalar(fdp, bits, (2, 16)), scalar(fdp, n, (-1, n + 1, 2**40, 2**62)), oi))
    k = fdp.ConsumeIntInRange(0, 31)
    if k == 0:
        parts = parts + parts[:1]
    elif k == 1:
        parts = [tuple(p[:4]) for p in parts]
    elif k == 2:
        parts = tuple(parts)
    elif k == 3:
        parts = []
    bias = arr(fdp, torch.float32, (N,)) if fdp.ConsumeBool() else None
    return parts, bias


def _handle(fdp):
    M, N, K, g = shape_mk(fdp)
    nparts = fdp.PickValueInList([1, 2]) if N > 1 else 1
    parts, bias = _layer(fdp, N, K, g, nparts)
    h = call(fdp, _cuda.prepare, parts, bias, scalar(fdp, K), scalar(fdp, g), stream(fdp), fdp.ConsumeBool())
    return h, M, N, K


def t_prepare(fdp):
    return _handle(fdp)


def t_plan_call(fdp):
    h, M, N, K = _handle(fdp)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        h = hostile(fdp)
    cfg = scalar(fdp, fdp.ConsumeIntInRange(-1, _cuda.NCFG - 1), (-5, _cuda.NCFG, 2**31))
    return call(
        fdp,
        _cuda.plan_call,
        h,
        scalar(fdp, M, (-1, 2**40, 2**62, 2**63 - 1)),
        cfg,
        scalar(fdp, fdp.ConsumeIntInRange(0, 8), (-1, 99, 2**31)),
    )


def t_run(fdp):
    h, M, N, K = _handle(fdp)
    cfg, splits, nbytes, _ = _cuda.plan_call(
        h, M, fdp.ConsumeIntInRange(-1, _cuda.NCFG - 1), fdp.ConsumeIntInRange(0, 6)
    )
    dt = fdp.PickValueInList(FLOATS)
    x = arr(fdp, dt, (M, K))
    y = arr(fdp, fdp.PickValueInList([dt, dt, torch.float32]), (M, N), out=True)
    sc = arr(fdp, torch.uint8, (nbytes,), out=True) if nbytes or fdp.ConsumeBool() else None
    if fdp.ConsumeIntInRange(0, 15) == 0:
        cfg, splits = fdp.PickValueInList([(-1, 0), (99, 1), (cfg, 0), (cfg, 99), (0, 2**31 - 1)])
    return call(fdp, _cuda.run, h, x, y, sc, cfg, splits, stream(fdp))


def t_ops(fdp):
    """The public ops on CUDA tensors: quantize_activation, w4a8 / w8a8 / mixed linear, MixedLinear."""
    M, N, K, g = shape_mk(fdp)
    which = fdp.ConsumeIntInRange(0, 4)
    dt = fdp.PickValueInList(FLOATS)
    x = arr(fdp, dt, (M, K))
    if fdp.ConsumeIntInRange(0, 7) == 0 and isinstance(x, torch.Tensor) and x.dim() == 2:
        x = x.reshape(1, *x.shape) if fdp.ConsumeBool() else x[0] if len(x) else x
    if which == 0:
        return ops.quantize_activation(x, scalar(fdp, g, (0, -1, 2**62)))
    if which in (1, 2):
        bits = 4 if which == 1 else 8
        W = weight(fdp, bits, N, K, g)
        b = arr(fdp, torch.float32, (N,)) if fdp.ConsumeBool() else None
        return (ops.w4a8_linear if bits == 4 else ops.w8a8_linear)(x, W, b)
    if which == 3:
        if N < 2:
            N = 2
        n8 = fdp.ConsumeIntInRange(1, N - 1)
        perm = permutation(fdp, N)
        i4, i8 = bad_index(fdp, perm[: N - n8], N), bad_index(fdp, perm[N - n8 :], N)
        if fdp.ConsumeBool():
            i4, i8 = i4.to(DEV), i8.to(DEV)
        return ops.mixed_linear(x, weight(fdp, 4, N - n8, K, g), weight(fdp, 8, n8, K, g), i4, i8)
    from mixllm.nn import MixedLinear

    m = MixedLinear(K, N, n8=fdp.ConsumeIntInRange(0, N), bias=fdp.ConsumeBool(), group_size=g).to(DEV)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        with torch.no_grad():
            m.perm.copy_(bad_index(fdp, m.perm.cpu(), N).to(torch.int64))
    return m(x)


# ---------------------------------------------------------------- any other entry point
def generic_arg(fdp, kind, cons):
    """An argument meeting the declared constraints (dtype, ndim, range), or a mutation."""
    if cons.get("none_ok") and fdp.ConsumeIntInRange(0, 3) == 0:
        return None
    if kind == "int":
        lo, hi = max(cons.get("min", -2), -2), min(cons.get("max", 4096), 4096)
        return scalar(fdp, fdp.ConsumeIntInRange(lo, max(lo, hi)), (cons.get("min", 0) - 1, cons.get("max", 0) + 1))
    if kind == "float":
        return scalar(fdp, 1.0, (float("nan"), float("inf"), -1.0, None, "x"))
    if kind == "bool":
        return fdp.ConsumeBool()
    if kind == "object":
        return hostile(fdp)
    dt = getattr(torch, fdp.PickValueInList(list(cons.get("dtypes") or ["float32"])))
    nd = cons.get("ndim", -1)
    shape = tuple(fdp.ConsumeIntInRange(0, 9) for _ in range(nd if nd >= 0 else fdp.ConsumeIntInRange(0, 3)))
    return arr(fdp, dt, shape, out=cons.get("output", False))


def make_generic(name):
    def target(fdp):
        args = [generic_arg(fdp, kind, cons) for _, kind, cons in SIGNATURES[name]]
        return call(fdp, getattr(_cuda, name), *args)

    target.generic = True
    return target


TARGETS = {
    "act_quant": t_act_quant,
    "pack_weight": t_pack_weight,
    "geometry": t_geometry,
    "layout_bytes": t_layout_bytes,
    "plan": t_plan,
    "prepare": t_prepare,
    "plan_call": t_plan_call,
    "run": t_run,
    "ops": t_ops,
}


def entry_points():
    return sorted(SIGNATURES)


def target_for(name):
    return TARGETS.get(name) or make_generic(name)


def target_names():
    """Every entry point (dedicated or generic target) and the public-ops target."""
    return sorted(set(entry_points()) | set(TARGETS))


class Finding(Exception):
    pass


def run_one(name, data):
    """One input; raises Finding on an unexpected exception or an unhealthy device afterwards."""
    STATS["inputs"] += 1
    try:
        target_for(name)(Bytes(data))
        STATS["ok"] += 1
    except EXPECTED:
        STATS["errors"] += 1
    except Exception as e:  # noqa: BLE001 (a finding: anything else, CUDA errors included)
        raise Finding(f"{type(e).__name__}: {e}") from e
    try:
        if not DRY:
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        raise Finding(f"device unhealthy after the call: {type(e).__name__}: {e}") from e


def inputs_for(name, n_random):
    d = os.path.join(HERE, "corpus", f"cuda_{name}")
    seeds = []
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            with open(os.path.join(d, f), "rb") as fh:
                seeds.append(fh.read())
    r = random.Random(f"cuda_{name}")
    return seeds + [bytes(r.randrange(256) for _ in range(r.randrange(1, 400))) for _ in range(n_random)]


def main(argv):
    if len(argv) < 2 or argv[1] not in ("list", "sweep", "replay"):
        print(__doc__)
        return 2
    undeclared = sorted(n for n in dir(_cuda) if callable(getattr(_cuda, n)) and not n.startswith("_"))
    undeclared = [n for n in undeclared if n not in SIGNATURES]
    if undeclared:  # every entry point is declared in a table (and so fuzzed)
        print(f"entry points without a declared signature: {undeclared}")
        return 2
    if argv[1] == "list":
        for n in target_names():
            print(n + ("" if n in TARGETS else "  (generic)"))
        return 0
    if argv[1] == "replay":
        for path in argv[3:]:
            with open(path, "rb") as f:
                run_one(argv[2], f.read())
        print(f"replayed {len(argv) - 3} inputs: {STATS}")
        return 0
    n_random = int(argv[2])
    save = argv[argv.index("--save") + 1] if "--save" in argv else None
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    budget = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else float("inf")
    per, findings = {}, []
    for name in target_names():
        if only and name != only:
            continue
        t0, before = time.time(), dict(STATS)
        for i, data in enumerate(inputs_for(name, n_random)):
            if time.time() - t0 > budget:  # the first i inputs of the (deterministic) sequence ran
                break
            try:
                run_one(name, data)
            except Finding as e:
                STATS["findings"] += 1
                findings.append({"target": name, "input": i, "error": str(e)[:500]})
                if save:
                    os.makedirs(save, exist_ok=True)
                    with open(os.path.join(save, f"cuda_{name}_{i}"), "wb") as f:
                        f.write(data)
                print(f"FINDING {name} #{i}: {str(e)[:300]}", flush=True)
                if "unhealthy" in str(e):  # a sticky CUDA error: nothing after it can be trusted
                    per[name] = {k: STATS[k] - before[k] for k in STATS}
                    print(json.dumps({"targets": per, "total": STATS, "findings": findings}))
                    return 1
        per[name] = {k: STATS[k] - before[k] for k in STATS} | {"seconds": round(time.time() - t0, 1)}
        print(f"sweep {name}: {per[name]}", flush=True)
    print(json.dumps({"targets": per, "total": STATS, "findings": findings[:50]}))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
