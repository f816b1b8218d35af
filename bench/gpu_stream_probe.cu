// Streaming-read probe behind the decode kernel's design (docs/kernels.md, "Decode kernel"):
// how fast can warps that each stream their own share of a weight-sized buffer read it, as a
// function of (a) the order in which the warps' 1 KB chunks lie in memory, (b) the bytes each
// warp keeps in flight and how (registers or cp.async into shared memory), (c) warps per SM.
// No GEMM arithmetic: each lane XORs what it read, so that the loads cannot be dropped.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a bench/gpu_stream_probe.cu -o probe
//   ./probe [MiB per buffer, default 128]     (three buffers rotate, so no read hits L2)
//
// Orders (chunk i of warp w of W warps, C chunks per warp):
//   tile     w*C + i             each warp one contiguous run (today's packed layout: a 16-row tile
//                                is contiguous along K)
//   sweep    i*W + w             all warps read one contiguous front that moves through the buffer
//   runR     runs of R chunks    i/R-th run of warp w at ((i/R)*W + w)*R  (R KB contiguous per warp)
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <algorithm>
#include <vector>

#include "probe_check.cuh"

/* LD 0: the decode kernel's load (read-only path, no L1 allocation); 1: the same asking L2 for
 * 256-byte blocks; 2: a plain global load. */
template <int LD> __device__ __forceinline__ uint4 ld_stream(const void *p) {
    uint4 v;
    if (LD == 0)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    else if (LD == 1)
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
    else
        asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ int64_t chunk_of(int order, int64_t w, int64_t i, int64_t W, int64_t C) {
    if (order == 0) return w * C + i;
    if (order == 1) return i * W + w;
    const int64_t R = order; /* runs of R chunks */
    return ((i / R) * W + w) * R + (i % R);
}

/* Register ring: D chunks (1 KB each: two 16-byte words per lane) in flight per warp. */
template <int D, int LD>
__global__ void __launch_bounds__(256) probe_reg(const uint4 *buf, int order, int64_t C, uint32_t *sink) {
    const int64_t W = (int64_t)gridDim.x * (blockDim.x >> 5);
    const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    uint4 r[D][2];
    uint32_t acc = 0;
#pragma unroll
    for (int d = 0; d < D; d++) {
        const uint4 *p = buf + chunk_of(order, w, d, W, C) * 64 + lane;
        r[d][0] = ld_stream<LD>(p);
        r[d][1] = ld_stream<LD>(p + 32);
    }
    for (int64_t i0 = 0; i0 < C; i0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            acc ^= r[d][0].x ^ r[d][0].y ^ r[d][0].z ^ r[d][0].w ^ r[d][1].x ^ r[d][1].y ^ r[d][1].z ^ r[d][1].w;
            const int64_t i = i0 + d + D;
            if (i < C) {
                const uint4 *p = buf + chunk_of(order, w, i, W, C) * 64 + lane;
                r[d][0] = ld_stream<LD>(p);
                r[d][1] = ld_stream<LD>(p + 32);
            }
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

__device__ __forceinline__ void cp16(void *s, const void *g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(s)), "l"(g));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* cp.async ring in shared memory: D chunks in flight per warp, no registers held for them. Each
 * lane reads back only what it copied itself, so no barrier is needed. */
template <int D>
__global__ void __launch_bounds__(256) probe_cpa(const uint4 *buf, int order, int64_t C, uint32_t *sink) {
    extern __shared__ uint4 sm[]; /* [warps][D][64] */
    const int64_t W = (int64_t)gridDim.x * (blockDim.x >> 5);
    const int wl = threadIdx.x >> 5;
    const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + wl;
    const int lane = threadIdx.x & 31;
    uint4 *ring = sm + (size_t)wl * D * 64;
    uint32_t acc = 0;
#pragma unroll
    for (int d = 0; d < D; d++) {
        const uint4 *p = buf + chunk_of(order, w, d, W, C) * 64 + lane;
        cp16(ring + d * 64 + lane, p);
        cp16(ring + d * 64 + 32 + lane, p + 32);
        cp_commit();
    }
    for (int64_t i0 = 0; i0 < C; i0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            cp_wait<D - 1>();
            const uint4 a = ring[d * 64 + lane], b = ring[d * 64 + 32 + lane];
            acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
            const int64_t i = i0 + d + D;
            if (i < C) {
                const uint4 *p = buf + chunk_of(order, w, i, W, C) * 64 + lane;
                cp16(ring + d * 64 + lane, p);
                cp16(ring + d * 64 + 32 + lane, p + 32);
            }
            cp_commit(); /* (an empty group keeps the count) */
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

typedef void (*Kern)(const uint4 *, int, int64_t, uint32_t *);

int main(int argc, char **argv) {
    const int64_t mib = argc > 1 ? atoll(argv[1]) : 128;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const int sms = prop.multiProcessorCount;
    const int64_t bytes = mib << 20;
    const int NB = 3;
    uint4 *bufs[NB];
    for (int b = 0; b < NB; b++) {
        CK(cudaMalloc(&bufs[b], bytes));
        CK(cudaMemset(bufs[b], 0x5A + b, bytes));
    }
    uint32_t *sink;
    CK(cudaMalloc(&sink, 4));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf(
        "# stream probe, %s, %d SMs, %lld MiB per buffer (3 rotating); GB/s of the read, median of 7 x 10 launches\n",
        prop.name, sms, (long long)mib);
    printf("%-8s %-10s %8s %8s %10s\n", "order", "loader", "warps/SM", "KB/warp", "GB/s");
    struct K {
        const char *name;
        Kern k;
        int D, smem;
    };
    std::vector<K> ks = {{"reg4", probe_reg<4, 0>, 4, 0},       {"reg4.256B", probe_reg<4, 1>, 4, 0},
                         {"reg4.plain", probe_reg<4, 2>, 4, 0}, {"reg8", probe_reg<8, 0>, 8, 0},
                         {"reg8.256B", probe_reg<8, 1>, 8, 0},  {"cpa4", probe_cpa<4>, 4, 1},
                         {"cpa8", probe_cpa<8>, 8, 1},          {"cpa16", probe_cpa<16>, 16, 1}};
    const int orders[] = {0, 1, 4, 16};
    const char *oname[] = {"tile", "sweep", "run4", "run16"};
    for (int wps : {8, 16, 32}) {
        for (const K &k : ks) {
            const int wpb = 8, bps = wps / wpb;
            const size_t smem = k.smem ? (size_t)wpb * k.D * 1024 : 0;
            if (smem) CK(cudaFuncSetAttribute(k.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            int occ = 0;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k.k, wpb * 32, smem));
            if (occ < bps) {
                printf("%-8s %-10s %8d %8s %10s\n", "-", k.name, wps, "-", "no fit");
                continue;
            }
            const int64_t W = (int64_t)sms * wps, C = bytes / 1024 / W / 4 * 4;
            for (int oi = 0; oi < 4; oi++) {
                const int order = orders[oi];
                if (order > 1 && C % order) continue;
                std::vector<float> ts;
                for (int rep = 0; rep < 8; rep++) {
                    CK(cudaEventRecord(e0));
                    for (int l = 0; l < 10; l++)
                        k.k<<<(unsigned)(sms * bps), wpb * 32, smem>>>(bufs[(rep * 10 + l) % NB], order, C, sink);
                    CK(cudaGetLastError());
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    float ms;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    if (rep) ts.push_back(ms / 10);
                }
                std::sort(ts.begin(), ts.end());
                const double gbs = (double)W * C * 1024 / (ts[ts.size() / 2] * 1e-3) / 1e9;
                printf("%-8s %-10s %8d %8lld %10.0f\n", oname[oi], k.name, wps, (long long)C, gbs);
            }
        }
    }
    return 0;
}
