/* compress_export.kernels._cpu: the module itself. Which instruction-set variant runs (cpuid, once at import), the
 * switch tests use to run each variant the CPU has, and the method table of every kernel file's entry points. */
#include "cpu_common.h"

int g_isa = ISA_GENERIC;
const char *const ISA_NAMES[] = {"generic", "avx2", "avxvnni", "avx512", "avx512vnni"};

static __thread void *t_scratch = NULL;
static __thread size_t t_scratch_bytes = 0;

void *ce_scratch(size_t bytes) {
    if (bytes > t_scratch_bytes) {
        free(t_scratch);
        t_scratch = malloc(bytes);
        t_scratch_bytes = t_scratch ? bytes : 0;
    }
    return t_scratch;
}

int ce_fill_rows(Py_ssize_t N, Py_ssize_t n0, Py_ssize_t n1, size_t row_bytes, void *out, int nthreads, ce_row_fn row,
                 const void *ctx) {
    if (!(0 <= n0 && n0 <= n1 && n1 <= N)) {
        PyErr_SetString(PyExc_ValueError, "row range out of bounds");
        return -1;
    }
    const int nt = nthreads > 0 ? nthreads : 1;
    (void)nt;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t n = n0; n < n1; n++) row(ctx, n, (char *)out + (size_t)(n - n0) * row_bytes);
    Py_END_ALLOW_THREADS
    return 0;
}

int isa_supported(int isa) {
    if (isa == ISA_GENERIC) return 1;
#ifdef CE_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    switch (isa) {
        case ISA_AVX2: return avx2;
#ifdef CE_AVXVNNI
        case ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni"); /* the VEX encoding: 256-bit vpdpbusd */
#endif
        case ISA_AVX512: return avx512;
        case ISA_AVX512VNNI: return avx512 && __builtin_cpu_supports("avx512vnni");
        default: return 0;
    }
#else
    return 0;
#endif
}

static void detect_isa(void) {
    g_isa = ISA_GENERIC;
    for (int i = ISA_COUNT - 1; i > 0; i--)
        if (isa_supported(i)) {
            g_isa = i;
            return;
        }
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(ISA_NAMES[g_isa]); }

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < ISA_COUNT; i++)
        if (isa_supported(i)) {
            PyObject *s = PyUnicode_FromString(ISA_NAMES[i]);
            if (!s || PyList_Append(out, s) < 0) {
                Py_XDECREF(s);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(s);
        }
    return out;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "auto") == 0) {
        detect_isa();
        return py_isa(self, NULL);
    }
    for (int i = 0; i < ISA_COUNT; i++)
        if (strcmp(name, ISA_NAMES[i]) == 0) {
            if (!isa_supported(i)) {
                PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels (it has: see isas())", name);
                return NULL;
            }
            g_isa = i;
            return py_isa(self, NULL);
        }
    PyErr_Format(PyExc_ValueError, "unknown ISA %s: choose auto, generic, avx2, avxvnni, avx512 or avx512vnni", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(bits, M, N, K, group, x, qw, scales, zeros, y, nthreads, bf16=0): y[M,N] = x[M,K] · dequant(W)ᵀ, the "
     "row layout (8-bit; addresses; x and y bf16 when bf16=1, else fp32)"},
    {"dequant", py_dequant, METH_VARARGS,
     "dequant(bits, N, K, group, n0, n1, qw, scales, zeros, out, bf16, nthreads): rows n0..n1 of W (row layout)"},
    {"w4a8_gemm", py_w4a8_gemm, METH_VARARGS, "see kernels/csrc/cpu_w4a8.c"},
    {"w4_gemv16", py_w4_gemv16, METH_VARARGS, "see kernels/csrc/cpu_w4a8.c"},
    {"w4_dequant", py_w4_dequant, METH_VARARGS, "see kernels/csrc/cpu_w4a8.c"},
    {"int8_gemm", py_int8_gemm, METH_VARARGS,
     "int8_gemm(M, N, K, xq, w, acc, nthreads): acc[M,N] int32 = xq[M,K] int8 · w[N,K] int8ᵀ, exact (addresses)"},
    {"int8_linear", py_int8_linear, METH_VARARGS,
     "int8_linear(M, N, K, x, w, scale, y, nthreads): y[M,N] fp32 = W8A8 of x[M,K] fp32 (per-token int8) and "
     "w[N,K] int8 with per-channel scale[N] fp32 (addresses)"},
    {"sparse24_gemm", py_sparse24_gemm, METH_VARARGS, "see kernels/csrc/cpu_sparse24.c"},
    {"sparse24_expand", py_sparse24_expand, METH_VARARGS, "see kernels/csrc/cpu_sparse24.c"},
    {"lowrank_apply", py_lowrank_apply, METH_VARARGS, "see kernels/csrc/cpu_lowrank.c"},
    {"isa", py_isa, METH_NOARGS, "the instruction-set variant in use"},
    {"isas", py_isas, METH_NOARGS, "the variants this CPU can run, portable first"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): run one variant (auto: the best this CPU has). kernels/cpu_wna16.py passes "
     "COMPRESS_EXPORT_CPU_ISA at load; the C code reads no environment"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu",
                                    "CPU W{2,3,4,8}A16, W4A8, exact W8A8, 2:4 sparse and low-rank kernels", -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    detect_isa();
    return PyModule_Create(&module);
}
