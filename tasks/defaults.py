"""dogflow's defaults, each stated once. The CLI, the flow, the deployments and the docs import them from here.

Filter
    The seed script's Gaussians: σ_small = 50/2.35 and σ_large = 200/2.35 voxels (FWHM 50 and 200 voxels,
    written with 2.35 for 2·sqrt(2·ln 2) as the seed did), ``truncate=4.0`` and ``mode="nearest"``
    (scipy.ndimage semantics), float32 output.

Failure budget of one position (see README "Retries")
    - Prefect retries: an exception inside the task (I/O error, corrupt chunk) is retried ``RETRIES``
      times, ``RETRY_DELAY_SECONDS`` apart, on the same worker.
    - Dask rescheduling: if the worker process dies while running the task (OOM kill, node failure,
      scancel, walltime), the scheduler re-runs the task on another worker, until it has killed
      ``ALLOWED_FAILURES + 1`` workers; then the position fails for good.
    The worst case for one position is ``(ALLOWED_FAILURES + 1) * (RETRIES + 1)`` attempts.

Threads
    How many threads the engine may use is decided in one place per situation: the cluster profile
    states the threads of each task (``flows.clusters``); without one, a task on a Dask worker takes
    :func:`threads_per_task` of the process's CPUs (``tasks.dog.default_threads``).
    The memory plan (``tasks.filters.memory_per_task``) is made before the profile has chosen the
    threads, so it assumes up to ``PLAN_THREADS`` threads per task: the engine's work buffers grow with
    threads (``tasks.dog.peak_memory_bytes``), by nothing for a full seed position up to 13 threads and
    by 128 MiB at 16.
"""

from __future__ import annotations

# This module imports nothing heavy: `dogflow run` reads it before it refuses bad input (<= 0.5 s), and
# the engine (numpy, scipy) is imported only where it runs. tests/test_params.py checks MODES == dog.MODES.

FILTER = "dog"
SEED_SIGMA_SMALL = 50 / 2.35
SEED_SIGMA_LARGE = 200 / 2.35
TRUNCATE = 4.0
MODE = "nearest"
MODES = ("nearest", "reflect", "mirror", "constant", "wrap")  # scipy.ndimage edge modes the engine takes
OUTPUT_DTYPES = ("float32", "float16", "uint16")
OUTPUT_DTYPE = "float32"
CLUSTER = "local"

PLAN_THREADS = 16

RETRIES = 2
RETRY_DELAY_SECONDS = 10.0
ALLOWED_FAILURES = 2

# The Dask settings a run's cluster starts with, in the flow's process (a profile's ``dask_config`` wins).
DASK_CONFIG = {
    "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
    # Dask's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its worker; an explicit trim threshold turns off
    # glibc's dynamic mmap threshold, so every large temporary becomes a fresh mmap with fresh page faults
    # (a position measured 21 % slower). None = not exported.
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # one task per position and never more tasks than free slots are useful: nothing to steal, no 100 ms poll
    "distributed.scheduler.work-stealing": False,
    # tasks of seconds to minutes: no statistical profiler sampling the running task every 10 ms, and
    # event-loop health checks and system monitoring at a slower pace (orchestration CPU while tasks run)
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
    # each nanny (in the flow's process, for the local cluster) reads its worker's memory twice a second, not
    # ten times: the memory plan keeps a position well below the terminate threshold (flow CPU 2.4 -> 1.7 %)
    "distributed.worker.memory.monitor-interval": "500ms",
    # a worker imports the task's module (Prefect with it) when it starts, not when its first position arrives
    "distributed.worker.preload": ["tasks.position"],
}


def threads_per_task(slots: int = 1) -> int:
    """Engine threads of one task when ``slots`` tasks share this process's CPUs: ``max(1, cpus // slots)``."""
    from tasks import dog

    return max(1, dog.default_threads() // max(1, int(slots)))
