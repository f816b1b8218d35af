/* Number formats of docs/spec.md §1: group-wise weight quantizers, per-token-group activation
 * quantizer, int4 packing. Plain C; every function here is the reference path. */
#ifndef MIXLLM_QUANT_H
#define MIXLLM_QUANT_H
#include <stdint.h>
#include <stddef.h>

#include "groups.h" /* mix_ngroups */

/* Asymmetric b-bit parameters for values with range [lo, hi] (0 is always included,
 * so that zero is exact); all-equal (zero-width) groups get scale 1, zero 0. */
void mix_asym_params(float lo, float hi, int bits, float *scale, uint8_t *zero);
static inline uint8_t mix_asym_code(float w, float scale, uint8_t zero, int bits);
/* Symmetric b-bit: scale = max|w| / (2^(b-1) - 1). */
float mix_sym_scale(float absmax, int bits);
static inline int8_t mix_sym_code(float w, float scale, int bits);

#include <math.h>
static inline uint8_t mix_asym_code(float w, float scale, uint8_t zero, int bits) {
    float q = rintf(w / scale) + (float)zero, qmax = (float)((1 << bits) - 1);
    q = q >= 0.f ? (q > qmax ? qmax : q) : 0.f; /* NaN -> 0: a NaN float-to-int cast is undefined */
    return (uint8_t)q;
}
static inline int8_t mix_sym_code(float w, float scale, int bits) {
    float qmax = (float)((1 << (bits - 1)) - 1), q = rintf(w / scale);
    q = q >= -qmax ? (q > qmax ? qmax : q) : -qmax; /* NaN -> -qmax (see above) */
    return (int8_t)q;
}

/* Row-wise group quantizers over W[N,K] (float32). Return 0, or -1 if W holds NaN/Inf. */
int mix_quantize_asym(const float *w, int64_t N, int64_t K, int64_t g, int bits, uint8_t *q, float *scale,
                      uint8_t *zero);
int mix_quantize_sym(const float *w, int64_t N, int64_t K, int64_t g, int bits, int8_t *q, float *scale);
void mix_dequantize(const void *q, int is_signed, const float *scale, const uint8_t *zero, int64_t N, int64_t K,
                    int64_t g, float *out);

/* Activations: x[M,K] of dtype (mix_dtype) -> int8 codes and scales [M, G]. -1 on NaN/Inf. */
int mix_quantize_activation(const void *x, int dtype, int64_t M, int64_t K, int64_t g, int8_t *q, float *scale);

void mix_pack_int4(const uint8_t *q, int64_t N, int64_t K, uint8_t *out);
void mix_unpack_int4(const uint8_t *p, int64_t N, int64_t K, uint8_t *out);
#endif
