"""Process-wide runtime settings that make torch on the CPU faster: glibc's malloc thresholds.

Why: glibc serves every allocation above its mmap threshold (128 KiB at start, raised dynamically up to
32 MiB) with a fresh ``mmap`` and returns it with ``munmap``, and it gives the top of its heap back to
the kernel whenever more than ``M_TRIM_THRESHOLD`` is free there. A forward or backward pass of a
convolutional or transformer network allocates and frees activation buffers of several MiB for every
layer, so each pass maps, page-faults (the kernel zeroes every new page) and unmaps the same memory
again. Measured on this project's 2-core machine with the default model (``benchmarks/RESULTS.md``):
a quarter to a third of the forward pass's CPU time was system time spent in those page faults; with
the thresholds below the freed buffers stay in the process and are reused, and the batch-64 forward
pass ran 1.52x faster in fp32 and 1.35x in bf16, the training step 1.05x, at 4-8% more peak memory
(`benchmarks/bench_malloc.py`).

The cost: up to ``TRIM_THRESHOLD`` of freed memory stays mapped in the process instead of going back to
the kernel. Settings: ``VITRINE_MALLOC=0`` (or ``off``) leaves glibc's defaults alone; glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, when set, win as well
(the user chose). On a C library other than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 20  # allocations up to 128 MiB come from the heap (and are reused), not a fresh mmap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap in the process instead of returning it at once

_applied: dict[str, int] | None = None


def tune_malloc() -> dict[str, int]:
    """Raise glibc's mmap and trim thresholds once per process; returns what was set ({} when nothing was).

    Idempotent and safe to call from every entry point (CLI, Embedder, training): forked children (DataLoader
    workers) inherit the setting.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if os.environ.get("VITRINE_MALLOC", "").strip().lower() in ("0", "off", "false", "no"):
        logger.debug("VITRINE_MALLOC=%s: glibc's malloc thresholds left alone", os.environ["VITRINE_MALLOC"])
        return _applied
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        logger.debug("glibc malloc thresholds set by the environment: left alone")
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return _applied
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for name, param, value in (("mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("trim_threshold", M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if mallopt(param, value) == 1:
            _applied[name] = value
        else:
            logger.debug("mallopt(%d, %d) refused: glibc default kept for %s", param, value, name)
    return _applied
