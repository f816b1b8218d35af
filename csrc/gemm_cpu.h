/* CPU quantized linear layers (docs/spec.md §2) over a prepacked weight layout. */
#ifndef MIXLLM_GEMM_CPU_H
#define MIXLLM_GEMM_CPU_H
#include <stdint.h>
#include "layout_cpu.h" /* the prepacked layout: row blocks of MIX_RB rows, one section per group */

typedef enum { MIX_IMPL_AUTO = 0, MIX_IMPL_PORTABLE = 1, MIX_IMPL_AVX2 = 2, MIX_IMPL_AVX512VNNI = 3 } mix_impl;

typedef struct {
    int bits;        /* 4 (packed nibbles, asymmetric) or 8 (int8, symmetric) */
    int64_t N, K, g; /* output features, input features, group size */
    int64_t G, Lp;   /* groups, padded group length (multiple of MIX_K_ALIGN) */
    int64_t section; /* bytes per (row block, group): codes + tail (layout_cpu.h) */
    const uint8_t *blob;
    const int64_t *out_index; /* [N] output column of each row, or NULL for identity */
} mix_cpu_weight;

void mix_cpu_weight_geometry(int bits, int64_t N, int64_t K, int64_t g, mix_cpu_weight *w);
int64_t mix_cpu_blob_bytes(const mix_cpu_weight *w);
/* codes: uint8 [N,K] (4-bit, 0..15) or int8 [N,K] (8-bit); zero NULL for 8-bit. */
void mix_cpu_prepack(mix_cpu_weight *w, const void *codes, const float *scale, const uint8_t *zero, uint8_t *blob);

/* y[M, n_out] (dtype out_dtype) = x[M,K] (dtype x_dtype) through each part (columns given by
 * the parts' out_index), plus bias (float32 [n_out] or NULL). Returns 0, -1 on NaN/Inf in x,
 * -2 on memory exhaustion. Runs without the GIL. */
int mix_cpu_qlinear(const void *x, int x_dtype, int64_t M, int64_t K, int64_t g, const mix_cpu_weight *parts,
                    int nparts, const float *bias, void *y, int y_dtype, int64_t n_out, mix_impl impl);
int mix_cpu_has(mix_impl impl);
#endif
