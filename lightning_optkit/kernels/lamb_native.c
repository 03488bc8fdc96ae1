/* LAMB over a list of contiguous CPU tensors in one call (the CPU path of optim/lamb.py).
 *
 * Built and loaded by lamb_native.py through native.py (cc, -O3 -ffp-contract=off: every operation IEEE, in
 * a fixed order; the FMAs are written out where eager torch makes one). The rule is LAMB._direction's ops and
 * the trust ratio of LAMB._update, op for op:
 *     m <- lerp(m, g, c1)                      (torch's CPU lerp: one FMA, its two branches)
 *     v <- fma(c2 * g, g, v * beta2)           (mul_, then addcmul_: one FMA)
 *     u  = m / bc1 / (sqrt(v / bc2) + eps)     [+ fma(p, wd, u) with weight decay]
 *     r  = ||p|| / ||u|| (1 when either is 0), clamped to max_ratio, times -lr
 *     p <- p + u * r                           (mul_, then add_: two roundings)
 * whole tensor by whole tensor: pass 1 (the moments and u, into a scratch row, and the sums of squares of p
 * and u) and pass 2 (p) run while the tensor is in cache, and u never leaves the scratch. The sums of
 * squares are accumulated in double over 8 fixed lanes and 1024-element chunks (the same order whatever the
 * vector width or thread count), so the norms are at least as accurate as torch._foreach_norm's; this is the
 * one place the results differ from the eager rule (by roundoff, with eager sqrt's 1-ulp errors).
 *
 * Threads take whole tensors (one tensor is always updated by one thread, in one order): the bits do not
 * depend on the thread count. A skipped step (*skip != 0) writes nothing but the scaled gradients, as the
 * eager rule does; the grad scale, when given, multiplies g in place first.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

#define CHUNK 1024
#define LANES 8

typedef struct {
    int64_t count;
    const int64_t *numel;
    void *const *p; void *const *g; void *const *m; void *const *v;
    const void *const *bc1; const void *const *bc2; /* pointers to 0-d tensors of the parameter's dtype */
    const void *scale;                               /* 0-d, the parameter's dtype, or NULL */
    const uint8_t *skip;                             /* 0-d bool, or NULL */
    double c1, beta2, c2, eps, wd, max_ratio, neg_lr;
    int decayed, dbl;
    void *scratch; int64_t scratch_row;              /* one row of scratch_row elements per thread */
    int64_t next;                                    /* the next tensor to take (atomic) */
} lamb_t;

typedef struct { lamb_t *job; int thread; } worker_t;

#define DEFINE_LAMB(T, SUFFIX, FMA, SQRT)                                                                   \
static void lamb_tensor_##SUFFIX(const lamb_t *j, int64_t i, T *u) {                                        \
    const int64_t n = j->numel[i];                                                                          \
    T *p = (T *)j->p[i], *g = (T *)j->g[i], *m = (T *)j->m[i], *v = (T *)j->v[i];                         \
    const T bc1 = *(const T *)j->bc1[i], bc2 = *(const T *)j->bc2[i];                                       \
    const T c1 = (T)j->c1, c1m1 = (T)j->c1 - (T)1, beta2 = (T)j->beta2, c2 = (T)j->c2, eps = (T)j->eps;    \
    const T wd = (T)j->wd;                                                                                  \
    const int small = fabs((double)c1) < 0.5;                                                               \
    const T s = j->scale ? *(const T *)j->scale : (T)1;                                                     \
    if (j->skip && *j->skip) {                                                                              \
        if (j->scale)                                                                                       \
            for (int64_t k = 0; k < n; k++) g[k] = g[k] * s;                                                \
        return;                                                                                             \
    }                                                                                                       \
    double sp[LANES] = {0}, su[LANES] = {0};                                                                \
    for (int64_t k0 = 0; k0 < n; k0 += CHUNK) {                                                             \
        const int64_t w = n - k0 < CHUNK ? n - k0 : CHUNK;                                                  \
        T *pk = p + k0, *gk = g + k0, *mk = m + k0, *vk = v + k0, *uk = u + k0;                             \
        if (j->scale)                                                                                       \
            for (int64_t k = 0; k < w; k++) gk[k] = gk[k] * s;                                              \
        if (small) {                                                                                        \
            for (int64_t k = 0; k < w; k++) mk[k] = FMA(c1, gk[k] - mk[k], mk[k]);                          \
        } else {                                                                                            \
            for (int64_t k = 0; k < w; k++) mk[k] = FMA(c1m1, gk[k] - mk[k], gk[k]);                        \
        }                                                                                                   \
        for (int64_t k = 0; k < w; k++) {                                                                   \
            const T vn = FMA(c2 * gk[k], gk[k], vk[k] * beta2);                                             \
            vk[k] = vn;                                                                                     \
            uk[k] = mk[k] / bc1 / (SQRT(vn / bc2) + eps);                                                   \
        }                                                                                                   \
        if (j->decayed)                                                                                     \
            for (int64_t k = 0; k < w; k++) uk[k] = FMA(pk[k], wd, uk[k]);                                  \
        int64_t k = 0;                                                                                      \
        for (; k + LANES <= w; k += LANES)                                                                  \
            for (int l = 0; l < LANES; l++) {                                                               \
                const double x = (double)pk[k + l], y = (double)uk[k + l];                                  \
                sp[l] += x * x;                                                                             \
                su[l] += y * y;                                                                             \
            }                                                                                               \
        for (int l = 0; k < w; k++, l++) {                                                                  \
            const double x = (double)pk[k], y = (double)uk[k];                                              \
            sp[l] += x * x;                                                                                 \
            su[l] += y * y;                                                                                 \
        }                                                                                                   \
    }                                                                                                       \
    const double sum_p = ((sp[0] + sp[1]) + (sp[2] + sp[3])) + ((sp[4] + sp[5]) + (sp[6] + sp[7]));        \
    const double sum_u = ((su[0] + su[1]) + (su[2] + su[3])) + ((su[4] + su[5]) + (su[6] + su[7]));        \
    const T norm_p = (T)sqrt(sum_p), norm_u = (T)sqrt(sum_u);                                               \
    T ratio = (norm_p > 0 && norm_u > 0) ? norm_p / norm_u : (T)1;                                          \
    if (ratio > (T)j->max_ratio) ratio = (T)j->max_ratio;                                                   \
    ratio = ratio * (T)j->neg_lr;                                                                           \
    for (int64_t k = 0; k < n; k++) {                                                                       \
        const T step = u[k] * ratio;                                                                        \
        p[k] = p[k] + step;                                                                                 \
    }                                                                                                       \
}

DEFINE_LAMB(float, f32, fmaf, sqrtf)
DEFINE_LAMB(double, f64, fma, sqrt)

static void *work(void *arg) {
    worker_t *w = (worker_t *)arg;
    lamb_t *j = w->job;
    for (;;) {
        const int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->count) break;
        if (j->dbl)
            lamb_tensor_f64(j, i, (double *)j->scratch + w->thread * j->scratch_row);
        else
            lamb_tensor_f32(j, i, (float *)j->scratch + w->thread * j->scratch_row);
    }
    return NULL;
}

/* One LAMB step of `count` tensors of one dtype (dbl: float64, else float32). Returns 0. */
int lamb_native(int64_t count, const int64_t *numel, void *const *p, void *const *g, void *const *m,
                void *const *v, const void *const *bc1, const void *const *bc2, const void *scale,
                const uint8_t *skip, const double *hyper, int decayed, int dbl, void *scratch,
                int64_t scratch_row, int nthreads) {
    lamb_t job = {count, numel, p, g, m, v, bc1, bc2, scale, skip, hyper[0], hyper[1], hyper[2], hyper[3],
                  hyper[4], hyper[5], hyper[6], decayed, dbl, scratch, scratch_row, 0};
    if (nthreads > count) nthreads = (int)count;
    if (nthreads > 64) nthreads = 64;
    if (nthreads <= 1) {
        worker_t only = {&job, 0};
        work(&only);
        return 0;
    }
    worker_t workers[64];
    pthread_t tids[64];
    int started[64];
    for (int t = 0; t < nthreads; t++) {
        workers[t].job = &job;
        workers[t].thread = t;
        started[t] = t > 0 && pthread_create(&tids[t], NULL, work, &workers[t]) == 0;
    }
    work(&workers[0]);
    for (int t = 1; t < nthreads; t++)
        if (started[t]) pthread_join(tids[t], NULL);
    return 0;
}
