"""glibc's allocator told to keep the memory torch frees, so that each step reuses it instead of faulting it in again.

By default glibc serves every allocation over 128 KiB to 32 MiB (its threshold moves with use) with a fresh
``mmap`` and hands it back with ``munmap`` when it is freed, and it trims the heap's free top back to the system.
A training or inference step allocates and frees the same activation tensors (tens of MB each) every time, so
each step the kernel maps them again and zero-fills every page on first touch. Measured on the 2-core CI
machine, that cost a third of the main job's CPU time in the kernel (338 million minor page faults for one
``dvc repro``). With allocations kept in the heap and the heap never trimmed, the same pages serve the next step:
``crfr bench train`` went from 48 to 78 images/s (teacher) and page faults fell ninefold.

The cost is resident memory that stays at the process's high-water mark instead of going back to the system
between steps; a long-lived process (the service) keeps the peak of its largest batch. The README reports
the measured peaks. ``CRFR_MALLOC_TUNING=off`` leaves glibc's defaults; a ``MALLOC_*_`` variable or
``GLIBC_TUNABLES`` in the environment means the user chose, and is left alone.

Applied when :mod:`crfr` is imported, so that every place crfr runs (DVC stages, the CLI, the service,
kfp and Prefect tasks, spawned decoding workers, the tests) gets it; processes forked later inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# mallopt takes an int: 2 GiB - 1 is the largest threshold it can be told; a larger block still gets its own mapping.
MAX_INT = 2**31 - 1
TOP_PAD = 256 * 2**20  # grow the heap 256 MB at a time: fewer brk calls while a step's first batch allocates
OFF_VARIABLE = "CRFR_MALLOC_TUNING"

_applied: bool | None = None


def user_chose() -> bool:
    """True when the environment already sets glibc's malloc parameters or says not to tune."""
    if os.environ.get(OFF_VARIABLE, "").lower() in ("off", "0", "false", "no"):
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ)


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and never trim it; returns whether it took effect.

    Does nothing (returns False) off glibc, or when :func:`user_chose`. Idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if user_chose():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # absent on musl and macOS: their allocators take no mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MAX_INT), (M_TRIM_THRESHOLD, MAX_INT), (M_TOP_PAD, TOP_PAD)))
    return _applied
