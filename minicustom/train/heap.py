"""Keep the memory a CPU training step frees for the next step, instead of giving it back to the kernel.

A step on CPU allocates its activations (tens of MB each: 8 rows x 1024 tokens x 1536 floats is 50 MB) and
frees them all at the end of backward. glibc's malloc serves a block over its mmap threshold (128 KiB at
start, rising to the size of a freed mapped block, at most 32 MiB) with a fresh mmap and unmaps it when it is
freed, and it trims the top of its heap once more than twice that threshold is free there. Either way the
next step asks the kernel for the same memory again, and the kernel faults in and zeroes every 4 KiB page.
`benchmarks/bench_heap.py` (LoRA SFT of SmolLM2-135M, 8 x 1024 tokens, 4 steps, 2-core AMD EPYC): with
glibc's defaults 9.3 million page faults and 65 of 338 CPU seconds in the kernel; kept, 4.4 million (the
first touch of an 18 GB peak) and 55 of 331, and each step 1.05x as fast. At 4 x 256 tokens every tensor
fits under the threshold once it has risen, and it makes no measurable difference.

`keep_freed_memory()` sets two of glibc's malloc parameters (mallopt(3)) for the rest of the process:

    M_MMAP_MAX = 0                  every block comes from the heap, none from its own mmap
    M_TRIM_THRESHOLD = -1           the heap's free top is never handed back (glibc takes the value as a
                                    size_t: the largest one)

so the pages one step faulted in serve the next. `minicustom train` and `compare` call it, since their process
trains and then exits; the Python API leaves the caller's process as it is (call it before `train` to get
the same). The cost: the process's resident memory stays at its
high-water mark until it exits, and blocks are placed by the heap, which can leave holes that a later
larger block cannot use (bench_heap.py's peak: 17,981 MB against 17,668). Nothing changes on other C
libraries (musl, macOS, Windows), where it returns False; tensors on a GPU are not malloc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (see the module docstring); True where it did. Idempotent."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; both settings or neither would be a half-change, so the first is checked
    if libc.mallopt(M_MMAP_MAX, 0) != 1:
        return False
    _done = libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _done
