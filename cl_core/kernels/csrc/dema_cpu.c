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
#include "dema_common.h"

enum { MODE_STATS = 1, MODE_APPLY = 2, MODE_BOTH = 3 };

#define DEFINE_TENSOR_FN(SUFFIX, T, LOAD)                                                        \
    static void stats_##SUFFIX(int64_t n, const T *th, const T *g, const float *e,              \
                               const float *gp, int need_stats, float *st) {                    \
        double sa = 0, sb = 0, sc = 0;                                                          \
        if (need_stats) {                                                                       \
            _Pragma("omp simd reduction(+:sa,sb,sc)")                                           \
            for (int64_t i = 0; i < n; i++) {                                                   \
                float t = LOAD(th[i]), gg = LOAD(g[i]);                                         \
                sa += fabsf(t - e[i]);                                                          \
                sb += fabsf(gg);                                                                \
                sc += fabsf(gg - gp[i]);                                                        \
            }                                                                                   \
            st[3] = (isfinite(sa) && isfinite(sb)) ? 0.0f : 1.0f;                               \
        } else {                                                                                \
            /* Only the finiteness of θ (and g) is needed: x - x is NaN for NaN/inf. */         \
            float fin = 0.0f;                                                                   \
            _Pragma("omp simd reduction(+:fin)")                                                \
            for (int64_t i = 0; i < n; i++) {                                                   \
                float t = LOAD(th[i]);                                                          \
                fin += t - t;                                                                   \
            }                                                                                   \
            if (g) {                                                                            \
                _Pragma("omp simd reduction(+:fin)")                                            \
                for (int64_t i = 0; i < n; i++) {                                               \
                    float gg = LOAD(g[i]);                                                      \
                    fin += gg - gg;                                                             \
                }                                                                               \
            }                                                                                   \
            st[3] = isnan(fin) ? 1.0f : 0.0f;                                                   \
        }                                                                                       \
        st[0] = (float)sa;                                                                      \
        st[1] = (float)sb;                                                                      \
        st[2] = (float)sc;                                                                      \
    }                                                                                           \
    static float apply_##SUFFIX(int64_t n, const T *th, const T *g, float *e, float *gp,        \
                                int started, float alpha) {                                     \
        double sd = 0;                                                                          \
        if (started) {                                                                          \
            const float om = 1.0f - alpha;                                                      \
            _Pragma("omp simd reduction(+:sd)")                                                 \
            for (int64_t i = 0; i < n; i++) {                                                   \
                float t = LOAD(th[i]);                                                          \
                float en = e[i] * om + t * alpha;                                               \
                e[i] = en;                                                                      \
                sd += fabsf(t - en);                                                            \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t i = 0; i < n; i++) e[i] = LOAD(th[i]);                                 \
        }                                                                                       \
        if (g && gp) {                                                                          \
            for (int64_t i = 0; i < n; i++) gp[i] = LOAD(g[i]);                                 \
        }                                                                                       \
        return (float)sd;                                                                       \
    }                                                                                           \
    void dema_cpu_##SUFFIX(int mode, int64_t count, const int64_t *idx, const int64_t *numel,  \
                           const int64_t *th_ptr, const int64_t *g_ptr, const int64_t *e_ptr,   \
                           const int64_t *gp_ptr, uint8_t *started, uint8_t *has_prev,          \
                           float *d, float *alpha, int64_t *skips, float *stats, int formula,   \
                           float scale, float fallback, float beta) {                           \
        dema_params p = {formula, scale, fallback, beta, EMA16_NONE};                           \
        for (int64_t k = 0; k < count; k++) {                                                   \
            int64_t j = idx[k];                                                                 \
            int64_t n = numel[j];                                                               \
            const T *th = (const T *)(intptr_t)th_ptr[j];                                       \
            const T *g = (const T *)(intptr_t)g_ptr[j];                                         \
            float *e = (float *)(intptr_t)e_ptr[j];                                             \
            float *gp = (float *)(intptr_t)gp_ptr[j];                                           \
            float *st = stats + 5 * j;                                                          \
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
