/* W4A8 / W8A8 / mixed-precision GEMM, mma.sync path (sm_80 and sm_90): the tile table, the planner
 * (mixc_plan) and the dispatcher (mixc_qlinear) for every configuration.
 *
 *   Y[m, n] = sum_j Sw[n, j] Sa[m, j] * sum_{k in group j} (Wq[n, k] - z[n, j]) Aq[m, k]
 *
 * Contract: the weight in the packed layout of cuda/packed_layout.cuh (written by
 * cuda/pack_weights.cu); activations int8 [M, Kp] in the padded-K layout of mixllm_cuda.h with one
 * float scale per token and 128-column stage ([M, Kp/128], cuda/act_quant.cu); each part's row n
 * written to column out_index[n] of y, in y's dtype, bias added. Design notes and measurements:
 * docs/kernels.md; the function: docs/spec.md §2 and §5. */
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "gemm_common.cuh"
#include "packed_layout.cuh"
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int KS = MIXC_KSTAGE; /* padded columns per stage */
constexpr int SPS = KS / 32;    /* k-steps per stage */
constexpr int AROW = KS + 32;   /* bytes per token row in shared memory: 8-byte fragment reads hit 32 banks */

struct Part {
    const uint4 *w, *meta;
    const int64_t *idx;
    int64_t N;
    int bits, nblk;
};

struct Args {
    const int8_t *xq;
    const float *sa;
    int64_t M, Kp, n_out;
    int G, spg, nparts, ydt, splits, sps;
    Part p0, p1;
    const float *bias;
    void *y;
    float *ws;
};

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem) {
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

/* int32 -> float, exact for |x| < 2^22: one integer add and one float subtract instead of
 * the conversion instruction, which issues at a quarter of the rate. */
__device__ __forceinline__ float i2f(int x) { return __int_as_float(x + 0x4B400000) - 12582912.0f; }

/* Shared memory of one pipeline stage: activations [BM][AROW], their scales [BM], and per warp
 * its weight fragments [TN][WPS][32 lanes] uint4 and meta records [TN] (80 bytes each). The
 * weight part is sized for 8-bit rows (the 4-bit ones use half). */
template <int NW, int TN, int BM, int BITS> struct StageLayout {
    static constexpr int ACT = BM * AROW;
    static constexpr int SA = ACT;
    static constexpr int W = (SA + BM * 4 + 15) / 16 * 16;
    static constexpr int WARP_W = TN * (BITS / 2) * 32 * 16;
    static constexpr int META = W + NW * WARP_W;
    static constexpr int BYTES = META + NW * TN * mixc_layout::META_BYTES;
};
/* Stages in flight per bit-width. Giving the 4-bit rows of decode tiles 2*ST-1 stages in the same
 * shared memory was measured slower on the H100 at M = 1 (fewer resident blocks; 62 -> 71 us on
 * 8192x28672), so both widths use ST; the 4-bit rows fill half of each stage's weight buffer. */
template <int BITS, int BM, int ST> struct Depth {
    static constexpr int value = ST;
};
template <int NW, int TN, int BM, int ST> constexpr size_t smem_bytes() {
    return (size_t)Depth<4, BM, ST>::value * StageLayout<NW, TN, BM, 4>::BYTES >
                   (size_t)ST * StageLayout<NW, TN, BM, 8>::BYTES
               ? (size_t)Depth<4, BM, ST>::value * StageLayout<NW, TN, BM, 4>::BYTES
               : (size_t)ST * StageLayout<NW, TN, BM, 8>::BYTES;
}

/* One block's tile: NW warps x TN 16-row tiles of one part, BM tokens, one split of K. */
template <int BITS, int NW, int TN, int BM, int ST_>
__device__ __forceinline__ void gemm_tile(const Args &a, const Part &p, int rb, int mb, int split, uint8_t *smem) {
    using L = StageLayout<NW, TN, BM, BITS>;
    constexpr int ST = Depth<BITS, BM, ST_>::value;
    constexpr int VEC = BITS / 4; /* uint4 per lane per k-pair */
    constexpr int WPS = 2 * VEC;  /* uint4 per lane per stage per row tile */
    constexpr int NT8 = BM / 8;   /* n8 token tiles */
    constexpr int NTH = NW * 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int64_t M = a.M, Kp = a.Kp, KP2 = Kp / 64;
    const int nst = (int)(Kp / KS); /* stages per row */
    const int s0 = split * a.sps, s1 = min(nst, s0 + a.sps);
    if (s0 >= s1) return; /* cannot happen with the plan's splits; keeps a forced plan safe */
    const int64_t rt0 = ((int64_t)rb * NW + warp) * TN;
    const int64_t NTt = (p.N + 15) / 16;
    const int64_t m0 = (int64_t)mb * BM;
    const int G = a.G, spg = a.spg;
    const uint8_t *wsrc = (const uint8_t *)p.w;
    const uint8_t *msrc = (const uint8_t *)p.meta;

    /* Everything of stage s goes global -> shared with cp.async, copied cooperatively: the
     * activations by the whole block, each warp's weights and meta by that warp. */
    auto load_stage = [&](int s, int buf) {
        uint8_t *st = smem + buf * L::BYTES;
        for (int c = threadIdx.x; c < BM * 8; c += NTH) {
            const int r = c >> 3, q = c & 7;
            const int64_t m = min(m0 + r, M - 1); /* rows past M: any valid data, never stored */
            cp_async16(st + r * AROW + q * 16, a.xq + m * Kp + (int64_t)s * KS + q * 16);
        }
        for (int r = threadIdx.x; r < BM; r += NTH) cp_async4(st + L::SA + r * 4, a.sa + min(m0 + r, M - 1) * nst + s);
        const int j = min(s / spg, G - 1);
#pragma unroll
        for (int i = 0; i < TN; i++) {
            const int64_t rt = rt0 + i;
            if (rt >= NTt) continue; /* rows never stored: their shared memory may hold anything */
            const uint8_t *src = wsrc + (((rt * KP2 + 2 * s) * VEC) * 32 + lane) * 16;
            uint8_t *dst = st + L::W + warp * L::WARP_W + (i * WPS * 32 + lane) * 16;
#pragma unroll
            for (int v = 0; v < WPS; v++) cp_async16(dst + v * 512, src + v * 512);
            if (lane < mixc_layout::META_WORDS)
                cp_async16(st + L::META + (warp * TN + i) * mixc_layout::META_BYTES + lane * 16,
                           msrc + (rt * G + j) * mixc_layout::META_BYTES + lane * 16);
        }
    };

    int iacc[TN][NT8][4];
    float facc[TN][NT8][4];
#pragma unroll
    for (int i = 0; i < TN; i++)
#pragma unroll
        for (int t = 0; t < NT8; t++)
#pragma unroll
            for (int c = 0; c < 4; c++) iacc[i][t][c] = 0, facc[i][t][c] = 0.f;

    grid_dep_wait(); /* PDL: the activation codes come from the previous kernel */
#pragma unroll
    for (int st = 0; st < ST - 1; st++) {
        if (s0 + st < s1) load_stage(s0 + st, st);
        cp_async_commit();
    }

    for (int s = s0; s < s1; s++) {
        const int buf = (s - s0) % ST;
        cp_async_wait<ST - 2>();
        __syncthreads();
        {
            const int sn = s + ST - 1;
            if (sn < s1) load_stage(sn, (sn - s0) % ST);
            cp_async_commit();
        }
        const uint8_t *st = smem + buf * L::BYTES;
        const uint4 *wsm = (const uint4 *)(st + L::W + warp * L::WARP_W) + lane;
        uint32_t zz[TN][2];
        float sw[TN][2];
#pragma unroll
        for (int i = 0; i < TN; i++) {
            const mixc_layout::MetaRecord *m =
                (const mixc_layout::MetaRecord *)(st + L::META + (warp * TN + i) * mixc_layout::META_BYTES);
            sw[i][0] = m->scale[gid];
            sw[i][1] = m->scale[gid + 8];
            zz[i][0] = (uint32_t)m->zero[gid] * 0x01010101u;
            zz[i][1] = (uint32_t)m->zero[gid + 8] * 0x01010101u;
        }
#pragma unroll
        for (int k = 0; k < SPS; k++) {
            uint32_t af[TN][4];
#pragma unroll
            for (int i = 0; i < TN; i++) {
                if (BITS == 4) {
                    const uint4 wv = wsm[(i * WPS + (k >> 1)) * 32];
                    const uint32_t w0 = (k & 1) ? wv.z : wv.x, w1 = (k & 1) ? wv.w : wv.y;
                    af[i][0] = sub_zero(w0 & 0x0F0F0F0Fu, zz[i][0]);
                    af[i][2] = sub_zero((w0 >> 4) & 0x0F0F0F0Fu, zz[i][0]);
                    af[i][1] = sub_zero(w1 & 0x0F0F0F0Fu, zz[i][1]);
                    af[i][3] = sub_zero((w1 >> 4) & 0x0F0F0F0Fu, zz[i][1]);
                } else {
                    const uint4 wv = wsm[(i * WPS + k) * 32];
                    af[i][0] = wv.x;
                    af[i][1] = wv.y;
                    af[i][2] = wv.z;
                    af[i][3] = wv.w;
                }
            }
#pragma unroll
            for (int t = 0; t < NT8; t++) {
                const uint2 b = *(const uint2 *)(st + (t * 8 + gid) * AROW + k * 32 + tig * 8);
#pragma unroll
                for (int i = 0; i < TN; i++) mma_s8(iacc[i][t], af[i], b.x, b.y);
            }
        }
        {
            /* Second step of the dequantization, at the end of every stage: a stage lies in one
             * group, so partial group sums scale exactly like whole ones, and an int32 sum over
             * 128 columns (< 2^21) always takes the fast conversion. */
            const float *sbuf = (const float *)(st + L::SA);
#pragma unroll
            for (int t = 0; t < NT8; t++) {
                const float sa0 = sbuf[t * 8 + tig * 2], sa1 = sbuf[t * 8 + tig * 2 + 1];
#pragma unroll
                for (int i = 0; i < TN; i++) {
                    facc[i][t][0] = __fmaf_rn(i2f(iacc[i][t][0]), sw[i][0] * sa0, facc[i][t][0]);
                    facc[i][t][1] = __fmaf_rn(i2f(iacc[i][t][1]), sw[i][0] * sa1, facc[i][t][1]);
                    facc[i][t][2] = __fmaf_rn(i2f(iacc[i][t][2]), sw[i][1] * sa0, facc[i][t][2]);
                    facc[i][t][3] = __fmaf_rn(i2f(iacc[i][t][3]), sw[i][1] * sa1, facc[i][t][3]);
                    iacc[i][t][0] = iacc[i][t][1] = iacc[i][t][2] = iacc[i][t][3] = 0;
                }
            }
        }
    }
    cp_async_wait<0>();

    /* epilogue: rows gid / gid+8 of each 16-row tile, tokens 2*tig, 2*tig+1 of each n8 tile */
#pragma unroll
    for (int i = 0; i < TN; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t n = (rt0 + i) * 16 + gid + h * 8;
            if (n >= p.N) continue;
            const int64_t col = p.idx ? p.idx[n] : n;
            if (col < 0 || col >= a.n_out) continue; /* never write outside y */
            const float b = (a.splits == 1 && a.bias) ? a.bias[col] : 0.f;
#pragma unroll
            for (int t = 0; t < NT8; t++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int64_t m = m0 + t * 8 + tig * 2 + c;
                    if (m >= M) continue;
                    const float v = facc[i][t][h * 2 + c];
                    if (a.splits == 1)
                        store_out(a.y, a.ydt, m * a.n_out + col, v + b);
                    else
                        a.ws[((int64_t)split * M + m) * a.n_out + col] = v;
                }
        }
    }
}

template <int NW, int TN, int BM, int ST>
__global__ void __launch_bounds__(NW * 32) qgemm_kernel(const __grid_constant__ Args a) {
    extern __shared__ uint4 smem_u4[];
    uint8_t *smem = (uint8_t *)smem_u4;
    /* Let the next kernel on the stream (launched with PDL) start fetching its weights; it
     * waits for this grid's completion before it reads anything this grid writes. */
    grid_dep_launch_dependents();
    int bx = blockIdx.x;
    if (bx < a.p0.nblk) {
        if (a.p0.bits == 4)
            gemm_tile<4, NW, TN, BM, ST>(a, a.p0, bx, blockIdx.y, blockIdx.z, smem);
        else
            gemm_tile<8, NW, TN, BM, ST>(a, a.p0, bx, blockIdx.y, blockIdx.z, smem);
    } else {
        bx -= a.p0.nblk;
        if (a.p1.bits == 4)
            gemm_tile<4, NW, TN, BM, ST>(a, a.p1, bx, blockIdx.y, blockIdx.z, smem);
        else
            gemm_tile<8, NW, TN, BM, ST>(a, a.p1, bx, blockIdx.y, blockIdx.z, smem);
    }
}

/* Per-device facts the launchers need, read once. */
struct DeviceInfo {
    int sms = 0, major = 0, smem_optin = 0;
};
const DeviceInfo &device_info(int device) {
    static DeviceInfo cache[64];
    static DeviceInfo fallback;
    if (device < 0 || device >= 64) return fallback;
    DeviceInfo &d = cache[device];
    if (!d.sms) {
        int n = 0, major = 0, smem = 0;
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) major = 8;
        if (cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
            smem = 48 * 1024;
        cudaGetLastError();
        d.major = major;
        d.smem_optin = smem;
        d.sms = n;
    }
    return d;
}
int sm_count(int device) { return device_info(device).sms ? device_info(device).sms : 132; }

/* Dynamic shared memory above 48 KB must be opted into per kernel and device; done once
 * per (kernel, device) for the largest size asked so far. `allowed` is the kernel's own
 * record (every kernel has the same function type, so it cannot live in this function). */
template <typename K> cudaError_t allow_smem(K kern, size_t smem, size_t (&allowed)[64]) {
    int dev = 0;
    if (smem <= 48 * 1024) return cudaSuccess;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
    if (allowed[dev] >= smem) return cudaSuccess;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e == cudaSuccess) allowed[dev] = smem;
    return e;
}

template <int NW, int TN, int BM, int ST> struct SmemAllowed {
    static size_t bytes[64];
};
template <int NW, int TN, int BM, int ST> size_t SmemAllowed<NW, TN, BM, ST>::bytes[64];

template <int NW, int TN, int BM, int ST> cudaError_t prepare_cfg(int *blocks_per_sm) {
    const size_t smem = smem_bytes<NW, TN, BM, ST>();
    auto kern = qgemm_kernel<NW, TN, BM, ST>;
    cudaError_t e = allow_smem(kern, smem, SmemAllowed<NW, TN, BM, ST>::bytes);
    if (e != cudaSuccess) return e;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kern, NW * 32, smem);
}

/* pdl: programmatic dependent launch (sm_90): the blocks may be scheduled while the previous
 * kernel (the activation quantizer) finishes; they wait for it in grid_dep_wait. */
template <int NW, int TN, int BM, int ST>
cudaError_t launch_cfg(const Args &a, int nblk, bool pdl, cudaStream_t stream) {
    const size_t smem = smem_bytes<NW, TN, BM, ST>();
    auto kern = qgemm_kernel<NW, TN, BM, ST>;
    cudaError_t e = allow_smem(kern, smem, SmemAllowed<NW, TN, BM, ST>::bytes);
    if (e != cudaSuccess) return e;
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3(nblk, (unsigned)((a.M + BM - 1) / BM), a.splits);
    lc.blockDim = dim3(NW * 32);
    lc.dynamicSmemBytes = smem;
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    allow_pdl(lc, attr, pdl);
    e = cudaLaunchKernelEx(&lc, kern, a);
    return e != cudaSuccess ? e : cudaGetLastError();
}

/* The tile table, one row per configuration index: decode shapes stream weights with small
 * token tiles, prefill reuses each weight fragment across 128 tokens. Rows per block =
 * nw * tn * 16. The rows with launch = nullptr run in their own files: the wgmma kernel (two
 * rows: one or two consumer warpgroup pairs; its occupancy answered by mixc_sm90_ctas_per_sm) and the
 * decode kernel (the planner sizes it itself). */
struct CfgInfo {
    int nw, tn, bm, st;
    const char *name;
    cudaError_t (*launch)(const Args &, int, bool, cudaStream_t);
    cudaError_t (*prepare)(int *);
};
#define MIXC_CFG(NW, TN, BM, ST, NAME) {NW, TN, BM, ST, NAME, launch_cfg<NW, TN, BM, ST>, prepare_cfg<NW, TN, BM, ST>}
const CfgInfo CFGS[MIXC_NCFG] = {
    MIXC_CFG(4, 2, 8, 4, "w4x2_m8"),
    MIXC_CFG(4, 2, 16, 4, "w4x2_m16"),
    MIXC_CFG(4, 2, 32, 4, "w4x2_m32"),
    MIXC_CFG(4, 2, 64, 4, "w4x2_m64"),
    MIXC_CFG(8, 1, 128, 4, "w8x1_m128"),
    MIXC_CFG(8, 2, 64, 4, "w8x2_m64"),
    MIXC_CFG(8, 1, 8, 6, "w8x1_m8_s6"),
    MIXC_CFG(8, 1, 16, 6, "w8x1_m16_s6"),
    MIXC_CFG(8, 1, 32, 4, "w8x1_m32"),
    MIXC_CFG(8, 1, 64, 4, "w8x1_m64"),
    /* MIXC_CFG_SM90 (cuda/w4a8_sm90.cu: 128 or 256 tokens; no prepare: one CTA per SM, its stage
     * ring takes most of the shared memory) */
    {8, 1, 256, 4, "sm90_wgmma", nullptr, nullptr},
    {1, 1, 8, 4, "decode_gemv", nullptr, nullptr},        /* MIXC_CFG_DECODE, cuda/w4a8_decode.cu */
    {8, 1, 128, 4, "sm90_wgmma_pairs", nullptr, nullptr}, /* MIXC_CFG_SM90_PAIRS, cuda/w4a8_sm90.cu */
};
#undef MIXC_CFG

/* Resident blocks per SM of each configuration (cached per device). */
int cfg_occupancy(int device, int cfg) {
    static int cache[64][MIXC_NCFG];
    if (device < 0 || device >= 64) device = 0;
    if (!cache[device][cfg]) {
        int n = 0;
        DeviceGuard guard(device);
        cudaError_t e = guard.err != cudaSuccess ? guard.err : CFGS[cfg].prepare ? CFGS[cfg].prepare(&n) : cudaSuccess;
        if (e != cudaSuccess || n <= 0) {
            cudaGetLastError();
            n = 1;
        }
        cache[device][cfg] = n;
    }
    return cache[device][cfg];
}

} // namespace

extern "C" int64_t mixc_gp(int64_t g) { return (g + KS - 1) / KS * KS; }

extern "C" int64_t mixc_kp(int64_t K, int64_t g) {
    int64_t G = mix_ngroups(K, g);
    return (G * mixc_gp(g) + KS - 1) / KS * KS;
}

extern "C" int64_t mixc_wpack_bytes(int bits, int64_t N, int64_t K, int64_t g) {
    return (N + 15) / 16 * 16 * mixc_kp(K, g) * bits / 8;
}

extern "C" int64_t mixc_meta_bytes(int64_t N, int64_t K, int64_t g) {
    return (N + 15) / 16 * mix_ngroups(K, g) * mixc_layout::META_BYTES;
}

extern "C" const char *mixc_cfg_name(int cfg) { return (cfg >= 0 && cfg < MIXC_NCFG) ? CFGS[cfg].name : "?"; }

extern "C" const char *mixc_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

/* Codes (rows x padded K) up to which a layer counts as small for the planner (<= 4 MB at 8 bits). */
constexpr int64_t SMALL_LAYER_CODES = 4LL << 20;
/* Codes (rows x padded K) from which the planner takes the wgmma kernel at 8 < M < 256 */
constexpr int64_t SM90_FEW_MIN_CODES = 16LL << 20;
/* Codes (rows x padded K) up to which the planner sends 8 < M <= MIXC_DECODE_MAX_M to the decode
 * kernel (M <= 8: every layer). */
constexpr int64_t DECODE_MAX_CODES = 64LL << 20;

extern "C" int mixc_plan(int device, int64_t M, const int64_t *Ns, int nparts, int64_t Kp, int cfg, int splits,
                         int *cfg_out, int *splits_out) {
    if (cfg >= MIXC_NCFG) return -1;
    const bool auto_cfg = cfg < 0;
    if ((cfg == MIXC_CFG_SM90 || cfg == MIXC_CFG_SM90_PAIRS) && !mixc_sm90_ok(device))
        cfg = 4; /* forced where no sm_90a kernel runs */
    int64_t codes_all = 0;
    for (int i = 0; i < nparts; i++) codes_all += Ns[i] * Kp;
    /* The wgmma kernel's few-token tiles against the decode kernel / mma.sync tiles: faster from 9 tokens
     * on from 4096 x 4096 up (H200, 2026-12-01, bench/results/gpu_sm90_sweep_2026-12-01.log: 1.04-1.53x at
     * 16 tokens from 6144 x 4096 up; 2026-12-02, gpu_tune_small_m_2026-12-02.log: 4096 x 4096 at 16 tokens
     * 11.0 us with two consumer pairs against the decode kernel's 12.4); smaller layers keep the other
     * kernels (too few row blocks to fill the GPU). */
    const bool sm90_few = M >= MIXC_SM90_MIN_M && codes_all >= SM90_FEW_MIN_CODES;
    if (cfg < 0 && (M >= 256 || sm90_few) && mixc_sm90_ok(device)) cfg = MIXC_CFG_SM90;
    /* ... with two consumer pairs on alternating stages at 33-64 tokens, and at 9-32 on layers of at
     * most 32 stages (K <= 4096): 1-9% faster there, 5-9% slower at 9-32 tokens on 28672 x 8192
     * (H200, 2026-12-01, bench/results/gpu_sm90_pairs_sweep_2026-12-01.log) */
    if (auto_cfg && cfg == MIXC_CFG_SM90 && M <= 64 && (M > 32 || Kp <= 32 * KS)) cfg = MIXC_CFG_SM90_PAIRS;
    /* The decode kernel up to 8 tokens on every layer, up to 16 on layers up to 14336 x 4096: measured
     * faster than the mma.sync tiles there, slower on the 70B-sized ones at 16 tokens (86 vs 71 us on
     * 28672 x 8192; H200, bench/results/gpu_decode_sweep_2026-12-01.log). */
    if (cfg < 0 && M <= MIXC_DECODE_MAX_M && (M <= 8 || codes_all <= DECODE_MAX_CODES)) cfg = MIXC_CFG_DECODE;
    if (cfg == MIXC_CFG_DECODE) {
        *cfg_out = cfg;
        *splits_out =
            splits > 0 ? mixc_decode_clamp_splits(M, splits) : mixc_decode_warps(M, Ns, nparts, Kp, sm_count(device));
        return 0;
    }
    int64_t rows_all = 0;
    for (int i = 0; i < nparts; i++) rows_all += Ns[i];
    if (cfg < 0 && M <= 64 && rows_all * Kp <= SMALL_LAYER_CODES) {
        /* A small layer (its weight stays in L2; launch- and latency-bound): 8-token tiles with all
         * six stages in flight win at every M <= 64 -- measured on the H100 at 576x576 .. 1536x576:
         * 6.7 vs 7.6 us at M = 1, 7.2 vs 8.8 at M = 16, 7.5 vs 19.7 at M = 64 (the M-sized tiles). */
        cfg = 6;
    }
    if (cfg < 0) {
        cfg = M <= 8 ? 0 : M <= 16 ? 1 : M <= 32 ? 2 : 3;
        if (M > 64) {
            /* 32 rows x 64 tokens per warp when that gives at least two waves of blocks, else
             * the 128-token tile (fewer, larger blocks keep more rows per block busy) */
            int64_t b3 = 0;
            for (int i = 0; i < nparts; i++) b3 += (Ns[i] + 127) / 128;
            b3 *= (M + 63) / 64;
            if (b3 < 2LL * sm_count(device) * cfg_occupancy(device, 3)) cfg = 4;
        }
    }
    const CfgInfo &c = CFGS[cfg];
    const int64_t bn = (int64_t)c.nw * c.tn * 16, mblocks = (M + c.bm - 1) / c.bm;
    const int nst = (int)(Kp / KS);
    if (splits <= 0) {
        /* Pick the split-K factor with the least modelled time: waves of resident blocks, each
         * wave as long as one block's share of its SM's bandwidth (8-bit row blocks count twice),
         * plus the workspace traffic of the split partial sums. Token blocks of a prefill shape
         * already fill the GPU: no split there unless the blocks are fewer than the SMs. */
        /* The wgmma kernel's few-token tiles (M <= 64): every row block counted once, splits of at
         * least 8 stages, the workspace at L2 cost (fits bench/results/gpu_sm90_sweep_2026-12-01.log's
         * best forced splits on all six shapes at 16-64 tokens). */
        const bool sm90 = cfg == MIXC_CFG_SM90 || cfg == MIXC_CFG_SM90_PAIRS;
        const bool few90 = sm90 && mixc_sm90_few_tile(M) > 0;
        const int sms = sm_count(device);
        const int occ =
            sm90 ? mixc_sm90_ctas_per_sm(M, cfg == MIXC_CFG_SM90_PAIRS ? 2 : 1) : cfg_occupancy(device, cfg);
        double blocks = 0, rows = 0;
        for (int i = 0; i < nparts; i++) {
            blocks += (double)((Ns[i] + bn - 1) / bn) * (i == 1 && !few90 ? 2.0 : 1.0);
            rows += (double)Ns[i];
        }
        blocks *= (double)mblocks;
        int smax = nst / (few90 ? 8 : 4) > 1 ? nst / (few90 ? 8 : 4) : 1; /* at least 4 (8) stages per split */
        if (smax > 32) smax = 32;
        if (cfg == 4 || cfg == 5 || (sm90 && !few90)) smax = blocks < sms ? smax : 1;
        /* A few-token tile's tokens are the tile's, whatever M: the plan is the same within a tile
         * size. With M itself the workspace term shrank below the fit's 16 tokens, and 28672 x 8192
         * took 8 splits at 9-15 tokens: 65 us at M = 9 against 51 at M = 16 with 1 split (H200,
         * 2026-12-02, bench/results/gpu_sm90_plan_tokens_2026-12-02.log). */
        const double mt = few90 ? (double)mixc_sm90_few_tile(M) : (double)M;
        double best = 0;
        splits = 1;
        for (int s = 1; s <= smax; s++) {
            const double waves = ceil(blocks * s / ((double)sms * occ));
            const double stages = ceil((double)nst / s);
            const double t = waves * occ * stages * (double)bn * KS * 0.5 /* bytes a block streams */
                             + (s > 1 ? (few90 ? 1.0 : 3.0) * 4.0 * s * mt * rows / sms : 0.0);
            if (s == 1 || t < best * 0.98) {
                best = t;
                splits = s;
            }
        }
    }
    if (splits > nst) splits = nst;
    const int sps = (nst + splits - 1) / splits;
    splits = (nst + sps - 1) / sps; /* no empty split */
    *cfg_out = cfg;
    *splits_out = splits;
    return 0;
}

extern "C" int mixc_qlinear(int device, mixc_gemm *g, void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    cudaStream_t stream = (cudaStream_t)stream_;
    if (g->cfg < 0 || g->cfg >= MIXC_NCFG || g->splits < 1 || g->nparts < 1 || g->nparts > 2)
        return (int)cudaErrorInvalidValue;
    if (g->cfg == MIXC_CFG_SM90 || g->cfg == MIXC_CFG_SM90_PAIRS) return mixc_qlinear_sm90(device, g, stream_);
    if (g->cfg == MIXC_CFG_DECODE)
        return mixc_qlinear_decode(device, g, g->pdl && device_info(device).major >= 9, stream_);
    const CfgInfo &c = CFGS[g->cfg];
    const int64_t bn = (int64_t)c.nw * c.tn * 16;
    const int nst = (int)(g->Kp / KS);
    Args a;
    fill_common_args(a, g);
    a.xq = g->xq;
    a.nparts = g->nparts;
    a.splits = g->splits;
    a.sps = (nst + g->splits - 1) / g->splits;
    a.ws = g->ws;
    const int nblk = order_parts(g, bn, a.p0, a.p1);
    if (g->M <= 0 || nblk == 0) return 0;
    const bool pdl = g->pdl && device_info(device).major >= 9;
    cudaError_t e = CFGS[g->cfg].launch(a, nblk, pdl, stream);
    if (e != cudaSuccess || g->splits == 1) return (int)e;
    return (int)launch_splitk_finish(g, g->splits, 4 * sm_count(device), pdl, stream);
}
