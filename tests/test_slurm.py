"""dogflow on the live single-node SLURM of ``infra/slurm/slurm.sh``.

Every test submits real jobs: worker jobs of dask-jobqueue's ``SLURMCluster`` (fixed and
adaptive, TLS on), and a whole run in runner mode (``infra/slurm/dogflow-runner.sbatch``,
``sbatch --wait``). Accounting is off on this SLURM (no ``sacct``), so a background thread
polls ``squeue`` during each run and the job ids it saw are compared with the
``slurm_job_id`` the workers wrote into the position markers.

Skipped (with the reason) when SLURM is not running; ``DOGFLOW_REQUIRE_SERVICES=1`` turns
that skip into a failure. Start it with ``bash infra/slurm/slurm.sh start``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flows import clusters
from flows.clusters.base import import_class
from flows.sample import make_sample
from tasks.output import Output

from conftest import ROOT, assert_output_exact, run_cli

pytestmark = [pytest.mark.slurm]

PROFILES = Path(__file__).resolve().parent / "profiles"
FIXED = PROFILES / "slurm-test.yaml"          # n_workers: 2, job name dogflow-worker
ADAPTIVE = PROFILES / "slurm-adaptive.yaml"   # min_workers 0, max_workers 2, job name dogflow-adapt
BAD_KEY = PROFILES / "slurm-bad-key.yaml"     # unknown key `partition`
SIGMA_SMALL, SIGMA_LARGE = [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]


# --------------------------------------------------------------------------- services


def _slurm_unavailable() -> str | None:
    """Why the live SLURM cannot run jobs, or None if its node accepts jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands (sinfo, sbatch) are not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0:
        return f"sinfo failed (is slurmctld running?): {(out.stderr or out.stdout).strip().splitlines()[:1]}"
    states = {s.strip().rstrip("*~#$@+").lower() for s in out.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no SLURM node accepts jobs (node states: {sorted(states) or 'none'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def live_slurm():
    why = _slurm_unavailable()
    if why:
        msg = f"live SLURM needed: {why}; start it with `bash infra/slurm/slurm.sh start`"
        if os.environ.get("DOGFLOW_REQUIRE_SERVICES") == "1":
            pytest.fail(msg + " (DOGFLOW_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(msg)


class QueueWatch:
    """Polls ``squeue`` in a thread; records every snapshot (jobs of the given names only)."""

    def __init__(self, *names: str, interval: float = 0.3):
        self.names = set(names)
        self.interval = interval
        self.snapshots: list[tuple[float, dict[str, tuple[str, str]]]] = []  # (time, {id: (name, state)})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> dict[str, tuple[str, str]]:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, timeout=15).stdout
        jobs = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[1] in self.names:
                jobs[parts[0]] = (parts[1], parts[2])
        return jobs

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.snapshots.append((time.monotonic(), self.poll()))
            except Exception:  # a slow squeue must not kill the watcher
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=20)
        # Never leave jobs behind (only the ones this watcher saw: other users' jobs are theirs).
        left = sorted(self.poll())
        if left:
            subprocess.run(["scancel", *left], capture_output=True, timeout=30)

    @property
    def seen(self) -> set[str]:
        return {j for _, jobs in self.snapshots for j in jobs}

    @property
    def max_concurrent(self) -> int:
        return max((len(jobs) for _, jobs in self.snapshots), default=0)

    def wait_empty(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        jobs = self.poll()
        while jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = self.poll()
        return jobs


def _cli_run(inp, out, profile, *extra, env=None, timeout=200):
    return run_cli("run", inp, out, "--channel", 1, "--sigma-small", "1", "--sigma-large", "3",
                   "--cluster", profile, "--no-progress", "--retry-delay", "0", *extra, env=env, timeout=timeout)


def _assert_output_exact(inp, out, channel=1, sigma_small=SIGMA_SMALL, sigma_large=SIGMA_LARGE):
    assert_output_exact(out, inp, sigma_small, sigma_large, channel=channel)


def _marker_jobs(out, positions: int, channel: int = 1) -> list[str | None]:
    return [Output(out).markers.read(p, channel).get("slurm_job_id") for p in range(positions)]


def _log_dir(profile: Path) -> Path:
    return Path(clusters.load_profile(str(profile)).kwargs["log_directory"])


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "in.zarr"
    make_sample(path, positions=4, channels=2, shape=(8, 48, 48), blobs=6, seed=3)
    return path


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(240)
def test_run_on_slurm_worker_jobs_with_tls(small, tmp_path):
    out = tmp_path / "out.zarr"
    with QueueWatch("dogflow-worker") as watch:
        before = set(watch.poll())
        r = _cli_run(small, out, FIXED)
        after = watch.wait_empty(30)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 position(s) filtered" in r.stdout
    _assert_output_exact(small, out)

    # The positions ran in SLURM jobs of the profile's worker job name that this run submitted.
    jobs = _marker_jobs(out, 4)
    assert all(jobs), f"markers without slurm_job_id: {jobs}"
    ran_in = set(jobs)
    assert ran_in <= watch.seen - before, f"markers name jobs {ran_in}, squeue showed {watch.seen - before}"
    assert 1 <= watch.max_concurrent <= 2
    assert all(Output(out).markers.read(p, 1)["host"] for p in range(4))
    # ... and are gone once the run is over.
    assert not after, f"worker jobs left in the queue after the run: {after}"

    # TLS: each worker job registered to a tls:// scheduler.
    logs = _log_dir(FIXED)
    for job in ran_in:
        err = (logs / f"dogflow-worker-{job}.err").read_text()
        assert re.search(r"Registered to:\s+tls://", err), f"job {job} did not register over TLS:\n{err[-2000:]}"
        assert "tcp://" not in "\n".join(line for line in err.splitlines() if "Registered to" in line)


@pytest.mark.timeout(240)
def test_adaptive_scales_jobs_0_to_2_to_0(tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    make_sample(inp, positions=8, channels=2, shape=(8, 48, 48), blobs=6, seed=4)
    with QueueWatch("dogflow-adapt") as watch:
        assert watch.poll() == {}, "dogflow-adapt jobs already queued before the run"
        time.sleep(0.5)
        r = _cli_run(inp, out, ADAPTIVE)
        after = watch.wait_empty(30)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_output_exact(inp, out)
    counts = [len(jobs) for _, jobs in watch.snapshots]
    assert counts and counts[0] == 0, f"expected 0 jobs at start, squeue counts {counts[:5]}"
    assert watch.max_concurrent == 2, f"adaptive max_workers 2 never reached: counts {counts}"
    assert not after, f"jobs still queued after the run: {after}"
    assert set(_marker_jobs(out, 8)) <= watch.seen


@pytest.mark.timeout(120)
def test_tls_scheduler_refuses_plain_tcp(tmp_path):
    from distributed import Client

    prof = clusters.load_profile(str(FIXED))
    assert prof.kwargs["security"] is True
    args = prof.runner_arguments()
    kwargs = {**args["cluster_kwargs"], "n_workers": 1}
    cls = import_class(args["cluster_class"])
    prof.prepare()
    with QueueWatch("dogflow-worker") as watch:
        with cls(**kwargs) as cluster:
            addr = cluster.scheduler_address
            assert addr.startswith("tls://127.0.0.1:"), addr
            script = cluster.job_script()
            assert "--protocol tls://" in script and "--tls-ca-file" in script and "--tls-key" in script, script
            plain = addr.replace("tls://", "tcp://", 1)
            with pytest.raises((OSError, TimeoutError)):
                Client(plain, timeout=5)
            with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
                Client(addr, timeout=5)  # TLS address but no certificates
            with Client(cluster, security=cluster.security, timeout=30) as client:
                client.wait_for_workers(1, timeout=120)
                workers = client.scheduler_info()["workers"]
                assert all(w.startswith("tls://") for w in workers), workers
                assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
                job_id = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
                assert set(job_id.values()) <= watch.seen
                # the job's nanny and worker got dogflow's Dask settings (tasks.defaults.DASK_CONFIG) from the
                # job script: no MALLOC_TRIM_THRESHOLD_ exported to the worker, no statistical profiler
                def worker_settings():  # defined here: pickled by value, the worker cannot import this module
                    import dask

                    return (os.environ.get("MALLOC_TRIM_THRESHOLD_"), dask.config.get("distributed.worker.profile.enabled"),
                            dask.config.get("distributed.scheduler.allowed-failures"))

                seen = client.run(worker_settings)
                assert seen and all(v == (None, False, 2) for v in seen.values()), seen
        assert not watch.wait_empty(30)


@pytest.mark.timeout(300)
def test_runner_mode_sbatch_with_tls(small, tmp_path):
    """`sbatch dogflow-runner.sbatch`: the batch step writes the certificate, `srun -n 4` runs scheduler,
    flow and 2 workers over tls://; while it runs, a TLS client gets in and a plain-TCP client is refused."""
    from distributed import Client

    from flows.clusters import tls

    out = tmp_path / "out.zarr"
    profile = tmp_path / "runner.yaml"
    profile.write_text(f"cluster_type: slurm-runner\nscheduler_file: {tmp_path}/scheduler-{{job_id}}.json\n"
                       f"tls_directory: {tmp_path}/tls-{{job_id}}\nworker_options:\n  nthreads: 1\n")
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    env.update(DOGFLOW_INPUT=str(small), DOGFLOW_OUTPUT=str(out), DOGFLOW_HOME=str(ROOT), DOGFLOW_LOG_DIR=str(tmp_path),
               DOGFLOW_CLUSTER=str(profile))
    proc = subprocess.Popen(
        ["sbatch", "--wait", "--ntasks=4", "--time=00:05:00", f"--output={tmp_path}/runner-%j.out",
         str(ROOT / "infra" / "slurm" / "dogflow-runner.sbatch"),
         "--channel", "1", "--sigma-small", "1", "--sigma-large", "3", "--retry-delay", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    checked = {}
    try:
        # While the allocation runs: its scheduler file appears, with a tls:// address.
        deadline = time.monotonic() + 200
        while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob("scheduler-*.json")):
            time.sleep(0.2)
        [sched] = list(tmp_path.glob("scheduler-*.json")) or [None]
        assert sched is not None, f"no scheduler file; sbatch exit {proc.poll()}"
        addr = json.loads(sched.read_text())["address"]
        job = re.fullmatch(r"scheduler-(\d+)\.json", sched.name).group(1)
        cert_dir = tmp_path / f"tls-{job}"
        assert addr.startswith("tls://"), addr
        assert stat.S_IMODE(cert_dir.stat().st_mode) == 0o700
        with Client(addr, security=tls.security(cert_dir), timeout=30) as client:
            with pytest.raises((OSError, TimeoutError)):
                Client(addr.replace("tls://", "tcp://", 1), timeout=5)
            with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
                Client(addr, timeout=5)  # TLS address but no certificate
            # the scheduler was alive around both refusals: the TLS client still talks to it
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.address) == addr
            client.wait_for_workers(1, timeout=60)
            workers = list(client.scheduler_info()["workers"])
            checked["workers"] = workers
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            m = re.search(r"(\d+)", "".join(p.name for p in tmp_path.glob("runner-*.out")))
            if m:
                subprocess.run(["scancel", m.group(1)], capture_output=True, timeout=30)
    assert checked.get("workers") and all(w.startswith("tls://") for w in checked["workers"]), checked
    assert f"Submitted batch job {job}" in stdout, stdout + stderr
    log = tmp_path / f"dogflow-runner-{job}.log"
    assert log.is_file(), f"no per-job log; job stdout:\n{next(tmp_path.glob('runner-*.out'), None)}"
    text = log.read_text()
    assert proc.returncode == 0, f"sbatch --wait exit {proc.returncode}\n{stderr}\n{text[-4000:]}"
    assert "4 position(s) filtered" in text, text[-4000:]
    # the flow joined the allocation's scheduler: Prefect's INFO line is in the run's log file (quiet terminal)
    [run_log] = [p.read_text() for p in tmp_path.glob(f"*-{job}.log") if p != log]
    assert "Connecting to an existing Dask cluster" in run_log and "tls://" in run_log, run_log[-3000:]
    job_out = (tmp_path / f"runner-{job}.out").read_text()
    assert f"dogflow runner job {job}: 4 ranks" in job_out and f"TLS certificate in {cert_dir}" in job_out, job_out
    _assert_output_exact(small, out)
    assert set(_marker_jobs(out, 4)) == {job}  # every position ran in a worker rank of this allocation
    assert not sched.exists(), f"scheduler file {sched} left behind"
    assert not cert_dir.exists(), f"certificate folder {cert_dir} left behind"


@pytest.mark.timeout(240)
def test_scancel_one_worker_mid_run(tmp_path):
    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    P = 8
    make_sample(inp, positions=P, channels=1, shape=(16, 96, 96), blobs=10, seed=5)
    killed: dict = {}
    done = threading.Event()

    def killer():
        # As soon as the first position is complete, cancel the job that filtered it (it is busy with the next).
        while not done.is_set():
            for p in range(P):
                marker = Output(out).markers.read(p, 0)
                if marker and marker.get("slurm_job_id"):
                    killed["job"] = marker["slurm_job_id"]
                    killed["markers"] = sum(Output(out).markers.read(q, 0) is not None for q in range(P))
                    subprocess.run(["scancel", killed["job"]], capture_output=True, timeout=30)
                    return
            time.sleep(0.05)

    with QueueWatch("dogflow-worker", interval=0.2) as watch:
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            r = run_cli("run", inp, out, "--channel", 0, "--sigma-small", "2", "--sigma-large", "6",
                        "--cluster", FIXED, "--no-progress", "--retry-delay", "0", timeout=200)
        finally:
            done.set()
            t.join(timeout=30)
        after = watch.wait_empty(30)
    assert killed, "no position completed, nothing was cancelled"
    assert killed["markers"] < P, f"cancelled too late: {killed['markers']} of {P} positions were already complete"
    assert r.returncode == 0, f"{killed}\n{r.stderr[-4000:]}"
    assert f"{P} position(s) filtered" in r.stdout
    _assert_output_exact(inp, out, channel=0, sigma_small=[2.0] * 3, sigma_large=[6.0] * 3)
    # The cancelled job left the queue while the run went on; every position was filtered in a job of this run.
    last_seen = max(ts for ts, jobs in watch.snapshots if killed["job"] in jobs)
    assert any(ts > last_seen for ts, jobs in watch.snapshots if jobs), "the run ended with the cancelled job"
    assert set(_marker_jobs(out, P, 0)) <= watch.seen
    assert len(set(_marker_jobs(out, P, 0)) - {killed["job"]}) >= 1
    assert not after


@pytest.mark.timeout(120)
def test_unknown_profile_key_refused_before_submission(small, tmp_path):
    out = tmp_path / "out.zarr"
    logs = Path("/tmp/dogflow-slurm-test/logs-bad")
    shutil.rmtree(logs, ignore_errors=True)
    with QueueWatch("dogflow-badkey", interval=0.1) as watch:
        r = _cli_run(small, out, BAD_KEY, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown key(s) partition" in lines[0] and "valid keys:" in lines[0]
    assert "queue" in lines[0] and "walltime" in lines[0]
    assert not watch.seen, f"jobs submitted for a refused profile: {watch.seen}"
    assert not logs.exists() and not out.exists(), "the refused run created folders"


@pytest.mark.timeout(300)
def test_scancel_all_workers_at_once_mid_run(tmp_path):
    """A node lost with all its worker jobs: both jobs of the fixed 2-worker profile are cancelled at once as
    soon as the first position is complete. The cluster submits replacements (it would otherwise wait
    forever), every position is filtered exactly, and the summary names the lost jobs."""
    import yaml

    inp, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    P = 8
    make_sample(inp, positions=P, channels=1, shape=(16, 96, 96), blobs=10, seed=6)
    # the fixed profile under a job name of this test alone: it cancels every job of that name (the SLURM is shared)
    name = f"dogflow-lost-{os.getpid()}"
    profile = tmp_path / "lost.yaml"
    profile.write_text(yaml.safe_dump({**yaml.safe_load(FIXED.read_text()), "job_name": name,
                                       "log_directory": str(tmp_path / "logs")}))
    killed: dict = {}
    done = threading.Event()

    with QueueWatch(name, interval=0.2) as watch:
        before = set(watch.poll())

        def killer():
            while not done.is_set():
                if any(Output(out).markers.read(p, 0) for p in range(P)):
                    jobs = sorted(set(watch.poll()) - before)  # every worker job of this run, at once
                    killed["jobs"] = jobs
                    killed["markers"] = sum(Output(out).markers.read(q, 0) is not None for q in range(P))
                    subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            r = run_cli("run", inp, out, "--channel", 0, "--sigma-small", "2", "--sigma-large", "6",
                        "--cluster", profile, "--no-progress", "--retry-delay", "0", timeout=240)
        finally:
            done.set()
            t.join(timeout=30)
        after = watch.wait_empty(30)
    assert killed.get("jobs"), f"no position completed or no job to cancel: {killed}"
    assert len(killed["jobs"]) == 2, f"expected both worker jobs running when cancelled: {killed}"
    assert killed["markers"] < P, f"cancelled too late: {killed['markers']} of {P} positions were already complete"
    assert r.returncode == 0, f"{killed}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert f"{P} position(s) filtered" in r.stdout
    _assert_output_exact(inp, out, channel=0, sigma_small=[2.0] * 3, sigma_large=[6.0] * 3)
    # replacement jobs were submitted after the cancellation, and the positions left ran in them
    replacements = watch.seen - before - set(killed["jobs"])
    assert replacements, f"no replacement job submitted; squeue showed {watch.seen - before}"
    ran_in = set(_marker_jobs(out, P, 0))
    assert ran_in <= watch.seen - before and ran_in & replacements, (ran_in, killed, replacements)
    # the summary names both lost jobs
    lost = [line for line in r.stdout.splitlines() if "was lost during the run and replaced" in line]
    assert sorted(re.search(r"\(job (\d+),", line).group(1) for line in lost) == killed["jobs"], r.stdout
    [run_log] = [p for p in (out / "dogflow" / "logs").glob("*.log")]  # the flow's own log names them too
    text = run_log.read_text()
    assert all(f"(job {job}, workers " in text and "was lost during the run and replaced" in text
               for job in killed["jobs"]), text[-3000:]
    assert not after
