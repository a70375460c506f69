"""`retain_freed_memory`: a large block freed and allocated again is served from memory already
faulted in, not from fresh pages. Each case runs in its own process, because malloc's settings belong
to the process; the control runs without them and shows that the count can fail."""

import os
import subprocess
import sys

import pytest

from lipformer.training import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")

PAGES = (64 << 20) // 4096  # one 64 MiB block, the size of the preset's MLP pre-activations

CHILD = """
import resource, sys, torch
from lipformer.training.allocator import retain_freed_memory
print(retain_freed_memory() if sys.argv[1] == "retain" else "skipped")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.empty(64 << 20 >> 2)
    x.fill_(1.0)  # touch every page, as a kernel writing its output does
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS + ("LIPFORMER_MALLOC",)}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env={**environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_a_freed_block_is_reused_without_page_faults():
    applied, retained = page_faults("retain")
    assert applied == "True"
    # the first allocation faults its pages in once; the next 19 reuse them
    assert retained < 3 * PAGES, retained
    # control: glibc's default maps and zero-fills the block again on each of the 20 allocations
    _, default = page_faults("default")
    assert default > 15 * PAGES, default


@pytest.mark.parametrize("env", [{"LIPFORMER_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_settings_the_user_chose_win(env):
    applied, faults = page_faults("retain", **env)
    assert applied == "False"
    if "LIPFORMER_MALLOC" in env:  # nothing changed: malloc behaves as the control above
        assert faults > 15 * PAGES, faults
