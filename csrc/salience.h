#ifndef MIXLLM_SALIENCE_H
#define MIXLLM_SALIENCE_H
#include <stdint.h>
/* acc[N] += |t + t^2/2|, t = rowwise dot(grad[N,K], delta[N,K]); grad float32/16/bf16. */
void mix_salience_accumulate(double *acc, const void *grad, int grad_dtype, const float *delta, int64_t N, int64_t K);
#endif
