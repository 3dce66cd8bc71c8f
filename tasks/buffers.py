"""Large arrays mapped pre-populated.

``np.empty`` of a large array maps memory lazily: each 4 KiB page faults on first touch. On the machines
measured here that costs up to 2-3 s per GB when memory was just freed (a full seed position's 2x2 pyramid
level: 4.9 s from ``np.empty``, 1.9 s from :func:`empty`), and the faults of one process's threads
serialise. :func:`empty` maps anonymous memory with ``MAP_POPULATE``: the kernel provides every page in one
call. Used for the engine's result and slab buffer, the input volume a task reads, and the pyramid levels
and uint16 copies it writes.

tracemalloc does not see anonymous mappings: while it traces (a memory measurement), :func:`empty` allocates
with numpy, whatever the size, so that the measurement counts every array.
"""

from __future__ import annotations

import math
import mmap
import tracemalloc

import numpy as np

POPULATE_MIN = 4 << 20  # arrays at least this large (bytes) are mapped pre-populated


def empty(shape, dtype) -> np.ndarray:
    """Like ``np.empty(shape, dtype)`` (C order); arrays of at least :data:`POPULATE_MIN` bytes are backed by
    an anonymous ``MAP_POPULATE`` mapping (freed with the array), smaller ones (and all while tracemalloc
    traces) by numpy."""
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    flags = getattr(mmap, "MAP_POPULATE", None)
    if nbytes < POPULATE_MIN or flags is None or tracemalloc.is_tracing():
        return np.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(m, dtype=dtype).reshape(shape)
