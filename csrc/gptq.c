/* GPTQ in plain C, float64 throughout (K x K Cholesky of the damped Hessian, its inverse,
 * and the upper Cholesky factor U of that inverse; then each row's columns are quantized
 * in order, pushing each column's error onto the columns after it through U).
 * Rows are independent given U, so work is split into chunks of rows; each chunk runs the
 * "lazy batch" schedule (updates inside a 128-column block, then one rank-128 update of
 * the rest) so that U is streamed once per chunk. */
#include "dlpack_bridge.h" /* first: it includes Python.h */
#include "gptq.h"
#include "quant.h"
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define ROW_CHUNK 16
#define COL_BLOCK 128

/* Choose scale/zero for one row's group (values v[0..len), weights d or NULL), with an
 * optional search over shrunken ranges minimising sum d_k (deq(q(v_k)) - v_k)^2. */
static void group_params(const double *v, const double *d, int64_t len, int bits, int sym, int grid, float *scale,
                         uint8_t *zero) {
    float lo = INFINITY, hi = -INFINITY, amax = 0.f;
    for (int64_t k = 0; k < len; k++) {
        float x = (float)v[k];
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
        amax = fmaxf(amax, fabsf(x));
    }
    double best = INFINITY;
    for (int i = 0; i <= grid; i++) {
        float p = 1.f - (float)i / 100.f, s;
        uint8_t z = 0;
        if (sym)
            s = mix_sym_scale(amax * p, bits);
        else
            mix_asym_params(lo * p, hi * p, bits, &s, &z);
        double err = 0;
        if (grid > 0)
            for (int64_t k = 0; k < len; k++) {
                float x = (float)v[k];
                double dq = sym ? (double)mix_sym_code(x, s, bits) * s : ((double)mix_asym_code(x, s, z, bits) - z) * s;
                err += (d ? d[k] : 1.0) * (dq - v[k]) * (dq - v[k]);
            }
        if (i == 0 || err < best) {
            best = err;
            *scale = s;
            *zero = z;
        }
    }
}

/* The O(K^3) factorizations spend their time in dot products: several accumulators (simd
 * reduction) and per-ISA clones let them vectorize without -ffast-math. */
__attribute__((target_clones("avx512f", "avx2", "default"))) static double dot(const double *a, const double *b,
                                                                               int64_t n) {
    double t = 0;
#pragma omp simd reduction(+ : t)
    for (int64_t k = 0; k < n; k++) t += a[k] * b[k];
    return t;
}

static int cholesky_lower(double *A, int64_t n) { /* in place, lower triangle; upper zeroed */
    for (int64_t j = 0; j < n; j++) {
        double s = A[j * n + j] - dot(A + j * n, A + j * n, j);
        if (!(s > 0.0) || !isfinite(s)) return -1;
        double djj = sqrt(s);
        A[j * n + j] = djj;
#pragma omp parallel for schedule(static)
        for (int64_t i = j + 1; i < n; i++) { A[i * n + j] = (A[i * n + j] - dot(A + i * n, A + j * n, j)) / djj; }
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i + 1; j < n; j++) A[i * n + j] = 0.0;
    return 0;
}

/* U = upper Cholesky factor of H^-1, from L = chol(H): H^-1 = L^-T L^-1. */
static int inverse_upper_factor(double *L, int64_t n, double *U) {
    double *Li = calloc((size_t)(n * n), sizeof(double)); /* L^-1, lower; stored transposed (row i = column i) */
    if (!Li) return -2;
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t c = 0; c < n; c++) { /* column c of L^-1: solve L x = e_c */
        double *x = Li + c * n;
        x[c] = 1.0 / L[c * n + c];
        for (int64_t i = c + 1; i < n; i++) { x[i] = -dot(L + i * n + c, x + c, i - c) / L[i * n + i]; }
    }
    /* Hinv[a,b] = sum_k Linv[k,a] Linv[k,b] = dot(column a, column b) over k >= max(a,b) */
#pragma omp parallel for schedule(dynamic, 8)
    for (int64_t a = 0; a < n; a++)
        for (int64_t b = 0; b <= a; b++) {
            const double *xa = Li + a * n, *xb = Li + b * n;
            double t = dot(xa + a, xb + a, n - a);
            U[a * n + b] = t;
            U[b * n + a] = t;
        }
    free(Li);
    if (cholesky_lower(U, n) < 0) return -3;
    for (int64_t i = 0; i < n; i++) /* transpose the lower factor into the upper one */
        for (int64_t j = 0; j < i; j++) {
            U[j * n + i] = U[i * n + j];
            U[i * n + j] = 0.0;
        }
    return 0;
}

int mix_gptq(const float *w, int64_t N, int64_t K, const double *H, const mix_gptq_opts *o, void *codes, float *scale,
             uint8_t *zero) {
    int64_t g = o->group_size, G = mix_ngroups(K, g);
    int rc = 0;
    for (int64_t i = 0; i < N * K; i++)
        if (!isfinite(w[i])) return -1;
    if (H)
        for (int64_t i = 0; i < K * K; i++)
            if (!isfinite(H[i])) return -1;

    int64_t *perm = malloc((size_t)K * sizeof(int64_t));   /* permuted position -> original column */
    int64_t *gorder = malloc((size_t)G * sizeof(int64_t)); /* processing order of groups */
    double *diag = malloc((size_t)K * sizeof(double));
    double *U = H ? malloc((size_t)(K * K) * sizeof(double)) : NULL;
    double *Hp = H ? malloc((size_t)(K * K) * sizeof(double)) : NULL;
    if (!perm || !gorder || !diag || (H && (!U || !Hp))) {
        rc = -2;
        goto done;
    }

    for (int64_t k = 0; k < K; k++) diag[k] = H ? H[k * K + k] : 1.0;
    for (int64_t j = 0; j < G; j++) gorder[j] = j;
    if (o->group_order && H) { /* insertion sort by group diag mass, descending (stable) */
        double *mass = malloc((size_t)G * sizeof(double));
        if (!mass) {
            rc = -2;
            goto done;
        }
        for (int64_t j = 0; j < G; j++) {
            mass[j] = 0;
            for (int64_t k = j * g; k < K && k < (j + 1) * g; k++) mass[j] += diag[k];
        }
        for (int64_t a = 1; a < G; a++) {
            int64_t v = gorder[a];
            int64_t b = a - 1;
            while (b >= 0 && mass[gorder[b]] < mass[v]) {
                gorder[b + 1] = gorder[b];
                b--;
            }
            gorder[b + 1] = v;
        }
        free(mass);
    }
    {
        int64_t p = 0;
        for (int64_t jj = 0; jj < G; jj++)
            for (int64_t k = gorder[jj] * g; k < K && k < (gorder[jj] + 1) * g; k++) perm[p++] = k;
    }
    if (H && o->u_in && !o->group_order) {
        memcpy(U, o->u_in, (size_t)(K * K) * sizeof(double));
    } else if (H) {
        double mean = 0;
        for (int64_t k = 0; k < K; k++) mean += diag[k] > 0 ? diag[k] : 1.0;
        mean /= (double)K;
        for (int64_t a = 0; a < K; a++)
            for (int64_t b = 0; b < K; b++) Hp[a * K + b] = H[perm[a] * K + perm[b]];
        for (int64_t a = 0; a < K; a++) {
            if (Hp[a * K + a] <= 0) Hp[a * K + a] = 1.0; /* dead input: its weights are zeroed below */
            Hp[a * K + a] += o->damp * mean;
        }
        if (cholesky_lower(Hp, K) < 0) {
            rc = -3;
            goto done;
        }
        rc = inverse_upper_factor(Hp, K, U);
        if (rc) goto done;
    }

#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t r0 = 0; r0 < N; r0 += ROW_CHUNK) {
        int64_t R = N - r0 < ROW_CHUNK ? N - r0 : ROW_CHUNK;
        double *W = malloc((size_t)(R * K) * sizeof(double)), *E = malloc((size_t)(R * COL_BLOCK) * sizeof(double));
        double *dg = malloc((size_t)K * sizeof(double)), *ud = malloc((size_t)(g < K ? g : K) * sizeof(double));
        if (!W || !E || !dg || !ud) { /* report it: codes of these rows would be left unwritten */
            free(W);
            free(E);
            free(dg);
            free(ud);
#pragma omp atomic write
            rc = -2;
            continue;
        }
        for (int64_t r = 0; r < R; r++)
            for (int64_t p = 0; p < K; p++) {
                int64_t k = perm[p];
                W[r * K + p] = (H && H[k * K + k] <= 0) ? 0.0 : (double)w[(r0 + r) * K + k];
            }
        for (int64_t p = 0; p < K; p++) dg[p] = diag[perm[p]];
        float sc[ROW_CHUNK], off[ROW_CHUNK];
        uint8_t zp[ROW_CHUNK];
        int cur_bits[ROW_CHUNK];
        for (int64_t b0 = 0; b0 < K; b0 += COL_BLOCK) {
            int64_t b1 = b0 + COL_BLOCK < K ? b0 + COL_BLOCK : K;
            for (int64_t p = b0; p < b1; p++) {
                int64_t k = perm[p], j = k / g;
                int start = (k % g == 0) || p == 0;
                for (int64_t r = 0; r < R; r++) {
                    double *row = W + r * K;
                    if (start) { /* a group begins: its columns are contiguous in permuted order */
                        int64_t len = (j + 1) * g < K ? g : K - j * g;
                        cur_bits[r] = o->bits_per_group ? (int)o->bits_per_group[(r0 + r) * G + j] : o->bits;
                        if (o->fit) {
                            for (int64_t t = 0; t < len; t++) ud[t] = H ? U[(p + t) * K + (p + t)] : 1.0;
                            o->fit(o->fit_ctx, row + p, ud, len, cur_bits[r], j, &sc[r], &off[r]);
                            o->offset_out[(r0 + r) * G + j] = off[r];
                            zp[r] = 0;
                        } else
                            group_params(row + p, dg + p, len, cur_bits[r], o->symmetric, o->clip_grid, &sc[r], &zp[r]);
                        scale[(r0 + r) * G + j] = sc[r];
                        zero[(r0 + r) * G + j] = zp[r];
                    }
                    float x = (float)row[p];
                    double dq;
                    if (o->fit) { /* code = nearest level of code*scale + offset */
                        float qmax = (float)((1 << cur_bits[r]) - 1), c = rintf((x - off[r]) / sc[r]);
                        c = c < 0.f ? 0.f : (c > qmax ? qmax : c);
                        ((uint8_t *)codes)[(r0 + r) * K + k] = (uint8_t)c;
                        dq = (double)c * sc[r] + off[r];
                    } else if (o->symmetric) {
                        int8_t c = mix_sym_code(x, sc[r], cur_bits[r]);
                        ((int8_t *)codes)[(r0 + r) * K + k] = c;
                        dq = (double)c * sc[r];
                    } else {
                        uint8_t c = mix_asym_code(x, sc[r], zp[r], cur_bits[r]);
                        ((uint8_t *)codes)[(r0 + r) * K + k] = c;
                        dq = ((double)c - zp[r]) * sc[r];
                    }
                    if (!H) continue;
                    double err = (row[p] - dq) / U[p * K + p];
                    E[r * COL_BLOCK + (p - b0)] = err;
                    const double *u = U + p * K;
                    for (int64_t q = p + 1; q < b1; q++) row[q] -= err * u[q];
                }
            }
            if (!H || b1 == K) continue;
            for (int64_t t0 = b1; t0 < K; t0 += 256) { /* W[:, b1:] -= E @ U[b0:b1, b1:], tiled */
                int64_t t1 = t0 + 256 < K ? t0 + 256 : K;
                for (int64_t p = b0; p < b1; p++) {
                    const double *u = U + p * K;
                    for (int64_t r = 0; r < R; r++) {
                        double e = E[r * COL_BLOCK + (p - b0)];
                        double *row = W + r * K;
                        for (int64_t q = t0; q < t1; q++) row[q] -= e * u[q];
                    }
                }
            }
        }
        free(W);
        free(E);
        free(dg);
        free(ud);
    }
done:
    free(perm);
    free(gorder);
    free(diag);
    free(U);
    free(Hp);
    return rc;
}
