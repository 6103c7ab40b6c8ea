"""Large buffers go back to the OS when freed, so peak RSS follows the load, not its history.

glibc's malloc serves blocks of at least ``M_MMAP_THRESHOLD`` (128 KiB) with their own
``mmap``, which ``free`` unmaps at once. But the threshold is dynamic: freeing such a block
raises it to the block's size (up to 32 MiB), so from then on a 7.6 MiB request or a
108 MB decode comes from the heap arenas, where freed space stays resident and fragments
across the decode and gRPC threads. overload_bench's memory phase (C=64 x 40 MP JPEGs)
peaked at 0.64-1.06 of the bound the README derives from the settings in three runs;
with the threshold fixed at 1 MiB, 0.51-0.72 in nine. Setting it explicitly turns the dynamic
adjustment off. A ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own variable)
wins, and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True when it was set here."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl and others: no such knob
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; freed buffers may stay", threshold)
        return False
    logger.info("freed buffers of %d KiB or more go back to the OS", threshold >> 10)
    return True
