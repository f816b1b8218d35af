"""Fuzz targets, one per public entry point of mixllm._C (see TARGETS; `generic` covers any entry
point added later from its declared argument table, `mixllm._C.__signatures__`, until it gets a
dedicated target).

Each target draws a *consistent* call (shapes that agree, in-range scalars, honest weights) from the
fuzzer's bytes and then mutates some of it: any array argument may become another dtype, shape,
a strided / zero-stride / negative-stride / read-only view, a torch tensor, a hand-made DLPack
capsule with arbitrary fields (fuzz/dlfake.py), or a hostile object (its __dlpack__ raises, returns
garbage, returns an already consumed capsule, or mutates the caller's containers). Scalars may
become out of range or the wrong type, and any call may pass some of its arguments by keyword (the
names come from the same table) or a keyword that does not exist. The contract checked: the call
returns or raises one of EXPECTED, never crashes, and DLPack ownership is respected (dlfake.Ledger).
"""

import os

import dlfake
import numpy as np

from mixllm import _C, ops

torch = None
if os.environ.get("MIXLLM_FUZZ_TORCH") == "1":  # torch tensors as one more producer (slow under ASan)
    import torch

EXPECTED = (TypeError, ValueError, OverflowError, MemoryError, BufferError)
STATS = {"calls": 0, "ok": 0, "errors": 0}

NP_DTYPES = ["float32", "float16", "float64", "int8", "uint8", "int32", "int64", "int16", "uint16", "bool", "complex64"]


def ngroups(K, g):
    return (K + g - 1) // g if g > 0 else 0


def values(fdp, dtype, shape, lo=None, hi=None):
    """Honest contents: normal floats (sometimes NaN/Inf/huge), integers in [lo, hi]."""
    n = int(np.prod(shape)) if shape else 1
    if dtype in ("float32", "float16", "float64", "bfloat16"):
        scale = fdp.PickValueInList([1.0, 1.0, 1e-30, 1e4, 3e38])
        seed = fdp.ConsumeIntInRange(0, 2**31)
        v = np.random.default_rng(seed).standard_normal(n) * scale
        if n and fdp.ConsumeIntInRange(0, 9) == 0:
            v[fdp.ConsumeIntInRange(0, n - 1)] = fdp.PickValueInList([np.nan, np.inf, -np.inf])
        with np.errstate(over="ignore"):
            return v.astype("float32" if dtype == "bfloat16" else dtype).reshape(shape)
    info = np.iinfo(dtype) if dtype not in ("bool", "complex64") else None
    lo = info.min if lo is None and info else (lo or 0)
    hi = info.max if hi is None and info else (hi or 1)
    seed = fdp.ConsumeIntInRange(0, 2**31)
    return np.random.default_rng(seed).integers(lo, hi, n, endpoint=True).astype(dtype).reshape(shape)


def hostile(fdp):
    return fdp.PickValueInList([None, 0, 1.5, "array", b"x", [1, 2], object(), np.float32(1.0)])


def to_torch(a):
    if a.dtype == np.uint16 or a.dtype == np.bool_ or a.dtype == np.complex64:
        return torch.from_numpy(a.astype(np.int16) if a.dtype == np.uint16 else a)
    return torch.from_numpy(a)


def arr(fdp, dtype, shape, lo=None, hi=None, mutable=False):
    """The array a correct call would pass (dtype, shape), or a mutation of it."""
    mode = fdp.ConsumeIntInRange(0, 31)
    if mode < 20:  # correct
        a = values(fdp, dtype if dtype != "bfloat16" else "float32", shape, lo, hi)
        if dtype == "bfloat16":
            if torch is None:
                return a
            return torch.from_numpy(a).to(torch.bfloat16)
        return a
    if mode == 20:  # wrong dtype
        dt = fdp.PickValueInList(NP_DTYPES)
        return values(fdp, dt, shape) if dt not in ("bool", "complex64") else np.zeros(shape, dt)
    if mode == 21:  # wrong shape
        shp = tuple(fdp.ConsumeIntInRange(0, 5) for _ in range(fdp.ConsumeIntInRange(0, 5)))
        return np.zeros(shp, dtype if dtype != "bfloat16" else "float32")
    base_dt = dtype if dtype != "bfloat16" else "float32"
    if mode == 22:  # strided views: transposed, reversed (negative strides), every other element
        big = values(fdp, base_dt, tuple(2 * s + 1 for s in shape), lo, hi)
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0 and len(shape) == 2:
            return big[: shape[1], : shape[0]].T
        if kind == 1:
            return big[tuple(slice(s - 1 if s else 0, None, -1) if s else slice(0, 0) for s in shape)]
        if kind == 2:
            return big[tuple(slice(0, 2 * s, 2) for s in shape)]
        return big[tuple(slice(1, 1 + s) for s in shape)]  # offset into a larger buffer, not compact
    if mode == 23:  # zero strides
        one = values(fdp, base_dt, (1,) * len(shape), lo, hi)
        return np.broadcast_to(one, shape)
    if mode == 24:  # read-only
        a = values(fdp, base_dt, shape, lo, hi)
        a.flags.writeable = False
        return a
    if mode == 25 and torch is not None:  # torch: contiguous, non-contiguous, expanded
        t = to_torch(values(fdp, base_dt, shape, lo, hi))
        k = fdp.ConsumeIntInRange(0, 3)
        if k == 1 and len(shape) == 2:
            t = to_torch(values(fdp, base_dt, (shape[1], shape[0]), lo, hi)).t()
        elif k == 2 and len(shape) >= 1:
            t = t.narrow(0, 0, shape[0]) if shape[0] else t
            t = torch.empty((0,) * len(shape)) if fdp.ConsumeBool() else t
        elif k == 3:
            t = t.to(torch.bfloat16) if t.is_floating_point() else t
        return t
    if mode <= 29:  # a hand-made capsule describing correct or mutated data
        good = values(fdp, base_dt, shape, lo, hi) if dtype != "bfloat16" else None
        cap, dev = dlfake.make_capsule(fdp, good, dtype, shape)
        beh = fdp.PickValueInList(dlfake.BEHAVIOURS) if fdp.ConsumeIntInRange(0, 3) == 0 else "ok"
        return dlfake.FakeArray(cap, dev, beh)
    if mode == 30:  # an already consumed capsule: export once elsewhere, then hand it over
        a = values(fdp, base_dt, shape, lo, hi)
        cap = a.__dlpack__()
        try:
            np.from_dlpack(_CapsuleHolder(cap, a))
        except Exception:
            pass
        return dlfake.FakeArray(cap, (1, 0))
    return hostile(fdp)


class _CapsuleHolder:
    def __init__(self, cap, a):
        self.cap, self.a = cap, a

    def __dlpack__(self, **kw):
        return self.cap

    def __dlpack_device__(self):
        return (1, 0)


def scalar(fdp, good, bad=(-1, 0, 2**31, 2**63 - 1, 2**63, -(2**63), 1.5, "4", None, True)):
    return good if fdp.ConsumeIntInRange(0, 15) else fdp.PickValueInList(list(bad))


def dims(fdp, n, hi=40):
    return [
        fdp.ConsumeIntInRange(0, hi) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 300) for _ in range(n)
    ]


def group(fdp, K):
    g = fdp.PickValueInList([1, 2, 3, 4, 8, 16, 32, 128, K or 1, max(1, K // 2)])
    return scalar(fdp, g, (0, -1, 2**62, 2**63 - 1, 2**63, 1.5, None))


def as_keywords(fdp, f, args):
    """Split a positional call into (positional head, keywords) by the entry point's argument names;
    sometimes with a duplicate or unknown keyword (both must raise TypeError)."""
    names = [a[0] for a in SIGNATURES.get(getattr(f, "__name__", ""), ())]
    if not names or fdp.ConsumeIntInRange(0, 3):
        return list(args), {}
    cut = fdp.ConsumeIntInRange(0, min(len(args), len(names)))
    kw = dict(zip(names[cut:], args[cut:]))
    head = list(args[:cut]) + list(args[len(names) :])  # extra positionals stay (wrong arity)
    bad = fdp.ConsumeIntInRange(0, 15)
    if bad == 0:
        kw["no_such_argument"] = 1
    elif bad == 1 and cut:
        kw[names[0]] = args[0]  # given twice
    return head, kw


def call(f, *args):
    STATS["calls"] += 1
    pos, kw = as_keywords(_FDP[0], f, args) if _FDP else (list(args), {})
    try:
        f(*pos, **kw)
        STATS["ok"] += 1
    except EXPECTED:
        STATS["errors"] += 1


# ----------------------------------------------------------------------------- targets
def t_quantize_weight(fdp):
    N, K = dims(fdp, 2)
    g = group(fdp, K)
    sym = fdp.ConsumeBool()
    bits = scalar(fdp, fdp.ConsumeIntInRange(2, 8), (-1, 0, 1, 9, 64, 2**40, None))
    G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
    call(
        _C.quantize_weight,
        arr(fdp, "float32", (N, K)),
        bits,
        g,
        scalar(fdp, sym, ([], "x")),
        arr(fdp, "int8" if sym else "uint8", (N, K)),
        arr(fdp, "float32", (N, G)),
        arr(fdp, "uint8", (N, G)),
    )


def t_dequantize_weight(fdp):
    N, K = dims(fdp, 2)
    g = group(fdp, K)
    G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
    sym = fdp.ConsumeBool()
    zero = None if sym and fdp.ConsumeBool() else arr(fdp, "uint8", (N, G), 0, 15)
    call(
        _C.dequantize_weight,
        arr(fdp, "int8" if sym else "uint8", (N, K)),
        arr(fdp, "float32", (N, G)),
        zero,
        g,
        arr(fdp, "float32", (N, K)),
    )


def t_quantize_activation(fdp):
    M, K = dims(fdp, 2)
    g = group(fdp, K)
    G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
    dt = fdp.PickValueInList(["float32", "float16", "bfloat16"])
    call(_C.quantize_activation, arr(fdp, dt, (M, K)), g, arr(fdp, "int8", (M, K)), arr(fdp, "float32", (M, G)))


def t_pack_int4(fdp):
    N, K = dims(fdp, 2)
    hi = 15 if fdp.ConsumeIntInRange(0, 7) else 255
    call(_C.pack_int4, arr(fdp, "uint8", (N, K), 0, hi), arr(fdp, "uint8", (N, (K + 1) // 2)))


def t_unpack_int4(fdp):
    N, K = dims(fdp, 2)
    call(_C.unpack_int4, arr(fdp, "uint8", (N, (K + 1) // 2)), arr(fdp, "uint8", (N, K)))


def t_salience_accumulate(fdp):
    N, K = dims(fdp, 2)
    dt = fdp.PickValueInList(["float32", "float16", "bfloat16"])
    call(_C.salience_accumulate, arr(fdp, "float64", (N,)), arr(fdp, dt, (N, K)), arr(fdp, "float32", (N, K)))


def t_gptq_quantize(fdp):
    N, K = dims(fdp, 2, hi=24)
    K = min(K, 48)
    g = group(fdp, K)
    G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
    sym = fdp.ConsumeBool()
    bits = scalar(fdp, fdp.ConsumeIntInRange(2, 8), (-1, 0, 1, 9, 2**40))
    hk = fdp.ConsumeIntInRange(0, 4)
    if hk == 0:
        H = None
    elif hk <= 2:  # a real Hessian 2 X^T X (maybe rank deficient: few samples, dead inputs)
        X = values(fdp, "float64", (fdp.ConsumeIntInRange(1, 2 * K + 1), K))
        if K and fdp.ConsumeBool():
            X[:, fdp.ConsumeIntInRange(0, K - 1)] = 0
        H = 2 * X.T @ X if np.isfinite(X).all() else X[:K].T @ np.ones((min(len(X), K), K))
        H = np.ascontiguousarray(H)
        H = arr(fdp, "float64", (K, K)) if fdp.ConsumeIntInRange(0, 7) == 0 else H
    else:
        H = arr(fdp, "float64", (K, K))  # random: not symmetric, not PD, NaN...
    damp = scalar(fdp, fdp.PickValueInList([0.0, 0.01, 0.1, 1.0]), (-1.0, float("nan"), float("inf"), 1e300, "x"))
    clip = scalar(fdp, fdp.PickValueInList([0, 0, 5, 20]), (-1, 100, 2**31, None))
    bpg = None
    if fdp.ConsumeIntInRange(0, 3) == 0:
        bpg = arr(fdp, "float32", (N, G))
        if isinstance(bpg, np.ndarray) and bpg.dtype == np.float32 and bpg.shape == (N, G) and fdp.ConsumeBool():
            bpg = (
                np.random.default_rng(fdp.ConsumeIntInRange(0, 99))
                .integers(2, 8, (N, G), endpoint=True)
                .astype(np.float32)
            )
    call(
        _C.gptq_quantize,
        arr(fdp, "float32", (N, K)),
        H,
        bits,
        g,
        sym,
        damp,
        fdp.ConsumeBool(),
        clip,
        bpg,
        arr(fdp, "int8" if sym else "uint8", (N, K)),
        arr(fdp, "float32", (N, G)),
        arr(fdp, "uint8", (N, G)),
    )


def t_cpu_blob_bytes(fdp):
    big = (-1, 0, 2**31, 2**31 + 1, 2**62, 2**63 - 1, 2**63, 1.5, None)
    call(
        _C.cpu_blob_bytes,
        scalar(fdp, fdp.PickValueInList([4, 8]), (0, 3, 16, None)),
        scalar(fdp, fdp.ConsumeIntInRange(0, 2**31), big),
        scalar(fdp, fdp.ConsumeIntInRange(1, 2**31), big),
        scalar(fdp, fdp.ConsumeIntInRange(1, 2**31), big),
    )


def t_cpu_has(fdp):
    call(_C.cpu_has, scalar(fdp, fdp.ConsumeIntInRange(-2, 5), (2**31, 2**63, None, "x")))


def t_cpu_prepack(fdp):
    N, K = dims(fdp, 2)
    K = max(K, 1)
    bits = scalar(fdp, fdp.PickValueInList([4, 8]), (0, 2, 16, None))
    g = group(fdp, K)
    geff = min(g, K) if isinstance(g, int) and g > 0 else 1
    G = ngroups(K, geff)
    four = bits == 4
    codes = arr(fdp, "uint8" if four else "int8", (N, K), 0 if four else -127, 15 if four else 127)
    try:
        nbytes = _C.cpu_blob_bytes(bits if bits in (4, 8) else 4, N, K, geff)
    except EXPECTED:
        nbytes = 0
    call(
        _C.cpu_prepack,
        codes,
        arr(fdp, "float32", (N, G)),
        arr(fdp, "uint8", (N, G), 0, 15) if four or fdp.ConsumeBool() else None,
        bits,
        g,
        arr(fdp, "uint8", (max(nbytes, 0),)),
    )


def _weight(fdp, bits, N, K, g):
    w = values(fdp, "float32", (N, K))
    w = np.nan_to_num(w, nan=0.0, posinf=1.0, neginf=-1.0)
    qw = ops.QuantizedWeight.quantize(np.clip(w, -1e30, 1e30), bits, g)
    blob = qw.cpu_blob()
    if fdp.ConsumeIntInRange(0, 7) == 0:  # hostile blob contents of the right size
        blob = np.frombuffer(fdp.ConsumeBytes(blob.size).ljust(blob.size, b"\x80"), np.uint8).copy()
    return blob


def t_cpu_qlinear(fdp):
    M, K, N4, N8 = dims(fdp, 4, hi=24)
    K = max(K, 1)
    g = fdp.PickValueInList([1, 8, 16, 32, 128, K])
    n_out = N4 + N8
    perm = np.random.default_rng(fdp.ConsumeIntInRange(0, 99)).permutation(n_out).astype(np.int64)
    parts = []
    if N4 or not N8:
        parts.append([_weight(fdp, 4, N4, K, g), 4, N4, perm[:N4]])
    if N8:
        parts.append([_weight(fdp, 8, N8, K, g), 8, N8, perm[N4:]])
    if len(parts) == 1 and fdp.ConsumeBool():
        parts[0][3] = None
    for p in parts:
        if fdp.ConsumeIntInRange(0, 5) == 0:
            p[0] = arr(fdp, "uint8", tuple(p[0].shape))
        if fdp.ConsumeIntInRange(0, 7) == 0:
            p[1] = scalar(fdp, p[1], (0, 2, 16, None))
        if fdp.ConsumeIntInRange(0, 7) == 0:
            p[2] = scalar(fdp, p[2], (-1, n_out + 1, 2**62, 2**63 - 1, None))
        if p[3] is not None and fdp.ConsumeIntInRange(0, 5) == 0:
            if fdp.ConsumeBool() and len(p[3]):
                p[3] = p[3].copy()
                p[3][fdp.ConsumeIntInRange(0, len(p[3]) - 1)] = fdp.PickValueInList([-1, n_out, 2**62, -(2**63), 0])
            else:
                p[3] = arr(fdp, "int64", tuple(p[3].shape), -2, n_out + 1)
    plist = [tuple(p) if fdp.ConsumeIntInRange(0, 15) else tuple(p[: fdp.ConsumeIntInRange(0, 3)]) for p in parts]
    if fdp.ConsumeIntInRange(0, 7) == 0 and plist and len(plist[0]) == 4:
        # a producer that mutates the parts list (and frees its tuples) while being exported
        victim = plist[0]
        cap_src = victim[0]
        plist[0] = (dlfake.FakeArray(None, (1, 0), on_export=lambda: plist.clear()), *victim[1:])
        try:
            plist[0][0].capsule = cap_src.__dlpack__(max_version=(1, 0))
        except Exception:
            plist[0][0].capsule = None
        del victim
    if fdp.ConsumeIntInRange(0, 15) == 0:
        plist = fdp.PickValueInList([(), [], None, plist * 3, tuple(plist)])
    dt = fdp.PickValueInList(["float32", "float16", "bfloat16"])
    odt = fdp.PickValueInList(["float32", "float16", dt])
    bias = arr(fdp, "float32", (n_out,)) if fdp.ConsumeBool() else None
    impl = scalar(
        fdp, fdp.PickValueInList(ops._IMPLS and [0, 1] + [v for v in (2, 3) if _C.cpu_has(v)]), (-1, 4, 2**31, None)
    )
    call(
        _C.cpu_qlinear,
        arr(fdp, dt, (M, K)),
        plist,
        scalar(fdp, g, (0, -1, 2**63 - 1)),
        bias,
        arr(fdp, odt, (M, n_out)),
        impl,
    )


def _fl(fdp, good, bad=(float("nan"), float("inf"), -1.0, 1e308, None, "x")):
    return scalar(fdp, good, bad)


def t_kmeans1d(fdp):
    R, n = dims(fdp, 2, hi=30)
    k = scalar(fdp, fdp.ConsumeIntInRange(1, 16), (0, -1, 257, 2**31, None))
    kk = k if isinstance(k, int) and 1 <= k <= 256 else 4
    weight = None if fdp.ConsumeBool() else arr(fdp, "float32", (R, n))
    if isinstance(weight, np.ndarray) and weight.dtype.kind == "f" and fdp.ConsumeIntInRange(0, 3):
        weight = np.abs(weight)  # mostly valid (non-negative) weights
    levels = None if fdp.ConsumeBool() else arr(fdp, "int32", (R,), 0, kk + 1)
    iters = scalar(fdp, fdp.ConsumeIntInRange(0, 8), (-1, 2**31, None))
    call(
        _C.kmeans1d,
        arr(fdp, "float32", (R, n)),
        weight,
        k,
        levels,
        iters,
        arr(fdp, "float32", (R, kk)),
        arr(fdp, "uint8", (R, n)),
    )


def _slim_scalars(fdp):
    return (
        _fl(fdp, fdp.PickValueInList([0.0, 0.5, 3.0])),
        _fl(fdp, fdp.PickValueInList([1.0, 2.0, 2.4])),
        _fl(fdp, fdp.PickValueInList([0.0, 0.1, 0.5])),
        scalar(fdp, fdp.ConsumeIntInRange(1, 12), (0, -1, 1001)),
    )


def t_slim_calibrate(fdp):
    R, ln = dims(fdp, 2, hi=40)
    bits = scalar(fdp, fdp.ConsumeIntInRange(1, 8), (0, 9, -1, None))
    u = arr(fdp, "float64", (ln,))
    if isinstance(u, np.ndarray) and u.dtype == np.float64 and fdp.ConsumeBool():
        u = np.abs(u) + 1e-3
    thr = None if fdp.ConsumeBool() else _fl(fdp, fdp.ConsumeRegularFloat())
    lam, norm, tau_range, tau_n = _slim_scalars(fdp)
    call(
        _C.slim_calibrate,
        arr(fdp, "float32", (R, ln)),
        u,
        bits,
        thr,
        lam,
        norm,
        tau_range,
        tau_n,
        arr(fdp, "float32", (R,)),
        arr(fdp, "float32", (R,)),
    )


def t_slim_gptq(fdp):
    N, K = dims(fdp, 2, hi=24)
    K = min(K, 48)
    g = group(fdp, K)
    G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
    H = None
    if fdp.ConsumeBool():
        X = values(fdp, "float64", (fdp.ConsumeIntInRange(1, 2 * K + 1), K))
        H = np.ascontiguousarray(2 * X.T @ X) if np.isfinite(X).all() else arr(fdp, "float64", (K, K))
    bpg = np.random.default_rng(fdp.ConsumeIntInRange(0, 99)).integers(1, 4, (N, G), endpoint=True).astype(np.float32)
    bpg = arr(fdp, "float32", (N, G)) if fdp.ConsumeIntInRange(0, 5) == 0 else bpg
    thr = None if fdp.ConsumeBool() else arr(fdp, "float64", (G,))
    lam, norm, tau_range, tau_n = _slim_scalars(fdp)
    go = fdp.ConsumeBool()
    args = [
        arr(fdp, "float32", (N, K)),
        H,
        bpg,
        g,
        _fl(fdp, 0.01),
        go,
        thr,
        lam,
        norm,
        tau_range,
        tau_n,
        arr(fdp, "uint8", (N, K)),
        arr(fdp, "float32", (N, G)),
        arr(fdp, "float32", (N, G)),
    ]
    if fdp.ConsumeIntInRange(0, 3) == 0:
        args.append(arr(fdp, "float64", (K, K)))  # U (upper Cholesky factor of H^-1), maybe garbage
    call(_C.slim_gptq, *args)


def _woq_spec(fdp, N, K):
    if fdp.ConsumeBool():
        g = group(fdp, K)
        G = ngroups(K, g) if isinstance(g, int) and g > 0 else 1
        spec = ["group", g, arr(fdp, "uint8", (N, K), 0, 15), arr(fdp, "float32", (N, G)), arr(fdp, "float32", (N, G))]
    else:
        L = fdp.ConsumeIntInRange(1, 16)
        spec = [
            "codebook",
            0,
            arr(fdp, "uint8", (N, K), 0, L - 1 if fdp.ConsumeIntInRange(0, 7) else 255),
            arr(fdp, "float32", (K, L)),
            None,
        ]
    if fdp.ConsumeBool():  # sparse outliers in CSR form, honest or not
        counts = np.random.default_rng(fdp.ConsumeIntInRange(0, 99)).integers(0, 3, N)
        rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        nnz = int(rowptr[-1])
        cols = np.random.default_rng(fdp.ConsumeIntInRange(0, 99)).integers(0, max(K, 1), nnz).astype(np.int64)
        if nnz and fdp.ConsumeIntInRange(0, 3) == 0:
            cols[fdp.ConsumeIntInRange(0, nnz - 1)] = fdp.PickValueInList([-1, K, 2**62, -(2**63)])
        if N and fdp.ConsumeIntInRange(0, 3) == 0:
            rowptr[fdp.ConsumeIntInRange(0, N)] = fdp.PickValueInList([-1, nnz + 1, 2**62, 0])
        spec += [
            arr(fdp, "int64", (N + 1,)) if fdp.ConsumeIntInRange(0, 7) == 0 else rowptr,
            arr(fdp, "int64", (nnz,)) if fdp.ConsumeIntInRange(0, 7) == 0 else cols,
            arr(fdp, "float32", (nnz,)),
        ]
    else:
        spec += [None, None, None]
    if fdp.ConsumeIntInRange(0, 15) == 0:
        spec = spec[: fdp.ConsumeIntInRange(0, len(spec))]
    if spec and fdp.ConsumeIntInRange(0, 15) == 0:
        spec[0] = fdp.PickValueInList(["nope", b"group", 3, "group\0x"])
    return tuple(spec) if fdp.ConsumeIntInRange(0, 15) else spec


def t_woq_dequantize(fdp):
    N, K = dims(fdp, 2)
    call(_C.woq_dequantize, _woq_spec(fdp, N, K), arr(fdp, "float32", (N, K)))


def t_woq_linear(fdp):
    M, N, K = dims(fdp, 3, hi=24)
    dt = fdp.PickValueInList(["float32", "float16", "bfloat16"])
    call(
        _C.woq_linear,
        arr(fdp, dt, (M, K)),
        _woq_spec(fdp, N, K),
        None if fdp.ConsumeBool() else arr(fdp, "float32", (N,)),
        arr(fdp, fdp.PickValueInList(["float32", dt]), (M, N)),
    )


# ---------------------------------------------------------------- any other entry point
SIGNATURES = _C.__signatures__  # entry point -> [(name, kind, constraints)], declared in csrc/module.c
_FDP = []  # the current input's data provider (as_keywords draws from it)


def random_array(fdp, cons=None):
    """An array meeting the declared constraints (dtype, ndim) with random extents, or a mutation."""
    cons = cons or {}
    dts = list(cons.get("dtypes") or ["float32", "float64", "int8", "uint8", "int64", "float16", "int32"])
    dt = fdp.PickValueInList(dts)
    ndim = cons.get("ndim", -1)
    nd = ndim if ndim is not None and ndim >= 0 else fdp.ConsumeIntInRange(0, 3)
    shp = tuple(fdp.ConsumeIntInRange(0, 9) for _ in range(nd))
    return arr(fdp, dt, shp)


def generic_arg(fdp, kind, cons):
    if cons.get("none_ok") and fdp.ConsumeIntInRange(0, 3) == 0:
        return None
    if kind == "int":
        lo, hi = max(cons.get("min", -2), -2), min(cons.get("max", 130), 130)
        return scalar(
            fdp,
            fdp.ConsumeIntInRange(lo, max(lo, hi)),
            (cons.get("min", 0) - 1, cons.get("max", 0) + 1, 2**63, 1.5, None, "x"),
        )
    if kind == "float":
        return scalar(fdp, fdp.ConsumeRegularFloat(), (float("nan"), float("inf"), -1.0, None, "x"))
    if kind == "bool":
        return fdp.ConsumeBool()
    if kind == "object" or fdp.ConsumeIntInRange(0, 15) == 0:
        return fdp.PickValueInList([[random_array(fdp)], (1, 2), {"a": 1}, 3, None])
    return random_array(fdp, cons)


def make_generic(name):
    def target(fdp):
        args = [generic_arg(fdp, kind, cons) for _, kind, cons in SIGNATURES[name]]
        if fdp.ConsumeIntInRange(0, 15) == 0:  # wrong arity
            args = args[: fdp.ConsumeIntInRange(0, len(args))] if fdp.ConsumeBool() else args + [None]
        call(getattr(_C, name), *args)

    target.generic = True
    return target


TARGETS = {
    "quantize_weight": t_quantize_weight,
    "dequantize_weight": t_dequantize_weight,
    "quantize_activation": t_quantize_activation,
    "pack_int4": t_pack_int4,
    "unpack_int4": t_unpack_int4,
    "salience_accumulate": t_salience_accumulate,
    "gptq_quantize": t_gptq_quantize,
    "cpu_blob_bytes": t_cpu_blob_bytes,
    "cpu_has": t_cpu_has,
    "cpu_prepack": t_cpu_prepack,
    "cpu_qlinear": t_cpu_qlinear,
    "kmeans1d": t_kmeans1d,
    "slim_calibrate": t_slim_calibrate,
    "slim_gptq": t_slim_gptq,
    "woq_dequantize": t_woq_dequantize,
    "woq_linear": t_woq_linear,
}


def entry_points():
    return sorted(SIGNATURES)


def target_for(name):
    return TARGETS.get(name) or make_generic(name)


def run_one(name, data, fdp_cls):
    fdp = fdp_cls(data)
    dlfake.LEDGER.reset()
    _FDP[:] = [fdp]
    try:
        target_for(name)(fdp)
    finally:
        _FDP.clear()
        made = list(dlfake.LEDGER.made)
    dlfake.LEDGER.check()
    del made
