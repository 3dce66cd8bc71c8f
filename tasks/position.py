"""One position: for each selected channel, read ``input[position, channel]``, run the filter, write every
pyramid level of the result into the output, and only then mark that (position, channel) complete.

The channels are filtered one after another, so a task's peak memory is that of one channel. The volume
goes straight from Zarr to Zarr inside the worker; only a small :class:`PositionResult` travels back through
Dask and Prefect.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import defaults, errors, fft, filters, markers, preview
from tasks.filters import FilterParams
from tasks.inputs import Dataset, open_dataset
from tasks.output import Output


TASK_RUN_NAME = "position-{position}"  # a position's task run, formatted by Prefect (and by flows.outcomes)


class InputChunkError(RuntimeError):
    """An input chunk of the position is missing or cannot be decoded (the message names it)."""


class Status(str, enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ChannelResult:
    """What filtering one (position, channel) gave: statistics of the float result and where the time went."""

    channel: int
    min: float
    max: float
    mean: float
    levels: int
    seconds: float
    read_seconds: float
    filter_seconds: float
    write_seconds: float
    fft_backend: str = ""  # the FFT library the engine used (tasks.fft): pocketfft, mkl or fftw


@dataclass(frozen=True)
class PositionResult:
    """One position's outcome: its channels' results, or why it failed (one line)."""

    position: int
    status: Status = Status.COMPLETED
    channels: tuple[int, ...] = ()
    seconds: float = 0.0
    host: str = ""
    slurm_job_id: Optional[str] = None
    threads: int = 0
    per_channel: tuple[ChannelResult, ...] = ()
    error: str = ""

    @property
    def completed(self) -> bool:
        return self.status is Status.COMPLETED

    @property
    def min(self) -> float:
        return min(c.min for c in self.per_channel)

    @property
    def max(self) -> float:
        return max(c.max for c in self.per_channel)

    @property
    def mean(self) -> float:
        return float(np.mean([c.mean for c in self.per_channel]))

    def total(self, name: str) -> float:
        """Sum over channels of one of :class:`ChannelResult`'s seconds fields."""
        return round(sum(getattr(c, name) for c in self.per_channel), 3)

    @classmethod
    def failed(cls, position: int, error: str) -> "PositionResult":
        return cls(int(position), Status.FAILED, error=error)

    def as_dict(self) -> dict[str, Any]:
        """A plain JSON record (what the flow returns and artifacts show)."""
        d = asdict(self)
        d.update(status=self.status.value, channels=list(self.channels), per_channel=list(d["per_channel"]))
        if self.completed:
            d.update(min=self.min, max=self.max, mean=self.mean,
                     **{k: self.total(k) for k in ("read_seconds", "filter_seconds", "write_seconds")})
        return d


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
                + ": fix the input, or rerun with --allow-missing-chunks to read it as zeros"
            )
    try:
        return ds.read(position, channel)
    except Exception as exc:
        bad = ds.find_unreadable_chunk(position, channel)
        where = f"input chunk {bad[0]} of {ds.path} cannot be read ({bad[1]})" if bad else f"{type(exc).__name__}: {exc}"
        raise InputChunkError(f"position {position}: {where}") from exc


def filter_channel(ds: Dataset, out: Output, position: int, channel: int, p: FilterParams, threads: int,
                   allow_missing_chunks: bool) -> ChannelResult:
    """Filter, write (every level) and mark one (position, channel)."""
    t0 = time.perf_counter()
    # Fingerprint before reading: if the input changes while we read, the next run sees it as stale.
    fingerprint = ds.fingerprint(position, channel)
    # Unmark first: from here until the new marker lands, this (position, channel) is not complete.
    out.markers.clear(position, channel)
    volume = read_volume(ds, position, channel, allow_missing_chunks)
    t1 = time.perf_counter()
    result = p.apply(volume, threads)
    t2 = time.perf_counter()
    out.write_preview(position, channel, preview.preview_png(volume, result))
    del volume  # free the input before the pyramid is built
    lo, hi, mean = float(result.min()), float(result.max()), float(result.mean(dtype=np.float64))
    t3 = time.perf_counter()
    levels = out.write_levels(position, channel, result, p.output_dtype, threads)
    del result
    t4 = time.perf_counter()
    res = ChannelResult(int(channel), lo, hi, mean, levels, round(t4 - t0, 3), round(t1 - t0, 3), round(t2 - t1, 3),
                        round(t4 - t3, 3), fft.backend_used())
    summary = {"position": int(position), **asdict(res), "host": socket.gethostname(), "pid": os.getpid(),
               "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "threads": threads}
    out.markers.write(position, channel, markers.marker_record(p, fingerprint, summary))
    return res


def process_position(
    input_path: str,
    output_path: str,
    position: int,
    params: dict[str, Any],
    threads: int | None = None,
    allow_missing_chunks: bool = False,
    channels: list[int] | None = None,
) -> PositionResult:
    """Filter the selected channels (default: channel 0) of one position end to end; returns its summary
    (never the array)."""
    p = FilterParams.from_dict(params)
    t0 = time.perf_counter()
    ds = open_dataset(input_path, check=False)  # validated by the flow: open only what this position needs
    out = Output(output_path)
    nthreads = threads or _threads_here()
    per_channel = tuple(filter_channel(ds, out, position, c, p, nthreads, allow_missing_chunks)
                        for c in (channels if channels is not None else [0]))
    return PositionResult(
        position=int(position), channels=tuple(c.channel for c in per_channel),
        seconds=round(time.perf_counter() - t0, 3), host=socket.gethostname(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"), threads=nthreads, per_channel=per_channel)


def position_task(kind: str = defaults.FILTER):
    """The Prefect task of one position for a filter kind (retries are set per run by the flow)."""
    return task(
        process_position,
        name=filters.task_name(kind),
        task_run_name=TASK_RUN_NAME,
        retries=defaults.RETRIES,
        retry_delay_seconds=defaults.RETRY_DELAY_SECONDS,
        retry_condition_fn=errors.retry_condition,  # permanent failures (full disk, corrupt chunk): no retry
        persist_result=False,
        cache_policy=NO_CACHE,
    )


filter_position = position_task()
