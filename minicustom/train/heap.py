"""Keep the memory a CPU training step frees for the next step, instead of giving it back to the kernel.

A step on CPU allocates its activations (tens of MB each: 8 rows x 1024 tokens x 1536 floats is 50 MB) and
frees them all at the end of backward. glibc's malloc serves a block over its mmap threshold (128 KiB at
start, rising to the size of a freed mapped block, at most 32 MiB) with a fresh mmap and unmaps it when it is
freed, and it trims the top of its heap once more than twice that threshold is free there. Either way the
next step asks the kernel for the same memory again, and the kernel faults in and zeroes every 4 KiB page.

It matters for a step whose tensors stay over 32 MiB: transformers+peft's full logits (200 MB at 4 x 256
tokens) made it 1.27x faster in `benchmarks/bench_sft.py --malloc both`. minicustom's chunked loss leaves no
such tensor at that batch, and at 8 x 1024 tokens (`benchmarks/bench_heap.py`, 2-core AMD EPYC) it halved
the page faults (9.0-9.3 million to 4.4-4.5, the rest being the first touch of an 18 GB peak) and cut the
kernel's CPU time by 10-17 s in 4 steps, but each step was 1.05x and then 1.01x as fast, within the noise,
while the peak grew 2-4%. So nothing in minicustom calls it: it is a switch for the caller's process.

`keep_freed_memory()` sets two of glibc's malloc parameters (mallopt(3)) for the rest of the process:

    M_MMAP_MAX = 0                  every block comes from the heap, none from its own mmap
    M_TRIM_THRESHOLD = -1           the heap's free top is never handed back (glibc takes the value as a
                                    size_t: the largest one)

so the pages one step faulted in serve the next. The cost: the process's resident memory stays at its
high-water mark until it exits, and blocks are placed by the heap, which can leave holes that a later
larger block cannot use. Nothing changes on other C libraries (musl, macOS, Windows), where it
returns False; tensors on a GPU are not malloc's.
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
