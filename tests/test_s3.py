"""Datasets on an object store: ``s3://`` input and output against a real S3-protocol server (moto's server
mode on 127.0.0.1), end to end through ``dogflow run`` and LocalCluster workers that reach the data only
through S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_output_exact, cli_process, reference_dog, run_cli, tolerance
from datasets import make_bioformats2raw, make_ome_image
from flows.sample import make_sample
from prefect_services import free_port
from tasks.inputs import open_dataset
from tasks.lock import LOCK_KEY, RunLock, RunLockedError
from tasks.output import Output
from tasks.s3 import S3Storage

SS, SL = (1.0, 2.0, 2.0), (2.0, 4.0, 4.0)
SIGMA = ["--sigma-small", "1,2,2", "--sigma-large", "2,4,4"]
pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto) on a free loopback port; the AWS_* variables point every process
    started from here (the CLI, its Dask workers) at it. No credential is real."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "dogflow-test", "AWS_SECRET_ACCESS_KEY": "dogflow-test-secret",
           "AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    urllib.request.urlopen(urllib.request.Request(f"{url}/data", method="PUT")).read()
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


def upload(local: Path, url: str) -> str:
    """Copy a local Zarr tree into the bucket, object by object."""
    st = S3Storage(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            st.write_atomic(f.relative_to(local).as_posix(), f.read_bytes())
    return url


def _keys(url: str) -> dict[str, str]:
    """Every object under ``url`` and its ETag."""
    import obstore as obs

    st = S3Storage(url)
    return {m["path"]: m["e_tag"] for page in obs.list(st.store, None) for m in page}


def test_storage_primitives_are_conditional(s3_server):
    st = S3Storage("s3://data/prims")
    assert st.create_exclusive("a.json", "1") and not st.create_exclusive("a.json", "2")
    assert st.read_bytes("a.json") == b"1"
    v1 = st.stat("a.json").version
    v2 = st.refresh("a.json", "3", v1)
    assert v2 and v2 != v1 and st.refresh("a.json", "4", v1) is None  # a stale ETag is refused
    assert st.replace_if("a.json", "5", v2) and not st.replace_if("a.json", "6", v2)
    assert st.read_bytes("a.json") == b"5"
    st.write_atomic("d/x/1", b"x")
    st.write_atomic("d/y", b"y")
    assert st.list("d") == ["x", "y"] and st.exists("d/y") and not st.exists("d/z")
    st.delete_tree("d")
    assert st.list("d") == [] and st.read_bytes("d/y") is None


def test_lock_on_s3_refuses_a_second_run_and_one_taker_wins_a_stale_lock(s3_server):
    out = "s3://data/locked.zarr"
    first = RunLock(out, run_id="a", run_name="first-run").acquire()
    with pytest.raises(RunLockedError, match=r"run first-run \(pid"):
        RunLock(out, run_id="b").acquire()
    first.release()
    assert not S3Storage(out).exists(LOCK_KEY)
    # a lock left by a dead run on another host is stale past its lease; two takers: exactly one wins
    dead = json.dumps({"host": "elsewhere", "pid": 1, "run_id": "dead", "started": 0})
    S3Storage(out).write_atomic(LOCK_KEY, dead)
    a, b = RunLock(out, run_id="a", stale_after=0.0), RunLock(out, run_id="b", stale_after=0.0)
    stale = S3Storage(out).stat(LOCK_KEY).version
    won = [t.storage.replace_if(LOCK_KEY, json.dumps({"host": "elsewhere", "pid": 2, "run_id": t.run_id}), stale)
           for t in (a, b)]
    assert won == [True, False] and json.loads(S3Storage(out).read_bytes(LOCK_KEY))["run_id"] == "a"
    taken = RunLock(out, run_id="c", stale_after=0.0).acquire()  # and a stale lock is taken over by acquire
    assert json.loads(S3Storage(out).read_bytes(LOCK_KEY))["run_id"] == "c"
    taken.heartbeat()
    assert not taken.lost
    taken.release()


@pytest.mark.parametrize("layout", ["array", "ome-zarr", "bioformats2raw", "dogflow"])
def test_every_input_layout_reads_from_s3(s3_server, tmp_path, layout):
    local = tmp_path / "in.zarr"
    if layout == "array":
        make_sample(local, positions=2, channels=2, shape=(6, 20, 18), chunks=(3, 10, 9), blobs=3)
    elif layout == "ome-zarr":
        make_ome_image(local, channels=2, shape=(6, 20, 18), chunks=(3, 10, 9))
    elif layout == "bioformats2raw":
        make_bioformats2raw(local, positions=2, channels=2, shape=(6, 20, 18), chunks=(3, 10, 9))
    else:
        src = tmp_path / "src.zarr"
        make_sample(src, positions=2, channels=2, shape=(6, 20, 18), chunks=(3, 10, 9), blobs=3)
        assert run_cli("run", src, local, *SIGMA, "--channels", "all", "--no-progress").returncode == 0
    url = upload(local, f"s3://data/layouts/{layout}.zarr")
    here, there = open_dataset(local), open_dataset(url)
    assert there.layout == here.layout == layout and there.shape == here.shape
    for p in range(here.n_positions):
        for c in range(here.n_channels):
            np.testing.assert_array_equal(there.read(p, c), here.read(p, c))
            assert len(there.stored_objects(p, c)) == len(here.stored_objects(p, c))
            assert there.missing_objects(p, c) == []
    assert there.fingerprint(0, 0) != there.fingerprint(here.n_positions - 1, 1)


def test_run_on_s3_is_exact_resumes_and_recomputes_only_a_changed_position(s3_server, tmp_path):
    local = tmp_path / "in.zarr"
    make_sample(local, positions=3, channels=2, shape=(8, 32, 30), chunks=(4, 16, 16), blobs=5, seed=4)
    inp, out = upload(local, "s3://data/run/in.zarr"), "s3://data/run/out.zarr"
    res = run_cli("run", inp, out, *SIGMA, "--channels", "all", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    for c in (0, 1):
        assert_output_exact(out, inp, SS, SL, channel=c)
    o = Output(out)
    assert o.read_preview(2, 1) is not None and S3Storage(out).list("dogflow/logs")  # previews and the run log
    assert "AWS_SECRET" not in json.dumps(o.provenance()) and "dogflow-test-secret" not in json.dumps(o.provenance())
    before = {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()}
    again = run_cli("run", inp, out, *SIGMA, "--channels", "all", "--no-progress")
    assert again.returncode == 0 and "0 position(s) filtered, 3 already complete" in again.stdout, again.stdout
    assert {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()} == before
    # one chunk object of position 1, channel 0 rewritten: only that (position, channel) is stale (ETag changed)
    src = zarr.open_array(S3Storage(inp).zarr_store(), mode="r+")
    src[1, 0, 0, 0, 0] = 4321
    st = run_cli("status", out)
    assert st.stdout.count("stale (input changed)") == 1 and "5 complete, 0 missing, 1 stale" in st.stdout, st.stdout
    third = run_cli("run", inp, out, *SIGMA, "--channels", "all", "--no-progress")
    assert third.returncode == 0, third.stderr[-3000:]
    after = {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()}
    assert [pc for pc in before if before[pc] != after[pc]] == [(1, 0)]
    assert_output_exact(out, inp, SS, SL, channel=0)


def test_local_input_to_s3_output_and_back(s3_server, tmp_path):
    local = tmp_path / "in.zarr"
    make_sample(local, positions=2, channels=1, shape=(6, 24, 20), chunks=(3, 12, 10), blobs=3, seed=5)
    out = "s3://data/mixed/out.zarr"
    assert run_cli("run", local, out, *SIGMA, "--no-progress").returncode == 0
    assert_output_exact(out, local, SS, SL)
    back = tmp_path / "back.zarr"
    res = run_cli("run", out, back, "--sigma-small", "0.5", "--sigma-large", "1", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    src = open_dataset(out)
    ref = reference_dog(src.read(1, 0), 0.5, 1.0)
    assert float(np.max(np.abs(Output(back).read(1, 0) - ref))) <= tolerance(src.read(1, 0))


def test_bad_s3_locations_are_one_line_and_write_nothing(s3_server, tmp_path):
    local = tmp_path / "in.zarr"
    make_sample(local, positions=1, channels=1, shape=(4, 16, 16), blobs=2)
    inp = upload(local, "s3://data/bad/in.zarr")
    cases = [
        (["s3://data/bad/missing.zarr", "s3://data/bad/o1.zarr"], "input not found: s3://data/bad/missing.zarr"),
        (["s3://nobucket/in.zarr", "s3://data/bad/o2.zarr"], "s3://nobucket/in.zarr: bucket 'nobucket' does not exist"),
        ([inp, "s3://nobucket/out.zarr"], "bucket 'nobucket' does not exist"),
        ([inp, f"{inp}/inside.zarr"], "must not be the input or lie inside it"),
    ]
    before = _keys("s3://data/bad")
    for args, expect in cases:
        res = run_cli("run", *args, *SIGMA)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and expect in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
    unreachable = run_cli("run", inp, "s3://data/bad/o3.zarr", *SIGMA, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 2 and "cannot reach the endpoint http://127.0.0.1:9" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert _keys("s3://data/bad") == before  # nothing written (the writability probe is removed again)


def test_a_second_run_on_a_locked_s3_output_is_refused_at_once(s3_server, tmp_path):
    local = tmp_path / "in.zarr"
    make_sample(local, positions=1, channels=1, shape=(4, 16, 16), blobs=2)
    inp, out = upload(local, "s3://data/busy/in.zarr"), "s3://data/busy/out.zarr"
    code = (f"from tasks.lock import RunLock; import time; RunLock({out!r}, run_name='holder-run').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run_cli("run", inp, out, *SIGMA)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "another dogflow run is writing to this output: flow run 'holder-run' (no run id) on host" in lines[0]
        assert not Output(out).exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()


def test_kill_mid_run_then_rerun_keeps_complete_positions(s3_server, tmp_path):
    from conftest import volume_dataset

    local = tmp_path / "in.zarr"
    volume_dataset(local, positions=8, shape=(48, 256, 256))
    inp, out = upload(local, "s3://data/kill/in.zarr"), "s3://data/kill/out.zarr"
    profile = tmp_path / "one.yaml"
    profile.write_text("cluster_type: local\nn_workers: 1\nthreads_per_worker: 1\nprocesses: true\n")
    args = ["run", inp, out, *SIGMA, "--cluster", profile, "--no-progress"]
    first = cli_process(*args, stderr=subprocess.STDOUT)
    o = Output(out)
    deadline = time.time() + 240
    while time.time() < deadline and len(o.markers.marked()) < 2:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the flow, its workers and its temporary API: all gone
    first.wait(30)
    done = {pc: o.markers.read(*pc)["finished"] for pc in o.markers.marked()}
    assert 2 <= len(done) < 8, done
    assert S3Storage(out).exists(LOCK_KEY)  # left behind by the dead run: stale (its pid is gone), taken over
    rerun = run_cli(*args, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for pc, finished in done.items():
        assert o.markers.read(*pc)["finished"] == finished  # complete positions kept
    assert_output_exact(out, inp, SS, SL)
    assert not S3Storage(out).exists(LOCK_KEY)


def test_cluster_reached_by_address_filters_s3_data(s3_server, tmp_path):
    """What a Kubernetes or Coiled user has: a running Dask cluster, reached by its address, whose workers see
    no filesystem of the flow's machine; the data are on S3 and each worker reads its own AWS_* environment."""
    from distributed import Client, LocalCluster

    local = tmp_path / "in.zarr"
    make_sample(local, positions=2, channels=1, shape=(6, 24, 20), chunks=(3, 12, 10), blobs=3, seed=8)
    inp, out = upload(local, "s3://data/address/in.zarr"), "s3://data/address/out.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        profile = tmp_path / "cloud.yaml"
        profile.write_text(f"cluster_type: address\naddress: {cluster.scheduler_address}\n")
        res = run_cli("run", inp, out, *SIGMA, "--cluster", profile, "--no-progress")
        assert res.returncode == 0, res.stderr[-3000:]
        with Client(cluster) as client:
            worker_pids = set(client.run(os.getpid).values())
    assert_output_exact(out, inp, SS, SL)
    assert {Output(out).markers.read(p, 0)["pid"] for p in range(2)} <= worker_pids  # that cluster's workers ran them
