/* SliM-LLM's salience-weighted quantizer calibration (SQC, arXiv 2405.14917 §3.3): per row of a
 * weight group, search the range scale factor tau that minimises a salience-weighted |error|^norm. */
#ifndef MIXLLM_SLIM_H
#define MIXLLM_SLIM_H
#include <stdint.h>

typedef struct {
    const double *threshold; /* [G] element-salience threshold per group (w^2/u^2 >= it: salient); NULL: none */
    double lambda;           /* weight of the salient elements' error (1: plain search) */
    double norm;             /* error exponent (reference implementation: 2.4) */
    double tau_range;        /* search p in [1 - tau_range, 1 + tau_range] */
    int tau_n;               /* steps on each side of 1 */
} mix_slim_ctx;

/* Fit one row's group: v[len] values, u[len] diagonal of the upper Cholesky factor of H^-1 (salience
 * w^2/u^2), bits 1..8. Result as dequant = code * scale + offset (bits == 1: binarization around the
 * mean, as in the reference implementation). Matches mix_gptq_opts.fit. */
void mix_slim_fit(const void *ctx, const double *v, const double *u, int64_t len, int bits, int64_t group, float *scale,
                  float *offset);
#endif
