/* Native CPU kernels of the DEMA engine (cl_core "torch" backend on CPU tensors).
 *
 * One call processes a list of tensors given as pointer tables. Per tensor it does
 * the two phases of docs/design.md §2 back to back (statistics, then the EMA update)
 * while the tensor is still hot in cache, so DRAM sees close to the 24 B/element
 * floor. Sums are accumulated in double; α is computed in float with the same
 * operation order as the reference ((1 + b) / (a * c) * scale).
 * Threads: the caller splits the tensor list; this file has no threading of its own.
 * Built at first use by cl_core/native_cpu.py (plain C, no torch headers).
 */
#include <stdlib.h>

#include "dema_common.h"

enum { MODE_STATS = 1, MODE_APPLY = 2, MODE_BOTH = 3 };

/* Sums run in LANES independent double accumulators per statistic (element i goes to lane
 * i % LANES, the lanes are added at the end): one accumulator per sum is a chain of dependent
 * adds (3-4 cycles each) that kept these sweeps compute-bound at ~1/3 of a core's DRAM
 * bandwidth (issue 28: 2.5x the fixed-beta lerp where the traffic floor is 2.0x). A double
 * sum of float terms is exact to far below float32 rounding in any order. The finiteness
 * probe is an integer test of the exponent bits (OR-reduced), not a float sum. */
#define LANES 16
#define APPLY_CHUNK 4096 /* elements per chunk of an update sweep (16 KB of fp32) */

static inline __attribute__((always_inline)) int nonfinite_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x7F800000u) == 0x7F800000u;
}

/* The fixed-β one-sweep path's per-thread backup of θ* (fixed_one_sweep_*), grown to the
 * largest tensor seen up to BACKUP_MAX elements and kept (so it stays in cache); NULL for a
 * larger tensor (cache-sized or not at all: that one takes the two-sweep path) or when the
 * allocation fails. The callers' threads are torch's intra-op pool: a few MB at most. */
#define BACKUP_MAX ((int64_t)1 << 20)
static float *backup_buffer(int64_t n) {
    static __thread float *buf = NULL;
    static __thread int64_t cap = 0;
    if (n > BACKUP_MAX) return NULL;
    if (n > cap) {
        int64_t want = n < 65536 ? 65536 : n;
        float *b = (float *)realloc(buf, (size_t)want * sizeof(float));
        if (!b) return NULL;
        buf = b;
        cap = want;
    }
    return buf;
}

static inline double lanes_total(const double *acc) {
    double s = 0;
    for (int k = 0; k < LANES; k++) s += acc[k];
    return s;
}

#define DEFINE_TENSOR_FN(SUFFIX, T, LOAD)                                                        \
    static int nonfinite_##SUFFIX(int64_t n, const T *x) {                                      \
        int bad = 0;                                                                            \
        _Pragma("omp simd reduction(|:bad)")                                                    \
        for (int64_t i = 0; i < n; i++) bad |= nonfinite_bits(LOAD(x[i]));                      \
        return bad;                                                                             \
    }                                                                                           \
    static void stats_##SUFFIX(int64_t n, const T *th, const T *g, const float *e,              \
                               const float *gp, int need_stats, float *st) {                    \
        double sa = 0, sb = 0, sc = 0;                                                          \
        if (need_stats) {                                                                       \
            double ra[LANES] = {0}, rb[LANES] = {0}, rc[LANES] = {0};                           \
            int64_t i = 0;                                                                      \
            for (; i + LANES <= n; i += LANES) {                                                \
                _Pragma("omp simd")                                                             \
                for (int k = 0; k < LANES; k++) {                                               \
                    float t = LOAD(th[i + k]), gg = LOAD(g[i + k]);                             \
                    ra[k] += fabsf(t - e[i + k]);                                               \
                    rb[k] += fabsf(gg);                                                         \
                    rc[k] += fabsf(gg - gp[i + k]);                                             \
                }                                                                               \
            }                                                                                   \
            for (int k = 0; i < n; i++, k++) {                                                  \
                float t = LOAD(th[i]), gg = LOAD(g[i]);                                         \
                ra[k] += fabsf(t - e[i]);                                                       \
                rb[k] += fabsf(gg);                                                             \
                rc[k] += fabsf(gg - gp[i]);                                                     \
            }                                                                                   \
            sa = lanes_total(ra);                                                               \
            sb = lanes_total(rb);                                                               \
            sc = lanes_total(rc);                                                               \
            st[3] = (isfinite(sa) && isfinite(sb)) ? 0.0f : 1.0f;                               \
        } else {                                                                                \
            /* Only the finiteness of θ (and g, where the formula reads one) is needed. */      \
            st[3] = (nonfinite_##SUFFIX(n, th) || (g && nonfinite_##SUFFIX(n, g))) ? 1.0f : 0.0f; \
        }                                                                                       \
        st[0] = (float)sa;                                                                      \
        st[1] = (float)sb;                                                                      \
        st[2] = (float)sc;                                                                      \
    }                                                                                           \
    /* θ* ← θ*(1−α) + θα and g_prev ← g over elements [lo, hi), d's sum into rd. */            \
    static inline __attribute__((always_inline)) void apply_range_##SUFFIX(                     \
            int64_t lo, int64_t hi, const T *th, const T *g, float *e, float *gp, float om,     \
            float alpha, double *rd) {                                                          \
        int64_t i = lo;                                                                         \
        if (g && gp) {                                                                          \
            for (; i + LANES <= hi; i += LANES) {                                               \
                _Pragma("omp simd")                                                             \
                for (int k = 0; k < LANES; k++) {                                               \
                    float t = LOAD(th[i + k]);                                                  \
                    float en = e[i + k] * om + t * alpha;                                       \
                    e[i + k] = en;                                                              \
                    gp[i + k] = LOAD(g[i + k]);                                                 \
                    rd[k] += fabsf(t - en);                                                     \
                }                                                                               \
            }                                                                                   \
        } else {                                                                                \
            for (; i + LANES <= hi; i += LANES) {                                               \
                _Pragma("omp simd")                                                             \
                for (int k = 0; k < LANES; k++) {                                               \
                    float t = LOAD(th[i + k]);                                                  \
                    float en = e[i + k] * om + t * alpha;                                       \
                    e[i + k] = en;                                                              \
                    rd[k] += fabsf(t - en);                                                     \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int k = 0; i < hi; i++, k++) {                                                     \
            float t = LOAD(th[i]);                                                              \
            float en = e[i] * om + t * alpha;                                                   \
            e[i] = en;                                                                          \
            if (g && gp) gp[i] = LOAD(g[i]);                                                    \
            rd[k] += fabsf(t - en);                                                             \
        }                                                                                       \
    }                                                                                           \
    /* The update sweep (θ*, g_prev, d) of one tensor whose θ (and g) are known finite. */      \
    static float apply_##SUFFIX(int64_t n, const T *th, const T *g, float *e, float *gp,        \
                                int started, float alpha) {                                     \
        double rd[LANES] = {0};                                                                 \
        if (started) {                                                                          \
            apply_range_##SUFFIX(0, n, th, g, e, gp, 1.0f - alpha, alpha, rd);                  \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++) e[i] = LOAD(th[i]);                                 \
            if (g && gp) {                                                                      \
                for (int64_t i = 0; i < n; i++) gp[i] = LOAD(g[i]);                             \
            }                                                                                   \
        }                                                                                       \
        return (float)lanes_total(rd);                                                          \
    }                                                                                           \
    /* The fixed-β EMA of one tensor in ONE sweep: chunk by chunk, probe θ's finiteness, keep  \
     * the chunk's old θ* in `bk` (a per-thread buffer that stays in cache) and update it. A   \
     * non-finite chunk puts the chunks already updated back from `bk` (the tensor is left     \
     * untouched, as the two-sweep path leaves it) and returns 1. Why: a finiteness sweep of   \
     * θ before the update is a DRAM stream of its own, ~0.4x of a lerp; interleaved at        \
     * 16 KB, θ is probed and read from L1 (issue 28's CPU floor: fixed <= 1.15x lerp). */     \
    static int fixed_one_sweep_##SUFFIX(int64_t n, const T *th, float *e, float *bk,            \
                                        int started, float alpha, float *d_out) {               \
        double rd[LANES] = {0};                                                                 \
        const float om = 1.0f - alpha;                                                          \
        for (int64_t lo = 0; lo < n; lo += APPLY_CHUNK) {                                       \
            const int64_t hi = lo + APPLY_CHUNK < n ? lo + APPLY_CHUNK : n;                     \
            if (nonfinite_##SUFFIX(hi - lo, th + lo)) {                                         \
                memcpy(e, bk, (size_t)lo * sizeof(float));                                      \
                return 1;                                                                       \
            }                                                                                   \
            memcpy(bk + lo, e + lo, (size_t)(hi - lo) * sizeof(float));                         \
            if (started) {                                                                      \
                apply_range_##SUFFIX(lo, hi, th, NULL, e, NULL, om, alpha, rd);                 \
            } else {                                                                            \
                for (int64_t i = lo; i < hi; i++) e[i] = LOAD(th[i]);                           \
            }                                                                                   \
        }                                                                                       \
        *d_out = (float)lanes_total(rd);                                                        \
        return 0;                                                                               \
    }                                                                                           \
    void dema_cpu_##SUFFIX(int mode, int64_t count, const int64_t *idx, const int64_t *numel,  \
                           const int64_t *th_ptr, const int64_t *g_ptr, const int64_t *e_ptr,   \
                           const int64_t *gp_ptr, uint8_t *started, uint8_t *has_prev,          \
                           float *d, float *alpha, int64_t *skips, float *stats, int formula,   \
                           float scale, float fallback, float beta) {                           \
        dema_params p = {formula, scale, fallback, beta, EMA16_NONE};                           \
        /* The fixed-β EMA needs no statistics and reads no gradient: one sweep per tensor   \
         * (fixed_one_sweep_*) where its backup buffer is available. */                        \
        const int one_sweep = mode == MODE_BOTH && formula == FORMULA_FIXED;                    \
        for (int64_t k = 0; k < count; k++) {                                                   \
            int64_t j = idx[k];                                                                 \
            int64_t n = numel[j];                                                               \
            const T *th = (const T *)(intptr_t)th_ptr[j];                                       \
            const T *g = (const T *)(intptr_t)g_ptr[j];                                         \
            float *e = (float *)(intptr_t)e_ptr[j];                                             \
            float *gp = (float *)(intptr_t)gp_ptr[j];                                           \
            float *st = stats + 5 * j;                                                          \
            float *bk = one_sweep ? backup_buffer(n) : NULL;                                    \
            if (bk) {                                                                           \
                float dd = 0.0f;                                                                \
                float al = decide_alpha(&p, started[j], 0, has_prev[j], st);                    \
                st[0] = st[1] = st[2] = 0.0f;                                                   \
                st[4] = d[j];                                                                   \
                if (fixed_one_sweep_##SUFFIX(n, th, e, bk, started[j], al, &dd)) {              \
                    st[3] = 1.0f;                                                               \
                    skips[j] += 1;                                                              \
                    alpha[j] = 0.0f;                                                            \
                } else {                                                                        \
                    st[3] = 0.0f;                                                               \
                    d[j] = dd;                                                                  \
                    alpha[j] = al;                                                              \
                    started[j] = 1;                                                             \
                }                                                                               \
                continue;                                                                       \
            }                                                                                   \
            if (mode & MODE_STATS) {                                                            \
                int need = started[j] && g && gp && has_prev[j] && formula != FORMULA_FIXED;  \
                stats_##SUFFIX(n, th, g, e, gp, need, st);                                      \
                st[4] = d[j];                                                                   \
            }                                                                                   \
            if (!(mode & MODE_APPLY)) continue;                                                 \
            if (st[3] > 0.0f) { /* non-finite θ or g: leave this tensor untouched */            \
                skips[j] += 1;                                                                  \
                alpha[j] = 0.0f;                                                                \
                continue;                                                                       \
            }                                                                                   \
            float al = decide_alpha(&p, started[j], g != 0, has_prev[j], st);                   \
            d[j] = apply_##SUFFIX(n, th, g, e, gp, started[j], al);                            \
            alpha[j] = al;                                                                      \
            started[j] = 1;                                                                     \
            if (gp) has_prev[j] = g != 0;                                                       \
        }                                                                                       \
    }

DEFINE_TENSOR_FN(f32, float, LOAD_F32)
DEFINE_TENSOR_FN(bf16, uint16_t, LOAD_BF16)
#ifdef CL_CORE_HAVE_F16
DEFINE_TENSOR_FN(f16, _Float16, LOAD_F16)
#endif

/* DEMAConfig(ema_dtype="param"): θ* and g_prev stored in the parameter dtype T, and the
 * official code's arithmetic in T (EMA16: its EMA16_* code): every difference, product and
 * sum rounded to T (round16), the statistics double sums of the rounded |differences| in
 * element order rounded once to T (round_sum16), α as decide_alpha computes it in T. The
 * first update of a tensor is the official deepcopy followed by its fallback update. */
#define DEFINE_PARAM_FN(SUFFIX, T, LOAD, STORE, EMA16)                                           \
    void dema_cpu_param_##SUFFIX(int mode, int64_t count, const int64_t *idx,                  \
                                 const int64_t *numel, const int64_t *th_ptr,                  \
                                 const int64_t *g_ptr, const int64_t *e_ptr,                   \
                                 const int64_t *gp_ptr, uint8_t *started, uint8_t *has_prev,   \
                                 float *d, float *alpha, int64_t *skips, float *stats,         \
                                 int formula, float scale, float fallback, float beta) {       \
        dema_params p = {formula, scale, fallback, beta, EMA16};                               \
        for (int64_t k = 0; k < count; k++) {                                                  \
            int64_t j = idx[k];                                                                \
            int64_t n = numel[j];                                                              \
            const T *th = (const T *)(intptr_t)th_ptr[j];                                      \
            const T *g = (const T *)(intptr_t)g_ptr[j];                                        \
            T *e = (T *)(intptr_t)e_ptr[j];                                                    \
            T *gp = (T *)(intptr_t)gp_ptr[j];                                                  \
            float *st = stats + 5 * j;                                                         \
            if (mode & MODE_STATS) {                                                           \
                double sa = 0, sb = 0, sc = 0, fin = 0;                                        \
                int need = started[j] && g && gp && has_prev[j] && formula != FORMULA_FIXED; \
                for (int64_t i = 0; i < n; i++) {                                              \
                    float t = LOAD(th[i]);                                                     \
                    fin += t - t;                                                              \
                    if (need) {                                                                \
                        float gg = LOAD(g[i]);                                                 \
                        sa += fabsf(round16(t - LOAD(e[i]), EMA16));                           \
                        sb += fabsf(gg);                                                       \
                        sc += fabsf(round16(gg - LOAD(gp[i]), EMA16));                         \
                    }                                                                          \
                }                                                                              \
                if (g) {                                                                       \
                    for (int64_t i = 0; i < n; i++) {                                          \
                        float gg = LOAD(g[i]);                                                 \
                        fin += gg - gg;                                                        \
                    }                                                                          \
                }                                                                              \
                st[0] = round_sum16(sa, EMA16);                                                \
                st[1] = round_sum16(sb, EMA16);                                                \
                st[2] = round_sum16(sc, EMA16);                                                \
                st[3] = isnan(fin) ? 1.0f : 0.0f;                                              \
                st[4] = d[j];                                                                  \
            }                                                                                  \
            if (!(mode & MODE_APPLY)) continue;                                                \
            if (st[3] > 0.0f) {                                                                \
                skips[j] += 1;                                                                 \
                alpha[j] = 0.0f;                                                               \
                continue;                                                                      \
            }                                                                                  \
            float al = decide_alpha(&p, started[j], g != 0, has_prev[j], st);                  \
            const float om = 1.0f - al;                                                        \
            const int was_started = started[j]; /* a local: e[i] stores may alias a uint8 */   \
            double sd = 0;                                                                     \
            for (int64_t i = 0; i < n; i++) {                                                  \
                float t = LOAD(th[i]);                                                         \
                /* the first update: θ* starts as θ (the official deepcopy) */                 \
                float eo = was_started ? LOAD(e[i]) : t;                                       \
                float en = round16(round16(eo * om, EMA16) + round16(t * al, EMA16), EMA16);   \
                e[i] = STORE(en);                                                              \
                sd += fabsf(round16(t - en, EMA16));                                           \
            }                                                                                  \
            if (g && gp) {                                                                     \
                for (int64_t i = 0; i < n; i++) gp[i] = g[i];                                  \
            }                                                                                  \
            d[j] = round_sum16(sd, EMA16);                                                     \
            alpha[j] = al;                                                                     \
            started[j] = 1;                                                                    \
            if (gp) has_prev[j] = g != 0;                                                      \
        }                                                                                      \
    }

DEFINE_PARAM_FN(bf16, uint16_t, LOAD_BF16, STORE_BF16, EMA16_BF16)
#ifdef CL_CORE_HAVE_F16
DEFINE_PARAM_FN(f16, _Float16, LOAD_F16, STORE_F16, EMA16_F16)
#endif
