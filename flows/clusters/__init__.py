"""Cluster profiles: one YAML file -> one cluster kind (a class) -> one ``DaskTaskRunner``.

A profile is data: ``cluster_type`` plus the keyword arguments of that cluster class, and
dogflow's own keys (``n_workers`` | ``min_workers``+``max_workers``, ``threads_per_task``,
``lifetime_margin``, ``dask_config``). Shipped profiles are package data of
``infra.clusters`` (``infra/clusters/*.yaml``); a path to a YAML file works too.

Public surface::

    load_profile(name_or_path) -> ClusterProfile     # subclass chosen by cluster_type
    shipped_profiles() -> list[str]                  # ["local", "lsf", "pbs", ...]
    ProfileName                                      # Literal of those names (flow parameter type)
    ProfileError                                     # one-line message for the user
    parse_profile(mapping, name) -> ClusterProfile

    profile.preflight(need_bytes_per_task) -> (need, have)   # interface + memory; sizes `local`
    profile.check_memory(need_bytes_per_task) -> (need, have)  # memory only (dogflow plan)
    profile.task_slots_and_memory() -> (slots, bytes | None)
    profile.threads_per_task() -> int | None
    profile.runner_arguments() -> dict                       # DaskTaskRunner kwargs (data)
    profile.build_task_runner() -> DaskTaskRunner
    profile.job_script() -> str                              # batch kinds; others raise ProfileError
    profile.session() -> context manager                     # runner mode: the allocation's ranks
    profile.plan_lines() -> list[str]                        # what `dogflow plan` prints
    profile.valid_keys() -> list[str]

Kinds (``cluster_type`` -> class): ``local`` LocalProfile (sizes itself, see
:mod:`flows.clusters.local`); ``slurm``/``pbs``/``lsf``/``sge`` SLURMProfile, ... on
:class:`~flows.clusters.jobqueue.JobqueueProfile` (TLS by default, ``--lifetime`` from the
walltime; dask-jobqueue's classes with :mod:`flows.clusters.keeper`, which resubmits lost jobs); ``slurm-runner`` SLURMRunnerProfile (TLS from a certificate folder); ``address``
AddressProfile; a dotted class path ForeignProfile. Adding a scheduler: one subclass that
sets ``kind`` (it registers itself) and one YAML example in ``infra/clusters/``.

The memory one position needs is the caller's to compute (the filter's memory plan,
``tasks.filters.memory_per_task``) and is passed in bytes; this package does not import the engine.
"""

from __future__ import annotations

from typing import Literal

from flows.clusters.base import ClusterProfile, ProfileError, load_profile, parse_bytes, parse_profile, shipped_profiles
from flows.clusters.jobqueue import JobqueueProfile, LSFProfile, PBSProfile, SGEProfile, SLURMProfile, parse_walltime
from flows.clusters.local import LocalProfile, plan_local
from flows.clusters.other import AddressProfile, ForeignProfile
from flows.clusters.runner import SLURMRunnerProfile

ProfileName = Literal[tuple(shipped_profiles())]  # type: ignore[valid-type]

__all__ = [
    "AddressProfile", "ClusterProfile", "ForeignProfile", "JobqueueProfile", "LSFProfile", "LocalProfile",
    "PBSProfile", "ProfileError", "ProfileName", "SGEProfile", "SLURMProfile", "SLURMRunnerProfile",
    "load_profile", "parse_bytes", "parse_profile", "parse_walltime", "plan_local", "shipped_profiles",
]
