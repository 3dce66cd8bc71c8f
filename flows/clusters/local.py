"""``cluster_type: local``: a ``distributed.LocalCluster`` on this machine, sized from its cores and memory.

Sizing (what ``local.yaml`` leaves open; explicit ``n_workers``, ``threads_per_worker``,
``memory_limit`` and ``threads_per_task`` win):

* cores = ``len(os.sched_getaffinity(0))``;
* usable memory = available memory (``psutil.virtual_memory().available``) minus a safety
  margin of ``max(1 GiB, 10 % of total memory)`` for the flow process, the Prefect server
  and the page cache;
* each worker has ``threads_per_worker: 1`` task slot (one position at a time);
* workers = ``min(cores, usable // (need / terminate))``: as many positions side by side as
  fit. ``terminate`` is Dask's ``distributed.worker.memory.terminate`` (0.95): the nanny
  kills a worker whose memory passes that fraction of its ``memory_limit``, so a worker's
  limit must be at least ``need / terminate``;
* ``memory_limit`` per worker = usable // workers (the whole share, never less than the above);
* FFT threads per task = cores // workers (>= 1).

A position's memory is unmanaged (arrays inside the running task): spilling cannot free it
and pausing cannot shrink it, so the local kind turns Dask's ``target``/``spill``/``pause``
thresholds off (``dask_config`` in the profile wins) and sizes against ``terminate`` only.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

from flows.clusters.base import ClusterProfile, ProfileError, gib, parse_bytes

LOCAL_KEYS = {"threads_per_worker", "processes", "memory_limit", "dashboard_address", "host", "scheduler_port",
              "silence_logs", "protocol", "local_directory", "worker_class", "security", "name"}
MARGIN_MIN = 2**30
MARGIN_FRACTION = 0.10
WORKER_MEMORY_DEFAULTS = {  # see the module docstring
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}


@dataclass(frozen=True)
class LocalPlan:
    n_workers: int
    threads_per_worker: int  # task slots per worker
    memory_limit: int  # bytes per worker
    threads_per_task: int

    @property
    def memory_per_task(self) -> int:
        return self.memory_limit // self.threads_per_worker


def plan_local(cores: int, usable: int, need: int, *, terminate: float = 0.95, n_workers: int | None = None,
               threads_per_worker: int | None = None, memory_limit: int | None = None,
               threads_per_task: int | None = None, name: str = "local", tasks: int | None = None) -> LocalPlan:
    """Workers, task slots, memory limit and FFT threads for ``need`` bytes per position (pure); ``tasks``:
    how many positions the run has (no more workers than that, so one position gets every core)."""
    slots = threads_per_worker or 1
    per_worker_min = math.ceil(need / terminate) * slots  # the memory_limit one worker needs
    if n_workers is None:
        fit = usable // per_worker_min if per_worker_min else cores
        if memory_limit:
            fit = min(fit, usable // memory_limit) if usable >= memory_limit else 0
        n_workers = min(max(1, cores // slots), fit)
        if tasks and n_workers >= 1:
            n_workers = min(n_workers, -(-tasks // slots))
        if n_workers < 1:
            raise ProfileError(
                f"{name}: one position needs about {gib(need)}, and a worker's memory_limit must be at least "
                f"{gib(per_worker_min)} (need / Dask's terminate threshold {terminate:g}), but this machine has "
                f"only {gib(usable)} usable; use a machine or cluster profile with more memory per worker"
            )
    limit = memory_limit or max(2**28, usable // max(1, n_workers))  # never 0: Dask reads 0 as no limit
    if need and need > limit * terminate / slots:
        raise ProfileError(
            f"{name}: one position needs about {gib(need)}, but {n_workers} worker(s) with memory_limit "
            f"{gib(limit)} and {slots} task slot(s) leave {gib(limit * terminate / slots)} per task below Dask's "
            f"terminate threshold {terminate:g}; lower n_workers or threads_per_worker, or raise memory_limit"
        )
    threads = threads_per_task or max(1, cores // max(1, n_workers * slots))
    return LocalPlan(n_workers, slots, int(limit), threads)


def machine() -> tuple[int, int, int, int]:
    """(cores, usable bytes, available bytes, margin bytes) of this process's host."""
    import psutil

    cores = len(os.sched_getaffinity(0))
    vm = psutil.virtual_memory()
    margin = max(MARGIN_MIN, int(MARGIN_FRACTION * vm.total))
    return cores, max(0, vm.available - margin), vm.available, margin


class LocalProfile(ClusterProfile):
    kind = "local"
    cluster_class = "distributed.LocalCluster"

    @classmethod
    def cluster_keys(cls) -> set[str]:
        return set(LOCAL_KEYS)

    def setup(self) -> None:
        self.local_plan: LocalPlan | None = None  # set on a sized() copy
        mem = self.kwargs.get("memory_limit")
        self._memory_limit = None if mem in (None, "auto") else parse_bytes(mem)

    def _terminate(self) -> float:
        import dask

        value = self.dask_config.get("distributed.worker.memory.terminate",
                                     dask.config.get("distributed.worker.memory.terminate", 0.95))
        return float(value) if value else 1.0

    def plan(self) -> LocalPlan:
        """Workers, slots, memory and threads: a sized copy's plan, else the plan for ``need`` 0 on this machine."""
        return self.local_plan or self._plan_for(0, None)

    def _plan_for(self, need: int, tasks: int | None) -> LocalPlan:
        cores, usable, _, _ = machine()
        workers = self.max_workers if self.adaptive else self.n_workers
        return plan_local(cores, usable, need, terminate=self._terminate(), n_workers=workers,
                          threads_per_worker=self.kwargs.get("threads_per_worker"), memory_limit=self._memory_limit,
                          threads_per_task=self.fixed_threads, name=self.name, tasks=tasks)

    def size(self) -> None:
        # refuses a position that cannot fit; no more workers than tasks (their cores go to fewer tasks)
        self.local_plan = self._plan_for(self.need or 0, self.tasks)

    def task_slots_and_memory(self) -> tuple[int, int | None]:
        plan = self.plan()
        return plan.threads_per_worker, plan.memory_per_task

    def threads_per_task(self) -> int | None:
        return self.plan().threads_per_task

    def start_early(self) -> "EarlyCluster":
        return EarlyCluster(self)

    def runner_arguments(self) -> dict[str, Any]:
        plan = self.plan()
        kwargs = {**self.kwargs, "threads_per_worker": plan.threads_per_worker, "memory_limit": plan.memory_limit}
        # Dask's lines on this terminal (the workers share it): the level `dogflow run` chose (-v: INFO)
        kwargs.setdefault("silence_logs", os.environ.get("DOGFLOW_TERMINAL_LOG_LEVEL", "WARNING"))
        args: dict[str, Any] = {"cluster_class": self.cluster_class, "cluster_kwargs": kwargs}
        if self.adaptive:
            kwargs["n_workers"] = self.min_workers
            args["adapt_kwargs"] = {"minimum": self.min_workers, "maximum": self.max_workers}
        else:
            kwargs["n_workers"] = plan.n_workers
        return args

    def dask_settings(self) -> dict[str, Any]:
        return {**WORKER_MEMORY_DEFAULTS, **super().dask_settings()}

    def worker_lines(self) -> list[str]:
        plan = self.plan()
        cores, usable, avail, margin = machine()
        return [
            f"workers: {plan.n_workers} x {plan.threads_per_worker} task slot(s), memory_limit {gib(plan.memory_limit)} "
            f"each (this machine: {cores} cores, {gib(usable)} usable = {gib(avail)} available - {gib(margin)} margin)"
        ]

    def tls(self) -> str:
        return "off (one machine, loopback)" if not self.kwargs.get("security") else "on"


class EarlyCluster:
    """A profile's LocalCluster starting now, in a background thread: its worker processes spawn and import
    while the caller waits for something else (the temporary Prefect API). :meth:`task_runner` joins it by
    address; :meth:`close` (the caller's, when the run ends) stops it. Workers inherit this process's
    environment as it is now (``PREFECT_API_URL`` must already be set)."""

    def __init__(self, profile: LocalProfile):
        import dask

        dask.config.set(profile.dask_settings())
        profile.prepare()
        self._result: dict[str, Any] = {}
        kwargs = profile.runner_arguments()["cluster_kwargs"]
        self._thread = threading.Thread(target=self._start, args=(kwargs,), name="dogflow-early-cluster", daemon=True)
        self._thread.start()

    def _start(self, kwargs: dict[str, Any]) -> None:
        from distributed import LocalCluster

        try:
            self._result["cluster"] = LocalCluster(**kwargs)
        except BaseException as exc:  # reported when the task runner asks for the cluster
            self._result["error"] = exc

    def task_runner(self):
        from prefect_dask import DaskTaskRunner

        self._thread.join()
        if "error" in self._result:
            raise self._result["error"]
        return DaskTaskRunner(address=self._result["cluster"].scheduler_address)

    def close(self) -> None:
        self._thread.join()
        if "cluster" in self._result:
            self._result.pop("cluster").close()
