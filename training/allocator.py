"""Keep freed CPU memory in the process, so a training step stops paying the kernel for fresh pages.

glibc's malloc serves every block at or above its mmap threshold with a mapping of its own and unmaps
it at free. The threshold adapts upward to the largest block freed, but never past 32 MiB
(DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and a training step allocates and frees the same larger
activations (the MLP's 64 × 256 × 1024 float32 pre-activations are 64 MiB) every step. So every step
maps them afresh, and the kernel zero-fills each 4 KiB page on its first touch. On the shakespeare-char
preset (2 AVX2 cores) that was about 67,000 page faults a second and a quarter of the step's wall time
in the kernel (docs/benchmarks.md, "CPU allocator").

`retain_freed_memory` raises the mmap threshold so that such blocks come from the heap, which malloc
reuses from one step to the next. It also raises the trim threshold, so the heap's free top is not
handed back and faulted in again at the next step. The peak is what the step needed anyway. Memory
does not leak: a freed block goes back to malloc's free lists, not to the kernel.

Only the process's owner should change its allocator: `lipformer train`, `lipformer demo` and the
scripts that run the loop call this. Importing the library never does. Settings the user chose win:
nothing changes when MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES is set, and
LIPFORMER_MALLOC=default turns this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt's parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# mallopt takes an int, so 2 GiB - 1 is the largest threshold it can be given. Larger blocks still
# get their own mapping; there the fault cost is small against what a block that size is used for.
RETAINED = 2**31 - 1

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _glibc():
    """The process's C library if it is glibc (mallopt and its parameters are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # present in glibc only (musl has no such symbol)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether they were changed:
    False off glibc, when the user set malloc's own variables, or with LIPFORMER_MALLOC=default."""
    if os.environ.get("LIPFORMER_MALLOC", "") == "default":
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; the mmap threshold also turns off its adaptive adjustment
    return bool(libc.mallopt(M_MMAP_THRESHOLD, RETAINED)) and bool(libc.mallopt(M_TRIM_THRESHOLD, RETAINED))
