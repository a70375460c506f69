"""Keep freed CPU memory in the process, so a training step stops paying the kernel for fresh pages.

glibc's malloc gives every block at or above its mmap threshold a mapping of its own, and unmaps it at
free. The threshold adapts upward to the largest mapped block freed, but never past 32 MiB
(DEFAULT_MMAP_THRESHOLD_MAX on 64-bit). A training step allocates and frees the same larger
activations every step (the MLP's 64 × 256 × 1024 float32 pre-activations are 64 MiB), so every step
maps them afresh and the kernel zero-fills each page on its first touch. On the shakespeare-char
preset (2 AVX2 cores) that was about 290,000 page faults and 1 s of kernel CPU in a 3 s step
(docs/benchmarks.md, "CPU allocator").

`retain_freed_memory` makes such blocks come from the heap, which malloc reuses from one step to the
next. It raises the mmap threshold (glibc ≥ 2.35 accepts any int; older glibc caps it at 32 MiB, and
there mmap is turned off with M_MMAP_MAX = 0 instead). It also raises the trim threshold, so the
heap's free top is not handed back and faulted in again at the next step.

What it costs: the process keeps its heap's high-water mark resident until it exits, and free chunks
inside the heap can make that mark exceed the step's own peak. Freed blocks go back to malloc's free
lists, so nothing leaks. It acts on the main thread's heap, where CPU autograd allocates. Other
threads' arenas are capped at 64 MiB per heap and still map larger blocks. The settings belong to the
process: fork children inherit them, exec'd ones do not, and each torchrun rank sets its own.

Only the process's owner should change its allocator, so importing the library never does. The
console commands `lipformer train` and `lipformer demo` call this (not `cli.main([...])` called in
process), and so do scripts/certify_val.py and scripts/bench_allocator.py's second row; the other
step benchmarks run with glibc's default (their ratios hold, their absolute times are higher). Settings the
user chose win: nothing changes with MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or
MALLOC_MMAP_MAX_ set, with glibc.malloc tunables in GLIBC_TUNABLES, or with another malloc preloaded
(jemalloc, tcmalloc). LIPFORMER_MALLOC=default turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

# mallopt takes an int, so 2 GiB - 1 is the largest threshold it can be given. Larger blocks still
# get their own mapping; there the fault cost is small against what a block that size is used for.
RETAINED = 2**31 - 1

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")


def _glibc():
    """The process's glibc (mallopt and its parameters are glibc's) if it is the malloc in use, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")   # the soname: the C library already loaded, not a search
        libc.gnu_get_libc_version         # glibc only (musl has no such symbol)
        process = ctypes.CDLL(None)       # what the process's own calls to malloc resolve to
    except (OSError, AttributeError):
        return None
    if ctypes.cast(process.malloc, ctypes.c_void_p).value != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return None                       # jemalloc, tcmalloc, ... preloaded: glibc's settings do nothing
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def user_chose_malloc_settings(environ=os.environ) -> bool:
    return (any(environ.get(name) for name in USER_SETTINGS)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def retain_freed_memory() -> bool:
    """Keep large freed blocks on glibc's heap for this process (see the module docstring). Returns
    whether malloc's settings were changed: False off glibc, when the user chose malloc settings or
    another malloc, or with LIPFORMER_MALLOC=default."""
    if os.environ.get("LIPFORMER_MALLOC", "") == "default" or user_chose_malloc_settings():
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; setting either threshold also stops glibc's adaptive adjustment
    on_heap = libc.mallopt(M_MMAP_THRESHOLD, RETAINED) or libc.mallopt(M_MMAP_MAX, 0)
    return bool(on_heap) and bool(libc.mallopt(M_TRIM_THRESHOLD, RETAINED))
