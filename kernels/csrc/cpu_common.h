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
#endif
