/* mixllm._cuda: CPython entry points of the CUDA kernels (the .cu files in cuda/). Like mixllm._C, each
 * parses its arguments, takes its arrays through the DLPack bridge (CUDA arrays only, all on
 * one device), checks shapes against each other and calls an extern "C" launcher
 * (cuda/mixllm_cuda.h) that enqueues work on the caller's stream and returns at once.
 * Outputs and workspaces are allocated by mixllm/cuda_ops.py and passed in.
 *
 * Streams: every op takes the caller's stream handle (torch.cuda.current_stream().cuda_stream).
 * The same value goes to __dlpack__(stream=...) so that a producer working on another stream
 * orders itself before us; 0 (the legacy default stream) is passed to DLPack as 1, which is
 * how the DLPack protocol names that stream. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "../cuda/mixllm_cuda.h"
#include <string.h>

#define MAX_ARRAYS 16
typedef struct { mix_array a[MAX_ARRAYS]; int n; long long stream; } arrset;

static void arrset_release(arrset *s) { for (int i = 0; i < s->n; i++) mix_array_release(&s->a[i]); s->n = 0; }

/* Take a CUDA array; all arrays of one call must be on the device of the first. */
static mix_array *take(arrset *s, PyObject *o, const char *name, unsigned dt, int ndim, int writable) {
    if (s->n >= MAX_ARRAYS) { PyErr_SetString(PyExc_RuntimeError, "too many arrays"); return NULL; }
    mix_array *a = &s->a[s->n];
    if (mix_array_get(o, name, dt, ndim, MIX_ON_CUDA, writable, s->stream == 0 ? 1 : s->stream, a) < 0) return NULL;
    s->n++;
    if (s->n > 1 && mix_check_same_device(&s->a[0], a) < 0) return NULL;
    return a;
}

static int check_shape2(mix_array *a, int64_t r, int64_t c) {
    return (mix_check_dim(a, 0, r) < 0 || mix_check_dim(a, 1, c) < 0) ? -1 : 0;
}

static int check_size(mix_array *a, int64_t numel) {
    if (a->numel != numel) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld elements, got %lld", a->name, (long long)numel,
                     (long long)a->numel);
        return -1;
    }
    return 0;
}

static PyObject *cuda_fail(int err, const char *what) {
    PyErr_Format(PyExc_RuntimeError, "%s: CUDA error %d (%s)", what, err, mixc_error_string(err));
    return NULL;
}

static int dtype_code(mix_dtype d) { return d == MIX_F32 ? 0 : d == MIX_F16 ? 1 : 2; }

static int check_group(long long g) {
    if (g <= 0) { PyErr_Format(PyExc_ValueError, "group_size: expected a positive integer, got %lld", g); return -1; }
    return 0;
}

/* ceil(a / b) for a >= 0, b > 0 without the overflow of (a + b - 1) / b. */
static int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

/* K and g of a weight layout: 1 <= g <= K (callers pass min(group_size, K)) and K small enough
 * that the padded sizes (mixc_kp, mixc_wpack_bytes) and the GEMM's int group count cannot overflow. */
#define MAX_K 0x7fffff80LL
#define MAX_ROWS (1LL << 40)
#define MAX_BYTES (1LL << 56) /* any one buffer of a call */

/* The packed layout of an [N, K] part fits MAX_BYTES (so mixc_wpack_bytes cannot overflow). */
static int check_layout(int64_t N, int64_t K, int64_t g, const char *name) {
    const int64_t Kp = mixc_kp(K, g), rows = (N + 15) / 16 * 16;
    if (N < 0 || N > MAX_ROWS || (rows > 0 && Kp > MAX_BYTES / rows)) {
        PyErr_Format(PyExc_ValueError, "%s: a %lld x %lld layer is too large", name, (long long)N, (long long)K);
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

/* act_quant(x, g, gp, q_out, scale_out, spg, stream) */
static PyObject *py_act_quant(PyObject *self, PyObject *args) {
    PyObject *ox, *oq, *os;
    long long g, gp, stream;
    int spg;
    if (!PyArg_ParseTuple(args, "OLLOOiL", &ox, &g, &gp, &oq, &os, &spg, &stream)) return NULL;
    if (check_group(g) < 0) return NULL;
    if (gp < g || spg < 1) return PyErr_Format(PyExc_ValueError, "gp, spg: expected gp >= g and spg >= 1");
    arrset s = {.n = 0, .stream = stream};
    mix_array *x, *q, *sc;
    if (!(x = take(&s, ox, "x", MIX_FLOATS, 2, 0))) goto fail;
    int64_t M = x->shape[0], K = x->shape[1], G = ceil_div(K, g);
    if (!(q = take(&s, oq, "q_out", MIX_DT(MIX_I8), 2, 1)) || mix_check_dim(q, 0, M) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || mix_check_dim(sc, 0, M) < 0) goto fail;
    int64_t qpitch = q->shape[1], sapitch = sc->shape[1];
    if (qpitch < K || (gp != g && G > 0 && gp > qpitch / G)) { /* qpitch < G * gp, without overflow */
        PyErr_Format(PyExc_ValueError, "q_out: rows of %lld codes are too short for K=%lld", (long long)qpitch, (long long)K);
        goto fail;
    }
    if (G > 0 && spg > sapitch / G) { /* sapitch < G * spg */
        PyErr_Format(PyExc_ValueError, "scale_out: rows of %lld scales are too short", (long long)sapitch);
        goto fail;
    }
    int err = mixc_act_quant(x->device_id, x->data, dtype_code(x->dtype), M, K, g, gp, q->data, qpitch, spg,
                             sc->data, sapitch, (void *)(intptr_t)stream);
    arrset_release(&s);
    if (err) return cuda_fail(err, "quantize_activation");
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

/* pack_weight(qweight, scale, zero|None, bits, K, g, wpack_out, meta_out, stream) */
static PyObject *py_pack_weight(PyObject *self, PyObject *args) {
    PyObject *oq, *os, *oz, *ow, *om;
    int bits;
    long long K, g, stream;
    if (!PyArg_ParseTuple(args, "OOOiLLOOL", &oq, &os, &oz, &bits, &K, &g, &ow, &om, &stream)) return NULL;
    if (bits != 4 && bits != 8) return PyErr_Format(PyExc_ValueError, "bits: expected 4 or 8, got %d", bits);
    if (check_k_g(K, g) < 0) return NULL;
    arrset s = {.n = 0, .stream = stream};
    mix_array *q, *sc, *z = NULL, *w, *m;
    if (!(q = take(&s, oq, "qweight", MIX_DT(bits == 4 ? MIX_U8 : MIX_I8), 2, 0))) goto fail;
    int64_t N = q->shape[0], G = ceil_div(K, g);
    if (check_layout(N, K, g, "qweight") < 0) goto fail;
    if (mix_check_dim(q, 1, bits == 4 ? (K + 1) / 2 : K) < 0) goto fail;
    if (!(sc = take(&s, os, "scale", MIX_DT(MIX_F32), 2, 0)) || check_shape2(sc, N, G) < 0) goto fail;
    if (bits == 4) {
        if (oz == Py_None) { PyErr_SetString(PyExc_ValueError, "zero: required for 4-bit weights"); goto fail; }
        if (!(z = take(&s, oz, "zero", MIX_DT(MIX_U8), 2, 0)) || check_shape2(z, N, G) < 0) goto fail;
    }
    if (!(w = take(&s, ow, "wpack_out", MIX_DT(MIX_U8), 1, 1)) || check_size(w, mixc_wpack_bytes(bits, N, K, g)) < 0) goto fail;
    if (!(m = take(&s, om, "meta_out", MIX_DT(MIX_U8), 1, 1)) || check_size(m, mixc_meta_bytes(N, K, g)) < 0) goto fail;
    if (((uintptr_t)w->data | (uintptr_t)m->data) % 16) {
        PyErr_SetString(PyExc_ValueError, "wpack_out, meta_out: must be 16-byte aligned");
        goto fail;
    }
    int err = mixc_pack_weight(q->device_id, bits, q->data, sc->data, z ? z->data : NULL, N, K, g, w->data, m->data,
                               (void *)(intptr_t)stream);
    arrset_release(&s);
    if (err) return cuda_fail(err, "pack_weight");
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

/* geometry(K, g) -> (G, gp, spg, Kp) */
static PyObject *py_geometry(PyObject *self, PyObject *args) {
    long long K, g;
    if (!PyArg_ParseTuple(args, "LL", &K, &g)) return NULL;
    if (check_k_g(K, g) < 0) return NULL;
    long long gp = mixc_gp(g);
    return Py_BuildValue("LLLL", (long long)ceil_div(K, g), gp, gp / MIXC_KSTAGE, (long long)mixc_kp(K, g));
}

/* layout_bytes(bits, N, K, g) -> (wpack_bytes, meta_bytes): the sizes of pack_weight's outputs for an
 * [N, K] weight (cuda/w4a8.cu computes them; Python allocates from these, never recomputes them). */
static PyObject *py_layout_bytes(PyObject *self, PyObject *args) {
    int bits;
    long long N, K, g;
    if (!PyArg_ParseTuple(args, "iLLL", &bits, &N, &K, &g)) return NULL;
    if (bits != 4 && bits != 8) return PyErr_Format(PyExc_ValueError, "bits: expected 4 or 8, got %d", bits);
    if (check_k_g(K, g) < 0 || check_layout(N, K, g, "N") < 0) return NULL;
    return Py_BuildValue("LL", (long long)mixc_wpack_bytes(bits, N, K, g), (long long)mixc_meta_bytes(N, K, g));
}

/* plan(device, M, (N, ...), Kp, cfg, splits) -> (cfg, splits, cfg_name) */
static PyObject *py_plan(PyObject *self, PyObject *args) {
    int device, cfg, splits;
    long long M, Kp;
    PyObject *ons;
    if (!PyArg_ParseTuple(args, "iLO!Lii", &device, &M, &PyTuple_Type, &ons, &Kp, &cfg, &splits)) return NULL;
    Py_ssize_t np = PyTuple_GET_SIZE(ons);
    if (np < 1 || np > MIXC_MAX_PARTS) return PyErr_Format(PyExc_ValueError, "parts: expected 1 or 2, got %zd", np);
    int64_t Ns[MIXC_MAX_PARTS];
    for (Py_ssize_t i = 0; i < np; i++) {
        Ns[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ons, i));
        if (PyErr_Occurred()) return NULL;
    }
    if (Kp <= 0 || Kp % MIXC_KSTAGE || Kp > mixc_kp(MAX_K, 1))
        return PyErr_Format(PyExc_ValueError, "Kp: expected a positive multiple of %d (from geometry())", MIXC_KSTAGE);
    if (M < 0 || M > MAX_ROWS) return PyErr_Format(PyExc_ValueError, "M: expected an integer in [0, %lld], got %lld", MAX_ROWS, M);
    const int ndev = mixc_device_count(); /* (the planner queries the device: an invalid ordinal is a CUDA error) */
    if (device < 0 || device >= ndev)
        return PyErr_Format(PyExc_ValueError, "device: expected a CUDA device ordinal in [0, %d), got %d", ndev, device);
    for (Py_ssize_t i = 0; i < np; i++)
        if (Ns[i] < 0 || Ns[i] > MAX_ROWS)
            return PyErr_Format(PyExc_ValueError, "Ns: expected row counts in [0, %lld]", MAX_ROWS);
    int c, sp;
    if (mixc_plan(device, M, Ns, (int)np, Kp, cfg, splits, &c, &sp) < 0)
        return PyErr_Format(PyExc_ValueError, "cfg: expected -1 (auto) or 0..%d, got %d", MIXC_NCFG - 1, cfg);
    return Py_BuildValue("iis", c, sp, mixc_cfg_name(c));
}

/* ---------------------------------------------------------------- prepared layers
 * A quantized layer is validated once: prepare() takes its packed parts, output indices and
 * bias through DLPack, checks them against each other and keeps the DLPack tensors (so their
 * memory stays alive) in a capsule. Each call then takes only x, y and a scratch buffer (raw
 * DLPack capsules are accepted: the cheap path of MixedLinear). */
#define HANDLE_NAME "mixllm._cuda.qlinear_handle"
typedef struct {
    mix_array arr[MIXC_MAX_PARTS * 3 + 1];
    int narr;
    mixc_gemm tmpl; /* parts, bias, n_out, G, spg, Kp, pdl */
    int64_t K, g, Ns[MIXC_MAX_PARTS];
    int device;
} qhandle;

static void handle_free(PyObject *cap) {
    qhandle *h = PyCapsule_GetPointer(cap, HANDLE_NAME);
    if (!h) { PyErr_Clear(); return; }
    for (int i = 0; i < h->narr; i++) mix_array_release(&h->arr[i]);
    PyMem_Free(h);
}

static qhandle *get_handle(PyObject *o) {
    qhandle *h = PyCapsule_CheckExact(o) ? PyCapsule_GetPointer(o, HANDLE_NAME) : NULL;
    if (!h) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "handle: expected a layer handle from mixllm._cuda.prepare()");
    }
    return h;
}

/* prepare(parts, bias|None, K, g, stream, pdl=1) -> handle
 * parts: list of (wpack, meta, bits, N, out_index|None); pdl=0 launches the GEMM without
 * programmatic dependent launch (for comparisons). */
static PyObject *py_prepare(PyObject *self, PyObject *args) {
    PyObject *oparts, *obias;
    long long K, g, stream;
    int pdl = 1;
    if (!PyArg_ParseTuple(args, "O!OLLL|p", &PyList_Type, &oparts, &obias, &K, &g, &stream, &pdl)) return NULL;
    if (check_k_g(K, g) < 0) return NULL;
    Py_ssize_t np = PyList_GET_SIZE(oparts);
    if (np < 1 || np > MIXC_MAX_PARTS)
        return PyErr_Format(PyExc_ValueError, "parts: expected a list of 1 or 2 (wpack, meta, bits, N, out_index) tuples");
    qhandle *h = PyMem_Calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    arrset s = {.n = 0, .stream = stream};
    const int64_t gp = mixc_gp(g), Kp = mixc_kp(K, g), Gn = ceil_div(K, g);
    int64_t nsum = 0;
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *t = PyList_GET_ITEM(oparts, i), *ow, *om, *oidx;
        int bits;
        long long N;
        if (!PyTuple_Check(t) || !PyArg_ParseTuple(t, "OOiLO", &ow, &om, &bits, &N, &oidx)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "parts: each part must be a (wpack, meta, bits, N, out_index) tuple");
            goto fail;
        }
        if (bits != 4 && bits != 8) { PyErr_SetString(PyExc_ValueError, "parts: bits must be 4 or 8"); goto fail; }
        if (check_layout(N, K, g, "parts") < 0) goto fail;
        mix_array *w, *m;
        if (!(w = take(&s, ow, "wpack", MIX_DT(MIX_U8), 1, 0)) || check_size(w, mixc_wpack_bytes(bits, N, K, g)) < 0) goto fail;
        if (!(m = take(&s, om, "meta", MIX_DT(MIX_U8), 1, 0)) || check_size(m, mixc_meta_bytes(N, K, g)) < 0) goto fail;
        if (((uintptr_t)w->data | (uintptr_t)m->data) % 16) {
            PyErr_SetString(PyExc_ValueError, "wpack, meta: must be 16-byte aligned");
            goto fail;
        }
        mixc_part *p = &h->tmpl.parts[i];
        p->wpack = w->data;
        p->meta = m->data;
        p->N = N;
        p->bits = bits;
        if (oidx != Py_None) {
            mix_array *idx = take(&s, oidx, "out_index", MIX_DT(MIX_I64), 1, 0);
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
    if (obias != Py_None) {
        mix_array *b = take(&s, obias, "bias", MIX_DT(MIX_F32), 1, 0);
        if (!b || mix_check_dim(b, 0, nsum) < 0) goto fail;
        h->tmpl.bias = b->data;
    }
    if (s.n == 0) { PyErr_SetString(PyExc_ValueError, "parts: no arrays"); goto fail; }
    h->device = s.a[0].device_id;
    h->tmpl.Kp = Kp;
    h->tmpl.G = (int)Gn;
    h->tmpl.spg = (int)(gp / MIXC_KSTAGE);
    h->tmpl.pdl = pdl;
    h->K = K;
    h->g = g;
    memcpy(h->arr, s.a, sizeof(mix_array) * s.n);
    h->narr = s.n;
    PyObject *cap = PyCapsule_New(h, HANDLE_NAME, handle_free);
    if (!cap) {
        for (int i = 0; i < h->narr; i++) mix_array_release(&h->arr[i]);
        PyMem_Free(h);
    }
    return cap;
fail:
    arrset_release(&s);
    PyMem_Free(h);
    return NULL;
}

static int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

/* The one scratch buffer of a call: activation codes [M, Kp] | their scales [M, Kp/128] |
 * split-K partials [splits, M, n_out] (when splits > 1), each 16-byte aligned. Returns its
 * bytes; *sa_off / *ws_off: where the scales / partials start. */
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

/* plan_call(handle, M, cfg, splits) -> (cfg, splits, scratch_bytes, cfg_name) */
static PyObject *py_plan_call(PyObject *self, PyObject *args) {
    PyObject *oh;
    long long M;
    int cfg, splits;
    if (!PyArg_ParseTuple(args, "OLii", &oh, &M, &cfg, &splits)) return NULL;
    qhandle *h = get_handle(oh);
    if (!h) return NULL;
    if (M < 0) return PyErr_Format(PyExc_ValueError, "M: expected >= 0, got %lld", M);
    if (resolve_plan(h, M, &cfg, &splits) < 0) return NULL;
    int64_t sa_off, ws_off;
    const int64_t nbytes = scratch_layout(h, M, splits, &sa_off, &ws_off);
    if (nbytes < 0) return PyErr_Format(PyExc_ValueError, "M: %lld tokens need more scratch than can be addressed", M);
    return Py_BuildValue("iiLs", cfg, splits, (long long)nbytes, mixc_cfg_name(cfg));
}

/* run(handle, x, y, scratch, cfg, splits, stream): y = x W^T + bias. */
static PyObject *py_run(PyObject *self, PyObject *args) {
    PyObject *oh, *ox, *oy, *osc;
    int cfg, splits;
    long long stream;
    if (!PyArg_ParseTuple(args, "OOOOiiL", &oh, &ox, &oy, &osc, &cfg, &splits, &stream)) return NULL;
    qhandle *h = get_handle(oh);
    if (!h) return NULL;
    arrset s = {.n = 0, .stream = stream};
    mix_array *x, *y, *sc = NULL;
    if (!(x = take(&s, ox, "x", MIX_FLOATS, 2, 0))) goto fail;
    if (x->device_id != h->device) {
        PyErr_Format(PyExc_ValueError, "x: on CUDA device %d, the layer's weights on %d", x->device_id, h->device);
        goto fail;
    }
    const int64_t M = x->shape[0];
    if (mix_check_dim(x, 1, h->K) < 0) goto fail;
    if (!(y = take(&s, oy, "y", MIX_FLOATS, 2, 1)) || check_shape2(y, M, h->tmpl.n_out) < 0) goto fail;
    if (cfg < 0 || splits < 1) {
        PyErr_SetString(PyExc_ValueError, "cfg, splits: pass the values plan_call() returned");
        goto fail;
    }
    if (resolve_plan(h, M, &cfg, &splits) < 0) goto fail;
    int64_t sa_off, ws_off;
    const int64_t need = scratch_layout(h, M, splits, &sa_off, &ws_off);
    if (need < 0) { PyErr_SetString(PyExc_ValueError, "x: too many tokens for one call"); goto fail; }
    uint8_t *base = NULL;
    if (need > 0) {
        if (osc == Py_None) { PyErr_Format(PyExc_ValueError, "scratch: %lld bytes are needed", (long long)need); goto fail; }
        if (!(sc = take(&s, osc, "scratch", MIX_DT(MIX_U8), 1, 1))) goto fail;
        if (sc->numel < need) {
            PyErr_Format(PyExc_ValueError, "scratch: expected at least %lld bytes, got %lld", (long long)need,
                         (long long)sc->numel);
            goto fail;
        }
        if ((uintptr_t)sc->data % 16) { PyErr_SetString(PyExc_ValueError, "scratch: must be 16-byte aligned"); goto fail; }
        base = sc->data;
    }
    if (M == 0) { arrset_release(&s); Py_RETURN_NONE; }
    mixc_gemm G = h->tmpl;
    const int64_t Kp = G.Kp;
    G.M = M;
    G.y = y->data;
    G.ydtype = dtype_code(y->dtype);
    G.cfg = cfg;
    G.splits = splits;
    G.xq = (const int8_t *)base;
    G.sa = (const float *)(base + sa_off);
    G.ws = splits > 1 ? (float *)(base + ws_off) : NULL;
    int err = mixc_act_quant(h->device, x->data, dtype_code(x->dtype), M, h->K, h->g, mixc_gp(h->g), (int8_t *)G.xq,
                             Kp, G.spg, (float *)G.sa, Kp / MIXC_KSTAGE, (void *)(intptr_t)stream);
    if (!err) err = mixc_qlinear(h->device, &G, (void *)(intptr_t)stream);
    arrset_release(&s);
    if (err) return cuda_fail(err, "qlinear");
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyMethodDef methods[] = {
    {"act_quant", py_act_quant, METH_VARARGS, "act_quant(x, g, gp, q_out, scale_out, spg, stream): int8 per token and group"},
    {"pack_weight", py_pack_weight, METH_VARARGS,
     "pack_weight(qweight, scale, zero, bits, K, g, wpack_out, meta_out, stream): canonical -> GEMM layout"},
    {"geometry", py_geometry, METH_VARARGS, "geometry(K, g) -> (G, gp, spg, Kp): the padded-K layout"},
    {"layout_bytes", py_layout_bytes, METH_VARARGS,
     "layout_bytes(bits, N, K, g) -> (wpack_bytes, meta_bytes): sizes of pack_weight's outputs"},
    {"plan", py_plan, METH_VARARGS, "plan(device, M, Ns, Kp, cfg, splits) -> (cfg, splits, name)"},
    {"prepare", py_prepare, METH_VARARGS,
     "prepare(parts, bias, K, g, stream, pdl=1) -> handle: a validated W4A8/W8A8/mixed layer"},
    {"plan_call", py_plan_call, METH_VARARGS,
     "plan_call(handle, M, cfg, splits) -> (cfg, splits, scratch_bytes, name)"},
    {"run", py_run, METH_VARARGS, "run(handle, x, y, scratch, cfg, splits, stream): y = x W^T + bias"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "mixllm._cuda",
                                    "CUDA kernels of mixllm (use mixllm.ops / mixllm.cuda_ops)", -1, methods};

PyMODINIT_FUNC PyInit__cuda(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "NCFG", MIXC_NCFG) < 0 || PyModule_AddIntConstant(m, "KSTAGE", MIXC_KSTAGE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
