/* compress_export.kernels._cpu: y = x Wᵀ for 2:4-sparse weights, reading the compressed form (the kept half of W
 * and 2-bit positions), so a decode step reads about half the bytes of the dense weight (a quarter with 4-bit codes).
 *
 * How: at decode (few rows of x) a linear is bound by the bytes of W it reads, and on two AVX2 cores also by the
 * shuffles that put the kept weights in place. Per 32-input chunk of a row, the 16 kept weights are widened to fp32
 * (without shuffles: see the value layouts) and placed into 4 dense 8-lane vectors with one vpermps and one
 * vblendvps each: a metadata byte (the positions of 8 inputs) indexes a 256-entry table whose entries are both the
 * permutation (low 3 bits) and the zero mask of the pruned lanes (sign bit). The placed weights then meet every row
 * of x with plain FMAs, so the shuffle cost is paid once per call, not once per row of x. The pruned half of W is
 * never read. Measured (benchmarks/sparse24_kernel.py) on an AVX2 EPYC: the shuffles (~12 cycles per chunk) keep
 * 2:4 + 4-bit codes slower than cpu-wna16 on the dense codes, so kernels/cpu_sparse24.py picks this kernel for
 * float values only by default.
 *
 * Prepared layout (built once at load by kernels/cpu_sparse24.py; never stored in a checkpoint):
 *   meta    uint8 [N, K/8]  byte i of a row covers inputs 8i..8i+7, two groups of 4: bits 0-1 / 2-3 hold the
 *                           positions (0..3, ascending) of the first group's kept weights, bits 4-5 / 6-7 the second's.
 *   values  the kept weights of each row, in runs of 16 (one chunk = 32 inputs); kept weight t of a chunk is the t-th
 *           kept one in column order (p0, p1 of its group 0, p0, p1 of its group 1, ...).
 *           kind 0: fp32 [N, K/2], kind 2: fp16 bits [N, K/2]: in that order.
 *           kind 1: bf16 bits [N, K/2], interleaved t = 0, 8, 1, 9, ..., 7, 15 within a chunk: one 32-byte load gives
 *                   kept 0..7 in the low halves of its 32-bit lanes and 8..15 in the high halves, so a shift and a
 *                   mask widen them to fp32 without a shuffle.
 *           kind 4: uint8 [N, K/4], codes (2, 3 or 4 bits, in a 4-bit container) packed 8 per little-endian 32-bit
 *                   word, t in nibble t (word 0) and 8 + t in nibble t (word 1): a broadcast and a per-lane shift
 *                   unpack them, again without a shuffle.
 *   scales  kind 4 only: fp16 bits [N, G], zeros uint8 [N, G] (code units), G = K / group; w = (q − z) · s.
 *   x       fp32 or bf16 [M, K]; y [M, N] in x's dtype.
 * K is a multiple of 32; for kind 4, group is a multiple of 32 dividing K (K itself for one group per row).
 *
 * Non-finite inputs: the dense product multiplies the pruned weights' zeros with x too, so an inf or NaN anywhere
 * in a row of x makes (some of) that row's outputs NaN there. Skipping the pruned half would hide it, so a row of x
 * with any non-finite value gives a row of NaN.
 *
 * Threads: OpenMP over output rows, in tiles of 8 (as kernels/csrc/cpu_wna16.c).
 */
#include "cpu_common.h"

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_F16 = 2, KIND_Q4 = 4 };

typedef struct {
    int kind;
    int64_t M, N, K, group;
    const float *x; /* fp32 [M, K] (bf16 inputs are widened into scratch first) */
    const void *values;
    const uint8_t *meta;
    const uint16_t *scales;
    const uint8_t *zeros;
    float *y; /* fp32 [M, N] */
} Job;

static int64_t values_row_bytes(int kind, int64_t K) { return kind == KIND_Q4 ? K / 4 : kind == KIND_F32 ? K * 2 : K; }

/* Kept weight j (0 ≤ j < K/2) of row n as a float: the reference both paths agree with. */
static float kept_value(const Job *j, int64_t n, int64_t i) {
    const uint8_t *row = (const uint8_t *)j->values + n * values_row_bytes(j->kind, j->K);
    switch (j->kind) {
        case KIND_F32: return ((const float *)row)[i];
        case KIND_BF16: return bf2f(((const uint16_t *)row)[(i & ~15) + ((i & 7) << 1) + ((i >> 3) & 1)]);
        case KIND_F16: return h2f(((const uint16_t *)row)[i]);
        default: break;
    }
    uint8_t b = row[i >> 1];
    int q = (i & 1) ? (b >> 4) : (b & 0xF);
    int64_t G = j->K / j->group, g = (i >> 4) * 32 / j->group; /* a 32-input chunk lies in one group */
    return ((float)q - (float)j->zeros[n * G + g]) * h2f(j->scales[n * G + g]);
}

/* Input column of kept weight i of row n. */
static inline int64_t kept_col(const Job *j, int64_t n, int64_t i) {
    uint8_t b = j->meta[n * (j->K / 8) + (i >> 2)];
    int shift = (int)(i & 3) * 2; /* kept 4t..4t+3 ↔ bits 0-1, 2-3 (first group), 4-5, 6-7 (second) */
    return (i >> 1) * 2 * 2 + ((b >> shift) & 3);
}

/* ---- portable path (any CPU; the reference the tests compare the others with) ---- */
static void rows_generic(const Job *j, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < j->M; m++) {
            const float *xr = j->x + m * j->K;
            double acc = 0.0;
            for (int64_t i = 0; i < j->K / 2; i++) acc += (double)kept_value(j, n, i) * xr[kept_col(j, n, i)];
            j->y[m * j->N + n] = (float)acc;
        }
}

static void expand_row_generic(const Job *j, int64_t n, void *out, int bf16) {
    if (bf16)
        memset(out, 0, (size_t)j->K * 2);
    else
        memset(out, 0, (size_t)j->K * 4);
    for (int64_t i = 0; i < j->K / 2; i++) {
        float v = kept_value(j, n, i);
        int64_t k = kept_col(j, n, i);
        if (bf16)
            ((uint16_t *)out)[k] = f2bf(v);
        else
            ((float *)out)[k] = v;
    }
}

/* PLACE[e][b]: for metadata byte b, for each of its 8 inputs, the lane of its kept weight in an 8-lane vector of kept
 * weights whose lanes 4e..4e+3 are this byte's (e = 0: the first byte of a pair, e = 1: the second), or the sign bit
 * alone where the input was pruned (vpermps reads the low 3 bits, vblendvps the sign bit: one table gives both the
 * permutation and the zero mask). Filled once, before any thread reads it. */
static int32_t PLACE[2][256][8];
static int tables_ready = 0;

static void init_tables(void) {
    if (tables_ready) return;
    for (int b = 0; b < 256; b++) {
        for (int l = 0; l < 8; l++) PLACE[0][b][l] = PLACE[1][b][l] = INT32_MIN;
        for (int t = 0; t < 4; t++) {
            int col = (t >> 1) * 4 + ((b >> (2 * t)) & 3);
            PLACE[0][b][col] = t;
            PLACE[1][b][col] = t + 4;
        }
    }
    tables_ready = 1;
}

#ifdef CE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 16 kept weights of a 32-input chunk (row pointer advanced to it), as fp32 vectors w[0] (inputs 0..15) and
 * w[1] (16..31). For codes, s and z are the chunk's group scale and zero point. */
AVX2 INLINE void load16(const int KIND, const uint8_t *p, __m256 s, __m256 z, __m256 *w) {
    if (KIND == KIND_F32) {
        w[0] = _mm256_loadu_ps((const float *)p);
        w[1] = _mm256_loadu_ps((const float *)p + 8);
    } else if (KIND == KIND_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        w[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    } else if (KIND == KIND_F16) {
        w[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        w[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1));
    } else {
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nib = _mm256_set1_epi32(0xF);
        int32_t w0, w1;
        memcpy(&w0, p, 4);
        memcpy(&w1, p + 4, 4);
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w0), shifts), nib));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w1), shifts), nib));
        w[0] = _mm256_mul_ps(_mm256_sub_ps(lo, z), s); /* (q − z) · s, as the dense weight is computed */
        w[1] = _mm256_mul_ps(_mm256_sub_ps(hi, z), s);
    }
}

/* The chunk's 32 dense weights d[0..3] (8 inputs each) from its kept weights w and its 4 metadata bytes. */
AVX2 INLINE void place32(const __m256 *w, const uint8_t *meta, __m256 *d) {
    for (int q = 0; q < 4; q++) {
        __m256i idx = _mm256_loadu_si256((const __m256i *)PLACE[q & 1][meta[q]]);
        __m256 v = _mm256_permutevar8x32_ps(w[q >> 1], idx);
        d[q] = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
    }
}

/* Value bytes per 32-input chunk. */
#define CHUNK_BYTES(KIND) ((KIND) == KIND_Q4 ? 8 : (KIND) == KIND_F32 ? 64 : 32)

/* NR output rows × MT activation rows. Per chunk, each row's kept weights are placed into dense registers once (the
 * shuffles do not grow with M) and multiplied with MT rows of x. */
AVX2 INLINE void tile(const Job *j, int64_t n, int64_t m0, const int NR, const int MT, const int KIND) {
    const int64_t K = j->K, G = KIND == KIND_Q4 ? K / j->group : 1, cpg = K / G / 32;
    const uint8_t *vrow[4], *mrow[4];
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++) {
        vrow[r] = (const uint8_t *)j->values + (n + r) * (K / 32) * CHUNK_BYTES(KIND);
        mrow[r] = j->meta + (n + r) * (K / 8);
        for (int i = 0; i < MT; i++) acc[r][i] = _mm256_setzero_ps();
    }
    const float *x = j->x + m0 * K;
    for (int64_t g = 0; g < G; g++) {
        __m256 s[4], z[4];
        for (int r = 0; r < NR; r++) {
            s[r] = z[r] = _mm256_setzero_ps();
            if (KIND == KIND_Q4) {
                s[r] = _mm256_set1_ps(_cvtsh_ss(j->scales[(n + r) * G + g]));
                z[r] = _mm256_set1_ps((float)j->zeros[(n + r) * G + g]);
            }
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c++)
            for (int r = 0; r < NR; r++) {
                __m256 w[2], d[4];
                load16(KIND, vrow[r] + c * CHUNK_BYTES(KIND), s[r], z[r], w);
                place32(w, mrow[r] + c * 4, d);
                for (int i = 0; i < MT; i++)
                    for (int q = 0; q < 4; q++)
                        acc[r][i] = _mm256_fmadd_ps(d[q], _mm256_loadu_ps(x + i * K + c * 32 + q * 8), acc[r][i]);
            }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) j->y[(m0 + i) * j->N + n + r] = hsum8(acc[r][i]);
}

AVX2 INLINE void rows_kind(const Job *j, int64_t n0, int64_t n1, const int KIND) {
    if (j->M <= 2) { /* few activation rows: several output rows at once keep independent FMA chains */
        int64_t n = n0;
        if (j->M == 1)
            for (; n + 4 <= n1; n += 4) tile(j, n, 0, 4, 1, KIND);
        else
            for (; n + 2 <= n1; n += 2) tile(j, n, 0, 2, 2, KIND);
        for (; n < n1; n++) {
            if (j->M == 1)
                tile(j, n, 0, 1, 1, KIND);
            else
                tile(j, n, 0, 1, 2, KIND);
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= j->M; m0 += 4) tile(j, n, m0, 1, 4, KIND);
        switch (j->M - m0) {
            case 3: tile(j, n, m0, 1, 3, KIND); break;
            case 2: tile(j, n, m0, 1, 2, KIND); break;
            case 1: tile(j, n, m0, 1, 1, KIND); break;
            default: break;
        }
    }
}

AVX2 static void rows_avx2(const Job *j, int64_t n0, int64_t n1) {
    switch (j->kind) { /* one specialised copy per value kind: no per-chunk branches */
        case KIND_F32: rows_kind(j, n0, n1, KIND_F32); break;
        case KIND_BF16: rows_kind(j, n0, n1, KIND_BF16); break;
        case KIND_F16: rows_kind(j, n0, n1, KIND_F16); break;
        default: rows_kind(j, n0, n1, KIND_Q4); break;
    }
}

AVX2 static inline void store8(void *out, int64_t k, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + k, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v); /* round to nearest even (weights are finite) */
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)out + k), h);
}

AVX2 INLINE void expand_kind(const Job *j, int64_t n, void *out, int bf16, const int KIND) {
    const int64_t K = j->K, G = KIND == KIND_Q4 ? K / j->group : 1, cpg = K / G / 32;
    const uint8_t *vrow = (const uint8_t *)j->values + n * (K / 32) * CHUNK_BYTES(KIND), *mrow = j->meta + n * (K / 8);
    for (int64_t g = 0; g < G; g++) {
        __m256 s = _mm256_setzero_ps(), z = _mm256_setzero_ps();
        if (KIND == KIND_Q4) {
            s = _mm256_set1_ps(_cvtsh_ss(j->scales[n * G + g]));
            z = _mm256_set1_ps((float)j->zeros[n * G + g]);
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
            __m256 w[2], d[4];
            load16(KIND, vrow + c * CHUNK_BYTES(KIND), s, z, w);
            place32(w, mrow + c * 4, d);
            for (int q = 0; q < 4; q++) store8(out, c * 32 + q * 8, d[q], bf16);
        }
    }
}

AVX2 static void expand_row_avx2(const Job *j, int64_t n, void *out, int bf16) {
    switch (j->kind) {
        case KIND_F32: expand_kind(j, n, out, bf16, KIND_F32); break;
        case KIND_BF16: expand_kind(j, n, out, bf16, KIND_BF16); break;
        case KIND_F16: expand_kind(j, n, out, bf16, KIND_F16); break;
        default: expand_kind(j, n, out, bf16, KIND_Q4); break;
    }
}
#endif

static void run_rows(const Job *j, int64_t n0, int64_t n1) {
#ifdef CE_X86
    if (g_isa >= ISA_AVX2) {
        rows_avx2(j, n0, n1);
        return;
    }
#endif
    rows_generic(j, n0, n1);
}

static const char *check_shape(int kind, int64_t M, int64_t N, int64_t K, int64_t group) {
    if (!(kind == KIND_F32 || kind == KIND_BF16 || kind == KIND_F16 || kind == KIND_Q4))
        return "kind must be 0 (fp32 values), 1 (bf16), 2 (fp16) or 4 (4-bit codes)";
    if (M < 0 || N < 1) return "needs M ≥ 0 rows of x and N ≥ 1 outputs";
    if (K < 32 || K % 32) return "K must be a positive multiple of 32";
    if (kind == KIND_Q4 && (group < 32 || group % 32 || K % group))
        return "group must be a multiple of 32 that divides K";
    return NULL;
}

/* Widen bf16 x into xf (when given) and flag rows holding inf or NaN (see the header). */
static void prepare_x(const void *x, int bf16, float *xf, int64_t M, int64_t K, char *bad) {
    for (int64_t m = 0; m < M; m++) {
        int nonfinite = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = bf16 ? bf2f(((const uint16_t *)x)[m * K + k]) : ((const float *)x)[m * K + k];
            if (bf16) xf[m * K + k] = v;
            nonfinite |= !(fabsf(v) <= FLT_MAX);
        }
        bad[m] = (char)nonfinite;
    }
}

/* sparse24_gemm(kind, M, N, K, group, x, values, meta, scales, zeros, y, nthreads, bf16): y = x Wᵀ. */
PyObject *py_sparse24_gemm(PyObject *self, PyObject *args) {
    int kind, nthreads, bf16 = 0;
    Py_ssize_t M, N, K, group;
    unsigned long long x, values, meta, scales, zeros, y;
    if (!PyArg_ParseTuple(args, "innnnKKKKKKi|i", &kind, &M, &N, &K, &group, &x, &values, &meta, &scales, &zeros,
                          &y, &nthreads, &bf16))
        return NULL;
    const char *bad = check_shape(kind, M, N, K, group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    init_tables();
    size_t io = bf16 ? (size_t)(M * K + M * N) * sizeof(float) : 0;
    char *buf = ce_scratch(io + (size_t)M + 64);
    if (!buf) return PyErr_NoMemory();
    Job j = {kind, M, N, K, group, (const float *)x, (const void *)values, (const uint8_t *)meta,
             (const uint16_t *)scales, (const uint8_t *)zeros, (float *)y};
    char *rowbad = buf + io;
    Py_BEGIN_ALLOW_THREADS
    if (bf16) {
        j.x = (const float *)buf;
        j.y = (float *)buf + M * K;
    }
    prepare_x((const void *)x, bf16, (float *)j.x, M, K, rowbad);
    const int64_t tile = 8, tiles = (N + tile - 1) / tile;
    int nt = (N * K * (M < 4 ? M : 4) < (1 << 18)) ? 1 : (nthreads > 0 ? nthreads : 1);
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        run_rows(&j, n0, n1);
    }
    for (int64_t m = 0; m < M; m++)
        if (rowbad[m])
            for (int64_t n = 0; n < N; n++) j.y[m * N + n] = NAN;
    if (bf16)
        for (int64_t i = 0; i < M * N; i++) ((uint16_t *)y)[i] = f2bf(j.y[i]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* sparse24_expand(kind, N, K, group, n0, n1, values, meta, scales, zeros, out, bf16, nthreads): rows [n0, n1) of
 * the dense W into out [n1 − n0, K], fp32 (bf16 = 0) or bf16: the large-batch path expands a tile and hands it to
 * a GEMM. */
typedef struct {
    Job j;
    int bf16;
} ExpandCtx;

static void expand_one_row(const void *ctx, int64_t n, void *dst) {
    const ExpandCtx *c = (const ExpandCtx *)ctx;
#ifdef CE_X86
    if (g_isa >= ISA_AVX2) {
        expand_row_avx2(&c->j, n, dst, c->bf16);
        return;
    }
#endif
    expand_row_generic(&c->j, n, dst, c->bf16);
}

PyObject *py_sparse24_expand(PyObject *self, PyObject *args) {
    int kind, bf16, nthreads;
    Py_ssize_t N, K, group, n0, n1;
    unsigned long long values, meta, scales, zeros, out;
    if (!PyArg_ParseTuple(args, "innnnnKKKKKii", &kind, &N, &K, &group, &n0, &n1, &values, &meta, &scales, &zeros,
                          &out, &bf16, &nthreads))
        return NULL;
    const char *bad = check_shape(kind, 1, N, K, group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    init_tables();
    ExpandCtx c = {{kind, 1, N, K, group, NULL, (const void *)values, (const uint8_t *)meta, (const uint16_t *)scales,
                    (const uint8_t *)zeros, NULL},
                   bf16};
    if (ce_fill_rows(N, n0, n1, (size_t)K * (bf16 ? 2 : 4), (void *)(uintptr_t)out, nthreads, expand_one_row, &c))
        return NULL;
    Py_RETURN_NONE;
}
