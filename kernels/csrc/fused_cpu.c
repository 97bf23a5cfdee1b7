/* Native CPU kernels of the one-pass optimizer step + DEMA (DESIGN.md §3, "One pass").
 *
 * Per tensor, one sweep over memory does, element by element:
 *   1. finish the previous step's EMA update with its α (decided from the statistics
 *      that the previous sweep accumulated): θ*_t = (1 − α_t) θ*_{t−1} + α_t θ_t,
 *      and accumulate d_{t+1} = |θ_t − θ*_t| for the "paper" formula;
 *   2. the optimizer update (Adam, AdamW or SGD with momentum), with torch's own
 *      operation order, in fp32;
 *   3. accumulate this step's a, b, c against θ*_t, and g_prev ← g.
 * The EMA in memory therefore lags one step; `fused_flush_*` finishes it.
 * Tables: P[k] is the address of the k-th array (see cl_core/fused.py, FIELDS).
 */
#include "dema_common.h"

enum { K_ADAM = 0, K_ADAMW = 1, K_SGD = 2 };
enum { PEND_NONE = 0, PEND_EMA = 2 };
#define CHUNK 1024
enum {
    P_NUMEL, P_TH, P_G, P_M, P_V, P_E, P_GP, P_STARTED, P_HAS_PREV, P_D, P_ALPHA, P_SKIPS,
    P_PEND_MODE, P_PEND_STATS, P_PEND_HAS_GRAD, P_PEND_HAS_PREV, P_COUNT
};

#define ARR(type, k) ((type *)(intptr_t)P[k])
#define PTR(type, k, j) ((type *)(intptr_t)ARR(const int64_t, k)[j])

/* Decide the pending update of tensor j; returns 1 when the EMA must be moved by *al. */
static int take_pending(const int64_t *P, int64_t j, const dema_params *dp, float *al) {
    uint8_t *pend = ARR(uint8_t, P_PEND_MODE);
    if (pend[j] != PEND_EMA) return 0;
    pend[j] = PEND_NONE;
    const float *st = ARR(float, P_PEND_STATS) + 5 * j;
    if (st[3] > 0.0f) { /* non-finite θ or g at that step: EMA untouched */
        ARR(int64_t, P_SKIPS)[j] += 1;
        ARR(float, P_ALPHA)[j] = 0.0f;
        return 0;
    }
    *al = decide_alpha(dp, 1, ARR(uint8_t, P_PEND_HAS_GRAD)[j], ARR(uint8_t, P_PEND_HAS_PREV)[j], st);
    ARR(float, P_ALPHA)[j] = *al;
    return 1;
}

/* Per-tensor scalars of one step, rounded to fp32 the way torch rounds a Python
 * scalar for an fp32 tensor op. */
typedef struct {
    float al, om;                        /* pending EMA weight and 1 - α */
    float lr, wd, decay, mom, w1, b2, w2, eps, bc2, neg_ss, neg_lr, damp;
    int first, nesterov;                 /* SGD: momentum buffer starts now; Nesterov */
} step_consts;

typedef struct {
    double sa, sb, sc, sd;
    float fin;
} step_sums;

static void consts_from(const double *h, int kind, float al, step_consts *c) {
    c->al = al;
    c->om = 1.0f - al;
    c->lr = (float)h[0];
    c->wd = (float)h[1];
    c->decay = (float)(1.0 - h[0] * h[1]);
    c->mom = (float)h[2];
    c->w1 = (float)(1.0 - h[2]);
    c->b2 = (float)h[3];
    c->w2 = (float)(1.0 - h[3]);
    c->damp = (float)(1.0 - h[3]);
    c->eps = (float)h[4];
    c->bc2 = (float)h[6];
    c->neg_ss = (float)(-h[5]);
    c->neg_lr = (float)(-h[0]);
    c->nesterov = kind == K_SGD && h[4] != 0.0;
    c->first = kind == K_SGD && h[5] != 0.0;
}

/* The element sweep. Every flag is a compile-time constant at each call site below,
 * so the compiler emits one branch-free (vectorisable) loop per combination. */
#define DEFINE_SWEEP(SUFFIX, T, LOAD, STORE)                                                     \
    static inline __attribute__((always_inline)) void sweep_##SUFFIX(                            \
        const int KIND, const int APPLY, const int HAS_G, const int INIT, const int NEED,       \
        const int WGP, int64_t n, T *restrict th, const T *restrict g, T *restrict m,           \
        T *restrict v, float *restrict e, float *restrict gp, const step_consts *c,             \
        step_sums *s) {                                                                          \
        /* float sums per chunk of CHUNK elements (fast in vector lanes), double across     \
         * chunks, so precision does not degrade with the tensor size */                        \
        double sa = 0, sb = 0, sc = 0, sd = 0;                                                   \
        float fin = 0.0f;                                                                        \
        const step_consts k = *c;                                                                \
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                              \
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                                      \
        float ca = 0.0f, cb = 0.0f, cc = 0.0f, cd = 0.0f;                                        \
        _Pragma("omp simd reduction(+:ca,cb,cc,cd,fin)")                                         \
        for (int64_t i = i0; i < i1; i++) {                                                      \
            const float t = LOAD(th[i]);                                                         \
            float en = e[i];                                                                     \
            if (APPLY) {                                                                         \
                en = en * k.om + t * k.al;                                                       \
                cd += fabsf(t - en);                                                             \
            }                                                                                    \
            float t2 = t, gg = 0.0f;                                                             \
            if (HAS_G) {                                                                         \
                gg = LOAD(g[i]);                                                                 \
                float gw = gg;                                                                   \
                if (KIND == K_SGD) {                                                             \
                    if (k.wd != 0.0f) gw = STOREBACK(gg + k.wd * t);                             \
                    if (k.mom != 0.0f) {                                                         \
                        float buf = k.first ? gw : STOREBACK(LOAD(m[i]) * k.mom) + k.damp * gw;  \
                        m[i] = STORE(buf);                                                       \
                        buf = LOAD(m[i]);                                                        \
                        gw = k.nesterov ? STOREBACK(gw + k.mom * buf) : buf;                     \
                    }                                                                            \
                    t2 = t + k.neg_lr * gw;                                                      \
                } else {                                                                         \
                    if (KIND == K_ADAMW) t2 = STOREBACK(t * k.decay);                            \
                    else if (k.wd != 0.0f) gw = STOREBACK(gg + k.wd * t);                        \
                    float mm = LOAD(m[i]);                                                       \
                    mm = k.w1 < 0.5f ? mm + k.w1 * (gw - mm) : gw - (gw - mm) * (1.0f - k.w1);   \
                    m[i] = STORE(mm);                                                            \
                    mm = LOAD(m[i]);                                                             \
                    float vv = STOREBACK(LOAD(v[i]) * k.b2);                                     \
                    vv = vv + k.w2 * gw * gw;                                                    \
                    v[i] = STORE(vv);                                                            \
                    vv = LOAD(v[i]);                                                             \
                    const float denom = STOREBACK(STOREBACK(STOREBACK(sqrtf(vv)) / k.bc2) + k.eps); \
                    t2 = t2 + k.neg_ss * mm / denom;                                             \
                }                                                                                \
                th[i] = STORE(t2);                                                               \
                t2 = LOAD(th[i]);                                                                \
                fin += gg - gg;                                                                  \
            }                                                                                    \
            if (INIT) en = t2;                                                                   \
            if (APPLY || INIT) e[i] = en;                                                        \
            if (NEED) {                                                                          \
                ca += fabsf(t2 - en);                                                            \
                cb += fabsf(gg);                                                                 \
                cc += fabsf(gg - gp[i]);                                                         \
            }                                                                                    \
            fin += t2 - t2;                                                                      \
            if (HAS_G && WGP) gp[i] = gg;                                                        \
        }                                                                                        \
        sa += ca; sb += cb; sc += cc; sd += cd;                                                  \
        }                                                                                        \
        s->sa = sa; s->sb = sb; s->sc = sc; s->sd = sd; s->fin = fin;                            \
    }

/* Hot path (a gradient, EMA started) per optimizer kind: constants for every flag. */
#define HOT(SUFFIX, KIND)                                                                        \
    if (apply) {                                                                                 \
        if (need) sweep_##SUFFIX(KIND, 1, 1, 0, 1, 1, n, th, g, m, v, e, gp, &c, &s);            \
        else if (wgp) sweep_##SUFFIX(KIND, 1, 1, 0, 0, 1, n, th, g, m, v, e, gp, &c, &s);        \
        else sweep_##SUFFIX(KIND, 1, 1, 0, 0, 0, n, th, g, m, v, e, gp, &c, &s);                 \
    } else {                                                                                     \
        if (need) sweep_##SUFFIX(KIND, 0, 1, 0, 1, 1, n, th, g, m, v, e, gp, &c, &s);            \
        else if (wgp) sweep_##SUFFIX(KIND, 0, 1, 0, 0, 1, n, th, g, m, v, e, gp, &c, &s);        \
        else sweep_##SUFFIX(KIND, 0, 1, 0, 0, 0, n, th, g, m, v, e, gp, &c, &s);                 \
    }

#define DEFINE_FUSED(SUFFIX, T, LOAD, STORE)                                                     \
    DEFINE_SWEEP(SUFFIX, T, LOAD, STORE)                                                         \
    void fused_step_##SUFFIX(int kind, int64_t count, const int64_t *idx, const int64_t *P,     \
                             const double *hyper, int formula, float scale, float fallback,     \
                             float beta) {                                                       \
        dema_params dp = {formula, scale, fallback, beta};                                       \
        for (int64_t q = 0; q < count; q++) {                                                    \
            const int64_t j = idx[q];                                                            \
            const int64_t n = ARR(const int64_t, P_NUMEL)[j];                                    \
            T *th = PTR(T, P_TH, j);                                                             \
            const T *g = PTR(const T, P_G, j);                                                   \
            T *m = PTR(T, P_M, j);                                                               \
            T *v = PTR(T, P_V, j);                                                               \
            float *e = PTR(float, P_E, j);                                                       \
            float *gp = PTR(float, P_GP, j);                                                     \
            float al = 0.0f;                                                                     \
            const int apply = take_pending(P, j, &dp, &al);                                      \
            const int init_now = !ARR(uint8_t, P_STARTED)[j];                                    \
            const int has_g = g != 0;                                                            \
            const int hp = ARR(uint8_t, P_HAS_PREV)[j];                                          \
            const int wgp = gp != 0;                                                             \
            const int need = !init_now && has_g && hp && wgp && formula != F_FIXED;              \
            step_consts c;                                                                       \
            step_sums s;                                                                         \
            consts_from(hyper + 8 * j, kind, al, &c);                                            \
            if (init_now) /* the first step of this tensor: rare, generic loop */                \
                sweep_##SUFFIX(kind, apply, has_g, 1, 0, wgp, n, th, g, m, v, e, gp, &c, &s);    \
            else if (!has_g) /* no gradient: finish the EMA only */                              \
                sweep_##SUFFIX(kind, apply, 0, 0, 0, wgp, n, th, g, m, v, e, gp, &c, &s);        \
            else if (kind == K_ADAMW) { HOT(SUFFIX, K_ADAMW) }                                   \
            else if (kind == K_ADAM) { HOT(SUFFIX, K_ADAM) }                                     \
            else { HOT(SUFFIX, K_SGD) }                                                          \
            if (apply) ARR(float, P_D)[j] = (float)s.sd;                                         \
            if (init_now) {                                                                      \
                if (isnan(s.fin)) {                                                              \
                    ARR(int64_t, P_SKIPS)[j] += 1;                                               \
                    ARR(float, P_ALPHA)[j] = 0.0f;                                               \
                } else {                                                                         \
                    ARR(uint8_t, P_STARTED)[j] = 1;                                              \
                    ARR(float, P_ALPHA)[j] = formula == F_FIXED ? 1.0f - beta : fallback;        \
                    ARR(float, P_D)[j] = 0.0f;                                                   \
                }                                                                                \
            } else {                                                                             \
                float *st = ARR(float, P_PEND_STATS) + 5 * j;                                    \
                st[0] = (float)s.sa;                                                             \
                st[1] = (float)s.sb;                                                             \
                st[2] = (float)s.sc;                                                             \
                st[3] = isnan(s.fin) ? 1.0f : 0.0f;                                              \
                st[4] = ARR(float, P_D)[j];                                                      \
                ARR(uint8_t, P_PEND_MODE)[j] = PEND_EMA;                                         \
                ARR(uint8_t, P_PEND_HAS_GRAD)[j] = has_g;                                        \
                ARR(uint8_t, P_PEND_HAS_PREV)[j] = hp;                                           \
            }                                                                                    \
            if (wgp) ARR(uint8_t, P_HAS_PREV)[j] = has_g;                                        \
        }                                                                                        \
    }                                                                                            \
    void fused_flush_##SUFFIX(int64_t count, const int64_t *idx, const int64_t *P, int formula, \
                              float scale, float fallback, float beta) {                         \
        dema_params dp = {formula, scale, fallback, beta};                                       \
        for (int64_t k = 0; k < count; k++) {                                                    \
            const int64_t j = idx[k];                                                            \
            float al = 0.0f;                                                                     \
            if (!take_pending(P, j, &dp, &al)) continue;                                         \
            const int64_t n = ARR(const int64_t, P_NUMEL)[j];                                    \
            const T *th = PTR(const T, P_TH, j);                                                 \
            float *e = PTR(float, P_E, j);                                                       \
            const float om = 1.0f - al;                                                          \
            double sd = 0;                                                                       \
            _Pragma("omp simd reduction(+:sd)")                                                  \
            for (int64_t i = 0; i < n; i++) {                                                    \
                const float t = LOAD(th[i]);                                                     \
                const float en = e[i] * om + t * al;                                             \
                e[i] = en;                                                                       \
                sd += fabsf(t - en);                                                             \
            }                                                                                    \
            ARR(float, P_D)[j] = (float)sd;                                                      \
        }                                                                                        \
    }

/* Round-trip through the storage type where torch stores an intermediate tensor. */
#define STOREBACK(x) (x)
DEFINE_FUSED(f32, float, LOAD_F32, STORE_F32)
#undef STOREBACK
#define STOREBACK(x) bf16_to_f32(f32_to_bf16(x))
DEFINE_FUSED(bf16, uint16_t, LOAD_BF16, STORE_BF16)
#undef STOREBACK
#ifdef CL_CORE_HAVE_F16
#define STOREBACK(x) ((float)(_Float16)(x))
DEFINE_FUSED(f16, _Float16, LOAD_F16, STORE_F16)
#undef STOREBACK
#endif
