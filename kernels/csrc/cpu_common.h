/* Shared by the CPU kernels compiled into compress_export.kernels._cpu (cpu_wna16.c, cpu_int8.c): the headers
 * and the x86 switch (CE_X86) both use, the instruction-set path in use, chosen once at import (and by set_isa for tests), and the int8 entry points that
 * cpu_wna16.c's method table lists. */
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
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CE_X86 1
#endif

enum { ISA_GENERIC = 0, ISA_AVX2 = 1 };
extern int g_isa;

PyObject *py_int8_gemm(PyObject *self, PyObject *args);
PyObject *py_int8_linear(PyObject *self, PyObject *args);
#endif
