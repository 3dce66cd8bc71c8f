"""The Dask side of a mapped run: what became of each position's future, the dashboard link, worker logs.

A position's task either reports its own final state to Prefect (completed, or failed after its Prefect
retries), or Dask gives up on it first: the worker process running it died ``allowed-failures + 1``
times (out of memory, killed, node lost) and the Dask future ends in error (``KilledWorker``). Nobody
would then report the task run's final state, so :func:`outcome` marks it Failed with a readable reason;
it is never left Running.

Everything here uses public APIs: ``PrefectDaskFuture.wrapped_future`` (the ``distributed.Future``) and
``DaskTaskRunner.client`` of the flow run's task runner.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from distributed import KilledWorker

from tasks.position import TASK_RUN_NAME, PositionResult
from tasks import errors


def error_line(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def outcome(fut: Any, position: int, logger: logging.Logger) -> PositionResult:
    """The task's result, or a failed one whose error is one readable line."""
    fut.wait()
    line = _dask_gave_up(fut, position)
    if line is None:
        if fut.state.is_completed():
            return fut.result()
        err = fut.result(raise_on_failure=False)
        exc = err if isinstance(err, BaseException) else None
        line = errors.failure_line(exc, error_line(exc))  # names the cause of a permanent failure
    logger.error("position %d failed for good: %s", position, line)
    log_worker_logs(logger)
    return PositionResult.failed(position, line)


def _dask_gave_up(fut: Any, position: int) -> Optional[str]:
    """If Dask itself gave up on the task, mark its task run Failed and return the reason; else None.

    A task that ran to its end returns a Prefect state, so its Dask future is ``finished``; only a task
    Dask could not run to the end has a future in ``error`` (or ``cancelled``).
    """
    dask_future = fut.wrapped_future
    if dask_future.status not in ("error", "cancelled"):
        return None
    try:
        exc = dask_future.exception(timeout=5) if dask_future.status == "error" else None
    except Exception as e:  # cancelled futures raise here
        exc = e
    if isinstance(exc, KilledWorker):
        allowed = getattr(exc, "allowed_failures", None)
        if allowed is None:  # older distributed: the flow process's setting is the best guess
            import dask

            allowed = dask.config.get("distributed.scheduler.allowed-failures")
        line = (f"position {position}: the Dask worker running it died {allowed + 1} times "
                f"(allowed-failures={allowed}; out of memory, killed, or node lost) - see the worker logs below")
    else:
        line = f"position {position}: Dask lost the task ({error_line(exc)})"
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    mark_failed(fut.task_run_id, position, line, ctx.flow_run.id if ctx and ctx.flow_run else None)
    return line


def mark_failed(task_run_id: Any, position: int, line: str, flow_run_id: Any = None) -> None:
    """Record the task run of ``position`` as Failed with ``line`` as its message, under its own name.

    A worker sends its task run's states as events, in the background. One killed early loses the
    events not yet sent: the server may hold the task run under its provisional name
    (``dog-position-...``, before ``position-N`` was set), or not at all. So the name is set here
    too, and a task run the server never heard of is created, already Failed, in ``flow_run_id``.
    Events still on their way carry older timestamps and do not overwrite this state.
    """
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Failed

    from tasks.position import filter_position

    name = TASK_RUN_NAME.format(position=position)
    with get_client(sync_client=True) as client:
        try:
            known_name = client.read_task_run(task_run_id).name
        except ObjectNotFound:
            try:
                client.create_task_run(filter_position, flow_run_id, dynamic_key=str(uuid4()), id=task_run_id,
                                       name=name, state=Failed(message=line))
                return
            except Exception:  # the worker's first event got there in between: update that run below
                known_name = None
        if known_name != name:
            client.set_task_run_name(task_run_id, name)
        client.set_task_run_state(task_run_id, Failed(message=line), force=True)


def dask_client() -> Any:
    """The Dask client of the current flow run's DaskTaskRunner (None outside one)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    try:
        return runner.client if runner is not None and hasattr(type(runner), "client") else None
    except Exception:
        return None


def lost_workers(logger: logging.Logger) -> list[dict[str, Any]]:
    """The worker jobs the run's cluster lost and replaced (:mod:`flows.clusters.keeper`), each logged once."""
    from flows.clusters.keeper import LostJob, lost_jobs

    lost = lost_jobs(dask_client())
    for job in lost:
        logger.warning("worker job %s was lost during the run and replaced", LostJob(**job).describe())
    return lost


def log_dashboard(logger: logging.Logger) -> None:
    """Log the Dask dashboard link and save it as the ``dask-dashboard`` link artifact."""
    client = dask_client()
    if client is None:
        return
    link = client.dashboard_link
    logger.info("Dask scheduler %s, dashboard %s", client.scheduler.address, link)
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link=link, link_text="Dask dashboard", key="dask-dashboard")
    except Exception as exc:  # the dashboard link is informative, never fatal
        logger.debug("no dashboard artifact: %s", exc)


def log_worker_logs(logger: logging.Logger, lines: int = 30) -> None:
    """Copy the workers' last log lines into the run's log (after a position failed for good)."""
    client = dask_client()
    if client is None:
        return
    try:  # right after every worker died, the scheduler knows none (nor their nannies) until one is back
        if not client.scheduler_info().get("workers"):
            client.wait_for_workers(1, timeout=15)
    except Exception:
        pass
    for nanny, whose in ((False, ""), (True, " (its nanny: how the worker process ended)")):
        try:  # the nannies outlive their workers: when every worker just died, theirs are the lines left
            logs = client.get_worker_logs(n=lines, nanny=nanny)
        except Exception as exc:
            logger.warning("could not fetch worker logs: %s", exc)
            continue
        for worker, entries in logs.items():
            if isinstance(entries, (list, tuple)) and entries:  # an error object for a worker it could not reach
                text = "\n".join(msg for _, msg in entries)
                logger.info("last %d log lines of worker %s%s:\n%s", lines, worker, whose, text)
