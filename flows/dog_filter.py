"""The ``dog-filter`` flow: validate -> plan -> map one task per position -> summarise.

The mapping runs in a child flow, ``dog-filter-positions``, whose task runner is the ``DaskTaskRunner``
built from the run's cluster profile; validation and planning run in the parent before any cluster (or
SLURM job) exists. The rooms this flow delegates to: :mod:`flows.params` (its parameters),
:mod:`flows.request` (validation), :mod:`flows.run` (what a CLI entry point prepared for it),
:mod:`tasks.output` (layout, markers, lock), :mod:`flows.outcomes` (what Dask did with each task),
:mod:`flows.reports` (artifacts, progress) and :mod:`flows.runlog` (the run's log file).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

from prefect import flow, get_run_logger, unmapped
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows import collisions, outcomes, params, reports, run, runlog
from flows.request import ParameterError, RunRequest, RunSpec
from tasks import defaults
from tasks.lock import RunLockedError
from tasks.markers import MarkerState
from tasks.output import Output
from tasks.position import PositionResult, position_task


class RunFailed(RuntimeError):
    """Some positions failed for good; the message names them."""


def _dog_filter(*args: Any, **kwargs: Any) -> dict[str, Any]:
    request = RunRequest(**_SIGNATURE.bind(*args, **kwargs).arguments)
    logger = get_run_logger()
    if not request.input_path:  # a deployment without a dataset (prefect.yaml's nightly before site values are set)
        return _no_dataset(logger)
    prepared = run.claim(request)  # what `dogflow run` prepared in this process for this very run, if anything
    spec = prepared.spec if prepared is not None else _validate(request, logger)
    if spec.notice:
        logger.info("%s", spec.notice)
    if prepared is not None:
        lock = contextlib.nullcontext()  # the entry point holds it
    else:
        lock = Output(spec.output_path).lock(run_id=str(flow_run.get_id() or ""), run_name=flow_run.get_name() or "")
        try:
            lock.acquire()
        except RunLockedError:  # a live run writes this output: fail, or end Completed (nightly; flows.collisions)
            state = collisions.completed_when_locked(spec.output_path, logger)
            if state is None:
                raise
            return state
    with lock, runlog.capture(spec.output_path, flow_run.get_name()) as log_path:
        logger.info("run log: %s", log_path)
        pending, skipped = _plan(spec, logger)
        mapped = _map(spec, pending, skipped, prepared)
        return _summarise(spec, skipped, mapped["rows"], logger, mapped["lost_workers"])


# The flow's parameters are flows.params.PARAMS: the signature (what Prefect validates, and the UI form)
# and the docstring (the form's descriptions) are made from it.
_SIGNATURE = params.signature(return_annotation=dict[str, Any])
_dog_filter.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
_dog_filter.__doc__ = params.docstring(
    "Exact 3-D Difference of Gaussians of every position (and selected channels) of a microscopy Zarr dataset.")
dog_filter = flow(name="dog-filter", log_prints=True, persist_result=False)(_dog_filter)


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
) -> dict[str, Any]:
    """Map the filter's position task (:mod:`tasks.position`) over ``positions`` (with their ``channels``) on this
    flow's task runner; returns the positions' results (``rows``) and the worker jobs the cluster lost (and
    replaced) meanwhile."""
    logger = get_run_logger()
    kind = str(params.get("filter", defaults.FILTER))
    task = position_task(kind).with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
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
    return {"rows": sorted(rows, key=lambda r: r.position), "lost_workers": outcomes.lost_workers(logger)}


def _no_dataset(logger: logging.Logger):
    from prefect.states import Completed

    msg = "no dataset configured: set input_path and output_path (see deployments/README.md)"
    logger.warning(msg)
    return Completed(message=msg)  # Prefect's standard name: custom ones drop out of the UI's default filters


def _validate(request: Any, logger: logging.Logger) -> RunSpec:
    try:
        return request.validate()
    except ParameterError as exc:
        logger.error("%s", exc)
        raise


def _plan(spec: RunSpec, logger: logging.Logger) -> tuple[dict[int, list[int]], int]:
    """Create or open the output (re-checked under the lock); the channels of each position that are not complete."""
    Output(spec.output_path).prepare(spec.output, overwrite=spec.request.overwrite, channels=spec.channels)
    pending, rows = run.pending_work(spec)
    stale = [r for r in rows if r.state is MarkerState.STALE]
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


def _map(spec: RunSpec, pending: dict[int, list[int]], skipped: int, prepared: Optional[run.Prepared]
         ) -> dict[str, Any]:
    """One task per pending position, on the profile's DaskTaskRunner (no cluster when nothing is pending):
    the entry point's early cluster when it prepared one, else the profile sized for the pending positions."""
    if not pending:
        reports.announce(skipped, len(spec.positions))
        return {"rows": [], "lost_workers": []}
    if prepared is not None:
        runner = prepared.task_runner(len(pending))
    else:
        runner = spec.profile.sized(spec.need_bytes, len(pending)).build_task_runner()
    threads = spec.profile.sized(spec.need_bytes, len(pending)).threads_per_task()
    return filter_positions.with_options(task_runner=runner)(
        spec.input_path, spec.output_path, list(pending), spec.params.as_dict(), threads,
        spec.request.retries, spec.request.retry_delay_seconds, spec.request.allow_missing_chunks, skipped,
        list(pending.values()),
    )


def _summarise(spec: RunSpec, skipped: int, rows: list[PositionResult], logger: logging.Logger,
               lost_workers: list[dict[str, Any]]) -> dict[str, Any]:
    summary = run.run_summary(spec, skipped, rows, lost_workers)
    failed = summary["failed"]
    reports.publish_summary(spec.input_path, spec.output_path, skipped, rows, spec.params.kind, lost_workers)
    logger.info(
        "dog-filter summary: %d processed, %d skipped as complete and unchanged, %d failed%s; output %s",
        summary["processed"], skipped, len(failed), f" (positions {failed})" if failed else "", spec.output_path,
    )
    if failed:
        raise RunFailed(f"{len(failed)} position(s) failed: {', '.join(map(str, failed))}; "
                        f"completed positions are kept, re-run to retry only the failed ones")
    return summary
