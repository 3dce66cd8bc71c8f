"""dask-jobqueue clusters that replace worker jobs that vanished: a node lost, jobs cancelled, walltime.

A ``JobQueueCluster`` (a ``SpecCluster``) submits one job per entry of its ``worker_spec`` and never
looks at a job again: when a job's workers all disappear without the cluster having asked for it, the
entry stays in ``worker_spec`` and in ``workers``, nothing is resubmitted, and the tasks that were
running there wait forever for a worker (seen live: both worker jobs of a 2-worker SLURM profile
``scancel``led at once mid-run, and ``dogflow run`` still waiting after 15 minutes). Distributed's own
clean-up (``lost-worker-timeout``) drops such a job from ``workers`` only when its single worker's name
equals the job's, and does not resubmit it either.

:class:`KeepsJobs` adds one periodic check on the cluster's event loop (``interval``, 1 s): a job whose
workers had connected and which has had no worker connected for ``grace`` seconds (5 s; longer than the
time between a scale-down retiring a worker and removing its ``worker_spec`` entry) is lost. It is
dropped from ``workers`` (its cancel command runs, harmless for a job already gone) and the cluster's
own ``_correct_state`` (what ``scale(n)`` calls) submits a new job for the same spec entry. So the
cluster keeps the size it was given, fixed (``n_workers``) or adaptive (whatever ``adapt`` last
planned). Jobs that never connected (pending in the queue) are left alone: waiting is normal there.

Every lost job is recorded in :attr:`KeepsJobs.lost_jobs` (:class:`LostJob`) and logged; the flow reads
them through :func:`lost_jobs` of its Dask client and names them in the run's summary.

``flows.clusters.keeper.SLURMCluster`` (likewise for every dask-jobqueue cluster class: PBS, LSF, SGE,
HTCondor, ...) is dask-jobqueue's class with :class:`KeepsJobs`; the cluster profiles give these dotted
paths to ``DaskTaskRunner``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from distributed.core import Status
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger("dogflow.clusters")


@dataclass(frozen=True)
class LostJob:
    """A worker job whose workers vanished (not retired by the cluster), and the job that replaced it."""

    name: str  # the cluster's name for the job (its worker_spec key), e.g. "SLURMCluster-1"
    job_id: str | None  # the batch scheduler's job id
    workers: tuple[str, ...]  # the addresses its workers had
    lost_at: float  # time.time() when it was declared lost

    def describe(self) -> str:
        return f"{self.name} (job {self.job_id or '?'}, workers {', '.join(self.workers) or '?'})"


class KeepsJobs:
    """Mixin for a ``dask_jobqueue.JobQueueCluster`` class: resubmit jobs whose workers all vanished."""

    keep_interval: float = 1.0  # seconds between checks
    lost_grace: float = 5.0  # seconds a connected job may have no worker before it is lost

    async def _start(self) -> None:
        self.lost_jobs: list[LostJob] = []
        self._job_workers: dict[str, set[str]] = {}  # job name -> addresses of its workers seen connected
        self._missing_since: dict[str, float] = {}
        await super()._start()  # type: ignore[misc]
        self._keeper = PeriodicCallback(self._keep_jobs, int(self.keep_interval * 1000))
        self._keeper.start()

    async def _close(self) -> None:
        keeper = getattr(self, "_keeper", None)
        if keeper is not None:
            keeper.stop()
        await super()._close()  # type: ignore[misc]

    def _names_of(self, job: str) -> set[str]:
        """The Dask worker names of job ``job`` (one per process: ``job`` itself, or ``job-0``, ``job-1``...)."""
        spec = self.worker_spec.get(job) or {}  # type: ignore[attr-defined]
        group = spec.get("group")
        return {f"{job}{suffix}" for suffix in group} if group else {job}

    def _keep_jobs(self) -> None:
        if self.status != Status.running:  # type: ignore[attr-defined]
            return
        now = time.monotonic()
        connected: dict[str, str] = {}  # worker name -> address
        for addr, info in self.scheduler_info.get("workers", {}).items():  # type: ignore[attr-defined]
            connected[str(info.get("name"))] = addr
        for job in list(self.worker_spec):  # type: ignore[attr-defined]
            here = {connected[n] for n in self._names_of(job) if n in connected}
            if here:
                self._job_workers.setdefault(job, set()).update(here)
                self._missing_since.pop(job, None)
            elif job in self._job_workers:
                since = self._missing_since.setdefault(job, now)
                if now - since >= self.lost_grace:
                    self._replace(job)
        for job in list(self._job_workers):  # entries the cluster removed itself (scale down, close)
            if job not in self.worker_spec:  # type: ignore[attr-defined]
                self._job_workers.pop(job, None)
                self._missing_since.pop(job, None)

    def _replace(self, job: str) -> None:
        old = self.workers.pop(job, None)  # type: ignore[attr-defined]
        lost = LostJob(job, getattr(old, "job_id", None), tuple(sorted(self._job_workers.pop(job, ()))), time.time())
        self._missing_since.pop(job, None)
        self.lost_jobs.append(lost)
        logger.warning("worker job %s lost: its workers left without being retired; submitting a replacement",
                       lost.describe())
        if old is not None:
            self._futures.add(asyncio.ensure_future(old.close()))  # type: ignore[attr-defined]
        self._correct_state()  # type: ignore[attr-defined]  # submits a job for every spec entry without one


def lost_jobs(client: Any) -> list[dict[str, Any]]:
    """The worker jobs the cluster of ``client`` (a ``distributed.Client`` made from a cluster) has lost so far."""
    cluster = getattr(client, "cluster", None)
    return [asdict(j) for j in getattr(cluster, "lost_jobs", ())]


def _keeping(base: type) -> type:
    return type(base.__name__, (KeepsJobs, base), {"__module__": __name__, "__qualname__": base.__name__,
                                                   "__doc__": f"{base.__doc__ or ''}\n\n{KeepsJobs.__doc__}"})


def __getattr__(name: str) -> type:
    """``flows.clusters.keeper.<X>``: dask-jobqueue's cluster class ``X`` with :class:`KeepsJobs` (made once)."""
    import dask_jobqueue

    base = getattr(dask_jobqueue, name, None)
    if not (isinstance(base, type) and issubclass(base, dask_jobqueue.JobQueueCluster)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _keeping(base)
    return cls
