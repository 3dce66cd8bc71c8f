"""The life cycle every cluster kind shares: parse a profile, check it, size it, build the task runner.

A kind (``LocalProfile``, ``SLURMProfile``, ...) subclasses :class:`ClusterProfile` and
states only what differs, as class attributes and a few overridden methods:

``kind``            the ``cluster_type`` it handles (registering the class);
``cluster_class``   the Dask cluster manager, as a dotted path (``None``: joins an address);
``cluster_keys()``  the keys of that class a profile may give (dogflow's own are added);
``setup()``         defaults and checks of its keys (TLS, lifetime, required keys);
``task_slots_and_memory()`` / ``threads_per_task()`` / ``runner_arguments()`` /
``job_script()`` / ``session()`` / ``plan_lines()`` where the default does not fit.

A profile does not change once made. What a run adds, the memory one position needs and how many
positions it has, makes a new profile: :meth:`ClusterProfile.sized` (a copy with ``need`` and ``tasks``
set, checked against the memory of a task slot). A kind that can start its cluster while the caller does
other work returns an object for it from :meth:`ClusterProfile.start_early` (the caller owns it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

PROFILE_PACKAGE = "infra.clusters"  # the shipped profiles: package data, found with importlib.resources
COMMON_KEYS = ("cluster_type", "n_workers", "min_workers", "max_workers", "threads_per_task", "lifetime_margin",
               "dask_config")


class ProfileError(ValueError):
    """A bad cluster profile, phrased for the user on one line."""


# --------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(value: Any) -> int:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ProfileError(f"cannot read memory size {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def import_class(path: str):
    mod, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ProfileError(f"cannot import cluster class {path!r}: {exc}") from None


def _int_or_none(d: dict, key: str, name: str) -> int | None:
    v = d.pop(key, None)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProfileError(f"{name}: {key} must be a non-negative integer, got {v!r}")
    return v


# --------------------------------------------------------------------------- the base class


class ClusterProfile:
    """One cluster profile (a YAML mapping), validated; the base of every cluster kind."""

    kind: ClassVar[str] = ""
    cluster_class: ClassVar[str | None] = None
    batch: ClassVar[bool] = False  # submits worker jobs to a batch scheduler (has a job script)
    _kinds: ClassVar[dict[str, type["ClusterProfile"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            ClusterProfile._kinds[cls.kind] = cls

    # -- parsing ------------------------------------------------------------------

    def __init__(self, data: Mapping[str, Any], name: str = "<profile>"):
        self.name = self.source = name
        d = dict(data)
        self.cluster_type = str(d.pop("cluster_type", self.kind))
        allowed = self.valid_keys()
        if allowed:
            unknown = sorted(set(d) - set(allowed))
            if unknown:
                raise ProfileError(f"{name}: unknown key(s) {', '.join(unknown)} for cluster_type {self.cluster_type}; "
                                   f"valid keys: {', '.join(allowed)}")
        self.n_workers = _int_or_none(d, "n_workers", name)
        self.min_workers = _int_or_none(d, "min_workers", name)
        self.max_workers = _int_or_none(d, "max_workers", name)
        self.fixed_threads = _int_or_none(d, "threads_per_task", name)
        margin = d.pop("lifetime_margin", None)
        self.lifetime_margin = None if margin is None else float(margin)
        cfg = d.pop("dask_config", None) or {}
        if not isinstance(cfg, dict):
            raise ProfileError(f"{name}: dask_config must be a mapping")
        self.dask_config: dict[str, Any] = cfg
        if self.n_workers is not None and (self.min_workers is not None or self.max_workers is not None):
            raise ProfileError(f"{name}: give either n_workers (fixed) or min_workers/max_workers (adaptive), not both")
        if self.min_workers is not None and self.max_workers is None:
            raise ProfileError(f"{name}: min_workers needs max_workers (adaptive scaling)")
        if self.max_workers is not None:
            self.min_workers = self.min_workers or 0
            if self.max_workers < 1 or self.max_workers < self.min_workers:
                raise ProfileError(f"{name}: need 1 <= max_workers and min_workers <= max_workers")
        self.kwargs: dict[str, Any] = d
        self.need: int | None = None  # bytes one task needs (a sized() copy)
        self.tasks: int | None = None  # positions the run has to filter (a sized() copy), None: unknown
        self.setup()

    @classmethod
    def cluster_keys(cls) -> set[str]:
        """The keys of the cluster class a profile of this kind may give (empty: not checked)."""
        return set()

    @classmethod
    def valid_keys(cls) -> list[str]:
        """Every key a profile of this kind accepts ([] when the cluster class's own signature decides)."""
        extra = cls.cluster_keys()
        return sorted(set(COMMON_KEYS) | extra) if extra else []

    def setup(self) -> None:
        """Kind-specific defaults and checks of ``self.kwargs`` (raise ProfileError)."""

    @property
    def adaptive(self) -> bool:
        return self.max_workers is not None

    # -- sizing -------------------------------------------------------------------

    def task_slots_and_memory(self) -> tuple[int, int | None]:
        """(task slots of one worker process, bytes one task may use, or None if unknown)."""
        return 1, None

    def threads_per_task(self) -> int | None:
        """FFT threads per task, or None to let each worker decide (its CPUs // its task slots)."""
        return self.fixed_threads or None

    def sized(self, need_bytes_per_task: int, tasks: int | None = None) -> "ClusterProfile":
        """A copy of this profile for positions that need ``need_bytes_per_task`` at their peak (the caller asks
        the filter's memory plan), ``tasks`` of them (None: not known yet); raises a one-line ProfileError when a
        task slot has less memory. This profile is left as it is."""
        new = copy.copy(self)
        new.need = int(need_bytes_per_task)
        new.tasks = None if tasks is None else max(1, int(tasks))
        new.size()
        slots, have = new.task_slots_and_memory()
        if have is not None and have < new.need:
            raise ProfileError(
                f"{self.name}: one position needs about {gib(new.need)} per task, but a worker has {gib(have)} "
                f"per task ({slots} task slot(s) per worker process); raise memory or lower cores per process"
            )
        return new

    def size(self) -> None:
        """Kind-specific sizing of a :meth:`sized` copy (from ``self.need`` and ``self.tasks``). Default: none."""

    def preflight(self, need_bytes_per_task: int) -> "ClusterProfile":
        """Checks on this host before anything is submitted (the network interface), then :meth:`sized`."""
        iface = self.kwargs.get("interface")
        if iface:
            import psutil

            names = sorted(psutil.net_if_addrs())
            if iface not in names:
                raise ProfileError(f"{self.name}: network interface {iface!r} does not exist on this host; "
                                   f"choose one of {', '.join(names)}")
        return self.sized(need_bytes_per_task)

    def check_memory(self, need_bytes_per_task: int) -> "ClusterProfile":
        """The memory part of :meth:`preflight` alone (``dogflow plan``, which may run on another host)."""
        return self.sized(need_bytes_per_task)

    # -- the task runner ------------------------------------------------------------

    def scale_arguments(self, cluster_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fixed (``n_workers`` in the cluster kwargs) or adaptive (``adapt_kwargs``) scale."""
        if self.adaptive:
            return {"adapt_kwargs": {"minimum": self.min_workers, "maximum": self.max_workers}}
        if self.n_workers is not None:
            cluster_kwargs["n_workers"] = self.n_workers
        return {}

    def runner_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``DaskTaskRunner`` (data only: for tests and plans)."""
        kwargs = dict(self.kwargs)
        args: dict[str, Any] = {"cluster_class": self.cluster_class, "cluster_kwargs": kwargs}
        args.update(self.scale_arguments(kwargs))
        return args

    def dask_settings(self) -> dict[str, Any]:
        """Dask configuration set in the flow process (the scheduler's; LocalCluster workers inherit it)."""
        from tasks.defaults import DASK_CONFIG

        return {**DASK_CONFIG, **self.dask_config}

    def prepare(self) -> None:
        """Create what the cluster needs on this host before it starts (folders)."""

    def build_task_runner(self):
        """The profile as a ``prefect_dask.DaskTaskRunner`` (cluster class + kwargs, never a live cluster)."""
        import dask
        from prefect_dask import DaskTaskRunner

        dask.config.set(self.dask_settings())
        self.prepare()
        args = self.runner_arguments()
        if args.get("cluster_class"):
            import_class(args["cluster_class"])  # fail early on a bad class path
        return DaskTaskRunner(**args)

    def job_script(self) -> str:
        raise ProfileError(f"{self.name}: cluster_type {self.cluster_type} has no job script")

    def session(self):
        """The context a run executes in on this host (runner mode: the allocation's ranks). Default: none."""
        return contextlib.nullcontext()

    def start_early(self) -> Any:
        """Start the cluster now, while the caller does other work (the CLI, while its temporary Prefect API
        boots): an object with ``task_runner()`` (a ``DaskTaskRunner`` that joins it) and ``close()``, owned by
        the caller; or None, and the task runner starts the cluster. Default: None."""
        return None

    def tls(self) -> str:
        """How scheduler, workers and the flow's client talk, in words."""
        return "as the cluster class decides"

    def plan_lines(self) -> list[str]:
        """What a run on this profile would do, for ``dogflow plan`` (after ``preflight``)."""
        slots, have = self.task_slots_and_memory()
        lines = []
        if self.need is not None:
            lines.append(f"memory per task: {self.need / 2**30:.2f} GiB needed, "
                         + (f"{have / 2**30:.2f} GiB available" if have else "unknown available"))
        lines.append(f"profile: {self.source} ({self.cluster_type})")
        lines.append(f"threads per task: {self.threads_per_task() or 'auto'}")
        lines += self.worker_lines()
        lines.append(f"TLS: {self.tls()}")
        return lines

    def worker_lines(self) -> list[str]:
        if self.adaptive:
            return [f"workers: adaptive {self.min_workers}-{self.max_workers}"]
        return [f"workers: {self.n_workers}"] if self.n_workers is not None else []


# --------------------------------------------------------------------------- loading


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with dogflow (package data of ``infra.clusters``)."""
    return sorted(p.name[:-5] for p in resources.files(PROFILE_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def _read_profile(name: str) -> tuple[str, str]:
    """(text, source) of ``name``: a shipped profile name, or a path to a YAML file."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if not p.is_file():
            raise ProfileError(f"cluster profile file not found: {name}")
        return p.read_text(), str(p)
    res = resources.files(PROFILE_PACKAGE).joinpath(f"{name}.yaml")
    if not name or not res.is_file():
        raise ProfileError(f"unknown cluster profile {name!r}; known: {', '.join(shipped_profiles())} "
                           "(or give a path to a .yaml file)")
    return res.read_text(), str(res)


def parse_profile(data: Any, name: str = "<profile>") -> ClusterProfile:
    """Validate a profile mapping into the profile class of its ``cluster_type``."""
    from flows.clusters.other import ForeignProfile

    if not isinstance(data, dict):
        raise ProfileError(f"{name}: a cluster profile must be a YAML mapping, got {type(data).__name__}")
    ctype = data.get("cluster_type")
    kinds = ClusterProfile._kinds
    if not isinstance(ctype, str) or not ctype:
        raise ProfileError(f"{name}: missing cluster_type (one of {', '.join(kinds)} or a dotted class path)")
    cls = kinds.get(ctype) or (ForeignProfile if "." in ctype else None)
    if cls is None:
        raise ProfileError(f"{name}: unknown cluster_type {ctype!r}; use one of {', '.join(kinds)} or a dotted class path")
    return cls(data, name)


def load_profile(name_or_path: str) -> ClusterProfile:
    """A shipped profile by name (``local``, ``slurm``, ...) or a YAML file by path."""
    text, source = _read_profile(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
    return parse_profile(data, name=source)
