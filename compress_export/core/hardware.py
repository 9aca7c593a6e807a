"""What this machine can run fast, read from the machine itself (never from a constant): CPU instruction sets,
whether a CUDA device is present, and the fastest activation dtype that follows.

The dtype rule, measured (benchmarks/vllm_speed.py; ../shared/notes/vllm-cpu.md): on CPUs with AVX-512 bf16 (or
AMX) oneDNN runs bf16 GEMMs natively and bf16 is the fast dtype (SmolLM2 in vLLM: 30.0 tokens/s bf16 against 8.2
fp32); on AVX2-only CPUs bf16 has no native matmul and float32 is faster. On CUDA, bf16 where the GPU has it.
Cheap to import: no torch, no vLLM.
"""

from __future__ import annotations

import functools
import os

from compress_export.core import settings

# Either flag gives oneDNN a native bf16 matmul on the CPU.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags=None) -> bool:
    """The CPU multiplies bf16 natively (AVX-512 bf16 or AMX), so oneDNN's bf16 GEMM beats fp32 there."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in CPU_BF16_FLAGS)


# Any of these gives oneDNN an int8 dot product that sums u8×s8 products straight into int32 (vpdpbusd, AMX).
CPU_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def saturating_int8_gemm(flags=None) -> bool:
    """vLLM's CPU int8 GEMM (oneDNN) is inexact here: an x86 CPU with AVX2 but no VNNI, where oneDNN multiplies
    with vpmaddubsw and adds each pair of u8×s8 products in a saturating int16. Measured on an AVX2 CPU: 12.7%
    relative error on full-range operands, bit for bit the saturating model (benchmarks/int8_exactness.py)."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not any(f in flags for f in CPU_INT8_DOT_FLAGS)


def cpu_kind(flags=None) -> str:
    """A short name for the CPU kind as far as our kernels and dtypes care: "AVX-512 bf16", "AVX-512", "AVX2" or
    "other"."""
    flags = cpu_flags() if flags is None else flags
    if native_bf16(flags):
        return "AVX-512 bf16"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "other"


def has_cuda() -> bool:
    """A CUDA (or ROCm) device is present, judged without importing torch (vLLM picks its platform the same way
    early on; CUDA_VISIBLE_DEVICES="" hides the devices)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    nvidia = any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl"))
    return nvidia or bool(os.environ.get("ROCR_VISIBLE_DEVICES"))


def fast_dtype(device: str = "cpu", flags=None) -> str:
    """The fastest activation dtype for a model on this machine, as vLLM and torch spell it: "bfloat16" or
    "float32". COMPRESS_EXPORT_DTYPE overrides it (for measuring the other one)."""
    forced = settings.get("DTYPE")
    if forced != "auto":
        return str(forced)
    if device.startswith("cuda"):
        return "bfloat16"  # vLLM falls back to float16 itself on GPUs without bf16 (pre-Ampere)
    return "bfloat16" if native_bf16(flags) else "float32"


def resolve_device(spec: str = "auto"):
    """The torch device compression statistics and sweeps run on: --device auto|cpu|cuda[:N].

    auto: the first CUDA device when one is visible, else the CPU. A CUDA device that is not there is a usage
    error naming what the machine has, not a crash mid-run.
    """
    import torch

    from compress_export.core.errors import UserError

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {spec}: want auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = int(index or 0)
    if n >= count:
        raise UserError(
            f"--device {spec}: this machine has {count} CUDA device(s) visible to torch "
            f"({'a CPU-only torch build' if torch.version.cuda is None else 'check CUDA_VISIBLE_DEVICES'});"
            " use --device cpu"
        )
    return torch.device(f"cuda:{n}")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
HEAP_MMAP_THRESHOLD = 64 * 1024


def fix_mmap_threshold(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more by its own mapping, returned to the system
    when freed, for the rest of the process. True when set (glibc), False elsewhere (nothing changed).

    Why: a streamed export frees each layer's weights and reads the next. glibc's threshold is dynamic: after the
    first large frees it rises (up to 32 MB), later tensors below it come from the heap, and many mid-sized ones
    (MoE experts) fragment it, so peak memory grew with depth though only one layer is alive (a 8-layer MoE model:
    617 → 723 MB against 2 layers; fixed at 64 KB: 609 → 618). Mapping a large tensor costs its page faults, small
    beside the arithmetic that fills it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_heap() -> None:
    """Collect unreachable Python objects, then have glibc hand its free heap pages back to the system
    (malloc_trim(0): every arena, including the pages inside it). A streamed export calls this before it reads
    each layer, so that what the previous layer left free is not still resident.

    Why both: a fixed mmap threshold (above) keeps large tensors off the heap, but the threads torch runs on each
    have an arena, and what they free there stays resident until trimmed; freed layers caught in reference cycles
    stay allocated until the collector runs. On an 8-layer MoE model (32 experts a layer) peak RSS varied from
    run to run between 770 and 871 MB against 2 layers' 752-760 MB; with this call before each layer it is 751
    MB, the same at every layer."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, the high-water mark of its own address space.
    getrusage's ru_maxrss is the fallback elsewhere; on Linux it would carry over the high-water mark of a parent
    that forked this process before exec (a test runner's, a benchmark's), which is not this run's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
