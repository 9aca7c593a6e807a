"""The C extension, which pyproject.toml's [tool.setuptools] table can only declare as an experimental feature.

compress_export.kernels._cpu: the CPU W4A16 kernel (kernels/csrc/cpu_wna16.c) and the exact W8A8 GEMM
(kernels/csrc/cpu_int8.c), plain C against Python's C API, so building needs a C compiler but not torch. Optional:
without a compiler the install still succeeds, the kernel registry reports "not built" and runs the portable kernel.
"""

import warnings

from setuptools import Extension, setup

try:  # setuptools tells every editable install to beware of same-named folders in the working directory; ours
    # cannot shadow anything (formats/, kernels/, integrations/ have no __init__.py), so that notice is noise here.
    from setuptools.warnings import InformationOnly

    warnings.filterwarnings("ignore", category=InformationOnly)
except ImportError:  # older setuptools: no such notice
    pass

setup(
    ext_modules=[
        Extension(
            "compress_export.kernels._cpu",
            sources=[
                "kernels/csrc/cpu_module.c",
                "kernels/csrc/cpu_wna16.c",
                "kernels/csrc/cpu_w4a8.c",
                "kernels/csrc/cpu_int8.c",
                "kernels/csrc/cpu_sparse24.c",
                "kernels/csrc/cpu_lowrank.c",
            ],
            depends=["kernels/csrc/cpu_common.h", "kernels/csrc/cpu_w4a8_tile.h"],
            optional=True,
            extra_compile_args=["-O3", "-std=gnu11", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
)
