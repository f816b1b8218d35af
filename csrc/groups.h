/* The number of groups along K for group size g: the one definition for the C core, the CUDA
 * kernels and their module (the last group may be shorter; docs/spec.md §1). Plain C, usable from C++. */
#ifndef MIXLLM_GROUPS_H
#define MIXLLM_GROUPS_H
#include <stdint.h>

static inline int64_t mix_ngroups(int64_t K, int64_t g) { return K > 0 ? (K - 1) / g + 1 : 0; } /* no K+g overflow */

#endif
