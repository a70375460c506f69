"""`retain_freed_memory`: a large block is served from glibc's heap, not from a mapping of its own, so
freeing it and allocating it again touches pages already faulted in. Each case runs in a process of
its own, because malloc's settings belong to the process; the control runs without them and shows
that both counts can fail."""

import os
import subprocess
import sys

import pytest

from lipformer.training import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's (and glibc's malloc in use)")

BLOCK = 64 << 20   # bytes: the size of the shakespeare-char preset's MLP pre-activations

CHILD = """
import ctypes, os, resource, sys, torch
from lipformer.training.allocator import retain_freed_memory
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE: count 4 KiB faults, not 2 MiB ones
print(retain_freed_memory() if sys.argv[1] == "retain" else "skipped")

class MallInfo2(ctypes.Structure):   # glibc >= 2.33; hblkhd: bytes in blocks mapped on their own
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if hasattr(libc, "mallinfo2"):
    libc.mallinfo2.restype = MallInfo2
    x = torch.empty(64 << 20 >> 2)
    print(libc.mallinfo2().hblkhd)
    del x
else:
    print(-1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.empty(64 << 20 >> 2)
    x.fill_(1.0)  # touch every page, as a kernel writing its output does
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def child(mode: str, **env) -> tuple[str, int, int]:
    """(what retain_freed_memory returned, bytes mapped on their own while a block is alive, page faults
    of 20 allocations), in a fresh process with none of the user's malloc or huge-page settings."""
    drop = allocator.USER_SETTINGS + ("LIPFORMER_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")


def test_a_freed_block_is_reused_from_the_heap():
    applied, mapped, faults = child("retain")
    assert applied == "True"
    assert mapped < BLOCK          # the live block is not a mapping of its own (0 here; -1: no mallinfo2)
    assert faults < 3 * PAGES, faults   # its pages are faulted in once, then reused by the next 19
    # control: glibc's default maps the block on its own and zero-fills it again at each allocation
    _, mapped, faults = child("default")
    assert mapped == -1 or mapped >= BLOCK
    assert faults > 15 * PAGES, faults


@pytest.mark.parametrize("env", [{"LIPFORMER_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_settings_the_user_chose_win(env):
    applied, _, faults = child("retain", **env)
    assert applied == "False"
    if "LIPFORMER_MALLOC" in env:  # nothing changed: malloc behaves as the control above
        assert faults > 15 * PAGES, faults


def test_other_tunables_are_not_malloc_settings():
    assert not allocator.user_chose_malloc_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert allocator.user_chose_malloc_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.mmap_max=0"})
    assert allocator.user_chose_malloc_settings({"MALLOC_MMAP_MAX_": "0"})
