/* Shared by the native CPU kernels: the named layouts (the C mirror of
 * kernels/layouts.py), dtype conversions and the α rule of docs/design.md §2. */
#ifndef CL_CORE_DEMA_COMMON_H
#define CL_CORE_DEMA_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Every number the C kernels share with Python, each under the name kernels/layouts.py
 * gives it: X(name, value). The values are written here once; fused_cpu.c exports the
 * list (cpu_fused_layout) and kernels/cpu_fused.py checks it against layouts.py, so
 * the two sides cannot drift apart. A slot index means one value for one optimizer kind
 * (H_BETA1 and H_MOMENTUM are both slot 2: Adam reads one, SGD the other). */
#define CL_CORE_SHARED_LAYOUT(X)                                                                 \
    /* α formula (DEMAConfig.formula) */                                                         \
    X(FORMULA_OFFICIAL, 0) X(FORMULA_PAPER, 1) X(FORMULA_FIXED, 2)                               \
    /* optimizer kinds of the fused step */                                                      \
    X(KIND_ADAM, 0) X(KIND_ADAMW, 1) X(KIND_SGD, 2)                                              \
    /* the EMA update a fused step leaves pending */                                             \
    X(PEND_NONE, 0) X(PEND_INIT, 1) X(PEND_EMA, 2)                                               \
    /* hyper-parameter row (float64, one per optimizer param group) */                           \
    X(N_HYPER, 8) X(H_LR, 0) X(H_WEIGHT_DECAY, 1)                                                \
    X(H_BETA1, 2) X(H_BETA2, 3) X(H_EPS, 4)                                                      \
    X(H_MOMENTUM, 2) X(H_DAMPENING, 3) X(H_NESTEROV, 4)                                          \
    /* per-tensor static table, int64 [N_STATIC, T] */                                           \
    X(N_STATIC, 8) X(S_PARAM, 0) X(S_EXP_AVG, 1) X(S_EXP_AVG_SQ, 2) X(S_EMA, 3)                  \
    X(S_GRAD_PREV, 4) X(S_NUMEL, 5) X(S_GROUP, 6)                                                \
    /* per-tensor dynamic table, int64 [N_DYNAMIC, T], written every step */                     \
    X(N_DYNAMIC, 3) X(D_GRAD, 0) X(D_STEP, 1) X(D_FLAGS, 2)                                      \
    X(DF_HAS_GRAD, 1) X(DF_FIRST, 2)                                                             \
    /* per-tensor statistics, fp32 [T, N_DSTAT] */                                               \
    X(N_DSTAT, 5) X(DS_A, 0) X(DS_B, 1) X(DS_C, 2) X(DS_NONFINITE, 3) X(DS_D, 4)

#define CL_CORE_ENUM_ITEM(name, value) name = value,
enum { CL_CORE_SHARED_LAYOUT(CL_CORE_ENUM_ITEM) };

/* bf16 <-> fp32. Always inlined and branch-free: the fused sweeps inline many specialised
 * loops into one function, past GCC's inlining budget, and a conversion left as a call (or
 * with a NaN branch) keeps its loop scalar (measured: the bf16 AdamW sweep ~17x slower per
 * element than fp32's). */
static inline __attribute__((always_inline)) float bf16_to_f32(uint16_t h) {
    const uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, as torch does; NaN -> 0x7FC0 */
static inline __attribute__((always_inline)) uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

/* The 16-bit dtype an EMA keeps its arithmetic in (DEMAConfig(ema_dtype="param")), or none. */
enum { EMA16_NONE = 0, EMA16_BF16 = 1, EMA16_F16 = 2 };

/* float32 x rounded to the EMA's 16-bit dtype (to nearest, ties to even), as float32. */
static inline __attribute__((always_inline)) float round16(float x, int ema16) {
    if (ema16 == EMA16_BF16) return bf16_to_f32(f32_to_bf16(x));
#ifdef CL_CORE_HAVE_F16
    if (ema16 == EMA16_F16) return (float)(_Float16)x;
#endif
    return x;
}

/* A double sum rounded ONCE to the 16-bit dtype, as float32 (the engine's round_sum,
 * cl_core/dema/state.py): double -> float rounds to odd (truncate; set the last bit when
 * inexact), then float -> 16-bit to nearest even. A plain (float) cast first would round
 * twice (a sum just above a 16-bit midpoint lands on it in float, then goes to even). */
static inline float round_sum16(double x, int ema16) {
    float f = (float)x;
    if ((double)f != x && x == x) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if (fabs((double)f) > fabs(x)) u -= 1; /* one step toward zero: the truncation */
        u |= 1u;
        memcpy(&f, &u, 4);
    }
    return round16(f, ema16);
}

typedef struct {
    int formula;
    float scale, fallback, beta;
    int ema16; /* EMA16_*: α in the official code's 16-bit arithmetic */
} dema_params;

/* st: one row of N_DSTAT statistics (DS_*). Same operation order as the reference backend;
 * with ema16 every result rounded to that dtype as the official code's 16-bit tensor ops
 * (state.py dynamic_alpha): t1 = 1 + b, t2 = a·c, q = t1 / t2, α = q · (scale or d). */
static inline float decide_alpha(const dema_params *p, int started, int has_grad, int has_prev,
                                 const float *st) {
    if (!started) return p->formula == FORMULA_FIXED ? 1.0f - p->beta : p->fallback;
    if (p->formula == FORMULA_FIXED) return 1.0f - p->beta;
    if (!has_grad || !has_prev) return p->fallback;
    const int r = p->ema16;
    float q = round16(round16(1.0f + st[DS_B], r) / round16(st[DS_A] * st[DS_C], r), r);
    float alpha = round16(q * (p->formula == FORMULA_OFFICIAL ? p->scale : st[DS_D]), r);
    if (!(alpha > 0.0f && alpha < 1.0f)) alpha = p->fallback;
    return alpha;
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
#define LOAD_F16(x) ((float)(x))
#define STORE_F32(x) (x)
#define STORE_BF16(x) f32_to_bf16(x)
#define STORE_F16(x) ((_Float16)(x))

#endif
