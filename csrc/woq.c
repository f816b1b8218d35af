/* Weight-only linear on the CPU: dequantize on the fly, one output row (K floats, in cache) at a
 * time, and take its dot products with every token. x is converted to float32 once. This is the
 * decode-time path (small M); for long prompts mixllm.nn_weight_only may instead dequantize once and
 * call the BLAS GEMM. Rows are split across OpenMP threads. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "woq.h"
#include <math.h>
#include <stdlib.h>

void mix_woq_dequant_row(const mix_woq_weight *w, int64_t n, float *out) {
    const uint8_t *c = w->codes + n * w->K;
    if (w->kind == 0) {
        int64_t G = (w->K + w->g - 1) / w->g;
        const float *s = w->scale + n * G, *o = w->offset + n * G;
        for (int64_t j = 0; j < G; j++) {
            int64_t k1 = (j + 1) * w->g < w->K ? (j + 1) * w->g : w->K;
            for (int64_t k = j * w->g; k < k1; k++) out[k] = (float)c[k] * s[j] + o[j];
        }
    } else {
        for (int64_t k = 0; k < w->K; k++) out[k] = w->codebook[k * w->L + c[k]];
    }
    if (w->rowptr)
        for (int64_t t = w->rowptr[n]; t < w->rowptr[n + 1]; t++) out[w->cols[t]] = w->vals[t];
}

void mix_woq_dequantize(const mix_woq_weight *w, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < w->N; n++) mix_woq_dequant_row(w, n, out + n * w->K);
}

int mix_woq_linear(const void *x, int xdt, int64_t M, const mix_woq_weight *w, const float *bias, void *y, int ydt) {
    int64_t K = w->K, N = w->N;
    float *xf = malloc((size_t)(M * K + 1) * sizeof(float));
    float *yf = malloc((size_t)(M * N + 1) * sizeof(float));
    if (!xf || !yf) {
        free(xf);
        free(yf);
        return -2;
    }
    for (int64_t i = 0; i < M * K; i++) {
        xf[i] = mix_load_float(x, (mix_dtype)xdt, i);
        if (!isfinite(xf[i])) {
            free(xf);
            free(yf);
            return -1;
        }
    }
    int rc = 0;
#pragma omp parallel
    {
        float *row = malloc((size_t)K * sizeof(float));
        if (!row) {
#pragma omp atomic write
            rc = -2;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!row) continue;
            mix_woq_dequant_row(w, n, row);
            float b = bias ? bias[n] : 0.f;
            for (int64_t m = 0; m < M; m++) {
                const float *xm = xf + m * K;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < K; k++) acc += xm[k] * row[k];
                yf[m * N + n] = acc + b;
            }
        }
        free(row);
    }
    if (rc == 0)
        for (int64_t i = 0; i < M * N; i++) mix_store_float(y, (mix_dtype)ydt, i, yf[i]);
    free(xf);
    free(yf);
    return rc;
}
