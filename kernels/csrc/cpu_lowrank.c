/* compress_export.kernels._cpu: the fused low-rank correction of a linear, y[M, N] += B·(A·x), for few rows of x.
 *
 * Why a kernel: an EoRA correction (rank 16-64) on the side of each quantized linear is two skinny products. As two
 * torch matmuls per linear they cost ~65 µs each at decode on two AVX2 cores, and a merged linear (q/k/v, gate/up)
 * needed a block-diagonal B full of zero blocks to stay at two. Here one call per linear reads each factor once,
 * in 16-bit floats, skips the zero blocks, and writes only the columns each part owns.
 *
 *   t[m, :] = A · x[m, :]                       (all parts' ranks at once: A stacks them)
 *   y[m, c_p + n] += Σ_j B_p[n, j] · t[m, r_p0 + j]    for each part p and n < N_p
 *
 * Layouts (prepared at load by kernels/lowrank.py; never stored in a checkpoint):
 *   A      uint16 [R, K]: fp16 (IEEE half) or bf16 bits, row-major; rows r_p0 .. r_p0+r_p-1 are part p's A_p.
 *   B      uint16, the parts' blocks concatenated in part order; block p is B_p [N_p, r_p] row-major (PEFT's lora_B
 *          layout), same 16-bit type as A.
 *   parts  int64 [P, 4]: (c_p, N_p, r_p0, r_p) per corrected part, c_p ascending and the column ranges disjoint (an
 *          uncorrected part of a merged linear has no row: its columns are left untouched).
 *   x      fp32 or bf16 [M, K], y fp32 or bf16 [M, N], both row-major; y is updated in place (rounded once to
 *          bf16 when y is bf16). t is an fp32 scratch; all sums are fp32.
 * NaN or Inf anywhere in x or the factors reaches y (nothing is skipped), so a bad value never turns finite.
 *
 * Variants: portable C (the reference: sequential fp32 sums) and AVX2 (F16C/shift widening + FMA, 8 lanes).
 * Threads: OpenMP over A's rows, then over each part's output columns; one thread when the call is too small to
 * repay waking the others. */
#include "cpu_common.h"

typedef struct {
    int64_t M, K, N, R, P;
    const float *x;        /* [M, K] fp32 (a bf16 x is widened into scratch first) */
    const uint16_t *A;     /* [R, K] */
    const uint16_t *B;     /* concatenated blocks */
    const int64_t *parts;  /* [P, 4] */
    const int64_t *boff;   /* [P] element offset of block p in B */
    float *t;              /* [M, R] scratch */
    float *yf;             /* y when fp32, else NULL */
    uint16_t *yb;          /* y when bf16, else NULL */
    int fbf16;             /* factors are bf16 (else fp16) */
} Job;

enum { A_CHUNK = 4, B_CHUNK = 16, MB = 4 };

static inline float widen(uint16_t v, int bf16) { return bf16 ? bf2f(v) : h2f(v); }

static inline void y_add(const Job *j, int64_t m, int64_t col, float v) {
    int64_t i = m * j->N + col;
    if (j->yf)
        j->yf[i] += v;
    else
        j->yb[i] = f2bf(bf2f(j->yb[i]) + v);
}

/* ---- portable C: the reference ---------------------------------------------------------------------------- */

static void a_rows_c(const Job *j, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *a = j->A + r * j->K;
        for (int64_t m = 0; m < j->M; m++) {
            const float *x = j->x + m * j->K;
            float acc = 0.f;
            for (int64_t k = 0; k < j->K; k++) acc += widen(a[k], j->fbf16) * x[k];
            j->t[m * j->R + r] = acc;
        }
    }
}

static void b_rows_c(const Job *j, int64_t p, int64_t n0, int64_t n1) {
    const int64_t *q = j->parts + 4 * p;
    int64_t col0 = q[0], rb = q[2], rk = q[3];
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *b = j->B + j->boff[p] + n * rk;
        for (int64_t m = 0; m < j->M; m++) {
            const float *t = j->t + m * j->R + rb;
            float acc = 0.f;
            for (int64_t i = 0; i < rk; i++) acc += widen(b[i], j->fbf16) * t[i];
            y_add(j, m, col0 + n, acc);
        }
    }
}

/* ---- AVX2 + FMA + F16C ------------------------------------------------------------------------------------ */
#ifdef CE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline __m256 load8(const uint16_t *p, int bf16) { /* 8 factors widened to fp32 (exact) */
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[i] = Σ_k w[k] · v_i[k] for `nv` (≤ MB) fp32 vectors v_i = v + i·ld sharing one 16-bit row w: w is widened
 * once per 8 columns and feeds every row, so a row of A (or B) is read once per MB rows of x (or t). */
AVX2 static inline __attribute__((always_inline)) void dots(const uint16_t *w, const float *v, int64_t ld,
                                                            int64_t len, int bf16, const int nv, float *out) {
    __m256 acc[MB];
    for (int i = 0; i < MB; i++) acc[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= len; k += 8) {
        __m256 a = load8(w + k, bf16);
        for (int i = 0; i < nv; i++) acc[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(v + i * ld + k), acc[i]);
    }
    for (int i = 0; i < nv; i++) {
        float s = hsum8(acc[i]);
        for (int64_t kk = k; kk < len; kk++) s += widen(w[kk], bf16) * v[i * ld + kk];
        out[i] = s;
    }
}

/* nv as a literal in each call, so the inlined loops over rows unroll and the accumulators stay in registers */
#define DOTS(nv, ...)                                                                                              \
    switch (nv) {                                                                                                  \
        case 1: dots(__VA_ARGS__, 1, out); break;                                                                   \
        case 2: dots(__VA_ARGS__, 2, out); break;                                                                   \
        case 3: dots(__VA_ARGS__, 3, out); break;                                                                   \
        default: dots(__VA_ARGS__, 4, out); break;                                                                  \
    }

AVX2 static void a_rows_avx2(const Job *j, int64_t r0, int64_t r1) {
    float out[MB];
    for (int64_t r = r0; r < r1; r++)
        for (int64_t m0 = 0; m0 < j->M; m0 += MB) {
            int nv = j->M - m0 < MB ? (int)(j->M - m0) : MB;
            DOTS(nv, j->A + r * j->K, j->x + m0 * j->K, j->K, j->K, j->fbf16);
            for (int i = 0; i < nv; i++) j->t[(m0 + i) * j->R + r] = out[i];
        }
}

AVX2 static void b_rows_avx2(const Job *j, int64_t p, int64_t n0, int64_t n1) {
    const int64_t *q = j->parts + 4 * p;
    int64_t col0 = q[0], rb = q[2], rk = q[3];
    float out[MB];
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m0 = 0; m0 < j->M; m0 += MB) {
            int nv = j->M - m0 < MB ? (int)(j->M - m0) : MB;
            DOTS(nv, j->B + j->boff[p] + n * rk, j->t + m0 * j->R + rb, j->R, rk, j->fbf16);
            for (int i = 0; i < nv; i++) y_add(j, m0 + i, col0 + n, out[i]);
        }
}
#endif

static void a_rows(const Job *j, int64_t r0, int64_t r1) {
#ifdef CE_X86
    if (g_isa >= ISA_AVX2) {
        a_rows_avx2(j, r0, r1);
        return;
    }
#endif
    a_rows_c(j, r0, r1);
}

static void b_rows(const Job *j, int64_t p, int64_t n0, int64_t n1) {
#ifdef CE_X86
    if (g_isa >= ISA_AVX2) {
        b_rows_avx2(j, p, n0, n1);
        return;
    }
#endif
    b_rows_c(j, p, n0, n1);
}

static void run(const Job *j, int nt) {
    int64_t ca = (j->R + A_CHUNK - 1) / A_CHUNK;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t c = 0; c < ca; c++) a_rows(j, c * A_CHUNK, (c + 1) * A_CHUNK < j->R ? (c + 1) * A_CHUNK : j->R);
        /* the loop's barrier: every t is written before any part reads it */
        for (int64_t p = 0; p < j->P; p++) {
            int64_t np = j->parts[4 * p + 1], cb = (np + B_CHUNK - 1) / B_CHUNK;
            /* nowait: the parts write disjoint columns of y */
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
            for (int64_t c = 0; c < cb; c++)
                b_rows(j, p, c * B_CHUNK, (c + 1) * B_CHUNK < np ? (c + 1) * B_CHUNK : np);
        }
    }
    (void)nt;
}

/* Why the parts cannot be run (NULL when they can); fills boff and the total factor count. */
static const char *check_parts(const int64_t *parts, int64_t P, int64_t N, int64_t R, int64_t blen, int64_t *boff) {
    int64_t off = 0, end = 0;
    for (int64_t p = 0; p < P; p++) {
        const int64_t *q = parts + 4 * p;
        if (q[1] < 1 || q[3] < 1 || q[0] < end || q[0] + q[1] > N)
            return "lowrank_apply: each part needs N_p ≥ 1, r_p ≥ 1 and columns ascending, disjoint and inside y";
        if (q[2] < 0 || q[2] + q[3] > R) return "lowrank_apply: a part's rank rows lie outside A";
        boff[p] = off;
        off += q[1] * q[3];
        end = q[0] + q[1];
    }
    if (off != blen) return "lowrank_apply: B's length is not Σ N_p·r_p of the parts";
    return NULL;
}

PyObject *py_lowrank_apply(PyObject *self, PyObject *args) {
    Py_ssize_t M, K, N, R, P, blen;
    unsigned long long x, A, B, parts, y;
    int xbf16, ybf16, fbf16, nthreads;
    if (!PyArg_ParseTuple(args, "nnnnKiKiKKnKnii", &M, &K, &N, &R, &x, &xbf16, &y, &ybf16, &A, &B, &blen, &parts,
                          &P, &fbf16, &nthreads))
        return NULL;
    if (M < 0 || K < 1 || N < 1 || R < 1 || P < 1 || blen < 1) {
        PyErr_SetString(PyExc_ValueError, "lowrank_apply: needs M ≥ 0 and K, N, R, P, len(B) ≥ 1");
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    size_t tb = (size_t)(M * R) * sizeof(float), xb = xbf16 ? (size_t)(M * K) * sizeof(float) : 0;
    const size_t ob = (size_t)P * sizeof(int64_t); /* the int64 offsets first: aligned, whatever M·(R + K) is */
    char *buf = ce_scratch(ob + tb + xb + 64);
    if (!buf) return PyErr_NoMemory();
    Job j = {M, K, N, R, P, (const float *)x, (const uint16_t *)A, (const uint16_t *)B, (const int64_t *)parts,
             (const int64_t *)buf, (float *)(buf + ob), ybf16 ? NULL : (float *)y, ybf16 ? (uint16_t *)y : NULL,
             fbf16 != 0};
    const char *bad = check_parts(j.parts, P, N, R, blen, (int64_t *)j.boff);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    /* one thread below ~32k multiply-adds: waking the others costs more than they save */
    int nt = (M * (R * K + blen) < (1 << 15)) ? 1 : (nthreads > 0 ? nthreads : 1);
    Py_BEGIN_ALLOW_THREADS
    if (xbf16) {
        float *xf = (float *)(buf + ob + tb);
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf2f(((const uint16_t *)x)[i]);
        j.x = xf;
    }
    run(&j, nt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
