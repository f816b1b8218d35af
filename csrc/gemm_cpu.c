/* CPU W4A8 / W8A8 / mixed linear (docs/spec.md §2, §5).
 *
 * Math: y[m,n] = sum_j Sw[n,j] Sa[m,j] * sum_{k in j} (Wq[n,k] - z[n,j]) Aq[m,k].
 * Activations are quantized once per call (int8 per token and group) and stored shifted
 * to unsigned (Aq + 128) because the x86 int8 dot products take one unsigned operand;
 * the shift adds 128 * sum_k (Wq - z) per row and group, precomputed at packing time
 * ("corr") and subtracted from the int32 sum before the float scaling.
 *
 * Prepacked layout, per row block of 16 rows and per group j (one contiguous section):
 *   weights  4-bit: Lp/8 steps x 64 bytes; byte 4*r+i = code[r, k+i] | code[r, k+4+i] << 4
 *            8-bit: Lp/4 steps x 64 bytes; byte 4*r+i = int8 w[r, k+i]
 *   zvec     64 bytes: zero point of row r repeated 4 times (4-bit; 0 for 8-bit)
 *   corr     16 int32: 128 * sum_k (Wq - z) of row r (padding contributes 0)
 *   scale    16 float32: Sw[r, j]
 * Padding (rows past N, k past the group's end) stores code = zero point, i.e. weight 0.
 *
 * Three implementations read it: portable C (the oracle for the SIMD ones), AVX2
 * (maddubs) and AVX-512 VNNI (vpdpbusd); chosen at run time with __builtin_cpu_supports. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "gemm_cpu.h"
#include "quant.h"
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __x86_64__
#include <immintrin.h>
#endif

#define MB_MAX 8 /* tokens per register tile */

void mix_cpu_weight_geometry(int bits, int64_t N, int64_t K, int64_t g, mix_cpu_weight *w) {
    memset(w, 0, sizeof(*w));
    w->bits = bits; w->N = N; w->K = K; w->g = g;
    w->G = mix_ngroups(K, g);
    w->Lp = g > INT64_MAX / 64 ? -1 : (g + 7) / 8 * 8;
    w->section = w->Lp < 0 ? -1 : (bits == 4 ? w->Lp * MIX_RB / 2 : w->Lp * MIX_RB) + 192;
}

int64_t mix_cpu_blob_bytes(const mix_cpu_weight *w) { /* -1 when the size does not fit int64 */
    int64_t nb = w->N / MIX_RB + (w->N % MIX_RB != 0), r;
    if (w->N < 0 || w->G < 0 || w->section < 0 || __builtin_mul_overflow(nb, w->G, &r) ||
        __builtin_mul_overflow(r, w->section, &r))
        return -1;
    return r;
}

void mix_cpu_prepack(mix_cpu_weight *w, const void *codes, const float *scale, const uint8_t *zero, uint8_t *blob) {
    int64_t NB = (w->N + MIX_RB - 1) / MIX_RB, G = w->G, K = w->K, g = w->g, Lp = w->Lp;
    int64_t wbytes = w->section - 192;
#pragma omp parallel for schedule(static)
    for (int64_t rb = 0; rb < NB; rb++)
        for (int64_t j = 0; j < G; j++) {
            uint8_t *sec = blob + (rb * G + j) * w->section;
            memset(sec, 0, (size_t)w->section);
            int32_t corr[MIX_RB];
            float sw[MIX_RB];
            for (int r = 0; r < MIX_RB; r++) {
                int64_t n = rb * MIX_RB + r;
                int valid = n < w->N;
                int z = (valid && w->bits == 4) ? zero[n * G + j] : 0;
                int32_t sum = 0;
                for (int64_t kk = 0; kk < Lp; kk++) {
                    int64_t k = j * g + kk;
                    int in = valid && kk < g && k < K;
                    int c;
                    if (w->bits == 4) c = in ? ((const uint8_t *)codes)[n * K + k] : z;
                    else c = in ? ((const int8_t *)codes)[n * K + k] : 0;
                    sum += c - z;
                    if (w->bits == 4) {
                        int64_t step = kk / 8, i = kk % 8;
                        uint8_t *b = sec + step * 64 + 4 * r + (i & 3);
                        *b |= (uint8_t)((c & 15) << (i < 4 ? 0 : 4));
                    } else {
                        sec[(kk / 4) * 64 + 4 * r + (kk % 4)] = (uint8_t)(int8_t)c;
                    }
                }
                for (int i = 0; i < 4; i++) sec[wbytes + 4 * r + i] = (uint8_t)z;
                corr[r] = 128 * sum;
                sw[r] = valid ? scale[n * G + j] : 0.f;
            }
            memcpy(sec + wbytes + 64, corr, sizeof corr);
            memcpy(sec + wbytes + 128, sw, sizeof sw);
        }
}

/* ---- activation preparation: codes + 128 in [M][G][Lp], padding = 128 (value 0) ---- */
static int prepare_activations(const void *x, int dt, int64_t M, int64_t K, int64_t g, int64_t Lp,
                               uint8_t *au8, float *sa) {
    int64_t G = mix_ngroups(K, g);
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
    for (int64_t m = 0; m < M; m++) {
        float buf[4096];
        for (int64_t j = 0; j < G; j++) {
            int64_t k0 = j * g, len = (k0 + g < K ? g : K - k0);
            uint8_t *dst = au8 + (m * G + j) * Lp;
            float amax = 0.f;
            for (int64_t c0 = 0; c0 < len; c0 += 4096) { /* groups longer than buf: two passes */
                int64_t c1 = c0 + 4096 < len ? c0 + 4096 : len;
                for (int64_t c = c0; c < c1; c++) {
                    float v = mix_load_float(x, (mix_dtype)dt, m * K + k0 + c);
                    if (!isfinite(v)) bad = 1;
                    amax = fmaxf(amax, fabsf(v));
                }
            }
            float s = mix_sym_scale(amax, 8);
            sa[m * G + j] = s;
            for (int64_t c0 = 0; c0 < len; c0 += 4096) {
                int64_t c1 = c0 + 4096 < len ? c0 + 4096 : len;
                for (int64_t c = c0; c < c1; c++) buf[c - c0] = mix_load_float(x, (mix_dtype)dt, m * K + k0 + c);
                for (int64_t c = c0; c < c1; c++) dst[c] = (uint8_t)(mix_sym_code(buf[c - c0], s, 8) + 128);
            }
            memset(dst + len, 128, (size_t)(Lp - len));
        }
    }
    return bad ? -1 : 0;
}

/* ---- kernels: one row block x MB tokens -> out[MB][16] float ---- */
typedef struct {
    const mix_cpu_weight *w;
    const uint8_t *au8; /* [M][G][Lp] */
    const float *sa;    /* [M][G] */
} kctx;

static void rb_portable(const kctx *c, int64_t rb, int64_t m0, int MB, float *out) {
    const mix_cpu_weight *w = c->w;
    int64_t G = w->G, Lp = w->Lp, wbytes = w->section - 192;
    for (int t = 0; t < MB; t++)
        for (int r = 0; r < MIX_RB; r++) out[t * MIX_RB + r] = 0.f;
    for (int64_t j = 0; j < G; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        int32_t corr[MIX_RB];
        float sw[MIX_RB];
        memcpy(corr, sec + wbytes + 64, sizeof corr);
        memcpy(sw, sec + wbytes + 128, sizeof sw);
        for (int t = 0; t < MB; t++) {
            const uint8_t *a = c->au8 + ((m0 + t) * G + j) * Lp;
            float s_a = c->sa[(m0 + t) * G + j];
            for (int r = 0; r < MIX_RB; r++) {
                int32_t acc = 0, z = sec[wbytes + 4 * r];
                for (int64_t kk = 0; kk < Lp; kk++) {
                    int wv;
                    if (w->bits == 4) {
                        uint8_t b = sec[(kk / 8) * 64 + 4 * r + (kk & 3)];
                        wv = ((kk % 8) < 4 ? (b & 15) : (b >> 4)) - z;
                    } else {
                        wv = (int8_t)sec[(kk / 4) * 64 + 4 * r + (kk % 4)];
                    }
                    acc = (int32_t)((uint32_t)acc + (uint32_t)((int32_t)a[kk] * wv)); /* wraps like vpdpbusd */
                }
                out[t * MIX_RB + r] += (float)(int32_t)((uint32_t)acc - (uint32_t)corr[r]) * (sw[r] * s_a);
            }
        }
    }
}

#ifdef __x86_64__
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline
static AVX512_TARGET void rb_avx512_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, float *out) {
    const mix_cpu_weight *w = c->w;
    int64_t G = w->G, Lp = w->Lp, wbytes = w->section - 192;
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 accf[MB_MAX];
    for (int t = 0; t < MB; t++) accf[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; j++) {
        const uint8_t *sec = w->blob + (rb * G + j) * w->section;
        const __m512i zv = _mm512_loadu_si512(sec + wbytes);
        __m512i acc[MB_MAX];
        for (int t = 0; t < MB; t++) acc[t] = _mm512_setzero_si512();
        const uint8_t *a0 = c->au8 + (m0 * G + j) * Lp;
        const int64_t astride = G * Lp;
        if (w->bits == 4) {
            for (int64_t s = 0; s < Lp / 8; s++) {
                __m512i v = _mm512_loadu_si512(sec + 64 * s);
                __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low4), zv);
                __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), zv);
                for (int t = 0; t < MB; t++) {
                    const uint8_t *a = a0 + t * astride + 8 * s;
                    int32_t a_lo, a_hi;
                    memcpy(&a_lo, a, 4);
                    memcpy(&a_hi, a + 4, 4);
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(a_lo), lo);
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(a_hi), hi);
                }
            }
        } else {
            for (int64_t s = 0; s < Lp / 4; s++) {
                __m512i v = _mm512_loadu_si512(sec + 64 * s);
                for (int t = 0; t < MB; t++) {
                    int32_t av;
                    memcpy(&av, a0 + t * astride + 4 * s, 4);
                    acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(av), v);
                }
            }
        }
        const __m512i corr = _mm512_loadu_si512(sec + wbytes + 64);
        const __m512 sw = _mm512_loadu_ps((const float *)(sec + wbytes + 128));
        for (int t = 0; t < MB; t++) {
            __m512 scale = _mm512_mul_ps(sw, _mm512_set1_ps(c->sa[(m0 + t) * G + j]));
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t], corr)), scale, accf[t]);
        }
    }
    for (int t = 0; t < MB; t++) _mm512_storeu_ps(out + t * MIX_RB, accf[t]);
}

#define AVX2_TARGET __attribute__((target("avx2,fma"), always_inline)) inline
/* AVX2 has no u8 x s8 -> int32 dot: maddubs (to saturating int16) then madd with ones.
 * 4-bit: |(a+128) * (q-z)| * 2 <= 255 * 15 * 2 fits int16. 8-bit would saturate, so the
 * 8-bit path uses signed activations and the sign trick |w| * sign(a, w) instead (no corr). */
static AVX2_TARGET void rb_avx2_tile(const kctx *c, int64_t rb, int64_t m0, const int MB, float *out) {
    const mix_cpu_weight *w = c->w;
    int64_t G = w->G, Lp = w->Lp, wbytes = w->section - 192;
    const __m256i low4 = _mm256_set1_epi8(15), ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    for (int half = 0; half < 2; half++) { /* rows 0-7, then 8-15: 32 bytes each */
        __m256 accf[MB_MAX];
        for (int t = 0; t < MB; t++) accf[t] = _mm256_setzero_ps();
        for (int64_t j = 0; j < G; j++) {
            const uint8_t *sec = w->blob + (rb * G + j) * w->section;
            const __m256i zv = _mm256_loadu_si256((const __m256i *)(sec + wbytes + 32 * half));
            __m256i acc[MB_MAX];
            for (int t = 0; t < MB; t++) acc[t] = _mm256_setzero_si256();
            const uint8_t *a0 = c->au8 + (m0 * G + j) * Lp;
            const int64_t astride = G * Lp;
            if (w->bits == 4) {
                for (int64_t s = 0; s < Lp / 8; s++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(sec + 64 * s + 32 * half));
                    __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, low4), zv);
                    __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), zv);
                    for (int t = 0; t < MB; t++) {
                        const uint8_t *a = a0 + t * astride + 8 * s;
                        int32_t a_lo, a_hi;
                        memcpy(&a_lo, a, 4);
                        memcpy(&a_hi, a + 4, 4);
                        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(a_lo), lo),
                                                     _mm256_maddubs_epi16(_mm256_set1_epi32(a_hi), hi));
                        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones16));
                    }
                }
            } else {
                for (int64_t s = 0; s < Lp / 4; s++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(sec + 64 * s + 32 * half));
                    __m256i av = _mm256_abs_epi8(v);
                    for (int t = 0; t < MB; t++) {
                        int32_t a4;
                        memcpy(&a4, a0 + t * astride + 4 * s, 4);
                        __m256i as = _mm256_xor_si256(_mm256_set1_epi32(a4), flip); /* back to signed */
                        __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(as, v));
                        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones16));
                    }
                }
            }
            const __m256i corr = w->bits == 4 ? _mm256_loadu_si256((const __m256i *)(sec + wbytes + 64 + 32 * half))
                                              : _mm256_setzero_si256();
            const __m256 sw = _mm256_loadu_ps((const float *)(sec + wbytes + 128) + 8 * half);
            for (int t = 0; t < MB; t++) {
                __m256 scale = _mm256_mul_ps(sw, _mm256_set1_ps(c->sa[(m0 + t) * G + j]));
                accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t], corr)), scale, accf[t]);
            }
        }
        for (int t = 0; t < MB; t++) _mm256_storeu_ps(out + t * MIX_RB + 8 * half, accf[t]);
    }
}

/* Instantiate each tile with a compile-time token count so the accumulators stay in registers. */
#define TILE_VARIANTS(NAME, TILE, TARGET)                                                         \
    static __attribute__((target(TARGET))) void NAME(const kctx *c, int64_t rb, int64_t m0, int MB, \
                                                     float *out) {                                \
        switch (MB) {                                                                             \
        case 8: TILE(c, rb, m0, 8, out); break;                                                   \
        case 7: TILE(c, rb, m0, 7, out); break;                                                   \
        case 6: TILE(c, rb, m0, 6, out); break;                                                   \
        case 5: TILE(c, rb, m0, 5, out); break;                                                   \
        case 4: TILE(c, rb, m0, 4, out); break;                                                   \
        case 3: TILE(c, rb, m0, 3, out); break;                                                   \
        case 2: TILE(c, rb, m0, 2, out); break;                                                   \
        default: TILE(c, rb, m0, 1, out); break;                                                  \
        }                                                                                         \
    }
TILE_VARIANTS(rb_avx512, rb_avx512_tile, "avx512f,avx512bw,avx512vnni")
TILE_VARIANTS(rb_avx2, rb_avx2_tile, "avx2,fma")
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

typedef void (*tile_fn)(const kctx *, int64_t, int64_t, int, float *);

static tile_fn pick(mix_impl impl) {
#ifdef __x86_64__
    if (impl == MIX_IMPL_AUTO) impl = mix_cpu_has(MIX_IMPL_AVX512VNNI) ? MIX_IMPL_AVX512VNNI
                                    : mix_cpu_has(MIX_IMPL_AVX2) ? MIX_IMPL_AVX2 : MIX_IMPL_PORTABLE;
    if (impl == MIX_IMPL_AVX512VNNI) return rb_avx512;
    if (impl == MIX_IMPL_AVX2) return rb_avx2;
#endif
    (void)impl;
    return rb_portable;
}

int mix_cpu_qlinear(const void *x, int x_dtype, int64_t M, int64_t K, int64_t g, const mix_cpu_weight *parts,
                    int nparts, const float *bias, void *y, int y_dtype, int64_t n_out, mix_impl impl) {
    if (M == 0 || n_out == 0) return 0;
    int64_t G = mix_ngroups(K, g), Lp = (g + 7) / 8 * 8;
    uint8_t *au8 = malloc((size_t)(M * G * Lp));
    float *sa = malloc((size_t)(M * G) * sizeof(float));
    if (!au8 || !sa) { free(au8); free(sa); return -2; }
    if (prepare_activations(x, x_dtype, M, K, g, Lp, au8, sa) < 0) { free(au8); free(sa); return -1; }
    tile_fn tile = pick(impl);
    int64_t nb[8], nb_total = 0;
    for (int p = 0; p < nparts; p++) { nb[p] = (parts[p].N + MIX_RB - 1) / MIX_RB; nb_total += nb[p]; }
    /* Every output column belongs to exactly one part's row: rows write, nobody accumulates. */
#pragma omp parallel for schedule(dynamic, 2)
    for (int64_t item = 0; item < nb_total; item++) {
        int p = 0;
        int64_t rb = item;
        while (rb >= nb[p]) { rb -= nb[p]; p++; }
        const mix_cpu_weight *w = &parts[p];
        kctx c = {w, au8, sa};
        float out[MB_MAX * MIX_RB];
        for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
            int MB = (int)(M - m0 < MB_MAX ? M - m0 : MB_MAX);
            tile(&c, rb, m0, MB, out);
            for (int t = 0; t < MB; t++)
                for (int r = 0; r < MIX_RB; r++) {
                    int64_t n = rb * MIX_RB + r;
                    if (n >= w->N) break;
                    int64_t col = w->out_index ? w->out_index[n] : n;
                    float v = out[t * MIX_RB + r] + (bias ? bias[col] : 0.f);
                    mix_store_float(y, (mix_dtype)y_dtype, (m0 + t) * n_out + col, v);
                }
        }
    }
    free(au8);
    free(sa);
    return 0;
}
