/* mixllm._C: the CPython entry points of the C core. Each declares its arguments once (an A_x table:
 * name, kind, dtype / ndim / range, output or not; csrc/args.h), which parses positional and keyword
 * arguments, takes the arrays through the DLPack bridge, and releases everything at the end. The
 * entry point itself checks shapes against each other, runs the computation without the GIL and
 * returns the core's code, which its error table (E_x) turns into an exception. Outputs are allocated
 * by the Python wrappers (mixllm/ops.py) and passed in. */
#include "args.h" /* first: it includes Python.h */
#include "cluster.h"
#include "gemm_cpu.h"
#include "gptq.h"
#include "quant.h"
#include "salience.h"
#include "slim.h"
#include "woq.h"
#include <string.h>

#define F32      MIX_DT(MIX_F32)
#define F64      MIX_DT(MIX_F64)
#define I8       MIX_DT(MIX_I8)
#define U8       MIX_DT(MIX_U8)
#define I32      MIX_DT(MIX_I32)
#define I64      MIX_DT(MIX_I64)
#define ENTRY(x) static PyObject *py_##x(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
#define BEGIN(x) \
    mix_call c;  \
    if (mix_call_begin(&c, &S_##x, args, nargs, kw) < 0) return NULL

static const mix_err E_NONFINITE_W[] = {{-1, MIX_EXC_VALUE, "w: contains NaN or Inf"}, {0, 0, NULL}};
static const mix_err E_NONFINITE_X[] = {{-1, MIX_EXC_VALUE, "x: contains NaN or Inf"}, {0, 0, NULL}};
static const mix_err E_GPTQ[] = {{-1, MIX_EXC_VALUE, "w or H: contains NaN or Inf"},
                                 {-3, MIX_EXC_VALUE, "H: not positive definite even after damping; raise damp"},
                                 {0, 0, NULL}};

static int bits_for(int symmetric, long long bits) {
    if (bits < (symmetric ? 2 : 1) || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected %s, got %lld", symmetric ? "2..8" : "1..8", bits);
        return -1;
    }
    return 0;
}
static int check_bits_48(long long bits) {
    if (bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected 4 or 8, got %lld", bits);
        return -1;
    }
    return 0;
}
static int check_damp(double damp) {
    if (!(damp >= 0.0 && damp < 1e6)) {
        PyErr_SetString(PyExc_ValueError, "damp: expected a value >= 0");
        return -1;
    }
    return 0;
}
/* A private copy of the per-group bit-widths, checked to be integers in lo..8: the kernel reads the
 * copy, so that an output aliasing bits_per_group cannot change them while it runs. */
static float *copy_bits_per_group(mix_call *c, const mix_array *bpg, int lo) {
    float *copy = mix_call_alloc(c, ((size_t)bpg->numel + 1) * sizeof(float));
    if (!copy) return NULL;
    const float *b = bpg->data;
    for (int64_t i = 0; i < bpg->numel; i++) {
        float v = b[i];
        if (!(v >= lo && v <= 8 && v == (float)(int)v)) {
            PyErr_Format(PyExc_ValueError, "bits_per_group: expected integers in %d..8", lo);
            return NULL;
        }
        copy[i] = v;
    }
    return copy;
}

/* ---- number formats ---------------------------------------------------------------------------- */

static const mix_arg A_quantize_weight[] = {
    MIX_IN("w", F32, 2),
    MIX_INT("bits", 1, 8, NULL),
    MIX_GROUP_SIZE,
    MIX_BOOL("symmetric"),
    {.name = "q_out", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_OUTPUT | MIX_ARG_LATE, .dtypes = U8 | I8, .ndim = 2},
    MIX_OUT("scale_out", F32, 2),
    {.name = "zero_out", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_OUTPUT | MIX_ARG_LATE, .dtypes = U8, .ndim = 2},
};
static int pre_quantize_weight(const mix_call *c) { return bits_for((int)mix_int(c, 3), mix_int(c, 1)); }
MIX_SIG(quantize_weight, "Round-to-nearest group-wise weight quantization (zero_out unused when symmetric).",
        E_NONFINITE_W, pre_quantize_weight);
ENTRY(quantize_weight) {
    BEGIN(quantize_weight);
    int bits = (int)mix_int(&c, 1), sym = (int)mix_int(&c, 3);
    long long g = mix_int(&c, 2);
    mix_array *w = mix_arr(&c, 0), *sc = mix_arr(&c, 5), *q, *z = NULL;
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, g);
    if (!(q = mix_call_take(&c, 4, sym ? I8 : U8)) || mix_check_shape2(q, N, K) < 0 || mix_check_shape2(sc, N, G) < 0)
        return mix_call_fail(&c);
    if (!sym && (!(z = mix_call_take(&c, 6, 0)) || mix_check_shape2(z, N, G) < 0)) return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sym ? mix_quantize_sym(w->data, N, K, g, bits, q->data, sc->data)
             : mix_quantize_asym(w->data, N, K, g, bits, q->data, sc->data, z->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

static const mix_arg A_dequantize_weight[] = {
    MIX_IN("q", U8 | I8, 2), MIX_IN("scale", F32, 2), MIX_IN_OPT("zero", U8, 2), MIX_GROUP_SIZE, MIX_OUT("out", F32, 2),
};
MIX_SIG(dequantize_weight, "(q - zero) * scale per group, as float32 (zero=None for int8 codes).", NULL, NULL);
ENTRY(dequantize_weight) {
    BEGIN(dequantize_weight);
    mix_array *q = mix_arr(&c, 0), *sc = mix_arr(&c, 1), *z = mix_arr(&c, 2), *out = mix_arr(&c, 4);
    long long g = mix_int(&c, 3);
    int64_t N = q->shape[0], K = q->shape[1], G = mix_ngroups(K, g);
    if (mix_check_shape2(sc, N, G) < 0 || (z && mix_check_shape2(z, N, G) < 0) || mix_check_shape2(out, N, K) < 0)
        return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    mix_dequantize(q->data, q->dtype == MIX_I8, sc->data, z ? z->data : NULL, N, K, g, out->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

static const mix_arg A_quantize_activation[] = {
    MIX_IN("x", MIX_FLOATS, 2),
    MIX_GROUP_SIZE,
    MIX_OUT("q_out", I8, 2),
    MIX_OUT("scale_out", F32, 2),
};
MIX_SIG(quantize_activation, "Symmetric int8 quantization per token and group.", E_NONFINITE_X, NULL);
ENTRY(quantize_activation) {
    BEGIN(quantize_activation);
    mix_array *x = mix_arr(&c, 0), *q = mix_arr(&c, 2), *sc = mix_arr(&c, 3);
    long long g = mix_int(&c, 1);
    int64_t M = x->shape[0], K = x->shape[1], G = mix_ngroups(K, g);
    if (mix_check_shape2(q, M, K) < 0 || mix_check_shape2(sc, M, G) < 0) return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_quantize_activation(x->data, x->dtype, M, K, g, q->data, sc->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

static const mix_arg A_pack_int4[] = {MIX_IN("q", U8, 2), MIX_OUT("out", U8, 2)};
MIX_SIG(pack_int4, "Two 4-bit codes per byte, low nibble first.", NULL, NULL);
ENTRY(pack_int4) {
    BEGIN(pack_int4);
    mix_array *q = mix_arr(&c, 0), *out = mix_arr(&c, 1);
    int64_t N = q->shape[0], K = q->shape[1];
    if (mix_check_shape2(out, N, (K + 1) / 2) < 0) return mix_call_fail(&c);
    const uint8_t *qd = q->data;
    for (int64_t i = 0; i < N * K; i++)
        if (qd[i] > 15) return mix_raise(&c, PyExc_ValueError, "q: 4-bit codes must be in 0..15, got %d", qd[i]);
    Py_BEGIN_ALLOW_THREADS
    mix_pack_int4(q->data, N, K, out->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

static const mix_arg A_unpack_int4[] = {MIX_IN("packed", U8, 2), MIX_OUT("out", U8, 2)};
MIX_SIG(unpack_int4, "Inverse of pack_int4; out's width is the unpacked length.", NULL, NULL);
ENTRY(unpack_int4) {
    BEGIN(unpack_int4);
    mix_array *p = mix_arr(&c, 0), *out = mix_arr(&c, 1);
    int64_t N = p->shape[0], K = out->shape[1];
    if (mix_check_dim(out, 0, N) < 0 || mix_check_dim(p, 1, (K + 1) / 2) < 0) return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    mix_unpack_int4(p->data, N, K, out->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

/* ---- salience and GPTQ --------------------------------------------------------------------------- */

static const mix_arg A_salience_accumulate[] = {
    MIX_OUT("acc", F64, 1),
    MIX_IN("grad", MIX_FLOATS, 2),
    MIX_IN("delta", F32, 2),
};
MIX_SIG(salience_accumulate, "In place: acc[c] += |t + t^2/2| with t = grad[c] . delta[c].", NULL, NULL);
ENTRY(salience_accumulate) {
    BEGIN(salience_accumulate);
    mix_array *acc = mix_arr(&c, 0), *gr = mix_arr(&c, 1), *d = mix_arr(&c, 2);
    int64_t N = gr->shape[0], K = gr->shape[1];
    if (mix_check_dim(acc, 0, N) < 0 || mix_check_shape2(d, N, K) < 0) return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    mix_salience_accumulate(acc->data, gr->data, gr->dtype, d->data, N, K);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

static const mix_arg A_gptq_quantize[] = {
    MIX_IN("w", F32, 2),
    MIX_IN_OPT("H", F64, 2),
    MIX_INT("bits", 1, 8, NULL),
    MIX_GROUP_SIZE,
    MIX_BOOL("symmetric"),
    MIX_FLOAT("damp"),
    MIX_BOOL("group_order"),
    MIX_INT("clip_grid", 0, 99, NULL),
    MIX_IN_OPT("bits_per_group", F32, 2),
    {.name = "q_out", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_OUTPUT | MIX_ARG_LATE, .dtypes = U8 | I8, .ndim = 2},
    MIX_OUT("scale_out", F32, 2),
    MIX_OUT("zero_out", U8, 2),
};
static int pre_gptq_quantize(const mix_call *c) {
    return bits_for((int)mix_int(c, 4), mix_int(c, 2)) < 0 || check_damp(mix_float(c, 5)) < 0 ? -1 : 0;
}
MIX_SIG(gptq_quantize, "GPTQ with group reordering and a clipping search (H=None: round-to-nearest).", E_GPTQ,
        pre_gptq_quantize);
ENTRY(gptq_quantize) {
    BEGIN(gptq_quantize);
    mix_gptq_opts o;
    memset(&o, 0, sizeof o);
    o.bits = (int)mix_int(&c, 2);
    o.group_size = mix_int(&c, 3);
    o.symmetric = (int)mix_int(&c, 4);
    o.damp = mix_float(&c, 5);
    o.group_order = (int)mix_int(&c, 6);
    o.clip_grid = (int)mix_int(&c, 7);
    mix_array *w = mix_arr(&c, 0), *h = mix_arr(&c, 1), *bpg = mix_arr(&c, 8), *q, *sc = mix_arr(&c, 10),
              *z = mix_arr(&c, 11);
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, o.group_size);
    if ((h && mix_check_shape2(h, K, K) < 0) || (bpg && mix_check_shape2(bpg, N, G) < 0)) return mix_call_fail(&c);
    if (bpg && !(o.bits_per_group = copy_bits_per_group(&c, bpg, o.symmetric ? 2 : 1))) return mix_call_fail(&c);
    if (!(q = mix_call_take(&c, 9, o.symmetric ? I8 : U8)) || mix_check_shape2(q, N, K) < 0 ||
        mix_check_shape2(sc, N, G) < 0 || mix_check_shape2(z, N, G) < 0)
        return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_gptq(w->data, N, K, h ? h->data : NULL, &o, q->data, sc->data, z->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

/* The prepacked layout is read and written through its section structs (csrc/layout_cpu.h), so the
 * blob must be aligned for them: a fresh allocation is, a view at an odd byte offset is not. */
static int check_blob_aligned(const mix_array *blob) {
    if ((uintptr_t)blob->data % _Alignof(mix_cpu_tail)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected an array aligned to %d bytes (a fresh allocation, not a view "
                     "at an offset)",
                     blob->name, (int)_Alignof(mix_cpu_tail));
        return -1;
    }
    return 0;
}

/* ---- CPU linear layers --------------------------------------------------------------------------- */

static const mix_arg A_cpu_blob_bytes[] = {
    MIX_INT("bits", 4, 8, "expected 4 or 8"),
    MIX_INT("N", LLONG_MIN, LLONG_MAX, NULL),
    MIX_INT("K", LLONG_MIN, LLONG_MAX, NULL),
    MIX_GROUP_SIZE,
};
static int pre_cpu_blob_bytes(const mix_call *c) { return check_bits_48(mix_int(c, 0)); }
MIX_SIG(cpu_blob_bytes, "Size in bytes of the CPU kernels' prepacked weight.", NULL, pre_cpu_blob_bytes);
ENTRY(cpu_blob_bytes) {
    BEGIN(cpu_blob_bytes);
    long long N = mix_int(&c, 1), K = mix_int(&c, 2), g = mix_int(&c, 3);
    mix_call_release(&c);
    if (N < 0 || K <= 0 || N > (1LL << 31) || K > (1LL << 31))
        return PyErr_Format(PyExc_ValueError, "N, K: out of range");
    mix_cpu_weight w;
    mix_cpu_weight_geometry((int)mix_int(&c, 0), N, K, g > K ? K : g, &w);
    if (mix_cpu_blob_bytes(&w) < 0)
        return PyErr_Format(PyExc_ValueError, "N, K, group_size: the packed weight would be too large");
    return PyLong_FromLongLong(mix_cpu_blob_bytes(&w));
}

static const mix_arg A_cpu_prepack[] = {
    {.name = "codes", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE, .dtypes = U8 | I8, .ndim = 2},
    MIX_IN("scale", F32, 2),
    {.name = "zero", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE | MIX_ARG_NONE_OK, .dtypes = U8, .ndim = 2},
    MIX_INT("bits", 4, 8, "expected 4 or 8"),
    MIX_GROUP_SIZE,
    {.name = "blob_out", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_OUTPUT | MIX_ARG_LATE, .dtypes = U8, .ndim = 1},
};
static int pre_cpu_prepack(const mix_call *c) { return check_bits_48(mix_int(c, 3)); }
MIX_SIG(cpu_prepack, "Lay a quantized weight out for the CPU kernels (zero: 4-bit only).", NULL, pre_cpu_prepack);
ENTRY(cpu_prepack) {
    BEGIN(cpu_prepack);
    int bits = (int)mix_int(&c, 3);
    long long g = mix_int(&c, 4);
    mix_array *q, *sc = mix_arr(&c, 1), *z = NULL, *blob;
    if (!(q = mix_call_take(&c, 0, bits == 4 ? U8 : I8))) return mix_call_fail(&c);
    int64_t N = q->shape[0], K = q->shape[1];
    if (K == 0) return mix_raise(&c, PyExc_ValueError, "codes: K must be positive");
    if (g > K) g = K;
    int64_t G = mix_ngroups(K, g);
    if (mix_check_shape2(sc, N, G) < 0) return mix_call_fail(&c);
    if (bits == 4) {
        if (mix_is_none(&c, 2)) return mix_raise(&c, PyExc_TypeError, "zero: expected an array, got None");
        if (!(z = mix_call_take(&c, 2, 0)) || mix_check_shape2(z, N, G) < 0) return mix_call_fail(&c);
        const uint8_t *cd = q->data, *zz = z->data;
        for (int64_t i = 0; i < N * K; i++)
            if (cd[i] > 15) return mix_raise(&c, PyExc_ValueError, "codes: 4-bit codes must be in 0..15");
        for (int64_t i = 0; i < N * G; i++)
            if (zz[i] > 15) return mix_raise(&c, PyExc_ValueError, "zero: 4-bit zero points must be in 0..15");
    } else {
        const int8_t *cd = q->data;
        for (int64_t i = 0; i < N * K; i++)
            if (cd[i] == -128) return mix_raise(&c, PyExc_ValueError, "codes: 8-bit codes must be in -127..127");
    }
    mix_cpu_weight w;
    mix_cpu_weight_geometry(bits, N, K, g, &w);
    if (mix_cpu_blob_bytes(&w) < 0)
        return mix_raise(&c, PyExc_ValueError, "codes: the packed weight would be too large");
    if (!(blob = mix_call_take(&c, 5, 0)) || mix_check_dim(blob, 0, mix_cpu_blob_bytes(&w)) < 0 ||
        check_blob_aligned(blob) < 0)
        return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    mix_cpu_prepack(&w, q->data, sc->data, z ? z->data : NULL, blob->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

/* parts: a list of 1 to 4 (blob, bits, N, out_index|None) tuples, the row blocks of one weight. */
static const mix_arg PART_FIELDS[] = {
    MIX_OBJ("blob"),
    MIX_INT("bits", INT_MIN, INT_MAX, NULL),
    MIX_INT("N", LLONG_MIN, LLONG_MAX, NULL),
    MIX_OBJ("out_index"),
};
static const mix_arg A_cpu_qlinear[] = {
    MIX_IN("x", MIX_FLOATS, 2),
    MIX_OBJ("parts"),
    MIX_GROUP_SIZE,
    {.name = "bias", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_LATE | MIX_ARG_NONE_OK, .dtypes = F32, .ndim = 1},
    MIX_OUT("out", MIX_FLOATS, 2),
    MIX_INT("impl", INT_MIN, INT_MAX, NULL),
};
static int pre_cpu_qlinear(const mix_call *c) {
    long long impl = mix_int(c, 5);
    if (impl < 0 || impl > 3 || !mix_cpu_has((mix_impl)impl)) {
        PyErr_Format(PyExc_ValueError, "impl: %lld is not available on this CPU", impl);
        return -1;
    }
    PyObject *parts = mix_obj(c, 1);
    if (!PyList_Check(parts) || PyList_GET_SIZE(parts) < 1 || PyList_GET_SIZE(parts) > 4) {
        PyErr_SetString(PyExc_TypeError, "parts: expected a list of 1 to 4 (blob, bits, N, out_index) tuples");
        return -1;
    }
    return 0;
}
MIX_SIG(cpu_qlinear, "y = x W^T + bias over prepacked parts (W4A8 / W8A8 / mixed).", E_NONFINITE_X, pre_cpu_qlinear);
ENTRY(cpu_qlinear) {
    BEGIN(cpu_qlinear);
    mix_array *x = mix_arr(&c, 0), *out = mix_arr(&c, 4), *bias = NULL;
    long long g = mix_int(&c, 2);
    mix_cpu_weight parts[4];
    /* A producer's __dlpack__ may mutate the list while we walk it: walk a snapshot that holds
     * references to the part tuples (and through them to the arrays borrowed below). */
    PyObject *snap = PyList_AsTuple(mix_obj(&c, 1));
    if (!snap || mix_call_keep(&c, snap) < 0) return mix_call_fail(&c);
    int np = (int)PyTuple_GET_SIZE(snap); /* checked again: an earlier producer may have changed the list */
    if (np < 1 || np > 4)
        return mix_raise(&c, PyExc_TypeError, "parts: expected a list of 1 to 4 (blob, bits, N, out_index) tuples");
    int64_t M = x->shape[0], K = x->shape[1];
    if (K == 0) return mix_raise(&c, PyExc_ValueError, "x: K must be positive");
    if (g > K) g = K;
    if (mix_check_dim(out, 0, M) < 0) return mix_call_fail(&c);
    int64_t n_out = out->shape[1], total = 0;
    for (int p = 0; p < np; p++) {
        mix_field f[4];
        if (mix_unpack(PyTuple_GET_ITEM(snap, p), PART_FIELDS, 4, f,
                       "parts: each part must be a (blob, bits, N, out_index) tuple") < 0)
            return mix_call_fail(&c);
        PyObject *oblob = f[0].obj, *oidx = f[3].obj;
        int bits = (int)f[1].i;
        long long N = f[2].i;
        if (check_bits_48(bits) < 0) return mix_call_fail(&c);
        if (N < 0 || N > n_out) return mix_raise(&c, PyExc_ValueError, "parts[%d]: N=%lld out of range", p, N);
        mix_cpu_weight_geometry(bits, N, K, g, &parts[p]);
        if (mix_cpu_blob_bytes(&parts[p]) < 0) return mix_raise(&c, PyExc_ValueError, "parts[%d]: weight too large", p);
        mix_array *blob = mix_call_take_nested(&c, oblob, "blob", U8, 1, 0);
        if (!blob || mix_check_dim(blob, 0, mix_cpu_blob_bytes(&parts[p])) < 0 || check_blob_aligned(blob) < 0)
            return mix_call_fail(&c);
        parts[p].blob = blob->data;
        if (oidx == Py_None) {
            if (np != 1 || N != n_out)
                return mix_raise(&c, PyExc_ValueError,
                                 "parts: out_index is required unless one part covers all outputs");
        } else {
            mix_array *idx = mix_call_take_nested(&c, oidx, "out_index", I64, 1, 0);
            if (!idx || mix_check_dim(idx, 0, N) < 0) return mix_call_fail(&c);
            parts[p].out_index = idx->data;
        }
        total += N;
    }
    if (total != n_out)
        return mix_raise(&c, PyExc_ValueError, "parts: rows add up to %lld, out has %lld columns", (long long)total,
                         (long long)n_out);
    unsigned char *seen = mix_call_alloc(&c, (size_t)n_out + 1);
    int64_t *idx_copy = mix_call_alloc(&c, ((size_t)n_out + 1) * sizeof(int64_t));
    if (!seen || !idx_copy) return mix_call_fail(&c);
    memset(seen, 0, (size_t)n_out + 1);
    /* out_index must be a permutation: every column written exactly once. The kernel reads the
     * validated private copy, so that later writes to the caller's array (another thread, a later
     * producer's __dlpack__, or `out` aliasing it) cannot turn into out-of-bounds stores. */
    int64_t off = 0;
    for (int p = 0; p < np; p++) {
        if (!parts[p].out_index) continue;
        for (int64_t i = 0; i < parts[p].N; i++) {
            int64_t col = parts[p].out_index[i];
            if (col < 0 || col >= n_out || seen[col])
                return mix_raise(&c, PyExc_ValueError, "out_index: must be a permutation of the output columns");
            seen[col] = 1;
            idx_copy[off + i] = col;
        }
        parts[p].out_index = idx_copy + off;
        off += parts[p].N;
    }
    if (!mix_is_none(&c, 3) && (!(bias = mix_call_take(&c, 3, 0)) || mix_check_dim(bias, 0, n_out) < 0))
        return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_cpu_qlinear(x->data, x->dtype, M, K, g, parts, np, bias ? bias->data : NULL, out->data, out->dtype, n_out,
                         (mix_impl)mix_int(&c, 5));
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

static const mix_arg A_cpu_has[] = {MIX_INT("impl", INT_MIN, INT_MAX, NULL)};
MIX_SIG(cpu_has, "Whether this CPU runs kernel implementation impl (0 auto, 1 portable, 2 AVX2, 3 AVX-512 VNNI).", NULL,
        NULL);
ENTRY(cpu_has) {
    BEGIN(cpu_has);
    long long impl = mix_int(&c, 0);
    mix_call_release(&c);
    return PyBool_FromLong(impl >= 0 && impl <= 3 && mix_cpu_has((mix_impl)impl));
}

/* ---- sister methods: k-means levels (CMPQ), SliM-LLM calibration, weight-only linear ---------------- */

static const mix_arg A_kmeans1d[] = {
    MIX_IN("x", F32, 2),
    MIX_IN_OPT("weight", F32, 2),
    MIX_INT("k", 1, 256, "expected 1..256 levels"),
    MIX_IN_OPT("levels", I32, 1),
    MIX_INT("iters", 0, INT_MAX, "expected >= 0"),
    MIX_OUT("centroids_out", F32, 2),
    MIX_OUT("codes_out", U8, 2),
};
static const mix_err E_kmeans1d[] = {{-1, MIX_EXC_VALUE, "x or weight: NaN/Inf, or a negative weight"}, {0, 0, NULL}};
MIX_SIG(kmeans1d, "Weighted 1-D k-means per row (levels: per-row level counts).", E_kmeans1d, NULL);
ENTRY(kmeans1d) {
    BEGIN(kmeans1d);
    int k = (int)mix_int(&c, 2), iters = (int)mix_int(&c, 4);
    mix_array *x = mix_arr(&c, 0), *w = mix_arr(&c, 1), *ks = mix_arr(&c, 3), *cent = mix_arr(&c, 5),
              *q = mix_arr(&c, 6);
    int64_t R = x->shape[0], n = x->shape[1];
    if ((w && mix_check_shape2(w, R, n) < 0) || (ks && mix_check_dim(ks, 0, R) < 0)) return mix_call_fail(&c);
    if (ks) {
        const int32_t *kk = ks->data;
        for (int64_t r = 0; r < R; r++)
            if (kk[r] < 1 || kk[r] > k)
                return mix_raise(&c, PyExc_ValueError, "levels: expected 1..%d, got %d", k, kk[r]);
    }
    if (mix_check_shape2(cent, R, k) < 0 || mix_check_shape2(q, R, n) < 0) return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_kmeans1d(x->data, w ? w->data : NULL, R, n, k, ks ? ks->data : NULL, iters, cent->data, q->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

/* SliM-LLM's loss settings, shared by slim_calibrate and slim_gptq (arguments first..first+3). */
#define SLIM_ARGS MIX_FLOAT("lam"), MIX_FLOAT("norm"), MIX_FLOAT("tau_range"), MIX_INT("tau_n", 1, 1000, NULL)
static mix_slim_ctx slim_ctx(const mix_call *c, int first) {
    mix_slim_ctx s;
    memset(&s, 0, sizeof s);
    s.lambda = mix_float(c, first);
    s.norm = mix_float(c, first + 1);
    s.tau_range = mix_float(c, first + 2);
    s.tau_n = (int)mix_int(c, first + 3);
    return s;
}
static int check_slim(const mix_call *c, int first) {
    mix_slim_ctx s = slim_ctx(c, first);
    const char *bad = !(s.lambda >= 0 && isfinite(s.lambda))   ? "lam: expected a finite value >= 0"
                      : !(s.norm > 0 && s.norm <= 8)           ? "norm: expected 0 < norm <= 8"
                      : !(s.tau_range >= 0 && s.tau_range < 1) ? "tau_range: expected 0 <= tau_range < 1"
                                                               : NULL;
    if (bad) PyErr_SetString(PyExc_ValueError, bad);
    return bad ? -1 : 0;
}

static const mix_arg A_slim_calibrate[] = {
    MIX_IN("w", F32, 2),
    MIX_IN("u", F64, 1),
    MIX_INT("bits", 1, 8, NULL),
    {.name = "threshold", .kind = MIX_ARG_FLOAT, .flags = MIX_ARG_NONE_OK},
    SLIM_ARGS,
    MIX_OUT("scale_out", F32, 1),
    MIX_OUT("offset_out", F32, 1),
};
static int pre_slim_calibrate(const mix_call *c) { return check_slim(c, 4); }
MIX_SIG(slim_calibrate, "SliM-LLM's salience-weighted quantizer calibration of one group per row.", NULL,
        pre_slim_calibrate);
ENTRY(slim_calibrate) {
    BEGIN(slim_calibrate);
    int bits = (int)mix_int(&c, 2);
    mix_slim_ctx ctx = slim_ctx(&c, 4);
    double thr = mix_float(&c, 3);
    ctx.threshold = mix_is_none(&c, 3) ? NULL : &thr;
    mix_array *w = mix_arr(&c, 0), *u = mix_arr(&c, 1), *sc = mix_arr(&c, 8), *of = mix_arr(&c, 9);
    int64_t R = w->shape[0], len = w->shape[1];
    if (len == 0) return mix_raise(&c, PyExc_ValueError, "w: the group must not be empty");
    if (mix_check_dim(u, 0, len) < 0) return mix_call_fail(&c);
    for (int64_t k = 0; k < len; k++)
        if (!(((double *)u->data)[k] > 0)) return mix_raise(&c, PyExc_ValueError, "u: expected positive values");
    if (mix_check_dim(sc, 0, R) < 0 || mix_check_dim(of, 0, R) < 0) return mix_call_fail(&c);
    const float *wd = w->data;
    for (int64_t i = 0; i < R * len; i++)
        if (!isfinite(wd[i])) return mix_raise(&c, PyExc_ValueError, "w: contains NaN or Inf");
    double *v = mix_call_alloc(&c, (size_t)len * sizeof(double));
    if (!v) return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < R; r++) {
        for (int64_t k = 0; k < len; k++) v[k] = wd[r * len + k];
        mix_slim_fit(&ctx, v, u->data, len, bits, 0, (float *)sc->data + r, (float *)of->data + r);
    }
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

static const mix_arg A_slim_gptq[] = {
    MIX_IN("w", F32, 2),
    MIX_IN_OPT("H", F64, 2),
    MIX_IN("bits_per_group", F32, 2),
    MIX_GROUP_SIZE,
    MIX_FLOAT("damp"),
    MIX_BOOL("group_order"),
    MIX_IN_OPT("thresholds", F64, 1),
    SLIM_ARGS,
    MIX_OUT("q_out", U8, 2),
    MIX_OUT("scale_out", F32, 2),
    MIX_OUT("offset_out", F32, 2),
    {.name = "U", .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_NONE_OK | MIX_ARG_DEFAULT, .dtypes = F64, .ndim = 2},
};
static int pre_slim_gptq(const mix_call *c) { return check_slim(c, 7) < 0 || check_damp(mix_float(c, 4)) < 0 ? -1 : 0; }
MIX_SIG(slim_gptq, "GPTQ with per-group bit-widths and SliM-LLM's calibration per group (U: given H^-1 factor).",
        E_GPTQ, pre_slim_gptq);
ENTRY(slim_gptq) {
    BEGIN(slim_gptq);
    mix_gptq_opts o;
    memset(&o, 0, sizeof o);
    mix_slim_ctx ctx = slim_ctx(&c, 7);
    o.group_size = mix_int(&c, 3);
    o.damp = mix_float(&c, 4);
    o.group_order = (int)mix_int(&c, 5);
    o.bits = 2;
    mix_array *w = mix_arr(&c, 0), *h = mix_arr(&c, 1), *bpg = mix_arr(&c, 2), *thr = mix_arr(&c, 6),
              *q = mix_arr(&c, 11), *sc = mix_arr(&c, 12), *of = mix_arr(&c, 13), *ua = mix_arr(&c, 14);
    int64_t N = w->shape[0], K = w->shape[1], G = mix_ngroups(K, o.group_size);
    if (K == 0) return mix_raise(&c, PyExc_ValueError, "w: K must be positive");
    if ((h && mix_check_shape2(h, K, K) < 0) || mix_check_shape2(bpg, N, G) < 0) return mix_call_fail(&c);
    /* private copy: scale_out / offset_out may alias bits_per_group */
    if (!(o.bits_per_group = copy_bits_per_group(&c, bpg, 1))) return mix_call_fail(&c);
    if (thr && mix_check_dim(thr, 0, G) < 0) return mix_call_fail(&c);
    if (ua) {
        if (mix_check_shape2(ua, K, K) < 0) return mix_call_fail(&c);
        if (!h) return mix_raise(&c, PyExc_ValueError, "U: given without H");
        if (o.group_order)
            return mix_raise(&c, PyExc_ValueError, "U: only with group_order off (natural column order)");
        const double *ud = ua->data;
        for (int64_t k = 0; k < K; k++)
            if (!(ud[k * K + k] > 0) || !isfinite(ud[k * K + k]))
                return mix_raise(&c, PyExc_ValueError, "U: expected a positive diagonal");
        o.u_in = ud;
    }
    if (mix_check_shape2(q, N, K) < 0 || mix_check_shape2(sc, N, G) < 0 || mix_check_shape2(of, N, G) < 0)
        return mix_call_fail(&c);
    ctx.threshold = thr ? thr->data : NULL;
    o.fit = mix_slim_fit;
    o.fit_ctx = &ctx;
    o.offset_out = of->data;
    uint8_t *zero = mix_call_alloc(&c, (size_t)(N * G + 1));
    if (!zero) return mix_call_fail(&c);
    memset(zero, 0, (size_t)(N * G + 1));
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_gptq(w->data, N, K, h ? h->data : NULL, &o, q->data, sc->data, zero);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

/* A weight-only weight from a tuple: ("group", g, codes, scale, offset, rowptr|None, cols|None, vals|None)
 * or ("codebook", 0, codes, codebook [K,L], None, rowptr|None, cols|None, vals|None). */
static const mix_arg WOQ_FIELDS[] = {
    {.name = "kind", .kind = MIX_ARG_STR},
    MIX_INT("group_size", LLONG_MIN, LLONG_MAX, NULL),
    MIX_OBJ("codes"),
    MIX_OBJ("scale|codebook"),
    MIX_OBJ("offset"),
    MIX_OBJ("rowptr"),
    MIX_OBJ("cols"),
    MIX_OBJ("vals"),
};
static int parse_woq(mix_call *c, PyObject *spec, mix_woq_weight *w, int64_t *nnz_out) {
    mix_field f[8];
    memset(w, 0, sizeof *w);
    if (mix_unpack(spec, WOQ_FIELDS, 8, f,
                   "weight: expected a (kind, group_size, codes, scale|codebook, offset|None, rowptr|None, "
                   "cols|None, vals|None) tuple") < 0)
        return -1;
    const char *kind = f[0].str;
    long long g = f[1].i;
    PyObject *oc = f[2].obj, *o1 = f[3].obj, *o2 = f[4].obj, *orp = f[5].obj, *ocol = f[6].obj, *oval = f[7].obj;
    mix_array *cd = mix_call_take_nested(c, oc, "codes", U8, 2, 0);
    if (!cd) return -1;
    w->N = cd->shape[0];
    w->K = cd->shape[1];
    w->codes = cd->data;
    if (w->K == 0) {
        PyErr_SetString(PyExc_ValueError, "codes: K must be positive");
        return -1;
    }
    if (!strcmp(kind, "group")) {
        if (g <= 0) {
            PyErr_Format(PyExc_ValueError, "group_size: expected a positive integer, got %lld", g);
            return -1;
        }
        w->kind = 0;
        w->g = g;
        int64_t G = mix_ngroups(w->K, g);
        mix_array *sc = mix_call_take_nested(c, o1, "scale", F32, 2, 0);
        if (!sc || mix_check_shape2(sc, w->N, G) < 0) return -1;
        mix_array *of = mix_call_take_nested(c, o2, "offset", F32, 2, 0);
        if (!of || mix_check_shape2(of, w->N, G) < 0) return -1;
        w->scale = sc->data;
        w->offset = of->data;
    } else if (!strcmp(kind, "codebook")) {
        w->kind = 1;
        mix_array *cb = mix_call_take_nested(c, o1, "codebook", F32, 2, 0);
        if (!cb || mix_check_dim(cb, 0, w->K) < 0) return -1;
        w->L = cb->shape[1];
        if (w->L < 1 || w->L > 256) {
            PyErr_SetString(PyExc_ValueError, "codebook: expected 1..256 levels per channel");
            return -1;
        }
        w->codebook = cb->data;
    } else {
        PyErr_Format(PyExc_ValueError, "kind: expected 'group' or 'codebook', got '%s'", kind);
        return -1;
    }
    if (orp != Py_None) {
        mix_array *rp = mix_call_take_nested(c, orp, "rowptr", I64, 1, 0);
        if (!rp || mix_check_dim(rp, 0, w->N + 1) < 0) return -1;
        mix_array *cl = mix_call_take_nested(c, ocol, "cols", I64, 1, 0);
        if (!cl) return -1;
        int64_t nnz = cl->shape[0];
        mix_array *vl = mix_call_take_nested(c, oval, "vals", F32, 1, 0);
        if (!vl || mix_check_dim(vl, 0, nnz) < 0) return -1;
        w->rowptr = rp->data;
        w->cols = cl->data;
        w->vals = vl->data;
        *nnz_out = nnz;
    }
    return 0;
}

/* The index-like contents of a weight, checked after *every* array of the call was taken: a later
 * producer's __dlpack__ could otherwise rewrite them after the check (out-of-bounds indexing). */
static int woq_validate(const mix_woq_weight *w, int64_t nnz) {
    const char *bad = NULL;
    if (w->kind == 1)
        for (int64_t i = 0; i < w->N * w->K; i++)
            if (w->codes[i] >= w->L) {
                PyErr_Format(PyExc_ValueError, "codes: expected values < %lld (codebook levels)", (long long)w->L);
                return -1;
            }
    if (w->rowptr) {
        const int64_t *r = w->rowptr, *cc = w->cols;
        if (r[0] != 0 || r[w->N] != nnz) bad = "rowptr: must start at 0 and end at len(cols)";
        for (int64_t n = 0; n < w->N && !bad; n++)
            if (r[n + 1] < r[n]) bad = "rowptr: must be non-decreasing";
        for (int64_t t = 0; t < nnz && !bad; t++)
            if (cc[t] < 0 || cc[t] >= w->K) bad = "cols: out of range";
    }
    if (bad) PyErr_SetString(PyExc_ValueError, bad);
    return bad ? -1 : 0;
}

static const mix_arg A_woq_dequantize[] = {MIX_OBJ("weight"), MIX_OUT("out", F32, 2)};
MIX_SIG(woq_dequantize, "Float32 weight of a weight-only format (weight: a group or codebook spec tuple).", NULL, NULL);
ENTRY(woq_dequantize) {
    BEGIN(woq_dequantize);
    mix_woq_weight w;
    mix_array *out = mix_arr(&c, 1);
    int64_t nnz = 0;
    if (parse_woq(&c, mix_obj(&c, 0), &w, &nnz) < 0 || mix_check_shape2(out, w.N, w.K) < 0 || woq_validate(&w, nnz) < 0)
        return mix_call_fail(&c);
    Py_BEGIN_ALLOW_THREADS
    mix_woq_dequantize(&w, out->data);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, 0);
}

static const mix_arg A_woq_linear[] = {
    MIX_IN("x", MIX_FLOATS, 2),
    MIX_OBJ("weight"),
    MIX_IN_OPT("bias", F32, 1),
    MIX_OUT("out", MIX_FLOATS, 2),
};
MIX_SIG(woq_linear, "y = x W^T + bias, dequantizing a weight-only W one output row at a time.", E_NONFINITE_X, NULL);
ENTRY(woq_linear) {
    BEGIN(woq_linear);
    mix_woq_weight w;
    mix_array *x = mix_arr(&c, 0), *b = mix_arr(&c, 2), *out = mix_arr(&c, 3);
    int64_t nnz = 0;
    if (parse_woq(&c, mix_obj(&c, 1), &w, &nnz) < 0 || mix_check_dim(x, 1, w.K) < 0 ||
        (b && mix_check_dim(b, 0, w.N) < 0) || mix_check_shape2(out, x->shape[0], w.N) < 0 || woq_validate(&w, nnz) < 0)
        return mix_call_fail(&c);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mix_woq_linear(x->data, x->dtype, x->shape[0], &w, b ? b->data : NULL, out->data, out->dtype);
    Py_END_ALLOW_THREADS
    return mix_call_finish(&c, rc);
}

/* ---- the module ------------------------------------------------------------------------------------ */

#define E(x) {&S_##x, py_##x}
static const mix_entry ENTRIES[] = {
    E(quantize_weight), E(dequantize_weight), E(quantize_activation),
    E(pack_int4),       E(unpack_int4),       E(salience_accumulate),
    E(gptq_quantize),   E(cpu_blob_bytes),    E(cpu_prepack),
    E(cpu_qlinear),     E(cpu_has),           E(kmeans1d),
    E(slim_calibrate),  E(slim_gptq),         E(woq_dequantize),
    E(woq_linear),
};
#define NENTRIES MIX_NARGS(ENTRIES)
static PyMethodDef methods[NENTRIES + 1];
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_C", "mixllm C core (CPU ops over DLPack)", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
    if (!methods[0].ml_name && mix_module_methods(ENTRIES, NENTRIES, methods) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m && mix_module_add_signatures(m, ENTRIES, NENTRIES) < 0) Py_CLEAR(m);
    return m;
}
