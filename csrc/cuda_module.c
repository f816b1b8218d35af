/* mixllm._cuda: CPython entry points of the CUDA kernels (the .cu files in cuda/). Like mixllm._C, each
 * declares its arguments once (an A_x table, csrc/args.h): the layer parses positional and keyword
 * arguments, takes the arrays through the DLPack bridge (CUDA arrays only, all on one device) and
 * releases them at the end. The entry point checks shapes against each other and calls an
 * extern "C" launcher (cuda/mixllm_cuda.h) that enqueues work on the caller's stream and returns at
 * once; cuda_finish turns the launcher's code into an exception. Outputs and workspaces are
 * allocated by mixllm/cuda_ops.py and passed in.
 *
 * Streams: every op that launches work takes the caller's stream handle
 * (torch.cuda.current_stream().cuda_stream). The same value goes to __dlpack__(stream=...) so that a
 * producer working on another stream orders itself before us (MIX_SIG_CUDA's stream argument). */
#include "args.h" /* first: it includes Python.h */
#include "../cuda/mixllm_cuda.h"
#include "quant.h" /* mix_ngroups */
#include <string.h>

#define F32      MIX_DT(MIX_F32)
#define I8       MIX_DT(MIX_I8)
#define U8       MIX_DT(MIX_U8)
#define I64      MIX_DT(MIX_I64)
#define ENTRY(x) static PyObject *py_##x(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
#define BEGIN(x) \
    mix_call c;  \
    if (mix_call_begin(&c, &S_##x, args, nargs, kw) < 0) return NULL

/* K and g of a weight layout: 1 <= g <= K (callers pass min(group_size, K)) and K small enough
 * that the padded sizes (mixc_kp, mixc_wpack_bytes) and the GEMM's int group count cannot overflow. */
#define MAX_K     0x7fffff80LL
#define MAX_ROWS  (1LL << 40)
#define MAX_BYTES (1LL << 56) /* any one buffer of a call */

/* Argument declarations shared by several entry points. The upper bounds of K and g depend on each
 * other and are checked by check_k_g (a K beyond 32 bits stays a ValueError, not an OverflowError). */
#define ARG_K      MIX_INT("K", 1, LLONG_MAX, "expected an integer in [1, 2147483520]")
#define ARG_G      MIX_INT("g", 1, LLONG_MAX, "expected an integer in [1, K] (min(group_size, K))")
#define ARG_BITS   MIX_INT("bits", 4, 8, "expected 4 or 8")
#define ARG_CFG    MIX_INT("cfg", INT_MIN, INT_MAX, NULL)
#define ARG_SPLITS MIX_INT("splits", INT_MIN, INT_MAX, NULL)
#define ARG_STREAM MIX_INT("stream", LLONG_MIN, LLONG_MAX, NULL)

/* The one mapping of a launcher's result (0 or a cudaError_t) to the call's result. */
static PyObject *cuda_finish(mix_call *c, int err) {
    const char *name = c->sig->name;
    mix_call_release(c);
    if (!err) Py_RETURN_NONE;
    return PyErr_Format(PyExc_RuntimeError, "%s: CUDA error %d (%s)", name, err, mixc_error_string(err));
}

static void *stream_of(const mix_call *c, int i) { return (void *)(intptr_t)mix_int(c, i); }
static int dtype_code(mix_dtype d) { return d == MIX_F32 ? 0 : d == MIX_F16 ? 1 : 2; }

static int check_bits_48(long long bits) {
    if (bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected 4 or 8, got %lld", bits);
        return -1;
    }
    return 0;
}
static int check_k_g(long long K, long long g) {
    if (K <= 0 || K > MAX_K) {
        PyErr_Format(PyExc_ValueError, "K: expected an integer in [1, %lld], got %lld", MAX_K, K);
        return -1;
    }
    if (g <= 0 || g > K) {
        PyErr_Format(PyExc_ValueError, "g: expected an integer in [1, K=%lld] (min(group_size, K)), got %lld", K, g);
        return -1;
    }
    return 0;
}
/* The packed layout of an [N, K] part fits MAX_BYTES (so mixc_wpack_bytes cannot overflow). */
static int check_layout(int64_t N, int64_t K, int64_t g, const char *name) {
    const int64_t Kp = mixc_kp(K, g), rows = (N + 15) / 16 * 16;
    if (N < 0 || N > MAX_ROWS || (rows > 0 && Kp > MAX_BYTES / rows)) {
        PyErr_Format(PyExc_ValueError, "%s: a %lld x %lld layer is too large", name, (long long)N, (long long)K);
        return -1;
    }
    return 0;
}
static int check_aligned16(const mix_array *a, const mix_array *b, const char *names) {
    if (((uintptr_t)a->data | (uintptr_t)b->data) % 16) {
        PyErr_Format(PyExc_ValueError, "%s: must be 16-byte aligned", names);
        return -1;
    }
    return 0;
}

/* ---- activations and weights ----------------------------------------------------------------------- */

static const mix_arg A_act_quant[] = {MIX_IN("x", MIX_FLOATS, 2),
                                      MIX_INT("g", 1, LLONG_MAX, "expected a positive integer"),
                                      MIX_INT("gp", 1, LLONG_MAX, "expected an integer >= g"),
                                      MIX_OUT("q_out", I8, 2),
                                      MIX_OUT("scale_out", F32, 2),
                                      MIX_INT("spg", 1, INT_MAX, "expected a positive integer"),
                                      ARG_STREAM};
static int pre_act_quant(const mix_call *c) {
    if (mix_int(c, 2) < mix_int(c, 1)) {
        PyErr_Format(PyExc_ValueError, "gp: expected an integer >= g=%lld, got %lld", mix_int(c, 1), mix_int(c, 2));
        return -1;
    }
    return 0;
}
MIX_SIG_CUDA(act_quant, "int8 codes per token and group of g; group j at columns j*gp.., its scale at j*spg..", NULL,
             pre_act_quant, 6);
ENTRY(act_quant) {
    BEGIN(act_quant);
    mix_array *x = mix_arr(&c, 0), *q = mix_arr(&c, 3), *sc = mix_arr(&c, 4);
    const long long g = mix_int(&c, 1), gp = mix_int(&c, 2);
    const int spg = (int)mix_int(&c, 5);
    const int64_t M = x->shape[0], K = x->shape[1], G = mix_ngroups(K, g);
    if (mix_check_dim(q, 0, M) < 0 || mix_check_dim(sc, 0, M) < 0) return mix_call_fail(&c);
    const int64_t qpitch = q->shape[1], sapitch = sc->shape[1];
    if (qpitch < K || (gp != g && G > 0 && gp > qpitch / G)) /* qpitch < G * gp, without overflow */
        return mix_raise(&c, PyExc_ValueError, "q_out: rows of %lld codes are too short for K=%lld", (long long)qpitch,
                         (long long)K);
    if (G > 0 && spg > sapitch / G) /* sapitch < G * spg */
        return mix_raise(&c, PyExc_ValueError, "scale_out: rows of %lld scales are too short", (long long)sapitch);
    return cuda_finish(&c, mixc_act_quant(x->device_id, x->data, dtype_code(x->dtype), M, K, g, gp, q->data, qpitch,
                                          spg, sc->data, sapitch, stream_of(&c, 6)));
}

static const mix_arg A_pack_weight[] = {
    {.name = "qweight", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE, .dtypes = U8 | I8, .ndim = 2},
    MIX_IN("scale", F32, 2),
    {.name = "zero", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE | MIX_ARG_NONE_OK, .dtypes = U8, .ndim = 2},
    ARG_BITS,
    ARG_K,
    ARG_G,
    MIX_OUT("wpack_out", U8, 1),
    MIX_OUT("meta_out", U8, 1),
    ARG_STREAM};
static int pre_pack_weight(const mix_call *c) {
    return (check_bits_48(mix_int(c, 3)) < 0 || check_k_g(mix_int(c, 4), mix_int(c, 5)) < 0) ? -1 : 0;
}
MIX_SIG_CUDA(pack_weight, "Canonical quantized weight -> the GEMM layout (zero: 4-bit only).", NULL, pre_pack_weight,
             8);
ENTRY(pack_weight) {
    BEGIN(pack_weight);
    const int bits = (int)mix_int(&c, 3);
    const long long K = mix_int(&c, 4), g = mix_int(&c, 5);
    mix_array *q, *sc = mix_arr(&c, 1), *z = NULL, *w = mix_arr(&c, 6), *m = mix_arr(&c, 7);
    if (!(q = mix_call_take(&c, 0, bits == 4 ? U8 : I8))) return mix_call_fail(&c);
    const int64_t N = q->shape[0], G = mix_ngroups(K, g);
    if (check_layout(N, K, g, "qweight") < 0 || mix_check_dim(q, 1, bits == 4 ? (K + 1) / 2 : K) < 0 ||
        mix_check_shape2(sc, N, G) < 0)
        return mix_call_fail(&c);
    if (bits == 4) {
        if (mix_is_none(&c, 2)) return mix_raise(&c, PyExc_ValueError, "zero: required for 4-bit weights");
        if (!(z = mix_call_take(&c, 2, 0)) || mix_check_shape2(z, N, G) < 0) return mix_call_fail(&c);
    }
    if (mix_check_dim(w, 0, mixc_wpack_bytes(bits, N, K, g)) < 0 || mix_check_dim(m, 0, mixc_meta_bytes(N, K, g)) < 0 ||
        check_aligned16(w, m, "wpack_out, meta_out") < 0)
        return mix_call_fail(&c);
    return cuda_finish(&c, mixc_pack_weight(q->device_id, bits, q->data, sc->data, z ? z->data : NULL, N, K, g, w->data,
                                            m->data, stream_of(&c, 8)));
}

/* ---- geometry and planning ------------------------------------------------------------------------- */

static const mix_arg A_geometry[] = {ARG_K, ARG_G};
static int pre_geometry(const mix_call *c) { return check_k_g(mix_int(c, 0), mix_int(c, 1)); }
MIX_SIG_CUDA(geometry, "(G, gp, spg, Kp): groups, padded group, stages per group, padded K.", NULL, pre_geometry, -1);
ENTRY(geometry) {
    BEGIN(geometry);
    const long long K = mix_int(&c, 0), g = mix_int(&c, 1), gp = mixc_gp(g);
    mix_call_release(&c);
    return Py_BuildValue("LLLL", (long long)mix_ngroups(K, g), gp, gp / MIXC_KSTAGE, (long long)mixc_kp(K, g));
}

/* The sizes of pack_weight's outputs for an [N, K] weight (cuda/w4a8.cu computes them; Python
 * allocates from these, never recomputes them). */
static const mix_arg A_layout_bytes[] = {ARG_BITS, MIX_INT("N", LLONG_MIN, LLONG_MAX, NULL), ARG_K, ARG_G};
static int pre_layout_bytes(const mix_call *c) {
    return (check_bits_48(mix_int(c, 0)) < 0 || check_k_g(mix_int(c, 2), mix_int(c, 3)) < 0 ||
            check_layout(mix_int(c, 1), mix_int(c, 2), mix_int(c, 3), "N") < 0)
               ? -1
               : 0;
}
MIX_SIG_CUDA(layout_bytes, "(wpack_bytes, meta_bytes): the sizes of pack_weight's outputs.", NULL, pre_layout_bytes,
             -1);
ENTRY(layout_bytes) {
    BEGIN(layout_bytes);
    const int bits = (int)mix_int(&c, 0);
    const long long N = mix_int(&c, 1), K = mix_int(&c, 2), g = mix_int(&c, 3);
    mix_call_release(&c);
    return Py_BuildValue("LL", (long long)mixc_wpack_bytes(bits, N, K, g), (long long)mixc_meta_bytes(N, K, g));
}

static const mix_arg A_plan[] = {MIX_INT("device", INT_MIN, INT_MAX, NULL),
                                 MIX_INT("M", 0, MAX_ROWS, "expected an integer in [0, 1099511627776]"),
                                 MIX_OBJ("Ns"),
                                 MIX_INT("Kp", LLONG_MIN, LLONG_MAX, NULL),
                                 ARG_CFG,
                                 ARG_SPLITS};
MIX_SIG_CUDA(plan, "(cfg, splits, name): the tile configuration and split-K factor for M tokens (forced: >= 0 / > 0).",
             NULL, NULL, -1);
ENTRY(plan) {
    BEGIN(plan);
    const int device = (int)mix_int(&c, 0), cfg = (int)mix_int(&c, 4), splits = (int)mix_int(&c, 5);
    const long long M = mix_int(&c, 1), Kp = mix_int(&c, 3);
    PyObject *ons = mix_obj(&c, 2);
    mix_call_release(&c); /* nothing held: no arrays */
    if (!PyTuple_Check(ons))
        return PyErr_Format(PyExc_TypeError, "Ns: expected a tuple of row counts, got %.100s", Py_TYPE(ons)->tp_name);
    const Py_ssize_t np = PyTuple_GET_SIZE(ons);
    if (np < 1 || np > MIXC_MAX_PARTS) return PyErr_Format(PyExc_ValueError, "Ns: expected 1 or 2 parts, got %zd", np);
    int64_t Ns[MIXC_MAX_PARTS];
    for (Py_ssize_t i = 0; i < np; i++) {
        Ns[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ons, i));
        if (PyErr_Occurred()) return NULL;
    }
    if (Kp <= 0 || Kp % MIXC_KSTAGE || Kp > mixc_kp(MAX_K, 1))
        return PyErr_Format(PyExc_ValueError, "Kp: expected a positive multiple of %d (from geometry())", MIXC_KSTAGE);
    const int ndev = mixc_device_count(); /* (the planner queries the device: an invalid ordinal is a CUDA error) */
    if (device < 0 || device >= ndev)
        return PyErr_Format(PyExc_ValueError, "device: expected a CUDA device ordinal in [0, %d), got %d", ndev,
                            device);
    for (Py_ssize_t i = 0; i < np; i++)
        if (Ns[i] < 0 || Ns[i] > MAX_ROWS)
            return PyErr_Format(PyExc_ValueError, "Ns: expected row counts in [0, %lld]", MAX_ROWS);
    int cf, sp;
    if (mixc_plan(device, M, Ns, (int)np, Kp, cfg, splits, &cf, &sp) < 0)
        return PyErr_Format(PyExc_ValueError, "cfg: expected -1 (auto) or 0..%d, got %d", MIXC_NCFG - 1, cfg);
    return Py_BuildValue("iis", cf, sp, mixc_cfg_name(cf));
}

/* ---- prepared layers -------------------------------------------------------------------------------
 * A quantized layer is validated once: prepare() takes its packed parts, output indices and bias
 * through DLPack, checks them against each other and keeps the DLPack tensors (so their memory stays
 * alive) in a capsule. Each call then takes only x, y and a scratch buffer (raw DLPack capsules are
 * accepted: the cheap path of MixedLinear). */
#define HANDLE_NAME   "mixllm._cuda.qlinear_handle"
#define HANDLE_ARRAYS (MIXC_MAX_PARTS * 3 + 1) /* per part wpack, meta, out_index; the bias */
typedef struct {
    mix_array arr[HANDLE_ARRAYS];
    int narr;
    mixc_gemm tmpl; /* parts, bias, n_out, G, spg, Kp, pdl */
    int64_t K, g, Ns[MIXC_MAX_PARTS];
    int device;
} qhandle;

static void handle_release(qhandle *h) {
    for (int i = 0; i < h->narr; i++) mix_array_release(&h->arr[i]);
    PyMem_Free(h);
}
static void handle_free(PyObject *cap) {
    qhandle *h = PyCapsule_GetPointer(cap, HANDLE_NAME);
    if (!h) {
        PyErr_Clear();
        return;
    }
    handle_release(h);
}
static qhandle *get_handle(PyObject *o) {
    qhandle *h = PyCapsule_CheckExact(o) ? PyCapsule_GetPointer(o, HANDLE_NAME) : NULL;
    if (!h) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "handle: expected a layer handle from mixllm._cuda.prepare()");
    }
    return h;
}
/* prechecks of the entry points taking a handle (argument 0): before any array is taken */
static int pre_handle(const mix_call *c) { return get_handle(mix_obj(c, 0)) ? 0 : -1; }

#define PARTS_MSG "parts: expected a list of 1 or 2 (wpack, meta, bits, N, out_index) tuples"
static const mix_arg A_prepare[] = {
    MIX_OBJ("parts"),
    {.name = "bias", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE | MIX_ARG_NONE_OK, .dtypes = F32, .ndim = 1},
    ARG_K,
    ARG_G,
    ARG_STREAM,
    /* 0: launch the GEMM without programmatic dependent launch (for comparisons) */
    {.name = "pdl", .kind = MIX_ARG_BOOL, .flags = MIX_ARG_DEFAULT, .dflt = 1},
};
static int pre_prepare(const mix_call *c) {
    PyObject *parts = mix_obj(c, 0);
    if (!PyList_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, PARTS_MSG);
        return -1;
    }
    return check_k_g(mix_int(c, 2), mix_int(c, 3));
}
MIX_SIG_CUDA(prepare, "A validated W4A8 / W8A8 / mixed layer: a handle for plan_call() and run().", NULL, pre_prepare,
             4);
ENTRY(prepare) {
    BEGIN(prepare);
    const long long K = mix_int(&c, 2), g = mix_int(&c, 3);
    /* A producer's __dlpack__ may mutate the list while we walk it: walk a snapshot that holds
     * references to the part tuples (and through them to the objects borrowed below). */
    PyObject *snap = PyList_AsTuple(mix_obj(&c, 0));
    if (!snap || mix_call_keep(&c, snap) < 0) return mix_call_fail(&c);
    const Py_ssize_t np = PyTuple_GET_SIZE(snap);
    if (np < 1 || np > MIXC_MAX_PARTS) return mix_raise(&c, PyExc_ValueError, PARTS_MSG);
    qhandle *h = PyMem_Calloc(1, sizeof *h);
    if (!h) {
        mix_call_release(&c);
        return PyErr_NoMemory();
    }
    const int64_t gp = mixc_gp(g);
    int64_t nsum = 0;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *t = PyTuple_GET_ITEM(snap, i), *ow, *om, *oidx;
        int bits;
        long long N;
        if (!PyTuple_Check(t) || !PyArg_ParseTuple(t, "OOiLO", &ow, &om, &bits, &N, &oidx)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "parts: each part must be a (wpack, meta, bits, N, out_index) tuple");
            goto fail;
        }
        if (bits != 4 && bits != 8) {
            PyErr_SetString(PyExc_ValueError, "parts: bits must be 4 or 8");
            goto fail;
        }
        if (check_layout(N, K, g, "parts") < 0) goto fail;
        mix_array *w = mix_call_take_nested(&c, ow, "wpack", U8, 1, 0), *m;
        if (!w || mix_check_dim(w, 0, mixc_wpack_bytes(bits, N, K, g)) < 0) goto fail;
        if (!(m = mix_call_take_nested(&c, om, "meta", U8, 1, 0)) ||
            mix_check_dim(m, 0, mixc_meta_bytes(N, K, g)) < 0 || check_aligned16(w, m, "wpack, meta") < 0)
            goto fail;
        mixc_part *p = &h->tmpl.parts[i];
        p->wpack = w->data;
        p->meta = m->data;
        p->N = N;
        p->bits = bits;
        if (oidx != Py_None) {
            mix_array *idx = mix_call_take_nested(&c, oidx, "out_index", I64, 1, 0);
            if (!idx || mix_check_dim(idx, 0, N) < 0) goto fail;
            p->out_index = idx->data;
        } else if (np != 1) {
            PyErr_SetString(PyExc_ValueError, "parts: out_index is required unless one part covers all outputs");
            goto fail;
        }
        h->Ns[i] = N;
        nsum += N;
    }
    h->tmpl.nparts = (int)np;
    h->tmpl.n_out = nsum;
    mix_array *b = mix_call_take(&c, 1, 0);
    if (b && mix_check_dim(b, 0, nsum) < 0) goto fail;
    if (!b && !mix_is_none(&c, 1)) goto fail;
    if (b) h->tmpl.bias = b->data;
    h->device = c.held[0].device_id;
    h->tmpl.Kp = mixc_kp(K, g);
    h->tmpl.G = (int)mix_ngroups(K, g);
    h->tmpl.spg = (int)(gp / MIXC_KSTAGE);
    h->tmpl.pdl = (int)mix_int(&c, 5);
    h->K = K;
    h->g = g;
    /* the handle takes over the arrays the call holds (at most 2 parts x 3 + bias) */
    memcpy(h->arr, c.held, sizeof(mix_array) * c.nheld);
    h->narr = c.nheld;
    c.nheld = 0;
    mix_call_release(&c);
    PyObject *cap = PyCapsule_New(h, HANDLE_NAME, handle_free);
    if (!cap) handle_release(h);
    return cap;
fail:
    PyMem_Free(h);
    return mix_call_fail(&c);
}

static int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

/* The one scratch buffer of a call: activation codes [M, Kp] | their scales [M, Kp/128] |
 * split-K partials [splits, M, n_out] (when splits > 1), each 16-byte aligned. Returns its
 * bytes; *sa_off / *ws_off: where the scales / partials start. */
/* The split-K factor the workspace is sized for: the decode kernel reduces its splits in its blocks. */
static int ws_splits(int cfg, int splits) { return cfg == MIXC_CFG_DECODE ? 1 : splits; }
static int64_t scratch_layout(const qhandle *h, int64_t M, int splits, int64_t *sa_off, int64_t *ws_off) {
    const int64_t Kp = h->tmpl.Kp;
    int64_t codes, scales, partials = 0;
    if (M < 0 || __builtin_mul_overflow(M, Kp, &codes) || codes > MAX_BYTES ||
        __builtin_mul_overflow(M, (Kp / MIXC_KSTAGE) * 4, &scales) || scales > MAX_BYTES ||
        (splits > 1 && (__builtin_mul_overflow(M, h->tmpl.n_out * 4, &partials) ||
                        __builtin_mul_overflow(partials, (int64_t)splits, &partials) || partials > MAX_BYTES)))
        return -1; /* (a caller's M far beyond any memory) */
    *sa_off = align16(codes);
    *ws_off = *sa_off + align16(scales);
    return *ws_off + partials;
}

/* Checks a (cfg, splits) choice for M tokens; fills the planner's choice for cfg < 0 /
 * splits <= 0 (a forced split-K factor above the stages of K is clamped). Returns 0 or -1
 * with ValueError. */
static int resolve_plan(const qhandle *h, int64_t M, int *cfg, int *splits) {
    int c, sp;
    if (*cfg >= MIXC_NCFG ||
        mixc_plan(h->device, M > 0 ? M : 1, h->Ns, h->tmpl.nparts, h->tmpl.Kp, *cfg, *splits, &c, &sp) < 0) {
        PyErr_Format(PyExc_ValueError, "cfg: expected -1 (auto) or 0..%d, got %d", MIXC_NCFG - 1, *cfg);
        return -1;
    }
    *cfg = c;
    *splits = sp;
    return 0;
}

static const mix_arg A_plan_call[] = {MIX_OBJ("handle"), MIX_INT("M", 0, LLONG_MAX, "expected >= 0"), ARG_CFG,
                                      ARG_SPLITS};
MIX_SIG_CUDA(plan_call, "(cfg, splits, scratch_bytes, name) of a call of the layer on M tokens.", NULL, pre_handle, -1);
ENTRY(plan_call) {
    BEGIN(plan_call);
    const qhandle *h = get_handle(mix_obj(&c, 0));
    const long long M = mix_int(&c, 1);
    int cfg = (int)mix_int(&c, 2), splits = (int)mix_int(&c, 3);
    mix_call_release(&c); /* nothing held; the caller holds the handle */
    if (!h || resolve_plan(h, M, &cfg, &splits) < 0) return NULL;
    int64_t sa_off, ws_off;
    const int64_t nbytes = scratch_layout(h, M, ws_splits(cfg, splits), &sa_off, &ws_off);
    if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "M: %lld tokens need more scratch than can be addressed", M);
    return Py_BuildValue("iiLs", cfg, splits, (long long)nbytes, mixc_cfg_name(cfg));
}

/* run's arguments; run_silu_mul's, with gu for x */
#define RUN_ARGS(X)                                                           \
    MIX_OBJ("handle"), MIX_IN(X, MIX_FLOATS, 2), MIX_OUT("y", MIX_FLOATS, 2), \
        {.name = "scratch",                                                   \
         .kind = MIX_ARG_ARRAY,                                               \
         .flags = MIX_ARG_OUTPUT | MIX_ARG_LATE | MIX_ARG_NONE_OK,            \
         .dtypes = U8,                                                        \
         .ndim = 1},                                                          \
        MIX_INT("cfg", 0, INT_MAX, "pass the value plan_call() returned"),    \
        MIX_INT("splits", 1, INT_MAX, "pass the value plan_call() returned"), ARG_STREAM
static const mix_arg A_run[] = {RUN_ARGS("x")};
static const mix_arg A_run_silu_mul[] = {RUN_ARGS("gu")};
static const mix_arg A_run_rmsnorm[] = {RUN_ARGS("x"), MIX_IN("w", MIX_FLOATS, 1), MIX_FLOAT("eps")};
MIX_SIG_CUDA(run, "y = x W^T + bias with the (cfg, splits, scratch) of plan_call().", NULL, pre_handle, 6);
MIX_SIG_CUDA(run_silu_mul,
             "y = (silu(gu[:, :K]) * gu[:, K:]) W^T + bias (the down projection of a gated MLP, the product never "
             "stored: its int8 codes come from gu), with the (cfg, splits, scratch) of plan_call().",
             NULL, pre_handle, 6);
MIX_SIG_CUDA(run_rmsnorm,
             "y = rmsnorm(x, w, eps) W^T + bias (a projection fed by a Llama-style RMSNorm of weight w, the "
             "normalized x never stored: its int8 codes come from x), with the (cfg, splits, scratch) of plan_call().",
             NULL, pre_handle, 6);
enum { RUN_PLAIN, RUN_SILU_MUL, RUN_RMSNORM };
/* run, run_silu_mul and run_rmsnorm: x is [M, K] (mixc_act_quant; with mode RUN_RMSNORM,
 * mixc_act_quant_rmsnorm), or gu [M, 2K] (mixc_act_quant_silu_mul) */
static PyObject *run_gemm(mix_call *c, int mode) {
    const int silu_mul = mode == RUN_SILU_MUL;
    const qhandle *h = get_handle(mix_obj(c, 0));
    if (!h) return mix_call_fail(c);
    mix_array *x = mix_arr(c, 1), *y = mix_arr(c, 2);
    int cfg = (int)mix_int(c, 4), splits = (int)mix_int(c, 5);
    if (x->device_id != h->device)
        return mix_raise(c, PyExc_ValueError, "%s: on CUDA device %d, the layer's weights on %d", silu_mul ? "gu" : "x",
                         x->device_id, h->device);
    if (silu_mul && !mixc_act_quant_silu_mul_ok(h->K, h->g))
        return mix_raise(c, PyExc_ValueError,
                         "gu: the fused SiLU-mul takes layers of group size 128 and K a multiple of 8, got g=%lld, "
                         "K=%lld",
                         (long long)h->g, (long long)h->K);
    if (silu_mul && (uintptr_t)x->data % 16)
        return mix_raise(c, PyExc_ValueError, "gu: must be 16-byte aligned (a contiguous copy is)");
    mix_array *nw = mode == RUN_RMSNORM ? mix_arr(c, 7) : NULL;
    if (mode == RUN_RMSNORM) {
        if (!mixc_act_quant_rmsnorm_ok(h->K, h->g))
            return mix_raise(c, PyExc_ValueError,
                             "x: the fused RMSNorm takes layers of group size 128, K a multiple of 8 and at most "
                             "32768, got g=%lld, K=%lld",
                             (long long)h->g, (long long)h->K);
        if ((uintptr_t)x->data % 16) return mix_raise(c, PyExc_ValueError, "x: must be 16-byte aligned");
        if (nw->dtype != x->dtype) return mix_raise(c, PyExc_TypeError, "w: expected the dtype of x");
        if (nw->device_id != h->device)
            return mix_raise(c, PyExc_ValueError, "w: on CUDA device %d, the layer's weights on %d", nw->device_id,
                             h->device);
        if (mix_check_dim(nw, 0, h->K) < 0) return mix_call_fail(c);
        if ((uintptr_t)nw->data % 16) return mix_raise(c, PyExc_ValueError, "w: must be 16-byte aligned");
        const double eps = mix_float(c, 8);
        if (!(eps >= 0.0 && eps <= 1.0)) return mix_raise(c, PyExc_ValueError, "eps: expected a float in [0, 1]");
    }
    const int64_t M = x->shape[0];
    if (mix_check_dim(x, 1, silu_mul ? 2 * h->K : h->K) < 0 || mix_check_shape2(y, M, h->tmpl.n_out) < 0 ||
        resolve_plan(h, M, &cfg, &splits) < 0)
        return mix_call_fail(c);
    int64_t sa_off, ws_off;
    const int64_t need = scratch_layout(h, M, ws_splits(cfg, splits), &sa_off, &ws_off);
    if (need < 0) return mix_raise(c, PyExc_ValueError, "x: too many tokens for one call");
    uint8_t *base = NULL;
    if (need > 0) {
        if (mix_is_none(c, 3)) return mix_raise(c, PyExc_ValueError, "scratch: %lld bytes are needed", (long long)need);
        mix_array *sc = mix_call_take(c, 3, 0);
        if (!sc) return mix_call_fail(c);
        if (sc->numel < need)
            return mix_raise(c, PyExc_ValueError, "scratch: expected at least %lld bytes, got %lld", (long long)need,
                             (long long)sc->numel);
        if ((uintptr_t)sc->data % 16) return mix_raise(c, PyExc_ValueError, "scratch: must be 16-byte aligned");
        base = sc->data;
    }
    if (M == 0) return cuda_finish(c, 0);
    mixc_gemm G = h->tmpl;
    const int64_t Kp = G.Kp;
    void *stream = stream_of(c, 6);
    G.M = M;
    G.y = y->data;
    G.ydtype = dtype_code(y->dtype);
    G.cfg = cfg;
    G.splits = splits;
    G.xq = (const int8_t *)base;
    G.sa = (const float *)(base + sa_off);
    G.ws = ws_splits(cfg, splits) > 1 ? (float *)(base + ws_off) : NULL;
    int err;
    if (mode == RUN_SILU_MUL)
        err = mixc_act_quant_silu_mul(h->device, x->data, dtype_code(x->dtype), M, h->K, h->g, mixc_gp(h->g),
                                      (int8_t *)G.xq, Kp, G.spg, (float *)G.sa, Kp / MIXC_KSTAGE, stream);
    else if (mode == RUN_RMSNORM)
        err = mixc_act_quant_rmsnorm(h->device, x->data, nw->data, (float)mix_float(c, 8), dtype_code(x->dtype), M,
                                     h->K, h->g, mixc_gp(h->g), (int8_t *)G.xq, Kp, G.spg, (float *)G.sa,
                                     Kp / MIXC_KSTAGE, stream);
    else
        err = mixc_act_quant(h->device, x->data, dtype_code(x->dtype), M, h->K, h->g, mixc_gp(h->g), (int8_t *)G.xq, Kp,
                             G.spg, (float *)G.sa, Kp / MIXC_KSTAGE, stream);
    if (!err) err = mixc_qlinear(h->device, &G, stream);
    return cuda_finish(c, err);
}
ENTRY(run) {
    BEGIN(run);
    return run_gemm(&c, RUN_PLAIN);
}
ENTRY(run_silu_mul) {
    BEGIN(run_silu_mul);
    return run_gemm(&c, RUN_SILU_MUL);
}
ENTRY(run_rmsnorm) {
    BEGIN(run_rmsnorm);
    return run_gemm(&c, RUN_RMSNORM);
}

/* ---- the module ------------------------------------------------------------------------------------ */

#define E(x) {&S_##x, py_##x}
static const mix_entry ENTRIES[] = {
    E(act_quant), E(pack_weight), E(geometry), E(layout_bytes), E(plan),
    E(prepare),   E(plan_call),   E(run),      E(run_silu_mul), E(run_rmsnorm),
};
#define NENTRIES MIX_NARGS(ENTRIES)
static PyMethodDef methods[NENTRIES + 1];
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "mixllm._cuda",
                                       "CUDA kernels of mixllm (use mixllm.ops / mixllm.cuda_ops)", -1, methods};

PyMODINIT_FUNC PyInit__cuda(void) {
    if (!methods[0].ml_name && mix_module_methods(ENTRIES, NENTRIES, methods) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m &&
        (mix_module_add_signatures(m, ENTRIES, NENTRIES) < 0 || PyModule_AddIntConstant(m, "NCFG", MIXC_NCFG) < 0 ||
         PyModule_AddIntConstant(m, "KSTAGE", MIXC_KSTAGE) < 0))
        Py_CLEAR(m);
    return m;
}
