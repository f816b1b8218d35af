// wgmma throughput probe behind the prefill kernel's next design (docs/kernels.md, "wgmma prefill GEMM"):
// how many int8 TOPS wgmma s32.s8.s8 gives on this GPU as a function of (a) N (64, 128, 256 columns per
// instruction), (b) where A comes from (RS: registers, as cuda/w4a8_sm90.cu's weight fragments; SS: shared
// memory), (c) warpgroups per SM (1-4, one CTA per SM), and (d) the two-step scheme's rescale: after each
// 128-column group (4 wgmma k-steps) every int32 sum is converted and added into a float sum times a
// product of two scales (I2F, FMUL, FFMA per element, as the kernel), either serially (wait, then rescale)
// or overlapped within the warpgroup (two int32 accumulator sets: group g + 1's wgmmas run while group g is
// rescaled, four groups per loop step as the kernel's 64-token quarters). Operand values are whatever shared memory
// holds (zeros): the tensor cores' speed does not depend on them. No global traffic in the loop. Then
// ("stage:" lines) the prefill kernel's stage itself, with the kernel's own device code
// (cuda/sm90_stage.cuh), for today's CTA shape and for more warpgroups on fewer tokens.
//
//   nvcc -O3 -std=c++17 -Icsrc -gencode=arch=compute_90a,code=sm_90a bench/gpu_wgmma_probe.cu -o wgmma_probe
//   ./wgmma_probe [groups per warpgroup, default 4096]
//
// Prints one line per variant: TOPS (2 ops per multiply-add) and the fraction of the dense int8 peak
// (4096 multiply-adds per cycle per SM at the clock cudaDeviceProp reports).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../cuda/sm90_stage.cuh" /* the kernel's stage code: wgmma_n, load_frags, rescale, desc_sw128 */
#include "probe_check.cuh"

using namespace mixc_sm90;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PROBE_SM90 1
#endif

#ifdef PROBE_SM90
/* wgmma m64nNk32 s32.s8.s8 for N = 64, 128, 256: D (N / 2 int32 per thread) (+)= A * B, A from registers
 * (RS: four 32-bit fragments) or shared memory (SS: a descriptor), B from shared memory. Inline asm
 * operand lists cannot come from a template: D32 / REGS* spell them. */
#define D8(o)                                                                                                   \
    "+r"(d[o]), "+r"(d[o + 1]), "+r"(d[o + 2]), "+r"(d[o + 3]), "+r"(d[o + 4]), "+r"(d[o + 5]), "+r"(d[o + 6]), \
        "+r"(d[o + 7])
#define D32(o) D8(o), D8(o + 8), D8(o + 16), D8(o + 24)
#define REGS32                                                                                                        \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%" \
    "30,%31"
#define REGS64                                                                                                         \
    REGS32 ",%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57," \
           "%58,%59,%60,%61,%62,%63"
#define REGS128                                                                                                        \
    REGS64 ",%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89," \
           "%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112," \
           "%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define RS_INS "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(acc)
#define SS_INS "l"(adesc), "l"(bdesc), "r"(acc)
/* the operand numbers after the N / 2 accumulators: RS a0..a3, b, p; SS a, b, p */
#define RS_ASM(N, R, A0, A1, A2, A3, B, P)                                                                      \
    "{\n .reg .pred p;\n setp.ne.b32 p, %" #P ", 0;\n wgmma.mma_async.sync.aligned.m64n" #N "k32.s32.s8.s8 {" R \
    "}, {%" #A0 ",%" #A1 ",%" #A2 ",%" #A3 "}, %" #B ", p;\n}\n"
#define SS_ASM(N, R, A, B, P)                                                                                   \
    "{\n .reg .pred p;\n setp.ne.b32 p, %" #P ", 0;\n wgmma.mma_async.sync.aligned.m64n" #N "k32.s32.s8.s8 {" R \
    "}, %" #A ", %" #B ", p;\n}\n"

__device__ __forceinline__ void wgmma64_rs(int (&d)[32], const uint32_t (&a)[4], uint64_t bdesc, int acc) {
    asm volatile(RS_ASM(64, REGS32, 32, 33, 34, 35, 36, 37) : D32(0) : RS_INS);
}
__device__ __forceinline__ void wgmma64_ss(int (&d)[32], uint64_t adesc, uint64_t bdesc, int acc) {
    asm volatile(SS_ASM(64, REGS32, 32, 33, 34) : D32(0) : SS_INS);
}
__device__ __forceinline__ void wgmma128_rs(int (&d)[64], const uint32_t (&a)[4], uint64_t bdesc, int acc) {
    asm volatile(RS_ASM(128, REGS64, 64, 65, 66, 67, 68, 69) : D32(0), D32(32) : RS_INS);
}
__device__ __forceinline__ void wgmma128_ss(int (&d)[64], uint64_t adesc, uint64_t bdesc, int acc) {
    asm volatile(SS_ASM(128, REGS64, 64, 65, 66) : D32(0), D32(32) : SS_INS);
}
__device__ __forceinline__ void wgmma256_rs(int (&d)[128], const uint32_t (&a)[4], uint64_t bdesc, int acc) {
    asm volatile(RS_ASM(256, REGS128, 128, 129, 130, 131, 132, 133) : D32(0), D32(32), D32(64), D32(96) : RS_INS);
}
__device__ __forceinline__ void wgmma256_ss(int (&d)[128], uint64_t adesc, uint64_t bdesc, int acc) {
    asm volatile(SS_ASM(256, REGS128, 128, 129, 130) : D32(0), D32(32), D32(64), D32(96) : SS_INS);
}

template <int N> __device__ __forceinline__ void wait_groups() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/* One 128-column group: 4 k-steps of m64nNk32 into d (zeroed by the first when fresh). */
template <int N, bool SS>
__device__ __forceinline__ void group(int (&d)[N / 2], const uint32_t (&a)[4], uint32_t a_lo, uint32_t b_lo,
                                      bool fresh) {
    constexpr uint64_t HI = desc_sw128(0) & 0xFFFFFFFF00000000ull;
    fence_acc(d);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const uint64_t bd = HI | (b_lo + k * 2), ad = HI | (a_lo + k * 2);
        const int acc = fresh && k == 0 ? 0 : 1;
        if constexpr (N == 64) {
            if constexpr (SS)
                wgmma64_ss(d, ad, bd, acc);
            else
                wgmma64_rs(d, a, bd, acc);
        } else if constexpr (N == 128) {
            if constexpr (SS)
                wgmma128_ss(d, ad, bd, acc);
            else
                wgmma128_rs(d, a, bd, acc);
        } else {
            if constexpr (SS)
                wgmma256_ss(d, ad, bd, acc);
            else
                wgmma256_rs(d, a, bd, acc);
        }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/* sum += float(acc) * (sw * sa) per element, the kernel's second step (scales vary per group). */
template <int R> __device__ __forceinline__ void rescale(float (&f)[R], const int (&acc)[R], float sw, float sa) {
#pragma unroll
    for (int i = 0; i < R; i++) f[i] = __fmaf_rn(__int2float_rn(acc[i]), (i & 1 ? sw : sa) * (i & 2 ? sa : sw), f[i]);
}

/* The float sums to global memory, so that the work is kept. */
template <int R> __device__ __forceinline__ void keep(const float (&f)[R], float *out) {
    float s = 0.f;
    for (int i = 0; i < R; i++) s += f[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
#endif

/* MODE 0: wgmmas only (one accumulator, two groups in flight); 1: rescale after each group, serially;
 * 2: each group's rescale overlapped with the next group's wgmmas (two accumulator sets, four groups per
 * loop step, as the prefill kernel's 64-token quarters). `groups` a multiple of 4. */
template <int N, bool SS, int NWG, int MODE>
__global__ void __launch_bounds__(128 * NWG, 1) probe(int groups, float *out) {
#ifdef PROBE_SM90
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023) & ~1023u;
    /* B: N rows x 128 B; A (SS): 64 rows x 128 B, per warpgroup */
    const int wg = threadIdx.x / 128;
    const uint32_t b_lo = (uint32_t)desc_sw128(base), a_lo = (uint32_t)desc_sw128(base + N * 128 + wg * 64 * 128);
    uint32_t a[4] = {0x01010101u * (threadIdx.x & 3), 0u, 0u, 0u};
    constexpr int R = N / 2;
    float sw = 1.f + threadIdx.x * 1e-3f, sa = 0.5f;
    if constexpr (MODE == 0) {
        int d[R];
        for (int i = 0; i < R; i++) d[i] = 0;
        for (int g = 0; g < groups; g++) {
            group<N, SS>(d, a, a_lo, b_lo, false);
            wait_groups<1>();
        }
        wait_groups<0>();
        fence_acc(d);
        int s = 0;
        for (int i = 0; i < R; i++) s += d[i];
        if (s == 12345) out[0] = 1.f; /* keeps the work */
    } else if constexpr (MODE == 1) {
        int d[R];
        float f[R];
        for (int i = 0; i < R; i++) f[i] = 0.f;
        for (int g = 0; g < groups; g++) {
            group<N, SS>(d, a, a_lo, b_lo, true);
            wait_groups<0>();
            fence_acc(d);
            rescale(f, d, sw, sa);
            sa *= 1.0001f;
        }
        keep(f, out);
    } else {
        /* cuda/w4a8_sm90.cu's prefill stage: four groups through two accumulator sets, no group pending
         * across the loop's back edge (ptxas serializes every wgmma otherwise, C7514) */
        int d0[R], d1[R];
        float f[R];
        for (int i = 0; i < R; i++) f[i] = 0.f, d0[i] = 0, d1[i] = 0;
        for (int g = 0; g + 3 < groups; g += 4) {
            group<N, SS>(d0, a, a_lo, b_lo, true);
            group<N, SS>(d1, a, a_lo, b_lo, true);
            wait_groups<1>();
            fence_acc(d0);
            rescale(f, d0, sw, sa);
            group<N, SS>(d0, a, a_lo, b_lo, true);
            wait_groups<1>();
            fence_acc(d1);
            rescale(f, d1, sw, sa);
            group<N, SS>(d1, a, a_lo, b_lo, true);
            wait_groups<1>();
            fence_acc(d0);
            rescale(f, d0, sw, sa);
            wait_groups<0>();
            fence_acc(d1);
            rescale(f, d1, sw, sa);
            sa *= 1.0001f;
        }
        keep(f, out);
    }
#endif
}

/* MODE "stage": the prefill kernel's stage as cuda/w4a8_sm90.cu runs it, without its memory traffic: Q
 * token quarters of QN tokens (one wgmma m64nQNk32 per k-step and quarter) through two int32 accumulator
 * sets, each quarter's rescale reading its token scales from shared memory (one LDS.64 per two tokens) and
 * multiplying them by the row scales (I2F, FMUL, FFMA per element: the kernel's three), a float sum per
 * quarter (Q * QN / 2 per thread), the four k-steps' A fragments distinct registers; with FRAG the next
 * stage's fragments are formed from shared memory after the last quarter's wait (8 LDS.64 and the 4-bit
 * codes minus the zero point per word, as the kernel) and the row scales read, so that what is left out of
 * the kernel is only the producer's copies and the ring's barriers. Answers which CTA shape (warpgroups x
 * tokens) can reach the prefill goal (about 59% of the dense peak) with the two-step rescale. */
#ifdef PROBE_SM90
/* one quarter's 4 k-steps, as the kernel's `issue`; with U8 a second wgmma per k-step adds the zero point's
 * term from af[4] */
template <int QN, bool U8>
__device__ __forceinline__ void issue_q(int (&d)[QN / 2], const uint32_t (&af)[U8 ? 5 : 4][4], uint32_t b_lo) {
    constexpr uint64_t HI = desc_sw128(0) & 0xFFFFFFFF00000000ull;
    fence_acc(d);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < 4; k++) {
        wgmma_n<QN, U8>(d, af[k], HI | (b_lo + k * 2), k);
        if constexpr (U8) wgmma_n<QN>(d, af[4], HI | (b_lo + k * 2), 1);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
#endif

template <int QN, int Q, int NWG, bool FRAG, bool U8>
__global__ void __launch_bounds__(128 * NWG, 1) stage_probe(int groups, float *out) {
#ifdef PROBE_SM90
    constexpr int R = QN / 2, BM = Q * QN;
    extern __shared__ uint8_t smem_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    const uint32_t base = (raw + 1023) & ~1023u;
    uint8_t *smem = smem_raw + (base - raw);
    const int wg = threadIdx.x / 128, warp = threadIdx.x / 32, lane = threadIdx.x & 31, tig = lane & 3;
    /* B: BM token rows x 128 B; then the token scales (BM floats); per warp a meta record (16 row scales,
     * 16 zero points; 128 B) and a 1 KB slot of 4-bit codes, as the kernel's ring holds them */
    const uint32_t b_lo = (uint32_t)desc_sw128(base);
    float *sas = (float *)(smem + BM * 128);
    uint8_t *meta = smem + BM * 128 + BM * 4, *codes = meta + 128 * 4 * NWG;
    for (int i = threadIdx.x; i < BM; i += blockDim.x) sas[i] = 1.f + i * 1e-3f;
    for (int i = threadIdx.x; i < 128 * 4 * NWG; i += blockDim.x) meta[i] = (uint8_t)(i & 15);
    for (int i = threadIdx.x; i < 1024 * 4 * NWG; i += blockDim.x) codes[i] = (uint8_t)(i * 37);
    __syncthreads();
    constexpr int NF = U8 ? 5 : 4;
    uint32_t af[NF][4];
#pragma unroll
    for (int k = 0; k < NF; k++) af[k][0] = af[k][1] = af[k][2] = af[k][3] = 0x01010101u * (threadIdx.x & 3);
    float sw0 = 1.f + wg, sw1 = 0.5f;
    float facc[Q * R];
    int d0[R], d1[R];
#pragma unroll
    for (int i = 0; i < Q * R; i++) facc[i] = 0.f;
#pragma unroll
    for (int i = 0; i < R; i++) d0[i] = d1[i] = 0;
    const float *sab = sas + 2 * tig;
    for (int g = 0; g < groups; g++) {
        const float s0 = sw0, s1 = sw1;
        issue_q<QN, U8>(d0, af, b_lo);
        issue_q<QN, U8>(d1, af, b_lo + QN * 128 / 16);
#pragma unroll
        for (int qq = 0; qq < Q; qq++) {
            int (&acc)[R] = (qq & 1) ? d1 : d0;
            if (qq == Q - 1) {
                wait_acc<0>(acc);
                if constexpr (FRAG) load_frags<4, U8>(af, sw0, sw1, codes + 1024 * warp, meta + 128 * warp, lane);
            } else {
                wait_acc<1>(acc);
            }
            rescale<QN>(facc + R * qq, acc, sab + QN * qq, s0, s1);
            if (qq + 2 < Q) issue_q<QN, U8>(acc, af, b_lo + (qq + 2) * QN * 128 / 16);
        }
    }
    keep(facc, out);
#endif
}

template <int QN, int Q, int NWG, bool FRAG, bool U8 = false>
void run_stage(int groups, float *out, int sms, double peak_tops) {
    const int smem = Q * QN * 128 + Q * QN * 4 + 128 * 4 * NWG + 1024 * 4 * NWG + 1024;
    auto k = stage_probe<QN, Q, NWG, FRAG, U8>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    k<<<sms, 128 * NWG, smem>>>(groups / 8, out); /* warm-up */
    CK(cudaGetLastError());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0));
    k<<<sms, 128 * NWG, smem>>>(groups, out);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double ops = 2.0 * sms * NWG * (double)groups * 64 * Q * QN * 128;
    const double tops = ops / (ms * 1e-3) / 1e12;
    printf("stage: %d warpgroup(s) x 64 rows, %3d tokens (%d x m64n%dk32), %-18s  %7.1f TOPS  %5.1f%% of peak  (%.3f "
           "ms)\n",
           NWG, Q * QN, Q, QN, FRAG ? (U8 ? "u8 fragments formed" : "fragments formed") : "fragments fixed", tops,
           100.0 * tops / peak_tops, ms);
}

template <int N, bool SS, int NWG, int MODE> void run(int groups, float *out, int sms, double peak_tops) {
    const int smem = N * 128 + NWG * 64 * 128 + 1024;
    CK(cudaFuncSetAttribute(probe<N, SS, NWG, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    probe<N, SS, NWG, MODE><<<sms, 128 * NWG, smem>>>(groups / 8, out); /* warm-up */
    CK(cudaGetLastError());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0));
    probe<N, SS, NWG, MODE><<<sms, 128 * NWG, smem>>>(groups, out);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double ops = 2.0 * sms * NWG * (double)groups * 4 * 64 * N * 32;
    const double tops = ops / (ms * 1e-3) / 1e12;
    static const char *modes[] = {"wgmma only", "rescale, serial", "rescale, overlapped"};
    printf("m64n%-3dk32 %s  %d warpgroup(s)  %-20s  %7.1f TOPS  %5.1f%% of peak  (%.3f ms)\n", N, SS ? "SS" : "RS", NWG,
           modes[MODE], tops, 100.0 * tops / peak_tops, ms);
}

int main(int argc, char **argv) {
    const int groups = (argc > 1 ? atoi(argv[1]) : 4096) / 32 * 32; /* warm-up runs groups / 8 */
    if (groups <= 0) {
        fprintf(stderr, "groups: expected at least 32\n");
        return 2;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int clock_khz = 0;
    CK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
    const double peak = 2.0 * 4096 * prop.multiProcessorCount * clock_khz * 1e3 / 1e12;
    printf("# %s, %d SMs, %.0f MHz (reported max): dense int8 peak %.0f TOPS; %d groups of 128 columns per warpgroup\n",
           prop.name, prop.multiProcessorCount, clock_khz / 1e3, peak, groups);
    float *out;
    CK(cudaMalloc(&out, (size_t)prop.multiProcessorCount * 512 * sizeof(float)));
    const int sms = prop.multiProcessorCount;
    run<64, false, 1, 0>(groups, out, sms, peak);
    run<64, false, 2, 0>(groups, out, sms, peak);
    run<64, true, 2, 0>(groups, out, sms, peak);
    run<128, false, 2, 0>(groups, out, sms, peak);
    run<128, true, 2, 0>(groups, out, sms, peak);
    run<256, false, 1, 0>(groups, out, sms, peak);
    run<256, false, 2, 0>(groups, out, sms, peak);
    run<256, true, 2, 0>(groups, out, sms, peak);
    run<64, false, 2, 1>(groups, out, sms, peak);
    run<64, false, 3, 1>(groups, out, sms, peak);
    run<64, false, 4, 1>(groups, out, sms, peak);
    run<64, false, 2, 2>(groups, out, sms, peak);
    run<64, false, 3, 2>(groups, out, sms, peak);
    run<128, false, 2, 1>(groups, out, sms, peak);
    run<128, false, 2, 2>(groups, out, sms, peak);
    run<128, true, 2, 2>(groups, out, sms, peak);
    /* the prefill stage's shapes: today's CTA (2 warpgroups x 256 tokens), then more warpgroups on fewer tokens */
    run_stage<64, 4, 2, true>(groups, out, sms, peak);
    run_stage<64, 4, 2, false>(groups, out, sms, peak);
    run_stage<64, 4, 2, true, true>(groups, out, sms, peak);
    run_stage<64, 2, 2, true>(groups, out, sms, peak);
    run_stage<64, 2, 3, true>(groups, out, sms, peak);
    run_stage<32, 4, 3, true>(groups, out, sms, peak);
    run_stage<32, 4, 4, true>(groups, out, sms, peak);
    run_stage<32, 2, 4, true>(groups, out, sms, peak);
    run_stage<32, 2, 4, true, true>(groups, out, sms, peak);
    CK(cudaFree(out));
    return 0;
}
