"""One run started from a shell, from its parameters to its summary: :func:`execute`, the one owner of a
CLI run's life cycle (``dogflow run`` and ``dogflow demo`` parse, print and call it).

The steps, in this order, and why:

1. :meth:`RunRequest.check <flows.request.RunRequest.check>`: the parameters alone and that the input
   exists, before anything heavy is imported: such bad input is refused in a fraction of a second.
2. The temporary Prefect API (:mod:`flows.api`, unless one is configured) is launched, so that it boots
   while the next steps run.
3. :meth:`RunRequest.validate <flows.request.RunRequest.validate>`: stores, the output's provenance
   (parameters not given are taken from it), the profile and the memory plan. Refused: the API is
   stopped and :class:`~flows.request.ParameterError` raised; nothing has been written, nothing submitted.
4. The profile's session (runner mode: only the rank that runs the flow goes on).
5. The output's run lock, taken here and held to the end: a second run on the output is refused at once.
6. Pending work (markers only). With nothing to do and a temporary API, the summary is returned without
   starting Prefect (a configured API still gets a flow run, so its server keeps a record).
7. The early cluster (kinds that can start one, :meth:`start_early
   <flows.clusters.base.ClusterProfile.start_early>`), sized for the pending positions, starts while the
   API boots.
8. The ``dog-filter`` flow, in this process, on the request's parameters.

Validation once, without a context variable. The flow is Prefect's entry point too (deployments, the
UI), where nobody has validated, so it validates whatever it is called with, unless this process prepared
that very run. :data:`HANDOVER` is the one place where an entry point leaves what it prepared (a
:class:`Prepared`: the spec, the held lock, the early cluster) for the flow call it is about to make;
the flow asks it with :func:`claim`, for its own request. A flow call with other parameters (another run in
this process) finds nothing and validates; the entry point empties the place when its flow call returns.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional


@dataclass
class Prepared:
    """What :func:`execute` prepared for one flow call: the validated spec, the output's lock (held), the
    pending channels of each position, and the early cluster (or None)."""

    spec: Any  # flows.request.RunSpec
    lock: Any  # tasks.lock.RunLock, held
    pending: dict[int, list[int]]
    early: Any = None  # flows.clusters.local.EarlyCluster or None

    def task_runner(self, n_tasks: int) -> Any:
        """The flow's task runner: joins the early cluster, else the profile sized for ``n_tasks``."""
        if self.early is not None:
            return self.early.task_runner()
        return self.spec.profile.sized(self.spec.need_bytes, n_tasks).build_task_runner()


class Handover:
    """Runs prepared in this process for the flow call that follows, by their request (see the module docstring)."""

    def __init__(self) -> None:
        self._runs: dict[Any, Prepared] = {}
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def holding(self, prepared: Prepared) -> Iterator[None]:
        key = _key(prepared.spec.request)
        with self._mutex:
            self._runs[key] = prepared
        try:
            yield
        finally:
            with self._mutex:
                self._runs.pop(key, None)

    def claim(self, request: Any) -> Optional[Prepared]:
        with self._mutex:
            return self._runs.get(_key(request))


def _key(request: Any) -> tuple:
    # a request's values are text, numbers, switches or None (RunRequest normalises them): == as Python compares
    return tuple(sorted(request.parameters().items()))


HANDOVER = Handover()


def claim(request: Any) -> Optional[Prepared]:
    """What this process's entry point prepared for exactly ``request``, or None (then the flow validates)."""
    return HANDOVER.claim(request)


def pending_work(spec: Any) -> tuple[dict[int, list[int]], list[Any]]:
    """The channels of each selected position that are not complete (all of them with ``force``), and the
    state of every (position, channel); reads markers only, writes nothing."""
    from tasks.inputs import open_dataset
    from tasks.markers import MarkerState
    from tasks.output import Output

    ds = open_dataset(spec.input_path, check=False)  # validated: open only the images used
    rows = Output(spec.output_path).markers.scan(ds, spec.params, spec.positions, spec.channels)
    pending: dict[int, list[int]] = {}
    for r in rows:
        if spec.request.force or r.state is not MarkerState.COMPLETE:
            pending.setdefault(r.position, []).append(r.channel)
    return pending, rows


def run_summary(spec: Any, skipped: int, rows: list[Any], lost_workers: Optional[list[dict[str, Any]]] = None
                ) -> dict[str, Any]:
    """What a run returns (plain JSON): counts, failed positions, the (position, channel) pairs computed, one
    record per filtered position (``rows``: :class:`tasks.position.PositionResult`), the worker jobs lost."""
    failed = [r.position for r in rows if not r.completed]
    return {"output_path": spec.output_path, "selected": len(spec.positions), "processed": len(rows) - len(failed),
            "skipped": skipped, "failed": failed, "pairs": sum(len(r.channels) for r in rows if r.completed),
            "positions": [r.as_dict() for r in rows], "lost_workers": list(lost_workers or [])}


class RunFailed(RuntimeError):
    """The flow ended without success; the message is its first line (positions failed: exit status 1)."""


def execute(request: Any, *, notice: Callable[[str], None] = lambda line: None,
            progress: Optional[Callable[[], Any]] = None, temporary_api: Any = "start",
            before_prefect: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run ``request`` from a shell: the steps of the module docstring. Returns the run's summary.

    ``notice`` is called with the one line that says which parameters were taken from the existing output.
    ``progress``: a context manager factory entered around the flow (the CLI's progress bar).
    ``before_prefect`` is called just before the flow starts (the CLI quiets the terminal's logging then, which
    imports Dask; a rerun with nothing to do never imports it). ``temporary_api``: ``"start"`` launches one unless an API is configured (:func:`flows.api.start_temporary_api`);
    or an already launched one, or None. Raises :class:`~flows.request.ParameterError` (bad input, a live
    lock) or :class:`RunFailed`."""
    from flows.request import ParameterError

    try:
        request.check()
    except ParameterError:
        if temporary_api not in (None, "start"):
            temporary_api.stop()
        raise
    if temporary_api == "start":
        from flows import api

        temporary_api = api.start_temporary_api()
    try:
        spec = request.validate()
    except ParameterError:
        if temporary_api is not None:
            temporary_api.stop()
        raise
    if spec.notice:
        notice(spec.notice)
    try:
        with spec.profile.session():  # runner mode: only the flow's rank gets past this
            return _locked(request, spec, temporary_api, progress, before_prefect)
    finally:
        if temporary_api is not None:
            temporary_api.stop()


def _locked(request: Any, spec: Any, temporary_api: Any, progress: Optional[Callable[[], Any]],
            before_prefect: Callable[[], None]) -> dict[str, Any]:
    from flows.request import ParameterError
    from tasks.lock import RunLockedError
    from tasks.output import Output

    lock = Output(spec.output_path).lock(run_name="dogflow-run")
    try:
        lock.acquire()
    except RunLockedError as exc:
        raise ParameterError(str(exc)) from None
    try:
        pending, _ = pending_work(spec)
        if temporary_api is not None and not pending and not (request.force or request.overwrite):
            # every selected position is complete and unchanged, and no Prefect server keeps a record of
            # this run: say so without starting Prefect
            return run_summary(spec, len(spec.positions), [])
        before_prefect()
        return _flow(request, Prepared(spec, lock, pending), temporary_api, progress)
    finally:
        lock.release()


def _flow(request: Any, prepared: Prepared, temporary_api: Any, progress: Optional[Callable[[], Any]]) -> dict:
    from flows.api import prefect_api
    from flows.dog_filter import dog_filter  # imports Prefect (1-4 s here) while the temporary server boots

    spec = prepared.spec
    with prefect_api(temporary_api) as temporary:
        # with a temporary API, the cluster's workers start while the server boots (its URL is exported);
        # the cluster closes before the server stops
        if temporary is not None and prepared.pending:
            prepared.early = spec.profile.sized(spec.need_bytes, len(prepared.pending)).start_early()
        try:
            with HANDOVER.holding(prepared), (progress() if progress else contextlib.nullcontext()):
                if temporary is not None:
                    temporary.wait()
                state = dog_filter(**request.parameters(), return_state=True)
        finally:
            if prepared.early is not None:
                prepared.early.close()
    if state.is_completed():
        return state.result()
    err = state.result(raise_on_failure=False)
    raise RunFailed(str(err).splitlines()[0] if err else f"flow ended {state.name}")


def quiet_prefect() -> None:
    """No Prefect telemetry notice on a terminal, and no usage data sent: set before Prefect is imported
    (``DO_NOT_TRACK``, which Prefect's SDK reads; the temporary server's analytics are off in :mod:`flows.api`).
    A user's own ``DO_NOT_TRACK`` wins."""
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
