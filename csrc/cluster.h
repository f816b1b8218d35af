/* Weighted 1-D k-means per row (CMPQ's non-uniform, clustered quantization levels). */
#ifndef MIXLLM_CLUSTER_H
#define MIXLLM_CLUSTER_H
#include <stdint.h>

/* x: float32 [R, n]; wt: float32 [R, n] non-negative weights or NULL (all 1); k: 1..256 levels per row
 * (ks: optional [R] per-row level counts <= k; NULL: k for all); iters: Lloyd iterations at most.
 * Outputs: centroids [R, k] ascending (entries past a row's count repeat its last level), codes uint8 [R, n].
 * Deterministic: init at weighted quantiles (i + 0.5) / k. Returns 0; -1 NaN/Inf; -2 out of memory. */
int mix_kmeans1d(const float *x, const float *wt, int64_t R, int64_t n, int k, const int32_t *ks, int iters,
                 float *centroids, uint8_t *codes);
#endif
