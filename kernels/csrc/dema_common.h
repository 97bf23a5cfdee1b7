/* Shared by the native CPU kernels: dtype conversions and the α rule of DESIGN.md §2. */
#ifndef CL_CORE_DEMA_COMMON_H
#define CL_CORE_DEMA_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F_OFFICIAL = 0, F_PAPER = 1, F_FIXED = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (isnan(f)) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

typedef struct {
    int formula;
    float scale, fallback, beta;
} dema_params;

/* st: a, b, c, nonfinite, d. Same operation order as the reference backend. */
static inline float decide_alpha(const dema_params *p, int started, int has_grad, int has_prev,
                                 const float *st) {
    if (!started) return p->formula == F_FIXED ? 1.0f - p->beta : p->fallback;
    if (p->formula == F_FIXED) return 1.0f - p->beta;
    if (!has_grad || !has_prev) return p->fallback;
    float q = (1.0f + st[1]) / (st[0] * st[2]);
    float alpha = q * (p->formula == F_OFFICIAL ? p->scale : st[4]);
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
