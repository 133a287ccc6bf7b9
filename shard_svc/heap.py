"""Memory the shard freed, handed back to the system rather than kept by glibc's malloc.

glibc keeps freed memory for reuse. Below its mmap threshold (which it raises, up to 32 MiB, each
time a larger mapped block is freed) allocations come from arenas, one per thread that
allocates, and a freed block stays resident there: in a free list, which `malloc_trim` hands
back, or at the top of a thread's arena, which it does not (glibc trims a thread arena's top
only in `free`, and only past its trim threshold, raised with the mmap threshold). Loading,
choosing kernels and warming up leave such tops behind: on the 1B int8 tp-2 shard, 8-24 MiB of
its step thread's arena in most starts (freed dequantized rows and int8 scales, read there), so
a rank's RSS was 1103-1124 MiB between starts; settled, 1098 in each of 8 (AMD EPYC).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger("cpumesh.shard")
M_TRIM_THRESHOLD = -1  # mallopt's parameter (malloc.h)
# Once serving, a free that leaves this much at the top of an arena hands it back (a long
# prompt's prefill buffers); a decode step's allocations never reach it, so a step does not
# fault its pages in again. Fixing it also fixes glibc's mmap threshold where start-up left it.
SERVING_TRIM_BYTES = 16 << 20
# A block that `free` returns to its arena's top and that is large enough for free to try the
# trim (glibc's FASTBIN_CONSOLIDATION_THRESHOLD is 64 KiB), yet under the smallest mmap
# threshold (128 KiB), so it comes from the arena, not from its own mapping.
_NUDGE_BYTES = 96 << 10


@functools.cache
def _libc() -> Any | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def release_freed_memory() -> None:
    """Hand the free lists of every arena back to the system (the slices' float buffers,
    matrices replaced by a new layout: ~30 % of a quantized shard's RSS, kept otherwise)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def settle() -> bool:
    """Once, on the step thread, when the shard starts serving: with the trim threshold at 0,
    free a block in this thread's arena (glibc trims the arena's whole top), trim every free
    list, then leave the threshold at SERVING_TRIM_BYTES. Whether glibc took it."""
    if (libc := _libc()) is None:
        return False
    if not libc.mallopt(M_TRIM_THRESHOLD, 0):
        log.warning("glibc refused mallopt(M_TRIM_THRESHOLD): start-up buffers stay resident")
        return False
    libc.free(libc.malloc(_NUDGE_BYTES))  # this thread's arena: its whole top
    libc.malloc_trim(0)
    return bool(libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_BYTES))
