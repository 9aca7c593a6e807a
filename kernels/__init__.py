"""Kernels that run compressed layers, behind one registry. Importing registers the built-in kernels."""
from .base import KERNELS, KernelRequest, LinearKernel, choose_kernel, register_kernel  # noqa: F401
from . import torch_dequant  # noqa: F401
from . import dense  # noqa: F401,E402
from . import cpu_wna16  # noqa: F401,E402
from . import cuda_wna16  # noqa: F401,E402
from . import int8  # noqa: F401,E402
