/* Weighted 1-D k-means, one problem per row. In one dimension the clusters of Lloyd's algorithm are
 * intervals of the sorted values cut at the midpoints between neighbouring centroids, so each
 * iteration is k binary searches over prefix sums of w and w*x: O(n log n) to sort, then
 * O(k log n) per iteration. Ties at a midpoint go to the lower cluster (also for the final codes).
 * Zero-weight elements (e.g. outliers kept in 16-bit) do not move centroids but still get codes. */
#include "cluster.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float v;
    int64_t i;
} vi_t;
static int cmp_vi(const void *a, const void *b) {
    const vi_t *x = a, *y = b;
    if (x->v < y->v) return -1;
    if (x->v > y->v) return 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* first index t in sorted s[0..n) with s[t].v > b */
static int64_t upper(const vi_t *s, int64_t n, double b) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if ((double)s[mid].v > b)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static void one_row(const float *x, const float *wt, int64_t n, int k, int iters, vi_t *s, double *cw, double *cwx,
                    double *c, float *cent_out, int kout, uint8_t *codes) {
    for (int64_t t = 0; t < n; t++) {
        s[t].v = x[t];
        s[t].i = t;
    }
    qsort(s, (size_t)n, sizeof(vi_t), cmp_vi);
    int uniform = 1;
    double total = 0;
    if (wt) {
        for (int64_t t = 0; t < n; t++) total += wt[s[t].i];
        uniform = !(total > 0);
    }
    cw[0] = cwx[0] = 0;
    for (int64_t t = 0; t < n; t++) {
        double w = uniform ? 1.0 : (double)wt[s[t].i];
        cw[t + 1] = cw[t] + w;
        cwx[t + 1] = cwx[t] + w * (double)s[t].v;
    }
    total = cw[n];
    /* init: weighted quantiles; the first sorted position whose cumulative weight exceeds the target */
    for (int i = 0; i < k; i++) {
        double target = total * (i + 0.5) / k;
        int64_t lo = 0, hi = n - 1;
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if (cw[mid + 1] > target)
                hi = mid;
            else
                lo = mid + 1;
        }
        c[i] = s[lo].v;
    }
    for (int it = 0; it < iters; it++) {
        int changed = 0;
        int64_t a = 0;
        for (int i = 0; i < k; i++) {
            int64_t b = i == k - 1 ? n : upper(s, n, 0.5 * (c[i] + c[i + 1]));
            if (b < a) b = a;
            double w = cw[b] - cw[a];
            if (w > 0) {
                double nc = (cwx[b] - cwx[a]) / w;
                if (nc != c[i]) {
                    c[i] = nc;
                    changed = 1;
                }
            }
            a = b;
        }
        /* keep centroids ascending (equal neighbours may collapse; that is harmless) */
        for (int i = 1; i < k; i++)
            if (c[i] < c[i - 1]) {
                double t = c[i];
                c[i] = c[i - 1];
                c[i - 1] = t;
                changed = 1;
            }
        if (!changed) break;
    }
    for (int i = 0; i < kout; i++) cent_out[i] = (float)c[i < k ? i : k - 1];
    for (int64_t t = 0; t < n; t++) {
        double v = x[t];
        int q = 0;
        while (q < k - 1 && v > 0.5 * (c[q] + c[q + 1])) q++;
        codes[t] = (uint8_t)q;
    }
}

int mix_kmeans1d(const float *x, const float *wt, int64_t R, int64_t n, int k, const int32_t *ks, int iters,
                 float *centroids, uint8_t *codes) {
    for (int64_t i = 0; i < R * n; i++)
        if (!isfinite(x[i]) || (wt && !(wt[i] >= 0 && isfinite(wt[i])))) return -1;
    if (n == 0) {
        for (int64_t i = 0; i < R * k; i++) centroids[i] = 0.f;
        return 0;
    }
    int rc = 0;
#pragma omp parallel
    {
        vi_t *s = malloc((size_t)n * sizeof(vi_t));
        double *cw = malloc((size_t)(n + 1) * sizeof(double)), *cwx = malloc((size_t)(n + 1) * sizeof(double));
        double *c = malloc((size_t)(k + 1) * sizeof(double));
        int ok = s && cw && cwx && c;
        if (!ok) {
#pragma omp atomic write
            rc = -2;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t r = 0; r < R; r++) {
            if (!ok) continue;
            int kr = ks ? ks[r] : k;
            one_row(x + r * n, wt ? wt + r * n : NULL, n, kr, iters, s, cw, cwx, c, centroids + r * k, k,
                    codes + r * n);
        }
        free(s);
        free(cw);
        free(cwx);
        free(c);
    }
    return rc;
}
