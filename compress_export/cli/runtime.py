"""Process-wide memory settings for long compression runs.

A layer-at-a-time run allocates and frees activation-sized buffers (hundreds of MB) thousands of times. By default
glibc returns each to the kernel and the next one is page-faulted back in zeroed 4 KiB at a time: on SmolLM2 GPTQ
that was 12.6 M page faults and 42 s of kernel time in a 179 s run. Keeping freed memory in the process and
backing PyTorch's large buffers with transparent huge pages took the same run to 164 s (see benchmarks/README.md).

Owned by the process, so the CLI calls `tune_process()` first thing; Python API users may call it themselves
before importing torch. `COMPRESS_EXPORT_MALLOC=default` opts out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from compress_export.core import settings

# glibc mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_process() -> bool:
    """Apply the settings; returns whether the allocator part took effect (glibc only)."""
    if settings.get("MALLOC") == "default":
        return False
    if "torch" not in sys.modules:
        # Read once by PyTorch's CPU allocator at its first allocation: 2 MiB-aligned buffers, madvise'd huge.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: keep their defaults
        return False
    ok = mallopt(_M_MMAP_MAX, 0)  # large blocks come from the heap, so freeing keeps them...
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ...and the heap is not trimmed back to the kernel
    ok &= mallopt(_M_TOP_PAD, 64 << 20)
    return bool(ok)
