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
    int64_t M = x->shape[0], K = x->shape[1], G = (K + g - 1) / g;
    if (!(q = take(&s, oq, "q_out", MIX_DT(MIX_I8), 2, 1)) || mix_check_dim(q, 0, M) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || mix_check_dim(sc, 0, M) < 0) goto fail;
    int64_t qpitch = q->shape[1], sapitch = sc->shape[1];
    if (qpitch < K || (gp != g && qpitch < G * gp)) {
        PyErr_Format(PyExc_ValueError, "q_out: rows of %lld codes are too short for K=%lld", (long long)qpitch, (long long)K);
        goto fail;
    }
    if (sapitch < G * spg) {
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
    if (check_group(g) < 0) return NULL;
    if (K <= 0) return PyErr_Format(PyExc_ValueError, "K: expected a positive integer, got %lld", K);
    arrset s = {.n = 0, .stream = stream};
    mix_array *q, *sc, *z = NULL, *w, *m;
    if (!(q = take(&s, oq, "qweight", MIX_DT(bits == 4 ? MIX_U8 : MIX_I8), 2, 0))) goto fail;
    int64_t N = q->shape[0], G = (K + g - 1) / g;
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
    if (check_group(g) < 0) return NULL;
    if (K <= 0) return PyErr_Format(PyExc_ValueError, "K: expected a positive integer, got %lld", K);
    long long gp = mixc_gp(g);
    return Py_BuildValue("LLLL", (K + g - 1) / g, gp, gp / MIXC_KSTAGE, (long long)mixc_kp(K, g));
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
    if (Kp <= 0 || Kp % MIXC_KSTAGE) return PyErr_Format(PyExc_ValueError, "Kp: expected a positive multiple of %d", MIXC_KSTAGE);
    int c, sp;
    if (mixc_plan(device, M, Ns, (int)np, Kp, cfg, splits, &c, &sp) < 0)
        return PyErr_Format(PyExc_ValueError, "cfg: expected -1 (auto) or 0..%d, got %d", MIXC_NCFG - 1, cfg);
    return Py_BuildValue("iis", c, sp, mixc_cfg_name(c));
}

/* qlinear(xq, sa, g, parts, bias|None, y, ws|None, cfg, splits, stream)
 * parts: list of (wpack, meta, bits, N, out_index|None). */
static PyObject *py_qlinear(PyObject *self, PyObject *args) {
    PyObject *oxq, *osa, *oparts, *obias, *oy, *ows;
    long long g, stream;
    int cfg, splits;
    if (!PyArg_ParseTuple(args, "OOLO!OOOiiL", &oxq, &osa, &g, &PyList_Type, &oparts, &obias, &oy, &ows, &cfg, &splits,
                          &stream))
        return NULL;
    if (check_group(g) < 0) return NULL;
    Py_ssize_t np = PyList_GET_SIZE(oparts);
    if (np < 1 || np > MIXC_MAX_PARTS)
        return PyErr_Format(PyExc_ValueError, "parts: expected a list of 1 or 2 (wpack, meta, bits, N, out_index) tuples");
    if (cfg < 0 || cfg >= MIXC_NCFG || splits < 1)
        return PyErr_Format(PyExc_ValueError, "cfg, splits: expected 0..%d and >= 1 (see plan())", MIXC_NCFG - 1);
    arrset s = {.n = 0, .stream = stream};
    mixc_gemm G;
    memset(&G, 0, sizeof G);
    mix_array *xq, *sa, *y, *bias = NULL, *ws = NULL;
    if (!(y = take(&s, oy, "y", MIX_FLOATS, 2, 1))) goto fail;
    int64_t M = y->shape[0], n_out = y->shape[1];
    if (!(xq = take(&s, oxq, "xq", MIX_DT(MIX_I8), 2, 0)) || mix_check_dim(xq, 0, M) < 0) goto fail;
    int64_t Kp = xq->shape[1];
    if (Kp <= 0 || Kp % MIXC_KSTAGE) {
        PyErr_Format(PyExc_ValueError, "xq: rows must hold a positive multiple of %d codes (padded layout)", MIXC_KSTAGE);
        goto fail;
    }
    if (!(sa = take(&s, osa, "sa", MIX_DT(MIX_F32), 2, 0)) || check_shape2(sa, M, Kp / MIXC_KSTAGE) < 0) goto fail;
    int64_t gp = mixc_gp(g), Gn = Kp / gp;
    if (Kp % gp) { PyErr_SetString(PyExc_ValueError, "xq: row length does not match group_size"); goto fail; }
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
        if ((bits != 4 && bits != 8) || N < 0) { PyErr_SetString(PyExc_ValueError, "parts: bits must be 4 or 8, N >= 0"); goto fail; }
        int64_t K_any = Kp; /* the packed sizes depend on Kp and G only */
        mix_array *w, *m;
        if (!(w = take(&s, ow, "wpack", MIX_DT(MIX_U8), 1, 0)) ||
            check_size(w, (N + 15) / 16 * 16 * K_any * bits / 8) < 0) goto fail;
        if (!(m = take(&s, om, "meta", MIX_DT(MIX_U8), 1, 0)) || check_size(m, (N + 15) / 16 * Gn * 80) < 0) goto fail;
        if (((uintptr_t)w->data | (uintptr_t)m->data) % 16) {
            PyErr_SetString(PyExc_ValueError, "wpack, meta: must be 16-byte aligned");
            goto fail;
        }
        G.parts[i].wpack = w->data;
        G.parts[i].meta = m->data;
        G.parts[i].N = N;
        G.parts[i].bits = bits;
        if (oidx != Py_None) {
            mix_array *idx = take(&s, oidx, "out_index", MIX_DT(MIX_I64), 1, 0);
            if (!idx || mix_check_dim(idx, 0, N) < 0) goto fail;
            G.parts[i].out_index = idx->data;
        } else if (np != 1 || N != n_out) {
            PyErr_SetString(PyExc_ValueError, "parts: out_index is required unless one part covers all outputs");
            goto fail;
        }
        nsum += N;
    }
    if (nsum != n_out) {
        PyErr_Format(PyExc_ValueError, "y: expected %lld output columns (the parts' rows), got %lld", (long long)nsum,
                     (long long)n_out);
        goto fail;
    }
    if (obias != Py_None && (!(bias = take(&s, obias, "bias", MIX_DT(MIX_F32), 1, 0)) || mix_check_dim(bias, 0, n_out) < 0))
        goto fail;
    if (splits > 1) {
        if (ows == Py_None) { PyErr_SetString(PyExc_ValueError, "ws: a workspace is required when splits > 1"); goto fail; }
        if (!(ws = take(&s, ows, "ws", MIX_DT(MIX_F32), 1, 1)) || check_size(ws, (int64_t)splits * M * n_out) < 0) goto fail;
    }
    G.xq = xq->data;
    G.sa = sa->data;
    G.M = M;
    G.Kp = Kp;
    G.G = (int)Gn;
    G.spg = (int)(gp / MIXC_KSTAGE);
    G.nparts = (int)np;
    G.bias = bias ? bias->data : NULL;
    G.y = y->data;
    G.ydtype = dtype_code(y->dtype);
    G.n_out = n_out;
    G.ws = ws ? ws->data : NULL;
    G.cfg = cfg;
    G.splits = splits;
    int err = mixc_qlinear(y->device_id, &G, (void *)(intptr_t)stream);
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
    {"plan", py_plan, METH_VARARGS, "plan(device, M, Ns, Kp, cfg, splits) -> (cfg, splits, name)"},
    {"qlinear", py_qlinear, METH_VARARGS,
     "qlinear(xq, sa, g, parts, bias, y, ws, cfg, splits, stream): W4A8/W8A8/mixed GEMM"},
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
