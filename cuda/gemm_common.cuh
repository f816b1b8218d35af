// Pieces shared by the GEMM kernels (cuda/w4a8.cu: mma.sync, cuda/w4a8_decode.cu: decode,
// cuda/w4a8_sm90.cu: wgmma): the output store in y's dtype, programmatic dependent launch's wait and
// trigger, the split-K reduction kernel, and the ordering of a mixed layer's two parts. Each
// translation unit gets its own copy (anonymous namespace).
#pragma once
#include "mixllm_cuda.h"
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

/* Weights are read once per token block, by one block at a time: keep them out of L1. */
__device__ __forceinline__ uint4 ld_stream(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* Four 4-bit codes (one per byte, 0..15) minus their zero point, as four int8. */
__device__ __forceinline__ uint32_t sub_zero(uint32_t q, uint32_t zz) { return ((q | 0x80808080u) - zz) ^ 0x80808080u; }

/* v rounded to an output element's type (float, fp16 or bf16) and stored at p */
__device__ __forceinline__ void to_out(float *p, float v) { *p = v; }
__device__ __forceinline__ void to_out(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void to_out(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* ... with the type given at run time: dt 0 float, 1 fp16, 2 bf16 (mixc_gemm.ydtype) */
__device__ __forceinline__ void store_out(void *y, int dt, int64_t i, float v) {
    if (dt == 0)
        to_out((float *)y + i, v);
    else if (dt == 1)
        to_out((__half *)y + i, v);
    else
        to_out((__nv_bfloat16 *)y + i, v);
}

/* Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start
 * while the previous kernel on the stream still runs; it must wait before reading what that
 * kernel wrote. Both are no-ops on older GPUs and without the attribute. */
__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* The arguments every GEMM kernel takes from the call (its own Args struct; the rest are set by its launcher). */
template <class A> void fill_common_args(A &a, const mixc_gemm *g) {
    a.sa = g->sa;
    a.M = g->M;
    a.Kp = g->Kp;
    a.n_out = g->n_out;
    a.G = g->G;
    a.spg = g->spg;
    a.ydt = g->ydtype;
    a.bias = g->bias;
    a.y = g->y;
}

/* Let a launch use programmatic dependent launch when pdl (sm_90: the kernel may start before the
 * previous one on the stream has ended, and must griddepcontrol.wait before reading its output). */
inline void allow_pdl(cudaLaunchConfig_t &lc, cudaLaunchAttribute (&attr)[1], bool pdl) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    lc.attrs = attr;
    lc.numAttrs = pdl ? 1 : 0;
}

/* Split-K reduction in a fixed order (deterministic), plus bias, in y's dtype. Launched with programmatic
 * dependent launch where the GEMM is (its launch then overlaps the GEMM's last CTAs): it waits for the
 * GEMM's grid to complete before reading the partial sums (a no-op wait without PDL). */
__global__ void splitk_finish(const float *ws, int splits, int64_t total, int64_t n_out, const float *bias, void *y,
                              int dt) {
    grid_dep_wait();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int s = 0; s < splits; s++) v += ws[s * total + i];
        if (bias) v += bias[i % n_out];
        store_out(y, dt, i, v);
    }
}

inline cudaError_t launch_splitk_finish(const mixc_gemm *g, int splits, int max_blocks, bool pdl, cudaStream_t stream) {
    const int64_t total = g->M * g->n_out;
    int64_t blocks = (total + 255) / 256;
    if (blocks > max_blocks) blocks = max_blocks;
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3((unsigned)blocks);
    lc.blockDim = dim3(256);
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    allow_pdl(lc, attr, pdl);
    const cudaError_t e =
        cudaLaunchKernelEx(&lc, splitk_finish, (const float *)g->ws, splits, total, g->n_out, g->bias, g->y, g->ydtype);
    return e != cudaSuccess ? e : cudaGetLastError();
}

/* Fill a kernel's two part slots (P: its part record, with w, meta, idx, N, bits, nblk) from
 * the call's parts, the 8-bit one first when there are two (its row blocks take twice as long:
 * longest job first, so that the 4-bit blocks fill the last wave). Returns the row blocks of
 * both, `rows_per_block` rows each. */
template <typename P> int order_parts(const mixc_gemm *g, int64_t rows_per_block, P &p0, P &p1) {
    P *ps[2] = {&p0, &p1};
    const int first = (g->nparts == 2 && g->parts[1].bits > g->parts[0].bits) ? 1 : 0;
    int nblk = 0;
    for (int i = 0; i < 2; i++) {
        P &p = *ps[i];
        if (i < g->nparts) {
            const mixc_part &q = g->parts[i ^ first];
            p.w = (decltype(p.w))q.wpack;
            p.meta = (decltype(p.meta))q.meta;
            p.idx = q.out_index;
            p.N = q.N;
            p.bits = q.bits;
            p.nblk = (int)((q.N + rows_per_block - 1) / rows_per_block);
        } else {
            p.w = nullptr;
            p.meta = nullptr;
            p.idx = nullptr;
            p.N = 0;
            p.bits = 4;
            p.nblk = 0;
        }
        nblk += p.nblk;
    }
    return nblk;
}

} // namespace
