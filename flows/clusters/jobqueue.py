"""Batch schedulers through dask-jobqueue: each SLURM/PBS/LSF/SGE job is one Dask worker (process group).

:class:`JobqueueProfile` owns what they share: the keys (the signatures of the jobqueue
cluster class and its ``job_cls``), required ``cores``/``memory``, at least one worker,
TLS by default, workers that retire before the walltime, task slots, FFT threads and the
job script. A scheduler states only its name, its dask-jobqueue class, the key that
holds a job's CPUs and how it reads a two-field walltime.

A worker job's nanny and worker read the Dask configuration of the node they run on, not the flow's; so the
job script exports dogflow's worker settings (``tasks.defaults.DASK_CONFIG`` and the profile's ``dask_config``)
in ``DASK_INTERNAL_INHERIT_CONFIG``, the variable Dask itself uses to hand its configuration to processes it
spawns. Among them: no ``MALLOC_TRIM_THRESHOLD_`` exported by the nanny (a position ran 21 % slower with it),
and none inherited from the submitting environment either (``unset``).
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

from flows.clusters import tls
from flows.clusters.base import ClusterProfile, ProfileError, parse_bytes

# Keys of the jobqueue classes that dogflow sets itself or that make no sense in a profile.
_NOT_PROFILE_KEYS = {"job_cls", "loop", "asynchronous", "scheduler", "scheduler_cls", "config_name",
                     "base_class_kwargs", "job_kwargs", "extra", "job_extra", "env_extra", "name", "n_workers"}


def _signature_keys(cls) -> set[str]:
    keys: set[str] = set()
    for c in inspect.getmro(cls):
        if "__init__" in vars(c):
            keys |= {n for n, p in inspect.signature(c.__init__).parameters.items()
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    return keys


def parse_walltime(value: Any, two_fields: str = "MM:SS") -> int:
    """Walltime -> seconds: ``"HH:MM:SS"``, ``"D-HH:MM:SS"``, a number of minutes, and two fields
    read as ``two_fields`` (``"MM:SS"`` for SLURM, PBS, SGE; ``"HH:MM"`` for LSF)."""
    if isinstance(value, (int, float)):
        return int(value * 60)
    s = str(value).strip()
    days = 0
    try:
        if "-" in s:
            d, s = s.split("-", 1)
            days = int(d)
        parts = [int(x) for x in s.split(":")]
    except ValueError:
        raise ProfileError(f"cannot read walltime {value!r}") from None
    if len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, m, sec = (parts[0], parts[1], 0) if two_fields == "HH:MM" else (0, parts[0], parts[1])
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    else:
        raise ProfileError(f"cannot read walltime {value!r}")
    return days * 86400 + h * 3600 + m * 60 + sec


class JobqueueProfile(ClusterProfile):
    """A dask-jobqueue cluster: worker jobs submitted to a batch scheduler."""

    batch = True
    jobqueue_class: ClassVar[str] = ""  # class name in dask_jobqueue
    cpus_key: ClassVar[str | None] = None  # key holding a job's CPUs, when it can differ from `cores`
    walltime_two_fields: ClassVar[str] = "MM:SS"
    required: ClassVar[tuple[str, ...]] = ("cores", "memory")

    @classmethod
    def _class(cls):
        import dask_jobqueue

        return getattr(dask_jobqueue, cls.jobqueue_class)

    @classmethod
    def cluster_keys(cls) -> set[str]:
        klass = cls._class()
        return (_signature_keys(klass) | _signature_keys(klass.job_cls)) - _NOT_PROFILE_KEYS

    @property
    def cluster_class(self) -> str:  # type: ignore[override]
        return f"flows.clusters.keeper.{self.jobqueue_class}"  # dask-jobqueue's class, resubmitting lost jobs

    def setup(self) -> None:
        if self.n_workers is None and self.max_workers is None:
            self.n_workers = 1  # a jobqueue cluster without workers would wait forever
        if self.n_workers == 0:
            raise ProfileError(f"{self.name}: n_workers: 0 would never run anything; "
                               "use n_workers >= 1 or min_workers/max_workers")
        for req in self.required:
            if req not in self.kwargs:
                raise ProfileError(f"{self.name}: a {self.cluster_type} profile needs '{req}'")
        self.setup_processes()
        self.setup_tls()
        self.setup_lifetime()

    # -- processes ------------------------------------------------------------------

    def setup_processes(self) -> None:
        """One task slot per worker process unless the profile says otherwise (``processes: cores``).

        Positions running in one process share its GIL between their numpy/FFT calls: on 16 cores, K positions
        in one process took 3.5-4x longer than the same K positions in K processes (``benchmarks/slots.py``;
        4x4, 8x2 and 16x1 threads). dask-jobqueue's own default (about sqrt(cores) processes) is not used."""
        cores = int(self.kwargs["cores"])
        self.kwargs.setdefault("processes", cores)
        if self.processes < 1 or cores % self.processes:
            raise ProfileError(f"{self.name}: processes must divide cores ({cores}), got {self.kwargs['processes']}")
        slots = cores // self.processes
        if slots > 1:
            warnings.warn(f"{self.name}: {slots} task slots per worker process share one GIL "
                          f"(measured 3.5-4x slower than one process per slot); set processes: {cores}",
                          stacklevel=4)

    # -- TLS and lifetime -----------------------------------------------------------

    def setup_tls(self) -> None:
        """TLS by default: dask-jobqueue writes temporary certificates into ``shared_temp_directory``."""
        d = self.kwargs
        if tls.security_setting(d, self.name, "scheduler and workers", allow_objects=True) is True:
            d.setdefault("shared_temp_directory", "~/.dogflow/tls")
        # folders the flow process creates: expand ~ and $VARS here (local_directory is left to the job's shell)
        for key in ("log_directory", "shared_temp_directory"):
            if d.get(key):
                d[key] = os.path.expandvars(os.path.expanduser(str(d[key])))

    def setup_lifetime(self) -> None:
        """With a walltime, workers retire (``--lifetime``) a margin before the batch scheduler kills them."""
        d = self.kwargs
        args = list(d.get("worker_extra_args") or [])
        if not d.get("walltime") or any(str(a).startswith("--lifetime") for a in args):
            return
        wall = parse_walltime(d["walltime"], self.walltime_two_fields)
        margin = self.lifetime_margin if self.lifetime_margin is not None else max(60, min(600, wall // 10))
        life = max(60, int(wall - margin))
        stagger = max(1, min(300, life // 20))
        # a retired worker's job ends; the cluster submits its replacement (flows.clusters.keeper), fixed or adaptive
        d["worker_extra_args"] = args + ["--lifetime", f"{life}s", "--lifetime-stagger", f"{stagger}s"]

    def worker_prologue(self) -> list[str]:
        """``job_script_prologue`` with dogflow's Dask settings exported first, for the job's nanny and worker.

        The worker preload is left out: a job whose environment cannot import ``tasks.position`` should fail
        its first task with that error in the flow's log, not die at start and be resubmitted."""
        import dask.config

        settings = {k: v for k, v in self.dask_settings().items() if k != "distributed.worker.preload"}
        lines = [f"export DASK_INTERNAL_INHERIT_CONFIG={dask.config.serialize(settings)}"]
        # A variable the settings say not to export must not arrive from the submitting environment either
        # (sbatch exports it by default, and a nanny that ran in the submitting process put it there).
        prefix = "distributed.nanny.pre-spawn-environ."
        unset = sorted(k[len(prefix):] for k, v in settings.items() if k.startswith(prefix) and v is None)
        if unset:
            lines.append("unset " + " ".join(unset))
        return [*lines, *(str(x) for x in (self.kwargs.get("job_script_prologue") or []))]

    def runner_arguments(self) -> dict[str, Any]:
        args = super().runner_arguments()
        args["cluster_kwargs"]["job_script_prologue"] = self.worker_prologue()
        return args

    def tls(self) -> str:
        if self.kwargs.get("security") is False:
            return "off"
        return f"on (certificates in {self.kwargs.get('shared_temp_directory')})"

    def prepare(self) -> None:
        tls = self.kwargs.get("shared_temp_directory")
        if tls and self.kwargs.get("security") is True:
            Path(tls).mkdir(parents=True, exist_ok=True, mode=0o700)  # owner-only: it holds the private key
        if self.kwargs.get("log_directory"):
            Path(self.kwargs["log_directory"]).mkdir(parents=True, exist_ok=True)

    # -- sizing ---------------------------------------------------------------------

    @property
    def processes(self) -> int:
        return int(self.kwargs.get("processes") or 1)

    def task_slots_and_memory(self) -> tuple[int, int | None]:
        slots = max(1, int(self.kwargs["cores"]) // self.processes)
        return slots, parse_bytes(self.kwargs["memory"]) // self.processes // slots

    def threads_per_task(self) -> int | None:
        if self.fixed_threads:
            return self.fixed_threads
        cores = int(self.kwargs["cores"])
        cpus = int(self.kwargs.get(self.cpus_key) or cores) if self.cpus_key else cores
        return max(1, cpus // cores)

    # -- job script and plan --------------------------------------------------------

    def job_script(self, scheduler: str = "tls://SCHEDULER-ADDRESS:8786") -> str:
        """The batch script of one worker job, rendered without starting anything.

        The scheduler address is a placeholder (the real one exists once the flow starts
        its scheduler); TLS file options are added by the cluster at start time.
        """
        job_cls = self._class().job_cls
        allowed = _signature_keys(job_cls) - {"scheduler", "name", "config_name", "base_class_kwargs", "security"}
        kwargs = {k: v for k, v in self.kwargs.items() if k in allowed}
        kwargs["job_script_prologue"] = self.worker_prologue()
        if self.kwargs.get("security") is False:
            scheduler = scheduler.replace("tls://", "tcp://")
        return job_cls(scheduler=scheduler, name="dogflow-worker", **kwargs).job_script()

    def worker_lines(self) -> list[str]:
        slots, _ = self.task_slots_and_memory()
        workers = self.max_workers or self.n_workers or 1
        jobs = -(-workers // self.processes)
        scale = f"adaptive {self.min_workers}-{self.max_workers}" if self.adaptive else "fixed"
        return [f"workers: {workers} ({scale}), jobs: {'up to ' if self.adaptive else ''}{jobs}, "
                f"task slots per job: {slots * self.processes}"]

    def plan_lines(self) -> list[str]:
        return [*super().plan_lines(), "job script (one worker job):", self.job_script()]


class SLURMProfile(JobqueueProfile):
    kind = "slurm"
    jobqueue_class = "SLURMCluster"
    cpus_key = "job_cpu"


class PBSProfile(JobqueueProfile):
    kind = "pbs"
    jobqueue_class = "PBSCluster"


class LSFProfile(JobqueueProfile):
    kind = "lsf"
    jobqueue_class = "LSFCluster"
    cpus_key = "ncpus"
    walltime_two_fields = "HH:MM"


class SGEProfile(JobqueueProfile):
    kind = "sge"
    jobqueue_class = "SGECluster"
