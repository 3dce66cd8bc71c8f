"""Helpers for dogflow's tests and benchmarks (as ``numpy.testing`` is for numpy's): nothing in a run uses them."""

from __future__ import annotations

import tracemalloc
from typing import Any, Callable


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), bytes its Python and numpy allocations added at their peak), by tracemalloc. While it traces,
    :func:`tasks.buffers.empty` allocates with numpy, so large arrays are counted too."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
