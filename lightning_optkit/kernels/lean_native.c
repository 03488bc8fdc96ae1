/* AdamW over memory-lean state in one pass per quantization block (the CPU path of lean_adamw.py).
 *
 * Built and loaded by lean_native.py (gcc/cc, -O3 -ffp-contract=off: IEEE fp32 operations in a fixed
 * order, so results do not depend on the vector width or the number of threads). The algorithm is the
 * one of lean_adamw.py and lean_codec.py: decode, the AdamW update of torch.optim.AdamW in fp32,
 * encode; the codes, scales and the hash of the stochastic rounding are the same definitions.
 *
 * One call updates one contiguous tensor viewed as rows x len. Each block of at most 256 elements of a
 * row is decoded into stack buffers, updated and encoded again: one read and one write of every byte of
 * parameter, gradient and state, no temporaries on the heap. Rows are split over nthreads threads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_INT8 = 2 };
/* hyper[]: the step's scalars, fp32 */
enum { H_B1W, H_B2, H_B2W, H_EPS, H_STEP_SIZE, H_BC2_SQRT, H_DECAY, H_MULT, H_KEEP, H_COUNT };

typedef struct {
    int64_t rows, len;
    void *p; int p_bf16;
    const void *g; int g_bf16;
    void *m; void *v; float *m_scale; float *v_scale;
    int kind, maximize, param_sr;
    const float *hyper;
    const int64_t *keys; /* moment key, param key: in [0, 2**32) */
    int64_t r0, r1;
} job_t;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline uint16_t bf16_nearest(float f) { /* c10's round_to_nearest_even */
    if (f != f) return 0x7FC0;
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t bf16_stochastic(float f, uint32_t noise16) {
    return (uint16_t)((f32_bits(f) + noise16) >> 16);
}

static inline float clamp1(float x) { /* min(x, 1) for x >= 0, on the bits (vectorizes) */
    uint32_t u = f32_bits(x);
    u = u < 0x3F800000u ? u : 0x3F800000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t lowbias32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

static void block_step(const job_t *j, int64_t row, int64_t j0, int64_t w) {
    const float *hp = j->hyper;
    const float b1w = hp[H_B1W], b2 = hp[H_B2], b2w = hp[H_B2W], eps = hp[H_EPS];
    const float step_size = hp[H_STEP_SIZE], bc2 = hp[H_BC2_SQRT], decay = hp[H_DECAY], mult = hp[H_MULT];
    const int64_t base = row * j->len + j0;
    float g[BLOCK], m[BLOCK], v[BLOCK], root[BLOCK], p[BLOCK];
    if (j->g_bf16) {
        const uint16_t *gs = (const uint16_t *)j->g + base;
        for (int64_t i = 0; i < w; i++) g[i] = bf16_to_f32(gs[i]) * mult;
    } else {
        const float *gs = (const float *)j->g + base;
        for (int64_t i = 0; i < w; i++) g[i] = gs[i] * mult;
    }
    if (j->maximize)
        for (int64_t i = 0; i < w; i++) g[i] = -g[i];
    if (j->p_bf16) {
        const uint16_t *ps = (const uint16_t *)j->p + base;
        for (int64_t i = 0; i < w; i++) p[i] = bf16_to_f32(ps[i]);
    } else {
        memcpy(p, (const float *)j->p + base, (size_t)w * sizeof(float));
    }
    int64_t nb = (j->len + BLOCK - 1) / BLOCK, sidx = row * nb + j0 / BLOCK;
    if (j->kind == KIND_INT8) {
        const int8_t *qm = (const int8_t *)j->m + base;
        const uint8_t *qv = (const uint8_t *)j->v + base;
        const float mu = j->m_scale[sidx] * (float)(1.0 / (127.0 * 127.0));
        const float vu = j->v_scale[sidx] * (float)(1.0 / (255.0 * 255.0));
        for (int64_t i = 0; i < w; i++) {
            float a = (float)qm[i], b = (float)qv[i];
            m[i] = a * fabsf(a) * mu;
            float r = b * b * vu;
            v[i] = r * r;
        }
    } else if (j->kind == KIND_BF16) {
        const uint16_t *ms = (const uint16_t *)j->m + base, *vs = (const uint16_t *)j->v + base;
        for (int64_t i = 0; i < w; i++) {
            m[i] = bf16_to_f32(ms[i]);
            v[i] = bf16_to_f32(vs[i]);
        }
    } else {
        memcpy(m, (const float *)j->m + base, (size_t)w * sizeof(float));
        memcpy(v, (const float *)j->v + base, (size_t)w * sizeof(float));
    }
    /* torch's lerp: a fused multiply-add from the nearer end */
    if (b1w < 0.5f) {
        for (int64_t i = 0; i < w; i++) m[i] = fmaf(b1w, g[i] - m[i], m[i]);
    } else {
        const float c = 1.0f - b1w;
        for (int64_t i = 0; i < w; i++) m[i] = fmaf(-c, g[i] - m[i], g[i]);
    }
    const float inv_bc2 = 1.0f / bc2; /* bc2 = sqrt(1 - beta2**t) >= sqrt(1 - beta2): no overflow */
    for (int64_t i = 0; i < w; i++) {
        v[i] = v[i] * b2 + b2w * g[i] * g[i];
        root[i] = sqrtf(v[i]);
        float denom = root[i] * inv_bc2 + eps;
        p[i] = p[i] * decay - m[i] / denom * step_size;
    }
    if (j->kind == KIND_INT8) {
        /* block maxima of |m| and sqrt(v): values >= 0 order like their bits, and an integer max
           reduction vectorizes (a NaN, whose bits are above inf's, propagates) */
        uint32_t bm = 0, bv = 0;
        for (int64_t i = 0; i < w; i++) {
            uint32_t a = f32_bits(m[i]) & 0x7FFFFFFFu, b = f32_bits(root[i]) & 0x7FFFFFFFu;
            bm = a > bm ? a : bm;
            bv = b > bv ? b : bv;
        }
        float sm, sv;
        memcpy(&sm, &bm, 4);
        memcpy(&sv, &bv, 4);
        int8_t *qm = (int8_t *)j->m + base;
        uint8_t *qv = (uint8_t *)j->v + base;
        /* |x| / s as |x| * (1 / s): s is the block's largest |x|, so the quotient is at most 1 (clamped
           against the product's rounding); below 2**-120 (1 / s near overflow, blocks of subnormal
           values) a true division. A zero block has s = 0 and codes 0. */
        const float tiny = 0x1p-120f;
        const float rm = sm >= tiny ? 1.0f / sm : 0.0f, rv = sv >= tiny ? 1.0f / sv : 0.0f;
        const float dm = sm > 0.0f ? sm : 1.0f, dv = sv > 0.0f ? sv : 1.0f;
        if (sm >= tiny) {
            for (int64_t i = 0; i < w; i++) {
                float a = sqrtf(clamp1(fabsf(m[i]) * rm)) * 127.0f + 0.5f;
                qm[i] = (int8_t)(int32_t)copysignf(a, m[i]);
            }
        } else {
            for (int64_t i = 0; i < w; i++) {
                float a = sqrtf(fabsf(m[i]) / dm) * 127.0f + 0.5f;
                qm[i] = (int8_t)(int32_t)copysignf(a, m[i]);
            }
        }
        if (sv >= tiny) {
            for (int64_t i = 0; i < w; i++) qv[i] = (uint8_t)(int32_t)(sqrtf(clamp1(root[i] * rv)) * 255.0f + 0.5f);
        } else {
            for (int64_t i = 0; i < w; i++) qv[i] = (uint8_t)(int32_t)(sqrtf(root[i] / dv) * 255.0f + 0.5f);
        }
        j->m_scale[sidx] = sm;
        j->v_scale[sidx] = sv;
    } else if (j->kind == KIND_BF16) {
        uint16_t *ms = (uint16_t *)j->m + base, *vs = (uint16_t *)j->v + base;
        const uint32_t key = (uint32_t)j->keys[0];
        for (int64_t i = 0; i < w; i++) {
            uint32_t h = lowbias32((uint32_t)(base + i) + key);
            ms[i] = bf16_stochastic(m[i], h & 0xFFFFu);
            vs[i] = bf16_stochastic(v[i], h >> 16);
        }
    } else {
        memcpy((float *)j->m + base, m, (size_t)w * sizeof(float));
        memcpy((float *)j->v + base, v, (size_t)w * sizeof(float));
    }
    if (!j->p_bf16) {
        memcpy((float *)j->p + base, p, (size_t)w * sizeof(float));
    } else if (j->param_sr) {
        uint16_t *ps = (uint16_t *)j->p + base;
        const uint32_t key = (uint32_t)j->keys[1];
        for (int64_t i = 0; i < w; i++) ps[i] = bf16_stochastic(p[i], lowbias32((uint32_t)(base + i) + key) & 0xFFFFu);
    } else {
        uint16_t *ps = (uint16_t *)j->p + base;
        for (int64_t i = 0; i < w; i++) ps[i] = bf16_nearest(p[i]);
    }
}

static void *run_rows(void *arg) {
    const job_t *j = (const job_t *)arg;
    /* int8 blocks never cross a row; the other kinds are element-wise, any split is the same */
    for (int64_t r = j->r0; r < j->r1; r++)
        for (int64_t j0 = 0; j0 < j->len; j0 += BLOCK)
            block_step(j, r, j0, j->len - j0 < BLOCK ? j->len - j0 : BLOCK);
    return NULL;
}

/* Returns 0, or 1 when the step is skipped (hyper[H_KEEP] == 0: nothing is written). */
int lean_adamw_native(int64_t rows, int64_t len, void *p, int p_bf16, const void *g, int g_bf16, void *m, void *v,
                      float *m_scale, float *v_scale, int kind, int maximize, int param_sr, const float *hyper,
                      const int64_t *keys, int nthreads) {
    if (hyper[H_KEEP] == 0.0f) return 1;
    job_t base = {rows, len, p, p_bf16, g, g_bf16, m, v, m_scale, v_scale, kind, maximize, param_sr, hyper, keys, 0,
                  rows};
    if (nthreads > rows) nthreads = (int)rows;
    if (nthreads <= 1) {
        run_rows(&base);
        return 0;
    }
    if (nthreads > 64) nthreads = 64;
    job_t jobs[64];
    pthread_t tids[64];
    int started[64];
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = base;
        jobs[t].r0 = rows * t / nthreads;
        jobs[t].r1 = rows * (t + 1) / nthreads;
        started[t] = t > 0 && pthread_create(&tids[t], NULL, run_rows, &jobs[t]) == 0;
    }
    run_rows(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_rows(&jobs[t]);
    }
    return 0;
}
