// The wgmma kernel's per-stage device code (cuda/w4a8_sm90.cu): the wgmma with the weight fragments in
// registers, the fragments formed from the packed layout's shared-memory slots (cuda/packed_layout.cuh),
// the two-step rescale. One header so that bench/gpu_wgmma_probe.cu times the kernel's own code. The
// wgmma templates need sm_90a where they are instantiated.
#pragma once
#include "packed_layout.cuh"
#include <cuda_runtime.h>
#include <stdint.h>

namespace mixc_sm90 {

/* int32 -> float: one I2FP.F32.S32 (exact: a stage's sums stay under 2^21). The add-and-subtract
 * trick of w4a8.cu measured 2-5% slower here (H100, 2026-11-23). */
__device__ __forceinline__ float i2f(int x) { return __int2float_rn(x); }

/* K-major operand, 128-byte swizzle, 8-row core-matrix groups 1024 bytes apart. The start address is
 * in 16-byte units in the low bits: desc(addr + d) = desc(addr) + d / 16 inside shared memory. */
__host__ __device__ constexpr uint64_t desc_sw128(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

template <int R> __device__ __forceinline__ void fence_acc(int (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++) asm volatile("" : "+r"(d[i])::"memory");
}

/* D[64 x QN] (+)= A[64 x 32] (registers: s8, or u8 with AU8) * B[QN x 32]^T (shared, s8); QN/2 int32
 * accumulators per thread */
#define MIXC_WGMMA_N64(AT)                                                                                         \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"                                                    \
                 "wgmma.mma_async.sync.aligned.m64n64k32.s32." AT ".s8 "                                           \
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%"    \
                 "25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p;\n}\n"                                    \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), \
                   "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]),        \
                   "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]),      \
                   "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]),      \
                   "+r"(d[29]), "+r"(d[30]), "+r"(d[31])                                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define MIXC_WGMMA_N32(AT)                                                                                         \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %21, 0;\n"                                                    \
                 "wgmma.mma_async.sync.aligned.m64n32k32.s32." AT ".s8 "                                           \
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p;\n}\n"        \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), \
                   "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]),        \
                   "+r"(d[15])                                                                                     \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define MIXC_WGMMA_N16(AT)                                                                                        \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %13, 0;\n"                                                   \
                 "wgmma.mma_async.sync.aligned.m64n16k32.s32." AT ".s8 "                                          \
                 "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p;\n}\n"                                       \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]) \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
template <int QN, bool AU8 = false>
__device__ __forceinline__ void wgmma_n(int (&d)[QN / 2], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
    static_assert(QN == 16 || QN == 32 || QN == 64, "wgmma N: 16, 32 or 64");
    if constexpr (QN == 64) {
        if constexpr (AU8)
            MIXC_WGMMA_N64("u8");
        else
            MIXC_WGMMA_N64("s8");
    } else if constexpr (QN == 32) {
        if constexpr (AU8)
            MIXC_WGMMA_N32("u8");
        else
            MIXC_WGMMA_N32("s8");
    } else {
        if constexpr (AU8)
            MIXC_WGMMA_N16("u8");
        else
            MIXC_WGMMA_N16("s8");
    }
}
#undef MIXC_WGMMA_N64
#undef MIXC_WGMMA_N32
#undef MIXC_WGMMA_N16

/* (w & 0x0F0F0F0F) - z in every byte as int8: sub_zero (cuda/gemm_common.cuh) with the mask and its
 * "| 0x80808080" in one LOP3 (ptxas emitted two). */
__device__ __forceinline__ uint32_t nibbles_minus_zero(uint32_t w, uint32_t zz) {
    uint32_t b;
    asm("lop3.b32 %0, %1, 0x0F0F0F0F, 0x80808080, 0xEA;\n" : "=r"(b) : "r"(w)); /* (a & b) | c */
    return (b - zz) ^ 0x80808080u;
}

/* The A fragments of this warp's tile for the stage's 4 k-steps, in the natural k order, and its
 * two rows' scales, from the shared-memory slots the producer filled. The packed layout (cuda/packed_layout.cuh) stores
 * a k-step in the m16n8k32 order, permuted inside each step of 32: thread t of a quad needs columns 4t..4t+3 and
 * 16+4t..16+4t+3, which quad lanes t/2 and 2+t/2 hold, so each thread reads its 8 bytes straight from those lanes'
 * words (no shuffles). */
template <int BITS, bool U8 = false>
__device__ __forceinline__ void load_frags(uint32_t (&af)[U8 ? 5 : 4][4], float &sw0, float &sw1, const uint8_t *wslot,
                                           const uint8_t *mslot, int lane) {
    static_assert(!U8 || BITS == 4, "raw unsigned codes: 4-bit parts");
    const int gid = lane >> 2, tig = lane & 3;
    /* A tile past the part's last row needs no special case: the TMA copies zero-fill it (codes and
     * meta records), so its fragments and scales are zeros, and its rows are never stored (a test for
     * it cost 33 instructions per 4-bit stage, 2-3% at prefill; docs/kernels.md). */
    const int src0 = (lane & ~3) | (tig >> 1), src1 = src0 + 2;
    const mixc_layout::MetaRecord *m = (const mixc_layout::MetaRecord *)mslot;
    sw0 = m->scale[gid];
    sw1 = m->scale[gid + 8];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (BITS == 4) {
            /* word k/2 of a lane: (x, y) = k-step 2(k/2), (z, w) = the next; low nibbles for tig
             * even, high for odd */
            const int off = (k >> 1) * 512 + (k & 1) * 8, sh = (tig & 1) * 4;
            const uint2 a01 = *(const uint2 *)(wslot + off + src0 * 16);
            const uint2 a23 = *(const uint2 *)(wslot + off + src1 * 16);
            if constexpr (U8) {
                af[k][0] = (a01.x >> sh) & 0x0F0F0F0Fu;
                af[k][1] = (a01.y >> sh) & 0x0F0F0F0Fu;
                af[k][2] = (a23.x >> sh) & 0x0F0F0F0Fu;
                af[k][3] = (a23.y >> sh) & 0x0F0F0F0Fu;
            } else {
                const uint32_t z0 = (uint32_t)m->zero[gid] * 0x01010101u;
                const uint32_t z1 = (uint32_t)m->zero[gid + 8] * 0x01010101u;
                af[k][0] = nibbles_minus_zero(a01.x >> sh, z0);
                af[k][1] = nibbles_minus_zero(a01.y >> sh, z1);
                af[k][2] = nibbles_minus_zero(a23.x >> sh, z0);
                af[k][3] = nibbles_minus_zero(a23.y >> sh, z1);
            }
        } else {
            /* word k of a lane: x = (row gid, cols 8t..8t+3), y = (row gid+8, same), z/w = cols
             * 8t+4..8t+7 */
            const int off = k * 512 + (tig & 1) * 8;
            const uint2 a01 = *(const uint2 *)(wslot + off + src0 * 16);
            const uint2 a23 = *(const uint2 *)(wslot + off + src1 * 16);
            af[k][0] = a01.x;
            af[k][1] = a01.y;
            af[k][2] = a23.x;
            af[k][3] = a23.y;
        }
    }
    if constexpr (U8) {
        /* -z of the thread's two rows in every byte (s8): the zero point's MMA, sum_k (-z) a */
        const uint32_t nz0 = ((0x100u - m->zero[gid]) & 0xFFu) * 0x01010101u;
        const uint32_t nz1 = ((0x100u - m->zero[gid + 8]) & 0xFFu) * 0x01010101u;
        af[4][0] = af[4][2] = nz0;
        af[4][1] = af[4][3] = nz1;
    }
}

/* Waits until at most N wgmma groups are pending (acc's group is then complete). */
template <int N, int R> __device__ __forceinline__ void wait_acc(int (&acc)[R]) {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
    fence_acc(acc);
}

/* Second step of the dequantization for one slice of QN tokens: acc (+)= float(iacc) * Sw[row] * Sa[token].
 * Accumulator i: row gid + 8 * ((i >> 1) & 1), token 8 * (i >> 2) + 2 * tig + (i & 1). (Tried: the scales
 * stored so that a thread's 16 are contiguous, LDS.128 instead of LDS.64: 4-8% slower, one spill;
 * docs/kernels.md.) */
template <int QN>
__device__ __forceinline__ void rescale(float *facc, const int (&iacc)[QN / 2], const float *sab, float sw0,
                                        float sw1) {
    /* the slice's token scales all loaded first (performance-neutral against a load per pair of
     * tokens, 0.97-1.02x at 300-4096 tokens; the kernel's SASS since 2026-12-02, docs/kernels.md) */
    float2 sa[QN / 8];
#pragma unroll
    for (int q = 0; q < QN / 8; q++) sa[q] = *(const float2 *)(sab + 8 * q);
#pragma unroll
    for (int q = 0; q < QN / 8; q++) {
        facc[4 * q + 0] = __fmaf_rn(i2f(iacc[4 * q + 0]), sw0 * sa[q].x, facc[4 * q + 0]);
        facc[4 * q + 1] = __fmaf_rn(i2f(iacc[4 * q + 1]), sw0 * sa[q].y, facc[4 * q + 1]);
        facc[4 * q + 2] = __fmaf_rn(i2f(iacc[4 * q + 2]), sw1 * sa[q].x, facc[4 * q + 2]);
        facc[4 * q + 3] = __fmaf_rn(i2f(iacc[4 * q + 3]), sw1 * sa[q].y, facc[4 * q + 3]);
    }
}

} // namespace mixc_sm90
