"""train/heap.py: after keep_freed_memory() a freed 64 MB tensor's pages serve the next one (no page faults);
with glibc's defaults every allocation of that size faults all its pages in again. Each case runs in its own
process, since the setting lasts for the process."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt's settings exist on glibc only")

PAGES = 16 * 2**20 * 4 // 4096  # a 16M-float tensor is 16,384 pages of 4 KiB
ROUNDS = 5

PROGRAM = f"""
import resource, sys
import torch
from minicustom.train.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
def step():
    x = torch.ones(16 * 2**20)  # 64 MB, every page written: over glibc's largest mmap threshold (32 MiB)
    del x
for _ in range(4):  # the heap's layout settles first: here the 3rd block landed on fresh pages once
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def test_keep_freed_memory_reuses_the_pages_of_a_freed_tensor():
    default, kept = faults("default"), faults("keep")
    # glibc's default maps and unmaps each 64 MB block: every page of every round faults (huge pages would
    # fault less, so at least half is asked); kept, the heap's pages are already there: a handful of faults
    assert default >= ROUNDS * PAGES // 2, default
    assert kept < PAGES // 16, kept
