/* compress_export.kernels._cpu: a CPU W{2,3,4,8}A16 matmul y = x Wᵀ on packed integer weights.
 *
 * Why not a float kernel: at decode (few rows of x) a linear is bound by the bytes of W it reads, so the weights
 * must stay packed (0.5 byte per 4-bit weight) and be expanded only in registers. Expanding nibbles to floats
 * costs ~3 vector instructions per 8 weights, which on two AVX2 cores is slower than reading bf16 weights.
 * Instead each activation row is quantized to int16 per block of B columns (scale = block max / 32767, a
 * relative error of 1.5e-5 of the block's largest value, far below bf16's 3.9e-3 per element) and the codes are
 * multiplied as int16 with vpmaddwd: 7 instructions per 32 weights, integer sums exact within a block.
 *
 *   y[m, n] = Σ_b  s[n, g(b)] · xs[m, b] · ( Σ_{k∈b} xq[m, k] · q[n, k]  −  z[n, g(b)] · Σ_{k∈b} xq[m, k] )
 *
 * Layouts (prepared once at load by kernels/cpu_wna16.py; never stored in a checkpoint):
 *   qw      bits ≤ 4: uint8 [N, K/2]. Row n is a run of 32-column chunks of 16 bytes; byte j of chunk c holds the
 *                     code of column 32c+j in its low nibble and of column 32c+16+j in its high nibble, so one
 *                     16-byte load widened to int16 gives 16 low codes (& 0xF) and 16 high codes (>> 4).
 *           bits = 8: uint8 [N, K], codes in column order.
 *   scales  fp16 [N, G] (IEEE half bits), zeros uint8 [N, G] (code units), G = K / group.
 *   x       fp32 or bf16 [M, K], columns in group order (act-order permutes x before the call); y [M, N] in
 *           x's dtype. bf16 is widened and rounded here, in one pass each, not by two extra torch casts per call.
 * K is a multiple of 32; group is K (one group per row) or a multiple of 32 dividing K.
 *
 * Threads: OpenMP over output rows. Linked against libgomp.so.1, which resolves to the copy torch has already
 * loaded (torch is imported first), so torch.set_num_threads and vLLM's thread binding govern both.
 */
#include "cpu_common.h"

typedef struct {
    int bits;
    int64_t M, N, K, group;
    int64_t B, nb, bpg;  /* activation block size, blocks per row, blocks per weight group */
    const float *x;
    const uint8_t *qw;
    const uint16_t *scales;
    const uint8_t *zeros;
    float *y;
    int16_t *xq;   /* [M, K] */
    float *xs;     /* [M, nb] */
    int32_t *isum; /* [M, nb] */
} Job;

/* The block of activation columns quantized together: the weight group if it is at most `cap` columns, else the
 * largest of 256/128/64/32 dividing it. `cap` bounds the int32 sums: 256·15·32767 (4-bit) and 128·255·32767
 * (8-bit) stay below 2^31. */
static int64_t act_block(int64_t group, int bits) {
    int64_t cap = bits == 8 ? 128 : 256;
    if (group <= cap) return group;
    for (int64_t b = cap; b >= 32; b /= 2)
        if (group % b == 0) return b;
    return 32;
}

static void quantize_rows(Job *j) {
    for (int64_t m = 0; m < j->M; m++)
        for (int64_t b = 0; b < j->nb; b++)
            ce_quantize_block(j->x, 0, m * j->K + b * j->B, j->B, 32767.f, j->xq + m * j->K + b * j->B, 0, NULL,
                              j->xs + m * j->nb + b, j->isum + m * j->nb + b);
}

/* ---- portable path: the same arithmetic in plain C (any CPU; also the reference the tests compare with) ---- */
static inline int code_at(const Job *j, const uint8_t *row, int64_t k) {
    if (j->bits == 8) return row[k];
    int64_t c = k >> 5, r = k & 31;
    uint8_t byte = row[c * 16 + (r & 15)];
    return r < 16 ? (byte & 0xF) : (byte >> 4);
}

static void rows_generic(const Job *j, int64_t n0, int64_t n1) {
    int64_t rowbytes = j->bits == 8 ? j->K : j->K / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = j->qw + n * rowbytes;
        for (int64_t m = 0; m < j->M; m++) {
            const int16_t *xr = j->xq + m * j->K;
            double acc = 0.0;
            for (int64_t b = 0; b < j->nb; b++) {
                int64_t g = b / j->bpg, k0 = b * j->B;
                int32_t dot = 0;
                for (int64_t k = k0; k < k0 + j->B; k++) dot += (int32_t)xr[k] * code_at(j, row, k);
                float sc = h2f(j->scales[n * (j->K / j->group) + g]) * j->xs[m * j->nb + b];
                int32_t z = j->zeros[n * (j->K / j->group) + g];
                acc += (double)sc * (double)(dot - z * j->isum[m * j->nb + b]);
            }
            j->y[m * j->N + n] = (float)acc;
        }
    }
}

#ifdef CE_X86
/* ---- AVX2 path: NR output rows × MT activation rows per tile; codes widened once per tile, x loaded once per
 * chunk for all NR rows. M = 1 (decode) uses 4 rows at once; larger M uses 1 row × up to 4 activation rows. ---- */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline __attribute__((always_inline)) void tile(const Job *j, int64_t n, int64_t m0, const int NR,
                                                             const int MT) {
    const int64_t K = j->K, G = K / j->group, rowbytes = j->bits == 8 ? K : K / 2;
    const int16_t *xq = j->xq + m0 * K;
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    __m256 accf[4][4];
    float zacc[4][4];
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) {
            accf[r][i] = _mm256_setzero_ps();
            zacc[r][i] = 0.f;
        }
    int64_t b = 0;
    for (int64_t g = 0; g < G; g++) {
        float s[4], z[4];
        for (int r = 0; r < NR; r++) {
            s[r] = _cvtsh_ss(j->scales[(n + r) * G + g]);
            z[r] = (float)j->zeros[(n + r) * G + g];
        }
        for (int64_t bb = 0; bb < j->bpg; bb++, b++) {
            const int64_t k0 = b * j->B;
            __m256i acci[4][4];
            for (int r = 0; r < NR; r++)
                for (int i = 0; i < MT; i++) acci[r][i] = _mm256_setzero_si256();
            if (j->bits <= 4) {
                for (int64_t c = 0; c < j->B; c += 32) {
                    for (int r = 0; r < NR; r++) {
                        const uint8_t *p = j->qw + (n + r) * rowbytes + (k0 + c) / 2;
                        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
                        __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_srli_epi16(v, 4);
                        for (int i = 0; i < MT; i++) {
                            const int16_t *xr = xq + i * K + k0 + c;
                            acci[r][i] = _mm256_add_epi32(
                                acci[r][i], _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)));
                            acci[r][i] = _mm256_add_epi32(
                                acci[r][i], _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 16))));
                        }
                    }
                }
            } else {
                for (int64_t c = 0; c < j->B; c += 16) {
                    for (int r = 0; r < NR; r++) {
                        const uint8_t *p = j->qw + (n + r) * rowbytes + k0 + c;
                        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
                        for (int i = 0; i < MT; i++)
                            acci[r][i] = _mm256_add_epi32(
                                acci[r][i],
                                _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i *)(xq + i * K + k0 + c))));
                    }
                }
            }
            for (int i = 0; i < MT; i++) {
                const int64_t mb = (m0 + i) * j->nb + b;
                const float xs = j->xs[mb], zx = xs * (float)j->isum[mb];
                for (int r = 0; r < NR; r++) {
                    accf[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acci[r][i]), _mm256_set1_ps(s[r] * xs), accf[r][i]);
                    zacc[r][i] += s[r] * z[r] * zx;
                }
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int i = 0; i < MT; i++) j->y[(m0 + i) * j->N + n + r] = hsum8(accf[r][i]) - zacc[r][i];
}

AVX2 static void rows_avx2(const Job *j, int64_t n0, int64_t n1) {
    if (j->M == 1) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) tile(j, n, 0, 4, 1);
        for (; n < n1; n++) tile(j, n, 0, 1, 1);
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= j->M; m0 += 4) tile(j, n, m0, 1, 4);
        switch (j->M - m0) {
            case 3: tile(j, n, m0, 1, 3); break;
            case 2: tile(j, n, m0, 1, 2); break;
            case 1: tile(j, n, m0, 1, 1); break;
            default: break;
        }
    }
}

/* One row of W as fp32 (bf16 = 0) or bf16 (bf16 = 1, round to nearest even). */
AVX2 static inline void store8(void *out, int64_t k, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + k, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)out + k), h);
}

AVX2 static void dequant_row_avx2(const Job *j, int64_t n, void *out, int bf16) {
    const int64_t K = j->K, G = K / j->group, rowbytes = j->bits == 8 ? K : K / 2;
    const uint8_t *row = j->qw + n * rowbytes;
    for (int64_t g = 0; g < G; g++) {
        const float s = _cvtsh_ss(j->scales[n * G + g]);
        const __m256 vs = _mm256_set1_ps(s), vzs = _mm256_set1_ps(-(float)j->zeros[n * G + g] * s);
        for (int64_t k = g * j->group; k < (g + 1) * j->group; k += j->bits == 8 ? 16 : 32) {
            __m256i v = _mm256_cvtepu8_epi16(
                _mm_loadu_si128((const __m128i *)(row + (j->bits == 8 ? k : k / 2))));
            __m256i parts[2] = {v, v};
            if (j->bits <= 4) {
                parts[0] = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
                parts[1] = _mm256_srli_epi16(v, 4);
            }
            for (int h = 0; h < (j->bits == 8 ? 1 : 2); h++) {
                __m256i a = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(parts[h]));
                __m256i b = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(parts[h], 1));
                store8(out, k + 16 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), vs, vzs), bf16);
                store8(out, k + 16 * h + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), vs, vzs), bf16);
            }
        }
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

static const char *check_shape(int bits, int64_t M, int64_t N, int64_t K, int64_t group) {
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return "bits must be 2, 3, 4 or 8";
    if (M < 0 || N < 1) return "needs M ≥ 0 rows of x and N ≥ 1 outputs";
    if (K < 32 || K % 32) return "K must be a positive multiple of 32";
    if (group < 32 || group % 32 || K % group) return "group must be a multiple of 32 that divides K";
    return NULL;
}

PyObject *py_gemm(PyObject *self, PyObject *args) {
    int bits, nthreads, bf16 = 0;
    Py_ssize_t M, N, K, group;
    unsigned long long x, qw, scales, zeros, y;
    if (!PyArg_ParseTuple(args, "innnnKKKKKi|i", &bits, &M, &N, &K, &group, &x, &qw, &scales, &zeros, &y,
                          &nthreads, &bf16))
        return NULL;
    const char *bad = check_shape(bits, M, N, K, group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (M == 0) Py_RETURN_NONE;
    Job j = {bits, M, N, K, group, 0, 0, 0, (const float *)x, (const uint8_t *)qw, (const uint16_t *)scales,
             (const uint8_t *)zeros, (float *)y, NULL, NULL, NULL};
    j.B = act_block(group, bits);
    j.nb = K / j.B;
    j.bpg = group / j.B;
    size_t xq_bytes = (size_t)(M * K) * sizeof(int16_t), side = (size_t)(M * j.nb) * 4;
    size_t io_bytes = bf16 ? (size_t)(M * K + M * N) * sizeof(float) : 0; /* fp32 copies of x and y */
    char *buf = ce_scratch(xq_bytes + 2 * side + io_bytes + 64);
    if (!buf) return PyErr_NoMemory();
    j.xq = (int16_t *)buf;
    j.xs = (float *)(buf + xq_bytes);
    j.isum = (int32_t *)(buf + xq_bytes + side);
    Py_BEGIN_ALLOW_THREADS
    if (bf16) {
        float *xf = (float *)(buf + xq_bytes + 2 * side);
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf2f(((const uint16_t *)x)[i]);
        j.x = xf;
        j.y = xf + M * K;
    }
    quantize_rows(&j);
    /* Rows in tiles of 8; one thread for layers too small to repay waking the others. */
    const int64_t tile = 8, tiles = (N + tile - 1) / tile;
    int nt = (N * K * (M < 4 ? M : 4) < (1 << 18)) ? 1 : (nthreads > 0 ? nthreads : 1);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * tile, n1 = n0 + tile < N ? n0 + tile : N;
        run_rows(&j, n0, n1);
    }
    (void)nt;
    if (bf16)
        for (int64_t i = 0; i < M * N; i++) ((uint16_t *)y)[i] = f2bf(j.y[i]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Rows [n0, n1) of W[n, k] = (q[n, k] − z[n, g]) · s[n, g] into out [n1 − n0, K], fp32 or bf16: the large-batch
 * path (prefill) dequantizes a tile of rows at a time and hands it to a GEMM. */
static void dequant_row_generic(const Job *j, int64_t n, void *out, int bf16) {
    const int64_t K = j->K, G = K / j->group, rowbytes = j->bits == 8 ? K : K / 2;
    const uint8_t *row = j->qw + n * rowbytes;
    for (int64_t g = 0; g < G; g++) {
        const float s = h2f(j->scales[n * G + g]), zs = (float)j->zeros[n * G + g] * s;
        for (int64_t k = g * j->group; k < (g + 1) * j->group; k++) {
            float v = (float)code_at(j, row, k) * s - zs;
            if (!bf16)
                ((float *)out)[k] = v;
            else
                ((uint16_t *)out)[k] = f2bf(v);
        }
    }
}

typedef struct {
    Job j;
    int bf16;
} DequantCtx;

static void dequant_one_row(const void *ctx, int64_t n, void *dst) {
    const DequantCtx *c = (const DequantCtx *)ctx;
#ifdef CE_X86
    if (g_isa >= ISA_AVX2) {
        dequant_row_avx2(&c->j, n, dst, c->bf16);
        return;
    }
#endif
    dequant_row_generic(&c->j, n, dst, c->bf16);
}

PyObject *py_dequant(PyObject *self, PyObject *args) {
    int bits, bf16, nthreads;
    Py_ssize_t N, K, group, n0, n1;
    unsigned long long qw, scales, zeros, out;
    if (!PyArg_ParseTuple(args, "innnnnKKKKii", &bits, &N, &K, &group, &n0, &n1, &qw, &scales, &zeros, &out, &bf16,
                          &nthreads))
        return NULL;
    const char *bad = check_shape(bits, 1, N, K, group);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    DequantCtx c = {{bits, 1, N, K, group, 0, 0, 0, NULL, (const uint8_t *)qw, (const uint16_t *)scales,
                     (const uint8_t *)zeros, NULL, NULL, NULL, NULL},
                    bf16};
    if (ce_fill_rows(N, n0, n1, (size_t)K * (bf16 ? 2 : 4), (void *)(uintptr_t)out, nthreads, dequant_one_row, &c))
        return NULL;
    Py_RETURN_NONE;
}

