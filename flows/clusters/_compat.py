"""Until the flow asks the filter for its memory plan: the bytes one position needs, and the old
``preflight(profile, zyx, input_dtype, output_dtype)`` signature that ``cli.run_flow`` calls.

Temporary. This is the only place in ``flows.clusters`` that reaches the engine, lazily; the
cluster classes take the need in bytes (``profile.preflight(need_bytes)``). Remove this module
once the flow computes the need itself.
"""

from __future__ import annotations

import math


def memory_needed_per_task(zyx: tuple[int, int, int], input_dtype: str, output_dtype: str) -> int:
    """Bytes one task holds at its peak: the engine's documented peak, plus the cast output for uint16."""
    import numpy as np

    from tasks import dog

    n = math.prod(zyx)
    need = dog.peak_memory_bytes(tuple(zyx), np.dtype(input_dtype))
    if output_dtype == "uint16":
        need += n * 2 + n * 4  # rint buffer + uint16 result
    return int(need * 1.1) + 256 * 2**20  # 10 % + 256 MiB for the interpreter, zarr codecs and buffers


def preflight(profile, zyx, input_dtype: str, output_dtype: str) -> tuple[int, int | None]:
    """``profile.preflight(memory_needed_per_task(...))``."""
    return profile.preflight(memory_needed_per_task(tuple(zyx), input_dtype, output_dtype))
