"""The C allocator of a reinseg process: freed memory is kept for the next step.

On Linux, glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at first,
adapting up to 32 MiB) with a fresh ``mmap`` and gives it back to the kernel when it is freed,
and it returns the free top of its heap too. A CPU training step allocates and frees thousands
of activation-sized tensors, so the next step gets them back as new pages that the kernel has to
fault in and zero: measured on the paper's head with a ViT-S at 512 px (one thread), 1.1-1.6
million page faults and 1.7-3.7 s of system time in a 14 s step (``benchmarks/RESULTS.md``).

:func:`keep_freed_memory` turns both off for the process: every block comes from the heap and
freed memory stays there for reuse. The numbers computed are the same; the process's resident
memory stays at its peak between steps instead of falling back. The ``reinseg`` command calls it
at start (``REINSEG_ALLOCATOR=system`` leaves the allocator as it is); library users may call it
themselves. Elsewhere than glibc (macOS, musl, Windows) it does nothing.

Called before PyTorch is imported (as the ``reinseg`` command does), it also sets
``THP_MEM_ALLOC_ENABLE=1`` unless the environment sets it: PyTorch then aligns tensors of 2 MiB
and more to 2 MiB and asks the kernel for transparent huge pages for them. In the kept heap the
aligned blocks fragment it less: the paper's head with a ViT-S at 512 px (one thread) peaked
270-420 MiB lower over six steps, in the same time (``benchmarks/RESULTS.md``). PyTorch reads the
variable once, at its first allocation, so a later call leaves it alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process (no ``mmap`` for large blocks, no
    trimming of the heap). Returns whether the allocator now works that way; False where the C
    library is not glibc, or where ``REINSEG_ALLOCATOR=system`` asks to leave it alone."""
    global _applied
    if _applied:
        return True
    choice = os.environ.get("REINSEG_ALLOCATOR", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"REINSEG_ALLOCATOR must be 'keep' or 'system', got {choice!r}")
    if choice == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # mmap count 0: large blocks come from the heap too. Trim threshold -1: never trim (mallopt(3)).
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if _applied and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return _applied
