/* GPTQ (Frantar et al. 2022) with group-wise scales, group reordering and a clipping
 * search; shared by MixLLM's 4/8-bit parts, the GPTQ baseline and SliM-LLM. */
#ifndef MIXLLM_GPTQ_H
#define MIXLLM_GPTQ_H
#include <stdint.h>

typedef struct {
    int bits;
    int64_t group_size;
    int symmetric;               /* 1: int8 codes, zero 0; 0: uint8 codes with zero point */
    double damp;                 /* fraction of mean(diag H) added to the diagonal */
    int group_order;             /* quantize groups in descending order of their diag(H) mass */
    int clip_grid;               /* >0: try range shrink factors 1 - i/100, i = 0..clip_grid; keep least error */
    const float *bits_per_group; /* optional [N,G] per-group bit-widths (SliM-LLM); NULL: `bits` */
    /* Optional custom group quantizer (SliM-LLM's salience-weighted calibration, csrc/slim.c).
     * When set, fit() chooses each row's group parameters (v: the group's current values,
     * u: the matching diagonal of U, both in processing order) as dequant = code*scale + offset,
     * codes are uint8 in 0..2^bits-1, and offsets go to offset_out [N,G]; zero_out stays 0. */
    void (*fit)(const void *ctx, const double *v, const double *u, int64_t len, int bits, int64_t group, float *scale,
                float *offset);
    const void *fit_ctx;
    float *offset_out;
    /* Optional [K,K] upper Cholesky factor U of the damped H^-1, natural column order (used only
     * with group_order off): skips the O(K^3) factorization, e.g. when a LAPACK one is at hand. */
    const double *u_in;
} mix_gptq_opts;

/* w: float32 [N,K]; H: float64 [K,K] or NULL (no error compensation: RTN with clip search).
 * Outputs: codes [N,K] (uint8, or int8 when symmetric), scale [N,G], zero [N,G] (0 when symmetric).
 * Returns 0; -1 NaN/Inf in w or H; -2 out of memory; -3 H not positive definite after damping. */
int mix_gptq(const float *w, int64_t N, int64_t K, const double *H, const mix_gptq_opts *o, void *codes, float *scale,
             uint8_t *zero);
#endif
