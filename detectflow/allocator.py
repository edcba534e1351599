"""glibc's malloc tuned for a CPU inference process: freed activations are kept for the next batch.

By default glibc serves each large block (an activation tensor) with a fresh ``mmap`` and gives
it back to the kernel on free, so every batch faults in its activations page by page again, and
trims the heap's top after each batch. With glibc's largest mmap threshold and generous trim
and top-pad settings, blocks come from the heap and are reused (the gain: benchmarks/RESULTS.md,
lever log). Peak memory is the same working set, held instead of returned between batches;
blocks over the threshold still go straight to the kernel.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20))


@functools.cache  # process-wide: applied once, however many batches ask
def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` to this process's malloc; False where it is not glibc's (musl,
    macOS) or glibc refused a value, and nothing else changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it, and these mallopt codes
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
