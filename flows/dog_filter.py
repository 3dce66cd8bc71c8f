"""The ``dog-filter`` flow: validate -> plan -> map one task per position -> summarise.

The mapping runs in a child flow, ``dog-filter-positions``, whose task runner is the
``DaskTaskRunner`` built from the run's cluster profile; validation and planning run
in the parent before any cluster (or SLURM job) exists.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows import clusters
from flows.params import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY_SECONDS,
    SEED_SIGMA_LARGE,
    SEED_SIGMA_SMALL,
    ParameterError,
    validate,
)
from tasks import store
from tasks.position import filter_position


class RunFailed(RuntimeError):
    """Some positions failed for good; the message names them."""


def _error_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@flow(name="dog-filter-positions", log_prints=True, persist_result=False)
def filter_positions(
    input_path: str,
    output_path: str,
    positions: list[int],
    params: dict[str, Any],
    threads: Optional[int] = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
    allow_missing_chunks: bool = False,
) -> list[dict[str, Any]]:
    """Map :func:`tasks.position.filter_position` over ``positions`` on this flow's task runner."""
    logger = get_run_logger()
    task = filter_position.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = task.map(unmapped(input_path), unmapped(output_path), positions, unmapped(params), unmapped(threads),
                       unmapped(allow_missing_chunks))
    _log_dashboard(logger)  # the runner's Dask client exists once the first task is submitted
    by_future = {f.task_run_id: p for f, p in zip(futures, positions)}
    progress_id = create_progress_artifact(
        progress=0.0, key="dog-filter-progress", description=f"{len(positions)} positions to filter"
    )
    results: list[dict[str, Any]] = []
    for done, fut in enumerate(as_completed(futures), start=1):
        results.append(_outcome(fut, by_future[fut.task_run_id], logger))
        update_progress_artifact(progress_id, progress=100.0 * done / len(positions))
    return sorted(results, key=lambda r: r["position"])


def _outcome(fut, position: int, logger: logging.Logger) -> dict[str, Any]:
    """The task's summary, or a failure row whose error is one readable line."""
    fut.wait()
    line = _dask_failure(fut, position)
    if line is None:
        if fut.state.is_completed():
            return {**fut.result(), "status": "completed"}
        err = fut.result(raise_on_failure=False)
        line = _error_line(err if isinstance(err, BaseException) else None)
    logger.error("position %d failed for good: %s", position, line)
    _log_worker_logs(logger)
    return {"position": position, "status": "failed", "error": line}


def _dask_failure(fut, position: int) -> str | None:
    """If Dask itself gave up on the task (its workers kept dying), say so and mark the task run Failed.

    Without this the Prefect task run would stay Running forever: the process that
    would have reported its final state is dead.
    """
    if getattr(fut, "_final_state", None) is not None:
        return None
    dask_future = fut.wrapped_future
    if dask_future.status not in ("error", "cancelled"):
        return None
    try:
        exc = dask_future.exception(timeout=5) if dask_future.status == "error" else None
    except Exception as e:  # cancelled futures raise here
        exc = e
    if type(exc).__name__ == "KilledWorker":
        allowed = getattr(exc, "allowed_failures", None)
        if allowed is None:  # older distributed: the flow process's setting is the best guess
            import dask

            allowed = dask.config.get("distributed.scheduler.allowed-failures")
        line = (f"position {position}: the Dask worker running it died {allowed + 1} times "
                f"(allowed-failures={allowed}; out of memory, killed, or node lost) - see the worker logs below")
    else:
        line = f"position {position}: Dask lost the task ({_error_line(exc)})"
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(fut.task_run_id, Failed(message=line), force=True)
    return line


def _dask_client():
    try:
        from prefect.context import FlowRunContext

        runner = FlowRunContext.get().task_runner
        return getattr(runner, "_client", None)
    except Exception:
        return None


def _log_dashboard(logger: logging.Logger) -> None:
    client = _dask_client()
    if client is None:
        return
    link = client.dashboard_link
    logger.info("Dask scheduler %s, dashboard %s", client.scheduler.address, link)
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link=link, link_text="Dask dashboard", key="dask-dashboard")
    except Exception as exc:  # the dashboard link is informative, never fatal
        logger.debug("no dashboard artifact: %s", exc)


def _log_worker_logs(logger: logging.Logger, lines: int = 30) -> None:
    client = _dask_client()
    if client is None:
        return
    try:
        logs = client.get_worker_logs(n=lines)
    except Exception as exc:
        logger.warning("could not fetch worker logs: %s", exc)
        return
    for worker, entries in logs.items():
        text = "\n".join(msg for _, msg in entries)
        logger.info("last %d log lines of worker %s:\n%s", lines, worker, text)


def _start_run_log(output_path: str) -> logging.FileHandler:
    """Copy this run's Prefect log lines into a file next to the output (or in $DOGFLOW_LOG_DIR).

    Named ``<flow-run-name>-<SLURM_JOB_ID or 'local'>.log``.
    """
    folder = Path(os.environ["DOGFLOW_LOG_DIR"]) if os.environ.get("DOGFLOW_LOG_DIR") else store.log_dir(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{flow_run.get_name() or 'run'}-{os.environ.get('SLURM_JOB_ID', 'local')}.log"
    handler = logging.FileHandler(folder / name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("prefect").addHandler(handler)
    return handler


def _stop_run_log(handler: logging.FileHandler | None) -> None:
    if handler is not None:
        logging.getLogger("prefect").removeHandler(handler)
        handler.close()


def _preview_artifact(output_path: str, position: int) -> None:
    """A markdown artifact embedding the preview PNG that the task wrote (input MIP | DoG MIP)."""
    png = store.preview_path(output_path, position)
    if not png.exists():
        return
    data = base64.b64encode(png.read_bytes()).decode()
    create_markdown_artifact(
        key="dog-filter-preview",
        markdown=(
            f"# Position {position}: max-intensity projection along z\n\n"
            f"Left: input. Right: Difference of Gaussians. File: `{png}`\n\n"
            f"![position {position} preview](data:image/png;base64,{data})"
        ),
        description=f"MIP preview of position {position}",
    )


def _summary_markdown(spec_input: str, spec_output: str, skipped: int, rows: list[dict[str, Any]]) -> str:
    done = sum(r["status"] == "completed" for r in rows)
    failed = [r for r in rows if r["status"] != "completed"]
    lines = [
        "# dog-filter summary",
        "",
        f"- input: `{spec_input}`",
        f"- output: `{spec_output}`",
        f"- processed: **{done}**, skipped (complete and unchanged): **{skipped}**, failed: **{len(failed)}**",
        "",
        "| position | status | seconds | host | SLURM job | min | max | mean |",
        "|---:|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] == "completed":
            lines.append(
                f"| {r['position']} | completed | {r['seconds']:.1f} | {r['host']} | {r.get('slurm_job_id') or '-'} "
                f"| {r['min']:.4g} | {r['max']:.4g} | {r['mean']:.4g} |"
            )
        else:
            lines.append(f"| {r['position']} | **failed**: {r.get('error', '')} | | | | | | |")
    return "\n".join(lines)


@flow(name="dog-filter", log_prints=True, persist_result=False)
def dog_filter(
    input_path: str,
    output_path: str,
    channel: int = 0,
    sigma_small: Union[float, list[float]] = SEED_SIGMA_SMALL,
    sigma_large: Union[float, list[float]] = SEED_SIGMA_LARGE,
    positions: Union[str, list[int], None] = None,
    truncate: float = 4.0,
    mode: Literal["nearest", "reflect", "mirror", "constant", "wrap"] = "nearest",
    output_dtype: Literal["float32", "uint16"] = "float32",
    overwrite: bool = False,
    force: bool = False,
    cluster: Union[clusters.ProfileName, str] = "local",
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
    allow_missing_chunks: bool = False,
) -> dict[str, Any]:
    """Exact 3-D Difference of Gaussians of every position of a 5-D Zarr dataset.

    Args:
        input_path: 5-D (position, channel, z, y, x) Zarr array, or an OME-Zarr group (array "0" is used).
        output_path: OME-Zarr group to create or update; the result is its array "0", shape (P, Z, Y, X).
        channel: Channel index to filter.
        sigma_small: Sigma of the small Gaussian in voxels: one number, or 3 numbers (z, y, x).
        sigma_large: Sigma of the large Gaussian in voxels (larger than sigma_small on every axis).
        positions: Positions to filter: empty for all, a range string such as "0-9,15", or a list.
        truncate: Kernel radius in sigmas (scipy semantics: radius = int(truncate * sigma + 0.5)).
        mode: Edge mode, as in scipy.ndimage (nearest = edge replication).
        output_dtype: float32, or uint16 (rounded half to even, clipped to 0..65535).
        overwrite: Replace an existing output written with other parameters or another shape.
        force: Recompute every selected position, even those complete and unchanged.
        cluster: Cluster profile: a shipped name (local, slurm, ...) or a path to a YAML file.
        retries: Prefect retries of a failed position task.
        retry_delay_seconds: Seconds between those retries.
        allow_missing_chunks: Read a missing input chunk as the fill value instead of failing the position.
    """
    logger = get_run_logger()
    if not input_path:  # a deployment without a dataset (prefect.yaml's nightly before site values are set)
        from prefect.states import Completed

        msg = "no dataset configured: set input_path and output_path (see deployments/README.md)"
        logger.warning(msg)
        return Completed(name="Skipped", message=msg)
    # 1. validate: parameters, input, output, profile, memory. Nothing is written before this passes.
    try:
        spec = validate(input_path, output_path, channel, sigma_small, sigma_large, positions, truncate, mode,
                        output_dtype, overwrite)
        profile = clusters.load_profile(cluster)
        need, have = profile.preflight(clusters.memory_needed_per_task(spec.input_shape[2:], spec.input_dtype,
                                                                       output_dtype))
    except (ParameterError, clusters.ProfileError) as exc:
        logger.error("%s", exc)
        raise
    if retries < 0 or retry_delay_seconds < 0:
        raise ParameterError("retries and retry_delay_seconds must be >= 0")

    # 2. plan: lock the output, create/open it, find what is not complete.
    run_id = str(flow_run.get_id() or "")
    lock = store.RunLock(spec.output_path, run_id=run_id).acquire()
    log_handler = None
    rows: list[dict[str, Any]] = []
    rows_ok = False  # when the map finished, the run log stays open for the summary
    try:
        out = store.prepare_output(spec.output_path, spec.params, spec.input_shape, overwrite=spec.overwrite)
        log_handler = _start_run_log(spec.output_path)
        logger.info("run log: %s", log_handler.baseFilename)
        src = store.open_input(spec.input_path)
        states = store.scan_positions(spec.output_path, src, spec.params, spec.positions)
        pending = list(spec.positions) if force else [p for p, (s, _, _) in states.items() if s != "complete"]
        stale = [p for p, (s, _, _) in states.items() if s == "stale"]
        skipped = len(spec.positions) - len(pending)
        logger.info(
            "%d position(s) selected of %d: %d to filter (%d stale), %d complete and unchanged; output %s, shape %s; "
            "cluster %s; ~%.2f GiB per task",
            len(spec.positions), spec.input_shape[0], len(pending), len(stale), skipped, spec.output_path,
            tuple(out.shape), profile.source, need / 2**30,
        )
        for p in stale:
            _, marker, expected = states[p]
            logger.info("position %d is stale: %s", p, store.stale_reason(marker, expected))

        # 3. map.
        if pending:
            runner = profile.build_task_runner()
            rows = filter_positions.with_options(task_runner=runner)(
                spec.input_path,
                spec.output_path,
                pending,
                spec.params.as_dict(),
                profile.threads_per_task(),
                retries,
                retry_delay_seconds,
                allow_missing_chunks,
            )
        rows_ok = True
    finally:
        lock.release()
        if not rows_ok:
            _stop_run_log(log_handler)

    # 4. summarise (still into the run log).
    try:
        failed = [r["position"] for r in rows if r["status"] != "completed"]
        summary = {
            "output_path": spec.output_path,
            "selected": len(spec.positions),
            "processed": len(rows) - len(failed),
            "skipped": skipped,
            "failed": failed,
            "positions": rows,
        }
        done_rows = [r for r in rows if r["status"] == "completed"]
        if done_rows:
            _preview_artifact(spec.output_path, done_rows[len(done_rows) // 2]["position"])
        create_markdown_artifact(
            markdown=_summary_markdown(spec.input_path, spec.output_path, skipped, rows),
            key="dog-filter-summary",
            description="dog-filter: per-position results",
        )
        logger.info(
            "dog-filter summary: %d processed, %d skipped as complete and unchanged, %d failed%s; output %s",
            summary["processed"], skipped, len(failed), f" (positions {failed})" if failed else "", spec.output_path,
        )
        if failed:
            raise RunFailed(
                f"{len(failed)} position(s) failed: {', '.join(map(str, failed))}; "
                f"completed positions are kept, re-run to retry only the failed ones"
            )
        return summary
    finally:
        _stop_run_log(log_handler)


if __name__ == "__main__":  # pragma: no cover - `python flows/dog_filter.py` serves nothing; use the CLI
    import sys

    sys.exit("use the `dogflow` command, or `prefect deploy` with prefect.yaml")
