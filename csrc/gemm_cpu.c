/* CPU W4A8 / W8A8 / mixed linear (docs/spec.md §2, §5; the layout: csrc/layout_cpu.h).
 *
 * Math: y[m,n] = sum_j Sw[n,j] Sa[m,j] * D[m,n,j] with the integer group dot product
 *   D = sum_{k in j} (Wq[n,k] - z[n,j]) Aq[m,k] = sum_k Wq Aq - z * sum_k Aq   (z = 0 for 8-bit).
 * Activations are quantized once per call (int8 per token and group, docs/method.md) together with
 * their per-group code sums; the kernels take the unsigned 4-bit codes as the unsigned operand of the
 * u8 x s8 dot products and subtract z * sum_k Aq per group, so no zero point is applied per weight.
 * Every path computes D exactly in int32 (mod 2^32, like vpdpbusd) and then the same float steps,
 * group by group in order:  acc = fma((float)D, Sw * Sa, acc);  y = acc + bias.
 * So the portable C, AVX2 and AVX-512 VNNI paths give bit-identical outputs (tested).
 *
 * Three implementations read the layout: portable C (the oracle for the SIMD ones), AVX2 (maddubs)
 * and AVX-512 VNNI (vpdpbusd); chosen at run time with __builtin_cpu_supports (resolve(): "auto" takes
 * the fastest the CPU has: VNNI, else AVX2, else portable).
 * Threads split the output rows (row blocks), never K: each output is written by one thread.
 * Blocking (rb_all_tokens): per row block, one K block of weights at a time (L1; VNNI: 48 KB in L2,
 * the next block prefetched a line per step) while tiles of MB tokens sweep over it; VNNI reads the
 * activations in tiles of 8 tokens (acts.ap) and stores each tile's outputs once final. AVX2 4-bit at
 * M >= 2 instead keeps a tile's expanded activations in L1 and sweeps the row blocks of a work item
 * over them (see the driver); every path keeps each output's float steps in group order. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "gemm_cpu.h"
#include "quant.h"
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#define MB_AVX512   8 /* tokens per register tile: AVX-512 (32 registers) */
#define MB_AVX2_W8  4 /* AVX2 (16 registers), 8-bit: 4 tokens x int32 sums of 16 rows */
#define MB_AVX2_X   4 /* AVX2, 4-bit at M >= 2: 4 tokens x (int32 + int16 sums) of 8 rows */
#define MB_PORTABLE 8
#define MC          256 /* tokens per pass over a row block: out[MC][16] floats (16 KB) per thread */
_Static_assert(MC % MB_AVX512 == 0, "VNNI token tiles start at activation tiles (tile_index)");
#define MC_X     64    /* AVX2 at M >= 2: tokens per pass over an item (float sums in L2) */
#define XK_BYTES 16384 /* AVX2 at M >= 2: expanded activation bytes of one tile's K block (L1) */
#define KC_BYTES 12288 /* weight bytes per K block: the block stays in L1 across the token tiles */
/* VNNI: 18 KB (8 groups of 8-bit, 16 of 4-bit weights): with the unrolled group steps, 4-11% faster at
 * M = 16 than 48 KB and within 1% at M = 128 (2 threads, K = 4096 and 11008; 48 KB had been 2-5% faster
 * at M = 128 than 12 KB before the unrolling and the per-group float sums in out). */
#define KC_BYTES_VNNI      18432
#define CHUNK              1024      /* activation values converted to float32 at a time */
#define PREP_SERIAL_VALUES (1 << 15) /* activations up to this many: quantized by the calling thread alone */
#define MACS_PER_THREAD (1 << 20) /* below this many multiply-adds per thread, fewer threads: waking one costs more */
/* AVX2 and VNNI at M = 1: one L2 prefetch per section (1.1-2.1 KB) this far ahead in the weight stream, so
 * that every 4 KB page of it is touched early (the hardware prefetchers stop at a page's end; a page walk in a
 * VM is nested). AVX2, against the prefetch per step 2 KB ahead into L1 of rounds 1-4 (itself slower than
 * none): -1% to +25% at M = 1 with 2 threads, +18-35% with one (Zen 4 VM, AVX2 forced); 2 MB pages (madvise)
 * gave about the same, but made M >= 16 1-4% slower. VNNI, against no software prefetch at M = 1 (same VM, 2
 * threads, medians of four runs): W8A8 +9-15%, W4.4A8 +0-3%. */
#define PAGE_PREFETCH_BYTES      32768
#define PREFETCH_PAGE_AHEAD(sec) _mm_prefetch((const char *)((uintptr_t)(sec) + PAGE_PREFETCH_BYTES), _MM_HINT_T1)

void mix_cpu_weight_geometry(int bits, int64_t N, int64_t K, int64_t g, mix_cpu_weight *w) {
    memset(w, 0, sizeof(*w));
    w->bits = bits;
    w->N = N;
    w->K = K;
    w->g = g;
    w->G = mix_ngroups(K, g);
    w->Lp = g > INT64_MAX / 64 ? -1 : (g + MIX_K_ALIGN - 1) / MIX_K_ALIGN * MIX_K_ALIGN;
    w->section = w->Lp < 0 ? -1 : mix_cpu_code_bytes(bits, w->Lp) + mix_cpu_tail_bytes(bits);
}

int64_t mix_cpu_blob_bytes(const mix_cpu_weight *w) { /* -1 when the size does not fit int64 */
    int64_t nb = w->N / MIX_RB + (w->N % MIX_RB != 0), r;
    if (w->N < 0 || w->G < 0 || w->section < 0 || __builtin_mul_overflow(nb, w->G, &r) ||
        __builtin_mul_overflow(r, w->section, &r))
        return -1;
    return r;
}

/* A section's weight scales (its last 64 bytes) and, 4-bit only, zero points (the 64 bytes before). */
static inline const float *section_scale(const mix_cpu_weight *w, const uint8_t *sec) {
    return (const float *)(sec + (w->section - MIX_RB * (int64_t)sizeof(float)));
}
static inline const int32_t *section_zero(const mix_cpu_weight *w, const uint8_t *sec) {
    return ((const mix_cpu_tail *)(sec + (w->section - (int64_t)sizeof(mix_cpu_tail))))->izero;
}

void mix_cpu_prepack(mix_cpu_weight *w, const void *codes, const float *scale, const uint8_t *zero, uint8_t *blob) {
    int64_t NB = (w->N + MIX_RB - 1) / MIX_RB, G = w->G, K = w->K, g = w->g, Lp = w->Lp;
    int64_t code_bytes = w->section - mix_cpu_tail_bytes(w->bits);
#pragma omp parallel for schedule(static)
    for (int64_t rb = 0; rb < NB; rb++)
        for (int64_t j = 0; j < G; j++) {
            uint8_t *sec = blob + (rb * G + j) * w->section;
            memset(sec, 0, (size_t)w->section);
            mix_cpu_tail tail;
            for (int r = 0; r < MIX_RB; r++) {
                int64_t n = rb * MIX_RB + r;
                int valid = n < w->N;
                int z = (valid && w->bits == 4) ? zero[n * G + j] : 0;
                for (int64_t kk = 0; kk < Lp; kk++) {
                    int64_t k = j * g + kk;
                    int in = valid && kk < g && k < K;
                    if (w->bits == 4) {
                        int c = in ? ((const uint8_t *)codes)[n * K + k] : z; /* padding: weight 0 */
                        int64_t step = kk / 8, i = kk % 8;
                        sec[step * MIX_STEP_BYTES + 4 * r + (i & 3)] |= (uint8_t)((c & 15) << (i < 4 ? 0 : 4));
                    } else {
                        int c = in ? ((const int8_t *)codes)[n * K + k] : 0;
                        sec[(kk / 4) * MIX_STEP_BYTES + 4 * r + (kk % 4)] = (uint8_t)(int8_t)c;
                    }
                }
                tail.izero[r] = z;
                tail.scale[r] = valid ? scale[n * G + j] : 0.f;
            }
            if (w->bits == 4)
                memcpy(sec + code_bytes, &tail, sizeof tail);
            else
                memcpy(sec + code_bytes, tail.scale, sizeof tail.scale);
        }
}

/* ---- activations: int8 codes [M][G][Lp] (padding 0), scales [M][G], code sums [M][G] ---- */
typedef struct {
    int8_t *aq;
    float *sa;
    int32_t *asum;
    int64_t G, Lp;
    /* VNNI only (else NULL): aq in tiles of tw tokens (tile_index), vpdpbusd's broadcast s8 operand.
     * Per tile and group, each 4 k hold the tile's tokens side by side, so a tile reads one sequential
     * stream: rows of aq lie G * Lp bytes apart, often a multiple of 4 KB, and 8 tokens at one offset
     * filled one L1 set (docs/cpu_kernels.md, second round: W8A8 9-13% faster at K = 4096 with the asm fix). */
    int8_t *ap;
    int64_t tw;
    /* VNNI with Lp <= 256 only (else NULL), [M][G]: -asum as int16 in the low half, 0 in the high
     * half: vpdpwssd's broadcast operand for the 4-bit zero-point term z * asum. */
    int32_t *zq;
    /* VNNI only (else NULL), [M][G]: -128 * asum (mod 2^32), where the 8-bit sums start: a broadcast
     * load, no multiply (vpdpwssd, vpmulld, vmulps and vfmadd take vpdpbusd's two ports on Zen 4). */
    int32_t *n128;
} acts;

/* Index of (token m, group j) in sa, asum, zq: VNNI (ap set) in tiles too, so that a tile's 8 scales
 * lie side by side (8 pointers strided by G had GCC spill registers in the tile's epilogue). */
static inline int64_t scal_index(const acts *A, int64_t m, int64_t j) {
    return A->ap ? ((m / A->tw) * A->G + j) * A->tw + m % A->tw : m * A->G + j;
}

/* Offset of (token m, group j, k = 4 * q) in ap. */
static inline int64_t tile_index(const acts *A, int64_t m, int64_t j, int64_t q) {
    return (((m / A->tw) * A->G + j) * (A->Lp / 4) + q) * 4 * A->tw + (m % A->tw) * 4;
}

/* x[off .. off+n) as float32: x itself when it is float32, else converted into buf. */
static const float *floats_of(const void *x, int dt, int64_t off, int64_t n, float *buf) {
    if (dt == MIX_F32) return (const float *)x + off;
    for (int64_t i = 0; i < n; i++) buf[i] = mix_load_float(x, (mix_dtype)dt, off + i);
    return buf;
}

/* The reference: max |v| (and whether all are finite), then codes (quant.h) and their sum. */
static void absmax_portable(const float *v, int64_t n, float *amax, int *bad) {
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(v[i])) *bad = 1;
        *amax = fmaxf(*amax, fabsf(v[i]));
    }
}
static int32_t codes_portable(const float *v, int64_t n, float s, int8_t *dst) {
    int32_t sum = 0;
    for (int64_t i = 0; i < n; i++) sum += dst[i] = mix_sym_code(v[i], s, 8);
    return sum;
}

#ifdef __x86_64__
#define AVX2_FN __attribute__((target("avx2,fma")))
/* Same results as the portable pair: max is order-free, and rint(v / s) is _mm256_round_ps of an
 * IEEE division; the clamp is ordered so that NaN maps to -127 like mix_sym_code. */
static AVX2_FN void absmax_avx2(const float *v, int64_t n, float *amax, int *bad) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    __m256 m = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + i), absmask);
        finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, inf, _CMP_LT_OQ)); /* NaN, Inf -> false */
        m = _mm256_max_ps(m, a);
    }
    if (_mm256_movemask_ps(finite) != 0xff) *bad = 1;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    *amax = fmaxf(*amax, _mm_cvtss_f32(h));
    absmax_portable(v + i, n - i, amax, bad);
}
static AVX2_FN int32_t codes_avx2(const float *v, int64_t n, float s, int8_t *dst) {
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i q[4];
        for (int u = 0; u < 4; u++) {
            __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + i + 8 * u), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[u] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)); /* max(NaN, lo) = lo */
        }
        __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(w01, w23), ones16));
        __m256i b = _mm256_packs_epi16(w01, w23); /* lane-interleaved: restore the order */
        b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(dst + i), b);
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t) + codes_portable(v + i, n - i, s, dst + i);
}
#endif

#ifdef __x86_64__
/* VNNI, groups of up to CHUNK values: the scalar pair's results (max is order-free; rint(v / s) by
 * vrndscaleps of an IEEE division, clamped so that NaN maps to -127), 16 at a time, the codes written
 * straight into the tiled copy (acts.ap; aq is not written). The scalar copy into the tiles and the
 * 8-lane passes took 17% of a call on the default model's layers (K = 576, M = 512). */
static __attribute__((target("avx512f,avx512bw"))) int prepare_group_avx512(const float *v, int64_t len, int64_t m,
                                                                            int64_t j, const acts *A) {
    const __m512 inf = _mm512_set1_ps(INFINITY);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 finite = 0xffff;
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 in = len - i >= 16 ? 0xffff : (__mmask16)((1u << (len - i)) - 1);
        const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(in, v + i));
        finite &= _mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ); /* NaN, Inf -> false; masked-off lanes are 0 */
        mx = _mm512_max_ps(mx, a);
    }
    const float s = mix_sym_scale(_mm512_reduce_max_ps(mx), 8);
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    int8_t *dst = A->ap + tile_index(A, m, j, 0);
    const int64_t wstride = 4 * A->tw, words = A->Lp / 4;
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < A->Lp; i += 16) { /* past len: code 0 (the padding) */
        const __mmask16 in = len - i >= 16 ? 0xffff : len > i ? (__mmask16)((1u << (len - i)) - 1) : 0;
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(in, v + i), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i q = _mm512_maskz_cvtps_epi32(in, _mm512_min_ps(_mm512_max_ps(r, lo), hi)); /* max(NaN, lo) = lo */
        sum = _mm512_add_epi32(sum, q);
        uint32_t w4[4];
        _mm_storeu_si128((__m128i *)w4, _mm512_cvtepi32_epi8(q));
        for (int u = 0; u < 4 && i / 4 + u < words; u++) memcpy(dst + (i / 4 + u) * wstride, &w4[u], 4);
    }
    const int32_t asum = _mm512_reduce_add_epi32(sum);
    const int64_t si = scal_index(A, m, j);
    A->sa[si] = s;
    A->asum[si] = asum;
    if (A->zq) A->zq[si] = (int32_t)(uint16_t)(int16_t)-asum; /* |asum| <= 127 * 256 */
    A->n128[si] = (int32_t)(0u - 128u * (uint32_t)asum);
    return finite != 0xffff;
}
#endif

/* One (token, group): codes + 0-padding to Lp, scale, code sum. Returns 1 on NaN/Inf. */
static int prepare_group(const void *x, int dt, int64_t K, int64_t g, int64_t m, int64_t j, const acts *A, int simd) {
    float buf[CHUNK];
    int64_t k0 = j * g, len = (k0 + g < K ? g : K - k0);
#ifdef __x86_64__
    if (A->ap && len <= CHUNK) return prepare_group_avx512(floats_of(x, dt, m * K + k0, len, buf), len, m, j, A);
#endif
    int8_t *dst = A->aq + (m * A->G + j) * A->Lp;
    float amax = 0.f;
    int bad = 0;
    for (int64_t c = 0; c < len; c += CHUNK) {
        int64_t n = len - c < CHUNK ? len - c : CHUNK;
        const float *v = floats_of(x, dt, m * K + k0 + c, n, buf);
#ifdef __x86_64__
        if (simd)
            absmax_avx2(v, n, &amax, &bad);
        else
#endif
            absmax_portable(v, n, &amax, &bad);
    }
    float s = mix_sym_scale(amax, 8);
    int32_t sum = 0;
    for (int64_t c = 0; c < len; c += CHUNK) {
        int64_t n = len - c < CHUNK ? len - c : CHUNK;
        const float *v = floats_of(x, dt, m * K + k0 + c, n, buf);
#ifdef __x86_64__
        if (simd)
            sum += codes_avx2(v, n, s, dst + c);
        else
#endif
            sum += codes_portable(v, n, s, dst + c);
    }
    memset(dst + len, 0, (size_t)(A->Lp - len));
    for (int64_t q = 0; A->ap && q < A->Lp / 4; q++) {
        uint32_t v;
        memcpy(&v, dst + 4 * q, 4);
        memcpy(A->ap + tile_index(A, m, j, q), &v, 4);
    }
    const int64_t si = scal_index(A, m, j);
    A->sa[si] = s;
    A->asum[si] = sum;
    if (A->zq) A->zq[si] = (int32_t)(uint16_t)(int16_t)-sum; /* |sum| <= 127 * 256 */
    if (A->n128) A->n128[si] = (int32_t)(0u - 128u * (uint32_t)sum);
    return bad;
}

/* ---- kernels: one row block x MB tokens x groups j0 .. j1-1, accumulated into out[MB][16] float ----
 * The driver zeroes out[] and then calls a tile on consecutive group ranges (K blocking: one range's
 * weights stay in L1 while every token tile reads them), so each output still takes its groups' float
 * steps in order, as the portable path does. */
typedef struct {
    const mix_cpu_weight *w;
    const acts *A;
    /* AVX2 at M >= 2 only: the tile's activations of one K block (groups from xj0), expanded so that
     * each broadcast operand is one 32-byte load (a broadcast from memory costs a shuffle-port uop
     * per use; a plain load, or a memory operand, costs none): the 4 int8 codes of 4 k repeated 8
     * times (32 bytes), as [k / 4 from group xj0][token of the tile][32 B]: one sequential stream
     * at fixed offsets. expand_tile_avx2 writes it. */
    const uint8_t *x4;
    int64_t xj0;
    /* VNNI with several token tiles: a cursor over the weights of the next K block, one line prefetched
     * into L2 per step (a burst of prefetches stalled on the miss buffers: 9% of the time at M = 16). */
    const char **pf, *pf_end;
} kctx;

static void rb_portable(const kctx *c, int64_t rb, int64_t m0, int MB, int64_t j0, int64_t j1, float *out) {
    const mix_cpu_weight *w = c->w;
    const acts *A = c->A;
    int64_t G = w->G, Lp = w->Lp;
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        const float *scale = section_scale(w, sec);
        const int32_t *izero = w->bits == 4 ? section_zero(w, sec) : NULL;
        for (int t = 0; t < MB; t++) {
            const int8_t *a = A->aq + ((m0 + t) * G + j) * Lp;
            float s_a = A->sa[(m0 + t) * G + j];
            uint32_t asum = (uint32_t)A->asum[(m0 + t) * G + j];
            for (int r = 0; r < MIX_RB; r++) {
                uint32_t acc = 0; /* wraps like vpdpbusd */
                for (int64_t kk = 0; kk < Lp; kk++) {
                    int wv;
                    if (w->bits == 4) {
                        uint8_t b = sec[(kk / 8) * MIX_STEP_BYTES + 4 * r + (kk & 3)];
                        wv = (kk % 8) < 4 ? (b & 15) : (b >> 4);
                    } else {
                        wv = (int8_t)sec[(kk / 4) * MIX_STEP_BYTES + 4 * r + (kk % 4)];
                    }
                    acc += (uint32_t)((int32_t)a[kk] * wv);
                }
                if (w->bits == 4) acc -= (uint32_t)izero[r] * asum;
                out[t * MIX_RB + r] = fmaf((float)(int32_t)acc, scale[r] * s_a, out[t * MIX_RB + r]);
            }
        }
    }
}

#ifdef __x86_64__
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline
/* vpdpbusd takes u8 x s8, the s8 operand broadcast from memory: 4-bit: codes (u8) x activations (s8),
 * minus z * sum_k a; 8-bit: weights shifted to u8 (w + 128) x activations (s8), minus 128 * sum_k a.
 * So both read one tiled activation copy (acts.ap); shifting the activations instead needed a second
 * copy, and the two no longer fit L2 together at M = 128, K = 4096 (mixed layers 6% slower). */
/* acc += u8 x (4 s8 at p, broadcast): the activations as vpdpbusd's embedded-broadcast memory operand.
 * Written out because GCC emits a separate vpbroadcastd per use for _mm512_set1_epi32 (plus register
 * copies around them): 16 extra vector instructions per 16 dot products in the 4-bit tile. */
static inline __attribute__((target("avx512f,avx512vnni"), always_inline)) __m512i dpbusd_bcast(__m512i acc, __m512i u8,
                                                                                                const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*(const int32_t *)p));
    return acc;
}

/* The int32 at p in every lane: a broadcast load (load port only; GCC may move it through a GPR). */
static inline __attribute__((target("avx512f"), always_inline)) __m512i bcast_load(const int32_t *p) {
    __m512i v;
    __asm__("vpbroadcastd %1, %0" : "=v"(v) : "m"(*p));
    return v;
}

/* acc += (int16 pairs of z) x (the int16 pair at p, broadcast): vpdpwssd, AVX512_VNNI like vpdpbusd. */
static inline __attribute__((target("avx512f,avx512vnni"), always_inline)) __m512i dpwssd_bcast(__m512i acc, __m512i z,
                                                                                                const int32_t *p) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(z), "m"(*p));
    return acc;
}

/* Prefetch per step: several tokens (each weight line serves MB of them) one line per step
 * of the next K block, through the cursor *pf (a burst of prefetches measured 9% slower at M = 16). One
 * token streams its weights from memory with no software prefetch: the hardware prefetchers follow the
 * sequential stream, and a prefetch 2 KB ahead into L1 (the second and third rounds) measured 6-24% slower
 * at M = 1 on the Zen 4 VM (2 threads, 4096-wide layers; 8 KB ahead into L2 also slower). */
static inline __attribute__((always_inline)) void prefetch_step(int MB, const char **pf, const char *pf_end) {
    if (MB > 1 && *pf < pf_end) {
        _mm_prefetch(*pf, _MM_HINT_T1);
        *pf += MIX_CACHE_LINE;
    }
}

static AVX512_TARGET void rb_avx512_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, const int TW, int64_t j0,
                                         int64_t j1, float *out) {
    const mix_cpu_weight *w = c->w;
    const acts *A = c->A;
    int64_t G = w->G;
    const __m512i low4 = _mm512_set1_epi8(15);
    const char *pf = c->pf ? *c->pf : NULL, *pf_end = c->pf_end;
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        if (TW == 1) PREFETCH_PAGE_AHEAD(sec); /* M = 1 */
        __m512i acc[MB_AVX512];
        for (int t = 0; t < MB; t++) acc[t] = _mm512_setzero_si512();
        const int64_t tw = TW; /* == A->tw; m0 starts a tile (MB_AVX512 divides MC) */
        /* Steps past the group's last k hold weight 0 x activation 0: skipped (K = 576 in groups of 128
         * ends in half a group, 10% of the work). */
        const int64_t len = w->K - j * w->g < w->g ? w->K - j * w->g : w->g;
        const int64_t si = scal_index(A, m0, j); /* token m0 + t at si + t */
        /* Full groups of 128 run fully unrolled steps: the exit of a 16- or 32-step loop, once per group,
         * left vpdpbusd's ports idle (about 2% at M = 128, K = 4096). */
        if (w->bits == 4) {
            const int8_t *a0 = A->ap + tile_index(A, m0, j, 0);
#define W4_STEP(s)                                                                                    \
    do {                                                                                              \
        prefetch_step(MB, &pf, pf_end);                                                               \
        __m512i v = _mm512_loadu_si512(sec + MIX_STEP_BYTES * (s));                                   \
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4); \
        for (int t = 0; t < MB; t++) {                                                                \
            const int8_t *a = a0 + (8 * (s) * tw + 4 * t);                                            \
            acc[t] = dpbusd_bcast(acc[t], lo, a);                                                     \
            acc[t] = dpbusd_bcast(acc[t], hi, a + 4 * tw);                                            \
        }                                                                                             \
    } while (0)
            if (len == 128) {
#pragma GCC unroll 16
                for (int s = 0; s < 16; s++) W4_STEP(s);
            } else
                for (int64_t s = 0; s < (len + 7) / 8; s++) W4_STEP(s);
#undef W4_STEP
            const __m512i z = _mm512_loadu_si512(section_zero(w, sec));
            if (A->zq) /* one vpdpwssd per token: z * -asum */
                for (int t = 0; t < MB; t++) acc[t] = dpwssd_bcast(acc[t], z, A->zq + si + t);
            else
                for (int t = 0; t < MB; t++)
                    acc[t] = _mm512_sub_epi32(acc[t], _mm512_mullo_epi32(z, _mm512_set1_epi32(A->asum[si + t])));
        } else { /* weights shifted to u8 (w + 128: one xor per step for MB tokens) x s8 activations, the
                    sums started at -128 * sum_k a */
            const int8_t *a0 = A->ap + tile_index(A, m0, j, 0);
            const __m512i x80 = _mm512_set1_epi8((char)0x80);
            for (int t = 0; t < MB; t++) acc[t] = bcast_load(A->n128 + si + t);
#define W8_STEP(s)                                                                                             \
    do {                                                                                                       \
        prefetch_step(MB, &pf, pf_end);                                                                        \
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(sec + MIX_STEP_BYTES * (s)), x80); /* w + 128 */ \
        for (int t = 0; t < MB; t++) acc[t] = dpbusd_bcast(acc[t], v, a0 + 4 * ((s) * tw + t));                \
    } while (0)
            if (len == 128) {
#pragma GCC unroll 32
                for (int s = 0; s < 32; s++) W8_STEP(s);
            } else
                for (int64_t s = 0; s < (len + 3) / 4; s++) W8_STEP(s);
#undef W8_STEP
        }
        const __m512 sw = _mm512_loadu_ps(section_scale(w, sec));
        for (int t = 0; t < MB; t++) {
            /* the float sums stay in out (L1): in registers GCC kept a stack copy of each anyway */
            __m512 scale = _mm512_mul_ps(sw, _mm512_set1_ps(A->sa[si + t]));
            _mm512_storeu_ps(out + t * MIX_RB,
                             _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), scale, _mm512_loadu_ps(out + t * MIX_RB)));
        }
    }
    if (c->pf) *c->pf = pf;
}

#define AVX2_TARGET __attribute__((target("avx2,fma"), always_inline)) inline
/* AVX2 has no u8 x s8 -> int32 dot: maddubs (u8 x s8 -> pair sums in int16, saturating) then madd
 * with ones (-> int32). A tile runs HH of the row block's two 8-row halves at a time (one 32-byte
 * half of each step) for MB tokens, with every sum in a register. The multiply ports (maddubs,
 * madd; vpsignb shares them in part) bound these loops, and each broadcast from memory costs a
 * shuffle-port uop: hence int16 sums over several 4-bit steps, and at M >= 2 the 4-bit tiles read
 * pre-broadcast activations (w4x_avx2_tile). */

/* An empty asm that takes v in a register: the compiler may not reassociate the int16 sums across it
 * (it would compute every product first and spill them all). */
#define in_register(v) __asm__("" : "+x"(v))

static inline __attribute__((target("avx2"), always_inline)) __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 4-bit: code (u8, <= 15) x activation (s8, |a| <= 127) pairs are <= 3810, so up to 8 maddubs
 * (4 steps) add up exactly in int16 (<= 30480) before one widening madd. Runs the decode shape
 * (MB = 1, HH = 2: each broadcast serves 16 rows); M >= 2 goes through w4x_avx2_tile. */
static AVX2_TARGET void w4_avx2_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, const int HH, int64_t j0,
                                     int64_t j1, float *out) {
    const mix_cpu_weight *w = c->w;
    const acts *A = c->A;
    const int64_t G = w->G, Lp = w->Lp, S = Lp / 8, astride = G * Lp;
    const __m256i low4 = _mm256_set1_epi8(15), ones16 = _mm256_set1_epi16(1);
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        const float *scale = section_scale(w, sec);
        if (MB == 1) PREFETCH_PAGE_AHEAD(sec);
        const int8_t *a0 = A->aq + (m0 * G + j) * Lp;
        for (int h0 = 0; h0 < 2; h0 += HH) {
            __m256i acc[MB_AVX2_X][2];
            for (int t = 0; t < MB; t++)
                for (int hh = 0; hh < HH; hh++) acc[t][hh] = _mm256_setzero_si256();
            for (int64_t s0 = 0; s0 < S; s0 += 4) {
                __m256i p[MB_AVX2_X][2];
                for (int t = 0; t < MB; t++)
                    for (int hh = 0; hh < HH; hh++) p[t][hh] = _mm256_setzero_si256();
#define W4_STEP(s)                                                                                                   \
    do {                                                                                                             \
        const uint8_t *st = sec + MIX_STEP_BYTES * (s);                                                              \
        __m256i lo[2], hi[2];                                                                                        \
        for (int hh = 0; hh < HH; hh++) {                                                                            \
            __m256i v = _mm256_loadu_si256((const __m256i *)(st + 32 * (h0 + hh)));                                  \
            lo[hh] = _mm256_and_si256(v, low4);                                                                      \
            hi[hh] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                                                \
        }                                                                                                            \
        for (int t = 0; t < MB; t++) {                                                                               \
            const int8_t *a = a0 + t * astride + 8 * (s);                                                            \
            const __m256i x0 = bcast4(a), x1 = bcast4(a + 4);                                                        \
            for (int hh = 0; hh < HH; hh++)                                                                          \
                p[t][hh] = _mm256_add_epi16(                                                                         \
                    p[t][hh], _mm256_add_epi16(_mm256_maddubs_epi16(lo[hh], x0), _mm256_maddubs_epi16(hi[hh], x1))); \
        }                                                                                                            \
        for (int t = 0; t < MB; t++)                                                                                 \
            for (int hh = 0; hh < HH; hh++) in_register(p[t][hh]);                                                   \
    } while (0)
                if (s0 + 4 <= S) {
                    W4_STEP(s0);
                    W4_STEP(s0 + 1);
                    W4_STEP(s0 + 2);
                    W4_STEP(s0 + 3);
                } else {
                    for (int64_t s = s0; s < S; s++) W4_STEP(s);
                }
#undef W4_STEP
                for (int t = 0; t < MB; t++)
                    for (int hh = 0; hh < HH; hh++)
                        acc[t][hh] = _mm256_add_epi32(acc[t][hh], _mm256_madd_epi16(p[t][hh], ones16));
            }
            for (int hh = 0; hh < HH; hh++) {
                const int h = h0 + hh;
                const __m256i z = _mm256_loadu_si256((const __m256i *)(section_zero(w, sec) + 8 * h));
                const __m256 sw = _mm256_loadu_ps(scale + 8 * h);
                for (int t = 0; t < MB; t++) {
                    __m256i d = _mm256_sub_epi32(acc[t][hh],
                                                 _mm256_mullo_epi32(z, _mm256_set1_epi32(A->asum[(m0 + t) * G + j])));
                    float *o = out + t * MIX_RB + 8 * h;
                    __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(A->sa[(m0 + t) * G + j]));
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, _mm256_loadu_ps(o)));
                }
            }
        }
    }
}

/* 8-bit: |w| (u8) x sign(a, w) (s8) pairs are <= 2 * 127 * 127 = 32258: exact in int16, but two of
 * them are not, so every maddubs is widened at once. */
static AVX2_TARGET void w8_avx2_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, const int HH, int64_t j0,
                                     int64_t j1, float *out) {
    const mix_cpu_weight *w = c->w;
    const acts *A = c->A;
    const int64_t G = w->G, Lp = w->Lp, S = Lp / 4, astride = G * Lp;
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        const float *scale = section_scale(w, sec);
        if (MB == 1) PREFETCH_PAGE_AHEAD(sec);
        const int8_t *a0 = A->aq + (m0 * G + j) * Lp;
        for (int h0 = 0; h0 < 2; h0 += HH) {
            __m256i acc[MB_AVX2_W8][2];
            for (int t = 0; t < MB; t++)
                for (int hh = 0; hh < HH; hh++) acc[t][hh] = _mm256_setzero_si256();
            for (int64_t s = 0; s < S; s++) {
                const uint8_t *st = sec + MIX_STEP_BYTES * s;
                __m256i v[2], av[2];
                for (int hh = 0; hh < HH; hh++) {
                    v[hh] = _mm256_loadu_si256((const __m256i *)(st + 32 * (h0 + hh)));
                    av[hh] = _mm256_abs_epi8(v[hh]);
                }
                for (int t = 0; t < MB; t++) {
                    const __m256i x = bcast4(a0 + t * astride + 4 * s);
                    for (int hh = 0; hh < HH; hh++)
                        acc[t][hh] = _mm256_add_epi32(
                            acc[t][hh],
                            _mm256_madd_epi16(_mm256_maddubs_epi16(av[hh], _mm256_sign_epi8(x, v[hh])), ones16));
                }
            }
            for (int hh = 0; hh < HH; hh++) {
                const int h = h0 + hh;
                const __m256 sw = _mm256_loadu_ps(scale + 8 * h);
                for (int t = 0; t < MB; t++) {
                    float *o = out + t * MIX_RB + 8 * h;
                    __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(A->sa[(m0 + t) * G + j]));
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][hh]), scale, _mm256_loadu_ps(o)));
                }
            }
        }
    }
}

/* 4-bit at M >= 2: as w4_avx2_tile (one 8-row half at a time for MB tokens), with each activation
 * operand a plain load from the expanded activations (kctx.x4): a memory operand of maddubs. (8-bit
 * row blocks measured faster with w8_avx2_tile, their weights in L1 and broadcast activations.) */
static AVX2_TARGET void w4x_avx2_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, int64_t j0, int64_t j1,
                                      float *out) {
    const mix_cpu_weight *w = c->w;
    const acts *A = c->A;
    const int64_t G = w->G, Lp = w->Lp, S = Lp / 8;
    const __m256i low4 = _mm256_set1_epi8(15), ones16 = _mm256_set1_epi16(1);
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        const float *scale = section_scale(w, sec);
        const uint8_t *x0 = c->x4 + (j - c->xj0) * Lp / 4 * (32 * MB_AVX2_X);
        for (int h = 0; h < 2; h++) {
            __m256i acc[MB_AVX2_X];
            for (int t = 0; t < MB; t++) acc[t] = _mm256_setzero_si256();
            for (int64_t s0 = 0; s0 < S; s0 += 4) {
                __m256i p[MB_AVX2_X];
                for (int t = 0; t < MB; t++) p[t] = _mm256_setzero_si256();
#define W4X_STEP(s)                                                                                                    \
    do {                                                                                                               \
        __m256i v = _mm256_loadu_si256((const __m256i *)(sec + MIX_STEP_BYTES * (s) + 32 * h));                        \
        __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                  \
        for (int t = 0; t < MB; t++) {                                                                                 \
            const __m256i *xa = (const __m256i *)(x0 + 64 * MB_AVX2_X * (s)) + t;                                      \
            p[t] =                                                                                                     \
                _mm256_add_epi16(p[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256(xa)),               \
                                                        _mm256_maddubs_epi16(hi, _mm256_load_si256(xa + MB_AVX2_X)))); \
        }                                                                                                              \
        for (int t = 0; t < MB; t++) in_register(p[t]);                                                                \
    } while (0)
                if (s0 + 4 <= S) {
                    W4X_STEP(s0);
                    W4X_STEP(s0 + 1);
                    W4X_STEP(s0 + 2);
                    W4X_STEP(s0 + 3);
                } else {
                    for (int64_t s = s0; s < S; s++) W4X_STEP(s);
                }
#undef W4X_STEP
                for (int t = 0; t < MB; t++) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p[t], ones16));
            }
            const __m256i z = _mm256_loadu_si256((const __m256i *)(section_zero(w, sec) + 8 * h));
            const __m256 sw = _mm256_loadu_ps(scale + 8 * h);
            for (int t = 0; t < MB; t++) {
                __m256i d =
                    _mm256_sub_epi32(acc[t], _mm256_mullo_epi32(z, _mm256_set1_epi32(A->asum[(m0 + t) * G + j])));
                float *o = out + t * MIX_RB + 8 * h;
                __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(A->sa[(m0 + t) * G + j]));
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), scale, _mm256_loadu_ps(o)));
            }
        }
    }
}

/* Expand tokens m0 .. m0+mb-1, groups j0 .. j1-1, into a tile's K block buffer (see kctx.x4). */
static AVX2_FN void expand_tile_avx2(const acts *A, int64_t m0, int mb, int64_t j0, int64_t j1, uint8_t *x4) {
    const int64_t Lp = A->Lp;
    for (int t = 0; t < mb; t++) {
        const int8_t *a = A->aq + ((m0 + t) * A->G + j0) * Lp; /* groups j0 .. j1-1 lie back to back */
        uint8_t *dst = x4 + 32 * t;
        for (int64_t q = 0; q < (j1 - j0) * Lp / 4; q++) {
            int32_t v;
            memcpy(&v, a + 4 * q, 4);
            _mm256_store_si256((__m256i *)(dst + 32 * MB_AVX2_X * q), _mm256_set1_epi32(v));
        }
    }
}

/* Instantiate each tile with compile-time token / half counts so the sums stay in registers. */
static __attribute__((target("avx512f,avx512bw,avx512vnni"))) void
rb_avx512(const kctx *c, int64_t rb, int64_t m0, int MB, int64_t j0, int64_t j1, float *out) {
    /* The tile width as a constant too: the activation operands are then fixed displacements from one
     * pointer (with A->tw at run time GCC computed an address per operand, some spilled to the stack). */
    const int full = c->A->tw == MB_AVX512;
    switch (MB) {
    case 8: rb_avx512_tile(c, rb, m0, 8, 8, j0, j1, out); break;
#define TILE(n)                                                   \
    case n:                                                       \
        if (full)                                                 \
            rb_avx512_tile(c, rb, m0, n, MB_AVX512, j0, j1, out); \
        else                                                      \
            rb_avx512_tile(c, rb, m0, n, n, j0, j1, out);         \
        break;
        TILE(7)
        TILE(6)
        TILE(5)
        TILE(4)
        TILE(3)
        TILE(2)
#undef TILE
    default:
        if (full)
            rb_avx512_tile(c, rb, m0, 1, MB_AVX512, j0, j1, out);
        else
            rb_avx512_tile(c, rb, m0, 1, 1, j0, j1, out);
        break;
    }
}
/* AVX2 through rb_all_tokens: 4-bit only at M = 1 (M >= 2 goes through w4x_avx2_tile), 8-bit at any M. */
static __attribute__((target("avx2,fma"))) void rb_avx2(const kctx *c, int64_t rb, int64_t m0, int MB, int64_t j0,
                                                        int64_t j1, float *out) {
    if (c->w->bits == 4) {
        w4_avx2_tile(c, rb, m0, 1, 2, j0, j1, out); /* MB == 1 */
        return;
    }
    switch (MB) {
    case 4: w8_avx2_tile(c, rb, m0, 4, 2, j0, j1, out); break;
    case 3: w8_avx2_tile(c, rb, m0, 3, 2, j0, j1, out); break;
    case 2: w8_avx2_tile(c, rb, m0, 2, 2, j0, j1, out); break;
    default: w8_avx2_tile(c, rb, m0, 1, 2, j0, j1, out); break;
    }
}
static __attribute__((target("avx2,fma"))) void rbx4_avx2(const kctx *c, int64_t rb, int64_t m0, int MB, int64_t j0,
                                                          int64_t j1, float *out) {
    switch (MB) {
    case 4: w4x_avx2_tile(c, rb, m0, 4, j0, j1, out); break;
    case 3: w4x_avx2_tile(c, rb, m0, 3, j0, j1, out); break;
    case 2: w4x_avx2_tile(c, rb, m0, 2, j0, j1, out); break;
    default: w4x_avx2_tile(c, rb, m0, 1, j0, j1, out); break;
    }
}

#endif

int mix_cpu_has(mix_impl impl) {
    switch (impl) {
    case MIX_IMPL_AUTO:
    case MIX_IMPL_PORTABLE: return 1;
#ifdef __x86_64__
    case MIX_IMPL_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case MIX_IMPL_AVX512VNNI:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    default: return 0;
    }
}

/* "auto" takes the AVX-512 VNNI path where the CPU has it, else AVX2, else portable C. Measured with
 * both paths forced on two VNNI CPUs, 2 threads (bench/results/cpu_linear_vnni_vs_avx2_2026-12-01.md):
 * on an Intel Xeon VNNI was faster at every M (4096x4096: 0.47 vs 0.71 ms at M = 1, 11.0 vs 24.8 ms at
 * M = 128); on an AMD Zen 4 equal within noise at M = 1 and 1.2-1.7x faster at M >= 4. */
static mix_impl resolve(mix_impl impl) {
    if (impl != MIX_IMPL_AUTO) return impl;
    if (mix_cpu_has(MIX_IMPL_AVX512VNNI)) return MIX_IMPL_AVX512VNNI;
    return mix_cpu_has(MIX_IMPL_AVX2) ? MIX_IMPL_AVX2 : MIX_IMPL_PORTABLE;
}

typedef void (*tile_fn)(const kctx *, int64_t rb, int64_t m0, int MB, int64_t j0, int64_t j1, float *out);

/* The tile of an implementation and its token count per tile for a part of `bits`. */
static tile_fn pick(mix_impl impl, int bits, int *mb) {
#ifdef __x86_64__
    if (impl == MIX_IMPL_AVX512VNNI) {
        *mb = MB_AVX512;
        return rb_avx512;
    }
    if (impl == MIX_IMPL_AVX2) {
        *mb = bits == 4 ? 1 : MB_AVX2_W8;
        return rb_avx2;
    }
#endif
    (void)bits;
    *mb = MB_PORTABLE;
    return rb_portable;
}

/* Row blocks per work item: contiguous runs keep the weight stream sequential (prefetch-friendly);
 * about 8 items per thread balance the load when a thread is descheduled on a shared machine. */
static int64_t rows_per_item(int64_t nb_total, int nthreads, int64_t M) {
    /* M >= 8 is compute-bound: smaller items, since the last one sets the finish (with 17 items of 16
     * row blocks on 2 threads, one thread did 9). */
    int64_t per = nb_total / ((M >= 8 ? 32 : 8) * (int64_t)nthreads);
    return per < 1 ? 1 : per > 16 ? 16 : per;
}

/* out[mb][16] (rows of row block rb, tokens m0 ..) + bias -> y, at the part's output columns. */
static void store_rows(const mix_cpu_weight *w, int64_t rb, int64_t m0, int64_t mb, const float *out, const float *bias,
                       void *y, int y_dtype, int64_t n_out) {
    int rows = w->N - rb * MIX_RB < MIX_RB ? (int)(w->N - rb * MIX_RB) : MIX_RB;
    const int64_t *cols = w->out_index ? w->out_index + rb * MIX_RB : NULL;
    if (y_dtype == MIX_F32) { /* the common case, without the per-element dtype switch */
        for (int64_t t = 0; t < mb; t++) {
            float *yrow = (float *)y + (m0 + t) * n_out;
            for (int r = 0; r < rows; r++) {
                int64_t col = cols ? cols[r] : rb * MIX_RB + r;
                yrow[col] = out[t * MIX_RB + r] + (bias ? bias[col] : 0.f);
            }
        }
        return;
    }
    for (int64_t t = 0; t < mb; t++)
        for (int r = 0; r < MIX_RB; r++) {
            int64_t n = rb * MIX_RB + r;
            if (n >= w->N) break;
            int64_t col = w->out_index ? w->out_index[n] : n;
            float v = out[t * MIX_RB + r] + (bias ? bias[col] : 0.f);
            mix_store_float(y, (mix_dtype)y_dtype, (m0 + t) * n_out + col, v);
        }
}

#ifdef __x86_64__
/* store_rows for float32 y on AVX-512: one masked store per token where the block's columns are
 * consecutive, else two 8-lane scatters (the scalar stores stalled: about 5% of a W4.4A8 call). */
static __attribute__((target("avx512f"))) void store_rows_avx512(const mix_cpu_weight *w, int64_t rb, int64_t m0,
                                                                 int64_t mb, const float *out, const float *bias,
                                                                 float *y, int64_t n_out) {
    int rows = w->N - rb * MIX_RB < MIX_RB ? (int)(w->N - rb * MIX_RB) : MIX_RB;
    const __mmask16 mask = (__mmask16)((1u << rows) - 1);
    int64_t c0 = w->out_index ? w->out_index[rb * MIX_RB] : rb * MIX_RB;
    int contiguous = 1;
    for (int r = 1; w->out_index && r < rows; r++) contiguous &= w->out_index[rb * MIX_RB + r] == c0 + r;
    if (contiguous) {
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
        for (int64_t t = 0; t < mb; t++)
            _mm512_mask_storeu_ps(y + (m0 + t) * n_out + c0, mask, _mm512_add_ps(_mm512_loadu_ps(out + t * MIX_RB), b));
        return;
    }
    const int64_t *cols = w->out_index + rb * MIX_RB;
    int ascending = 1;
    for (int r = 1; r < rows; r++) ascending &= cols[r] > cols[r - 1];
    if (ascending && cols[rows - 1] - c0 < 32) {
        /* Ascending columns within 32 of the first (a 4-bit block of a mixed layer: the 8-bit rows leave
         * gaps): each half of that window takes its values in order by an expand, then a masked store. */
        uint32_t win = 0;
        for (int r = 0; r < rows; r++) win |= 1u << (cols[r] - c0);
        const __mmask16 m_lo = (__mmask16)(win & 0xffff), m_hi = (__mmask16)(win >> 16);
        const __m512i shift = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(__builtin_popcount(win & 0xffff)));
        const __m512 b_lo = bias ? _mm512_maskz_loadu_ps(m_lo, bias + c0) : _mm512_setzero_ps();
        const __m512 b_hi = bias ? _mm512_maskz_loadu_ps(m_hi, bias + c0 + 16) : _mm512_setzero_ps();
        for (int64_t t = 0; t < mb; t++) {
            const __m512 v = _mm512_loadu_ps(out + t * MIX_RB);
            float *yw = y + (m0 + t) * n_out + c0;
            _mm512_mask_storeu_ps(yw, m_lo, _mm512_add_ps(_mm512_maskz_expand_ps(m_lo, v), b_lo));
            if (m_hi)
                _mm512_mask_storeu_ps(
                    yw + 16, m_hi, _mm512_add_ps(_mm512_maskz_expand_ps(m_hi, _mm512_permutexvar_ps(shift, v)), b_hi));
        }
        return;
    }
    const __m512i lo = _mm512_maskz_loadu_epi64((__mmask8)mask, w->out_index + rb * MIX_RB);
    const __m512i hi = _mm512_maskz_loadu_epi64((__mmask8)(mask >> 8), w->out_index + rb * MIX_RB + 8);
    __m512 b = _mm512_setzero_ps();
    if (bias)
        b = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(
                _mm512_castps256_ps512(_mm512_mask_i64gather_ps(_mm256_setzero_ps(), (__mmask8)mask, lo, bias, 4))),
            _mm256_castps_pd(_mm512_mask_i64gather_ps(_mm256_setzero_ps(), (__mmask8)(mask >> 8), hi, bias, 4)), 1));
    for (int64_t t = 0; t < mb; t++) {
        __m512 v = _mm512_add_ps(_mm512_loadu_ps(out + t * MIX_RB), b);
        float *yrow = y + (m0 + t) * n_out;
        _mm512_mask_i64scatter_ps(yrow, (__mmask8)mask, lo, _mm512_castps512_ps256(v), 4);
        _mm512_mask_i64scatter_ps(yrow, (__mmask8)(mask >> 8), hi,
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), 4);
    }
}
#endif

/* Write-prefetch the lines of y that store_rows will write for tokens m0 .. m0+mb-1: y is larger than
 * L2 and its lines come from memory (an RFO per line), which stalled the scalar stores. */
static void prefetch_y(const mix_cpu_weight *w, int64_t rb, int64_t m0, int64_t mb, void *y, int y_dtype,
                       int64_t n_out) {
    int rows = w->N - rb * MIX_RB < MIX_RB ? (int)(w->N - rb * MIX_RB) : MIX_RB;
    const int64_t *cols = w->out_index ? w->out_index + rb * MIX_RB : NULL;
    const int64_t es = y_dtype == MIX_F32 ? 4 : 2;
    for (int64_t t = 0; t < mb; t++) {
        const char *yrow = (const char *)y + (m0 + t) * n_out * es;
        uintptr_t last = 0;
        for (int r = 0; r < rows; r++) {
            const char *p = yrow + (cols ? cols[r] : rb * MIX_RB + r) * es;
            if ((uintptr_t)p / MIX_CACHE_LINE == last) continue;
            last = (uintptr_t)p / MIX_CACHE_LINE;
            __builtin_prefetch(p, 1, 3);
        }
    }
}

/* Row block rb of part w for tokens m_lo .. m_hi-1 (m_lo starts a tile): one K block of its weights
 * (KC_BYTES) at a time stays in L1 while the token tiles sweep over it. out: MC * 16 floats of scratch. */
static void rb_all_tokens(const mix_cpu_weight *w, const acts *A, int64_t rb, int64_t m_lo, int64_t m_hi, mix_impl impl,
                          float *out, const float *bias, void *y, int y_dtype, int64_t n_out) {
    int MB;
    tile_fn tile = pick(impl, w->bits, &MB);
    const char *pf = NULL;
    kctx c = {w, A, NULL, 0, &pf, NULL};
    const int vnni = impl == MIX_IMPL_AVX512VNNI;
    const int64_t kcb = vnni ? KC_BYTES_VNNI : KC_BYTES;
    const int64_t G = w->G, kc = kcb / w->section > 1 ? kcb / w->section : 1;
    for (int64_t mc0 = m_lo; mc0 < m_hi; mc0 += MC) {
        const int64_t mcn = m_hi - mc0 < MC ? m_hi - mc0 : MC;
        memset(out, 0, (size_t)mcn * MIX_RB * sizeof(float));
        for (int64_t j0 = 0; j0 < G; j0 += kc) /* K blocks in order: the float steps stay ordered */
            for (int64_t m0 = mc0; m0 < mc0 + mcn; m0 += MB) {
                int mb = (int)(mc0 + mcn - m0 < MB ? mc0 + mcn - m0 : MB);
                if (vnni && mcn > MB && m0 == mc0) { /* the next K block (or row block), within the blob */
                    const int64_t end = (w->N + MIX_RB - 1) / MIX_RB * G, s0 = rb * G + j0 + kc;
                    const int64_t s1 = s0 + kc < end ? s0 + kc : end;
                    pf = (const char *)w->blob + (s0 < end ? s0 : end) * w->section;
                    c.pf_end = (const char *)w->blob + s1 * w->section;
                }
                /* VNNI: each tile's outputs are stored as soon as they are final, their lines of y
                 * write-prefetched (y is larger than L2: an RFO per line stalled the stores). */
                const int last = vnni && j0 + kc >= G;
                if (last) prefetch_y(w, rb, m0, mb, y, y_dtype, n_out);
                tile(&c, rb, m0, mb, j0, j0 + kc < G ? j0 + kc : G, out + (m0 - mc0) * MIX_RB);
                if (last && y_dtype == MIX_F32)
                    store_rows_avx512(w, rb, m0, mb, out + (m0 - mc0) * MIX_RB, bias, y, n_out);
                else if (last)
                    store_rows(w, rb, m0, mb, out + (m0 - mc0) * MIX_RB, bias, y, y_dtype, n_out);
            }
        if (!vnni) store_rows(w, rb, mc0, mcn, out, bias, y, y_dtype, n_out);
    }
}

int mix_cpu_qlinear(const void *x, int x_dtype, int64_t M, int64_t K, int64_t g, const mix_cpu_weight *parts,
                    int nparts, const float *bias, void *y, int y_dtype, int64_t n_out, mix_impl impl) {
    if (M == 0 || n_out == 0) return 0;
    int64_t G = mix_ngroups(K, g), Lp = (g + MIX_K_ALIGN - 1) / MIX_K_ALIGN * MIX_K_ALIGN;
    impl = resolve(impl);
    const int vnni = impl == MIX_IMPL_AVX512VNNI;
    const int64_t tw = M < MB_AVX512 ? M : MB_AVX512, mpad = (M + tw - 1) / tw * tw;
    acts A = {malloc((size_t)(M * G * Lp)),
              malloc((size_t)(mpad * G) * sizeof(float)),
              malloc((size_t)(mpad * G) * sizeof(int32_t)),
              G,
              Lp,
              vnni ? malloc((size_t)(mpad * G * Lp)) : NULL,
              tw,
              vnni && Lp <= 256 ? malloc((size_t)(mpad * G) * sizeof(int32_t)) : NULL,
              vnni ? malloc((size_t)(mpad * G) * sizeof(int32_t)) : NULL};
    if (!A.aq || !A.sa || !A.asum || (vnni && !A.ap) || (vnni && Lp <= 256 && !A.zq) || (vnni && !A.n128)) {
        free(A.aq);
        free(A.sa);
        free(A.asum);
        free(A.ap);
        free(A.zq);
        free(A.n128);
        return -2;
    }
    int simd_prep = impl != MIX_IMPL_PORTABLE && mix_cpu_has(MIX_IMPL_AVX2);
    int64_t nb[8], nb_total = 0;
    for (int p = 0; p < nparts; p++) {
        nb[p] = (parts[p].N + MIX_RB - 1) / MIX_RB;
        nb_total += nb[p];
    }
    /* VNNI at M >= 8 with several parts: row blocks in order of their first output column (a merge of
     * the parts), so that a block's lines of y are still cached from its neighbours' stores (the 8-bit
     * part's blocks spread over ten times the columns of a 4-bit one). */
    int32_t *order = NULL;
    if (impl == MIX_IMPL_AVX512VNNI && M >= 8 && nparts > 1 && (order = malloc((size_t)nb_total * sizeof(int32_t)))) {
        int64_t next[8] = {0}, base[8];
        for (int p = 0, b = 0; p < nparts; b += (int)nb[p], p++) base[p] = b;
        for (int64_t i = 0; i < nb_total; i++) {
            int best = -1;
            int64_t key = 0;
            for (int p = 0; p < nparts; p++) {
                if (next[p] >= nb[p]) continue;
                int64_t k = parts[p].out_index ? parts[p].out_index[next[p] * MIX_RB] : next[p] * MIX_RB;
                if (best < 0 || k < key) best = p, key = k;
            }
            order[i] = (int32_t)(base[best] + next[best]++);
        }
    }
    /* Small layers run on fewer threads: waking a thread (worse: waiting for a descheduled one on a
     * loaded machine) costs more than it saves. */
    double macs = (double)M * (double)n_out * (double)K;
    int nthreads = omp_get_max_threads();
    if (macs < (double)MACS_PER_THREAD * nthreads) nthreads = (int)(macs / MACS_PER_THREAD) + 1;
    if (nthreads > nb_total) nthreads = (int)nb_total;
    if (nthreads < 1) nthreads = 1;
    int64_t per = rows_per_item(nb_total, nthreads, impl == MIX_IMPL_AVX512VNNI ? M : 1),
            items = (nb_total + per - 1) / per;
    /* AVX2 at M >= 2: K blocks of expanded activations (kctx.x4), per thread; float sums of MC_X tokens.
     * An item's expansion serves its row blocks: items of up to 16 row blocks, 2 or more per thread. */
    const int expanded = impl == MIX_IMPL_AVX2 && M >= 2;
    if (expanded && nb_total / (2 * nthreads) > per) {
        per = nb_total / (2 * nthreads) < 16 ? nb_total / (2 * nthreads) : 16;
        items = (nb_total + per - 1) / per;
    }
    /* VNNI at M >= 16 on layers of few row blocks: items split the tokens too (whole tiles of 8), so
     * that the threads get about equal shares (the 13 row blocks of 192x576 left one of 2 threads 7). */
    int64_t mchunk = M;
    if (vnni && M >= 16 && nthreads > 1 && nb_total < 32 * nthreads) {
        const int64_t want = (32 * nthreads + nb_total - 1) / nb_total; /* token chunks per row block */
        mchunk = ((M + want - 1) / want + MB_AVX512 - 1) / MB_AVX512 * MB_AVX512;
    }
    const int64_t nmc = (M + mchunk - 1) / mchunk;
    const int64_t mcx = M < MC_X ? M : MC_X;
    float *xout = NULL; /* per thread: float sums [row block of the item][token of the pass][16] */
    if (expanded && !(xout = malloc((size_t)nthreads * 16 * (size_t)mcx * MIX_RB * sizeof(float)))) {
        free(order);
        free(A.aq);
        free(A.sa);
        free(A.asum);
        free(A.ap);
        free(A.zq);
        free(A.n128);
        return -2;
    }
    int bad = 0;
    /* Few activations (decode): quantized here, before the team starts, so that no thread waits at a
     * barrier for another's wake-up (on a busy machine, a descheduled thread's share took ms). */
    const int serial_prep = (double)M * (double)K <= PREP_SERIAL_VALUES;
    for (int64_t mj = 0; serial_prep && mj < M * G; mj++)
        bad |= prepare_group(x, x_dtype, K, g, mj / G, mj % G, &A, simd_prep);
#pragma omp parallel num_threads(nthreads)
    {
        if (!serial_prep) {
            int my_bad = 0;
#pragma omp for schedule(static)
            for (int64_t mj = 0; mj < M * G; mj++) /* by (token, group) */
                my_bad |= prepare_group(x, x_dtype, K, g, mj / G, mj % G, &A, simd_prep);
            if (my_bad) {
#pragma omp atomic write
                bad = 1;
            }
#pragma omp barrier
        }
        int stop;
#pragma omp atomic read
        stop = bad;
#ifdef __x86_64__
        if (!stop && expanded) {
            /* Per item, pass of MC_X tokens and K block, each token tile's activations are expanded once
             * into x4 (L1) and serve every row block of the item (<= 16), whose weights of the K block
             * stay in L2 across the tiles. */
            _Alignas(64) uint8_t x4[XK_BYTES];
            float out8[MC * MIX_RB];
            const int64_t kcg = XK_BYTES / (MB_AVX2_X * Lp * 8) > 1 ? XK_BYTES / (MB_AVX2_X * Lp * 8) : 1;
            float *out = xout + (size_t)omp_get_thread_num() * 16 * (size_t)mcx * MIX_RB;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < items; item++) {
                const int64_t b0 = item * per;
                int64_t b1 = (item + 1) * per < nb_total ? (item + 1) * per : nb_total;
                int pb[16];
                int64_t rbb[16], n4 = 0;
                for (int64_t b = b0; b < b1; b++) {
                    int p = 0;
                    int64_t rb = b;
                    while (rb >= nb[p]) {
                        rb -= nb[p];
                        p++;
                    }
                    if (parts[p].bits == 8) { /* measured faster with its weights in L1 and broadcasts */
                        rb_all_tokens(&parts[p], &A, rb, 0, M, impl, out8, bias, y, y_dtype, n_out);
                        continue;
                    }
                    pb[n4] = p;
                    rbb[n4++] = rb;
                }
                b1 = b0 + n4; /* the 4-bit row blocks, renumbered from b0 */
                for (int64_t mc0 = 0; mc0 < M && n4; mc0 += mcx) {
                    const int64_t mcn = M - mc0 < mcx ? M - mc0 : mcx;
                    memset(out, 0, (size_t)(b1 - b0) * (size_t)mcn * MIX_RB * sizeof(float));
                    for (int64_t j0 = 0; j0 < G; j0 += kcg) { /* K blocks in order: the float steps stay ordered */
                        const int64_t j1 = j0 + kcg < G ? j0 + kcg : G;
                        for (int64_t m0 = mc0; m0 < mc0 + mcn; m0 += MB_AVX2_X) {
                            const int mb = (int)(mc0 + mcn - m0 < MB_AVX2_X ? mc0 + mcn - m0 : MB_AVX2_X);
                            expand_tile_avx2(&A, m0, mb, j0, j1, x4);
                            for (int64_t b = b0; b < b1; b++) {
                                /* Prefetch into L2 the weights the next K block will read, a slice per
                                 * tile, so the memory stream overlaps all tiles' work (the first K block:
                                 * the next row block's, during the first tile). */
                                const mix_cpu_weight *wp = &parts[pb[b - b0]];
                                const int64_t ntl = (mcn + MB_AVX2_X - 1) / MB_AVX2_X, tl = (m0 - mc0) / MB_AVX2_X;
                                const char *nx = NULL;
                                int64_t lo = 0, hi = 0;
                                if (j1 < G) {
                                    const int64_t bytes = ((j1 + kcg < G ? j1 + kcg : G) - j1) * wp->section;
                                    nx = (const char *)wp->blob + (rbb[b - b0] * G + j1) * wp->section;
                                    lo = bytes * tl / ntl;
                                    hi = bytes * (tl + 1) / ntl;
                                }
                                if (j0 == 0 && m0 == mc0 && b + 1 < b1) {
                                    const mix_cpu_weight *wn = &parts[pb[b + 1 - b0]];
                                    for (int64_t o = 0; o < j1 * wn->section; o += MIX_CACHE_LINE)
                                        _mm_prefetch((const char *)wn->blob + rbb[b + 1 - b0] * G * wn->section + o,
                                                     _MM_HINT_T1);
                                }
                                for (int64_t o = lo; o < hi; o += MIX_CACHE_LINE) _mm_prefetch(nx + o, _MM_HINT_T1);
                                kctx c = {wp, &A, x4, j0, NULL, NULL};
                                rbx4_avx2(&c, rbb[b - b0], m0, mb, j0, j1,
                                          out + ((b - b0) * mcn + (m0 - mc0)) * MIX_RB);
                            }
                        }
                    }
                    for (int64_t b = b0; b < b1; b++)
                        store_rows(&parts[pb[b - b0]], rbb[b - b0], mc0, mcn, out + (b - b0) * mcn * MIX_RB, bias, y,
                                   y_dtype, n_out);
                }
            }
        } else
#endif
            if (!stop) {
            /* Every output column belongs to exactly one part's row: rows write, nobody accumulates. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < items * nmc; it++) {
                float out[MC * MIX_RB];
                const int64_t item = it / nmc, m_lo = it % nmc * mchunk, m_hi = m_lo + mchunk < M ? m_lo + mchunk : M;
                for (int64_t b = item * per; b < (item + 1) * per && b < nb_total; b++) {
                    int p = 0;
                    int64_t rb = order ? order[b] : b;
                    while (rb >= nb[p]) {
                        rb -= nb[p];
                        p++;
                    }
                    rb_all_tokens(&parts[p], &A, rb, m_lo, m_hi, impl, out, bias, y, y_dtype, n_out);
                }
            }
        }
    }
    free(xout);
    free(order);
    free(A.aq);
    free(A.sa);
    free(A.asum);
    free(A.ap);
    free(A.zq);
    free(A.n128);
    return bad ? -1 : 0;
}
