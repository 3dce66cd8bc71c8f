"""The ``dog-filter`` flow: validate -> plan -> map one task per position -> summarise.

The mapping runs in a child flow, ``dog-filter-positions``, whose task runner is the ``DaskTaskRunner``
built from the run's cluster profile; validation and planning run in the parent before any cluster (or
SLURM job) exists. The rooms this flow delegates to: :mod:`flows.request` (validation),
:mod:`tasks.store` (layout, markers, lock), :mod:`flows.outcomes` (what Dask did with each task),
:mod:`flows.reports` (artifacts, progress) and :mod:`flows.runlog` (the run's log file).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Union

from prefect import flow, get_run_logger, unmapped
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows import clusters, outcomes, reports, runlog
from flows.request import ParameterError, RunRequest, RunSpec, Sigma, validated
from tasks import defaults, store
from tasks.inputs import open_dataset
from tasks.position import filter_position


class RunFailed(RuntimeError):
    """Some positions failed for good; the message names them."""


@flow(name="dog-filter", log_prints=True, persist_result=False)
def dog_filter(
    input_path: str,
    output_path: str,
    channel: int = 0,
    channels: Union[str, list[int], None] = None,
    voxel_size: Union[str, list[float], None] = None,
    sigma_small: Sigma = defaults.SEED_SIGMA_SMALL,
    sigma_large: Sigma = defaults.SEED_SIGMA_LARGE,
    positions: Union[str, list[int], None] = None,
    truncate: float = defaults.TRUNCATE,
    mode: Literal[defaults.MODES] = defaults.MODE,  # type: ignore[valid-type]
    output_dtype: Literal[defaults.OUTPUT_DTYPES] = defaults.OUTPUT_DTYPE,  # type: ignore[valid-type]
    overwrite: bool = False,
    force: bool = False,
    cluster: Union[clusters.ProfileName, str] = defaults.CLUSTER,
    retries: int = defaults.RETRIES,
    retry_delay_seconds: float = defaults.RETRY_DELAY_SECONDS,
    allow_missing_chunks: bool = False,
) -> dict[str, Any]:
    """Exact 3-D Difference of Gaussians of every position (and selected channels) of a microscopy Zarr dataset.

    Args:
        input_path: A 5-D (position, channel, z, y, x) Zarr array, an OME-Zarr image (NGFF 0.4/0.5), a
            bioformats2raw root (each series is a position) or a dogflow output.
        output_path: OME-Zarr (NGFF 0.5) group to create or update: one image per position, "P/0" is position
            P at full resolution, shape (C, Z, Y, X), "P/1", ... its 2x-downsampled levels.
        channel: Channel to filter when channels is empty.
        channels: Channels to filter: "0,2", "all", or a list; empty for channel.
        voxel_size: Voxel size z,y,x in µm ("2,0.406,0.406", or with a unit) for inputs without NGFF metadata.
        sigma_small: Sigma of the small Gaussian: in voxels (one number or z,y,x), or a length with a unit
            ("0.5um", "1,2,2um") converted with the voxel size.
        sigma_large: Sigma of the large Gaussian, likewise (larger than sigma_small on every axis).
        positions: Positions to filter: empty for all, a range string such as "0-9,15", or a list.
        truncate: Kernel radius in sigmas (scipy semantics: radius = int(truncate * sigma + 0.5)).
        mode: Edge mode, as in scipy.ndimage (nearest = edge replication).
        output_dtype: float32; float16 (clipped to ±65504, rounded to nearest: half the bytes); or uint16 (rounded half
            to even, clipped to 0..65535).
        overwrite: Replace an existing output written with other parameters or another shape.
        force: Recompute every selected position, even those complete and unchanged.
        cluster: Cluster profile: a shipped profile name (local, slurm, ...) or a path to a YAML file.
        retries: Prefect retries of a failed position task.
        retry_delay_seconds: Seconds between those retries.
        allow_missing_chunks: Read a missing input chunk as the fill value instead of failing the position.
    """
    request = RunRequest(**locals())
    logger = get_run_logger()
    if not input_path:  # a deployment without a dataset (prefect.yaml's nightly before site values are set)
        return _no_dataset(logger)
    spec = _validate(request, logger)
    with store.RunLock(spec.output_path, run_id=str(flow_run.get_id() or "")), \
            runlog.capture(spec.output_path, flow_run.get_name()) as log_path:
        logger.info("run log: %s", log_path)
        pending, skipped = _plan(spec, logger)
        rows = _map(spec, pending, skipped)
        return _summarise(spec, skipped, rows, logger)


@flow(name="dog-filter-positions", log_prints=True, persist_result=False)
def filter_positions(
    input_path: str,
    output_path: str,
    positions: list[int],
    params: dict[str, Any],
    threads: Optional[int] = None,
    retries: int = defaults.RETRIES,
    retry_delay_seconds: float = defaults.RETRY_DELAY_SECONDS,
    allow_missing_chunks: bool = False,
    already_done: int = 0,
    channels: Optional[list[list[int]]] = None,
) -> list[dict[str, Any]]:
    """Map :func:`tasks.position.filter_position` over ``positions`` (with their ``channels``) on this flow's task runner."""
    logger = get_run_logger()
    task = filter_position.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = task.map(unmapped(input_path), unmapped(output_path), positions, unmapped(params), unmapped(threads),
                       unmapped(allow_missing_chunks), channels or [[0]] * len(positions))
    outcomes.log_dashboard(logger)  # the runner's Dask client exists once the first task is submitted
    position_of = {f.task_run_id: p for f, p in zip(futures, positions)}
    progress = reports.Progress(total=already_done + len(positions), already_done=already_done, to_do=len(positions))
    rows = []
    for fut in as_completed(futures):
        rows.append(outcomes.outcome(fut, position_of[fut.task_run_id], logger))
        # Let Dask forget the finished task: a result it still held for us on a worker that dies later would
        # otherwise be recomputed, and the recomputation unmarks a complete position while it runs.
        fut.wrapped_future.release()
        progress.step()
    return sorted(rows, key=lambda r: r["position"])


def _no_dataset(logger: logging.Logger):
    from prefect.states import Completed

    msg = "no dataset configured: set input_path and output_path (see deployments/README.md)"
    logger.warning(msg)
    return Completed(name="Skipped", message=msg)


def _validate(request: RunRequest, logger: logging.Logger) -> RunSpec:
    try:
        return validated(request)
    except ParameterError as exc:
        logger.error("%s", exc)
        raise


def pending_work(spec: RunSpec) -> tuple[dict[int, list[int]], list[store.MarkerRow]]:
    """The channels of each selected position that are not complete (all of them with ``force``), and the
    state of every (position, channel); reads markers only, writes nothing."""
    ds = open_dataset(spec.input_path, check=False)  # validated: open only the images used
    rows = store.scan(spec.output_path, ds, spec.params, spec.positions, spec.channels)
    pending: dict[int, list[int]] = {}
    for r in rows:
        if spec.request.force or r.state != "complete":
            pending.setdefault(r.position, []).append(r.channel)
    return pending, rows


def _plan(spec: RunSpec, logger: logging.Logger) -> tuple[dict[int, list[int]], int]:
    """Create or open the output (re-checked under the lock); the channels of each position that are not complete."""
    store.prepare_output(spec.output_path, spec.output, overwrite=spec.request.overwrite, channels=spec.channels)
    pending, rows = pending_work(spec)
    stale = [r for r in rows if r.state == "stale"]
    skipped = len(spec.positions) - len(pending)
    logger.info(
        "%d position(s) selected of %d, channels %s: %d to filter (%d channel(s) stale), %d complete and unchanged; "
        "output %s, (P, C, Z, Y, X) %s; cluster %s; ~%.2f GiB per task",
        len(spec.positions), spec.input_shape[0], list(spec.channels), len(pending), len(stale), skipped,
        spec.output_path, spec.input_shape, spec.profile.source, spec.need_bytes / 2**30,
    )
    for r in stale:
        logger.info("position %d channel %d is stale: %s", r.position, r.channel, r.reason)
    return pending, skipped


def _map(spec: RunSpec, pending: dict[int, list[int]], skipped: int) -> list[dict[str, Any]]:
    """One task per pending position, on the profile's DaskTaskRunner (no cluster when nothing is pending)."""
    if not pending:
        reports.announce(skipped, len(spec.positions))
        return []
    spec.profile.for_tasks(len(pending))
    return filter_positions.with_options(task_runner=spec.profile.build_task_runner())(
        spec.input_path, spec.output_path, list(pending), spec.params.as_dict(), spec.profile.threads_per_task(),
        spec.request.retries, spec.request.retry_delay_seconds, spec.request.allow_missing_chunks, skipped,
        list(pending.values()),
    )


def _summarise(spec: RunSpec, skipped: int, rows: list[dict[str, Any]], logger: logging.Logger) -> dict[str, Any]:
    summary = run_summary(spec, skipped, rows)
    failed = summary["failed"]
    reports.publish_summary(spec.input_path, spec.output_path, skipped, rows)
    logger.info(
        "dog-filter summary: %d processed, %d skipped as complete and unchanged, %d failed%s; output %s",
        summary["processed"], skipped, len(failed), f" (positions {failed})" if failed else "", spec.output_path,
    )
    if failed:
        raise RunFailed(f"{len(failed)} position(s) failed: {', '.join(map(str, failed))}; "
                        f"completed positions are kept, re-run to retry only the failed ones")
    return summary


def run_summary(spec: RunSpec, skipped: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run returns: counts, failed positions and one row per filtered position."""
    failed = [r["position"] for r in rows if r["status"] != "completed"]
    return {"output_path": spec.output_path, "selected": len(spec.positions), "processed": len(rows) - len(failed),
            "skipped": skipped, "failed": failed, "positions": rows}
