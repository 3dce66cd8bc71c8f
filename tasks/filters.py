"""The one seam where a filter kind plugs in: its engine call, its memory plan and the method name
recorded in the output metadata.

Adding another filter (say a Laplacian of Gaussian) means: its engine function in ``tasks/``, its
parameters, and one :class:`FilterKind` registered in :data:`FILTERS`. The task, the flow's memory plan
and the output metadata ask this registry; nothing else names the filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tasks import defaults, dog

_MiB = 1 << 20
RUNTIME_OVERHEAD = 256 * _MiB  # interpreter, zarr codecs and I/O buffers of one task, on top of the filter's peak


@dataclass(frozen=True)
class FilterKind:
    """How one kind of filter is run and sized.

    ``apply(volume, params, threads)`` returns the float result of one (z, y, x) volume;
    ``peak_bytes(zyx, input_dtype, threads)`` is an upper bound of what that call holds at its peak, input
    included; ``method`` names the function in the output's metadata.
    """

    name: str
    method: str
    apply: Callable[[np.ndarray, Any, int], np.ndarray]
    peak_bytes: Callable[[tuple[int, int, int], Any, int], int]


def _dog_apply(volume: np.ndarray, params: Any, threads: int) -> np.ndarray:
    return dog.difference_of_gaussians(volume, params.sigma_small, params.sigma_large, truncate=params.truncate,
                                       mode=params.mode, threads=threads)


DOG = FilterKind(
    name="dog",
    method="dogflow.difference_of_gaussians",
    apply=_dog_apply,
    peak_bytes=lambda zyx, dtype, threads: dog.peak_memory_bytes(tuple(zyx), np.dtype(dtype), threads=threads),
)

FILTERS: dict[str, FilterKind] = {DOG.name: DOG}


def memory_per_task(kind: FilterKind, zyx: tuple[int, int, int], input_dtype: Any, output_dtype: str,
                    threads: int = defaults.PLAN_THREADS) -> int:
    """Bytes one position's task holds at its peak, plus 10 % and :data:`RUNTIME_OVERHEAD`.

    The peak is the larger of the task's two phases (``tasks/position.py``): the filter (its own bound for up
    to ``threads`` engine threads, input included) and the write, after the input is freed
    (``tasks.store.write_peak_bytes``: the result, its pyramid levels and, for uint16, the cast copy).
    """
    from tasks import store

    need = max(kind.peak_bytes(tuple(zyx), input_dtype, threads), store.write_peak_bytes(tuple(zyx), output_dtype))
    return int(need * 1.1) + RUNTIME_OVERHEAD
