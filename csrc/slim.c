/* SliM-LLM salience-weighted quantizer calibration (SQC). For one row of one group:
 *   element salience  e_k = v_k^2 / u_k^2   (OBS-style, u = diag of chol(H^-1), §3.2 eq. for delta)
 *   salient set       e_k >= threshold[group] (the threshold is the smallest |z-score| > 2 value of the
 *                     whole group, computed once in Python from the layer's weights)
 *   search            p in {1} U (1, 1+r] U [1-r, 1) in tau_n steps each; range [p*min, p*max];
 *                     loss = sum_nonsalient |dq - v|^norm + lambda * sum_salient |dq - v|^norm.
 * The first minimum wins (p = 1 first). Groups of width zero get the reference's [-1, 1] range. */
#include "slim.h"
#include <math.h>

static double group_loss(const double *v, const double *u, int64_t len, double thr, const mix_slim_ctx *c, float s,
                         float off, float qmax) {
    double err = 0;
    for (int64_t k = 0; k < len; k++) {
        float x = (float)v[k], q = rintf((x - off) / s);
        q = q < 0.f ? 0.f : (q > qmax ? qmax : q);
        float d = fabsf(q * s + off - (float)v[k]);
        double e = d > 0.f ? (double)(c->norm == 2.0 ? d * d : powf(d, (float)c->norm)) : 0.0;
        int salient = c->threshold && (v[k] * v[k]) / (u[k] * u[k]) >= thr;
        err += salient ? c->lambda * e : e;
    }
    return err;
}

void mix_slim_fit(const void *ctx, const double *v, const double *u, int64_t len, int bits, int64_t group, float *scale,
                  float *offset) {
    const mix_slim_ctx *c = ctx;
    if (bits == 1) { /* binarization: levels mean +- mean|v| */
        double m = 0, a = 0;
        for (int64_t k = 0; k < len; k++) {
            m += v[k];
            a += fabs(v[k]);
        }
        m /= (double)len;
        a /= (double)len;
        if (!(a > 0)) {
            *scale = 1.f;
            *offset = (float)m;
            return;
        }
        *scale = (float)(2 * a);
        *offset = (float)(m - a);
        return;
    }
    float lo = 0.f, hi = 0.f, qmax = (float)((1 << bits) - 1);
    for (int64_t k = 0; k < len; k++) {
        lo = fminf(lo, (float)v[k]);
        hi = fmaxf(hi, (float)v[k]);
    }
    if (lo == 0.f && hi == 0.f) {
        lo = -1.f;
        hi = 1.f;
    }
    double thr = c->threshold ? c->threshold[group] : 0, best = INFINITY;
    int n = c->tau_n;
    for (int i = 0; i <= 2 * n; i++) {
        double p = i == 0 ? 1.0 : (i <= n ? 1.0 + c->tau_range * i / n : 1.0 - c->tau_range * (i - n) / n);
        float l = (float)(p * lo), h = (float)(p * hi);
        float s = (h - l) / qmax;
        if (!(s > 0)) continue;
        float z = rintf(-l / s), off = -z * s;
        double err = group_loss(v, u, len, thr, c, s, off, qmax);
        if (err < best) {
            best = err;
            *scale = s;
            *offset = off;
        }
    }
    if (best == INFINITY) {
        *scale = 1.f;
        *offset = 0.f;
    }
}
