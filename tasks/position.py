"""One position: for each selected channel, read ``input[position, channel]``, run the filter, write every
pyramid level of the result into the output, and only then mark that (position, channel) complete.

The channels are filtered one after another, so a task's peak memory is that of one channel. The volume
goes straight from Zarr to Zarr inside the worker; only a small summary travels back through Dask and
Prefect.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import defaults, filters, preview, store
from tasks.inputs import Dataset, open_dataset


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


def read_volume(ds: Dataset, position: int, channel: int, allow_missing_chunks: bool) -> np.ndarray:
    """One (z, y, x) volume of the input; a missing chunk is an error unless ``allow_missing_chunks`` (then it
    reads as the array's fill value, as in Zarr); an unreadable chunk is an error that names the chunk."""
    if not allow_missing_chunks:
        missing = ds.missing_objects(position, channel)
        if missing:
            raise InputChunkError(
                f"position {position}: input chunk {missing[0]} is missing from {ds.path}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    try:
        return ds.read(position, channel)
    except Exception as exc:
        bad = ds.find_unreadable_chunk(position, channel)
        where = f"input chunk {bad[0]} of {ds.path} cannot be read ({bad[1]})" if bad else f"{type(exc).__name__}: {exc}"
        raise InputChunkError(f"position {position}: {where}") from exc


def filter_channel(ds: Dataset, output_path: str, position: int, channel: int, p: store.FilterParams, threads: int,
                   allow_missing_chunks: bool) -> dict[str, Any]:
    """Filter, write (every level) and mark one (position, channel); returns its statistics."""
    t0 = time.perf_counter()
    # Fingerprint before reading: if the input changes while we read, the next run sees it as stale.
    fingerprint = store.input_fingerprint(ds, position, channel)
    # Unmark first: from here until the new marker lands, this (position, channel) is not complete.
    store.clear_marker(output_path, position, channel)
    volume = read_volume(ds, position, channel, allow_missing_chunks)
    t1 = time.perf_counter()
    result = filters.FILTERS[defaults.FILTER].apply(volume, p, threads)
    t2 = time.perf_counter()
    store.write_preview(output_path, position, channel, preview.preview_png(volume, result))
    del volume  # free the input before the pyramid is built
    stats = {"min": float(result.min()), "max": float(result.max()), "mean": float(result.mean(dtype=np.float64))}
    t3 = time.perf_counter()
    levels = store.write_levels(output_path, position, channel, result, p.output_dtype, threads)
    del result
    t4 = time.perf_counter()
    stats.update(channel=int(channel), levels=levels, seconds=round(t4 - t0, 3), read_seconds=round(t1 - t0, 3),
                 filter_seconds=round(t2 - t1, 3), write_seconds=round(t4 - t3, 3))
    summary = {"position": int(position), **stats, "host": socket.gethostname(), "pid": os.getpid(),
               "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "threads": threads}
    store.write_marker(output_path, position, channel, store.marker_record(p, fingerprint, summary))
    return stats


def process_position(
    input_path: str,
    output_path: str,
    position: int,
    params: dict[str, Any],
    threads: int | None = None,
    allow_missing_chunks: bool = False,
    channels: list[int] | None = None,
) -> dict[str, Any]:
    """Filter the selected channels (default: channel 0) of one position end to end; returns its summary
    (never the array): min/max/mean over those channels, and one entry per channel."""
    p = store.FilterParams.from_dict(params)
    t0 = time.perf_counter()
    ds = open_dataset(input_path, check=False)  # validated by the flow: open only what this position needs
    nthreads = threads or _threads_here()
    per_channel = [filter_channel(ds, output_path, position, c, p, nthreads, allow_missing_chunks)
                   for c in (channels if channels is not None else [0])]
    return {
        "position": int(position),
        "channels": [s["channel"] for s in per_channel],
        "seconds": round(time.perf_counter() - t0, 3),
        "min": min(s["min"] for s in per_channel),
        "max": max(s["max"] for s in per_channel),
        "mean": float(np.mean([s["mean"] for s in per_channel])),
        **{k: round(sum(s[k] for s in per_channel), 3) for k in ("read_seconds", "filter_seconds", "write_seconds")},
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "threads": nthreads,
        "per_channel": per_channel,
    }


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
