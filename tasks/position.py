"""One position: read ``input[position, channel]``, run the filter, write the result into the output at
``position``, and only then mark that position complete.

The volume goes straight from Zarr to Zarr inside the worker; only a small summary travels back through
Dask and Prefect.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import zarr
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import defaults, filters, preview, store


class InputChunkError(RuntimeError):
    """An input chunk of the position is missing or cannot be decoded (the message names it)."""


def _threads_here() -> int:
    """Engine threads when the flow did not say: this process's CPUs shared by the Dask worker's task slots."""
    try:
        from distributed import get_worker

        slots = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        slots = 1
    return defaults.threads_per_task(slots)


def read_volume(src: zarr.Array, input_path: str, position: int, channel: int, allow_missing_chunks: bool) -> np.ndarray:
    """``src[position, channel]``; a missing chunk is an error unless ``allow_missing_chunks`` (then it reads as
    the array's fill value, as in Zarr); an unreadable chunk is an error that names the chunk."""
    if not allow_missing_chunks:
        missing = store.missing_objects(src, position, channel)
        if missing:
            raise InputChunkError(
                f"position {position}: input chunk {missing[0]} is missing from {input_path}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    try:
        return src[position, channel]
    except Exception as exc:
        bad = store.find_unreadable_chunk(src, position, channel)
        where = f"input chunk {bad[0]} of {input_path} cannot be read ({bad[1]})" if bad else f"{type(exc).__name__}: {exc}"
        raise InputChunkError(f"position {position}: {where}") from exc


def process_position(
    input_path: str,
    output_path: str,
    position: int,
    params: dict[str, Any],
    threads: int | None = None,
    allow_missing_chunks: bool = False,
) -> dict[str, Any]:
    """Filter one position end to end and return its summary (never the array)."""
    p = store.FilterParams.from_dict(params)
    t0 = time.perf_counter()
    src = store.open_input(input_path)
    # Fingerprint before reading: if the input changes while we read, the next run sees it as stale.
    fingerprint = store.input_fingerprint(src, position, p.channel)
    # Unmark first: from here until the new marker lands, this position is not complete.
    store.clear_marker(output_path, position)
    volume = read_volume(src, input_path, position, p.channel, allow_missing_chunks)
    nthreads = threads or _threads_here()
    result = filters.FILTERS[defaults.FILTER].apply(volume, p, nthreads)
    store.write_preview(output_path, position, preview.preview_png(volume, result))
    del volume
    stats = {"min": float(result.min()), "max": float(result.max()), "mean": float(result.mean(dtype=np.float64))}
    store.open_output_array(output_path)[position] = store.to_output_dtype(result, p.output_dtype)
    del result
    summary = {
        "position": int(position),
        "seconds": round(time.perf_counter() - t0, 3),
        **stats,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "threads": nthreads,
    }
    store.write_marker(output_path, position, store.marker_record(p, fingerprint, summary))
    return summary


# The Prefect task is the plain function above (retries are set per run by the flow).
filter_position = task(
    process_position,
    name="dog-position",
    task_run_name="position-{position}",
    retries=defaults.RETRIES,
    retry_delay_seconds=defaults.RETRY_DELAY_SECONDS,
    persist_result=False,
    cache_policy=NO_CACHE,
)
