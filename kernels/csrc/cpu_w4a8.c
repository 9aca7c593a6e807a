/* compress_export.kernels._cpu: y = x Wᵀ for 2/3/4-bit codes in the panel layout, three ways on one layout:
 *   w4_gemv16  decode-sized M: x quantized to int16 per block (relative error 1.5e-5 of the block's largest value,
 *              below bf16's 3.9e-3 per element), codes × int16 with vpmaddwd (every variant), exact sums.
 *   w4a8_gemm  prefill-sized M: x quantized to int8 per block (as llama.cpp's Q8_0 does for its Q4_0 GEMM), codes
 *              × int8 with vpmaddubsw + vpmaddwd (vpdpbusd with VNNI). Exact: a u8 × s8 pair sum is at most
 *              2 · 15 · 127 = 3810, so the int16 step that saturates for 8-bit weights (W8A8 on AVX2) cannot here.
 *   w4_dequant rows of W in fp32/bf16, for the float prefill path (COMPRESS_EXPORT_PREFILL=float).
 *
 *   y[m, n] = Σ_b  s[g(b), n] · xs[m, b] · ( Σ_{k∈b} xq[m, k] · q[n, k]  −  z[g(b), n] · Σ_{k∈b} xq[m, k] )
 *
 * Panel layout (prepared at load by kernels/cpu_wna16.py `pack_panels`; never stored in a checkpoint):
 *   qw      uint8 [Np/8, K/8, 32], Np = N rounded up to 8 (pad rows hold code 0). Panel p holds outputs 8p..8p+7;
 *           its 32 bytes for columns 8c..8c+7 are 16 little-endian uint16 lanes: lane 2i+h holds output 8p+i, and
 *           its nibble e (bits 4e..4e+3) the code of column 8c + 2e + h.
 *           Why: vectors run across 8 outputs, so every sum stays in its own lane (no horizontal adds), and the same
 *           32 bytes serve both paths: (lane >> 4e) & 15 is an int16 operand for vpmaddwd with the pair
 *           x[2e], x[2e+1]; byte & 15 and byte >> 4 are u8 operands for vpmaddubsw, whose 4-byte groups hold
 *           columns {0,4,1,5} and {2,6,3,7} of the step, the order the int8 activations are stored in.
 *   scales  fp16 bits [G, Np] and zeros uint8 [G, Np] (code units): 8 outputs' values are one vector load.
 *   x       fp32 or bf16 [M, K], columns in group order; y [M, N] in x's dtype.
 * K is a multiple of 32; the group is K or a multiple of 32 dividing K. Threads: OpenMP over panels.
 */
#include "cpu_common.h"

typedef struct {
    int64_t M, N, Np, K, group, B, nb, bpg; /* activation block size, blocks per row, blocks per weight group */
    const uint8_t *qw;
    const uint16_t *scales;
    const uint8_t *zeros;
    void *y;
    int bf16;
    const int8_t *xq; /* [M, K] int8, permuted within each 8-column step */
    float *xs;        /* [M, nb] */
    int32_t *isum;    /* [M, nb] */
} A8Job;

typedef struct {
    int64_t M, N, Np, K, group, B, nb, bpg;
    const uint8_t *qw;
    const uint16_t *scales;
    const uint8_t *zeros;
    void *y;
    int bf16;
    const int16_t *xq; /* [M, K] int16, column order */
    float *xs;
    int32_t *isum;
} A16Job;

static const int A8_POS[8] = {0, 2, 4, 6, 1, 3, 5, 7}; /* column j of a step is stored at byte A8_POS[j] */


static inline void store_scalar(void *y, int bf16, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)y)[i] = f2bf(v);
    else
        ((float *)y)[i] = v;
}

/* The code of output n, column k in the panel layout. */
static inline int panel_code(const uint8_t *qw, int64_t K, int64_t n, int64_t k) {
    const int64_t p = n >> 3, i = n & 7, c = k >> 3, jj = k & 7, e = jj >> 1, h = jj & 1;
    const uint8_t byte = qw[(p * (K / 8) + c) * 32 + 2 * (2 * i + h) + (e >> 1)];
    return (e & 1) ? byte >> 4 : byte & 0xF;
}

/* ---- portable reference: the same arithmetic in plain C ---- */
static void a8_panels_generic(const A8Job *j, int64_t p0, int64_t p1) {
    for (int64_t n = p0 * 8; n < p1 * 8 && n < j->N; n++)
        for (int64_t m = 0; m < j->M; m++) {
            float acc = 0.f;
            for (int64_t b = 0; b < j->nb; b++) {
                const int64_t g = b / j->bpg;
                const int8_t *xr = j->xq + m * j->K + b * j->B;
                int32_t dot = 0;
                for (int64_t k = 0; k < j->B; k++)
                    dot += (int32_t)xr[(k & ~7) + A8_POS[k & 7]] * panel_code(j->qw, j->K, n, b * j->B + k);
                const float d = (float)dot - (float)j->zeros[g * j->Np + n] * (float)j->isum[m * j->nb + b];
                acc = fmaf(d, h2f(j->scales[g * j->Np + n]) * j->xs[m * j->nb + b], acc);
            }
            store_scalar(j->y, j->bf16, m * j->N + n, acc);
        }
}

static void w16_panels_generic(const A16Job *j, int64_t p0, int64_t p1) {
    for (int64_t n = p0 * 8; n < p1 * 8 && n < j->N; n++)
        for (int64_t m = 0; m < j->M; m++) {
            float acc = 0.f;
            for (int64_t b = 0; b < j->nb; b++) {
                const int64_t g = b / j->bpg;
                const int16_t *xr = j->xq + m * j->K + b * j->B;
                int32_t dot = 0;
                for (int64_t k = 0; k < j->B; k++) dot += (int32_t)xr[k] * panel_code(j->qw, j->K, n, b * j->B + k);
                const float d = (float)dot - (float)j->zeros[g * j->Np + n] * (float)j->isum[m * j->nb + b];
                acc = fmaf(d, h2f(j->scales[g * j->Np + n]) * j->xs[m * j->nb + b], acc);
            }
            store_scalar(j->y, j->bf16, m * j->N + n, acc);
        }
}

#ifdef CE_X86
/* 8 outputs of row `row` at columns n0..n0+7 (fewer at the padded end). */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) void
store_out(void *y, int bf16, int64_t row, int64_t n0, int64_t N, __m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    if (!bf16 && n0 + 8 <= N) {
        _mm256_storeu_ps((float *)y + row + n0, v);
        return;
    }
    for (int i = 0; i < 8 && n0 + i < N; i++) store_scalar(y, bf16, row + n0 + i, t[i]);
}

/* ce_quantize_block for int8 with AVX2 (fp32 input): the same codes as the portable loop (cvtps rounds to nearest
 * even, as lrintf does under the default rounding mode), stored in the permuted step order. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const void *x, int bf16, int64_t k) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + k);
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + k)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

__attribute__((target("avx2,fma,f16c"))) static int quantize8_avx2(const void *x, int bf16, int64_t B, int8_t *q,
                                                                  float *scale, int32_t *sum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), big = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < B; k += 8) {
        __m256 a = _mm256_and_ps(load8(x, bf16, k), absmask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* inf or NaN */
        vmax = _mm256_max_ps(vmax, a);
    }
    if (_mm256_movemask_ps(bad)) return 0; /* the portable loop writes the NaN block */
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    if (amax < CE_TINY_AMAX) return 0; /* the portable loop writes the zero block */
    const __m256 inv = _mm256_set1_ps(127.f / amax);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* A8_POS: byte i holds column order[i] */
    __m256i vsum = _mm256_setzero_si256();
    for (int64_t k = 0; k < B; k += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, bf16, k), inv));
        vsum = _mm256_add_epi32(vsum, v);
        v = _mm256_permutevar8x32_epi32(v, order);
        __m256i p16 = _mm256_packs_epi32(v, v);       /* per 128-bit lane: v0..v3 v0..v3 | v4..v7 v4..v7 */
        __m256i p8 = _mm256_packs_epi16(p16, p16);    /* bytes 0..3 of each lane */
        int32_t lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(p8)), hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(p8, 1));
        memcpy(q + k, &lo, 4);
        memcpy(q + k + 4, &hi, 4);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *sum = _mm_cvtsi128_si32(s4);
    *scale = amax / 127.f;
    return 1;
}

#define TGT "avx2,fma,f16c"
#define V(name) name##_avx2
#define DOT4(acc, w, x) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)))
#include "cpu_w4a8_tile.h"
#undef TGT
#undef V
#undef DOT4

#ifdef CE_AVXVNNI
#define TGT "avx2,fma,f16c,avxvnni"
#define V(name) name##_avxvnni
#define DOT4(acc, w, x) acc = _mm256_dpbusd_avx_epi32(acc, w, x)
#include "cpu_w4a8_tile.h"
#undef TGT
#undef V
#undef DOT4
#endif

#define TGT "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"
#define V(name) name##_avx512vnni
#define DOT4(acc, w, x) acc = _mm256_dpbusd_epi32(acc, w, x)
#include "cpu_w4a8_tile.h"
#undef TGT
#undef V
#undef DOT4
#endif

static void a8_run(const A8Job *j, int64_t p0, int64_t p1) {
#ifdef CE_X86
    if (g_isa == ISA_AVX512VNNI) return a8_panels_avx512vnni(j, p0, p1);
#ifdef CE_AVXVNNI
    if (g_isa == ISA_AVXVNNI) return a8_panels_avxvnni(j, p0, p1);
#endif
    if (g_isa >= ISA_AVX2) return a8_panels_avx2(j, p0, p1);
#endif
    a8_panels_generic(j, p0, p1);
}

static void w16_run(const A16Job *j, int64_t p0, int64_t p1) {
#ifdef CE_X86
    if (g_isa == ISA_AVX512VNNI) return w16_panels_avx512vnni(j, p0, p1);
#ifdef CE_AVXVNNI
    if (g_isa == ISA_AVXVNNI) return w16_panels_avxvnni(j, p0, p1);
#endif
    if (g_isa >= ISA_AVX2) return w16_panels_avx2(j, p0, p1);
#endif
    w16_panels_generic(j, p0, p1);
}

static const char *check_shape(int64_t M, int64_t N, int64_t K, int64_t group) {
    if (M < 0 || N < 1) return "needs M ≥ 0 rows of x and N ≥ 1 outputs";
    if (K < 32 || K % 32) return "K must be a positive multiple of 32";
    if (group < 32 || group % 32 || K % group) return "group must be a multiple of 32 that divides K";
    return NULL;
}

/* The block of activation columns quantized together: the weight group up to `cap`, else the largest of
 * 256/128/64/32 dividing it. cap bounds the int32 sums: 256 · 15 · 32767 (int16) stays below 2^31; int8 blocks are
 * capped at 128 columns for accuracy (one scale per 128 values at most). */
static int64_t act_block(int64_t group, int64_t cap) {
    if (group <= cap) return group;
    for (int64_t b = cap; b >= 32; b /= 2)
        if (group % b == 0) return b;
    return 32;
}

/* Parse the common arguments: (M, N, K, group, x, qw, scales, zeros, y, nthreads, bf16). */
typedef struct {
    Py_ssize_t M, N, K, group;
    unsigned long long x, qw, scales, zeros, y;
    int nthreads, bf16;
} Args;

static int parse(PyObject *args, Args *a) {
    a->bf16 = 0;
    if (!PyArg_ParseTuple(args, "nnnnKKKKKi|i", &a->M, &a->N, &a->K, &a->group, &a->x, &a->qw, &a->scales, &a->zeros,
                          &a->y, &a->nthreads, &a->bf16))
        return 0;
    const char *bad = check_shape(a->M, a->N, a->K, a->group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return 0;
    }
    return 1;
}

/* One thread for layers too small to repay waking the others. */
static int threads_for(int64_t work, int nthreads) { return work < (1 << 18) ? 1 : (nthreads > 0 ? nthreads : 1); }

PyObject *py_w4a8_gemm(PyObject *self, PyObject *args) {
    Args a;
    if (!parse(args, &a)) return NULL;
    if (a.M == 0) Py_RETURN_NONE;
    A8Job j = {a.M, a.N, (a.N + 7) / 8 * 8, a.K, a.group, 0, 0, 0, (const uint8_t *)a.qw,
               (const uint16_t *)a.scales, (const uint8_t *)a.zeros, (void *)a.y, a.bf16, NULL, NULL, NULL};
    j.B = act_block(a.group, 128);
    j.nb = a.K / j.B;
    j.bpg = a.group / j.B;
    const size_t qb = (size_t)(a.M * a.K), side = (size_t)(a.M * j.nb) * 4;
    char *buf = ce_scratch(qb + 2 * side + 64);
    if (!buf) return PyErr_NoMemory();
    j.xs = (float *)buf;
    j.isum = (int32_t *)(buf + side);
    j.xq = (const int8_t *)(buf + 2 * side);
    const int64_t panels = j.Np / 8, pairs = (panels + 1) / 2;
    const int nt = threads_for(a.M * a.N * a.K, a.nthreads);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < a.M * j.nb; r++) {
            const int64_t off = (r / j.nb) * a.K + (r % j.nb) * j.B;
#ifdef CE_X86
            const void *xb = a.bf16 ? (const void *)((const uint16_t *)a.x + off) : (const void *)((const float *)a.x + off);
            if (g_isa >= ISA_AVX2 && quantize8_avx2(xb, a.bf16, j.B, (int8_t *)j.xq + off, j.xs + r, j.isum + r))
                continue;
#endif
            ce_quantize_block((const void *)a.x, a.bf16, off, j.B, 127.f, (int8_t *)j.xq + off, 1, A8_POS, j.xs + r, j.isum + r);
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < pairs; t++) {
            const int64_t p0 = 2 * t, p1 = p0 + 2 < panels ? p0 + 2 : panels;
            a8_run(&j, p0, p1);
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *py_w4_gemv16(PyObject *self, PyObject *args) {
    Args a;
    if (!parse(args, &a)) return NULL;
    if (a.M == 0) Py_RETURN_NONE;
    A16Job j = {a.M, a.N, (a.N + 7) / 8 * 8, a.K, a.group, 0, 0, 0, (const uint8_t *)a.qw,
                (const uint16_t *)a.scales, (const uint8_t *)a.zeros, (void *)a.y, a.bf16, NULL, NULL, NULL};
    j.B = act_block(a.group, 256);
    j.nb = a.K / j.B;
    j.bpg = a.group / j.B;
    const size_t qb = (size_t)(a.M * a.K) * 2, side = (size_t)(a.M * j.nb) * 4;
    char *buf = ce_scratch(qb + 2 * side + 64);
    if (!buf) return PyErr_NoMemory();
    j.xs = (float *)buf;
    j.isum = (int32_t *)(buf + side);
    j.xq = (const int16_t *)(buf + 2 * side);
    const int64_t panels = j.Np / 8, chunk = 4, tiles = (panels + chunk - 1) / chunk;
    const int nt = threads_for(a.N * a.K * (a.M < 4 ? a.M : 4), a.nthreads);
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < a.M * j.nb; r++)
        ce_quantize_block((const void *)a.x, a.bf16, (r / j.nb) * a.K + (r % j.nb) * j.B, j.B, 32767.f,
                          (int16_t *)j.xq + (r / j.nb) * a.K + (r % j.nb) * j.B, 0, NULL, j.xs + r, j.isum + r);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t p0 = t * chunk, p1 = p0 + chunk < panels ? p0 + chunk : panels;
        w16_run(&j, p0, p1);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Row n of W = (q − z) · s into o32 (fp32) or o16 (bf16). Output n's 4 bytes of a step, read as a little-endian
 * uint32 w, hold column j's code at bits 16·(j & 1) + 4·(j >> 1) (panel_code's mapping, unrolled per step so the
 * compiler vectorizes the 8 columns). */
static void dequant_row(const uint8_t *qw, const uint16_t *sc, const uint8_t *zp, int64_t K, int64_t Np,
                        int64_t group, int64_t n, float *o32, uint16_t *o16) {
    const uint8_t *src = qw + (n >> 3) * (K / 8) * 32 + (n & 7) * 4;
    for (int64_t g = 0; g < K / group; g++) {
        const float s = h2f(sc[g * Np + n]), zs = (float)zp[g * Np + n] * s;
        for (int64_t c = g * group / 8; c < (g + 1) * group / 8; c++) {
            uint32_t w;
            float v[8];
            memcpy(&w, src + c * 32, 4);
            for (int j = 0; j < 8; j++) v[j] = (float)((w >> (16 * (j & 1) + 4 * (j >> 1))) & 15u) * s - zs;
            if (o16)
                for (int j = 0; j < 8; j++) o16[c * 8 + j] = f2bf(v[j]);
            else
                memcpy(o32 + c * 8, v, sizeof v);
        }
    }
}

/* w4_dequant(N, K, group, n0, n1, qw, scales, zeros, out, bf16, nthreads): rows n0..n1 of W[n, k] =
 * (q − z) · s into out [n1 − n0, K], fp32 or bf16 (the float prefill path's tile). */
typedef struct {
    const uint8_t *qw, *zeros;
    const uint16_t *scales;
    int64_t K, Np, group;
    int bf16;
} W4DequantCtx;

static void w4_dequant_one_row(const void *ctx, int64_t n, void *dst) {
    const W4DequantCtx *c = (const W4DequantCtx *)ctx;
    dequant_row(c->qw, c->scales, c->zeros, c->K, c->Np, c->group, n, c->bf16 ? NULL : (float *)dst,
                c->bf16 ? (uint16_t *)dst : NULL);
}

PyObject *py_w4_dequant(PyObject *self, PyObject *args) {
    Py_ssize_t N, K, group, n0, n1;
    unsigned long long qw, scales, zeros, out;
    int bf16, nthreads;
    if (!PyArg_ParseTuple(args, "nnnnnKKKKii", &N, &K, &group, &n0, &n1, &qw, &scales, &zeros, &out, &bf16,
                          &nthreads))
        return NULL;
    const char *bad = check_shape(1, N, K, group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    W4DequantCtx c = {(const uint8_t *)qw, (const uint8_t *)zeros, (const uint16_t *)scales, K, (N + 7) / 8 * 8,
                      group, bf16};
    if (ce_fill_rows(N, n0, n1, (size_t)K * (bf16 ? 2 : 4), (void *)(uintptr_t)out, nthreads, w4_dequant_one_row, &c))
        return NULL;
    Py_RETURN_NONE;
}
