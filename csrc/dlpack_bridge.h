/* The one place where Python objects become raw arrays: every op takes its array
 * arguments through mix_array_get(), which speaks the DLPack exchange protocol and
 * validates dtype, ndim, shape, strides, byte offset and device. */
#ifndef MIXLLM_DLPACK_BRIDGE_H
#define MIXLLM_DLPACK_BRIDGE_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include "dlpack.h"

#define MIX_MAX_DIMS 4

typedef enum { MIX_F32 = 0, MIX_F16, MIX_BF16, MIX_F64, MIX_I8, MIX_U8, MIX_I32, MIX_I64, MIX_NDTYPES } mix_dtype;
#define MIX_DT(d)  (1u << (d))
#define MIX_FLOATS (MIX_DT(MIX_F32) | MIX_DT(MIX_F16) | MIX_DT(MIX_BF16))

typedef enum { MIX_ON_CPU = 1, MIX_ON_CUDA = 2 } mix_device;

typedef struct {
    const char *name;  /* argument name, for error messages */
    PyObject *capsule; /* the consumed capsule (owned), NULL when not taken */
    void *managed;     /* DLManagedTensor* or DLManagedTensorVersioned* */
    int versioned;
    int read_only;
    void *data; /* first element (byte_offset applied); may be NULL when empty */
    int ndim;
    int64_t shape[MIX_MAX_DIMS];
    int64_t numel;
    mix_dtype dtype;
    mix_device device;
    int device_id;
} mix_array;

/* Take `obj` (anything with __dlpack__/__dlpack_device__) as argument `name`.
 * allowed_dtypes: MIX_DT() mask; ndim: required ndim (-1: any up to MIX_MAX_DIMS);
 * device: required device (0: CPU or CUDA); writable: output arrays must not be read-only;
 * stream: for CUDA producers, the consumer stream to pass to __dlpack__ (-1: none given).
 * Returns 0, or -1 with a Python exception set (and `a` released). */
int mix_array_get(PyObject *obj, const char *name, unsigned allowed_dtypes, int ndim, int device, int writable,
                  long long stream, mix_array *a);
void mix_array_release(mix_array *a);

/* Shape checks that raise ValueError naming the argument. dim < 0 counts from the end. */
int mix_check_dim(const mix_array *a, int dim, int64_t expected);
int mix_check_same_device(const mix_array *a, const mix_array *b);
const char *mix_dtype_name(mix_dtype d);
size_t mix_dtype_size(mix_dtype d);

/* Scalar conversions used by the CPU paths (portable, round-to-nearest-even). */
float mix_half_to_float(uint16_t h);
uint16_t mix_float_to_half(float f);
static inline float mix_bf16_to_float(uint16_t b) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}
uint16_t mix_float_to_bf16(float f);
/* Read element i of a float array of dtype d (F32/F16/BF16/F64) as float / store one. */
static inline float mix_load_float(const void *p, mix_dtype d, int64_t i) {
    switch (d) {
    case MIX_F32: return ((const float *)p)[i];
    case MIX_F16: return mix_half_to_float(((const uint16_t *)p)[i]);
    case MIX_BF16: return mix_bf16_to_float(((const uint16_t *)p)[i]);
    default: return (float)((const double *)p)[i];
    }
}
static inline void mix_store_float(void *p, mix_dtype d, int64_t i, float v) {
    switch (d) {
    case MIX_F32: ((float *)p)[i] = v; break;
    case MIX_F16: ((uint16_t *)p)[i] = mix_float_to_half(v); break;
    case MIX_BF16: ((uint16_t *)p)[i] = mix_float_to_bf16(v); break;
    default: ((double *)p)[i] = v; break;
    }
}
#endif
