"""Give freed memory back to the operating system (glibc, Linux).

glibc keeps freed heap memory for reuse, and after each large block is freed it raises the size
above which blocks get their own mapping (a "dynamic mmap threshold", up to 32 MiB). A server that
decodes large images then keeps hundreds of MiB it no longer uses after a burst, round after round.
A fixed threshold gives every block above it its own mapping, unmapped the moment it is freed.
Called by ``python -m app`` and in each host worker process, before any image is decoded.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 256 * 1024  # image planes and buffers are far larger; small objects stay on the heap
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024  # the heap's free top beyond this goes back to the system


def return_freed_memory() -> bool:
    """True when glibc took the settings (False elsewhere: another libc or platform, nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
