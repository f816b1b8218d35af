/* W4A8 / W8A8 / mixed-precision GEMM for large M on Hopper (sm_90a): wgmma + TMA, configuration
 * MIXC_CFG_SM90 and MIXC_CFG_SM90_PAIRS of mixc_qlinear. Same function, inputs and packed layout as cuda/w4a8.cu
 * (cuda/packed_layout.cuh). The sm_80 build holds a stub that is never launched: mixc_sm90_ok()
 * is false unless the device is 9.x and runs the sm_90a code. Design notes and measurements:
 * docs/kernels.md. */
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "gemm_common.cuh"
#include "packed_layout.cuh"
#include "sm90_stage.cuh"
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MIXC_SM90_DEVICE 1
#endif

namespace {

using namespace mixc_sm90; /* the stage's device code: cuda/sm90_stage.cuh */

constexpr int KS = MIXC_KSTAGE; /* padded columns per stage */
constexpr int BN = 128;         /* weight rows per CTA: 2 row slices of 64 */
constexpr int TILES = BN / 16;  /* 16-row weight tiles per CTA */
/* One stage of the CTA's codes: TILES tiles of 1 KB (4 bits) or 2 KB (8 bits) each, and their meta records. */
constexpr int W_STAGE_BYTES = TILES * mixc_layout::words_per_stage(8) * mixc_layout::WARP_WORD_BYTES;
constexpr int META_STAGE_BYTES = TILES * mixc_layout::META_BYTES;
static_assert(W_STAGE_BYTES % 128 == 0 && META_STAGE_BYTES % 128 == 0, "TMA destinations are 128-byte aligned");

/* The stage ring of a CTA of BM tokens, in shared memory: ST stages of activation codes, then of codes,
 * meta records, token scales, then the mbarriers. KG consumer pairs: the CTA has 2 * KG consumer
 * warpgroups, warpgroup w on rows 64 * (w % 2) .. of the tile and on every KG-th stage from the
 * (w / 2)-th; with KG = 2 two pairs run two stages at once (each stage's fragments formed once), and
 * the second pair's sums are added to the first's through shared memory at the end. A warpgroup's
 * tokens go through wgmma in slices of QN (the wgmma N): 64-token quarters for the prefill tiles, one
 * slice of 16, 32 or 64 otherwise (at KG = 2 two 32-token halves of 64, for registers); the few-token
 * tiles' smaller activation tiles leave room for a deeper ring (the weight stream is what they wait on). */
template <int BM_, int KG_ = 1> struct Ring {
    static constexpr int BM = BM_, KG = KG_, QN = BM < 64 ? BM : KG == 2 ? 32 : 64, QUARTERS = BM / QN;
    static constexpr int NTH = 128 + 256 * KG; /* producer warpgroup + 2 * KG consumer warpgroups */
    static constexpr int ACT_BYTES = BM * KS;
    static constexpr int STAGE_BYTES = ACT_BYTES + W_STAGE_BYTES + META_STAGE_BYTES + BM * 4 + 16;
    /* CTAs per SM: two of the smallest one-group tiles, so that one CTA's stage chain (wait,
     * fragments, wgmma, rescale) runs while the other's waits. Registers: the launch gives each
     * thread LAUNCH_REGS; the producer warpgroup drops to PRODUCER_REGS and the consumers take what it
     * gave back (setmaxnreg's pool is per CTA): 232 at one 384-thread CTA, 96 at two, 104 at 640 threads */
    static constexpr int CTAS = KG == 1 && BM <= 32 ? 2 : 1;
    static constexpr int LAUNCH_REGS = (65536 / CTAS / NTH) / 8 * 8 > 168 ? 168 : (65536 / CTAS / NTH) / 8 * 8;
    static constexpr int PRODUCER_REGS = 40;
    static constexpr int CONSUMER_REGS = LAUNCH_REGS + (128 * (LAUNCH_REGS - PRODUCER_REGS) / (256 * KG)) / 8 * 8;
    static constexpr int ST = BM == 256 ? 4 : BM == 128 ? 6 : (210 * 1024 / CTAS) / STAGE_BYTES;
    static constexpr int W_OFF = ST * ACT_BYTES;
    static constexpr int META_OFF = W_OFF + ST * W_STAGE_BYTES;
    static constexpr int SA_OFF = META_OFF + ST * META_STAGE_BYTES;
    static constexpr int BAR_OFF = SA_OFF + ST * BM * 4;
    static constexpr int SMEM_BYTES = BAR_OFF + 2 * ST * 8 + 1024; /* + alignment slack (128B swizzle wants 1024) */
    static_assert(KG == 1 || (KG == 2 && BM <= 64), "one consumer pair, or two on the few-token tiles");
    static_assert(QUARTERS * QN == BM && (QN == 16 || QN == 32 || QN == 64), "token slices: 16, 32 or 64");
    static_assert(KG == 1 || 256 * (BM / 2) * 4 <= ST * (ACT_BYTES + W_STAGE_BYTES),
                  "the second pair's sums fit the ring");
    static_assert(CONSUMER_REGS <= 256 && 128 * PRODUCER_REGS + 256 * KG * CONSUMER_REGS <= 65536 / CTAS,
                  "setmaxnreg budget");
    static_assert(ACT_BYTES % 1024 == 0 && QN * KS % 1024 == 0, "128B-swizzled tiles start 1024-byte aligned");
    static_assert(ST >= 2 && CTAS * (SMEM_BYTES + 1024) <= 228 * 1024,
                  "the stage rings must fit one SM's shared memory");
};
#define MIXC_RING_NAMES(R)                                                                              \
    constexpr int BM = R::BM, QN = R::QN, QUARTERS = R::QUARTERS, ST = R::ST, ACT_BYTES = R::ACT_BYTES; \
    constexpr int W_OFF = R::W_OFF, META_OFF = R::META_OFF, SA_OFF = R::SA_OFF, BAR_OFF = R::BAR_OFF;   \
    constexpr int KG = R::KG;                                                                           \
    (void)QN, (void)QUARTERS, (void)W_OFF, (void)META_OFF, (void)KG

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

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap *map, int c0, int c1, int c2,
                                            uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
                 "%3, %4}], [%5];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                 : "memory");
}

__device__ __forceinline__ void cp_async4_zfill(uint32_t dst, const void *src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

/* pitch, in floats, of the prefill tiles' staged results (T[token][row]): 128 rows + 4, so that the
 * fragment-order writes hit 32 distinct banks */
constexpr int EPI_TP = 128 + 4;

/* A prefill tile's stores from its staged results: a warp's tokens m, m + 8, ... (tn tokens from row m,
 * read at T + 8 * EPI_TP per token) x its lane's 4 rows; column cols[j] of out (ld elements per token, -1:
 * not stored) gets T[.. + 32 j] + bs[j]. */
template <class O>
__device__ __forceinline__ void store_tile(O *out, int64_t ld, const float *T, const int64_t (&cols)[4],
                                           const float (&bs)[4], int64_t m, int tn) {
    O *row = out + m * ld;
    const int64_t step = 8 * ld;
    for (int t = 0; t < tn; t += 8, row += step, T += 8 * EPI_TP) {
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (cols[j] >= 0) to_out(row + cols[j], T[32 * j] + bs[j]);
    }
}

/* One consumer warpgroup's 64 rows x BM tokens over every KG-th stage of [s0, s1) (the schedule of a
 * stage: at `stage` below). */
template <int BITS, class RING>
__device__ __forceinline__ void consume(const Args90 &a, const Part90 &p, int rb, int64_t m0, int s0, int s1, int split,
                                        uint8_t *smem, uint32_t sbase) {
    MIXC_RING_NAMES(RING);
    const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int tl = (wg & 1) * 4 + warp;          /* this warp's tile in the CTA */
    const int64_t rt = (int64_t)rb * TILES + tl; /* ... in the part */
    /* this warpgroup's stages: s0 + pair, s0 + pair + KG, ...; with one pair a constant, so that the ring
     * position and the wgmma descriptors stay in uniform registers: no R2UR per wgmma, 5-7% faster at
     * 1024-4096 tokens (docs/kernels.md, "Uniform descriptors") */
    const int pair = KG == 1 ? 0 : wg >> 1;
    const float *sas = (const float *)(smem + SA_OFF) + 2 * tig;

    constexpr int R = QN / 2; /* int32 accumulators per thread of a QN-token slice */
    int ia[R], ib[R];
    float facc[R * QUARTERS];
#pragma unroll
    for (int i = 0; i < R * QUARTERS; i++) facc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < R; i++) ia[i] = ib[i] = 0;

    float rsw0 = 0.f, rsw1 = 0.f; /* row scales of the stage fetched last */
    /* A fragments of a stage: a wgmma reads them until it completes, so the few-token tiles, which
     * form the next stage's fragments under the running wgmmas, alternate between two buffers. */
    /* U8: a 4-bit part's fragments are the raw codes (u8: mask and shift, 2 instructions per word instead
     * of 4) and one more wgmma per k-step adds sum (-z) a from a fifth fragment holding -z: sum (q - z) a
     * exactly, in the same int32 accumulators (the decode kernel's scheme); 1-2% faster at 9-16 tokens
     * (docs/kernels.md). 16-token tiles only: it doubles the tensor work (idle there), and the 32- and
     * 64-token tiles then spill (ptxas). */
    constexpr bool U8 = BITS == 4 && BM == 16;
    constexpr int NF = U8 ? 5 : 4;
    uint32_t af0[NF][4], af1[NF][4];
    /* wgmma descriptors: the low word is the ring's first one plus the tile's offset in 16-byte units
     * (no carry leaves the address field: shared memory is below 2^18 bytes), the high word a constant;
     * with the ring's counters below, 4-7% faster at 9-32 tokens and at prefill than rebuilding both per
     * wgmma (docs/kernels.md, "Ring slots and descriptors by counters") */
    const uint32_t desc0_lo = (uint32_t)desc_sw128(sbase);
    constexpr uint64_t DESC_HI = desc_sw128(0) & 0xFFFFFFFF00000000ull;
    auto issue = [&](int (&acc)[R], uint32_t tile_off, const uint32_t (&af)[NF][4]) {
        fence_acc(acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint64_t desc = DESC_HI | (desc0_lo + (tile_off >> 4) + k * 32 / 16);
            wgmma_n<QN, U8>(acc, af[k], desc, k);
            if constexpr (U8) wgmma_n<QN>(acc, af[4], desc, 1);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    };
    /* Wait until stage s's copies (activations, scales, this CTA's codes and meta records) have
     * landed; its A fragments into af, its row scales into rsw0/rsw1. The consumers issue no global
     * load: the producer's copies bring the codes and meta records too (measured: with them loaded
     * two stages ahead into registers, each stage waited about one memory latency, since a load's
     * scoreboard also waits for the loads issued after it). */
    /* Ring position of the warpgroup's next stage to fetch (stage s0 + pair + KG * n: slot
     * (s - s0) % ST, pass (s - s0) / ST), advanced by counters rather than divisions; fetched_buf:
     * the slot of the stage fetched last, which the next stage() consumes. */
    int fetch_buf = pair, fetch_phase = 0, fetched_buf = 0;
    auto fetch = [&](uint32_t (&af)[NF][4]) {
        const int buf = fetch_buf;
        mbar_wait(sbase + BAR_OFF + buf * 8, fetch_phase);
        load_frags<BITS, U8>(af, rsw0, rsw1,
                             smem + W_OFF + buf * W_STAGE_BYTES + tl * (BITS / 2) * mixc_layout::WARP_WORD_BYTES,
                             smem + META_OFF + buf * META_STAGE_BYTES + tl * mixc_layout::META_BYTES, lane);
        fetched_buf = buf;
        fetch_buf += KG;
        if (fetch_buf >= ST) {
            fetch_buf -= ST;
            fetch_phase ^= 1;
        }
    };
    /* Stage s: the 64-token quarters (2 or 4) go through two int32 accumulators, so that one
     * quarter's wgmmas run while the previous quarter is rescaled; at 256 tokens:
     *   issue Q0, Q1 | wait Q0, rescale Q0, issue Q2 | wait Q1, rescale Q1, issue Q3 | wait Q2,
     *   rescale Q2 | wait Q3, fetch stage s+KG (the warpgroup's next), rescale Q3, release s
     * A few-token tile (one slice of QN <= 64) is: issue | wait, fetch stage s+KG, rescale, release s.
     * No wgmma group stays pending across stages: with one that did, ptxas serialized every wgmma
     * (C7514/C7515). The per-warp costs of a stage (fragments, descriptors, barriers) are shared
     * by all BM tokens. */
    auto stage = [&](int s, uint32_t (&cur)[NF][4], uint32_t (&nxt)[NF][4]) {
        const int buf = fetched_buf;
        const float sw0 = rsw0, sw1 = rsw1;
        const uint32_t tile = buf * ACT_BYTES;
        issue(ia, tile, cur);
        if constexpr (QUARTERS > 1) {
            issue(ib, tile + QN * KS, cur);
        } else {
            if (s + KG < s1) fetch(nxt); /* stage s + KG, under the running wgmmas, which read cur */
        }
#pragma unroll
        for (int qq = 0; qq < QUARTERS; qq++) {
            int (&acc)[R] = (qq & 1) ? ib : ia;
            if (qq == QUARTERS - 1) {
                wait_acc<0>(acc);
                if (QUARTERS > 1 && s + KG < s1) fetch(nxt); /* stage s + KG: every wgmma of the stage is done */
            } else {
                wait_acc<1>(acc);
            }
            rescale<QN>(facc + R * qq, acc, sas + buf * BM + QN * qq, sw0, sw1);
            if (qq + 2 < QUARTERS) issue(acc, tile + (qq + 2) * QN * KS, cur);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(sbase + BAR_OFF + (ST + buf) * 8);
    };
    const int first = s0 + pair;
    if (first < s1) fetch(af0);
    if constexpr (QUARTERS > 1) {
        for (int s = first; s < s1; s += KG) stage(s, af0, af0);
    } else {
        for (int s = first; s < s1; s += 2 * KG) {
            stage(s, af0, af1);
            if (s + KG < s1) stage(s + KG, af1, af0);
        }
    }
    if constexpr (KG == 2) {
        /* the second pair's sums to the first through the ring (free once every consumer has passed
         * its last stage: each stage's copies had landed before its full barrier completed) */
        float *red = (float *)smem + (threadIdx.x - 128) % 256;
        asm volatile("bar.sync 1, 512;\n" ::: "memory");
        if (pair == 1) {
#pragma unroll
            for (int i = 0; i < R * QUARTERS; i++) red[256 * i] = facc[i];
        }
        asm volatile("bar.sync 1, 512;\n" ::: "memory");
        if (pair == 1) return;
#pragma unroll
        for (int i = 0; i < R * QUARTERS; i++) facc[i] += red[256 * i];
    }

    if constexpr (KG == 1 && BM >= 128) {
        /* The prefill tiles' results through shared memory (the ring is free: every stage it held has been
         * consumed), so that a warp's store covers 32 consecutive rows of one token (about 64 contiguous
         * bytes of y) instead of 8 rows of 4 tokens (measured: the stores took 6-30% of these tiles' time,
         * half of it saved; docs/kernels.md): T[token][row], rows fastest, pitch 132 floats (the
         * fragment-order writes then hit 32 distinct banks). */
        constexpr int TP = EPI_TP;
        static_assert(BM * TP * 4 <= BAR_OFF, "the result tile fits the ring, below its barriers");
        float *T = (float *)smem;
        const int ct = threadIdx.x - 128;                /* consumer thread 0..255 */
        asm volatile("bar.sync 1, 256;\n" ::: "memory"); /* every consumer is past its last stage */
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int q = 0; q < BM / 8; q++)
#pragma unroll
                for (int c = 0; c < 2; c++)
                    T[(8 * q + 2 * tig + c) * TP + 16 * tl + gid + 8 * h] = facc[4 * q + 2 * h + c];
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        const int lane32 = ct & 31, w8 = ct >> 5;
        /* lane l stores rows l, l + 32, l + 64, l + 96 of each token (tried: 4 consecutive rows per lane, one
         * 8-byte store where their columns are consecutive: 6-31% slower at 1024-4096 tokens, since in a mixed
         * layer most such runs are broken by an 8-bit row and the scalar stores of a lane then stride 8 bytes
         * across the warp; docs/kernels.md) */
        int64_t cols[4];
        float bs[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t n = (int64_t)rb * BN + lane32 + 32 * j;
            const int64_t col = n < p.N ? (p.idx ? p.idx[n] : n) : -1;
            cols[j] = col >= 0 && col < a.n_out ? col : -1; /* never write outside y */
            bs[j] = (cols[j] >= 0 && a.splits == 1 && a.bias) ? a.bias[cols[j]] : 0.f;
        }
        /* one loop per output type, so that a store is an LDS, an add, a conversion and an STG (the
         * type switched per element took about 25 instructions a store: 7% of the instructions at 8192
         * columns; docs/kernels.md) */
        const float *Tw = T + w8 * TP + lane32;
        const int tn = (int)min((int64_t)BM - w8, a.M - m0 - w8); /* this warp's tokens: w8, w8 + 8, ... < tn + w8 */
        if (a.splits != 1)
            store_tile(a.ws + (int64_t)split * a.M * a.n_out, a.n_out, Tw, cols, bs, m0 + w8, tn);
        else if (a.ydt == 0)
            store_tile((float *)a.y, a.n_out, Tw, cols, bs, m0 + w8, tn);
        else if (a.ydt == 1)
            store_tile((__half *)a.y, a.n_out, Tw, cols, bs, m0 + w8, tn);
        else
            store_tile((__nv_bfloat16 *)a.y, a.n_out, Tw, cols, bs, m0 + w8, tn);
    } else {
        /* the few-token tiles, straight from the accumulators: rows 16*rt + gid (+8), tokens m0 + 8q + 2tig + c */
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t n = rt * 16 + gid + h * 8;
            if (n >= p.N) continue;
            const int64_t col = p.idx ? p.idx[n] : n;
            if (col < 0 || col >= a.n_out) continue; /* never write outside y */
            const float b = (a.splits == 1 && a.bias) ? a.bias[col] : 0.f;
#pragma unroll
            for (int q = 0; q < BM / 8; q++)
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
}
#endif /* MIXC_SM90_DEVICE */

template <class RING>
__global__ void __launch_bounds__(RING::NTH, RING::CTAS)
    qgemm_sm90_kernel(const __grid_constant__ Args90 a, const __grid_constant__ CUtensorMap act_map,
                      const __grid_constant__ CUtensorMap wmap0, const __grid_constant__ CUtensorMap wmap1,
                      const __grid_constant__ CUtensorMap mmap0, const __grid_constant__ CUtensorMap mmap1) {
#ifdef MIXC_SM90_DEVICE
    MIXC_RING_NAMES(RING);
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t sbase = (raw + 1023) & ~1023u;
    uint8_t *smem = smem_raw + (sbase - raw);
    const int nst = (int)(a.Kp / KS);
    const int split = blockIdx.z;
    const int s0 = split * a.sps, s1 = min(nst, s0 + a.sps);
    if (s0 >= s1) return;
    const int64_t m0 = (int64_t)blockIdx.x * BM;
    /* Let the split-K reduction after it (launched with PDL) be scheduled; it waits for this grid's
     * completion before reading anything this grid writes. */
    grid_dep_launch_dependents();

    if (threadIdx.x == 0) {
        for (int b = 0; b < ST; b++) {
            mbar_init(sbase + BAR_OFF + b * 8, 33);       /* full: expect_tx + 32 lanes' scale copies */
            mbar_init(sbase + BAR_OFF + (ST + b) * 8, 8); /* empty: the 8 warps of the stage's pair */
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(RING::PRODUCER_REGS));
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        if (lane == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)&act_map) : "memory");
        float *sas = (float *)(smem + SA_OFF);
        int rb = blockIdx.y;
        bool second = false;
        if (rb >= a.p0.nblk) {
            rb -= a.p0.nblk;
            second = true;
        }
        /* The CTA's codes and meta records, one TMA copy each per stage (measured: 16 per-tile bulk
         * copies per stage kept the producer warp busy most of the time, and the consumers waited on
         * it). Tiles past the part's last row arrive zero-filled and count in the bytes. */
        const CUtensorMap *wmap = second ? &wmap1 : &wmap0, *mmap = second ? &mmap1 : &mmap0;
        const uint32_t wbytes = (uint32_t)((second ? a.p1.bits : a.p0.bits) / 2) * mixc_layout::WARP_WORD_BYTES;
        const uint32_t stage_bytes = ACT_BYTES + TILES * (wbytes + mixc_layout::META_BYTES);
        const int rt0 = rb * TILES;
        if (lane == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)wmap) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)mmap) : "memory");
        }
        /* Launched with programmatic dependent launch (mixc_gemm.pdl, see sm90_pdl),
         * the CTA starts while the activation quantizer still runs: nothing it writes (activation codes,
         * scales) is copied before its grid has completed. A no-op wait without PDL. (An L2 prefetch of
         * the first stages' weights before the wait was slower: docs/kernels.md, "Programmatic dependent
         * launch".) */
        grid_dep_wait();
        const bool full_tile = m0 + BM <= a.M;
        const float *sa_lane = a.sa + (full_tile ? (m0 + lane) * nst : 0); /* token m0 + lane's scales */
        const int64_t sa_step = (int64_t)32 * nst;                         /* 32 tokens further */
        int j = s0 / a.spg, jleft = a.spg - s0 % a.spg;                    /* group of stage s, stages left in it */
        int buf = 0, phase = 0; /* slot and pass of stage s: (s - s0) % ST, (s - s0) / ST % 2 */
        for (int s = s0; s < s1; s++) {
            const uint32_t bar = sbase + BAR_OFF + buf * 8;
            mbar_wait(sbase + BAR_OFF + (ST + buf) * 8, phase ^ 1);
            if (lane == 0) {
                mbar_expect_tx(bar, stage_bytes);
                tma_load_2d(sbase + buf * ACT_BYTES, &act_map, s * KS, (int)m0, bar);
                tma_load_3d(sbase + W_OFF + buf * W_STAGE_BYTES, wmap, 0, s * (int)(wbytes / 256), rt0, bar);
                tma_load_3d(sbase + META_OFF + buf * META_STAGE_BYTES, mmap, 0, min(j, a.G - 1), rt0, bar);
            }
            if (--jleft == 0) {
                jleft = a.spg;
                j++;
            }
            /* the tokens' scales of this stage: 4-byte cp.async (zero-filled past M) that arrive
             * on the same barrier when they land, so the producer never waits on a load. A tile
             * inside M steps one pointer by 32 tokens' rows (the producer's instructions are issued
             * beside two consumer warps' on its scheduler: the general form's 64-bit index
             * arithmetic, about 150 instructions per stage, slowed them; docs/kernels.md) */
            const uint32_t sdst = smem_u32(sas + buf * BM + lane);
            if (BM % 32 == 0 && full_tile) {
                const float *src = sa_lane + s;
#pragma unroll
                for (int r = 0; r < BM / 32; r++) cp_async4_zfill(sdst + 128 * r, src + r * sa_step, 4);
            } else {
#pragma unroll
                for (int r = lane; r < BM; r += 32) {
                    const int64_t m = m0 + r;
                    cp_async4_zfill(smem_u32(sas + buf * BM + r), a.sa + min(m, a.M - 1) * nst + s, m < a.M ? 4 : 0);
                }
            }
            asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
            if (++buf == ST) {
                buf = 0;
                phase ^= 1;
            }
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(RING::CONSUMER_REGS));
        int rb = blockIdx.y;
        const Part90 *p = &a.p0;
        if (rb >= a.p0.nblk) {
            rb -= a.p0.nblk;
            p = &a.p1;
        }
        if (p->bits == 4)
            consume<4, RING>(a, *p, rb, m0, s0, s1, split, smem, sbase);
        else
            consume<8, RING>(a, *p, rb, m0, s0, s1, split, smem, sbase);
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
            if (cudaFuncGetAttributes(&fa, qgemm_sm90_kernel<Ring<256>>) == cudaSuccess && fa.binaryVersion >= 90 &&
                encode_fn())
                ok = 1;
        }
        cudaGetLastError();
        cache[device] = ok ? 1 : 2;
    }
    return cache[device] == 1;
}

/* The few-token tile for M tokens (16, 32 or 64), or 0: a prefill tile (128 or 256, chosen by waves;
 * one consumer pair in both configurations) */
extern "C" int mixc_sm90_few_tile(int64_t M) { return M <= 16 ? 16 : M <= 32 ? 32 : M <= 64 ? 64 : 0; }

extern "C" int mixc_sm90_ctas_per_sm(int64_t M, int pairs) {
    switch (mixc_sm90_few_tile(M)) {
    case 16: return pairs == 2 ? Ring<16, 2>::CTAS : Ring<16>::CTAS;
    case 32: return pairs == 2 ? Ring<32, 2>::CTAS : Ring<32>::CTAS;
    case 64: return pairs == 2 ? Ring<64, 2>::CTAS : Ring<64>::CTAS;
    default: return 1;
    }
}

/* Whether a call's wgmma kernel, and its split-K reduction after it, launch with programmatic dependent
 * launch (see the producer's grid_dep_wait): every tile. The prefill tiles' CTAs are scheduled only
 * once every block of the quantizer before them has started (it triggers its dependents first thing), so
 * they take SMs as its last blocks drain, never before one of its blocks; measured up to 2% faster at
 * 1024-4096 tokens, within 1% elsewhere (docs/kernels.md, "Programmatic dependent launch"). */
static bool sm90_pdl(const mixc_gemm *g) { return g->pdl != 0; }

/* Encode the activation map (box: one stage x BM tokens) and launch the kernel of ring RING. */
template <class RING>
cudaError_t launch90(int device, const mixc_gemm *g, const Args90 &a, int nblk, int nst, const CUtensorMap (&wmap)[2],
                     const CUtensorMap (&mmap)[2], cudaStream_t stream) {
    CUtensorMap map;
    const cuuint64_t dims[2] = {(cuuint64_t)g->Kp, (cuuint64_t)g->M};
    const cuuint64_t strides[1] = {(cuuint64_t)g->Kp};
    constexpr int BM = RING::BM;
    const cuuint32_t box[2] = {KS, BM}, estr[2] = {1, 1};
    if (encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, (void *)g->xq, dims, strides, box, estr,
                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
        return cudaErrorInvalidValue;
    static bool attr_set[64];
    if (device >= 0 && device < 64 && !attr_set[device]) {
        cudaError_t e = cudaFuncSetAttribute(qgemm_sm90_kernel<RING>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             RING::SMEM_BYTES);
        if (e != cudaSuccess) return e;
        attr_set[device] = true;
    }
    cudaLaunchConfig_t lc = {};
    lc.gridDim = dim3((unsigned)((g->M + BM - 1) / BM), (unsigned)nblk, (unsigned)((nst + a.sps - 1) / a.sps));
    lc.blockDim = dim3(RING::NTH);
    lc.dynamicSmemBytes = RING::SMEM_BYTES;
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    allow_pdl(lc, attr, sm90_pdl(g));
    const cudaError_t e = cudaLaunchKernelEx(&lc, qgemm_sm90_kernel<RING>, a, map, wmap[0], wmap[1], mmap[0], mmap[1]);
    return e != cudaSuccess ? e : cudaGetLastError();
}

extern "C" int mixc_qlinear_sm90(int device, const mixc_gemm *g, void *stream_) {
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    if (!mixc_sm90_ok(device)) return (int)cudaErrorInvalidDeviceFunction;
    cudaStream_t stream = (cudaStream_t)stream_;
    if (g->splits < 1 || g->nparts < 1 || g->nparts > 2 || g->Kp % KS) return (int)cudaErrorInvalidValue;
    const int nst = (int)(g->Kp / KS);
    Args90 a;
    fill_common_args(a, g);
    a.splits = g->splits;
    a.sps = (nst + g->splits - 1) / g->splits;
    a.ws = g->ws;
    const int nblk = order_parts(g, BN, a.p0, a.p1);
    if (g->M <= 0 || nblk == 0) return 0;
    if (g->M > 0x7FFFFFFF || nblk > 65535) return (int)cudaErrorInvalidValue;

    /* Codes of part i as [tiles][stages * wbytes / 256][256] bytes (box: 8 tiles x one stage), meta
     * records as [tiles][G][80] (box: 8 tiles x one group); a missing part reuses part 0's maps. */
    CUtensorMap wmap[2], mmap[2];
    const Part90 *parts[2] = {&a.p0, &a.p1};
    for (int i = 0; i < 2; i++) {
        const Part90 &p = parts[i]->nblk ? *parts[i] : a.p0;
        const cuuint64_t wb = (cuuint64_t)(p.bits / 2) * mixc_layout::WARP_WORD_BYTES, tiles = (p.N + 15) / 16;
        const cuuint64_t wdims[3] = {256, (cuuint64_t)nst * wb / 256, tiles};
        const cuuint64_t wstr[2] = {256, (cuuint64_t)nst * wb};
        const cuuint32_t wbox[3] = {256, (cuuint32_t)(wb / 256), TILES}, e3[3] = {1, 1, 1};
        const cuuint64_t mdims[3] = {mixc_layout::META_BYTES, (cuuint64_t)g->G, tiles};
        const cuuint64_t mstr[2] = {mixc_layout::META_BYTES, (cuuint64_t)g->G * mixc_layout::META_BYTES};
        const cuuint32_t mbox[3] = {mixc_layout::META_BYTES, 1, TILES};
        if (encode_fn()(&wmap[i], CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, (void *)p.w, wdims, wstr, wbox, e3,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS ||
            encode_fn()(&mmap[i], CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, (void *)p.meta, mdims, mstr, mbox, e3,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
            return (int)cudaErrorInvalidValue;
    }

    /* Few tokens: one CTA of 16, 32 or 64 tokens (the weight stream is the cost). More: 256 tokens
     * per CTA share the per-warp work of a stage (fragments, descriptors, barriers) among twice the
     * tokens of 128: measured 1.73x the time of a 128-token CTA per stage, for 2x the tokens. Take
     * the tile whose whole waves cost less, 128 on a tie (H200, 2026-12-01: at M = 1024 on
     * 6144 x 4096 the 256-token grid is 1.5 waves, 148 us against 117). */
    int sms = 132;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    auto waves = [&](int bm) {
        const int64_t ctas = (int64_t)nblk * ((g->M + bm - 1) / bm) * ((nst + a.sps - 1) / a.sps);
        return (double)((ctas + sms - 1) / sms);
    };
    /* MIXC_CFG_SM90_PAIRS: the few-token tiles with two consumer pairs on alternating stages */
    const bool pairs = g->cfg == MIXC_CFG_SM90_PAIRS;
    const int few = mixc_sm90_few_tile(g->M);
    const cudaError_t e0 = few == 16   ? (pairs ? launch90<Ring<16, 2>>(device, g, a, nblk, nst, wmap, mmap, stream)
                                                : launch90<Ring<16>>(device, g, a, nblk, nst, wmap, mmap, stream))
                           : few == 32 ? (pairs ? launch90<Ring<32, 2>>(device, g, a, nblk, nst, wmap, mmap, stream)
                                                : launch90<Ring<32>>(device, g, a, nblk, nst, wmap, mmap, stream))
                           : few == 64 ? (pairs ? launch90<Ring<64, 2>>(device, g, a, nblk, nst, wmap, mmap, stream)
                                                : launch90<Ring<64>>(device, g, a, nblk, nst, wmap, mmap, stream))
                           : waves(256) * 1.8 < waves(128)
                               ? launch90<Ring<256>>(device, g, a, nblk, nst, wmap, mmap, stream)
                               : launch90<Ring<128>>(device, g, a, nblk, nst, wmap, mmap, stream);
    if (e0 != cudaSuccess) return (int)e0;
    if (g->splits == 1) return 0;
    return (int)launch_splitk_finish(g, (nst + a.sps - 1) / a.sps, 1024, sm90_pdl(g), stream);
}
