"""dogflow on the live single-node Son of Grid Engine of ``infra/sge/sge.sh`` (Debian's gridengine 8.1.9).

Every test submits real ``qsub`` jobs: worker jobs of dask-jobqueue's ``SGECluster`` (through dogflow's
profile, TLS on), and a whole ``dogflow run --cluster <sge profile>``. A background thread polls
``qstat -xml`` during each run; the job ids it saw are compared with the jobs whose logs show a worker
registered to the run's scheduler.

Skipped (with the reason) when SGE is not running; ``DOGFLOW_REQUIRE_SERVICES=1`` turns that skip into a
failure. Start it with ``bash infra/sge/sge.sh start``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import ROOT, assert_output_exact, run_cli
from flows import clusters
from flows.clusters.base import import_class
from flows.sample import make_sample
from prefect_services import require

pytestmark = [pytest.mark.sge]

PROFILE = Path(__file__).resolve().parent / "profiles" / "sge-test.yaml"  # 2 jobs, job name dogflow-sge
JOB_NAME = "dogflow-sge"
SGE_SH = ROOT / "infra" / "sge" / "sge.sh"


@pytest.fixture(scope="module", autouse=True)
def live_sge():
    if shutil.which("qsub") is None or shutil.which("qstat") is None:
        require(False, "SGE client commands (qsub, qstat) are not installed; run `bash infra/sge/sge.sh start`")
    r = subprocess.run(["bash", str(SGE_SH), "status"], capture_output=True, text=True, timeout=60)
    require(r.returncode == 0, f"SGE's all.q does not accept jobs; start it with `bash infra/sge/sge.sh start`:\n"
                               f"{r.stdout[-1000:]}{r.stderr[-1000:]}")
    env = subprocess.run(["bash", str(SGE_SH), "env"], capture_output=True, text=True, timeout=30).stdout
    for name, value in re.findall(r"(SGE_\w+)=(\S+)", env):
        os.environ.setdefault(name, value)


def qstat_jobs(name: str) -> dict[str, str]:
    """{job id: state} of every job of any user named ``name`` (qstat -xml: names are not cut there)."""
    out = subprocess.run(["qstat", "-u", "*", "-xml"], capture_output=True, text=True, timeout=15).stdout
    jobs = {}
    for job in ET.fromstring(out).iter("job_list") if out.strip() else []:
        if job.findtext("JB_name") == name:
            jobs[job.findtext("JB_job_number")] = job.findtext("state") or ""
    return jobs


class QstatWatch:
    """Polls qstat in a thread; the job ids it saw. On exit, deletes the jobs it saw that are still there."""

    def __init__(self, name: str = JOB_NAME, interval: float = 0.3):
        self.name, self.interval = name, interval
        self.snapshots: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.snapshots.append(qstat_jobs(self.name))
            except Exception:  # a slow qstat must not kill the watcher
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=20)
        left = sorted(set(qstat_jobs(self.name)) & self.seen)
        if left:
            subprocess.run(["qdel", *left], capture_output=True, timeout=30)

    @property
    def seen(self) -> set[str]:
        return {j for snap in self.snapshots for j in snap}

    def wait_empty(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        jobs = {j: s for j, s in qstat_jobs(self.name).items() if j in self.seen}
        while jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = {j: s for j, s in qstat_jobs(self.name).items() if j in self.seen}
        return jobs


def _log_dir() -> Path:
    return Path(clusters.load_profile(str(PROFILE)).kwargs["log_directory"])


@pytest.mark.timeout(180)
def test_sgecluster_worker_job_starts_in_seconds():
    """The profile's SGECluster: a worker job of all.q registers over TLS within seconds and runs a task."""
    from distributed import Client

    prof = clusters.load_profile(str(PROFILE))
    args = prof.runner_arguments()
    assert args["cluster_class"] == "flows.clusters.keeper.SGECluster"
    cls = import_class(args["cluster_class"])
    prof.prepare()
    with QstatWatch() as watch:
        t0 = time.monotonic()
        with cls(**{**args["cluster_kwargs"], "n_workers": 1}) as cluster:
            script = cluster.job_script()
            assert f"#$ -N {JOB_NAME}" in script and "#$ -q all.q" in script and "--protocol tls://" in script, script
            with Client(cluster, security=cluster.security, timeout=30) as client:
                client.wait_for_workers(1, timeout=120)
                started = time.monotonic() - t0
                print(f"SGE worker job connected {started:.1f} s after the cluster started")
                job = client.run(lambda: os.environ.get("JOB_ID"))
                assert set(job.values()) <= watch.seen and all(job.values()), (job, watch.seen)
                assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42
        assert not watch.wait_empty(30), "the worker job was left in the queue"
    assert started < 60, f"the worker job took {started:.0f} s to connect"


@pytest.mark.timeout(300)
def test_dogflow_run_on_sge_jobs_is_exact(tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make_sample(inp, positions=4, channels=2, shape=(8, 48, 48), blobs=6, seed=8)
    with QstatWatch() as watch:
        before = set(qstat_jobs(JOB_NAME))
        r = run_cli("run", inp, out, "--channel", 1, "--sigma-small", "1", "--sigma-large", "3", "--cluster", PROFILE,
                    "--no-progress", "--retry-delay", "0", timeout=240)
        after = watch.wait_empty(30)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 position(s) filtered" in r.stdout
    assert_output_exact(out, inp, [1.0] * 3, [3.0] * 3, channel=1)
    jobs = watch.seen - before
    assert 1 <= len(jobs) <= 2, f"expected the profile's 2 worker jobs, qstat showed {jobs}"
    for job in jobs:  # each job's worker registered to the run's TLS scheduler
        log = (_log_dir() / f"{JOB_NAME}.o{job}").read_text()
        assert re.search(r"Registered to:\s+tls://127\.0\.0\.1:", log), f"job {job}:\n{log[-2000:]}"
    assert not after, f"worker jobs left in the queue after the run: {after}"


def test_dogflow_plan_prints_the_sge_job_script(tmp_path):
    inp = tmp_path / "in.zarr"
    make_sample(inp, positions=3, channels=1, shape=(8, 32, 32), blobs=4, seed=2)
    r = run_cli("plan", inp, "--cluster", PROFILE, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "profile: " in r.stdout and "(sge)" in r.stdout and "workers: 2 (fixed), jobs: 2" in r.stdout, r.stdout
    script = r.stdout[r.stdout.index("#!/usr/bin/env bash"):]
    for line in (f"#$ -N {JOB_NAME}", "#$ -q all.q", "#$ -l h_rt=00:10:00", "#$ -o /tmp/dogflow-sge-test/logs/",
                 "#$ -j y", "export DASK_INTERNAL_INHERIT_CONFIG=", "unset MALLOC_TRIM_THRESHOLD_",
                 "--nthreads 1 --memory-limit 1.00GiB", "--interface lo"):
        assert line in script, (line, script)
    # the rendered script is one qsub accepts: submitted on hold and deleted again, it is a valid job
    f = tmp_path / "job.sh"
    f.write_text(script.replace("tls://SCHEDULER-ADDRESS:8786", "tls://127.0.0.1:9"))
    sub = subprocess.run(["qsub", "-h", str(f)], capture_output=True, text=True, timeout=30)
    assert sub.returncode == 0 and "has been submitted" in sub.stdout, sub.stdout + sub.stderr
    job = re.search(r"Your job (\d+)", sub.stdout).group(1)
    subprocess.run(["qdel", job], capture_output=True, timeout=30)
