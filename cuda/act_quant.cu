/* Dynamic int8 activation quantization per token and per group of g columns (docs/spec.md §1),
 * bit-identical to the CPU reference (csrc/quant.c): scale = max|x| / 127 in float32
 * (1 for an all-zero group), code = clamp(rint(x / scale), -127, 127) with IEEE division
 * and round-half-to-even (code_of: a multiply by 1 / scale wherever that provably gives the same
 * integer, the division elsewhere). Kernels, by geometry: g = 128 with K a multiple of 128 and unpadded
 * codes (most models): act_quant_flat_kernel; g = 128 otherwise: a half-warp per group
 * (act_quant_g128_kernel); g a multiple of 128: act_quant_vec_kernel; any other g: one warp per (token,
 * group), two passes over the group (the second hits L1), scalar loads. Writes either the plain
 * [M, K] / [M, G] format or the GEMM's padded layout (cuda/w4a8.cu): groups padded with zeros to gp columns, the scale
 * repeated for each of the group's stages. Non-finite inputs (docs/readme_reliability.md, "NaN and Inf on the GPU"): a
 * group holding a NaN or +-Inf gets scale NaN and all-zero codes, so the GEMM's product with that scale makes the
 * token's whole output row NaN, as F.linear would. The CPU op raises instead; a GPU op cannot
 * without a host synchronisation. (The group max is taken with max.NaN: fmaxf would drop a NaN and give
 * finite garbage.) */
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <cfloat>
#include <type_traits>

namespace {

/* The GEMM that consumes the codes is launched with programmatic dependent launch (sm_90):
 * let it start now and fetch its weights while this kernel runs; it waits for this grid's
 * completion before reading the codes. */
__device__ __forceinline__ void let_dependents_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* max that propagates a NaN (fmaxf drops it): a group's max|x| is NaN or +Inf exactly when the group
 * holds a non-finite value, so one test of the reduced max finds it. */
__device__ __forceinline__ float max_nan(float a, float b) {
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

/* |v| into the group's running max */
__device__ __forceinline__ void absmax(float v, float &amax) { amax = max_nan(amax, fabsf(v)); }

/* A group's scale from its reduced max: NaN for a non-finite group, 1 for an all-zero one. */
__device__ __forceinline__ float scale_of(float amax) {
    if (!(amax <= FLT_MAX)) return __int_as_float(0x7fffffff);
    const float s = amax / 127.f;
    return s > 0.f ? s : 1.f;
}

/* The code of v in a group of scale s (r = 1 / s, rounded): clamp(rint(v / s), -127, 127) with the
 * IEEE division of the CPU op, bit for bit, at the cost of a multiply. For |v / s| <= 128, q = v * r
 * carries two roundings of at most 2^-24 relative, so it lies within 2^-16 of v / s and within 2^-15 of
 * the rounded quotient: where q is more than 2^-14 from a half-integer, both have the same nearest
 * integer (q - rint(q) is exact there: Sterbenz). The rest (about 1 element in 4000, ties included)
 * and groups whose 1 / s is not a finite float (q then NaN or Inf) take the division. (Measured: 2-3%
 * faster than the division from 1024 tokens on; docs/kernels.md, "Activation quantizer".) */
__device__ __forceinline__ int code_of(float v, float s, float r) {
    const float q = v * r, c = rintf(q);
    const int k = fabsf(q - c) < 0.5f - 0x1p-14f ? (int)c : __float2int_rn(v / s);
    return max(-127, min(127, k));
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
/* v rounded to T (to nearest even) and back: what storing an intermediate result in T does. */
template <typename T> __device__ __forceinline__ float round_to(float v);
template <> __device__ __forceinline__ float round_to<float>(float v) { return v; }
template <> __device__ __forceinline__ float round_to<__half>(float v) { return __half2float(__float2half_rn(v)); }
template <> __device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

/* silu(g) * u as PyTorch's eager ops compute it on x's dtype T: silu in float, x / (1 + exp(-x)),
 * rounded to T; the product in float, rounded to T. (No fast-math: expf and the division as torch's
 * kernels have them, so the codes equal those of quantizing F.silu(g) * u.) */
template <typename T> __device__ __forceinline__ float silu_mul(float g, float u) {
    return round_to<T>(round_to<T>(g / (1.f + expf(-g))) * u);
}

template <typename T>
__global__ void act_quant_kernel(const T *__restrict__ x, int64_t M, int64_t K, int64_t g, int64_t G, int64_t gp,
                                 int8_t *__restrict__ q, int64_t qpitch, int spg, float *__restrict__ sa,
                                 int64_t sapitch) {
    let_dependents_start();
    const int lane = threadIdx.x & 31;
    const int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    if (wid >= M * G) return;
    const int64_t m = wid / G, j = wid % G;
    const int64_t k0 = j * g, len = min(g, K - k0);
    const T *xr = x + m * K + k0;
    float amax = 0.f;
    for (int64_t e = lane; e < len; e += 32) absmax(to_f(xr[e]), amax);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = scale_of(amax), r = 1.f / s;
    const bool finite = s == s;
    int8_t *qr = q + m * qpitch + j * gp;
    for (int64_t e = lane; e < len; e += 32) qr[e] = (int8_t)(finite ? code_of(to_f(xr[e]), s, r) : 0);
    /* padding of the group, and past the last group up to the row's end */
    const int64_t pad_end = (j == G - 1) ? qpitch - j * gp : gp;
    for (int64_t e = len + lane; e < pad_end; e += 32)
        if (j * gp + e < qpitch) qr[e] = 0;
    float *sr = sa + m * sapitch;
    const int64_t s_end = (j == G - 1) ? sapitch : (j + 1) * spg;
    for (int64_t t = j * spg + lane; t < s_end; t += 32) sr[t] = s;
}

/* N = 4 or 8 consecutive elements as float, in N-element vector loads (the caller guarantees the
 * alignment: N elements, at most 16 bytes per load). */
template <int N> __device__ __forceinline__ void load_n(const float *p, float (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 t = *(const float4 *)(p + i);
        v[i] = t.x;
        v[i + 1] = t.y;
        v[i + 2] = t.z;
        v[i + 3] = t.w;
    }
}
template <int N, typename T> __device__ __forceinline__ void load_n(const T *p, float (&v)[N]) {
    static_assert(N == 4 || N == 8, "4 or 8 16-bit elements: one 8- or 16-byte load");
    using Word = typename std::conditional<N == 4, uint2, uint4>::type;
    const Word t = *(const Word *)p;
    const T *h = (const T *)&t;
#pragma unroll
    for (int i = 0; i < N; i++) v[i] = to_f(h[i]);
}

/* Fast path for g a multiple of 128 and K a multiple of 4: each lane takes 4 consecutive
 * elements of every 128-column chunk (8- or 16-byte loads, one 4-byte store of codes); a
 * 128-column group stays in registers between the two passes. Warps loop over (token, group)
 * pairs so that the grid stays a few waves deep however large M * G is. */
template <typename T>
__global__ void act_quant_vec_kernel(const T *__restrict__ x, int64_t M, int64_t K, int64_t g, int64_t G, int64_t gp,
                                     int8_t *__restrict__ q, int64_t qpitch, int spg, float *__restrict__ sa,
                                     int64_t sapitch) {
    let_dependents_start();
    const int lane = threadIdx.x & 31;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t wid = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; wid < M * G; wid += nwarps) {
        const int64_t m = wid / G, j = wid % G;
        const int64_t k0 = j * g, len = min(g, K - k0);
        const T *xr = x + m * K + k0;
        float v0[4] = {0.f, 0.f, 0.f, 0.f};
        float amax = 0.f;
        if (lane * 4 < len) load_n<4>(xr + lane * 4, v0);
#pragma unroll
        for (int i = 0; i < 4; i++) absmax(v0[i], amax);
        for (int64_t e = 128 + lane * 4; e < len; e += 128) {
            float v[4];
            load_n<4>(xr + e, v);
#pragma unroll
            for (int i = 0; i < 4; i++) absmax(v[i], amax);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float s = scale_of(amax), r = 1.f / s;
        const bool finite = s == s;
        int8_t *qr = q + m * qpitch + j * gp;
        for (int64_t e = lane * 4; e < len; e += 128) {
            float v[4];
            if (e < 128) {
#pragma unroll
                for (int i = 0; i < 4; i++) v[i] = v0[i];
            } else {
                load_n<4>(xr + e, v);
            }
            uint32_t w = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) { w |= (uint32_t)(uint8_t)(int8_t)code_of(v[i], s, r) << (8 * i); }
            *(uint32_t *)(qr + e) = finite ? w : 0u;
        }
        const int64_t pad_end = (j == G - 1) ? qpitch - j * gp : gp;
        for (int64_t e = len + lane * 4; e < pad_end; e += 128) *(uint32_t *)(qr + e) = 0;
        float *sr = sa + m * sapitch;
        const int64_t s_end = (j == G - 1) ? sapitch : (j + 1) * spg;
        for (int64_t t = j * spg + lane; t < s_end; t += 32) sr[t] = s;
    }
}

/* The codes of a lane's 8 consecutive elements v of a group of scale s (r = 1 / s), as one 8-byte word
 * (all zero for a non-finite group: bad). */
__device__ __forceinline__ uint2 codes8(const float (&v)[8], float s, float r, bool bad) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const uint32_t c = (uint8_t)(int8_t)code_of(v[i], s, r);
        if (i < 4)
            lo |= c << (8 * i);
        else
            hi |= c << (8 * (i - 4));
    }
    return bad ? make_uint2(0u, 0u) : make_uint2(lo, hi);
}

/* A half-warp group's max|x| from each lane's 8 elements (every lane of the warp must call this: the
 * shuffles take the whole warp; the two half-warps reduce separately). */
__device__ __forceinline__ float half_group_amax(const float (&v)[8]) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) absmax(v[i], amax);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    return amax;
}

/* The second half of the g = 128 kernels, for one half-warp's group j of token row m: lane hl holds the
 * group's elements 8 hl .. 8 hl + 7 in v (zeros past the row; mine: they are in it). Reduces the group's
 * max over the half-warp (every lane of the warp must call this), then, for a group of the row (grp),
 * stores its codes (one 8-byte store per lane), zeros for its padding and past the last group up to the
 * row's end, and its scale for each of its stages. */
__device__ __forceinline__ void quantize_half_group(const float (&v)[8], bool mine, bool grp, int hl, int64_t j,
                                                    int64_t len, int64_t G, int64_t gp, int8_t *qr, int64_t qpitch,
                                                    int spg, float *sr, int64_t sapitch) {
    const float s = scale_of(half_group_amax(v)), r = 1.f / s;
    if (!grp) return;
    qr += j * gp;
    if (mine) *(uint2 *)(qr + hl * 8) = codes8(v, s, r, !(s == s));
    const int64_t pad_end = (j == G - 1) ? qpitch - j * gp : gp;
    for (int64_t e = len + hl * 8; e < pad_end; e += 128) *(uint2 *)(qr + e) = make_uint2(0u, 0u);
    const int64_t s_end = (j == G - 1) ? sapitch : (j + 1) * spg;
    for (int64_t t = j * spg + hl; t < s_end; t += 16) sr[t] = s;
}

/* The unpadded geometry (g = 128, K a multiple of 128, codes [M, K] and one scale per group: the GEMM's
 * layout whenever K is a multiple of 128, and ops.quantize_activation's): the (token, group) pairs in row
 * order are one flat sequence whose codes (128 bytes each) and scales (one float each) are contiguous, so
 * half-warp h of warp w takes flat groups 2 w + h, 2 w + h + 2 W, ... (W warps) and every pointer
 * advances by a constant, x's also by its row pitch less K when the group index wraps past a row's end
 * (0 for a plain [M, K] input, K for SILU_MUL's [M, 2K]: gate then up). Same arithmetic per element as the kernel
 * below. (Measured before it, with the kernel below on every g = 128 call: about 300 warp instructions per 512 input
 * bytes, most of them 64-bit index arithmetic, issue-bound at 1.85 TB/s; docs/kernels.md, "Activation quantizer".) */
template <typename T, bool SILU_MUL>
__global__ void act_quant_flat_kernel(const T *__restrict__ x, int64_t M, int64_t K, int64_t G, int8_t *__restrict__ q,
                                      float *__restrict__ sa) {
    constexpr int64_t XW = SILU_MUL ? 2 : 1;
    let_dependents_start();
    const int lane = threadIdx.x & 31, hl = lane & 15, half = lane >> 4;
    const int64_t W = ((int64_t)gridDim.x * blockDim.x) >> 5, step = 2 * W, total = M * G;
    const int64_t fw = ((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5) * 2; /* the warp's first group */
    const int64_t f0 = fw + half;
    int64_t c = f0 % G; /* this half-warp's group within its token row */
    const int64_t dc = step % G;
    const T *xp = x + (f0 / G) * XW * K + c * 128 + hl * 8;
    const int64_t xstep = (step / G) * XW * K + dc * 128, xwrap = XW * K - G * 128;
    int8_t *qp = q + f0 * 128 + hl * 8;
    float *sp = sa + f0;
    for (int64_t f = fw; f < total; f += step) {
        const bool mine = f + half < total;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (mine) {
            load_n<8>(xp, v);
            if constexpr (SILU_MUL) {
                float u[8];
                load_n<8>(xp + K, u);
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] = silu_mul<T>(v[i], u[i]);
            }
        }
        const float s = scale_of(half_group_amax(v)), r = 1.f / s;
        if (mine) {
            *(uint2 *)qp = codes8(v, s, r, !(s == s));
            if (hl == 0) *sp = s;
        }
        xp += xstep;
        c += dc;
        if (c >= G) {
            c -= G;
            xp += xwrap;
        }
        qp += step * 128;
        sp += step;
    }
}

/* Whether act_quant_flat_kernel computes this call: the unpadded geometry, aligned for its loads and stores. */
static bool flat_geometry(const void *x, int64_t K, int64_t g, int64_t gp, const int8_t *q, int64_t qpitch, int spg,
                          int64_t sapitch) {
    return g == 128 && K > 0 && K % 128 == 0 && gp == 128 && qpitch == K && spg == 1 && sapitch == K / 128 &&
           (uintptr_t)x % 16 == 0 && (uintptr_t)q % 8 == 0;
}

/* Blocks of 256 threads for act_quant_flat_kernel: a warp per two groups, at most 16 blocks per SM. */
static int64_t flat_blocks(int64_t M, int64_t G, int sms) {
    const int64_t warps = (M * G + 1) / 2, blocks = (warps * 32 + 255) / 256;
    return blocks < (int64_t)sms * 16 ? blocks : (int64_t)sms * 16;
}

/* The default geometry (g = 128, K and the code pitches multiples of 8): a half-warp per group, so
 * a warp quantizes two groups of one token per step, each lane 8 consecutive elements (one 16-byte
 * load of bf16/fp16, one 8-byte store of codes). The (token, group pair) of a warp's next step is
 * advanced by a precomputed quotient and remainder: no 64-bit division in the loop (measured on the
 * H200: the generic kernel above, one warp per group with a 64-bit division and modulo per step,
 * streamed about 1 TB/s at M = 4096). Same arithmetic per element as the other kernels. */
template <typename T, bool SILU_MUL>
__global__ void act_quant_g128_kernel(const T *__restrict__ x, int64_t M, int64_t K, int64_t G, int64_t gp,
                                      int8_t *__restrict__ q, int64_t qpitch, int spg, float *__restrict__ sa,
                                      int64_t sapitch) {
    /* SILU_MUL: x is [M, 2K], gate columns then up columns; the values quantized are silu_mul<T>(gate, up) */
    constexpr int64_t XW = SILU_MUL ? 2 : 1;
    let_dependents_start();
    const int lane = threadIdx.x & 31, hl = lane & 15;
    const int64_t P = (G + 1) / 2; /* group pairs per token */
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    const int64_t w0 = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int64_t dm = nwarps / P, dp = nwarps % P;
    int64_t m = w0 / P, p = w0 % P;
    for (; m < M; m += dm, p += dp) {
        if (p >= P) {
            p -= P;
            m++;
            if (m >= M) break;
        }
        const int64_t j = 2 * p + (lane >> 4); /* this half-warp's group */
        const bool grp = j < G;
        const int64_t k0 = j * 128, len = grp ? min((int64_t)128, K - k0) : 0;
        const bool mine = hl * 8 < len; /* K % 8 == 0: a lane's 8 elements are all in the row or all past it */
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (mine) {
            load_n<8>(x + m * XW * K + k0 + hl * 8, v);
            if constexpr (SILU_MUL) {
                float u[8];
                load_n<8>(x + m * XW * K + K + k0 + hl * 8, u);
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] = silu_mul<T>(v[i], u[i]);
            }
        }
        quantize_half_group(v, mine, grp, hl, j, len, G, gp, q + m * qpitch, qpitch, spg, sa + m * sapitch, sapitch);
    }
}

/* RMSNorm of each token's row, then its quantization (the default geometry: g = 128, K a multiple of
 * 8): y = w * rmsnorm(x) as Hugging Face's Llama-style RMSNorm computes it on x's dtype T (the sum of
 * squares in float32, times 1 / K, rsqrt of it plus eps; x times that rounded to T; times w rounded to
 * T), never stored: its codes and scales as act_quant_g128_kernel gives them. One block per token,
 * thread t holding chunks t, t + B, ... of 8 elements (at most CH) in registers between the reduction
 * and the quantization; a half-warp's 16 chunks are one group (B a multiple of 16). The sum's order
 * differs from torch's reduction, so an element's rounding to T can differ from the eager ops in rare
 * cases (the codes then by one). */
template <typename T, int CH>
__global__ void __launch_bounds__(512)
    act_quant_rmsnorm_kernel(const T *__restrict__ x, const T *__restrict__ w, float eps, int64_t K, int64_t G,
                             int64_t gp, int8_t *__restrict__ q, int64_t qpitch, int spg, float *__restrict__ sa,
                             int64_t sapitch) {
    __shared__ float warp_sums[32];
    let_dependents_start();
    const int64_t m = blockIdx.x, nchunks = K / 8;
    const int tid = threadIdx.x, lane = tid & 31, hl = tid & 15, B = blockDim.x;
    const T *xr = x + m * K;
    float v[CH][8];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < CH; i++) {
        const int64_t c = tid + (int64_t)i * B;
#pragma unroll
        for (int e = 0; e < 8; e++) v[i][e] = 0.f;
        if (c < nchunks) load_n<8>(xr + c * 8, v[i]);
#pragma unroll
        for (int e = 0; e < 8; e++) ss = __fadd_rn(ss, __fmul_rn(v[i][e], v[i][e])); /* pow(2), then the sum */
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) warp_sums[tid >> 5] = ss;
    __syncthreads();
    if (tid < 32) {
        float t = tid < (B >> 5) ? warp_sums[tid] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (tid == 0) warp_sums[0] = t;
    }
    __syncthreads();
    /* torch: mean = sum * (1 / K) (ATen's MeanOps multiply by the factor), then rsqrt(mean + eps) */
    const float r = rsqrtf(warp_sums[0] * (1.f / (float)K) + eps);
    float *sr = sa + m * sapitch;
#pragma unroll
    for (int i = 0; i < CH; i++) {
        /* this half-warp's group (past the row for both half-warps of a warp, or only for the second: the
         * shuffles below take the whole warp, so nobody leaves the loop before them) */
        const int64_t c = tid + (int64_t)i * B, j = (c - hl) / 16;
        const bool mine = c < nchunks;
        if (mine) {
            float wv[8];
            load_n<8>(w + c * 8, wv);
#pragma unroll
            for (int e = 0; e < 8; e++) v[i][e] = round_to<T>(wv[e] * round_to<T>(v[i][e] * r));
        }
        quantize_half_group(v[i], mine, j < G, hl, j, min((int64_t)128, K - j * 128), G, gp, q + m * qpitch, qpitch,
                            spg, sr, sapitch);
    }
}

} // namespace

/* Calls launch(tag) with a null pointer to the element type of dtype (0 float, 1 half, 2 bfloat16): one place
 * for the three launchers' dtype switch; each takes T from the tag for its kernels' template argument. */
template <class F> void with_dtype(int dtype, F &&launch) {
    if (dtype == 0)
        launch((const float *)nullptr);
    else if (dtype == 1)
        launch((const __half *)nullptr);
    else
        launch((const __nv_bfloat16 *)nullptr);
}
template <class P> using elem_of = std::remove_const_t<std::remove_pointer_t<P>>;

extern "C" int mixc_act_quant(int device, const void *x, int dtype, int64_t M, int64_t K, int64_t g, int64_t gp,
                              int8_t *q, int64_t qpitch, int spg, float *sa, int64_t sapitch, void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    cudaStream_t stream = (cudaStream_t)stream_;
    const int64_t G = mix_ngroups(K, g);
    const int64_t warps = M * G;
    if (warps <= 0) return 0;
    const int threads = 256;
    const int64_t blocks = (warps * 32 + threads - 1) / threads;
    int sms = 132, dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    const int64_t vblocks = blocks < (int64_t)sms * 16 ? blocks : (int64_t)sms * 16;
    const bool vec = g % 128 == 0 && K % 4 == 0 && qpitch % 4 == 0 && gp % 4 == 0 && ((uintptr_t)x % 16) == 0 &&
                     ((uintptr_t)q % 4) == 0;
    const bool g128 =
        g == 128 && K % 8 == 0 && qpitch % 8 == 0 && gp % 8 == 0 && ((uintptr_t)x % 16) == 0 && ((uintptr_t)q % 8) == 0;
    const int64_t pairs = M * ((G + 1) / 2), pblocks = (pairs * 32 + threads - 1) / threads;
    const int64_t gblocks = pblocks < (int64_t)sms * 16 ? pblocks : (int64_t)sms * 16;
    const bool flat = flat_geometry(x, K, g, gp, q, qpitch, spg, sapitch);
    const int64_t fblocks = flat_blocks(M, G, sms);
    if (blocks > 0x7fffffffLL) return (int)cudaErrorInvalidValue;
    with_dtype(dtype, [&](auto tag) {
        using T = elem_of<decltype(tag)>;
        if (flat)
            act_quant_flat_kernel<T, false><<<(unsigned)fblocks, 256, 0, stream>>>((const T *)x, M, K, G, q, sa);
        else if (g128)
            act_quant_g128_kernel<T, false>
                <<<(unsigned)gblocks, threads, 0, stream>>>((const T *)x, M, K, G, gp, q, qpitch, spg, sa, sapitch);
        else if (vec)
            act_quant_vec_kernel<T>
                <<<(unsigned)vblocks, threads, 0, stream>>>((const T *)x, M, K, g, G, gp, q, qpitch, spg, sa, sapitch);
        else
            act_quant_kernel<T>
                <<<(unsigned)blocks, threads, 0, stream>>>((const T *)x, M, K, g, G, gp, q, qpitch, spg, sa, sapitch);
    });
    return (int)cudaGetLastError();
}

extern "C" int mixc_act_quant_silu_mul(int device, const void *gu, int dtype, int64_t M, int64_t K, int64_t g,
                                       int64_t gp, int8_t *q, int64_t qpitch, int spg, float *sa, int64_t sapitch,
                                       void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    cudaStream_t stream = (cudaStream_t)stream_;
    if (!mixc_act_quant_silu_mul_ok(K, g) || qpitch % 8 || gp % 8 || (uintptr_t)gu % 16 || (uintptr_t)q % 8)
        return (int)cudaErrorInvalidValue;
    const int64_t G = mix_ngroups(K, g), pairs = M * ((G + 1) / 2);
    if (pairs <= 0) return 0;
    int sms = 132;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    int64_t blocks = (pairs * 32 + 255) / 256;
    if (blocks > (int64_t)sms * 16) blocks = (int64_t)sms * 16;
    const bool flat = flat_geometry(gu, K, g, gp, q, qpitch, spg, sapitch);
    const int64_t fblocks = flat_blocks(M, G, sms);
    with_dtype(dtype, [&](auto tag) {
        using T = elem_of<decltype(tag)>;
        if (flat)
            act_quant_flat_kernel<T, true><<<(unsigned)fblocks, 256, 0, stream>>>((const T *)gu, M, K, G, q, sa);
        else
            act_quant_g128_kernel<T, true>
                <<<(unsigned)blocks, 256, 0, stream>>>((const T *)gu, M, K, G, gp, q, qpitch, spg, sa, sapitch);
    });
    return (int)cudaGetLastError();
}

extern "C" int mixc_act_quant_silu_mul_ok(int64_t K, int64_t g) { return g == 128 && K > 0 && K % 8 == 0; }

/* Threads per block and chunks per thread of act_quant_rmsnorm_kernel for K: CH = 4 (8 for K > 16384),
 * B the least multiple of 32 with B * CH chunks of 8 >= K, at most 512 (the kernel's launch bounds: its
 * registers); 0 where K is outside the kernel's range (K > 32768). */
static int rmsnorm_threads(int64_t K, int *ch) {
    const int64_t chunks = K / 8;
    *ch = chunks > 4 * 512 ? 8 : 4;
    const int64_t b = ((chunks + *ch - 1) / *ch + 31) / 32 * 32;
    return b <= 512 ? (int)b : 0;
}

extern "C" int mixc_act_quant_rmsnorm_ok(int64_t K, int64_t g) {
    int ch;
    return g == 128 && K > 0 && K % 8 == 0 && rmsnorm_threads(K, &ch) > 0;
}

extern "C" int mixc_act_quant_rmsnorm(int device, const void *x, const void *w, float eps, int dtype, int64_t M,
                                      int64_t K, int64_t g, int64_t gp, int8_t *q, int64_t qpitch, int spg, float *sa,
                                      int64_t sapitch, void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    cudaStream_t stream = (cudaStream_t)stream_;
    int ch = 0;
    const int threads = rmsnorm_threads(K, &ch);
    if (!mixc_act_quant_rmsnorm_ok(K, g) || qpitch % 8 || gp % 8 || (uintptr_t)x % 16 || (uintptr_t)w % 16 ||
        (uintptr_t)q % 8 || M > 0x7fffffffLL)
        return (int)cudaErrorInvalidValue;
    if (M <= 0) return 0;
    const int64_t G = mix_ngroups(K, g);
    with_dtype(dtype, [&](auto tag) {
        using T = elem_of<decltype(tag)>;
        if (ch == 4)
            act_quant_rmsnorm_kernel<T, 4><<<(unsigned)M, threads, 0, stream>>>((const T *)x, (const T *)w, eps, K, G,
                                                                                gp, q, qpitch, spg, sa, sapitch);
        else
            act_quant_rmsnorm_kernel<T, 8><<<(unsigned)M, threads, 0, stream>>>((const T *)x, (const T *)w, eps, K, G,
                                                                                gp, q, qpitch, spg, sa, sapitch);
    });
    return (int)cudaGetLastError();
}

extern "C" int mixc_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}
