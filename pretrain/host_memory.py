"""Keep freed host memory in a training process.

With its default, dynamic thresholds glibc's malloc hands a step's large temporaries (the logits and their
gradients, megabytes each on a CPU) back to the OS when they are freed and page-faults them in again on the
next step: on 2 CPU cores that cost igpt-tiny's step about 40% when glibc trims at every free (12,000 page
faults a step, against about 100 with the heap kept; ``benchmarks/results/recipe_vs_plain_cpu.md``). Fixed
thresholds stop that, and they also stop glibc from adjusting them.
"""
from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

TRIM_THRESHOLD = 256 << 20  # freed memory at the top of the heap goes back to the OS only beyond this
MMAP_THRESHOLD = 32 << 20  # smaller allocations come from the heap (32 MiB: the largest glibc accepts)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def _user_tuned(env: Mapping[str, str]) -> bool:
    """Whether the user tuned glibc's malloc or preloaded another allocator (jemalloc, tcmalloc, mimalloc)."""
    return (any(env.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"))
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "") or "malloc" in env.get("LD_PRELOAD", ""))


def keep_freed_heap(env: Mapping[str, str] | None = None) -> bool:
    """Set glibc's trim and mmap thresholds for this process (its DataLoader workers inherit them); False, and
    nothing changed, off glibc or where the user tuned malloc or preloaded another allocator."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _user_tuned(os.environ if env is None else env):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
