/* DLPack consumer: turns Python array objects into validated raw views.
 *
 * Ownership (DLPack's Python protocol): we ask the producer for a capsule with
 * __dlpack__(), take its managed tensor, rename the capsule "used_dltensor" (or
 * "used_dltensor_versioned") so that the producer's capsule destructor no longer
 * frees it, and call the tensor's deleter exactly once in mix_array_release(). */
#include "dlpack_bridge.h"
#include <string.h>

static const char *dtype_names[MIX_NDTYPES] = {"float32", "float16", "bfloat16", "float64",
                                               "int8",    "uint8",   "int32",    "int64"};
static const size_t dtype_sizes[MIX_NDTYPES] = {4, 2, 2, 8, 1, 1, 4, 8};

const char *mix_dtype_name(mix_dtype d) { return (unsigned)d < MIX_NDTYPES ? dtype_names[d] : "?"; }
size_t mix_dtype_size(mix_dtype d) { return (unsigned)d < MIX_NDTYPES ? dtype_sizes[d] : 0; }

static int dtype_from_dl(DLDataType t, mix_dtype *out) {
    if (t.lanes != 1) return -1;
    if (t.code == kDLFloat && t.bits == 32)
        *out = MIX_F32;
    else if (t.code == kDLFloat && t.bits == 16)
        *out = MIX_F16;
    else if (t.code == kDLBfloat && t.bits == 16)
        *out = MIX_BF16;
    else if (t.code == kDLFloat && t.bits == 64)
        *out = MIX_F64;
    else if (t.code == kDLInt && t.bits == 8)
        *out = MIX_I8;
    else if (t.code == kDLUInt && t.bits == 8)
        *out = MIX_U8;
    else if (t.code == kDLInt && t.bits == 32)
        *out = MIX_I32;
    else if (t.code == kDLInt && t.bits == 64)
        *out = MIX_I64;
    else
        return -1;
    return 0;
}

static void allowed_list(unsigned mask, char *buf, size_t n) {
    buf[0] = 0;
    for (int d = 0; d < MIX_NDTYPES; d++) {
        if (!(mask & MIX_DT(d))) continue;
        if (buf[0]) strncat(buf, " or ", n - strlen(buf) - 1);
        strncat(buf, dtype_names[d], n - strlen(buf) - 1);
    }
}

void mix_array_release(mix_array *a) {
    if (a->managed) {
        /* A deleter may run Python code (a producer's finalizer, a ctypes callback) that would
         * clobber or swallow the exception we are about to report: keep it aside meanwhile. */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (a->versioned) {
            DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)a->managed;
            if (m->deleter) m->deleter(m);
        } else {
            DLManagedTensor *m = (DLManagedTensor *)a->managed;
            if (m->deleter) m->deleter(m);
        }
        PyErr_Restore(et, ev, tb);
        a->managed = NULL;
    }
    Py_CLEAR(a->capsule);
    a->data = NULL;
}

/* Ask for a capsule: first the versioned protocol (read-only NumPy arrays export only
 * through it), then the legacy one for producers that do not know max_version. */
static PyObject *request_capsule(PyObject *obj, const char *name, int is_cuda, long long stream) {
    PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (!meth) return NULL;
    PyObject *kwargs = PyDict_New(), *args = PyTuple_New(0), *cap = NULL;
    if (!kwargs || !args) goto done;
    if (is_cuda && stream != -1) {
        PyObject *s = PyLong_FromLongLong(stream);
        if (!s || PyDict_SetItemString(kwargs, "stream", s) < 0) {
            Py_XDECREF(s);
            goto done;
        }
        Py_DECREF(s);
    }
    PyObject *ver = Py_BuildValue("(ii)", 1, 0);
    if (!ver || PyDict_SetItemString(kwargs, "max_version", ver) < 0) {
        Py_XDECREF(ver);
        goto done;
    }
    Py_DECREF(ver);
    cap = PyObject_Call(meth, args, kwargs);
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* producer predates max_version */
        PyErr_Clear();
        PyDict_DelItemString(kwargs, "max_version");
        cap = PyObject_Call(meth, args, kwargs);
    }
    if (!cap) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_Format(PyExc_TypeError, "%s: could not export the array through __dlpack__ (%S)", name,
                     ev ? ev : Py_None);
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    }
done:
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    Py_DECREF(meth);
    return cap;
}

static int query_device(PyObject *obj, const char *name, int *dev_type, int *dev_id) {
    PyObject *r = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (!r) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "%s: expected an array supporting DLPack (a torch tensor or NumPy array), "
                     "got %.100s",
                     name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int ok = PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 2;
    long t = ok ? PyLong_AsLong(PyTuple_GET_ITEM(r, 0)) : -1;
    long i = ok ? PyLong_AsLong(PyTuple_GET_ITEM(r, 1)) : -1;
    Py_DECREF(r);
    if (!ok || PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() must return a (device_type, device_id) tuple", name);
        return -1;
    }
    *dev_type = (int)t;
    *dev_id = (int)i;
    return 0;
}

int mix_array_get(PyObject *obj, const char *name, unsigned allowed_dtypes, int ndim, int device, int writable,
                  long long stream, mix_array *a) {
    memset(a, 0, sizeof(*a));
    a->name = name;
    if (obj == NULL || obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: expected an array, got None", name);
        return -1;
    }
    int dev_type, dev_id;
    /* A raw, unused DLPack capsule (torch.utils.dlpack.to_dlpack, the C-level form of the
     * protocol) is taken as it is: the fast path of per-call arguments. No stream is
     * negotiated for it: its producer must have made it on the consumer's stream. */
    const int raw = PyCapsule_CheckExact(obj);
    if (raw) {
        DLTensor *rt = NULL;
        if (PyCapsule_IsValid(obj, "dltensor_versioned")) {
            DLManagedTensorVersioned *m = PyCapsule_GetPointer(obj, "dltensor_versioned");
            rt = m ? &m->dl_tensor : NULL;
        } else if (PyCapsule_IsValid(obj, "dltensor")) {
            DLManagedTensor *m = PyCapsule_GetPointer(obj, "dltensor");
            rt = m ? &m->dl_tensor : NULL;
        }
        if (!rt) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected an unused \"dltensor\" capsule or an array supporting DLPack",
                         name);
            return -1;
        }
        dev_type = rt->device.device_type;
        dev_id = rt->device.device_id;
    } else if (query_device(obj, name, &dev_type, &dev_id) < 0) {
        return -1;
    }
    if (dev_type != kDLCPU && dev_type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "%s: arrays must live on the CPU or a CUDA device, got DLPack device type %d",
                     name, dev_type);
        return -1;
    }
    if (device && dev_type != device) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %s array, got one on %s", name,
                     device == MIX_ON_CPU ? "CPU" : "CUDA", dev_type == kDLCPU ? "the CPU" : "a CUDA device");
        return -1;
    }
    PyObject *cap = raw ? (Py_INCREF(obj), obj) : request_capsule(obj, name, dev_type == kDLCUDA, stream);
    if (!cap) return -1;
    DLTensor *t = NULL;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!m || PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) goto bad_capsule;
        a->managed = m;
        a->versioned = 1;
        if (m->version.major != 1) {
            a->capsule = cap;
            PyErr_Format(PyExc_ValueError, "%s: unsupported DLPack major version %u", name, m->version.major);
            goto fail;
        }
        a->read_only = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
        t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (!m || PyCapsule_SetName(cap, "used_dltensor") < 0) goto bad_capsule;
        a->managed = m;
        t = &m->dl_tensor;
    } else {
    bad_capsule:
        PyErr_Clear();
        Py_DECREF(cap);
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__() did not return an unused \"dltensor\" capsule", name);
        return -1;
    }
    a->capsule = cap;
    if (t->device.device_type != dev_type) {
        PyErr_Format(PyExc_ValueError, "%s: the DLPack tensor's device disagrees with __dlpack_device__()", name);
        goto fail;
    }
    a->device = (mix_device)dev_type;
    a->device_id = t->device.device_id;
    if (dtype_from_dl(t->dtype, &a->dtype) < 0 || !(allowed_dtypes & MIX_DT(a->dtype))) {
        char buf[160];
        allowed_list(allowed_dtypes, buf, sizeof buf);
        if (dtype_from_dl(t->dtype, &a->dtype) < 0)
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got DLPack dtype (code %d, %d bits, %d lanes)", name,
                         buf, t->dtype.code, t->dtype.bits, t->dtype.lanes);
        else
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", name, buf, dtype_names[a->dtype]);
        goto fail;
    }
    if (t->ndim < 0 || t->ndim > MIX_MAX_DIMS || (ndim >= 0 && t->ndim != ndim)) {
        if (ndim >= 0)
            PyErr_Format(PyExc_ValueError, "%s: expected a %d-D array, got %d-D", name, ndim, (int)t->ndim);
        else
            PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %d", name, MIX_MAX_DIMS,
                         (int)t->ndim);
        goto fail;
    }
    a->ndim = t->ndim;
    a->numel = 1;
    if (t->ndim > 0 && !t->shape) {
        PyErr_Format(PyExc_ValueError, "%s: DLPack tensor has no shape", name);
        goto fail;
    }
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative extent %lld in dimension %d", name, (long long)t->shape[d], d);
            goto fail;
        }
        a->shape[d] = t->shape[d];
        /* Bound every extent, even in an empty array: the ops do arithmetic on them (K + 1, ...). */
        if (t->shape[d] > INT64_MAX / 16 || (a->numel > 0 && t->shape[d] > (INT64_MAX / 16) / a->numel)) {
            PyErr_Format(PyExc_ValueError, "%s: array too large", name);
            goto fail;
        }
        a->numel *= t->shape[d];
    }
    /* The C core reads compact row-major memory only; size-1 dims may have any stride. */
    if (t->strides && a->numel > 0) {
        int64_t expect = 1;
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (t->shape[d] != 1 && t->strides[d] != expect) {
                PyErr_Format(PyExc_ValueError,
                             "%s: expected a C-contiguous (row-major) array; got strides that are "
                             "not compact (call .contiguous() / np.ascontiguousarray first)",
                             name);
                goto fail;
            }
            expect *= t->shape[d];
        }
    }
    size_t es = dtype_sizes[a->dtype];
    if (a->numel > 0) {
        if (!t->data) {
            PyErr_Format(PyExc_ValueError, "%s: DLPack tensor has a NULL data pointer", name);
            goto fail;
        }
        if (t->byte_offset > (uint64_t)PTRDIFF_MAX || t->byte_offset > (uint64_t)(UINTPTR_MAX - (uintptr_t)t->data)) {
            PyErr_Format(PyExc_ValueError, "%s: DLPack byte_offset overflows the address space", name);
            goto fail;
        }
        a->data = (void *)((uintptr_t)t->data + (uintptr_t)t->byte_offset);
        if (((uintptr_t)a->data) % es) {
            PyErr_Format(PyExc_ValueError, "%s: data is not aligned to its %zu-byte element size", name, es);
            goto fail;
        }
    }
    if (writable && a->read_only) {
        PyErr_Format(PyExc_ValueError, "%s: output array is read-only", name);
        goto fail;
    }
    return 0;
fail:
    mix_array_release(a);
    return -1;
}

int mix_check_dim(const mix_array *a, int dim, int64_t expected) {
    int d = dim < 0 ? a->ndim + dim : dim;
    if (d < 0 || d >= a->ndim || a->shape[d] != expected) {
        PyErr_Format(PyExc_ValueError, "%s: expected size %lld in dimension %d, got %lld", a->name, (long long)expected,
                     dim, d >= 0 && d < a->ndim ? (long long)a->shape[d] : -1LL);
        return -1;
    }
    return 0;
}

int mix_check_same_device(const mix_array *a, const mix_array *b) {
    if (a->device != b->device || a->device_id != b->device_id) {
        PyErr_Format(PyExc_ValueError, "%s and %s must be on the same device", a->name, b->name);
        return -1;
    }
    return 0;
}

/* IEEE half <-> float, round-to-nearest-even, subnormals and Inf/NaN kept. */
float mix_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f)
        u = sign | 0x7f800000u | (man << 13);
    else if (exp)
        u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man)
        u = sign;
    else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    union {
        uint32_t u;
        float f;
    } v;
    v.u = u;
    return v.f;
}

uint16_t mix_float_to_half(float f) {
    union {
        float f;
        uint32_t u;
    } v;
    v.f = f;
    uint32_t x = v.u, sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t man = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp), half = 1u << (shift - 1);
        uint32_t r = man >> shift, rem = man & ((1u << shift) - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++; /* may carry into the exponent: correct */
    return (uint16_t)(sign | r);
}

uint16_t mix_float_to_bf16(float f) {
    union {
        float f;
        uint32_t u;
    } v;
    v.f = f;
    if ((v.u & 0x7fffffff) > 0x7f800000) return (uint16_t)((v.u >> 16) | 0x40); /* quiet NaN */
    uint32_t lsb = (v.u >> 16) & 1;
    return (uint16_t)((v.u + 0x7fff + lsb) >> 16);
}
