"""glibc's malloc, tuned for a server that copies megabyte requests and decodes large images.

Three knobs, fixed at start-up (``tune_malloc``):

- ``M_MMAP_THRESHOLD``: blocks of at least this size get their own ``mmap``, which ``free``
  unmaps at once. glibc's default is dynamic: freeing such a block raises the threshold to
  the block's size (up to 32 MiB), after which a 108 MB decode's 16 MiB Pillow blocks come
  from the heap arenas, where freed space stays resident and fragments across the decode
  and gRPC threads. overload_bench's memory phase (C=64 x 40 MP JPEGs) peaked at 0.64-1.06
  of the bound the README derives from the settings in three runs with the dynamic
  threshold; fixed, it stays under the bound. Fixing it turns the adjustment off.
- ``M_TRIM_THRESHOLD``: free space at the top of a heap beyond this goes back to the OS.
  A unary request is copied about four times in the event loop (gRPC core's reassembly,
  grpc.aio's bytes, the parsed message, the field read). With the mmap threshold at 1 MiB
  (this server's setting before) each copy was a mapping of its own that the kernel
  faulted in and zeroed: for a 4.8 MB photo, 14 ms of the event loop's CPU, stalling every
  call behind it. Served from the heap instead, with glibc's default trim threshold
  (128 KiB) the freed space still goes back and is faulted in again (13.5 ms per photo with
  a 16 MiB trim threshold); a heap that keeps 32 MiB of its freed top took 3.3-4.0 ms.
- ``M_ARENA_MAX``: the number of heaps, capped at ``ARENAS`` (glibc's default is 8 per
  CPU), which bounds the memory kept free for reuse at ``ARENAS`` x the trim threshold:
  the README adds that to the pod-sizing bound.

So the mmap threshold sits between the requests the loop copies (up to 8 MiB: phone
photos) and Pillow's 16 MiB image blocks, and each heap keeps up to the trim threshold
free at its top. Other C libraries are left alone, and so is a knob whose glibc variable
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``) is in the
environment.

The trim threshold governs only a heap's top: ``free`` never returns the space between
blocks still in use, and a burst of large requests leaves the heaps holding it. After
C=64 x 7.6 MiB photos the server stayed at its peak (1.2-1.5 GB) with nothing in flight,
of which ``malloc_trim`` handed 0.65-0.9 GB back in 45-75 ms. So ``IdleTrimmer`` calls it
once the server has been idle for a while after traffic that left more than the heaps may
keep by design; steady traffic never waits for it, and the next burst finds fresh pages.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from typing import Protocol

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 32 << 20
# The event loop, gRPC's and the decode threads allocate the large blocks; more heaps
# only keep more free memory.
ARENAS = 4
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 on 64-bit systems.
MMAP_THRESHOLD_MAX = 32 << 20
# Seconds with no call in flight, after traffic, before the heaps' free memory goes back.
IDLE_TRIM_SECONDS = 2.0

_KNOBS = (
    ("mmap threshold", M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    ("trim threshold", M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
    ("arenas", M_ARENA_MAX, "MALLOC_ARENA_MAX"),
)


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES
) -> dict[str, int]:
    """Fix glibc's mmap and trim thresholds (0 leaves one as glibc has it) and, with the
    trim threshold, its number of heaps; returns what was set here, by name."""
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    values = (mmap_threshold, trim_threshold, ARENAS if trim_threshold > 0 else 0)
    for (name, option, variable), value in zip(_KNOBS, values, strict=True):
        if value <= 0 or variable in os.environ:
            continue
        if libc.mallopt(option, value) != 1:
            logger.warning("mallopt(%s, %d) failed; left as glibc has it", name, value)
            continue
        applied[name] = value
    if applied:
        logger.info(
            "malloc: %s",
            ", ".join(
                f"{name} {value}" if name == "arenas" else f"{name} {value >> 10} KiB"
                for name, value in applied.items()
            ),
        )
    return applied


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    # Cached: find_library runs ldconfig in a subprocess.
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None  # musl and others: no such knobs
    return libc


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> bool:
    """glibc's ``malloc_trim(0)``: every heap's free pages go back to the OS, those between
    blocks in use too. Blocking (tens of milliseconds after a burst; it holds each heap's
    lock in turn). False with another C library."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class Activity(Protocol):
    """What the trimmer reads of the server's calls (``drain.Drain`` counts them)."""

    @property
    def in_flight(self) -> int: ...
    @property
    def last_arrival(self) -> float: ...
    @property
    def last_ended(self) -> float: ...


class IdleTrimmer:
    """Hands the heaps' free memory back once no call has been in flight for ``idle_seconds``.

    Only after traffic (a call arrived since the last look) and only when the resident
    size has grown by more than ``kept_bytes`` (what the heaps may keep by design, their
    count times the trim threshold) since the last trim or the start.
    """

    def __init__(self, activity: Activity, idle_seconds: float, kept_bytes: int) -> None:
        self._activity = activity
        self._idle_seconds = idle_seconds
        self._kept_bytes = kept_bytes

    async def run(self) -> None:
        looked_after = self._activity.last_arrival
        floor = rss_bytes()
        while True:
            # Twice per idle period: a trim comes between 1 and 1.5 idle periods after the
            # last call.
            await asyncio.sleep(self._idle_seconds / 2)
            activity = self._activity
            arrival = activity.last_arrival
            quiet_since = max(arrival, activity.last_ended)
            if (
                activity.in_flight
                or arrival <= looked_after
                or time.monotonic() - quiet_since < self._idle_seconds
            ):
                continue
            looked_after = arrival
            before = rss_bytes()
            if before - floor <= self._kept_bytes:
                continue
            # In a thread: the event loop keeps answering (health checks, a new call).
            if not await asyncio.to_thread(release_free_memory):
                return
            floor = rss_bytes()
            logger.info(
                "malloc: idle for %.1f s after traffic; free heap memory handed back to the "
                "OS, resident %d -> %d MiB",
                self._idle_seconds,
                before >> 20,
                floor >> 20,
            )
