/* Shared by the CPU kernels compiled into compress_export.kernels._cpu: the headers and the x86 switch (CE_X86) they
 * all use, the instruction-set variants and the one in use (chosen once at import from cpuid by cpu_module.c, and by
 * set_isa for tests), and every entry point that cpu_module.c's method table lists.
 *
 * One build, every CPU: each variant's functions carry their own target attribute, so a wheel built on an AVX2
 * machine holds the AVX-512 and VNNI code too, and a CPU runs only what cpuid says it has. */
#ifndef CE_CPU_COMMON_H
#define CE_CPU_COMMON_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <float.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CE_X86 1
/* The VEX-encoded AVX-VNNI (target "avxvnni", _mm256_dpbusd_avx_epi32) needs GCC 11 or clang 12; older compilers
 * build every other variant and report avxvnni as unsupported, rather than lose the whole extension. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define CE_AVXVNNI 1
#endif
#endif

/* Ordered by preference, not by inclusion: AVX-512 CPUs without VNNI (Skylake-X) lack AVX-VNNI, so dispatch tests
 * the VNNI variants with == and only the AVX2 baseline with >=. */
enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512 = 3, ISA_AVX512VNNI = 4, ISA_COUNT = 5 };
extern int g_isa;                     /* the variant in use */
extern const char *const ISA_NAMES[]; /* "generic", "avx2", "avxvnni", "avx512", "avx512vnni" */
int isa_supported(int isa);           /* whether this CPU (and OS) can run that variant */
/* Blocks of x whose largest |value| is below this quantize to zeros with scale 0 (qmax / amax would overflow; their
 * contribution is below 1e-30 · |w| · block anyway). */
#define CE_TINY_AMAX 1e-30f
/* Per-thread scratch (quantized activations, expanded tiles): grows, never shrinks. Valid until the calling
 * thread's next ce_scratch call, so a kernel takes it once per call. NULL when malloc fails. */
void *ce_scratch(size_t bytes);

/* Rows [n0, n1) of an N-row matrix, each written by row(ctx, n, dst) to dst = out + (n − n0) · row_bytes, on
 * nthreads OpenMP threads with the GIL released (the dequantize/expand entry points' shared loop). Returns 0, or -1
 * with a ValueError set when the row range is not inside [0, N]. */
typedef void (*ce_row_fn)(const void *ctx, int64_t n, void *dst);
int ce_fill_rows(Py_ssize_t N, Py_ssize_t n0, Py_ssize_t n1, size_t row_bytes, void *out, int nthreads, ce_row_fn row,
                 const void *ctx);

PyObject *py_gemm(PyObject *self, PyObject *args);
PyObject *py_dequant(PyObject *self, PyObject *args);
PyObject *py_int8_gemm(PyObject *self, PyObject *args);
PyObject *py_int8_linear(PyObject *self, PyObject *args);
PyObject *py_w4a8_gemm(PyObject *self, PyObject *args);
PyObject *py_w4_gemv16(PyObject *self, PyObject *args);
PyObject *py_w4_dequant(PyObject *self, PyObject *args);
PyObject *py_sparse24_gemm(PyObject *self, PyObject *args);
PyObject *py_sparse24_expand(PyObject *self, PyObject *args);
PyObject *py_lowrank_apply(PyObject *self, PyObject *args);
/* Scalar conversions for the portable paths and the edges of the vector ones (which convert with F16C/shifts). */
static inline float h2f(uint16_t h) { /* IEEE half → float, exact (subnormals, Inf and NaN included) */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, f;
    float out;
    if (exp == 0) {
        out = (float)man * 5.9604644775390625e-08f; /* subnormal (or zero): man · 2^-24 */
        memcpy(&f, &out, 4);
        f |= sign;
    } else if (exp == 31) {
        f = sign | 0x7f800000u | (man << 13);
    } else {
        f = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&out, &f, 4);
    return out;
}

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float ce_load_x(const void *x, int bf16, int64_t i) { /* x[i] of an fp32 (bf16 = 0) or bf16 row */
    return bf16 ? bf2f(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* The portable activation quantizer every kernel's dynamic path shares: block x[off, off + B) (fp32, or bf16 when
 * bf16) as symmetric codes with qmax levels each side (127: int8, 32767: int16), its scale amax / qmax and code sum.
 * Code k is stored at pos8[k & 7] within its 8-step when pos8 is given (int8 panels), else in place. A non-finite
 * block gets scale NaN and zero codes, so its outputs are NaN rather than silently finite; a block whose amax is
 * below CE_TINY_AMAX gets scale 0 and zero codes. Vector variants must give the same codes. */
static inline void ce_quantize_block(const void *x, int bf16, int64_t off, int64_t B, float qmax, void *q, int is8,
                                     const int *pos8, float *scale, int32_t *sum) {
    float amax = 0.f;
    int nonfinite = 0;
    for (int64_t k = 0; k < B; k++) {
        float a = fabsf(ce_load_x(x, bf16, off + k));
        if (!(a <= FLT_MAX)) nonfinite = 1;
        else if (a > amax) amax = a;
    }
    const float inv = (!nonfinite && amax >= CE_TINY_AMAX) ? qmax / amax : 0.f;
    int32_t s = 0;
    for (int64_t k = 0; k < B; k++) {
        long v = inv > 0.f ? lrintf(ce_load_x(x, bf16, off + k) * inv) : 0;
        v = v > (long)qmax ? (long)qmax : v < -(long)qmax ? -(long)qmax : v;
        const int64_t at = pos8 ? (k & ~7) + pos8[k & 7] : k;
        if (is8)
            ((int8_t *)q)[at] = (int8_t)v;
        else
            ((int16_t *)q)[at] = (int16_t)v;
        s += (int32_t)v;
    }
    *scale = nonfinite ? NAN : inv > 0.f ? amax / qmax : 0.f;
    *sum = s;
}
#endif
