/* The argument layer of the C entry points (see args.h). */
#include "args.h"
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- parsing ---------------------------------------------------------------------------------- */

static const char *kind_word(mix_arg_kind k) {
    switch (k) {
    case MIX_ARG_ARRAY: return "array";
    case MIX_ARG_INT: return "int";
    case MIX_ARG_FLOAT: return "float";
    case MIX_ARG_BOOL: return "bool";
    case MIX_ARG_STR: return "str";
    default: return "object";
    }
}

static int parse_scalar(mix_call *c, int i) {
    const mix_arg *a = &c->sig->args[i];
    PyObject *o = c->obj[i];
    if (!o) { /* omitted: MIX_ARG_DEFAULT */
        c->i[i] = (long long)a->dflt;
        c->f[i] = a->dflt;
        return 0;
    }
    if (o == Py_None && (a->flags & MIX_ARG_NONE_OK)) return 0;
    switch (a->kind) {
    case MIX_ARG_INT: {
        if (PyFloat_Check(o) || !PyIndex_Check(o)) {
            PyErr_Format(PyExc_TypeError, "%s: expected an integer, got %.100s", a->name, Py_TYPE(o)->tp_name);
            return -1;
        }
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_OverflowError, "%s: integer out of the 64-bit range", a->name);
            }
            return -1;
        }
        /* a C int argument: values beyond 32 bits are an OverflowError, as PyArg_Parse's "i" says */
        if (a->hi <= INT_MAX && a->lo >= INT_MIN && (v > INT_MAX || v < INT_MIN)) {
            PyErr_Format(PyExc_OverflowError, "%s: integer out of the 32-bit range", a->name);
            return -1;
        }
        c->i[i] = v;
        return 0;
    }
    case MIX_ARG_FLOAT: {
        double v = PyFloat_AsDouble(o);
        if (v == -1.0 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s: expected a float, got %.100s", a->name, Py_TYPE(o)->tp_name);
            }
            return -1;
        }
        c->f[i] = v;
        return 0;
    }
    case MIX_ARG_BOOL: {
        int v = PyObject_IsTrue(o);
        if (v < 0) return -1;
        c->i[i] = v;
        return 0;
    }
    default: return 0; /* objects: interpreted by the entry point */
    }
}

/* Ranges are checked once every scalar has converted, so that a wrong type anywhere is reported
 * before an out-of-range value (the order PyArg_ParseTuple plus hand-written checks had). */
static int check_range(const mix_call *c, int i) {
    const mix_arg *a = &c->sig->args[i];
    long long v = c->i[i];
    if (a->kind != MIX_ARG_INT || mix_is_none(c, i) || (v >= a->lo && v <= a->hi)) return 0;
    if (a->range_msg)
        PyErr_Format(PyExc_ValueError, "%s: %s, got %lld", a->name, a->range_msg, v);
    else
        PyErr_Format(PyExc_ValueError, "%s: expected %lld..%lld, got %lld", a->name, a->lo, a->hi, v);
    return -1;
}

static int find_arg(const mix_sig *sig, PyObject *key) {
    for (int i = 0; i < sig->nargs; i++) {
        int eq = PyUnicode_CompareWithASCIIString(key, sig->args[i].name);
        if (eq == 0) return i;
    }
    return -1;
}

/* Collect the objects: positional first, then keywords (kwnames holds their names, their values
 * follow the positional ones in args). */
static int collect(mix_call *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    const mix_sig *sig = c->sig;
    if (nargs > sig->nargs) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", sig->name, sig->nargs, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) c->obj[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int i = find_arg(sig, key);
        if (i < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", sig->name, key);
            return -1;
        }
        if (c->obj[i]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", sig->name, sig->args[i].name);
            return -1;
        }
        c->obj[i] = args[nargs + k];
    }
    for (int i = 0; i < sig->nargs; i++)
        if (!c->obj[i] && !(sig->args[i].flags & MIX_ARG_DEFAULT)) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %d)", sig->name, sig->args[i].name,
                         i + 1);
            return -1;
        }
    return 0;
}

int mix_call_begin(mix_call *c, const mix_sig *sig, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    memset(c, 0, sizeof *c);
    c->sig = sig;
    if (sig->nargs > MIX_CALL_MAX_ARGS) {
        PyErr_Format(PyExc_SystemError, "%s: too many declared arguments", sig->name);
        return -1;
    }
    if (collect(c, args, nargs, kwnames) < 0) return -1;
    /* scalars before arrays: a bad scalar is reported without exporting any array */
    for (int i = 0; i < sig->nargs; i++)
        if (sig->args[i].kind != MIX_ARG_ARRAY && parse_scalar(c, i) < 0) return -1;
    for (int i = 0; i < sig->nargs; i++)
        if (check_range(c, i) < 0) return -1;
    if (sig->precheck && sig->precheck(c) < 0) return -1;
    for (int i = 0; i < sig->nargs; i++) {
        const mix_arg *a = &sig->args[i];
        if (a->kind != MIX_ARG_ARRAY || (a->flags & MIX_ARG_LATE)) continue;
        if (mix_is_none(c, i) && (a->flags & MIX_ARG_NONE_OK)) continue;
        if (!mix_call_take(c, i, 0)) {
            mix_call_release(c);
            return -1;
        }
    }
    return 0;
}

/* ---- arrays, scratch, references ---------------------------------------------------------------- */

static mix_array *take(mix_call *c, PyObject *obj, const char *name, unsigned dtypes, int ndim, int output) {
    if (c->nheld >= MIX_CALL_MAX_ARRAYS) {
        PyErr_Format(PyExc_ValueError, "%s: too many arrays in one call (at most %d)", name, MIX_CALL_MAX_ARRAYS);
        return NULL;
    }
    const mix_sig *sig = c->sig;
    long long stream = -1;
    if (sig->device == MIX_ON_CUDA && sig->stream_arg >= 0) {
        stream = c->i[sig->stream_arg];
        if (stream == 0) stream = 1; /* DLPack's name for the legacy default stream */
    }
    mix_array *a = &c->held[c->nheld];
    if (mix_array_get(obj, name, dtypes, ndim, sig->device, output, stream, a) < 0) return NULL;
    c->nheld++;
    /* all arrays of a CUDA call on one device (the first one's) */
    if (sig->device == MIX_ON_CUDA && c->nheld > 1 && mix_check_same_device(&c->held[0], a) < 0) return NULL;
    return a;
}

mix_array *mix_call_take(mix_call *c, int i, unsigned dtypes) {
    const mix_arg *a = &c->sig->args[i];
    if (mix_is_none(c, i) && (a->flags & MIX_ARG_NONE_OK)) return NULL;
    mix_array *r =
        take(c, mix_obj(c, i), a->name, dtypes ? dtypes : a->dtypes, a->ndim, (a->flags & MIX_ARG_OUTPUT) != 0);
    c->arr[i] = r;
    return r;
}

mix_array *mix_call_take_nested(mix_call *c, PyObject *obj, const char *name, unsigned dtypes, int ndim, int output) {
    return take(c, obj, name, dtypes, ndim, output);
}

void *mix_call_alloc(mix_call *c, size_t bytes) {
    if (c->nscratch >= MIX_CALL_MAX_SCRATCH) {
        PyErr_SetString(PyExc_SystemError, "mix_call_alloc: too many scratch blocks");
        return NULL;
    }
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    c->scratch[c->nscratch++] = p;
    return p;
}

int mix_call_keep(mix_call *c, PyObject *obj) {
    if (c->nkeep >= MIX_CALL_MAX_KEEP) {
        Py_DECREF(obj);
        PyErr_SetString(PyExc_SystemError, "mix_call_keep: too many references");
        return -1;
    }
    c->keep[c->nkeep++] = obj;
    return 0;
}

/* ---- ends of a call ------------------------------------------------------------------------------ */

void mix_call_release(mix_call *c) {
    /* arrays first: a deleter may run Python code, and the kept references may own what it frees */
    for (int k = 0; k < c->nheld; k++) mix_array_release(&c->held[k]);
    c->nheld = 0;
    memset(c->arr, 0, sizeof c->arr);
    for (int k = 0; k < c->nscratch; k++) free(c->scratch[k]);
    c->nscratch = 0;
    for (int k = 0; k < c->nkeep; k++) Py_CLEAR(c->keep[k]);
    c->nkeep = 0;
}

PyObject *mix_call_fail(mix_call *c) {
    mix_call_release(c);
    return NULL;
}

PyObject *mix_raise(mix_call *c, PyObject *exc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyErr_FormatV(exc, fmt, ap);
    va_end(ap);
    return mix_call_fail(c);
}

PyObject *mix_call_finish(mix_call *c, int rc) {
    mix_call_release(c);
    if (rc >= 0) Py_RETURN_NONE;
    for (const mix_err *e = c->sig->errors; e && e->message; e++) {
        if (e->code != rc) continue;
        if (e->exc == MIX_EXC_MEMORY) return PyErr_NoMemory();
        PyErr_SetString(e->exc == MIX_EXC_VALUE ? PyExc_ValueError : PyExc_RuntimeError, e->message);
        return NULL;
    }
    if (rc == -2) return PyErr_NoMemory();
    return PyErr_Format(PyExc_RuntimeError, "%s: internal error code %d", c->sig->name, rc);
}

/* ---- checks -------------------------------------------------------------------------------------- */

int mix_check_shape2(const mix_array *a, int64_t rows, int64_t cols) {
    return (mix_check_dim(a, 0, rows) < 0 || mix_check_dim(a, 1, cols) < 0) ? -1 : 0;
}

int mix_check_dtype(const mix_array *a, unsigned dtypes) {
    if (dtypes & MIX_DT(a->dtype)) return 0;
    char buf[160] = "";
    for (int d = 0; d < MIX_NDTYPES; d++) {
        if (!(dtypes & MIX_DT(d))) continue;
        if (buf[0]) strncat(buf, " or ", sizeof buf - strlen(buf) - 1);
        strncat(buf, mix_dtype_name((mix_dtype)d), sizeof buf - strlen(buf) - 1);
    }
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", a->name, buf, mix_dtype_name(a->dtype));
    return -1;
}

int mix_unpack(PyObject *tuple, const mix_arg *fields, int n, mix_field *out, const char *what) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != n) goto bad;
    for (int k = 0; k < n; k++) {
        PyObject *o = PyTuple_GET_ITEM(tuple, k);
        out[k].obj = o;
        out[k].i = 0;
        out[k].str = NULL;
        if (fields[k].kind == MIX_ARG_INT) {
            if (PyFloat_Check(o) || !PyIndex_Check(o)) goto bad;
            long long v = PyLong_AsLongLong(o);
            if ((v == -1 && PyErr_Occurred()) || v < fields[k].lo || v > fields[k].hi) goto bad;
            out[k].i = v;
        } else if (fields[k].kind == MIX_ARG_STR) {
            Py_ssize_t len;
            const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8AndSize(o, &len) : NULL;
            if (!s || strlen(s) != (size_t)len) goto bad;
            out[k].str = s;
        }
    }
    return 0;
bad:
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError, what);
    return -1;
}

/* ---- module assembly ----------------------------------------------------------------------------- */

/* "name($module, a, b, c=None)\n--\n\nsummary": CPython turns the first part into
 * __text_signature__, so that inspect.signature() and help() show the parameters. */
static char *make_doc(const mix_sig *sig) {
    size_t n = strlen(sig->name) + strlen(sig->summary ? sig->summary : "") + 32;
    for (int i = 0; i < sig->nargs; i++) n += strlen(sig->args[i].name) + 32;
    char *d = malloc(n), *p = d;
    if (!d) return NULL;
    p += sprintf(p, "%s($module", sig->name);
    for (int i = 0; i < sig->nargs; i++) {
        const mix_arg *a = &sig->args[i];
        p += sprintf(p, ", %s", a->name);
        if (a->flags & MIX_ARG_DEFAULT) {
            if (a->kind == MIX_ARG_INT || a->kind == MIX_ARG_BOOL)
                p += sprintf(p, "=%lld", (long long)a->dflt);
            else if (a->kind == MIX_ARG_FLOAT)
                p += sprintf(p, "=%.17g", a->dflt);
            else
                p += sprintf(p, "=None");
        }
    }
    sprintf(p, ")\n--\n\n%s", sig->summary ? sig->summary : "");
    return d;
}

int mix_module_methods(const mix_entry *entries, int n, PyMethodDef *out) {
    for (int k = 0; k < n; k++) {
        char *doc = make_doc(entries[k].sig); /* lives as long as the process: the method table does */
        if (!doc) {
            PyErr_NoMemory();
            return -1;
        }
        out[k].ml_name = entries[k].sig->name;
        out[k].ml_meth = (PyCFunction)(void (*)(void))entries[k].fn;
        out[k].ml_flags = METH_FASTCALL | METH_KEYWORDS;
        out[k].ml_doc = doc;
    }
    memset(&out[n], 0, sizeof out[n]);
    return 0;
}

static int set_item(PyObject *d, const char *key, PyObject *v) {
    if (!v) return -1;
    int r = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return r;
}

static PyObject *arg_constraints(const mix_arg *a) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    int bad = 0;
    if (a->kind == MIX_ARG_ARRAY) {
        PyObject *dts = PyTuple_New(0);
        for (int t = 0; dts && t < MIX_NDTYPES; t++) {
            if (!(a->dtypes & MIX_DT(t))) continue;
            Py_ssize_t m = PyTuple_GET_SIZE(dts);
            if (_PyTuple_Resize(&dts, m + 1) < 0) break;
            PyObject *s = PyUnicode_FromString(mix_dtype_name((mix_dtype)t));
            if (!s) {
                Py_CLEAR(dts);
                break;
            }
            PyTuple_SET_ITEM(dts, m, s);
        }
        bad |= set_item(d, "dtypes", dts) < 0;
        bad |= set_item(d, "ndim", PyLong_FromLong(a->ndim)) < 0;
        bad |= set_item(d, "output", PyBool_FromLong((a->flags & MIX_ARG_OUTPUT) != 0)) < 0;
    }
    if (a->kind == MIX_ARG_INT) {
        bad |= set_item(d, "min", PyLong_FromLongLong(a->lo)) < 0;
        bad |= set_item(d, "max", PyLong_FromLongLong(a->hi)) < 0;
    }
    bad |= set_item(d, "none_ok", PyBool_FromLong((a->flags & MIX_ARG_NONE_OK) != 0)) < 0;
    if (a->flags & MIX_ARG_DEFAULT) {
        PyObject *v = a->kind == MIX_ARG_FLOAT                              ? PyFloat_FromDouble(a->dflt)
                      : (a->kind == MIX_ARG_INT || a->kind == MIX_ARG_BOOL) ? PyLong_FromLongLong((long long)a->dflt)
                                                                            : (Py_INCREF(Py_None), Py_None);
        bad |= set_item(d, "default", v) < 0;
    }
    if (bad) Py_CLEAR(d);
    return d;
}

int mix_module_add_signatures(PyObject *module, const mix_entry *entries, int n) {
    PyObject *table = PyDict_New();
    if (!table) return -1;
    for (int k = 0; k < n; k++) {
        const mix_sig *sig = entries[k].sig;
        PyObject *lst = PyList_New(sig->nargs);
        if (!lst) goto fail;
        for (int i = 0; i < sig->nargs; i++) {
            const mix_arg *a = &sig->args[i];
            PyObject *cons = arg_constraints(a);
            PyObject *t = cons ? Py_BuildValue("(ssN)", a->name, kind_word(a->kind), cons) : NULL;
            if (!t) {
                Py_DECREF(lst);
                goto fail;
            }
            PyList_SET_ITEM(lst, i, t);
        }
        if (set_item(table, sig->name, lst) < 0) goto fail;
    }
    if (PyModule_AddObject(module, "__signatures__", table) < 0) goto fail;
    return 0;
fail:
    Py_DECREF(table);
    return -1;
}
