// Decode GEMM (few tokens, M <= 64): configuration MIXC_CFG_DECODE of mixc_qlinear.
//
// Same function, inputs and packed layout as the other GEMM paths (cuda/packed_layout.cuh,
// docs/kernels.md). One block owns one 16-row weight tile and 8*NT8 tokens; its `kw` warps split
// the tile's K into contiguous stage ranges, each warp streams its range straight from global
// memory into registers (a ring of DEPTH stages in flight, no shared memory, no block barrier),
// and the warps' float partial sums are added in a fixed order through shared memory at the end:
// split-K without a workspace or a second launch, deterministic. Both parts of a mixed layer
// (8-bit row tiles first) go in the same launch.
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "gemm_common.cuh"
#include "packed_layout.cuh"
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

using namespace mixc_layout;

constexpr int MAX_KW = 8; /* warps per block: 2 blocks of 8 warps fit an SM's registers */

struct DPart {
    const uint4 *w;
    const MetaRecord *meta;
    const int64_t *idx;
    int64_t N;
    int bits, nblk; /* nblk: 16-row tiles */
};

struct DArgs {
    const int8_t *xq;
    const float *sa;
    int64_t M, Kp, n_out;
    int G, spg, nst, ydt, kw;
    DPart p0, p1;
    const float *bias;
    void *y;
};

__device__ __forceinline__ void dec_mma(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* 8 activation bytes (L1-cached: every warp of the SM reads the same few rows). volatile: keeps
 * the loads of a stage after the previous stage's ring refill, so that the compiler does not
 * hoist every stage's activations into registers at once. */
__device__ __forceinline__ uint2 ld_act8(const void *p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

/* int32 -> float, exact for |x| < 2^22 (a stage's sums stay under 2^21). */
__device__ __forceinline__ float dec_i2f(int x) { return __int_as_float(x + 0x4B400000) - 12582912.0f; }

__device__ __forceinline__ void dec_grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void dec_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* One warp's share of one tile: stages [s0, s1) of row tile rt, tokens m0 .. m0 + 8*NT8 - 1;
 * float sums in facc (C-fragment order: rows gid / gid+8, tokens 2*tig, 2*tig+1 of each n8 tile). */
template <int BITS, int NT8>
__device__ __forceinline__ void decode_range(const DArgs &a, const DPart &p, int64_t rt, int64_t m0, int s0, int s1,
                                             float (&facc)[NT8][4]) {
    constexpr int WPS = words_per_stage(BITS);
    constexpr int DEPTH = 8 / WPS; /* stages in flight: 4 KB of codes per warp */
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int64_t KP2 = a.Kp / 64;
    const uint4 *wbase = p.w + rt * KP2 * (BITS / 4) * 32 + lane;
    const MetaRecord *mbase = p.meta + rt * a.G;

    uint4 w[DEPTH][WPS];
    float sw[DEPTH][2];
    uint32_t zz[DEPTH][2];
    auto load = [&](int d, int s) {
#pragma unroll
        for (int v = 0; v < WPS; v++) w[d][v] = ld_stream(wbase + (s * WPS + v) * 32);
        const MetaRecord *mr = mbase + min(s / a.spg, a.G - 1);
        sw[d][0] = __ldg(&mr->scale[gid]);
        sw[d][1] = __ldg(&mr->scale[gid + 8]);
        if (BITS == 4) {
            zz[d][0] = (uint32_t)__ldg(&mr->zero[gid]) * 0x01010101u;
            zz[d][1] = (uint32_t)__ldg(&mr->zero[gid + 8]) * 0x01010101u;
        } else {
            zz[d][0] = zz[d][1] = 0;
        }
    };

    /* The weights do not depend on the previous kernel: fetch the first stages, then wait (PDL)
     * for the activation codes. */
#pragma unroll
    for (int d = 0; d < DEPTH; d++)
        if (s0 + d < s1) load(d, s0 + d);
    dec_grid_dep_wait();

    /* Activations one stage ahead (measured: a warp that loads them at the start of each stage
     * waits on them and on a 4-long MMA chain in turn, and runs at half the streaming rate). */
    uint2 bx[NT8][KSTEPS_PER_STAGE];
    auto load_act = [&](int s) {
#pragma unroll
        for (int t = 0; t < NT8; t++) {
            const int64_t mb = m0 + t * 8 + gid;
            const int8_t *xr = a.xq + mb * a.Kp + (int64_t)s * KSTAGE + tig * 8;
#pragma unroll
            for (int k = 0; k < KSTEPS_PER_STAGE; k++)
                bx[t][k] = (mb < a.M && s < s1) ? ld_act8(xr + k * KSTEP) : make_uint2(0, 0);
        }
    };
    load_act(s0);

    for (int sb = s0; sb < s1; sb += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; d++) {
            const int s = sb + d;
            if (s >= s1) break;
            uint2 b[NT8][KSTEPS_PER_STAGE];
#pragma unroll
            for (int t = 0; t < NT8; t++)
#pragma unroll
                for (int k = 0; k < KSTEPS_PER_STAGE; k++) b[t][k] = bx[t][k];
            load_act(s + 1);
            /* (q - z) as int8 A fragments of the stage's four k-steps, shared by all token tiles */
            uint32_t af[KSTEPS_PER_STAGE][4];
#pragma unroll
            for (int k = 0; k < KSTEPS_PER_STAGE; k++) {
                if (BITS == 4) {
                    const uint4 wv = w[d][k >> 1];
                    const uint32_t w0 = (k & 1) ? wv.z : wv.x, w1 = (k & 1) ? wv.w : wv.y;
                    af[k][0] = sub_zero(w0 & 0x0F0F0F0Fu, zz[d][0]);
                    af[k][2] = sub_zero((w0 >> 4) & 0x0F0F0F0Fu, zz[d][0]);
                    af[k][1] = sub_zero(w1 & 0x0F0F0F0Fu, zz[d][1]);
                    af[k][3] = sub_zero((w1 >> 4) & 0x0F0F0F0Fu, zz[d][1]);
                } else {
                    const uint4 wv = w[d][k];
                    af[k][0] = wv.x;
                    af[k][1] = wv.y;
                    af[k][2] = wv.z;
                    af[k][3] = wv.w;
                }
            }
#pragma unroll
            for (int t = 0; t < NT8; t++) {
                if (m0 + t * 8 >= a.M) break; /* token tiles past M: nothing to compute */
                const int64_t mc = m0 + t * 8 + 2 * tig;
                /* two independent accumulators: MMA chains of 2 instead of 4 */
                int i0[4] = {0, 0, 0, 0}, i1[4] = {0, 0, 0, 0};
                dec_mma(i0, af[0][0], af[0][1], af[0][2], af[0][3], b[t][0].x, b[t][0].y);
                dec_mma(i1, af[1][0], af[1][1], af[1][2], af[1][3], b[t][1].x, b[t][1].y);
                dec_mma(i0, af[2][0], af[2][1], af[2][2], af[2][3], b[t][2].x, b[t][2].y);
                dec_mma(i1, af[3][0], af[3][1], af[3][2], af[3][3], b[t][3].x, b[t][3].y);
                /* second step of the dequantization: a stage lies in one group */
                const float sa0 = mc < a.M ? __ldg(a.sa + mc * a.nst + s) : 0.f;
                const float sa1 = mc + 1 < a.M ? __ldg(a.sa + (mc + 1) * a.nst + s) : 0.f;
                facc[t][0] = __fmaf_rn(dec_i2f(i0[0] + i1[0]), sw[d][0] * sa0, facc[t][0]);
                facc[t][1] = __fmaf_rn(dec_i2f(i0[1] + i1[1]), sw[d][0] * sa1, facc[t][1]);
                facc[t][2] = __fmaf_rn(dec_i2f(i0[2] + i1[2]), sw[d][1] * sa0, facc[t][2]);
                facc[t][3] = __fmaf_rn(dec_i2f(i0[3] + i1[3]), sw[d][1] * sa1, facc[t][3]);
            }
            if (s + DEPTH < s1) load(d, s + DEPTH); /* refill the ring slot just consumed */
        }
    }
}

/* Most warps per block at NT8 token tiles. */
__host__ __device__ constexpr int max_kw(int nt8) { return nt8 <= 8 ? MAX_KW : 1; }

template <int NT8>
__global__ void __launch_bounds__(MAX_KW * 32, NT8 <= 2 ? 2 : 1) decode_kernel(const __grid_constant__ DArgs a) {
    extern __shared__ float red[]; /* [kw][NT8 * 4][32] partial sums */
    dec_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int64_t tile = blockIdx.x;
    const bool first = tile < a.p0.nblk;
    const DPart &p = first ? a.p0 : a.p1;
    if (!first) tile -= a.p0.nblk;
    const int64_t m0 = (int64_t)blockIdx.y * 8 * NT8;
    const int sps = (a.nst + a.kw - 1) / a.kw;
    const int s0 = warp * sps, s1 = min(a.nst, s0 + sps);

    float facc[NT8][4];
#pragma unroll
    for (int t = 0; t < NT8; t++) facc[t][0] = facc[t][1] = facc[t][2] = facc[t][3] = 0.f;
    if (s0 < s1) {
        if (p.bits == 4)
            decode_range<4, NT8>(a, p, tile, m0, s0, s1, facc);
        else
            decode_range<8, NT8>(a, p, tile, m0, s0, s1, facc);
    } else {
        dec_grid_dep_wait();
    }
#pragma unroll
    for (int t = 0; t < NT8; t++)
#pragma unroll
        for (int c = 0; c < 4; c++) red[((warp * NT8 + t) * 4 + c) * 32 + lane] = facc[t][c];
    __syncthreads();

    /* Element e = (t*4 + c)*32 + lane of the tile: warps' partials in warp order, bias, store. */
    for (int e = threadIdx.x; e < NT8 * 4 * 32; e += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < a.kw; w++) v += red[w * NT8 * 4 * 32 + e];
        const int l = e & 31, tc = e >> 5, t = tc >> 2, c = tc & 3;
        const int64_t n = tile * TILE_ROWS + (l >> 2) + (c >> 1) * 8;
        const int64_t m = m0 + t * 8 + 2 * (l & 3) + (c & 1);
        if (n >= p.N || m >= a.M) continue;
        const int64_t col = p.idx ? p.idx[n] : n;
        if (col < 0 || col >= a.n_out) continue; /* never write outside y */
        if (a.bias) v += a.bias[col];
        store_out(a.y, a.ydt, m * a.n_out + col, v);
    }
}

template <int NT8> cudaError_t launch_decode(const DArgs &a, int nblk, bool pdl, cudaStream_t stream) {
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3((unsigned)nblk, (unsigned)((a.M + 8 * NT8 - 1) / (8 * NT8)), 1);
    lc.blockDim = dim3(a.kw * 32);
    lc.dynamicSmemBytes = (size_t)a.kw * NT8 * 4 * 32 * sizeof(float);
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    lc.attrs = attr;
    lc.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&lc, decode_kernel<NT8>, a);
    return e != cudaSuccess ? e : cudaGetLastError();
}

} // namespace

extern "C" int mixc_decode_tokens_per_block(int64_t M) { return M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64; }

extern "C" int mixc_decode_max_warps(int64_t M) { return max_kw(mixc_decode_tokens_per_block(M) / 8); }

extern "C" int mixc_decode_warps(int64_t M, const int64_t *Ns, int nparts, int64_t Kp, int sms) {
    /* Enough warps in flight to cover the memory latency (about 24 per SM), but at least four
     * stages per warp so that each keeps its ring of loads full. */
    int64_t tiles = 0;
    for (int i = 0; i < nparts; i++) tiles += (Ns[i] + TILE_ROWS - 1) / TILE_ROWS;
    tiles *= (M + mixc_decode_tokens_per_block(M) - 1) / mixc_decode_tokens_per_block(M);
    const int64_t nst = Kp / KSTAGE, want = 24LL * sms;
    int kw = 1;
    while (kw < MAX_KW && tiles * kw < want && nst / (2 * kw) >= 4) kw *= 2;
    return kw < mixc_decode_max_warps(M) ? kw : mixc_decode_max_warps(M);
}

extern "C" int mixc_qlinear_decode(int device, const mixc_gemm *g, int pdl, void *stream) {
    if (g->splits < 1 || g->splits > mixc_decode_max_warps(g->M)) return (int)cudaErrorInvalidValue;
    DArgs a;
    a.xq = g->xq;
    a.sa = g->sa;
    a.M = g->M;
    a.Kp = g->Kp;
    a.n_out = g->n_out;
    a.G = g->G;
    a.spg = g->spg;
    a.nst = (int)(g->Kp / KSTAGE);
    a.ydt = g->ydtype;
    a.kw = g->splits;
    a.bias = g->bias;
    a.y = g->y;
    const int nblk = order_parts(g, TILE_ROWS, a.p0, a.p1);
    if (g->M <= 0 || nblk == 0) return 0;
    (void)device;
    cudaStream_t s = (cudaStream_t)stream;
    switch (mixc_decode_tokens_per_block(g->M)) {
    case 8: return (int)launch_decode<1>(a, nblk, pdl != 0, s);
    case 16: return (int)launch_decode<2>(a, nblk, pdl != 0, s);
    case 32: return (int)launch_decode<4>(a, nblk, pdl != 0, s);
    default: return (int)launch_decode<8>(a, nblk, pdl != 0, s);
    }
}
