/* compress_export.kernels._cpu (with cpu_wna16.c): the exact W8A8 product acc[M, N] = xq[M, K] · wᵀ, int8 × int8 summed in int32.
 *
 * Why not vLLM's CPU int8 GEMM: on x86 CPUs without VNNI, oneDNN multiplies u8 × s8 with vpmaddubsw, which adds
 * each adjacent pair of products in a *saturating* int16 (the activations are shifted to u8 by +128, so a pair
 * reaches 2·255·127 = 64770). benchmarks/int8_exactness.py reproduces vLLM's result bit for bit with that model and
 * measures the error. Here both operands are sign-extended to int16 and multiplied with vpmaddwd, whose pair sums
 * are int32: every sum is exact while K < 2^17 (each int32 lane adds K/16 pair sums of at most 2·128² = 2^15).
 *
 * `linear` also quantizes x per token and applies both scales, so a decode step is one call instead of ten torch ops.
 *
 * Layouts (no packing: the checkpoint's own):
 *   x    fp32  [M, K] row-major (linear), or xq int8 [M, K] already quantized per token (gemm)
 *   w    int8  [N, K] row-major (compressed-tensors' `weight`: the codes q − 128)
 *   acc  int32 [M, N] row-major (gemm); scale fp32 [N] and y fp32 [M, N] row-major (linear)
 * Tiles: NR weight rows × MT activation rows, the activations widened to int16 once per call and each weight chunk
 * once per tile. Threads: OpenMP over weight rows; libgomp resolves to the copy torch has loaded.
 */
#include "cpu_common.h"

typedef struct {
    int64_t M, N, K;
    const int16_t *x;   /* [M, K], widened */
    const int8_t *w;    /* [N, K] */
    int32_t *acc;       /* [M, N] (gemm) */
    const float *xs;    /* [M] per-token scales (linear) */
    const float *scale; /* [N] per-channel weight scales (linear) */
    float *y;           /* [M, N] (linear) */
} Job;

/* One output: the integer sum itself (gemm), or y = (float)((acc · s_x) · s_w) in double, the order and rounding of
 * kernels/int8.py's torch expression, so both give the same floats (linear). */
static inline void store(const Job *j, int64_t m, int64_t n, int32_t s) {
    if (j->y)
        j->y[m * j->N + n] = (float)((double)s * (double)j->xs[m] * (double)j->scale[n]);
    else
        j->acc[m * j->N + n] = s;
}

static void rows_generic(const Job *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = j->w + n * j->K;
        for (int64_t m = 0; m < j->M; m++) {
            const int16_t *xr = j->x + m * j->K;
            int32_t s = 0;
            for (int64_t k = 0; k < j->K; k++) s += (int32_t)xr[k] * (int32_t)wr[k];
            store(j, m, n, s);
        }
    }
}

#ifdef CE_X86
#define AVX2 __attribute__((target("avx2")))

AVX2 static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* NR ≤ 4 weight rows from n, MT ≤ 2 activation rows from m0: 8 accumulators + 4 widened weight chunks fit the 16
 * ymm registers. */
AVX2 static inline __attribute__((always_inline)) void tile(const Job *j, int64_t n, int64_t m0, const int NR,
                                                             const int MT) {
    const int64_t K = j->K, K16 = K & ~(int64_t)15;
    __m256i acc[4][2];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K16; k += 16) {
        __m256i wv[4];
        for (int r = 0; r < NR; r++)
            wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(j->w + (n + r) * K + k)));
        for (int i = 0; i < MT; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(j->x + (m0 + i) * K + k));
            for (int r = 0; r < NR; r++) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(wv[r], xv));
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) {
            int32_t s = hsum8i(acc[r][i]);
            for (int64_t k = K16; k < K; k++) s += (int32_t)j->x[(m0 + i) * K + k] * (int32_t)j->w[(n + r) * K + k];
            store(j, m0 + i, n + r, s);
        }
}

AVX2 static void rows_avx2(const Job *j, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        int64_t m = 0;
        for (; m + 2 <= j->M; m += 2) tile(j, n, m, 4, 2);
        if (m < j->M) tile(j, n, m, 4, 1);
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < j->M; m++) tile(j, n, m, 1, 1);
}
#endif

static void run(const Job *j, int nthreads) {
    /* blocks of 4 weight rows per thread step, so the AVX2 tile always sees whole blocks but the last */
    const int64_t blocks = (j->N + 3) / 4;
    int nt = nthreads > 0 ? nthreads : 1;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = 4 * b, n1 = n0 + 4 < j->N ? n0 + 4 : j->N;
#ifdef CE_X86
        if (g_isa >= ISA_AVX2) {
            rows_avx2(j, n0, n1);
            continue;
        }
#endif
        rows_generic(j, n0, n1);
    }
}

/* Per-token symmetric int8 codes of one row, as kernels/int8.quantize_per_token computes them in fp32: s = max|x| /
 * 127 (1 for an all-zero row), q = round-half-even(x / s) clamped to [−128, 127]. A non-finite row gets scale NaN,
 * so its outputs are NaN. */
static float quantize_row(const float *x, int64_t K, int16_t *q) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) {
        float a = fabsf(x[k]);
        if (!(a <= FLT_MAX)) {
            memset(q, 0, (size_t)K * sizeof(int16_t));
            return NAN;
        }
        if (a > amax) amax = a;
    }
    float s = amax / 127.0f;
    if (!(s > 0.f)) s = 1.f;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(x[k] / s);
        q[k] = (int16_t)(v > 127.f ? 127.f : v < -128.f ? -128.f : v);
    }
    return s;
}

static int parse_sizes(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K) {
    if (M < 0 || N < 0 || K < 0 || K >= (1 << 17)) {
        PyErr_SetString(PyExc_ValueError, "sizes must be non-negative and K below 2^17 (int32 sums stay exact)");
        return 0;
    }
    return 1;
}

PyObject *py_int8_gemm(PyObject *self, PyObject *args) {
    Py_ssize_t M, N, K;
    unsigned long long x, w, acc;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnKKKi", &M, &N, &K, &x, &w, &acc, &nthreads) || !parse_sizes(M, N, K))
        return NULL;
    int16_t *xw = malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(int16_t));
    if (!xw) return PyErr_NoMemory();
    Job j = {M, N, K, xw, (const int8_t *)(uintptr_t)w, (int32_t *)(uintptr_t)acc, NULL, NULL, NULL};
    const int8_t *xs = (const int8_t *)(uintptr_t)x;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < M * K; i++) xw[i] = xs[i];
    run(&j, nthreads);
    Py_END_ALLOW_THREADS
    free(xw);
    Py_RETURN_NONE;
}

PyObject *py_int8_linear(PyObject *self, PyObject *args) {
    Py_ssize_t M, N, K;
    unsigned long long x, w, scale, y;
    int nthreads;
    if (!PyArg_ParseTuple(args, "nnnKKKKi", &M, &N, &K, &x, &w, &scale, &y, &nthreads) || !parse_sizes(M, N, K))
        return NULL;
    int16_t *xq = malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(int16_t));
    float *xs = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return PyErr_NoMemory();
    }
    Job j = {M, N, K, xq, (const int8_t *)(uintptr_t)w, NULL, xs, (const float *)(uintptr_t)scale,
             (float *)(uintptr_t)y};
    const float *xf = (const float *)(uintptr_t)x;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t m = 0; m < M; m++) xs[m] = quantize_row(xf + m * K, K, xq + m * K);
    run(&j, nthreads);
    Py_END_ALLOW_THREADS
    free(xq);
    free(xs);
    Py_RETURN_NONE;
}
