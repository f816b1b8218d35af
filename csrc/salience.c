/* MixLLM salience (docs/spec.md §3): per output feature c, with t = g_c . delta_c for one
 * calibration sequence's weight gradient g, accumulate |t + t^2 / 2| (first- plus
 * second-order Taylor term, Fisher approximation of the Hessian). */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "salience.h"

void mix_salience_accumulate(double *acc, const void *grad, int grad_dtype, const float *delta, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < N; c++) {
        double t = 0;
        const float *d = delta + c * K;
        if (grad_dtype == MIX_F32) {
            const float *gr = (const float *)grad + c * K;
            for (int64_t k = 0; k < K; k++) t += (double)gr[k] * d[k];
        } else {
            for (int64_t k = 0; k < K; k++) t += (double)mix_load_float(grad, (mix_dtype)grad_dtype, c * K + k) * d[k];
        }
        double v = t + 0.5 * t * t;
        acc[c] += v < 0 ? -v : v;
    }
}
