"""Cluster profiles: one YAML file -> one ``DaskTaskRunner``.

A profile is data (``infra/clusters/NAME.yaml``)::

    cluster_type: slurm          # local | slurm | pbs | lsf | sge | address | a.dotted.ClusterClass
    n_workers: 4                 # fixed size ... or, adaptive:
    # min_workers: 0
    # max_workers: 8
    cores: 24                    # then the dask-jobqueue keyword arguments of that type
    memory: 180GiB
    ...

dogflow's own keys (everything else goes to the cluster class unchanged):

``cluster_type``
    ``local`` (``distributed.LocalCluster``), ``slurm``/``pbs``/``lsf``/``sge``
    (dask-jobqueue), ``address`` (join a running scheduler: key ``address``), or a
    dotted class path of any other Dask cluster manager (dask-kubernetes, Coiled...).
``n_workers`` | ``min_workers`` + ``max_workers``
    Fixed or adaptive scale, in Dask workers. A batch cluster always gets one of
    them (default ``n_workers: 1``): a jobqueue cluster without workers never runs
    anything.
``threads_per_task``
    FFT threads each task may use. Default: the job's CPUs (``job_cpu``, else
    ``cores``) divided by the task slots of a job (``cores``).
``lifetime_margin``
    Seconds before ``walltime`` at which workers retire (``--lifetime``);
    default ``max(60, min(600, walltime/10))``.
``dask_config``
    Dask configuration set in the flow process (the scheduler's), e.g.
    ``distributed.scheduler.allowed-failures``.

Batch clusters default to TLS (``security: true``, temporary certificates written to
``shared_temp_directory``, default ``~/.dogflow/tls``, which compute nodes must be
able to read). ``security: false`` turns it off, with a warning.
"""

from __future__ import annotations

import inspect
import importlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).resolve().parent.parent / "infra" / "clusters"
JOBQUEUE_TYPES = ("slurm", "pbs", "lsf", "sge")
RUNNER_TYPE = "slurm-runner"
RUNNER_KEYS = ("scheduler_file", "scheduler_options", "worker_options", "worker_class")
BUILTIN_TYPES = ("local", *JOBQUEUE_TYPES, RUNNER_TYPE, "address")
DOGFLOW_KEYS = ("cluster_type", "n_workers", "min_workers", "max_workers", "threads_per_task", "lifetime_margin", "dask_config")
LOCAL_KEYS = (
    "threads_per_worker",
    "processes",
    "memory_limit",
    "dashboard_address",
    "host",
    "scheduler_port",
    "silence_logs",
    "protocol",
    "local_directory",
    "worker_class",
    "security",
    "name",
)


class ProfileError(ValueError):
    """A bad cluster profile, phrased for the user on one line."""


def _jobqueue_class(kind: str):
    import dask_jobqueue

    return {
        "slurm": dask_jobqueue.SLURMCluster,
        "pbs": dask_jobqueue.PBSCluster,
        "lsf": dask_jobqueue.LSFCluster,
        "sge": dask_jobqueue.SGECluster,
    }[kind]


def _class_keys(cls) -> set[str]:
    keys: set[str] = set()
    for c in inspect.getmro(cls):
        if "__init__" in vars(c):
            keys |= {
                n
                for n, p in inspect.signature(c.__init__).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"
            }
    return keys


def valid_keys(cluster_type: str) -> list[str]:
    """Every key a profile of this type accepts."""
    if cluster_type == "local":
        extra = set(LOCAL_KEYS)
    elif cluster_type in JOBQUEUE_TYPES:
        cls = _jobqueue_class(cluster_type)
        extra = (_class_keys(cls) | _class_keys(cls.job_cls)) - {
            "job_cls", "loop", "asynchronous", "scheduler", "scheduler_cls", "config_name", "base_class_kwargs",
            "job_kwargs", "extra", "job_extra", "env_extra", "name", "n_workers",
        }
    elif cluster_type == "address":
        extra = {"address"}
    elif cluster_type == RUNNER_TYPE:
        extra = set(RUNNER_KEYS)
    else:
        return []  # a foreign cluster class: its own signature decides
    return sorted(set(DOGFLOW_KEYS) | extra)


@dataclass
class Profile:
    name: str
    cluster_type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    n_workers: int | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    threads_per_task: int | None = None
    lifetime_margin: float | None = None
    dask_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def is_batch(self) -> bool:
        return self.cluster_type in JOBQUEUE_TYPES

    @property
    def adaptive(self) -> bool:
        return self.max_workers is not None


def resolve_profile_path(name: str) -> Path:
    """``local`` -> infra/clusters/local.yaml; ``path/to/x.yaml`` -> that file."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if not p.is_file():
            raise ProfileError(f"cluster profile file not found: {name}")
        return p
    cand = PROFILE_DIR / f"{name}.yaml"
    if not cand.is_file():
        known = sorted(f.stem for f in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"unknown cluster profile {name!r}; known: {', '.join(known)} (or give a path to a .yaml file)")
    return cand


def _int_or_none(d: dict, key: str, name: str) -> int | None:
    v = d.pop(key, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProfileError(f"{name}: {key} must be a non-negative integer, got {v!r}")
    return v


def parse_profile(data: Any, name: str = "<profile>") -> Profile:
    """Validate a profile mapping; raise :class:`ProfileError` naming the valid keys."""
    if not isinstance(data, dict):
        raise ProfileError(f"{name}: a cluster profile must be a YAML mapping, got {type(data).__name__}")
    d = dict(data)
    ctype = d.pop("cluster_type", None)
    if not isinstance(ctype, str) or not ctype:
        raise ProfileError(f"{name}: missing cluster_type (one of {', '.join(BUILTIN_TYPES)} or a dotted class path)")
    if ctype not in BUILTIN_TYPES and "." not in ctype:
        raise ProfileError(f"{name}: unknown cluster_type {ctype!r}; use one of {', '.join(BUILTIN_TYPES)} or a dotted class path")
    allowed = valid_keys(ctype)
    if allowed:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ProfileError(f"{name}: unknown key(s) {', '.join(unknown)} for cluster_type {ctype}; valid keys: {', '.join(allowed)}")
    prof = Profile(name=name, cluster_type=ctype, source=name)
    prof.n_workers = _int_or_none(d, "n_workers", name)
    prof.min_workers = _int_or_none(d, "min_workers", name)
    prof.max_workers = _int_or_none(d, "max_workers", name)
    prof.threads_per_task = _int_or_none(d, "threads_per_task", name)
    margin = d.pop("lifetime_margin", None)
    prof.lifetime_margin = None if margin is None else float(margin)
    cfg = d.pop("dask_config", None) or {}
    if not isinstance(cfg, dict):
        raise ProfileError(f"{name}: dask_config must be a mapping")
    prof.dask_config = cfg
    if prof.n_workers is not None and (prof.min_workers is not None or prof.max_workers is not None):
        raise ProfileError(f"{name}: give either n_workers (fixed) or min_workers/max_workers (adaptive), not both")
    if prof.min_workers is not None and prof.max_workers is None:
        raise ProfileError(f"{name}: min_workers needs max_workers (adaptive scaling)")
    if prof.max_workers is not None:
        prof.min_workers = prof.min_workers or 0
        if prof.max_workers < 1 or prof.max_workers < prof.min_workers:
            raise ProfileError(f"{name}: need 1 <= max_workers and min_workers <= max_workers")
    if ctype == "address":
        if not isinstance(d.get("address"), str):
            raise ProfileError(f"{name}: cluster_type address needs an 'address' (e.g. tcp://host:8786 or a scheduler file path)")
    elif ctype in JOBQUEUE_TYPES:
        if prof.n_workers is None and prof.max_workers is None:
            prof.n_workers = 1
        if prof.n_workers == 0:
            raise ProfileError(f"{name}: n_workers: 0 would never run anything; use n_workers >= 1 or min_workers/max_workers")
        for req in ("cores", "memory"):
            if req not in d:
                raise ProfileError(f"{name}: a {ctype} profile needs '{req}'")
        _setup_batch_defaults(prof, d)
    elif ctype == "local":
        if prof.n_workers is None and prof.max_workers is None:
            prof.n_workers = 1
    elif ctype == RUNNER_TYPE:
        if prof.n_workers is not None or prof.max_workers is not None:
            raise ProfileError(f"{name}: slurm-runner workers are the allocation's ranks (srun -n N: N-2 workers); drop n_workers/max_workers")
        d.setdefault("scheduler_file", "~/.dogflow/runner/scheduler-{job_id}.json")
        d["scheduler_file"] = os.path.expandvars(os.path.expanduser(str(d["scheduler_file"])))
    prof.kwargs = d
    return prof


def parse_walltime(value: Any, cluster_type: str = "slurm") -> int:
    """Walltime -> seconds: ``"HH:MM:SS"``, ``"D-HH:MM:SS"``, a number of minutes, and
    ``"MM:SS"`` (SLURM, PBS, SGE) or ``"HH:MM"`` (LSF) for two fields."""
    if isinstance(value, (int, float)):
        return int(value * 60)
    s = str(value).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
    parts = [int(x) for x in s.split(":")]
    if len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, m, sec = (parts[0], parts[1], 0) if cluster_type == "lsf" else (0, parts[0], parts[1])
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    else:
        raise ProfileError(f"cannot read walltime {value!r}")
    return days * 86400 + h * 3600 + m * 60 + sec


def _setup_batch_defaults(prof: Profile, d: dict[str, Any]) -> None:
    # TLS by default.
    if "security" not in d:
        d["security"] = True
    if d["security"] is False:
        warnings.warn(f"{prof.name}: TLS is off (security: false); scheduler and workers talk in plain TCP", stacklevel=3)
    elif d["security"] is True:
        d.setdefault("shared_temp_directory", str(Path("~/.dogflow/tls").expanduser()))
        d["shared_temp_directory"] = str(Path(d["shared_temp_directory"]).expanduser())
    # Folders the flow process creates: expand ~ and $VARS here (local_directory is left to the job's shell).
    for key in ("log_directory", "shared_temp_directory"):
        if d.get(key):
            d[key] = os.path.expandvars(os.path.expanduser(str(d[key])))
    # Workers retire before the walltime kills them.
    args = list(d.get("worker_extra_args") or [])
    if d.get("walltime") and not any(str(a).startswith("--lifetime") for a in args):
        wall = parse_walltime(d["walltime"], prof.cluster_type)
        margin = prof.lifetime_margin if prof.lifetime_margin is not None else max(60, min(600, wall // 10))
        life = max(60, int(wall - margin))
        stagger = max(1, min(300, life // 20))
        args += ["--lifetime", f"{life}s", "--lifetime-stagger", f"{stagger}s"]
        d["worker_extra_args"] = args
        if not prof.adaptive:
            warnings.warn(
                f"{prof.name}: workers retire at walltime-{margin:.0f}s but n_workers is fixed; "
                "use min_workers/max_workers so retired workers are replaced",
                stacklevel=3,
            )


def load_profile(name: str) -> Profile:
    path = resolve_profile_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    prof = parse_profile(data, name=str(path))
    return prof


# --------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: Any) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ProfileError(f"cannot read memory size {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def task_slots_and_memory(prof: Profile) -> tuple[int, int | None]:
    """(task slots of one worker process, memory one task may use in bytes or None if unknown)."""
    k = prof.kwargs
    if prof.is_batch:
        processes = int(k.get("processes") or 1)
        cores = int(k["cores"])
        slots = max(1, cores // processes)
        return slots, parse_bytes(k["memory"]) // processes // slots
    if prof.cluster_type == "local":
        import psutil

        n = prof.n_workers or prof.max_workers or 1
        tpw = int(k.get("threads_per_worker") or max(1, (os.cpu_count() or 1) // n))
        mem = k.get("memory_limit")
        per_worker = parse_bytes(mem) if mem not in (None, "auto", 0) else psutil.virtual_memory().total // n
        return tpw, per_worker // tpw
    return 1, None


def threads_per_task(prof: Profile) -> int | None:
    """FFT threads per task, or None to let each worker decide (CPUs // its task slots)."""
    if prof.threads_per_task:
        return prof.threads_per_task
    if prof.is_batch:
        k = prof.kwargs
        cpus = int(k.get("job_cpu") or k.get("ncpus") or k["cores"])
        return max(1, cpus // int(k["cores"]))
    if prof.cluster_type == "local":
        n = prof.max_workers or prof.n_workers or 1
        tpw = int(prof.kwargs.get("threads_per_worker") or 1)
        return max(1, len(os.sched_getaffinity(0)) // (n * tpw))
    return None


# --------------------------------------------------------------------------- runner


def _import_class(path: str):
    mod, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as exc:
        raise ProfileError(f"cannot import cluster class {path!r}: {exc}") from None


def runner_arguments(prof: Profile) -> dict[str, Any]:
    """The keyword arguments of ``DaskTaskRunner`` for this profile (data only, for tests and plans)."""
    if prof.cluster_type == "address":
        return {"address": prof.kwargs["address"]}
    if prof.cluster_type == RUNNER_TYPE:
        return {"address": runner_scheduler_address(prof)}
    if prof.cluster_type == "local":
        cls_path = "distributed.LocalCluster"
    elif prof.is_batch:
        cls_path = f"dask_jobqueue.{_jobqueue_class(prof.cluster_type).__name__}"
    else:
        cls_path = prof.cluster_type
    kwargs = dict(prof.kwargs)
    args: dict[str, Any] = {"cluster_class": cls_path, "cluster_kwargs": kwargs}
    if prof.adaptive:
        args["adapt_kwargs"] = {"minimum": prof.min_workers, "maximum": prof.max_workers}
        if prof.cluster_type == "local":
            kwargs["n_workers"] = prof.min_workers
    elif prof.n_workers is not None:
        kwargs["n_workers"] = prof.n_workers
    return args


def runner_scheduler_file(prof: Profile) -> str:
    """The scheduler file of this SLURM allocation (``{job_id}`` filled from ``SLURM_JOB_ID``)."""
    return prof.kwargs["scheduler_file"].format(job_id=os.environ.get("SLURM_JOB_ID", "nojob"))


def runner_scheduler_address(prof: Profile) -> str:
    """The address the allocation's rank-0 scheduler wrote into the shared scheduler file."""
    import json

    path = runner_scheduler_file(prof)
    try:
        with open(path) as fh:
            return json.load(fh)["address"]
    except (OSError, ValueError, KeyError):
        return f"<scheduler address from {path}, written when the allocation starts>"


def slurm_runner(prof: Profile):
    """dask-jobqueue's ``SLURMRunner`` for this allocation: rank 0 scheduler, rank 1 client, others workers.

    Only rank 1 executes the body of ``with slurm_runner(prof):``; the other ranks
    serve until it leaves, then exit.
    """
    from dask_jobqueue.slurm import SLURMRunner

    Path(runner_scheduler_file(prof)).parent.mkdir(parents=True, exist_ok=True)
    kw = {k: prof.kwargs[k] for k in ("scheduler_options", "worker_options", "worker_class") if prof.kwargs.get(k)}
    return SLURMRunner(scheduler_file=prof.kwargs["scheduler_file"], **kw)


def _prepare_directories(prof: Profile) -> None:
    """Create the folders the cluster class writes into from this process (TLS files: owner-only)."""
    tls = prof.kwargs.get("shared_temp_directory")
    if tls and prof.kwargs.get("security") is True:
        Path(tls).mkdir(parents=True, exist_ok=True, mode=0o700)
    if prof.kwargs.get("log_directory"):
        Path(prof.kwargs["log_directory"]).mkdir(parents=True, exist_ok=True)


def job_script(prof: Profile, scheduler: str = "tls://SCHEDULER-ADDRESS:8786") -> str:
    """The batch script one worker job of this profile would run, rendered without starting anything.

    The scheduler address is a placeholder (the real one exists once the flow starts
    its scheduler). TLS file options are added by the cluster at start time.
    """
    if not prof.is_batch:
        raise ProfileError(f"{prof.name}: cluster_type {prof.cluster_type} has no job script")
    job_cls = _jobqueue_class(prof.cluster_type).job_cls
    allowed = _class_keys(job_cls) - {"scheduler", "name", "config_name", "base_class_kwargs", "security"}
    kwargs = {k: v for k, v in prof.kwargs.items() if k in allowed}
    if not str(scheduler).startswith("tls://") or prof.kwargs.get("security") is False:
        scheduler = scheduler.replace("tls://", "tcp://")
    return job_cls(scheduler=scheduler, name="dogflow-worker", **kwargs).job_script()


def build_task_runner(prof: Profile):
    """The profile as a ``prefect_dask.DaskTaskRunner`` (``cluster_class`` + kwargs, never a live cluster)."""
    from prefect_dask import DaskTaskRunner

    import dask

    from tasks.defaults import ALLOWED_FAILURES as DEFAULT_ALLOWED_FAILURES

    dask.config.set({"distributed.scheduler.allowed-failures": DEFAULT_ALLOWED_FAILURES, **prof.dask_config})
    _prepare_directories(prof)
    args = runner_arguments(prof)
    if "cluster_class" in args:
        _import_class(args["cluster_class"])  # fail early on a bad class path
    return DaskTaskRunner(**args)


def memory_needed_per_task(zyx: tuple[int, int, int], input_dtype: str, output_dtype: str) -> int:
    """Bytes one task holds at its peak: the engine's documented peak, plus the cast output for uint16."""
    import numpy as np

    from tasks import dog

    n = math.prod(zyx)
    need = dog.peak_memory_bytes(tuple(zyx), np.dtype(input_dtype))
    if output_dtype == "uint16":
        need += n * 2 + n * 4  # rint buffer + uint16 result
    return int(need * 1.1) + 256 * 2**20  # 10 % + 256 MiB for the interpreter, zarr codecs and buffers


def preflight(prof: Profile, zyx: tuple[int, int, int], input_dtype: str, output_dtype: str) -> tuple[int, int | None]:
    """Checks that need this host, before any job is submitted: the network interface exists, and memory."""
    iface = prof.kwargs.get("interface")
    if iface:
        import psutil

        names = sorted(psutil.net_if_addrs())
        if iface not in names:
            raise ProfileError(f"{prof.name}: network interface {iface!r} does not exist on this host; choose one of {', '.join(names)}")
    return check_memory(prof, zyx, input_dtype, output_dtype)


def check_memory(prof: Profile, zyx: tuple[int, int, int], input_dtype: str, output_dtype: str) -> tuple[int, int | None]:
    """Refuse a profile whose memory per task is below what one position needs."""
    need = memory_needed_per_task(zyx, input_dtype, output_dtype)
    slots, have = task_slots_and_memory(prof)
    if have is not None and have < need:
        raise ProfileError(
            f"{prof.name}: one position of shape {tuple(zyx)} needs about {need / 2**30:.1f} GiB per task, "
            f"but a worker has {have / 2**30:.1f} GiB per task ({slots} task slot(s) per worker process); "
            "raise memory or lower cores per process"
        )
    return need, have
