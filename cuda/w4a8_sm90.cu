/* W4A8 / W8A8 / mixed-precision GEMM for large M on Hopper (sm_90a): wgmma + TMA, configuration
 * MIXC_CFG_SM90 of mixc_qlinear. Same function, inputs and packed layout as cuda/w4a8.cu
 * (cuda/packed_layout.cuh). The sm_80 build holds a stub that is never launched: mixc_sm90_ok()
 * is false unless the device is 9.x and runs the sm_90a code. Design notes and measurements:
 * docs/kernels.md. */
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "gemm_common.cuh"
#include "packed_layout.cuh"
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MIXC_SM90_DEVICE 1
#endif

namespace {

constexpr int KS = MIXC_KSTAGE;        /* padded columns per stage */
constexpr int BM = 128;                /* tokens per CTA (wgmma N) */
constexpr int BN = 128;                /* weight rows per CTA: 2 consumer warpgroups x 64 */
constexpr int ST = 8;                  /* pipeline stages of activations in shared memory */
constexpr int NTH = 384;               /* producer warpgroup + 2 consumer warpgroups */
constexpr int ACT_BYTES = BM * KS;     /* one stage of activation codes (16 KB) */
constexpr int SA_OFF = ST * ACT_BYTES; /* then ST x BM float scales */
constexpr int BAR_OFF = SA_OFF + ST * BM * 4;
constexpr int SMEM_BYTES = BAR_OFF + 2 * ST * 8 + 1024; /* + alignment slack (128B swizzle wants 1024) */

struct Part90 {
    const uint8_t *w, *meta;
    const int64_t *idx;
    int64_t N;
    int bits, nblk;
};

struct Args90 {
    const float *sa;
    int64_t M, Kp, n_out;
    int G, spg, ydt, splits, sps;
    Part90 p0, p1;
    const float *bias;
    void *y;
    float *ws;
};

#ifdef MIXC_SM90_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t ok;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!ok);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                 "%3}], [%4];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}

__device__ __forceinline__ void cp_async4_zfill(uint32_t dst, const void *src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

/* int32 -> float: one I2FP.F32.S32 (exact: a stage's sums stay under 2^21). The add-and-subtract
 * trick of w4a8.cu measured 2-5% slower here (H100, 2026-11-23). */
__device__ __forceinline__ float i2f(int x) { return __int2float_rn(x); }

/* K-major operand, 128-byte swizzle, 8-row core-matrix groups 1024 bytes apart. */
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

__device__ __forceinline__ void fence_acc(int (&d)[32]) {
#pragma unroll
    for (int i = 0; i < 32; i++) asm volatile("" : "+r"(d[i])::"memory");
}

/* D[64 x 64] (+)= A[64 x 32] (registers, s8) * B[64 x 32]^T (shared, s8) */
__device__ __forceinline__ void wgmma_64(int (&d)[32], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%"
                 "27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p;\n}\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
                   "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
                   "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]),
                   "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
                   "+r"(d[30]), "+r"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

/* Per-thread register state of one prefetched stage: the weight words and the two rows' meta. */
template <int BITS> struct StageRegs {
    uint4 w[BITS / 2]; /* 4-bit: 2 k-pairs; 8-bit: 4 k-steps (prefetched two stages ahead) */
    float sw0, sw1;
    uint32_t z0, z1;
    uint32_t af[4][4]; /* the A fragments of the stage being computed */
    float esw0, esw1;  /* its row scales, for the rescale after the wgmma */
};

template <int BITS>
__device__ __forceinline__ void load_regs(StageRegs<BITS> &r, const Part90 &p, int64_t rt, bool live, int64_t KP2,
                                          int G, int spg, int s, int lane, int gid) {
    constexpr int VEC = BITS / 4;
    if (!live) {
#pragma unroll
        for (int v = 0; v < BITS / 2; v++) r.w[v] = make_uint4(0, 0, 0, 0);
        r.sw0 = r.sw1 = 0.f;
        r.z0 = r.z1 = 0;
        return;
    }
    const uint8_t *src = p.w + (((rt * KP2 + 2 * (int64_t)s) * VEC) * 32 + lane) * 16;
#pragma unroll
    for (int v = 0; v < BITS / 2; v++) r.w[v] = ld_stream(src + v * 512);
    const int j = min(s / spg, G - 1);
    const mixc_layout::MetaRecord *m =
        (const mixc_layout::MetaRecord *)(p.meta + (rt * G + j) * mixc_layout::META_BYTES);
    r.sw0 = __ldg(&m->scale[gid]);
    r.sw1 = __ldg(&m->scale[gid + 8]);
    if (BITS == 4) {
        r.z0 = (uint32_t)__ldg(&m->zero[gid]) * 0x01010101u;
        r.z1 = (uint32_t)__ldg(&m->zero[gid + 8]) * 0x01010101u;
    }
}

/* The A fragments of the stage's 4 k-steps in the natural k order (see the header). */
template <int BITS>
__device__ __forceinline__ void make_frags(uint32_t (&af)[4][4], const StageRegs<BITS> &r, int lane) {
    const int tig = lane & 3;
    const int src0 = (lane & ~3) | (tig >> 1), src1 = src0 + 2;
    const int sh = (tig & 1) * 4;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (BITS == 4) {
            const uint4 wv = r.w[k >> 1];
            const uint32_t w0 = (k & 1) ? wv.z : wv.x, w1 = (k & 1) ? wv.w : wv.y;
            const uint32_t a0 = __shfl_sync(0xffffffffu, w0, src0), a2 = __shfl_sync(0xffffffffu, w0, src1);
            const uint32_t a1 = __shfl_sync(0xffffffffu, w1, src0), a3 = __shfl_sync(0xffffffffu, w1, src1);
            af[k][0] = sub_zero((a0 >> sh) & 0x0F0F0F0Fu, r.z0);
            af[k][1] = sub_zero((a1 >> sh) & 0x0F0F0F0Fu, r.z1);
            af[k][2] = sub_zero((a2 >> sh) & 0x0F0F0F0Fu, r.z0);
            af[k][3] = sub_zero((a3 >> sh) & 0x0F0F0F0Fu, r.z1);
        } else {
            /* stored: x = (row gid, cols 8t..8t+3), y = (row gid+8, same), z/w = cols 8t+4..8t+7 */
            const uint4 wv = r.w[k];
            const uint32_t x0 = __shfl_sync(0xffffffffu, wv.x, src0), z0 = __shfl_sync(0xffffffffu, wv.z, src0);
            const uint32_t y0 = __shfl_sync(0xffffffffu, wv.y, src0), w0 = __shfl_sync(0xffffffffu, wv.w, src0);
            const uint32_t x1 = __shfl_sync(0xffffffffu, wv.x, src1), z1 = __shfl_sync(0xffffffffu, wv.z, src1);
            const uint32_t y1 = __shfl_sync(0xffffffffu, wv.y, src1), w1 = __shfl_sync(0xffffffffu, wv.w, src1);
            af[k][0] = sh ? z0 : x0;
            af[k][1] = sh ? w0 : y0;
            af[k][2] = sh ? z1 : x1;
            af[k][3] = sh ? w1 : y1;
        }
    }
}

/* Waits until at most N wgmma groups are pending (acc's group is then complete). */
template <int N> __device__ __forceinline__ void wait_acc(int (&acc)[32]) {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
    fence_acc(acc);
}

/* Second step of the dequantization for one 64-token half: acc (+)= float(iacc) * Sw[row] * Sa[token].
 * Accumulator i: row gid + 8 * ((i >> 1) & 1), token 8 * (i >> 2) + 2 * tig + (i & 1). */
__device__ __forceinline__ void rescale(float *facc, const int (&iacc)[32], const float *sab, float sw0, float sw1) {
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const float2 s2 = *(const float2 *)(sab + 8 * q);
        facc[4 * q + 0] = __fmaf_rn(i2f(iacc[4 * q + 0]), sw0 * s2.x, facc[4 * q + 0]);
        facc[4 * q + 1] = __fmaf_rn(i2f(iacc[4 * q + 1]), sw0 * s2.y, facc[4 * q + 1]);
        facc[4 * q + 2] = __fmaf_rn(i2f(iacc[4 * q + 2]), sw1 * s2.x, facc[4 * q + 2]);
        facc[4 * q + 3] = __fmaf_rn(i2f(iacc[4 * q + 3]), sw1 * s2.y, facc[4 * q + 3]);
    }
}

/* One consumer warpgroup's 64 rows x 128 tokens over the stages [s0, s1). The token tile is
 * computed as two halves of 64 (wgmma m64n64k32, separate int32 accumulators), so that the
 * rescale of the first half overlaps the second half's wgmma:
 *   issue A(s), B(s) | wait A | rescale A(s) | wait B | rescale B(s), release stage s
 * No wgmma group stays pending across stages: with one that did (rescale B(s-1) under A(s)),
 * ptxas serialized every wgmma (C7514), which cost more than the overlap gained. */
template <int BITS>
__device__ __forceinline__ void consume(const Args90 &a, const Part90 &p, int rb, int64_t m0, int s0, int s1, int split,
                                        uint8_t *smem, uint32_t sbase) {
    const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int64_t rt = (int64_t)rb * (BN / 16) + wg * 4 + warp; /* this warp's 16-row tile */
    const int64_t NTt = (p.N + 15) / 16;
    const bool live = rt < NTt;
    const int64_t KP2 = a.Kp / 64;
    const float *sas = (const float *)(smem + SA_OFF) + 2 * tig;

    int ia[32], ib[32];
    float facc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) facc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; i++) ia[i] = ib[i] = 0;

    StageRegs<BITS> ra, rb_;
    load_regs<BITS>(ra, p, rt, live, KP2, a.G, a.spg, s0, lane, gid);
    if (s0 + 1 < s1) load_regs<BITS>(rb_, p, rt, live, KP2, a.G, a.spg, s0 + 1, lane, gid);

    auto issue = [&](int (&acc)[32], const uint32_t (&af)[4][4], uint32_t tile) {
        fence_acc(acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < 4; k++) wgmma_64(acc, af[k], desc_sw128(tile + k * 32), k);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    };
    auto stage = [&](int s, StageRegs<BITS> &r) {
        const int i = s - s0, buf = i % ST;
        make_frags<BITS>(r.af, r, lane);
        r.esw0 = r.sw0;
        r.esw1 = r.sw1;
        if (s + 2 < s1) load_regs<BITS>(r, p, rt, live, KP2, a.G, a.spg, s + 2, lane, gid);
        mbar_wait(sbase + BAR_OFF + buf * 8, (i / ST) & 1);
        const uint32_t tile = sbase + buf * ACT_BYTES;
        issue(ia, r.af, tile);           /* tokens 0..63: rows 0..63 of the tile */
        issue(ib, r.af, tile + 64 * KS); /* tokens 64..127 */
        wait_acc<1>(ia);                 /* A(s) done, B(s) still running */
        rescale(facc, ia, sas + buf * BM, r.esw0, r.esw1);
        wait_acc<0>(ib);
        rescale(facc + 32, ib, sas + buf * BM + 64, r.esw0, r.esw1);
        __syncwarp();
        if (lane == 0) mbar_arrive(sbase + BAR_OFF + (ST + buf) * 8);
    };
    for (int s = s0; s < s1; s += 2) {
        stage(s, ra);
        if (s + 1 < s1) stage(s + 1, rb_);
    }

    /* epilogue: rows 16*rt + gid (+8), tokens m0 + 64*half + 8q + 2tig + c */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int64_t n = rt * 16 + gid + h * 8;
        if (n >= p.N) continue;
        const int64_t col = p.idx ? p.idx[n] : n;
        if (col < 0 || col >= a.n_out) continue; /* never write outside y */
        const float b = (a.splits == 1 && a.bias) ? a.bias[col] : 0.f;
#pragma unroll
        for (int q = 0; q < 16; q++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int64_t m = m0 + 8 * q + 2 * tig + c;
                if (m >= a.M) continue;
                const float v = facc[4 * q + 2 * h + c];
                if (a.splits == 1)
                    store_out(a.y, a.ydt, m * a.n_out + col, v + b);
                else
                    a.ws[((int64_t)split * a.M + m) * a.n_out + col] = v;
            }
    }
}
#endif /* MIXC_SM90_DEVICE */

__global__ void __launch_bounds__(NTH, 1)
    qgemm_sm90_kernel(const __grid_constant__ Args90 a, const __grid_constant__ CUtensorMap act_map) {
#ifdef MIXC_SM90_DEVICE
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sbase = (raw + 1023) & ~1023u;
    uint8_t *smem = smem_raw + (sbase - raw);
    const int nst = (int)(a.Kp / KS);
    const int split = blockIdx.z;
    const int s0 = split * a.sps, s1 = min(nst, s0 + a.sps);
    if (s0 >= s1) return;
    const int64_t m0 = (int64_t)blockIdx.x * BM;

    if (threadIdx.x == 0) {
        for (int b = 0; b < ST; b++) {
            mbar_init(sbase + BAR_OFF + b * 8, 33);       /* full: expect_tx + 32 lanes' scale copies */
            mbar_init(sbase + BAR_OFF + (ST + b) * 8, 8); /* empty: the 8 consumer warps */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        if (lane == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&act_map) : "memory");
        float *sas = (float *)(smem + SA_OFF);
        for (int s = s0; s < s1; s++) {
            const int i = s - s0, buf = i % ST;
            const uint32_t bar = sbase + BAR_OFF + buf * 8;
            mbar_wait(sbase + BAR_OFF + (ST + buf) * 8, ((i / ST) & 1) ^ 1);
            if (lane == 0) {
                mbar_expect_tx(bar, ACT_BYTES);
                tma_load_2d(sbase + buf * ACT_BYTES, &act_map, s * KS, (int)m0, bar);
            }
            /* the tokens' scales of this stage: 4-byte cp.async (zero-filled past M) that arrive
             * on the same barrier when they land, so the producer never waits on a load */
#pragma unroll
            for (int r = lane; r < BM; r += 32) {
                const int64_t m = m0 + r;
                cp_async4_zfill(smem_u32(sas + buf * BM + r), a.sa + min(m, a.M - 1) * nst + s, m < a.M ? 4 : 0);
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        int rb = blockIdx.y;
        const Part90 *p = &a.p0;
        if (rb >= a.p0.nblk) {
            rb -= a.p0.nblk;
            p = &a.p1;
        }
        if (p->bits == 4)
            consume<4>(a, *p, rb, m0, s0, s1, split, smem, sbase);
        else
            consume<8>(a, *p, rb, m0, s0, s1, split, smem, sbase);
    }
#endif
}

typedef CUresult (*EncodeTiled)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_fn() {
    static EncodeTiled fn = nullptr;
    static bool tried = false;
    if (!tried) {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (EncodeTiled)p;
        tried = true;
    }
    return fn;
}

} // namespace

extern "C" int mixc_sm90_ok(int device) {
    static int cache[64]; /* 0 unknown, 1 yes, 2 no */
    if (device < 0 || device >= 64) return 0;
    if (!cache[device]) {
        int ok = 0, major = 0;
        DeviceGuard guard(device);
        if (guard.err == cudaSuccess &&
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major == 9) {
            cudaFuncAttributes fa;
            if (cudaFuncGetAttributes(&fa, qgemm_sm90_kernel) == cudaSuccess && fa.binaryVersion >= 90 && encode_fn())
                ok = 1;
        }
        cudaGetLastError();
        cache[device] = ok ? 1 : 2;
    }
    return cache[device] == 1;
}

extern "C" int mixc_qlinear_sm90(int device, const mixc_gemm *g, void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    if (!mixc_sm90_ok(device)) return (int)cudaErrorInvalidDeviceFunction;
    cudaStream_t stream = (cudaStream_t)stream_;
    if (g->splits < 1 || g->nparts < 1 || g->nparts > 2 || g->Kp % KS) return (int)cudaErrorInvalidValue;
    const int nst = (int)(g->Kp / KS);
    Args90 a;
    a.sa = g->sa;
    a.M = g->M;
    a.Kp = g->Kp;
    a.n_out = g->n_out;
    a.G = g->G;
    a.spg = g->spg;
    a.ydt = g->ydtype;
    a.splits = g->splits;
    a.sps = (nst + g->splits - 1) / g->splits;
    a.bias = g->bias;
    a.y = g->y;
    a.ws = g->ws;
    const int nblk = order_parts(g, BN, a.p0, a.p1);
    if (g->M <= 0 || nblk == 0) return 0;
    if (g->M > 0x7FFFFFFF || nblk > 65535) return (int)cudaErrorInvalidValue;

    CUtensorMap map;
    const cuuint64_t dims[2] = {(cuuint64_t)g->Kp, (cuuint64_t)g->M};
    const cuuint64_t strides[1] = {(cuuint64_t)g->Kp};
    const cuuint32_t box[2] = {KS, BM}, estr[2] = {1, 1};
    if (encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void *)g->xq, dims, strides, box, estr,
                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
        return (int)cudaErrorInvalidValue;

    static bool attr_set[64];
    if (device >= 0 && device < 64 && !attr_set[device]) {
        cudaError_t e =
            cudaFuncSetAttribute(qgemm_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
        if (e != cudaSuccess) return (int)e;
        attr_set[device] = true;
    }
    dim3 grid((unsigned)((g->M + BM - 1) / BM), (unsigned)nblk, (unsigned)((nst + a.sps - 1) / a.sps));
    qgemm_sm90_kernel<<<grid, NTH, SMEM_BYTES, stream>>>(a, map);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || g->splits == 1) return (int)e;
    return (int)launch_splitk_finish(g, (int)grid.z, 1024, stream);
}
