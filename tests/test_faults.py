"""Faults, each caused for real: dead workers, a killed flow process, corrupt and missing chunks,
colliding runs, a failing disk write. No voxel may be lost or corrupted, and the user must see what happened."""

from __future__ import annotations

from pathlib import Path

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
import zarr

from conftest import (assert_output_exact, cli_process, run_cli, run_in_thread, task_runs_of, volume_dataset,
                      wait_for_task_run_state)
from tasks.lock import LOCK_KEY
from tasks.output import Output, level_path

SS, SL = [1.0, 2.0, 2.0], [2.0, 5.0, 5.0]


def _running_positions():
    """Run on a Dask worker: its pid and the positions whose process_position frame is live right now (one
    round trip, so the pid cannot be asked for after the position has ended)."""
    found = []
    for frame in sys._current_frames().values():
        f = frame
        while f is not None:
            if f.f_code.co_name == "process_position":
                found.append(f.f_locals.get("position"))
            f = f.f_back
    return os.getpid(), found


class WorkerKiller(threading.Thread):
    """SIGKILLs the worker process that is filtering ``position``, ``times`` times (None: every time).
    ``seen`` keeps every position it saw running, so a miss says what the killer did see."""

    def __init__(self, client, position, times=1):
        super().__init__(daemon=True)
        self.client, self.position, self.times = client, position, times
        self.kills: list[int] = []
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and (self.times is None or len(self.kills) < self.times):
            try:  # a worker that is dying or restarting must not blind the killer to the others
                running = self.client.run(_running_positions, on_error="return")
            except Exception:
                time.sleep(0.05)
                continue
            for reply in running.values():
                if not isinstance(reply, tuple):
                    continue
                pid, positions = reply
                self.seen.update(positions)
                if self.position in positions and pid not in self.kills:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # already gone: not a kill of ours
                        continue
                    self.kills.append(pid)
            time.sleep(0.005)


@pytest.fixture
def cluster(tmp_path):
    """A real LocalCluster with nannies (worker processes), allowed-failures=1; the flow joins it by address."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cl = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cl)
        profile = tmp_path / "join.yaml"
        profile.write_text(yaml.safe_dump({"cluster_type": "address", "address": cl.scheduler_address}))
        yield client, profile
        client.close()
        cl.close()


def _flow(inp, out, **kw):
    from flows.dog_filter import dog_filter

    args = dict(input_path=str(inp), output_path=str(out), channels=0, sigma_small=SS, sigma_large=SL, retries=0,
                retry_delay_seconds=0)
    args.update(kw)
    return dog_filter(**args, return_state=True)


def test_worker_sigkilled_mid_position_is_recomputed(prefect_api, cluster, tmp_path):
    client, profile = cluster
    volume_dataset(tmp_path / "in.zarr", shape=(96, 320, 320))  # each position lasts long enough to be caught
    killer = WorkerKiller(client, position=1, times=1)
    killer.start()
    state = _flow(tmp_path / "in.zarr", tmp_path / "out.zarr", cluster_file=str(profile))
    killer.stop.set()
    assert len(killer.kills) == 1, f"the worker filtering position 1 should have been killed once; seen {killer.seen}"
    assert state.is_completed(), state
    assert_output_exact(tmp_path / "out.zarr", tmp_path / "in.zarr", SS, SL)


def test_worker_dying_on_every_attempt_fails_that_position_clearly(prefect_api, cluster, tmp_path):
    client, profile = cluster
    volume_dataset(tmp_path / "in.zarr", shape=(96, 320, 320))  # each attempt lasts long enough to be caught
    killer = WorkerKiller(client, position=2, times=None)
    killer.start()
    state = _flow(tmp_path / "in.zarr", tmp_path / "out.zarr", cluster_file=str(profile))
    killer.stop.set()
    assert len(killer.kills) == 2  # allowed-failures=1: the second death is final
    assert state.is_failed()
    msg = str(state.result(raise_on_failure=False))
    assert "1 position(s) failed: 2" in msg
    assert_output_exact(tmp_path / "out.zarr", tmp_path / "in.zarr", SS, SL, positions=[0, 1, 3])
    assert Output(tmp_path / "out.zarr").markers.read(2, 0) is None
    run_log = next(Output(tmp_path / "out.zarr").log_path("x").parent.glob("*-local.log")).read_text()
    assert "position 2 failed for good" in run_log and "log lines of worker" in run_log  # workers' logs copied in
    # the task run is Failed with a readable reason, not stuck in Running: this run's own position-2 task run
    # (the session's server holds other tests' position-2 runs too), read until the server has recorded it
    failed = wait_for_task_run_state("position-2", ("Failed",), timeout=30.0, flow_run_id=state.state_details.flow_run_id)
    assert failed is not None and failed.type.value == "FAILED", \
        f"position 2's task run should be Failed; the run's task runs: {task_runs_of(state.state_details.flow_run_id)}"
    assert "died 2 times" in failed.message and "position 2" in failed.message


def _task_run_when(client, task_run_id, state_name, timeout=30.0):
    """The task run once the server's state history of it holds ``state_name`` (events are recorded later)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state_name in [st.name for st in client.read_task_run_states(task_run_id)]:
            return client.read_task_run(task_run_id)
        time.sleep(0.1)
    raise AssertionError(f"the server never recorded {state_name} for task run {task_run_id}")


def test_a_task_run_whose_worker_died_early_is_failed_under_its_own_name(prefect_api):
    """A worker sends its task run's states as events, in the background; one killed early leaves the server a
    provisional name, or nothing. The flow's own record must win, and events that arrive after it must not undo it."""
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import TaskRun
    from prefect.events.worker import EventsWorker
    from prefect.states import Pending, Running
    from prefect.utilities.engine import emit_task_run_state_change_event

    from flows.dog_filter import filter_positions
    from flows.outcomes import mark_failed
    from tasks.position import filter_position

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(filter_positions, parameters={})
        # never heard of: the worker died before its first event left
        lost = uuid4()
        mark_failed(lost, 7, "position 7: the Dask worker running it died 2 times", flow_run.id)
        run = client.read_task_run(lost)
        assert (run.name, run.state.name, run.flow_run_id) == ("position-7", "Failed", flow_run.id)
        assert run.state.message == "position 7: the Dask worker running it died 2 times"

        # only the first event arrived (the provisional name); the Running one is sent after the flow's record
        provisional = TaskRun(id=uuid4(), name="dog-position-3f2", flow_run_id=flow_run.id,
                              task_key=filter_position.task_key, dynamic_key=str(uuid4()))
        pending, running = Pending(), Running()
        emit_task_run_state_change_event(provisional, None, pending)
        EventsWorker.drain_all()
        assert _task_run_when(client, provisional.id, "Pending").name == "dog-position-3f2"
        mark_failed(provisional.id, 3, "position 3: the Dask worker running it died 2 times", flow_run.id)
        late = provisional.model_copy(update={"name": "position-3"})
        emit_task_run_state_change_event(late, pending, running)
        EventsWorker.drain_all()
        run = _task_run_when(client, provisional.id, "Running")
        assert (run.name, run.state.name) == ("position-3", "Failed"), (run.name, run.state.name)
        assert run.state.message == "position 3: the Dask worker running it died 2 times"


def test_corrupt_and_missing_chunks_are_named_and_repaired(prefect_api, tmp_path):
    from flows.sample import make_sample

    inp = tmp_path / "in.zarr"
    arr = make_sample(inp, positions=4, channels=1, shape=(8, 32, 32), chunks=(4, 16, 16), blobs=5)
    corrupt = inp / arr.metadata.encode_chunk_key((1, 0, 1, 0, 1))
    missing = inp / arr.metadata.encode_chunk_key((3, 0, 0, 1, 0))
    good_corrupt, good_missing = corrupt.read_bytes(), missing.read_bytes()
    corrupt.write_bytes(b"\xff" * 40)
    missing.unlink()
    out = tmp_path / "out.zarr"
    state = _flow(inp, out, sigma_small=1.0, sigma_large=2.0)
    assert state.is_failed()
    assert "2 position(s) failed: 1, 3" in str(state.result(raise_on_failure=False))
    summary = _latest_artifact("dog-filter-summary")
    assert "input chunk c/1/0/1/0/1" in summary and "cannot be read" in summary
    assert "input chunk c/3/0/0/1/0 is missing" in summary
    assert Output(out).markers.read(0, 0) and Output(out).markers.read(2, 0)
    corrupt.write_bytes(good_corrupt)
    missing.write_bytes(good_missing)
    state = _flow(inp, out, sigma_small=1.0, sigma_large=2.0)
    summary = state.result()
    assert sorted(r["position"] for r in summary["positions"]) == [1, 3] and summary["skipped"] == 2
    assert_output_exact(out, inp, 1.0, 2.0)


def test_failed_disk_write_is_not_marked_and_retry_rewrites(prefect_api, tmp_path):
    """A real write failure inside the output store: a file where position 1's chunk folder must go."""
    from flows.sample import make_sample

    inp = tmp_path / "in.zarr"
    make_sample(inp, positions=2, channels=1, shape=(8, 32, 32), blobs=5)
    out = tmp_path / "out.zarr"
    assert _flow(inp, out, positions="0", sigma_small=1.0, sigma_large=2.0).is_completed()
    blocker = out / level_path(1, 0) / "c"  # where position 1's level-0 chunks must go
    blocker.write_text("not a directory")
    t, result = run_in_thread(
        lambda: _flow(inp, out, positions="1", sigma_small=1.0, sigma_large=2.0, retries=2, retry_delay_seconds=5))
    seen = wait_for_task_run_state("position-1", ("AwaitingRetry",))
    assert seen, "the failed write should put the task in AwaitingRetry"
    assert Output(out).markers.read(1, 0) is None, "a position whose write failed must not be marked complete"
    blocker.unlink()
    t.join(120)
    assert result["value"].is_completed(), result["value"]
    assert_output_exact(out, inp, 1.0, 2.0, positions=[1])


def _latest_artifact(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                 sort=ArtifactSort.CREATED_DESC, limit=1)
    assert arts, f"no artifact {key}"
    return arts[0].data


def test_artifacts_progress_table_preview(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    state = _flow(sample, out, channels=1)
    assert state.is_completed()
    table = _latest_artifact("dog-filter-summary")
    assert "| position | channels | status | seconds | host | SLURM job | min | max | mean |" in table
    for p in range(3):
        assert f"| {p} | 1 | completed |" in table
    assert "processed: **3**" in table
    assert float(_latest_artifact("dog-filter-progress")) == pytest.approx(100.0)
    preview = _latest_artifact("dog-filter-preview")
    b64 = preview.split("data:image/png;base64,")[1].split(")")[0]
    png = base64.b64decode(b64)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (Path(out) / Output.preview_key(1, 1)).read_bytes() == png
    assert re.fullmatch(r"\[Dask dashboard\]\(http://[^)]+/status\)", _latest_artifact("dask-dashboard"))
    logs = list(Output(out).log_path("x").parent.glob("*-local.log"))
    assert logs and "dog-filter summary: 3 processed" in logs[0].read_text()


def _slow_profile(tmp_path):
    p = tmp_path / "one.yaml"
    p.write_text(yaml.safe_dump({"cluster_type": "local", "n_workers": 1, "threads_per_worker": 1, "processes": True}))
    return p


def test_flow_process_killed_then_rerun_keeps_finished_positions(tmp_path):
    volume_dataset(tmp_path / "in.zarr", positions=8, shape=(48, 256, 256))
    out = tmp_path / "out.zarr"
    args = ["run", tmp_path / "in.zarr", out, "--sigma-small", "1,2,2", "--sigma-large", "2,5,5",
            "--cluster", _slow_profile(tmp_path), "--no-progress"]
    proc = cli_process(*args, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and len(Output(out).markers.marked()) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow process, its Dask workers and its temporary API: all gone
    proc.wait()
    done = {p: Output(out).markers.read(p, c)["finished"] for p, c in Output(out).markers.marked()}
    assert 2 <= len(done) < 8, done
    assert (Path(out) / LOCK_KEY).exists()  # left behind by the dead run: stale, not a blocker
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{8 - len(done)} position(s) filtered, {len(done)} already complete" in res.stdout
    for p, finished in done.items():
        assert Output(out).markers.read(p, 0)["finished"] == finished  # not recomputed
    assert_output_exact(out, tmp_path / "in.zarr", SS, SL)


def test_second_run_on_same_output_is_refused_at_once(prefect_api, tmp_path):
    volume_dataset(tmp_path / "in.zarr", positions=6)
    out = tmp_path / "out.zarr"
    args = ["run", tmp_path / "in.zarr", out, "--sigma-small", "1,2,2", "--sigma-large", "2,5,5",
            "--cluster", _slow_profile(tmp_path), "--no-progress"]
    first = cli_process(*args, stderr=subprocess.STDOUT)
    lock = (Path(out) / LOCK_KEY)
    deadline = time.time() + 120
    while time.time() < deadline and not lock.exists():
        time.sleep(0.05)
    assert lock.exists()
    second = run_cli(*args)
    assert second.returncode == 2
    assert second.stderr.strip().startswith("dogflow: error: another dogflow run is writing to this output")
    # the flow itself (e.g. a deployment run) refuses too
    state = _flow(tmp_path / "in.zarr", out)
    assert state.is_failed() and "another dogflow run" in str(state.result(raise_on_failure=False))
    assert first.wait(300) == 0, first.stdout.read()[-2000:]
    assert not lock.exists()
    assert_output_exact(out, tmp_path / "in.zarr", SS, SL)


def test_status_on_partially_complete_store(prefect_api, sample, tmp_path):
    out = tmp_path / "out.zarr"
    assert _flow(sample, out, channels=1, positions="0-1").is_completed()
    src = zarr.open_array(str(sample), mode="r+")
    time.sleep(0.01)
    src[1, 1, 0, 0, 0] = 12345  # position 1's input changes after it was filtered
    res = run_cli("status", out)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    row = {int(l.split()[0]): l for l in lines if re.match(r"^\s*\d+\s+1\s+(complete|missing|stale)", l)}
    assert "complete" in row[0] and "σ 1,2,2 / 2,5,5" in row[0]  # 4 significant digits, as typed
    assert "stale (input changed)" in row[1]
    assert row[2].split()[2] == "missing"
    assert "1 complete, 1 missing, 1 stale (of 3)" in res.stdout
    assert "sigma_large: 2,5,5" in res.stdout
