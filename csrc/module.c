/* mixllm._C: the CPython entry points. Each parses its arguments, takes its arrays through
 * the DLPack bridge (which validates them), checks shapes against each other, runs the
 * computation without the GIL, and reports failures as Python exceptions. Outputs are
 * allocated by the Python wrappers (mixllm/ops.py) and passed in. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "quant.h"
#include "gptq.h"
#include "salience.h"
#include "gemm_cpu.h"
#include "cluster.h"
#include "slim.h"
#include "woq.h"
#include <string.h>

#define MAX_ARRAYS 12
typedef struct { mix_array a[MAX_ARRAYS]; int n; } arrset;

static void arrset_release(arrset *s) { for (int i = 0; i < s->n; i++) mix_array_release(&s->a[i]); s->n = 0; }
static mix_array *take(arrset *s, PyObject *o, const char *name, unsigned dt, int ndim, int writable) {
    mix_array *a = &s->a[s->n];
    if (mix_array_get(o, name, dt, ndim, MIX_ON_CPU, writable, -1, a) < 0) return NULL;
    s->n++;
    return a;
}
static int check_group(long long g) {
    if (g <= 0) { PyErr_Format(PyExc_ValueError, "group_size: expected a positive integer, got %lld", g); return -1; }
    return 0;
}
static int check_shape2(mix_array *a, int64_t r, int64_t c) {
    return (mix_check_dim(a, 0, r) < 0 || mix_check_dim(a, 1, c) < 0) ? -1 : 0;
}
static PyObject *nonfinite(const char *name) {
    PyErr_Format(PyExc_ValueError, "%s: contains NaN or Inf", name);
    return NULL;
}

static PyObject *py_quantize_weight(PyObject *self, PyObject *args) {
    PyObject *ow, *oq, *os, *oz;
    int bits, symmetric;
    long long g;
    if (!PyArg_ParseTuple(args, "OiLpOOO", &ow, &bits, &g, &symmetric, &oq, &os, &oz)) return NULL;
    if (check_group(g) < 0) return NULL;
    if (symmetric ? (bits < 2 || bits > 8) : (bits < 1 || bits > 8))
        return PyErr_Format(PyExc_ValueError, "bits: expected %s, got %d", symmetric ? "2..8" : "1..8", bits);
    arrset s = {.n = 0};
    mix_array *w, *q, *sc, *z = NULL;
    if (!(w = take(&s, ow, "w", MIX_DT(MIX_F32), 2, 0))) goto fail;
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, g);
    if (!(q = take(&s, oq, "q_out", MIX_DT(symmetric ? MIX_I8 : MIX_U8), 2, 1)) || check_shape2(q, N, K) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(sc, N, G) < 0) goto fail;
    if (!symmetric && (!(z = take(&s, oz, "zero_out", MIX_DT(MIX_U8), 2, 1)) || check_shape2(z, N, G) < 0)) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = symmetric ? mix_quantize_sym(w->data, N, K, g, bits, q->data, sc->data)
                   : mix_quantize_asym(w->data, N, K, g, bits, q->data, sc->data, z->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    if (rc < 0) return nonfinite("w");
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_dequantize_weight(PyObject *self, PyObject *args) {
    PyObject *oq, *os, *oz, *oo;
    long long g;
    if (!PyArg_ParseTuple(args, "OOOLO", &oq, &os, &oz, &g, &oo)) return NULL;
    if (check_group(g) < 0) return NULL;
    arrset s = {.n = 0};
    mix_array *q, *sc, *z = NULL, *out;
    if (!(q = take(&s, oq, "q", MIX_DT(MIX_U8) | MIX_DT(MIX_I8), 2, 0))) goto fail;
    int64_t N = q->shape[0], K = q->shape[1], G = mix_ngroups(K, g);
    if (!(sc = take(&s, os, "scale", MIX_DT(MIX_F32), 2, 0)) || check_shape2(sc, N, G) < 0) goto fail;
    if (oz != Py_None && (!(z = take(&s, oz, "zero", MIX_DT(MIX_U8), 2, 0)) || check_shape2(z, N, G) < 0)) goto fail;
    if (!(out = take(&s, oo, "out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(out, N, K) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    mix_dequantize(q->data, q->dtype == MIX_I8, sc->data, z ? z->data : NULL, N, K, g, out->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_quantize_activation(PyObject *self, PyObject *args) {
    PyObject *ox, *oq, *os;
    long long g;
    if (!PyArg_ParseTuple(args, "OLOO", &ox, &g, &oq, &os)) return NULL;
    if (check_group(g) < 0) return NULL;
    arrset s = {.n = 0};
    mix_array *x, *q, *sc;
    if (!(x = take(&s, ox, "x", MIX_FLOATS, 2, 0))) goto fail;
    int64_t M = x->shape[0], K = x->shape[1], G = mix_ngroups(K, g);
    if (!(q = take(&s, oq, "q_out", MIX_DT(MIX_I8), 2, 1)) || check_shape2(q, M, K) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(sc, M, G) < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_quantize_activation(x->data, x->dtype, M, K, g, q->data, sc->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    if (rc < 0) return nonfinite("x");
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_pack_int4(PyObject *self, PyObject *args) {
    PyObject *oq, *oo;
    if (!PyArg_ParseTuple(args, "OO", &oq, &oo)) return NULL;
    arrset s = {.n = 0};
    mix_array *q, *out;
    if (!(q = take(&s, oq, "q", MIX_DT(MIX_U8), 2, 0))) goto fail;
    int64_t N = q->shape[0], K = q->shape[1];
    if (!(out = take(&s, oo, "out", MIX_DT(MIX_U8), 2, 1)) || check_shape2(out, N, (K + 1) / 2) < 0) goto fail;
    const uint8_t *qd = q->data;
    for (int64_t i = 0; i < N * K; i++)
        if (qd[i] > 15) {
            PyErr_Format(PyExc_ValueError, "q: 4-bit codes must be in 0..15, got %d", qd[i]);
            goto fail;
        }
    Py_BEGIN_ALLOW_THREADS
    mix_pack_int4(q->data, N, K, out->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_unpack_int4(PyObject *self, PyObject *args) {
    PyObject *op, *oo;
    if (!PyArg_ParseTuple(args, "OO", &op, &oo)) return NULL;
    arrset s = {.n = 0};
    mix_array *p, *out;
    if (!(p = take(&s, op, "packed", MIX_DT(MIX_U8), 2, 0))) goto fail;
    if (!(out = take(&s, oo, "out", MIX_DT(MIX_U8), 2, 1))) goto fail;
    int64_t N = p->shape[0], K = out->shape[1];
    if (mix_check_dim(out, 0, N) < 0 || mix_check_dim(p, 1, (K + 1) / 2) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    mix_unpack_int4(p->data, N, K, out->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_salience_accumulate(PyObject *self, PyObject *args) {
    PyObject *oa, *og, *od;
    if (!PyArg_ParseTuple(args, "OOO", &oa, &og, &od)) return NULL;
    arrset s = {.n = 0};
    mix_array *acc, *gr, *d;
    if (!(acc = take(&s, oa, "acc", MIX_DT(MIX_F64), 1, 1))) goto fail;
    if (!(gr = take(&s, og, "grad", MIX_FLOATS, 2, 0))) goto fail;
    int64_t N = gr->shape[0], K = gr->shape[1];
    if (mix_check_dim(acc, 0, N) < 0) goto fail;
    if (!(d = take(&s, od, "delta", MIX_DT(MIX_F32), 2, 0)) || check_shape2(d, N, K) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    mix_salience_accumulate(acc->data, gr->data, gr->dtype, d->data, N, K);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_gptq_quantize(PyObject *self, PyObject *args) {
    PyObject *ow, *oh, *obits_pg, *oq, *os, *oz;
    mix_gptq_opts o;
    memset(&o, 0, sizeof o);
    long long g;
    if (!PyArg_ParseTuple(args, "OOiLpdpiOOOO", &ow, &oh, &o.bits, &g, &o.symmetric, &o.damp, &o.group_order,
                          &o.clip_grid, &obits_pg, &oq, &os, &oz))
        return NULL;
    if (check_group(g) < 0) return NULL;
    o.group_size = g;
    if (o.bits < (o.symmetric ? 2 : 1) || o.bits > 8)
        return PyErr_Format(PyExc_ValueError, "bits: expected %s, got %d", o.symmetric ? "2..8" : "1..8", o.bits);
    if (!(o.damp >= 0.0 && o.damp < 1e6)) return PyErr_Format(PyExc_ValueError, "damp: expected a value >= 0");
    if (o.clip_grid < 0 || o.clip_grid > 99) return PyErr_Format(PyExc_ValueError, "clip_grid: expected 0..99, got %d", o.clip_grid);
    arrset s = {.n = 0};
    mix_array *w, *h = NULL, *bpg = NULL, *q, *sc, *z;
    float *bpg_copy = NULL; /* validated private copy: scale_out may alias bits_per_group */
    if (!(w = take(&s, ow, "w", MIX_DT(MIX_F32), 2, 0))) goto fail;
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, g);
    if (oh != Py_None && (!(h = take(&s, oh, "H", MIX_DT(MIX_F64), 2, 0)) || check_shape2(h, K, K) < 0)) goto fail;
    if (obits_pg != Py_None) {
        if (!(bpg = take(&s, obits_pg, "bits_per_group", MIX_DT(MIX_F32), 2, 0)) || check_shape2(bpg, N, G) < 0) goto fail;
        const float *b = bpg->data;
        if (!(bpg_copy = malloc(((size_t)(N * G) + 1) * sizeof(float)))) { PyErr_NoMemory(); goto fail; }
        for (int64_t i = 0; i < N * G; i++) {
            float v = b[i];
            if (!(v >= (o.symmetric ? 2 : 1) && v <= 8 && v == (float)(int)v)) {
                PyErr_Format(PyExc_ValueError, "bits_per_group: expected integers in %s", o.symmetric ? "2..8" : "1..8");
                goto fail;
            }
            bpg_copy[i] = v;
        }
        o.bits_per_group = bpg_copy;
    }
    if (!(q = take(&s, oq, "q_out", MIX_DT(o.symmetric ? MIX_I8 : MIX_U8), 2, 1)) || check_shape2(q, N, K) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(sc, N, G) < 0) goto fail;
    if (!(z = take(&s, oz, "zero_out", MIX_DT(MIX_U8), 2, 1)) || check_shape2(z, N, G) < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_gptq(w->data, N, K, h ? h->data : NULL, &o, q->data, sc->data, z->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    free(bpg_copy);
    if (rc == -1) { PyErr_SetString(PyExc_ValueError, "w or H: contains NaN or Inf"); return NULL; }
    if (rc == -2) return PyErr_NoMemory();
    if (rc == -3) { PyErr_SetString(PyExc_ValueError, "H: not positive definite even after damping; raise damp"); return NULL; }
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    free(bpg_copy);
    return NULL;
}

static int check_bits_48(int bits) {
    if (bits != 4 && bits != 8) { PyErr_Format(PyExc_ValueError, "bits: expected 4 or 8, got %d", bits); return -1; }
    return 0;
}

static PyObject *py_cpu_blob_bytes(PyObject *self, PyObject *args) {
    int bits;
    long long N, K, g;
    if (!PyArg_ParseTuple(args, "iLLL", &bits, &N, &K, &g)) return NULL;
    if (check_bits_48(bits) < 0 || check_group(g) < 0) return NULL;
    if (N < 0 || K <= 0 || N > (1LL << 31) || K > (1LL << 31)) return PyErr_Format(PyExc_ValueError, "N, K: out of range");
    mix_cpu_weight w;
    mix_cpu_weight_geometry(bits, N, K, g > K ? K : g, &w);
    if (mix_cpu_blob_bytes(&w) < 0) return PyErr_Format(PyExc_ValueError, "N, K, group_size: the packed weight would be too large");
    return PyLong_FromLongLong(mix_cpu_blob_bytes(&w));
}

static PyObject *py_cpu_prepack(PyObject *self, PyObject *args) {
    PyObject *oq, *os, *oz, *ob;
    int bits;
    long long g;
    if (!PyArg_ParseTuple(args, "OOOiLO", &oq, &os, &oz, &bits, &g, &ob)) return NULL;
    if (check_bits_48(bits) < 0 || check_group(g) < 0) return NULL;
    arrset s = {.n = 0};
    mix_array *q, *sc, *z = NULL, *blob;
    if (!(q = take(&s, oq, "codes", MIX_DT(bits == 4 ? MIX_U8 : MIX_I8), 2, 0))) goto fail;
    int64_t N = q->shape[0], K = q->shape[1];
    if (K == 0) { PyErr_SetString(PyExc_ValueError, "codes: K must be positive"); goto fail; }
    if (g > K) g = K;
    int64_t G = mix_ngroups(K, g);
    if (!(sc = take(&s, os, "scale", MIX_DT(MIX_F32), 2, 0)) || check_shape2(sc, N, G) < 0) goto fail;
    if (bits == 4) {
        if (!(z = take(&s, oz, "zero", MIX_DT(MIX_U8), 2, 0)) || check_shape2(z, N, G) < 0) goto fail;
        const uint8_t *c = q->data, *zz = z->data;
        for (int64_t i = 0; i < N * K; i++) if (c[i] > 15) { PyErr_SetString(PyExc_ValueError, "codes: 4-bit codes must be in 0..15"); goto fail; }
        for (int64_t i = 0; i < N * G; i++) if (zz[i] > 15) { PyErr_SetString(PyExc_ValueError, "zero: 4-bit zero points must be in 0..15"); goto fail; }
    } else {
        const int8_t *c = q->data;
        for (int64_t i = 0; i < N * K; i++) if (c[i] == -128) { PyErr_SetString(PyExc_ValueError, "codes: 8-bit codes must be in -127..127"); goto fail; }
    }
    mix_cpu_weight w;
    mix_cpu_weight_geometry(bits, N, K, g, &w);
    if (mix_cpu_blob_bytes(&w) < 0) { PyErr_SetString(PyExc_ValueError, "codes: the packed weight would be too large"); goto fail; }
    if (!(blob = take(&s, ob, "blob_out", MIX_DT(MIX_U8), 1, 1)) || mix_check_dim(blob, 0, mix_cpu_blob_bytes(&w)) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    mix_cpu_prepack(&w, q->data, sc->data, z ? z->data : NULL, blob->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

/* cpu_qlinear(x, parts, group_size, bias, out, impl); parts: list of (blob, bits, N, out_index|None). */
static PyObject *py_cpu_qlinear(PyObject *self, PyObject *args) {
    PyObject *ox, *oparts, *obias, *oout;
    long long g;
    int impl;
    if (!PyArg_ParseTuple(args, "OOLOOi", &ox, &oparts, &g, &obias, &oout, &impl)) return NULL;
    if (check_group(g) < 0) return NULL;
    if (impl < 0 || impl > 3 || !mix_cpu_has((mix_impl)impl))
        return PyErr_Format(PyExc_ValueError, "impl: %d is not available on this CPU", impl);
    if (!PyList_Check(oparts) || PyList_GET_SIZE(oparts) < 1 || PyList_GET_SIZE(oparts) > 4)
        return PyErr_Format(PyExc_TypeError, "parts: expected a list of 1 to 4 (blob, bits, N, out_index) tuples");
    arrset s = {.n = 0};
    mix_array *x, *bias = NULL, *out;
    mix_cpu_weight parts[4];
    int np = (int)PyList_GET_SIZE(oparts);
    /* A producer's __dlpack__ may mutate the list while we walk it: walk a snapshot that holds
     * references to the part tuples (and through them to the arrays borrowed below). */
    PyObject *snap = PyList_AsTuple(oparts);
    int64_t *idx_copy = NULL;
    if (!snap) return NULL;
    if (!(x = take(&s, ox, "x", MIX_FLOATS, 2, 0))) goto fail;
    int64_t M = x->shape[0], K = x->shape[1];
    if (K == 0) { PyErr_SetString(PyExc_ValueError, "x: K must be positive"); goto fail; }
    if (g > K) g = K;
    if (!(out = take(&s, oout, "out", MIX_FLOATS, 2, 1)) || mix_check_dim(out, 0, M) < 0) goto fail;
    int64_t n_out = out->shape[1], total = 0;
    unsigned char *seen = NULL;
    for (int p = 0; p < np; p++) {
        PyObject *t = PyTuple_GET_ITEM(snap, p), *oblob, *oidx;
        int bits;
        long long N;
        if (!PyTuple_Check(t) || !PyArg_ParseTuple(t, "OiLO", &oblob, &bits, &N, &oidx)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "parts: each part must be a (blob, bits, N, out_index) tuple");
            goto fail;
        }
        if (check_bits_48(bits) < 0) goto fail;
        if (N < 0 || N > n_out) { PyErr_Format(PyExc_ValueError, "parts[%d]: N=%lld out of range", p, N); goto fail; }
        mix_cpu_weight_geometry(bits, N, K, g, &parts[p]);
        if (mix_cpu_blob_bytes(&parts[p]) < 0) { PyErr_Format(PyExc_ValueError, "parts[%d]: weight too large", p); goto fail; }
        mix_array *blob = take(&s, oblob, "blob", MIX_DT(MIX_U8), 1, 0);
        if (!blob || mix_check_dim(blob, 0, mix_cpu_blob_bytes(&parts[p])) < 0) goto fail;
        parts[p].blob = blob->data;
        if (oidx == Py_None) {
            if (np != 1 || N != n_out) { PyErr_SetString(PyExc_ValueError, "parts: out_index is required unless one part covers all outputs"); goto fail; }
        } else {
            mix_array *idx = take(&s, oidx, "out_index", MIX_DT(MIX_I64), 1, 0);
            if (!idx || mix_check_dim(idx, 0, N) < 0) goto fail;
            parts[p].out_index = idx->data;
        }
        total += N;
    }
    if (total != n_out) { PyErr_Format(PyExc_ValueError, "parts: rows add up to %lld, out has %lld columns", (long long)total, (long long)n_out); goto fail; }
    seen = calloc((size_t)n_out + 1, 1);
    idx_copy = malloc(((size_t)n_out + 1) * sizeof(int64_t));
    if (!seen || !idx_copy) { free(seen); PyErr_NoMemory(); goto fail; }
    /* out_index must be a permutation: every column written exactly once. The kernel reads the
     * validated private copy, so that later writes to the caller's array (another thread, a later
     * producer's __dlpack__, or `out` aliasing it) cannot turn into out-of-bounds stores. */
    {
        int64_t off = 0;
        for (int p = 0; p < np; p++) {
            if (!parts[p].out_index) continue;
            for (int64_t i = 0; i < parts[p].N; i++) {
                int64_t c = parts[p].out_index[i];
                if (c < 0 || c >= n_out || seen[c]) { free(seen); PyErr_SetString(PyExc_ValueError, "out_index: must be a permutation of the output columns"); goto fail; }
                seen[c] = 1;
                idx_copy[off + i] = c;
            }
            parts[p].out_index = idx_copy + off;
            off += parts[p].N;
        }
    }
    free(seen);
    if (obias != Py_None && (!(bias = take(&s, obias, "bias", MIX_DT(MIX_F32), 1, 0)) || mix_check_dim(bias, 0, n_out) < 0)) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_cpu_qlinear(x->data, x->dtype, M, K, g, parts, np, bias ? bias->data : NULL, out->data, out->dtype, n_out, (mix_impl)impl);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    free(idx_copy);
    Py_DECREF(snap);
    if (rc == -1) return nonfinite("x");
    if (rc == -2) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    free(idx_copy);
    Py_DECREF(snap);
    return NULL;
}

static PyObject *py_cpu_has(PyObject *self, PyObject *args) {
    int impl;
    if (!PyArg_ParseTuple(args, "i", &impl)) return NULL;
    return PyBool_FromLong(impl >= 0 && impl <= 3 && mix_cpu_has((mix_impl)impl));
}

/* ---- sister methods (issue 5): k-means levels (CMPQ), SliM-LLM calibration, weight-only linear ---- */

static PyObject *py_kmeans1d(PyObject *self, PyObject *args) {
    PyObject *ox, *ow, *oks, *oc, *oq;
    int k, iters;
    if (!PyArg_ParseTuple(args, "OOiOiOO", &ox, &ow, &k, &oks, &iters, &oc, &oq)) return NULL;
    if (k < 1 || k > 256) return PyErr_Format(PyExc_ValueError, "k: expected 1..256 levels, got %d", k);
    if (iters < 0) return PyErr_Format(PyExc_ValueError, "iters: expected >= 0, got %d", iters);
    arrset s = {.n = 0};
    mix_array *x, *w = NULL, *ks = NULL, *c, *q;
    if (!(x = take(&s, ox, "x", MIX_DT(MIX_F32), 2, 0))) goto fail;
    int64_t R = x->shape[0], n = x->shape[1];
    if (ow != Py_None && (!(w = take(&s, ow, "weight", MIX_DT(MIX_F32), 2, 0)) || check_shape2(w, R, n) < 0)) goto fail;
    if (oks != Py_None) {
        if (!(ks = take(&s, oks, "levels", MIX_DT(MIX_I32), 1, 0)) || mix_check_dim(ks, 0, R) < 0) goto fail;
        const int32_t *kk = ks->data;
        for (int64_t r = 0; r < R; r++)
            if (kk[r] < 1 || kk[r] > k) { PyErr_Format(PyExc_ValueError, "levels: expected 1..%d, got %d", k, kk[r]); goto fail; }
    }
    if (!(c = take(&s, oc, "centroids_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(c, R, k) < 0) goto fail;
    if (!(q = take(&s, oq, "codes_out", MIX_DT(MIX_U8), 2, 1)) || check_shape2(q, R, n) < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_kmeans1d(x->data, w ? w->data : NULL, R, n, k, ks ? ks->data : NULL, iters, c->data, q->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    if (rc == -1) { PyErr_SetString(PyExc_ValueError, "x or weight: NaN/Inf, or a negative weight"); return NULL; }
    if (rc == -2) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static int check_slim(mix_slim_ctx *c) {
    if (!(c->lambda >= 0 && isfinite(c->lambda))) { PyErr_SetString(PyExc_ValueError, "lambda: expected a finite value >= 0"); return -1; }
    if (!(c->norm > 0 && c->norm <= 8)) { PyErr_SetString(PyExc_ValueError, "norm: expected 0 < norm <= 8"); return -1; }
    if (!(c->tau_range >= 0 && c->tau_range < 1)) { PyErr_SetString(PyExc_ValueError, "tau_range: expected 0 <= tau_range < 1"); return -1; }
    if (c->tau_n < 1 || c->tau_n > 1000) { PyErr_Format(PyExc_ValueError, "tau_n: expected 1..1000, got %d", c->tau_n); return -1; }
    return 0;
}

/* slim_calibrate(w [R,len] f32, u [len] f64, bits, threshold|None, lambda, norm, tau_range, tau_n, scale_out [R], offset_out [R]) */
static PyObject *py_slim_calibrate(PyObject *self, PyObject *args) {
    PyObject *ow, *ou, *othr, *os, *oo;
    int bits;
    mix_slim_ctx c;
    if (!PyArg_ParseTuple(args, "OOiOdddiOO", &ow, &ou, &bits, &othr, &c.lambda, &c.norm, &c.tau_range, &c.tau_n, &os, &oo)) return NULL;
    if (bits < 1 || bits > 8) return PyErr_Format(PyExc_ValueError, "bits: expected 1..8, got %d", bits);
    if (check_slim(&c) < 0) return NULL;
    double thr = 0;
    c.threshold = NULL;
    if (othr != Py_None) {
        thr = PyFloat_AsDouble(othr);
        if (thr == -1.0 && PyErr_Occurred()) return NULL;
        c.threshold = &thr;
    }
    arrset s = {.n = 0};
    mix_array *w, *u, *sc, *of;
    if (!(w = take(&s, ow, "w", MIX_DT(MIX_F32), 2, 0))) goto fail;
    int64_t R = w->shape[0], len = w->shape[1];
    if (len == 0) { PyErr_SetString(PyExc_ValueError, "w: the group must not be empty"); goto fail; }
    if (!(u = take(&s, ou, "u", MIX_DT(MIX_F64), 1, 0)) || mix_check_dim(u, 0, len) < 0) goto fail;
    for (int64_t k = 0; k < len; k++)
        if (!(((double *)u->data)[k] > 0)) { PyErr_SetString(PyExc_ValueError, "u: expected positive values"); goto fail; }
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 1, 1)) || mix_check_dim(sc, 0, R) < 0) goto fail;
    if (!(of = take(&s, oo, "offset_out", MIX_DT(MIX_F32), 1, 1)) || mix_check_dim(of, 0, R) < 0) goto fail;
    const float *wd = w->data;
    for (int64_t i = 0; i < R * len; i++) if (!isfinite(wd[i])) { arrset_release(&s); return nonfinite("w"); }
    Py_BEGIN_ALLOW_THREADS
    double *v = malloc((size_t)len * sizeof(double));
    if (v) {
        for (int64_t r = 0; r < R; r++) {
            for (int64_t k = 0; k < len; k++) v[k] = wd[r * len + k];
            mix_slim_fit(&c, v, u->data, len, bits, 0, (float *)sc->data + r, (float *)of->data + r);
        }
    }
    free(v);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

/* slim_gptq(w, H|None, bits_per_group [N,G] f32, group_size, damp, group_order, thresholds [G] f64|None,
 *           lambda, norm, tau_range, tau_n, q_out u8 [N,K], scale_out [N,G], offset_out [N,G]) */
static PyObject *py_slim_gptq(PyObject *self, PyObject *args) {
    PyObject *ow, *oh, *obpg, *othr, *oq, *os, *oo;
    long long g;
    mix_gptq_opts o;
    mix_slim_ctx c;
    memset(&o, 0, sizeof o);
    PyObject *ou = Py_None;
    if (!PyArg_ParseTuple(args, "OOOLdpOdddiOOO|O", &ow, &oh, &obpg, &g, &o.damp, &o.group_order, &othr, &c.lambda,
                          &c.norm, &c.tau_range, &c.tau_n, &oq, &os, &oo, &ou))
        return NULL;
    if (check_group(g) < 0 || check_slim(&c) < 0) return NULL;
    if (!(o.damp >= 0.0 && o.damp < 1e6)) return PyErr_Format(PyExc_ValueError, "damp: expected a value >= 0");
    o.group_size = g;
    o.bits = 2;
    arrset s = {.n = 0};
    mix_array *w, *h = NULL, *bpg, *thr = NULL, *q, *sc, *of;
    uint8_t *zero = NULL;
    float *bpg_copy = NULL; /* validated private copy: scale_out / offset_out may alias bits_per_group */
    if (!(w = take(&s, ow, "w", MIX_DT(MIX_F32), 2, 0))) goto fail;
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, g);
    if (K == 0) { PyErr_SetString(PyExc_ValueError, "w: K must be positive"); goto fail; }
    if (oh != Py_None && (!(h = take(&s, oh, "H", MIX_DT(MIX_F64), 2, 0)) || check_shape2(h, K, K) < 0)) goto fail;
    if (!(bpg = take(&s, obpg, "bits_per_group", MIX_DT(MIX_F32), 2, 0)) || check_shape2(bpg, N, G) < 0) goto fail;
    if (!(bpg_copy = malloc(((size_t)(N * G) + 1) * sizeof(float)))) { PyErr_NoMemory(); goto fail; }
    for (int64_t i = 0; i < N * G; i++) {
        float b = ((const float *)bpg->data)[i];
        if (!(b >= 1 && b <= 8 && b == (float)(int)b)) { PyErr_SetString(PyExc_ValueError, "bits_per_group: expected integers in 1..8"); goto fail; }
        bpg_copy[i] = b;
    }
    if (othr != Py_None && (!(thr = take(&s, othr, "thresholds", MIX_DT(MIX_F64), 1, 0)) || mix_check_dim(thr, 0, G) < 0)) goto fail;
    if (ou != Py_None) {
        mix_array *ua = take(&s, ou, "U", MIX_DT(MIX_F64), 2, 0);
        if (!ua || check_shape2(ua, K, K) < 0) goto fail;
        if (!h) { PyErr_SetString(PyExc_ValueError, "U: given without H"); goto fail; }
        if (o.group_order) { PyErr_SetString(PyExc_ValueError, "U: only with group_order off (natural column order)"); goto fail; }
        const double *ud = ua->data;
        for (int64_t k = 0; k < K; k++)
            if (!(ud[k * K + k] > 0) || !isfinite(ud[k * K + k])) { PyErr_SetString(PyExc_ValueError, "U: expected a positive diagonal"); goto fail; }
        o.u_in = ud;
    }
    if (!(q = take(&s, oq, "q_out", MIX_DT(MIX_U8), 2, 1)) || check_shape2(q, N, K) < 0) goto fail;
    if (!(sc = take(&s, os, "scale_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(sc, N, G) < 0) goto fail;
    if (!(of = take(&s, oo, "offset_out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(of, N, G) < 0) goto fail;
    c.threshold = thr ? thr->data : NULL;
    o.bits_per_group = bpg_copy;
    o.fit = mix_slim_fit;
    o.fit_ctx = &c;
    o.offset_out = of->data;
    zero = calloc((size_t)(N * G + 1), 1);
    if (!zero) { PyErr_NoMemory(); goto fail; }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_gptq(w->data, N, K, h ? h->data : NULL, &o, q->data, sc->data, zero);
    Py_END_ALLOW_THREADS
    free(zero);
    free(bpg_copy);
    arrset_release(&s);
    if (rc == -1) { PyErr_SetString(PyExc_ValueError, "w or H: contains NaN or Inf"); return NULL; }
    if (rc == -2) return PyErr_NoMemory();
    if (rc == -3) { PyErr_SetString(PyExc_ValueError, "H: not positive definite even after damping; raise damp"); return NULL; }
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    free(bpg_copy);
    return NULL;
}

/* A weight-only weight from a tuple: ("group", g, codes, scale, offset, rowptr|None, cols|None, vals|None)
 * or ("codebook", 0, codes, codebook [K,L], None, rowptr|None, cols|None, vals|None). */
static int parse_woq(arrset *s, PyObject *spec, mix_woq_weight *w, int64_t *nnz_out) {
    const char *kind;
    long long g;
    PyObject *oc, *o1, *o2, *orp, *ocol, *oval;
    memset(w, 0, sizeof *w);
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "sLOOOOOO", &kind, &g, &oc, &o1, &o2, &orp, &ocol, &oval)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "weight: expected a (kind, group_size, codes, scale|codebook, offset|None, rowptr|None, cols|None, vals|None) tuple");
        return -1;
    }
    mix_array *c = take(s, oc, "codes", MIX_DT(MIX_U8), 2, 0);
    if (!c) return -1;
    w->N = c->shape[0]; w->K = c->shape[1]; w->codes = c->data;
    if (w->K == 0) { PyErr_SetString(PyExc_ValueError, "codes: K must be positive"); return -1; }
    if (!strcmp(kind, "group")) {
        if (check_group(g) < 0) return -1;
        w->kind = 0; w->g = g;
        int64_t G = mix_ngroups(w->K, g);
        mix_array *sc = take(s, o1, "scale", MIX_DT(MIX_F32), 2, 0);
        if (!sc || check_shape2(sc, w->N, G) < 0) return -1;
        mix_array *of = take(s, o2, "offset", MIX_DT(MIX_F32), 2, 0);
        if (!of || check_shape2(of, w->N, G) < 0) return -1;
        w->scale = sc->data; w->offset = of->data;
    } else if (!strcmp(kind, "codebook")) {
        w->kind = 1;
        mix_array *cb = take(s, o1, "codebook", MIX_DT(MIX_F32), 2, 0);
        if (!cb || mix_check_dim(cb, 0, w->K) < 0) return -1;
        w->L = cb->shape[1];
        if (w->L < 1 || w->L > 256) { PyErr_SetString(PyExc_ValueError, "codebook: expected 1..256 levels per channel"); return -1; }
        w->codebook = cb->data;
    } else {
        PyErr_Format(PyExc_ValueError, "kind: expected 'group' or 'codebook', got '%s'", kind);
        return -1;
    }
    if (orp != Py_None) {
        mix_array *rp = take(s, orp, "rowptr", MIX_DT(MIX_I64), 1, 0);
        if (!rp || mix_check_dim(rp, 0, w->N + 1) < 0) return -1;
        mix_array *cl = take(s, ocol, "cols", MIX_DT(MIX_I64), 1, 0);
        if (!cl) return -1;
        int64_t nnz = cl->shape[0];
        mix_array *vl = take(s, oval, "vals", MIX_DT(MIX_F32), 1, 0);
        if (!vl || mix_check_dim(vl, 0, nnz) < 0) return -1;
        w->rowptr = rp->data; w->cols = cl->data; w->vals = vl->data; *nnz_out = nnz;
    }
    return 0;
}

/* The index-like contents of a weight, checked after *every* array of the call was taken: a later
 * producer's __dlpack__ could otherwise rewrite them after the check (out-of-bounds indexing). */
static int woq_validate(const mix_woq_weight *w, int64_t nnz) {
    if (w->kind == 1)
        for (int64_t i = 0; i < w->N * w->K; i++)
            if (w->codes[i] >= w->L) { PyErr_Format(PyExc_ValueError, "codes: expected values < %lld (codebook levels)", (long long)w->L); return -1; }
    if (w->rowptr) {
        const int64_t *r = w->rowptr, *cc = w->cols;
        if (r[0] != 0 || r[w->N] != nnz) { PyErr_SetString(PyExc_ValueError, "rowptr: must start at 0 and end at len(cols)"); return -1; }
        for (int64_t n = 0; n < w->N; n++) if (r[n + 1] < r[n]) { PyErr_SetString(PyExc_ValueError, "rowptr: must be non-decreasing"); return -1; }
        for (int64_t t = 0; t < nnz; t++) if (cc[t] < 0 || cc[t] >= w->K) { PyErr_SetString(PyExc_ValueError, "cols: out of range"); return -1; }
    }
    return 0;
}

static PyObject *py_woq_dequantize(PyObject *self, PyObject *args) {
    PyObject *spec, *oo;
    if (!PyArg_ParseTuple(args, "OO", &spec, &oo)) return NULL;
    arrset s = {.n = 0};
    mix_woq_weight w;
    mix_array *out;
    int64_t nnz = 0;
    if (parse_woq(&s, spec, &w, &nnz) < 0) goto fail;
    if (!(out = take(&s, oo, "out", MIX_DT(MIX_F32), 2, 1)) || check_shape2(out, w.N, w.K) < 0) goto fail;
    if (woq_validate(&w, nnz) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    mix_woq_dequantize(&w, out->data);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyObject *py_woq_linear(PyObject *self, PyObject *args) {
    PyObject *ox, *spec, *ob, *oo;
    if (!PyArg_ParseTuple(args, "OOOO", &ox, &spec, &ob, &oo)) return NULL;
    arrset s = {.n = 0};
    mix_woq_weight w;
    mix_array *x, *b = NULL, *out;
    int64_t nnz = 0;
    if (parse_woq(&s, spec, &w, &nnz) < 0) goto fail;
    if (!(x = take(&s, ox, "x", MIX_FLOATS, 2, 0)) || mix_check_dim(x, 1, w.K) < 0) goto fail;
    int64_t M = x->shape[0];
    if (ob != Py_None && (!(b = take(&s, ob, "bias", MIX_DT(MIX_F32), 1, 0)) || mix_check_dim(b, 0, w.N) < 0)) goto fail;
    if (!(out = take(&s, oo, "out", MIX_FLOATS, 2, 1)) || check_shape2(out, M, w.N) < 0) goto fail;
    if (woq_validate(&w, nnz) < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_woq_linear(x->data, x->dtype, M, &w, b ? b->data : NULL, out->data, out->dtype);
    Py_END_ALLOW_THREADS
    arrset_release(&s);
    if (rc == -1) return nonfinite("x");
    if (rc == -2) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    arrset_release(&s);
    return NULL;
}

static PyMethodDef methods[] = {
    {"quantize_weight", py_quantize_weight, METH_VARARGS, "quantize_weight(w, bits, group_size, symmetric, q_out, scale_out, zero_out)"},
    {"dequantize_weight", py_dequantize_weight, METH_VARARGS, "dequantize_weight(q, scale, zero|None, group_size, out)"},
    {"quantize_activation", py_quantize_activation, METH_VARARGS, "quantize_activation(x, group_size, q_out, scale_out)"},
    {"pack_int4", py_pack_int4, METH_VARARGS, "pack_int4(q, out)"},
    {"unpack_int4", py_unpack_int4, METH_VARARGS, "unpack_int4(packed, out)"},
    {"salience_accumulate", py_salience_accumulate, METH_VARARGS, "salience_accumulate(acc, grad, delta)"},
    {"gptq_quantize", py_gptq_quantize, METH_VARARGS,
     "gptq_quantize(w, H|None, bits, group_size, symmetric, damp, group_order, clip_grid, bits_per_group|None, q_out, scale_out, zero_out)"},
    {"cpu_blob_bytes", py_cpu_blob_bytes, METH_VARARGS, "cpu_blob_bytes(bits, N, K, group_size)"},
    {"cpu_prepack", py_cpu_prepack, METH_VARARGS, "cpu_prepack(codes, scale, zero|None, bits, group_size, blob_out)"},
    {"cpu_qlinear", py_cpu_qlinear, METH_VARARGS, "cpu_qlinear(x, parts, group_size, bias|None, out, impl)"},
    {"cpu_has", py_cpu_has, METH_VARARGS, "cpu_has(impl)"},
    {"kmeans1d", py_kmeans1d, METH_VARARGS, "kmeans1d(x, weight|None, k, levels|None, iters, centroids_out, codes_out)"},
    {"slim_calibrate", py_slim_calibrate, METH_VARARGS,
     "slim_calibrate(w, u, bits, threshold|None, lambda, norm, tau_range, tau_n, scale_out, offset_out)"},
    {"slim_gptq", py_slim_gptq, METH_VARARGS,
     "slim_gptq(w, H|None, bits_per_group, group_size, damp, group_order, thresholds|None, lambda, norm, tau_range, tau_n, q_out, scale_out, offset_out[, U])"},
    {"woq_dequantize", py_woq_dequantize, METH_VARARGS, "woq_dequantize(weight_spec, out)"},
    {"woq_linear", py_woq_linear, METH_VARARGS, "woq_linear(x, weight_spec, bias|None, out)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_C", "mixllm C core (CPU ops over DLPack)", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moduledef); }
