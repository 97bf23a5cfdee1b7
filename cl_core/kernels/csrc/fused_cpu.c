/* Native CPU kernels of the one-pass optimizer step + DEMA (docs/design.md §3, "One pass").
 *
 * Per tensor, one sweep over memory does, element by element:
 *   1. finish the previous step's EMA update with its α (decided from the statistics
 *      that the previous sweep accumulated): θ*_t = (1 − α_t) θ*_{t−1} + α_t θ_t,
 *      and accumulate d_{t+1} = |θ_t − θ*_t| for the "paper" formula;
 *   2. the optimizer update (Adam, AdamW or SGD with momentum), with torch's own
 *      operation order, in fp32;
 *   3. accumulate this step's a, b, c against θ*_t, and g_prev ← g.
 * The EMA in memory therefore lags one step; `cpu_fused_flush_*` finishes it.
 *
 * θ* and g_prev are fp32 (`cpu_fused_*_{f32,bf16,f16}`), or, with DEMAConfig(ema_dtype=
 * "param"), of the parameter dtype (`cpu_fused_*_param_{bf16,f16}`): then every difference,
 * product and sum of the DEMA half is rounded to that dtype and the statistics are
 * double sums in element order, rounded to it, exactly as dema_cpu.c's dema_cpu_param_*
 * (the engine's kernels for that mode) computes them, so fused and generic agree bit for bit
 * on the same parameters.
 *
 * Tables (names and numbers in dema_common.h, mirrored from kernels/layouts.py; the
 * driver is kernels/cpu_fused.py): S, the per-tensor static table int64 [N_STATIC, T]
 * (addresses of θ, optimizer state, θ*, g_prev; numel; optimizer param group), D, the
 * per-tensor dynamic table int64 [N_DYNAMIC, T] (gradient address, torch's step count,
 * DF_* flags), hyper, one float64 row of N_HYPER per optimizer param group, and CS, the
 * addresses of this group's per-tensor state arrays (CS_* below).
 */
#include "dema_common.h"

/* FP operations may be assumed not to trap (nothing here reads the FP exception flags;
 * rounding and NaN/inf results are unchanged): without this GCC keeps every loop with a
 * conditional FP operation scalar (measured: the AdamW sweep 5x slower). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#define CHUNK 1024

/* The sweep's own kind for SGD with momentum (KIND_SGD: without): whether the momentum
 * buffer is written is fixed per loop, so that the loop has no conditional store. */
enum { SWEEP_SGD_MOMENTUM = 100 };

/* The CPU group's own table: addresses of its per-tensor state arrays. The engine's
 * canonical state (started .. skips, kernels/cpu_fused.py GroupState) and the decision
 * the last step left pending (pend_*). */
#define CL_CORE_CPU_LAYOUT(X)                                                                    \
    X(N_CS, 9) X(CS_STARTED, 0) X(CS_HAS_PREV, 1) X(CS_D, 2) X(CS_ALPHA, 3) X(CS_SKIPS, 4)       \
    X(CS_PEND_MODE, 5) X(CS_PEND_STATS, 6) X(CS_PEND_HAS_GRAD, 7) X(CS_PEND_HAS_PREV, 8)
enum { CL_CORE_CPU_LAYOUT(CL_CORE_ENUM_ITEM) };

/* The layout as (name, value) pairs for Python's check: index i gives one pair;
 * returns 0 past the end. */
#define CL_CORE_LAYOUT_ENTRY(name, value) {#name, name},
static const struct {
    const char *name;
    int64_t value;
} layout_table[] = {CL_CORE_SHARED_LAYOUT(CL_CORE_LAYOUT_ENTRY) CL_CORE_CPU_LAYOUT(CL_CORE_LAYOUT_ENTRY)};

int cpu_fused_layout(int64_t i, const char **name, int64_t *value) {
    if (i < 0 || i >= (int64_t)(sizeof layout_table / sizeof layout_table[0])) return 0;
    *name = layout_table[i].name;
    *value = layout_table[i].value;
    return 1;
}

/* Typed views of the CS table. */
typedef struct {
    uint8_t *started, *has_prev;
    float *d, *alpha;
    int64_t *skips;
    uint8_t *pend_mode;
    float *pend_stats; /* [T, N_DSTAT] */
    uint8_t *pend_has_grad, *pend_has_prev;
} group_state;

static group_state state_from(const int64_t *CS) {
    group_state s = {
        .started = (uint8_t *)(intptr_t)CS[CS_STARTED],
        .has_prev = (uint8_t *)(intptr_t)CS[CS_HAS_PREV],
        .d = (float *)(intptr_t)CS[CS_D],
        .alpha = (float *)(intptr_t)CS[CS_ALPHA],
        .skips = (int64_t *)(intptr_t)CS[CS_SKIPS],
        .pend_mode = (uint8_t *)(intptr_t)CS[CS_PEND_MODE],
        .pend_stats = (float *)(intptr_t)CS[CS_PEND_STATS],
        .pend_has_grad = (uint8_t *)(intptr_t)CS[CS_PEND_HAS_GRAD],
        .pend_has_prev = (uint8_t *)(intptr_t)CS[CS_PEND_HAS_PREV],
    };
    return s;
}

/* The decision on tensor j's pending update, without changing anything: returns 1 when
 * the EMA must be moved by *al, 0 when nothing is pending; *skip is 1 when the pending
 * step saw NaN/inf (EMA left untouched, counted). */
static int pending_decision(const group_state *gs, int64_t j, const dema_params *dp, float *al, int *skip) {
    *skip = 0;
    if (gs->pend_mode[j] != PEND_EMA) return 0;
    const float *st = gs->pend_stats + N_DSTAT * j;
    if (st[DS_NONFINITE] > 0.0f) {
        *skip = 1;
        return 0;
    }
    *al = decide_alpha(dp, 1, gs->pend_has_grad[j], gs->pend_has_prev[j], st);
    return 1;
}

/* Decide and record tensor j's pending update; returns 1 when the EMA must move by *al. */
static int take_pending(const group_state *gs, int64_t j, const dema_params *dp, float *al) {
    int skip;
    if (gs->pend_mode[j] != PEND_EMA) return 0;
    const int apply = pending_decision(gs, j, dp, al, &skip);
    gs->pend_mode[j] = PEND_NONE;
    if (skip) {
        gs->skips[j] += 1;
        gs->alpha[j] = 0.0f;
    } else {
        gs->alpha[j] = *al;
    }
    return apply;
}

/* Per-tensor scalars of one step, rounded to fp32 the way torch rounds a Python scalar
 * for an fp32 tensor op. One field per value; each optimizer kind fills its own. */
typedef struct {
    float al, om;        /* pending EMA weight α and 1 − α */
    float lr, wd;        /* every kind */
    float decay;         /* AdamW: 1 − lr·wd */
    float one_m_beta1;   /* Adam: the lerp weight 1 − β1 */
    float beta2, one_m_beta2, eps;
    float neg_step_size; /* Adam: −lr / (1 − β1^step) */
    float bc2_sqrt;      /* Adam: (1 − β2^step)^0.5 */
    float momentum;      /* SGD */
    float one_m_damp;    /* SGD: 1 − dampening */
    float neg_lr;        /* SGD */
    int nesterov, first; /* SGD: Nesterov; the momentum buffer starts now (a copy of g) */
} step_consts;

/* Adam/AdamW scalars from a param group's row and torch's step count (after this step),
 * in torch's order: Python floats (double), `1 - beta ** step`, `lr / bc1`, `bc2 ** 0.5`. */
static void consts_adam(const double *h, double step, step_consts *c) {
    const double lr = h[H_LR], wd = h[H_WEIGHT_DECAY], beta1 = h[H_BETA1], beta2 = h[H_BETA2];
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    c->lr = (float)lr;
    c->wd = (float)wd;
    c->decay = (float)(1.0 - lr * wd);
    c->one_m_beta1 = (float)(1.0 - beta1);
    c->beta2 = (float)beta2;
    c->one_m_beta2 = (float)(1.0 - beta2);
    c->eps = (float)h[H_EPS];
    c->neg_step_size = (float)(-(lr / bc1));
    c->bc2_sqrt = (float)pow(bc2, 0.5);
    c->momentum = c->one_m_damp = c->neg_lr = 0.0f;
    c->nesterov = c->first = 0;
}

static void consts_sgd(const double *h, int first, step_consts *c) {
    c->lr = (float)h[H_LR];
    c->wd = (float)h[H_WEIGHT_DECAY];
    c->momentum = (float)h[H_MOMENTUM];
    c->one_m_damp = (float)(1.0 - h[H_DAMPENING]);
    c->neg_lr = (float)(-h[H_LR]);
    c->nesterov = h[H_NESTEROV] != 0.0;
    c->first = first;
    c->decay = c->one_m_beta1 = c->beta2 = c->one_m_beta2 = c->eps = 0.0f;
    c->neg_step_size = c->bc2_sqrt = 0.0f;
}

typedef struct {
    double sa, sb, sc, sd;
    float fin;
} step_sums;

/* The element sweep. Every flag is a compile-time constant at each call site below,
 * so the compiler emits one branch-free (vectorisable) loop per combination. */
#define DEFINE_SWEEP(SUFFIX, T, LOAD, STORE, ET, ELOAD, ESTORE, EROUND, EXACT)                  \
    static inline __attribute__((always_inline)) void sweep_##SUFFIX(                            \
        const int KIND, const int APPLY, const int HAS_G, const int INIT, const int NEED,       \
        const int WGP, int64_t n, T *restrict th, const T *restrict g, T *restrict m,           \
        T *restrict v, ET *restrict e, ET *restrict gp, const step_consts *c,                   \
        step_sums *s) {                                                                          \
        /* fp32 EMA: float sums per chunk of CHUNK elements (fast in vector lanes), double  \
         * across chunks, so precision does not degrade with the tensor size. EXACT (EMA in \
         * the parameter dtype): the vector loop writes each term, then one double sum in   \
         * element order, as dema_cpu_param_* (bit-identical statistics). */                  \
        double sa = 0, sb = 0, sc = 0, sd = 0;                                                   \
        float fin = 0.0f;                                                                        \
        float ta[EXACT ? CHUNK : 1], tb[EXACT ? CHUNK : 1], tc[EXACT ? CHUNK : 1];              \
        float td[EXACT ? CHUNK : 1];                                                             \
        const step_consts k = *c;                                                                \
        /* loop-invariant switches as ints: a float compare in the loop may trap, which     \
         * keeps the compiler from turning the selects below into vector blends */             \
        const int lerp_low = k.one_m_beta1 < 0.5f, adam_l2 = k.wd != 0.0f;                      \
        const int sgd_wd = k.wd != 0.0f, sgd_first = k.first, sgd_nesterov = k.nesterov;        \
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                              \
        const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                                      \
        float ca = 0.0f, cb = 0.0f, cc = 0.0f, cd = 0.0f;                                        \
        _Pragma("omp simd reduction(+:ca,cb,cc,cd,fin)")                                         \
        for (int64_t i = i0; i < i1; i++) {                                                      \
            const float t = LOAD(th[i]);                                                         \
            float en = ELOAD(e[i]);                                                              \
            if (APPLY) {                                                                         \
                en = EROUND(EROUND(en * k.om) + EROUND(t * k.al));                               \
                const float dd = fabsf(EROUND(t - en));                                          \
                if (EXACT) td[i - i0] = dd;                                                      \
                else cd += dd;                                                                   \
            }                                                                                    \
            float t2 = t, gg = 0.0f;                                                             \
            if (HAS_G) {                                                                         \
                gg = LOAD(g[i]);                                                                 \
                float gw = gg;                                                                   \
                if (KIND == KIND_SGD || KIND == SWEEP_SGD_MOMENTUM) {                            \
                    /* both arms, then selects on loop-invariant ints (as Adam below) */        \
                    const float l2 = STOREBACK(gg + k.wd * t);                                   \
                    gw = sgd_wd ? l2 : gg;                                                       \
                    if (KIND == SWEEP_SGD_MOMENTUM) {                                            \
                        /* a buffer that starts now was allocated (empty_like): read, unused */ \
                        const float prev = STOREBACK(LOAD(m[i]) * k.momentum) + k.one_m_damp * gw; \
                        float buf = sgd_first ? gw : prev;                                       \
                        m[i] = STORE(buf);                                                       \
                        buf = LOAD(m[i]);                                                        \
                        const float nes = STOREBACK(gw + k.momentum * buf);                      \
                        gw = sgd_nesterov ? nes : buf;                                           \
                    }                                                                            \
                    t2 = t + k.neg_lr * gw;                                                      \
                } else {                                                                         \
                    /* Both arms computed, then a select (FP ops that may trap are not   \
                     * if-converted: a branch here would keep the loop scalar). */              \
                    if (KIND == KIND_ADAMW) {                                                    \
                        t2 = STOREBACK(t * k.decay);                                             \
                    } else {                                                                     \
                        const float l2 = STOREBACK(gg + k.wd * t);                               \
                        gw = adam_l2 ? l2 : gg;                                                  \
                    }                                                                            \
                    /* torch's lerp_(g, 1 − β1), both of its branches */                         \
                    float mm = LOAD(m[i]);                                                       \
                    const float lerp_lo = mm + k.one_m_beta1 * (gw - mm);                        \
                    const float lerp_hi = gw - (gw - mm) * (1.0f - k.one_m_beta1);               \
                    mm = lerp_low ? lerp_lo : lerp_hi;                                           \
                    m[i] = STORE(mm);                                                            \
                    mm = LOAD(m[i]);                                                             \
                    float vv = STOREBACK(LOAD(v[i]) * k.beta2);                                  \
                    vv = vv + k.one_m_beta2 * gw * gw;                                           \
                    v[i] = STORE(vv);                                                            \
                    vv = LOAD(v[i]);                                                             \
                    const float denom = STOREBACK(STOREBACK(STOREBACK(sqrtf(vv)) / k.bc2_sqrt) + k.eps); \
                    t2 = t2 + k.neg_step_size * mm / denom;                                      \
                }                                                                                \
                th[i] = STORE(t2);                                                               \
                t2 = LOAD(th[i]);                                                                \
                fin += gg - gg;                                                                  \
            }                                                                                    \
            /* INIT (first step of the tensor): θ* and g_prev are written by tensor_step   \
             * after the sweep, only when it was finite (the engine leaves them on a skip) */  \
            if (APPLY) e[i] = ESTORE(en);                                                        \
            if (NEED) {                                                                          \
                const float da = fabsf(EROUND(t2 - en)), db = fabsf(gg);                         \
                const float dc = fabsf(EROUND(gg - ELOAD(gp[i])));                               \
                if (EXACT) {                                                                     \
                    ta[i - i0] = da; tb[i - i0] = db; tc[i - i0] = dc;                           \
                } else {                                                                         \
                    ca += da; cb += db; cc += dc;                                                \
                }                                                                                \
            }                                                                                    \
            fin += t2 - t2;                                                                      \
            if (HAS_G && WGP && !INIT) gp[i] = ESTORE(gg);                                       \
        }                                                                                        \
        if (EXACT) { /* element order, in double: dema_cpu_param_*'s sums exactly */             \
            for (int64_t i = 0; i < i1 - i0; i++) {                                              \
                if (APPLY) sd += td[i];                                                          \
                if (NEED) { sa += ta[i]; sb += tb[i]; sc += tc[i]; }                             \
            }                                                                                    \
        } else {                                                                                 \
            sa += ca; sb += cb; sc += cc; sd += cd;                                              \
        }                                                                                        \
        }                                                                                        \
        s->sa = sa; s->sb = sb; s->sc = sc; s->sd = sd; s->fin = fin;                            \
    }

/* Hot path (a gradient, EMA started) per optimizer kind: constants for every flag. */
#define HOT(SUFFIX, KIND)                                                                        \
    if (apply) {                                                                                 \
        if (need) sweep_##SUFFIX(KIND, 1, 1, 0, 1, 1, n, th, g, m, v, e, gp, c, &s);             \
        else if (wgp) sweep_##SUFFIX(KIND, 1, 1, 0, 0, 1, n, th, g, m, v, e, gp, c, &s);         \
        else sweep_##SUFFIX(KIND, 1, 1, 0, 0, 0, n, th, g, m, v, e, gp, c, &s);                  \
    } else {                                                                                     \
        if (need) sweep_##SUFFIX(KIND, 0, 1, 0, 1, 1, n, th, g, m, v, e, gp, c, &s);             \
        else if (wgp) sweep_##SUFFIX(KIND, 0, 1, 0, 0, 1, n, th, g, m, v, e, gp, c, &s);         \
        else sweep_##SUFFIX(KIND, 0, 1, 0, 0, 0, n, th, g, m, v, e, gp, c, &s);                  \
    }

/* DEFINE_FUSED(SUFFIX, T, LOAD, STORE, ET, ELOAD, ESTORE, EROUND, EXACT, EMA16): the entry
 * points cpu_fused_{step,flush}_SUFFIX for parameters of type T (LOAD/STORE: to and from
 * fp32) with θ* and g_prev of type ET (ELOAD/ESTORE); EROUND rounds a result to ET (the
 * identity for an fp32 EMA); EXACT: the statistics as dema_cpu_param_* sums them (double
 * sums in element order rounded once to ET, round_sum16), α in ET's arithmetic (EMA16, the
 * EMA16_* code of ET) and the first update the official deepcopy + fallback update. */
#define SUM_TO_STAT(x, EXACT, EMA16) ((EXACT) ? round_sum16((x), (EMA16)) : (float)(x))
#define DEFINE_FUSED(SUFFIX, T, LOAD, STORE, ET, ELOAD, ESTORE, EROUND, EXACT, EMA16)            \
    DEFINE_SWEEP(SUFFIX, T, LOAD, STORE, ET, ELOAD, ESTORE, EROUND, EXACT)                       \
    /* One tensor of one step: finish its pending update, optimizer update, statistics.   \
     * c holds the optimizer scalars; wgp: the formula keeps g_prev. */                     \
    static void tensor_step_##SUFFIX(int kind, const dema_params *dp, const group_state *gs,   \
                                     int64_t j, int64_t n, T *th, const T *g, T *m, T *v,       \
                                     ET *e, ET *gp, int has_g, int wgp, step_consts *c) {       \
        float al = 0.0f;                                                                         \
        const int apply = take_pending(gs, j, dp, &al);                                          \
        c->al = al;                                                                              \
        c->om = 1.0f - al;                                                                       \
        const int init_now = !gs->started[j];                                                    \
        const int hp = gs->has_prev[j];                                                          \
        const int need = !init_now && has_g && hp && wgp && dp->formula != FORMULA_FIXED;        \
        step_sums s;                                                                             \
        const int skind = kind == KIND_SGD && c->momentum != 0.0f ? SWEEP_SGD_MOMENTUM : kind;   \
        if (init_now) /* the first step of this tensor: rare, generic loop */                    \
            sweep_##SUFFIX(skind, apply, has_g, 1, 0, wgp, n, th, g, m, v, e, gp, c, &s);        \
        else if (!has_g) /* no gradient: finish the EMA only */                                  \
            sweep_##SUFFIX(skind, apply, 0, 0, 0, wgp, n, th, g, m, v, e, gp, c, &s);            \
        else if (kind == KIND_ADAMW) { HOT(SUFFIX, KIND_ADAMW) }                                 \
        else if (kind == KIND_ADAM) { HOT(SUFFIX, KIND_ADAM) }                                   \
        else if (skind == SWEEP_SGD_MOMENTUM) { HOT(SUFFIX, SWEEP_SGD_MOMENTUM) }                \
        else { HOT(SUFFIX, KIND_SGD) }                                                           \
        if (apply) gs->d[j] = SUM_TO_STAT(s.sd, EXACT, EMA16);                                   \
        if (init_now) {                                                                          \
            if (isnan(s.fin)) {                                                                  \
                gs->skips[j] += 1;                                                               \
                gs->alpha[j] = 0.0f;                                                             \
            } else {                                                                             \
                /* the lazy start: θ* ← θ (after this step's update), g_prev ← g; an EMA  \
                 * in the parameter dtype then takes the official fallback update (EXACT) */  \
                const float al0 = dp->formula == FORMULA_FIXED ? 1.0f - dp->beta : dp->fallback; \
                const float om0 = 1.0f - al0;                                                    \
                double sd0 = 0;                                                                  \
                for (int64_t i = 0; i < n; i++) {                                                \
                    const float t = LOAD(th[i]);                                                 \
                    if (EXACT) {                                                                 \
                        const float en = EROUND(EROUND(t * om0) + EROUND(t * al0));              \
                        e[i] = ESTORE(en);                                                       \
                        sd0 += fabsf(EROUND(t - en));                                            \
                    } else {                                                                     \
                        e[i] = ESTORE(t);                                                        \
                    }                                                                            \
                }                                                                                \
                if (has_g && wgp)                                                                \
                    for (int64_t i = 0; i < n; i++) gp[i] = ESTORE(LOAD(g[i]));                  \
                gs->started[j] = 1;                                                              \
                gs->alpha[j] = al0;                                                              \
                gs->d[j] = EXACT ? round_sum16(sd0, EMA16) : 0.0f;                               \
            }                                                                                    \
        } else {                                                                                 \
            float *st = gs->pend_stats + N_DSTAT * j;                                            \
            st[DS_A] = SUM_TO_STAT(s.sa, EXACT, EMA16);                                          \
            st[DS_B] = SUM_TO_STAT(s.sb, EXACT, EMA16);                                          \
            st[DS_C] = SUM_TO_STAT(s.sc, EXACT, EMA16);                                          \
            st[DS_NONFINITE] = isnan(s.fin) ? 1.0f : 0.0f;                                       \
            st[DS_D] = gs->d[j];                                                                 \
            gs->pend_mode[j] = PEND_EMA;                                                         \
            gs->pend_has_grad[j] = has_g;                                                        \
            gs->pend_has_prev[j] = hp;                                                           \
        }                                                                                        \
        /* a non-finite step leaves has_prev as the engine does (the tensor is skipped) */     \
        if (wgp && !isnan(s.fin)) gs->has_prev[j] = has_g;                                       \
    }                                                                                            \
    /* One step over the tensors idx[0..count) of a group of nt tensors. */                    \
    void cpu_fused_step_##SUFFIX(int kind, int64_t count, const int64_t *idx, const int64_t *S, \
                                 const int64_t *D, const double *hyper, const int64_t *CS,      \
                                 int64_t nt, int formula, float scale, float fallback,           \
                                 float beta) {                                                   \
        const dema_params dp = {formula, scale, fallback, beta, EMA16};                          \
        const group_state gs = state_from(CS);                                                   \
        const int wgp = formula != FORMULA_FIXED;                                                \
        for (int64_t q = 0; q < count; q++) {                                                    \
            const int64_t j = idx[q];                                                            \
            const int64_t flags = D[D_FLAGS * nt + j];                                            \
            const double *h = hyper + N_HYPER * S[S_GROUP * nt + j];                              \
            step_consts c;                                                                       \
            if (kind == KIND_SGD) consts_sgd(h, (flags & DF_FIRST) != 0, &c);                    \
            else consts_adam(h, (double)D[D_STEP * nt + j], &c);                                  \
            tensor_step_##SUFFIX(kind, &dp, &gs, j, S[S_NUMEL * nt + j],                          \
                                 (T *)(intptr_t)S[S_PARAM * nt + j],                              \
                                 (const T *)(intptr_t)D[D_GRAD * nt + j],                         \
                                 (T *)(intptr_t)S[S_EXP_AVG * nt + j],                            \
                                 (T *)(intptr_t)S[S_EXP_AVG_SQ * nt + j],                         \
                                 (ET *)(intptr_t)S[S_EMA * nt + j],                               \
                                 (ET *)(intptr_t)S[S_GRAD_PREV * nt + j],                         \
                                 (flags & DF_HAS_GRAD) != 0, wgp, &c);                           \
        }                                                                                        \
    }                                                                                            \
    /* Finish the pending updates of idx[0..count); theta[j]: θ's address now.    */       \
    void cpu_fused_flush_##SUFFIX(int64_t count, const int64_t *idx, const int64_t *S,          \
                                  const int64_t *theta, const int64_t *CS, int64_t nt,          \
                                  int formula, float scale, float fallback, float beta) {       \
        const dema_params dp = {formula, scale, fallback, beta, EMA16};                          \
        const group_state gs = state_from(CS);                                                   \
        for (int64_t k = 0; k < count; k++) {                                                    \
            const int64_t j = idx[k];                                                            \
            float al = 0.0f;                                                                     \
            if (!take_pending(&gs, j, &dp, &al)) continue;                                       \
            const int64_t n = S[S_NUMEL * nt + j];                                                \
            const T *th = (const T *)(intptr_t)theta[j];                                         \
            ET *e = (ET *)(intptr_t)S[S_EMA * nt + j];                                           \
            const float om = 1.0f - al;                                                          \
            double sd = 0;                                                                       \
            if (EXACT) { /* terms per chunk in vector lanes, the sum in element order */        \
                float td[EXACT ? CHUNK : 1];                                                     \
                for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                      \
                    const int64_t i1 = i0 + CHUNK < n ? i0 + CHUNK : n;                          \
                    _Pragma("omp simd")                                                          \
                    for (int64_t i = i0; i < i1; i++) {                                          \
                        const float t = LOAD(th[i]);                                             \
                        const float en = EROUND(EROUND(ELOAD(e[i]) * om) + EROUND(t * al));      \
                        e[i] = ESTORE(en);                                                       \
                        td[i - i0] = fabsf(EROUND(t - en));                                      \
                    }                                                                            \
                    for (int64_t i = 0; i < i1 - i0; i++) sd += td[i];                           \
                }                                                                                \
            } else {                                                                             \
                _Pragma("omp simd reduction(+:sd)")                                              \
                for (int64_t i = 0; i < n; i++) {                                                \
                    const float t = LOAD(th[i]);                                                 \
                    const float en = ELOAD(e[i]) * om + t * al;                                  \
                    e[i] = ESTORE(en);                                                           \
                    sd += fabsf(t - en);                                                         \
                }                                                                                \
            }                                                                                    \
            gs.d[j] = SUM_TO_STAT(sd, EXACT, EMA16);                                             \
        }                                                                                        \
    }

/* Round-trip through the storage type where torch stores an intermediate tensor. */
#define IDENT(x) (x)
#define STOREBACK(x) (x)
DEFINE_FUSED(f32, float, LOAD_F32, STORE_F32, float, IDENT, IDENT, IDENT, 0, EMA16_NONE)
#undef STOREBACK
#define STOREBACK(x) bf16_to_f32(f32_to_bf16(x))
DEFINE_FUSED(bf16, uint16_t, LOAD_BF16, STORE_BF16, float, IDENT, IDENT, IDENT, 0, EMA16_NONE)
/* ema_dtype="param": θ* and g_prev in bfloat16, every DEMA result rounded to it */
DEFINE_FUSED(param_bf16, uint16_t, LOAD_BF16, STORE_BF16, uint16_t, LOAD_BF16, STORE_BF16, STOREBACK, 1, EMA16_BF16)
#undef STOREBACK
#ifdef CL_CORE_HAVE_F16
#define STOREBACK(x) ((float)(_Float16)(x))
DEFINE_FUSED(f16, _Float16, LOAD_F16, STORE_F16, float, IDENT, IDENT, IDENT, 0, EMA16_NONE)
DEFINE_FUSED(param_f16, _Float16, LOAD_F16, STORE_F16, _Float16, LOAD_F16, STORE_F16, STOREBACK, 1, EMA16_F16)
#undef STOREBACK
#endif
#undef IDENT

/* α and skip count per tensor as the next step or flush will record them, without
 * changing anything (engine.stats right after a fused step). One entry point per EMA
 * arithmetic (α is decided in the EMA's dtype): cpu_fused_pending for a float32 EMA
 * (any parameter dtype), cpu_fused_pending_param_{bf16,f16} for ema_dtype="param". */
#define DEFINE_PENDING(NAME, EMA16)                                                              \
    void NAME(int64_t T, const int64_t *CS, float *alpha_out, int64_t *skips_out, int formula,  \
              float scale, float fallback, float beta) {                                         \
        const dema_params dp = {formula, scale, fallback, beta, EMA16};                          \
        const group_state gs = state_from(CS);                                                   \
        for (int64_t j = 0; j < T; j++) {                                                        \
            float al = gs.alpha[j];                                                              \
            int skip = 0;                                                                        \
            pending_decision(&gs, j, &dp, &al, &skip);                                           \
            alpha_out[j] = skip ? 0.0f : al;                                                     \
            skips_out[j] = gs.skips[j] + skip;                                                   \
        }                                                                                        \
    }
DEFINE_PENDING(cpu_fused_pending, EMA16_NONE)
DEFINE_PENDING(cpu_fused_pending_param_bf16, EMA16_BF16)
#ifdef CL_CORE_HAVE_F16
DEFINE_PENDING(cpu_fused_pending_param_f16, EMA16_F16)
#endif
