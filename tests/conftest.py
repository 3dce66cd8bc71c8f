"""Shared fixtures: a real Prefect API (test harness), sample datasets on disk, the float64 reference."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def reference_gaussian(volume, sigma, truncate=4.0, mode="nearest"):
    """Whole-volume float64 scipy reference of one Gaussian."""
    return ndimage.gaussian_filter(np.asarray(volume, dtype=np.float64), sigma, truncate=truncate, mode=mode)


def reference_dog(volume, sigma_small, sigma_large, truncate=4.0, mode="nearest"):
    """Whole-volume float64 scipy reference of the DoG (the exactness standard of every test)."""
    return (reference_gaussian(volume, sigma_small, truncate, mode)
            - reference_gaussian(volume, sigma_large, truncate, mode))


def tolerance(volume) -> float:
    return 1e-3 + 1e-6 * float(np.max(np.abs(np.asarray(volume, dtype=np.float64)))) if np.size(volume) else 1e-3


def assert_exact(result, volume, sigma_small, sigma_large, truncate=4.0, mode="nearest"):
    ref = reference_dog(volume, sigma_small, sigma_large, truncate, mode)
    err = float(np.max(np.abs(np.asarray(result, dtype=np.float64) - ref)))
    assert result.shape == ref.shape
    assert err <= tolerance(volume), f"max error {err} > {tolerance(volume)}"


def assert_output_exact(out, inp, sigma_small, sigma_large, channel=0, positions=None, truncate=4.0, mode="nearest",
                        marked=True):
    """Every selected position of the output ``out`` (all of them by default) has ``channel`` marked complete
    (unless ``marked=False``) and equal to the float64 scipy DoG of that position and channel of ``inp``."""
    from tasks.output import Output
    from tasks.inputs import open_dataset

    src = open_dataset(inp)
    for p in range(src.n_positions) if positions is None else positions:
        if marked:
            assert Output(out).markers.read(p, channel) is not None, f"position {p} channel {channel} has no marker"
        assert_exact(Output(out).read(p, channel), src.read(p, channel), sigma_small, sigma_large, truncate, mode)


def is_populated_mapping(a) -> bool:
    """Is ``a`` a view of an anonymous mapping (``tasks.buffers.empty``), not numpy-allocated memory?"""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, mmap.mmap) or (isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap))


def volume_dataset(path, positions=4, shape=(48, 256, 256), seed=0, chunks=(1, 1, 24, 128, 128)):
    """A 5-D (positions, 1, z, y, x) uint16 Zarr array of random volumes in [50, 2000) on disk."""
    import zarr

    from datasets import random_volume

    arr = zarr.create_array(str(path), shape=(positions, 1, *shape), chunks=chunks, dtype="uint16")
    for p in range(positions):
        arr[p, 0] = random_volume(shape, "uint16", seed + p, 50, 2000)
    return arr


@pytest.fixture(scope="session")
def prefect_api():
    """A real (temporary) Prefect API for the whole session, visible to Dask worker processes too."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    old = os.environ.get("PREFECT_API_URL")
    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    if old is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = old


@pytest.fixture
def sample(tmp_path):
    """A small (P=3, C=2, 12, 40, 36) uint16 dataset (zarr v3) with chunks that split z, y and x."""
    from flows.sample import make_sample

    path = tmp_path / "in.zarr"
    make_sample(path, positions=3, channels=2, shape=(12, 40, 36), chunks=(5, 16, 16), blobs=12, seed=1)
    return path


def _in_flow_run(client, flow_run_id):
    """The task-run filter for one flow run and its child flows (the session's server holds every test's runs)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilterFlowRunId

    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return TaskRunFilterFlowRunId(any_=[flow_run_id, *(c.id for c in children)])


def wait_for_task_run_state(task_run_name, state_names, timeout=120.0, flow_run_id=None):
    """Poll the Prefect API until a task run of that name is in one of ``state_names``: that state, or None.

    ``flow_run_id``: only that flow run's task runs and its child flows' (the session's server holds every
    test's runs, several of them with the same task run names)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        deadline = time.time() + timeout
        while time.time() < deadline:
            scope = {} if flow_run_id is None else {"flow_run_id": _in_flow_run(client, flow_run_id)}
            flt = TaskRunFilter(name=TaskRunFilterName(any_=[task_run_name]), **scope)
            for r in client.read_task_runs(task_run_filter=flt):
                if r.state and r.state.name in state_names:
                    return r.state
            time.sleep(0.2)
    return None


def task_runs_of(flow_run_id):
    """(name, state name) of every task run of a flow run and its child flows, sorted: what a failed wait found."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=_in_flow_run(client, flow_run_id)))
    return sorted((r.name, r.state.name if r.state else None) for r in runs)


def run_in_thread(fn):
    """Start ``fn()`` in a thread; returns (thread, result dict filled with 'value')."""
    import threading

    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("value", fn()))
    t.start()
    return t, result


def cli_process(*args, env=None, **popen):
    """Start the real `dogflow` console script (its own temporary Prefect API, own process group)."""
    exe = Path(sys.executable).parent / "dogflow"
    e = dict(os.environ)
    e.pop("PREFECT_API_URL", None)
    e.update(env or {})
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([str(exe), *map(str, args)], text=True, env=e, start_new_session=True, **popen)


def run_cli(*args, env=None, timeout=240):
    """Run the real `dogflow` console script to its end; a CompletedProcess with its stdout and stderr."""
    proc = cli_process(*args, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"dogflow {' '.join(map(str, args))} did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
