// Decode GEMM (few tokens, M <= 64): configuration MIXC_CFG_DECODE of mixc_qlinear.
//
// Same function, inputs and packed layout as the other GEMM paths (cuda/packed_layout.cuh,
// docs/kernels.md). One block owns one 16-row weight tile (or, in the "paired" layouts, two 4-bit
// tiles) and 8*NT8 tokens; the warps of a tile split its K into contiguous stage ranges. Each warp
// streams its range global -> shared memory with cp.async into its own ring (8 KB of codes in
// flight, each stage with its meta record; no block barrier in the main loop), and the warps'
// float partial sums are added in a fixed order through shared memory at the end: split-K without
// a workspace or a second launch, deterministic. Both parts of a mixed layer (8-bit row tiles
// first) go in the same launch.
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "gemm_common.cuh"
#include "packed_layout.cuh"
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

using namespace mixc_layout;

/* The most warps per block (a block of 16 warps x at most 128 registers fills an SM's register file). */
constexpr int MAX_WARPS = 16;
/* splits >= PAIRED: two 4-bit row tiles per block, splits - PAIRED warps each (see mixc_qlinear_decode). */
constexpr int PAIRED = MIXC_DECODE_PAIRED;

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
    int G, spg, nst, ydt;
    int nw;   /* warps per block */
    int tpb4; /* 4-bit row tiles per block (1 or 2); an 8-bit part has one tile per block */
    int nb0;  /* blocks of part 0 */
    DPart p0, p1;
    const float *bias;
    void *y;
};

/* d += A B on the m16n8k32 int8 tensor-core shape; U8: A holds unsigned bytes (the raw 4-bit codes,
 * without the zero point subtracted first), else signed. */
template <bool U8 = false>
__device__ __forceinline__ void dec_mma(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
    if constexpr (U8)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* -z in every byte (two's complement), z = 0..255: the A operand whose product with a k-step's
 * activations is -z * (their sum) in every row of the tile. */
__device__ __forceinline__ uint32_t neg_zero_bytes(uint32_t z) { return __byte_perm(0u - z, 0u, 0x0000); }

/* 8 activation bytes (L1-cached: every warp of the SM reads the same few rows). volatile: keeps
 * the loads of a stage after the previous stage's ring refill, so that the compiler does not
 * hoist every stage's activations into registers at once. */
__device__ __forceinline__ uint2 ld_act8(const void *p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ float ld_scale(const float *p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
    return v;
}

/* The weight ring: each warp copies its coming stages (codes and the stage's meta record) global ->
 * shared memory with cp.async, 16 bytes per lane, and waits for the oldest with cp.async.wait_group.
 * (Measured, first two versions: a ring of registers filled by plain loads reached half the
 * streaming rate; the compiler gives every load of the loop one scoreboard, so that waiting for
 * the activations, one stage ahead, also waited for every weight stage in flight.) */
__device__ __forceinline__ void cp16(void *smem, const void *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
                 "l"(gmem)
                 : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Ring of one warp: 8 KB of codes in flight (8 stages at 4 bits, 4 at 8 bits), each stage's slot
 * followed by its meta record. */
constexpr int RING_CODE_BYTES = 8 * 1024;
__host__ __device__ constexpr int slot_words(int bits) { return words_per_stage(bits) * 32 + META_WORDS; }
__host__ __device__ constexpr int ring_depth(int bits) {
    return RING_CODE_BYTES / (words_per_stage(bits) * WARP_WORD_BYTES);
}
constexpr int RING_WORDS = ring_depth(4) * slot_words(4) > ring_depth(8) * slot_words(8)
                               ? ring_depth(4) * slot_words(4)
                               : ring_depth(8) * slot_words(8);
/* Dynamic shared memory of a block of nw warps: their rings, then their partial sums. */
__host__ __device__ constexpr size_t decode_smem(int nw, int nt8) {
    return (size_t)nw * RING_WORDS * 16 + (size_t)nw * nt8 * 4 * 32 * sizeof(float);
}

/* One warp's share of one tile: stages [s0, s1) of row tile rt, tokens m0 .. m0 + 8*NT8 - 1;
 * float sums in facc (C-fragment order: rows gid / gid+8, tokens 2*tig, 2*tig+1 of each n8 tile).
 * The loop body is kept lean (measured, first version: ~200 instructions per 1 KB stage, the warps
 * issue-latency bound at half the streaming rate): every address advances by a constant per
 * stage, the group index by a counter, no division and no 64-bit multiply inside the loop. */
template <int BITS, int NT8>
__device__ __forceinline__ void decode_range(const DArgs &a, const DPart &p, int64_t rt, int64_t m0, int s0, int s1,
                                             float (&facc)[NT8][4], uint4 *ring) {
    constexpr int WPS = words_per_stage(BITS);
    constexpr int DEPTH = ring_depth(BITS); /* stages in flight: 8 KB of codes per warp */
    constexpr int SLOT = slot_words(BITS);
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int64_t KP2 = a.Kp / 64;
    /* next stage to fetch: its codes and its group's meta record (spg stages per group) */
    const uint4 *wnext = p.w + (rt * KP2 * (BITS / 4) + (int64_t)s0 * WPS) * 32 + lane;
    const MetaRecord *mnext = p.meta + rt * a.G + s0 / a.spg;
    int mleft = a.spg - s0 % a.spg; /* stages left in mnext's group */

    /* Every lane copies its own code words (and reads back only those); lanes 0..4 copy the meta
     * record, which all lanes read (hence the __syncwarp around its use). One commit group per
     * stage, empty past s1, so that "all but the DEPTH-1 newest groups" is always the oldest stage. */
    auto load = [&](int d) {
        uint4 *slot = ring + d * SLOT;
#pragma unroll
        for (int v = 0; v < WPS; v++) cp16(slot + v * 32 + lane, wnext + v * 32);
        if (lane < META_WORDS) cp16(slot + WPS * 32 + lane, (const uint4 *)mnext + lane);
        wnext += WPS * 32;
        if (--mleft == 0) {
            mleft = a.spg;
            mnext++;
        }
    };

    /* The weights do not depend on the previous kernel: fetch the first stages, then wait (PDL)
     * for the activation codes. */
#pragma unroll
    for (int d = 0; d < DEPTH; d++) {
        if (s0 + d < s1) load(d);
        cp_commit();
    }
    grid_dep_wait();

    /* Per token tile: its activation row and the scale rows of the two tokens whose sums this lane
     * rescales. Tokens past M read token 0's (no select per load: their output columns are computed
     * but never stored). The pointers advance one stage per load_act. */
    const int8_t *xp[NT8];
    const float *sp[NT8][2];
#pragma unroll
    for (int t = 0; t < NT8; t++) {
        const int64_t mb = m0 + t * 8 + gid, mc = m0 + t * 8 + 2 * tig;
        xp[t] = a.xq + (mb < a.M ? mb : 0) * a.Kp + tig * 8 + (int64_t)s0 * KSTAGE;
        sp[t][0] = a.sa + (mc < a.M ? mc : 0) * a.nst + s0;
        sp[t][1] = a.sa + (mc + 1 < a.M ? mc + 1 : 0) * a.nst + s0;
    }
    /* Activations and their scales one stage ahead (measured: a warp that loads them at the start
     * of each stage waits on them and on a 4-long MMA chain in turn, at half the streaming rate);
     * from 16 tokens on, after the stage's MMAs (two sets of them would not fit the registers). */
    constexpr bool ACT_AHEAD = NT8 == 1;
    /* two activation buffers at one token tile (the stage's and the next one's, swapped by
     * unrolling two stages: no register copies), one from 16 tokens on (reloaded after the MMAs) */
    uint2 bxa[NT8][KSTEPS_PER_STAGE], bxb[NT8][KSTEPS_PER_STAGE];
    float sxa[NT8][2], sxb[NT8][2];
    /* Loads are unconditional (a predicated load makes the compiler copy every register it may
     * keep); `more` = 0 parks the pointers on the warp's last stage, never past the row. */
    auto load_act = [&](uint2(&bx)[NT8][KSTEPS_PER_STAGE], float (&sx)[NT8][2], bool more) {
        const int step = more ? KSTAGE : 0, sstep = more ? 1 : 0;
#pragma unroll
        for (int t = 0; t < NT8; t++) {
#pragma unroll
            for (int k = 0; k < KSTEPS_PER_STAGE; k++) bx[t][k] = ld_act8(xp[t] + k * KSTEP);
            sx[t][0] = ld_scale(sp[t][0]);
            sx[t][1] = ld_scale(sp[t][1]);
            xp[t] += step;
            sp[t][0] += sstep;
            sp[t][1] += sstep;
        }
    };
    load_act(bxa, sxa, s0 + 1 < s1);

    /* Stage s = sb + d from ring slot d, activations in (b, sa); the next stage's go to (bn, sn). */
    auto stage = [&](int sb, int d, uint2(&b)[NT8][KSTEPS_PER_STAGE], float (&sa)[NT8][2],
                     uint2(&bn)[NT8][KSTEPS_PER_STAGE], float (&sn)[NT8][2]) {
        const int s = sb + d;
        if (ACT_AHEAD) load_act(bn, sn, s + 2 < s1);
        /* stage s has landed in slot d */
        cp_wait<DEPTH - 1>();
        __syncwarp();
        const uint4 *slot = ring + d * SLOT;
        uint4 w[WPS];
#pragma unroll
        for (int v = 0; v < WPS; v++) w[v] = slot[v * 32 + lane];
        const MetaRecord *mr = (const MetaRecord *)(slot + WPS * 32);
        const float sw0 = mr->scale[gid], sw1 = mr->scale[gid + 8];
        /* 4 bits: -z of rows gid and gid + 8 in every byte (see below) */
        const uint32_t nz0 = BITS == 4 ? neg_zero_bytes(mr->zero[gid]) : 0u;
        const uint32_t nz1 = BITS == 4 ? neg_zero_bytes(mr->zero[gid + 8]) : 0u;
        __syncwarp(); /* every lane has read the slot's meta record: it may be refilled */
        if (s + DEPTH < s1) load(d);
        cp_commit();
        /* A fragments of the stage's four k-steps, shared by all token tiles. 4 bits: the raw
         * codes q (u8 operand); the zero point is subtracted as one more MMA per k-step, of
         * -z (in every byte) with the same activations: sum (q - z) a = sum q a + sum (-z) a,
         * exact in int32. That takes 2 instructions per code word instead of 5 (the loop is
         * issue-bound, docs/kernels.md). */
        uint32_t af[KSTEPS_PER_STAGE][4];
#pragma unroll
        for (int k = 0; k < KSTEPS_PER_STAGE; k++) {
            if (BITS == 4) {
                const uint4 wv = w[k >> 1];
                const uint32_t w0 = (k & 1) ? wv.z : wv.x, w1 = (k & 1) ? wv.w : wv.y;
                af[k][0] = w0 & 0x0F0F0F0Fu;
                af[k][2] = (w0 >> 4) & 0x0F0F0F0Fu;
                af[k][1] = w1 & 0x0F0F0F0Fu;
                af[k][3] = (w1 >> 4) & 0x0F0F0F0Fu;
            } else {
                const uint4 wv = w[k];
                af[k][0] = wv.x;
                af[k][1] = wv.y;
                af[k][2] = wv.z;
                af[k][3] = wv.w;
            }
        }
#pragma unroll
        for (int t = 0; t < NT8; t++) {
            if (m0 + t * 8 >= a.M) break; /* token tiles past M: nothing to compute */
            /* two independent accumulator chains (+ the zero-point chain at 4 bits) */
            int i0[4] = {0, 0, 0, 0}, i1[4] = {0, 0, 0, 0}, iz[4] = {0, 0, 0, 0};
            if (BITS == 4) {
                dec_mma<true>(i0, af[0][0], af[0][1], af[0][2], af[0][3], b[t][0].x, b[t][0].y);
                dec_mma<true>(i1, af[1][0], af[1][1], af[1][2], af[1][3], b[t][1].x, b[t][1].y);
                dec_mma(iz, nz0, nz1, nz0, nz1, b[t][0].x, b[t][0].y);
                dec_mma<true>(i0, af[2][0], af[2][1], af[2][2], af[2][3], b[t][2].x, b[t][2].y);
                dec_mma<true>(i1, af[3][0], af[3][1], af[3][2], af[3][3], b[t][3].x, b[t][3].y);
                dec_mma(iz, nz0, nz1, nz0, nz1, b[t][1].x, b[t][1].y);
                dec_mma(iz, nz0, nz1, nz0, nz1, b[t][2].x, b[t][2].y);
                dec_mma(iz, nz0, nz1, nz0, nz1, b[t][3].x, b[t][3].y);
            } else {
                dec_mma(i0, af[0][0], af[0][1], af[0][2], af[0][3], b[t][0].x, b[t][0].y);
                dec_mma(i1, af[1][0], af[1][1], af[1][2], af[1][3], b[t][1].x, b[t][1].y);
                dec_mma(i0, af[2][0], af[2][1], af[2][2], af[2][3], b[t][2].x, b[t][2].y);
                dec_mma(i1, af[3][0], af[3][1], af[3][2], af[3][3], b[t][3].x, b[t][3].y);
            }
            /* second step of the dequantization: a stage lies in one group */
            facc[t][0] = __fmaf_rn(__int2float_rn(i0[0] + i1[0] + iz[0]), sw0 * sa[t][0], facc[t][0]);
            facc[t][1] = __fmaf_rn(__int2float_rn(i0[1] + i1[1] + iz[1]), sw0 * sa[t][1], facc[t][1]);
            facc[t][2] = __fmaf_rn(__int2float_rn(i0[2] + i1[2] + iz[2]), sw1 * sa[t][0], facc[t][2]);
            facc[t][3] = __fmaf_rn(__int2float_rn(i0[3] + i1[3] + iz[3]), sw1 * sa[t][1], facc[t][3]);
        }
        if (!ACT_AHEAD) load_act(bn, sn, s + 2 < s1);
    };
    for (int sb = s0; sb < s1; sb += DEPTH) {
#pragma unroll
        for (int d = 0; d < DEPTH; d += 2) { /* DEPTH is even */
            if (sb + d >= s1) break;
            if (ACT_AHEAD)
                stage(sb, d, bxa, sxa, bxb, sxb);
            else
                stage(sb, d, bxa, sxa, bxa, sxa);
            if (sb + d + 1 >= s1) break;
            if (ACT_AHEAD)
                stage(sb, d + 1, bxb, sxb, bxa, sxa);
            else
                stage(sb, d + 1, bxa, sxa, bxa, sxa);
        }
    }
}

/* Most warps per block at NT8 token tiles (more token tiles: more registers per thread). */
__host__ __device__ constexpr int max_warps(int nt8) { return nt8 <= 2 ? MAX_WARPS : 8; }

/* Block b of a part: `tpb` row tiles of `nw / tpb` warps each; warp w works on tile
 * b * tpb + w / (nw / tpb), stages [i * nst / wpt, (i + 1) * nst / wpt) for i = w % wpt. The
 * warps' float sums meet in shared memory and are added in warp order (deterministic). */
template <int NT8>
__global__ void __launch_bounds__(max_warps(NT8) * 32, 1) decode_kernel(const __grid_constant__ DArgs a) {
    extern __shared__ uint4 dsmem[]; /* [nw][RING_WORDS] weight rings, then [nw][NT8 * 4][32] partial sums */
    float *red = (float *)(dsmem + (size_t)a.nw * RING_WORDS);
    grid_dep_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint4 *ring = dsmem + (size_t)warp * RING_WORDS;
    const bool first = (int)blockIdx.x < a.nb0;
    const DPart &p = first ? a.p0 : a.p1;
    const int64_t blk = first ? blockIdx.x : blockIdx.x - a.nb0;
    const int tpb = p.bits == 4 ? a.tpb4 : 1, wpt = a.nw / tpb;
    const int64_t m0 = (int64_t)blockIdx.y * 8 * NT8;
    const int64_t tile = blk * tpb + warp / wpt;
    const int wi = warp % wpt;
    const int s0 = (int)((int64_t)wi * a.nst / wpt), s1 = (int)((int64_t)(wi + 1) * a.nst / wpt);

    float facc[NT8][4];
#pragma unroll
    for (int t = 0; t < NT8; t++) facc[t][0] = facc[t][1] = facc[t][2] = facc[t][3] = 0.f;
    if (warp < tpb * wpt && tile < p.nblk && s0 < s1) {
        if (p.bits == 4)
            decode_range<4, NT8>(a, p, tile, m0, s0, s1, facc, ring);
        else
            decode_range<8, NT8>(a, p, tile, m0, s0, s1, facc, ring);
    } else {
        grid_dep_wait();
    }
#pragma unroll
    for (int t = 0; t < NT8; t++)
#pragma unroll
        for (int c = 0; c < 4; c++) red[((warp * NT8 + t) * 4 + c) * 32 + lane] = facc[t][c];
    __syncthreads();

    /* Element e = (ti * NT8 * 4 + t * 4 + c) * 32 + lane: tile ti's warps' partials in warp order,
     * bias, store. */
    constexpr int PER_TILE = NT8 * 4 * 32;
    for (int e = threadIdx.x; e < tpb * PER_TILE; e += blockDim.x) {
        const int ti = e / PER_TILE, et = e % PER_TILE;
        const int64_t tl = blk * tpb + ti;
        if (tl >= p.nblk) break;
        float v = 0.f;
        for (int w = ti * wpt; w < (ti + 1) * wpt; w++) v += red[w * PER_TILE + et];
        const int l = et & 31, tc = et >> 5, t = tc >> 2, c = tc & 3;
        const int64_t n = tl * TILE_ROWS + (l >> 2) + (c >> 1) * 8;
        const int64_t m = m0 + t * 8 + 2 * (l & 3) + (c & 1);
        if (n >= p.N || m >= a.M) continue;
        const int64_t col = p.idx ? p.idx[n] : n;
        if (col < 0 || col >= a.n_out) continue; /* never write outside y */
        if (a.bias) v += a.bias[col];
        store_out(a.y, a.ydt, m * a.n_out + col, v);
    }
}

/* Opt decode_kernel<NT8> into `bytes` of dynamic shared memory on the current device (above 48 KB;
 * raised only when a launch needs more than asked so far, so that a GPU with a smaller opt-in limit
 * runs the layouts that fit it). */
template <int NT8> cudaError_t allow_decode_smem(size_t bytes) {
    static size_t allowed[64];
    if (bytes <= 48 * 1024) return cudaSuccess;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev >= 0 && dev < 64 && allowed[dev] >= bytes) return cudaSuccess;
    e = cudaFuncSetAttribute(decode_kernel<NT8>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e == cudaSuccess && dev >= 0 && dev < 64) allowed[dev] = bytes;
    return e;
}

template <int NT8> cudaError_t launch_decode(const DArgs &a, int nblk, bool pdl, cudaStream_t stream) {
    cudaError_t e0 = allow_decode_smem<NT8>(decode_smem(a.nw, NT8));
    if (e0 != cudaSuccess) return e0;
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3((unsigned)nblk, (unsigned)((a.M + 8 * NT8 - 1) / (8 * NT8)), 1);
    lc.blockDim = dim3(a.nw * 32);
    lc.dynamicSmemBytes = decode_smem(a.nw, NT8);
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    allow_pdl(lc, attr, pdl);
    cudaError_t e = cudaLaunchKernelEx(&lc, decode_kernel<NT8>, a);
    return e != cudaSuccess ? e : cudaGetLastError();
}

} // namespace

extern "C" int mixc_decode_tokens_per_block(int64_t M) { return M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64; }

extern "C" int mixc_decode_max_warps(int64_t M) { return max_warps(mixc_decode_tokens_per_block(M) / 8); }

/* splits = warps per 8-bit tile and per 4-bit tile (1 .. max warps), or PAIRED + warps per 4-bit
 * tile: two 4-bit tiles per block (then an 8-bit tile gets twice as many warps, each warp of the
 * layer streams about the same bytes). Returns the value clamped to what M allows. */
extern "C" int mixc_decode_clamp_splits(int64_t M, int splits) {
    const int kmax = mixc_decode_max_warps(M);
    if (splits >= PAIRED) {
        int w = splits - PAIRED;
        w = w < 1 ? 1 : w > kmax / 2 ? kmax / 2 : w;
        return PAIRED + w;
    }
    return splits < 1 ? 1 : splits > kmax ? kmax : splits;
}

extern "C" int mixc_decode_warps(int64_t M, const int64_t *Ns, int nparts, int64_t Kp, int sms) {
    /* Warps per tile (one tile per block): the fewest (a power of two, at most 8) that give the
     * layer at least 11 warps per SM and each warp at most 16 stages, while each keeps at least 4.
     * Measured against every forced layout at M = 1 and 4 (H200, 2026-12-01,
     * bench/results/gpu_decode_sweep_planner_before_2026-12-01.log): the best layouts of the
     * Llama-3 8B/70B shapes had 1050-2100 warps in all (7200 at 28672 x 8192, where fewer warps
     * would stream 32-64 stages each); this picks them, or within 3% (8192 x 28672: 48.6 vs 47.4 us).
     * The rule before (more warps up to 32 per SM while each kept 8 stages) took 13.1 instead of
     * 10.9 us at 6144 x 4096 and 20.1 instead of 17.6 at 14336 x 4096. The paired layouts win
     * nowhere by more than 1 us, so they are not used. */
    int64_t tiles = 0;
    for (int i = 0; i < nparts; i++) tiles += (Ns[i] + TILE_ROWS - 1) / TILE_ROWS;
    tiles *= (M + mixc_decode_tokens_per_block(M) - 1) / mixc_decode_tokens_per_block(M);
    const int64_t nst = Kp / KSTAGE, enough = 11LL * sms;
    int kw = 1;
    while (kw < 8 && (tiles * kw < enough || nst > 16LL * kw) && nst / (2 * kw) >= 4) kw *= 2;
    return kw < mixc_decode_max_warps(M) ? kw : mixc_decode_max_warps(M);
}

extern "C" int mixc_qlinear_decode(int device, const mixc_gemm *g, int pdl, void *stream) {
    if (g->splits != mixc_decode_clamp_splits(g->M, g->splits)) return (int)cudaErrorInvalidValue;
    DArgs a;
    fill_common_args(a, g);
    a.xq = g->xq;
    a.nst = (int)(g->Kp / KSTAGE);
    a.tpb4 = g->splits >= PAIRED ? 2 : 1;
    a.nw = g->splits >= PAIRED ? 2 * (g->splits - PAIRED) : g->splits;
    order_parts(g, TILE_ROWS, a.p0, a.p1);
    const int tpb0 = a.p0.bits == 4 ? a.tpb4 : 1, tpb1 = a.p1.bits == 4 ? a.tpb4 : 1;
    a.nb0 = (a.p0.nblk + tpb0 - 1) / tpb0;
    const int nblk = a.nb0 + (a.p1.nblk + tpb1 - 1) / tpb1;
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
