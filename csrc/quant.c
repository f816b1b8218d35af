/* docs/spec.md §1 number formats: the reference quantizers (round-half-to-even via rintf in the
 * default rounding mode, float32 arithmetic in the order the NumPy oracle uses). */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "quant.h"
#include <math.h>

void mix_asym_params(float lo, float hi, int bits, float *scale, uint8_t *zero) {
    if (lo > 0.f) lo = 0.f;
    if (hi < 0.f) hi = 0.f;
    float qmax = (float)((1 << bits) - 1);
    float s = (hi - lo) / qmax;
    if (!(s > 0.f)) {
        *scale = 1.f;
        *zero = 0;
        return;
    }
    float z = rintf(-lo / s);
    z = z >= 0.f ? (z > qmax ? qmax : z) : 0.f; /* NaN (lo = -Inf) -> 0 before the uint8 cast */
    *scale = s;
    *zero = (uint8_t)z;
}

float mix_sym_scale(float absmax, int bits) {
    float s = absmax / (float)((1 << (bits - 1)) - 1);
    return s > 0.f ? s : 1.f;
}

int mix_quantize_asym(const float *w, int64_t N, int64_t K, int64_t g, int bits, uint8_t *q, float *scale,
                      uint8_t *zero) {
    int64_t G = mix_ngroups(K, g);
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t n = 0; n < N; n++) {
        const float *row = w + n * K;
        for (int64_t j = 0; j < G; j++) {
            int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            float lo = INFINITY, hi = -INFINITY;
            for (int64_t k = k0; k < k1; k++) {
                if (!isfinite(row[k])) bad = 1;
                lo = fminf(lo, row[k]);
                hi = fmaxf(hi, row[k]);
            }
            float s;
            uint8_t z;
            mix_asym_params(lo, hi, bits, &s, &z);
            scale[n * G + j] = s;
            zero[n * G + j] = z;
            for (int64_t k = k0; k < k1; k++) q[n * K + k] = mix_asym_code(row[k], s, z, bits);
        }
    }
    return bad ? -1 : 0;
}

int mix_quantize_sym(const float *w, int64_t N, int64_t K, int64_t g, int bits, int8_t *q, float *scale) {
    int64_t G = mix_ngroups(K, g);
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t n = 0; n < N; n++) {
        const float *row = w + n * K;
        for (int64_t j = 0; j < G; j++) {
            int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            float m = 0.f;
            for (int64_t k = k0; k < k1; k++) {
                if (!isfinite(row[k])) bad = 1;
                m = fmaxf(m, fabsf(row[k]));
            }
            float s = mix_sym_scale(m, bits);
            scale[n * G + j] = s;
            for (int64_t k = k0; k < k1; k++) q[n * K + k] = mix_sym_code(row[k], s, bits);
        }
    }
    return bad ? -1 : 0;
}

void mix_dequantize(const void *q, int is_signed, const float *scale, const uint8_t *zero, int64_t N, int64_t K,
                    int64_t g, float *out) {
    int64_t G = mix_ngroups(K, g);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            int64_t j = k / g;
            float c = is_signed ? (float)((const int8_t *)q)[n * K + k] : (float)((const uint8_t *)q)[n * K + k];
            float z = zero ? (float)zero[n * G + j] : 0.f;
            out[n * K + k] = (c - z) * scale[n * G + j];
        }
}

int mix_quantize_activation(const void *x, int dtype, int64_t M, int64_t K, int64_t g, int8_t *q, float *scale) {
    int64_t G = mix_ngroups(K, g);
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < G; j++) {
            int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            float amax = 0.f;
            for (int64_t k = k0; k < k1; k++) {
                float v = mix_load_float(x, (mix_dtype)dtype, m * K + k);
                if (!isfinite(v)) bad = 1;
                amax = fmaxf(amax, fabsf(v));
            }
            float s = mix_sym_scale(amax, 8);
            scale[m * G + j] = s;
            for (int64_t k = k0; k < k1; k++)
                q[m * K + k] = mix_sym_code(mix_load_float(x, (mix_dtype)dtype, m * K + k), s, 8);
        }
    }
    return bad ? -1 : 0;
}

/* Two codes per byte along K: low nibble = even k, high nibble = odd k; an odd K's last
 * byte has a zero high nibble. */
void mix_pack_int4(const uint8_t *q, int64_t N, int64_t K, uint8_t *out) {
    int64_t Kp = (K + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < Kp; b++) {
            uint8_t lo = q[n * K + 2 * b] & 15, hi = 2 * b + 1 < K ? q[n * K + 2 * b + 1] & 15 : 0;
            out[n * Kp + b] = (uint8_t)(lo | (hi << 4));
        }
}

void mix_unpack_int4(const uint8_t *p, int64_t N, int64_t K, uint8_t *out) {
    int64_t Kp = (K + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            uint8_t b = p[n * Kp + k / 2];
            out[n * K + k] = (k & 1) ? (b >> 4) : (b & 15);
        }
}
