/* Dynamic int8 activation quantization per token and per group of g columns (SPEC §1),
 * bit-identical to the CPU reference (csrc/quant.c): scale = max|x| / 127 in float32
 * (1 for an all-zero group), code = clamp(rint(x / scale), -127, 127) with IEEE division
 * and round-half-to-even. One warp per (token, group); two passes over the group (the
 * second hits L1). Writes either the plain [M, K] / [M, G] format or the GEMM's padded
 * layout (cuda/w4a8.cu): groups padded with zeros to gp columns, the scale repeated for
 * each of the group's stages. Non-finite inputs are not detected on the GPU (that would
 * need a host synchronisation); they give unspecified codes. */
#include "mixllm_cuda.h"
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void act_quant_kernel(const T *__restrict__ x, int64_t M, int64_t K, int64_t g, int64_t G, int64_t gp,
                                 int8_t *__restrict__ q, int64_t qpitch, int spg, float *__restrict__ sa,
                                 int64_t sapitch) {
    const int lane = threadIdx.x & 31;
    const int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    if (wid >= M * G) return;
    const int64_t m = wid / G, j = wid % G;
    const int64_t k0 = j * g, len = min(g, K - k0);
    const T *xr = x + m * K + k0;
    float amax = 0.f;
    for (int64_t e = lane; e < len; e += 32) amax = fmaxf(amax, fabsf(to_f(xr[e])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    float s = amax / 127.f;
    if (!(s > 0.f)) s = 1.f;
    int8_t *qr = q + m * qpitch + j * gp;
    for (int64_t e = lane; e < len; e += 32) {
        int c = __float2int_rn(to_f(xr[e]) / s);
        qr[e] = (int8_t)max(-127, min(127, c));
    }
    /* padding of the group, and past the last group up to the row's end */
    const int64_t pad_end = (j == G - 1) ? qpitch - j * gp : gp;
    for (int64_t e = len + lane; e < pad_end; e += 32)
        if (j * gp + e < qpitch) qr[e] = 0;
    float *sr = sa + m * sapitch;
    const int64_t s_end = (j == G - 1) ? sapitch : (j + 1) * spg;
    for (int64_t t = j * spg + lane; t < s_end; t += 32) sr[t] = s;
}

} // namespace

extern "C" int mixc_act_quant(int device, const void *x, int dtype, int64_t M, int64_t K, int64_t g, int64_t gp,
                              int8_t *q, int64_t qpitch, int spg, float *sa, int64_t sapitch, void *stream_) {
    int prev = -1;
    cudaGetDevice(&prev);
    if (prev != device) {
        cudaError_t e = cudaSetDevice(device);
        if (e != cudaSuccess) return (int)e;
    }
    cudaStream_t stream = (cudaStream_t)stream_;
    const int64_t G = (K + g - 1) / g;
    const int64_t warps = M * G;
    cudaError_t err = cudaSuccess;
    if (warps > 0) {
        const int threads = 256;
        const int64_t blocks = (warps * 32 + threads - 1) / threads;
        if (blocks > 0x7fffffffLL) err = cudaErrorInvalidValue;
        else if (dtype == 0)
            act_quant_kernel<float><<<(unsigned)blocks, threads, 0, stream>>>((const float *)x, M, K, g, G, gp, q,
                                                                              qpitch, spg, sa, sapitch);
        else if (dtype == 1)
            act_quant_kernel<__half><<<(unsigned)blocks, threads, 0, stream>>>((const __half *)x, M, K, g, G, gp, q,
                                                                               qpitch, spg, sa, sapitch);
        else
            act_quant_kernel<__nv_bfloat16><<<(unsigned)blocks, threads, 0, stream>>>(
                (const __nv_bfloat16 *)x, M, K, g, G, gp, q, qpitch, spg, sa, sapitch);
        if (err == cudaSuccess) err = cudaGetLastError();
    }
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
    return (int)err;
}
