/* Weight-only quantized linear layers on the CPU (SliM-LLM, CMPQ, RTN/GPTQ baselines). */
#ifndef MIXLLM_WOQ_H
#define MIXLLM_WOQ_H
#include <stdint.h>

/* A weight W[N,K] held as uint8 codes in one of two forms:
 *  group:    W[n,k] = codes[n,k] * scale[n, k/g] + offset[n, k/g]   (any bits per group)
 *  codebook: W[n,k] = codebook[k, codes[n,k]]                         (levels per input channel, L per row)
 * plus, for either, an optional sparse part in CSR by output row whose values replace W[n, col]. */
typedef struct {
    int kind; /* 0 group, 1 codebook */
    int64_t N, K, g, L;
    const uint8_t *codes;
    const float *scale, *offset;  /* group */
    const float *codebook;        /* codebook [K, L] */
    const int64_t *rowptr, *cols; /* sparse (NULL: none) */
    const float *vals;
} mix_woq_weight;

void mix_woq_dequant_row(const mix_woq_weight *w, int64_t n, float *out);
void mix_woq_dequantize(const mix_woq_weight *w, float *out);
/* y[M,N] (dtype ydt) = x[M,K] (dtype xdt) @ W^T + bias; dequantizes one output row at a time.
 * Returns 0, -1 on NaN/Inf in x, -2 out of memory. */
int mix_woq_linear(const void *x, int xdt, int64_t M, const mix_woq_weight *w, const float *bias, void *y, int ydt);
#endif
