"""Cluster profiles -> DaskTaskRunner: validation, defaults, memory plan, job scripts (no cluster needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from flows import clusters
from flows.clusters import ProfileError, parse_profile

GiB = 2**30
SEED_NEED = int(14.5 * GiB)  # one full seed position, 413 x 2048 x 2048 uint16 -> float32


def test_shipped_profiles_load():
    for name in ("local", "slurm", "pbs", "lsf", "sge"):
        prof = clusters.load_profile(name)
        args = prof.runner_arguments()
        assert args["cluster_class"].endswith(
            {"local": "LocalCluster", "slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster"}[name]
        )


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ProfileError) as e:
        parse_profile({"cluster_type": "slurm", "cores": 1, "memory": "1GB", "partition": "x"}, "p.yaml")
    msg = str(e.value)
    assert "unknown key(s) partition" in msg and "queue" in msg and "walltime" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "data, expect",
    [
        ({}, "missing cluster_type"),
        ({"cluster_type": "yarn"}, "unknown cluster_type"),
        ({"cluster_type": "slurm", "memory": "1GB"}, "needs 'cores'"),
        ({"cluster_type": "slurm", "cores": 1, "memory": "1GB", "n_workers": 0}, "never run anything"),
        ({"cluster_type": "slurm", "cores": 1, "memory": "1GB", "n_workers": 2, "max_workers": 3}, "not both"),
        ({"cluster_type": "slurm", "cores": 1, "memory": "1GB", "min_workers": 1}, "needs max_workers"),
        ({"cluster_type": "slurm", "cores": 1, "memory": "1GB", "min_workers": 3, "max_workers": 2}, "min_workers <= max_workers"),
        ({"cluster_type": "local", "n_workers": -1}, "non-negative integer"),
        ({"cluster_type": "address"}, "needs an 'address'"),
        (["a"], "must be a YAML mapping"),
    ],
)
def test_profile_errors(data, expect):
    with pytest.raises(ProfileError, match=expect):
        parse_profile(data, "p.yaml")


def test_batch_cluster_always_gets_workers_and_tls():
    prof = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB"}, "p")
    args = prof.runner_arguments()
    assert args["cluster_kwargs"]["n_workers"] == 1  # never a jobqueue cluster without workers
    assert args["cluster_kwargs"]["security"] is True and args["cluster_kwargs"]["shared_temp_directory"]
    adaptive = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "min_workers": 0, "max_workers": 3}, "p")
    args = adaptive.runner_arguments()
    assert args["adapt_kwargs"] == {"minimum": 0, "maximum": 3} and "n_workers" not in args["cluster_kwargs"]


def test_tls_off_warns():
    with pytest.warns(UserWarning, match="TLS is off"):
        parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "security": False}, "p")


def test_walltime_adds_lifetime():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "walltime": "01:00:00",
                              "min_workers": 0, "max_workers": 2}, "p")
    assert prof.kwargs["worker_extra_args"] == ["--lifetime", "3240s", "--lifetime-stagger", "162s"]
    kept = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "walltime": "01:00:00", "max_workers": 2,
                          "worker_extra_args": ["--lifetime", "10m"]}, "p")
    assert kept.kwargs["worker_extra_args"] == ["--lifetime", "10m"]
    with warnings.catch_warnings():  # fixed size is fine: the cluster replaces retired jobs (flows.clusters.keeper)
        warnings.simplefilter("error")
        fixed = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "walltime": "01:00:00"}, "p")
    assert fixed.kwargs["worker_extra_args"] == ["--lifetime", "3240s", "--lifetime-stagger", "162s"]
    assert clusters.parse_walltime("04:00", "HH:MM") == 4 * 3600
    assert clusters.parse_walltime("1-00:30:00") == 86400 + 1800


def test_memory_plan_refuses_small_workers():
    # seed position: 413 x 2048 x 2048 uint16 -> ~17 GiB at the engine's peak
    prof = parse_profile({"cluster_type": "slurm", "cores": 8, "memory": "64GiB"}, "small.yaml")
    with pytest.raises(ProfileError, match=r"needs about .* GiB per task, but a worker has 8.0 GiB per task"):
        prof.preflight(SEED_NEED)
    ok = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "64GiB"}, "ok.yaml")
    sized = ok.preflight(SEED_NEED)
    assert sized.need == SEED_NEED < sized.task_slots_and_memory()[1] == 32 * 2**30
    assert ok.need is None  # a profile does not change: sizing makes a copy


def test_one_task_slot_per_worker_process_by_default():
    """Positions in one process share its GIL (benchmarks/slots.py: 3.5-4x slower), so a jobqueue profile gets
    processes = cores unless it says otherwise, and is warned when it does."""
    prof = parse_profile({"cluster_type": "slurm", "cores": 4, "job_cpu": 24, "memory": "64GiB"}, "p")
    assert prof.kwargs["processes"] == 4 and prof.task_slots_and_memory() == (1, 16 * GiB)
    assert "--nworkers 4" in prof.job_script() and "--nthreads 1" in prof.job_script()
    with pytest.warns(UserWarning, match="2 task slots per worker process share one GIL.*set processes: 4"):
        shared = parse_profile({"cluster_type": "slurm", "cores": 4, "processes": 2, "memory": "64GiB"}, "p")
    assert shared.task_slots_and_memory() == (2, 16 * GiB)
    with pytest.raises(ProfileError, match="processes must divide cores"):
        parse_profile({"cluster_type": "slurm", "cores": 4, "processes": 3, "memory": "64GiB"}, "p")
    for name in ("slurm", "pbs", "lsf", "sge"):  # the shipped examples: 8 processes x 3 threads per job
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            shipped = clusters.load_profile(name)
        assert shipped.task_slots_and_memory()[0] == 1 and shipped.threads_per_task() == 3


def test_threads_per_task():
    prof = parse_profile({"cluster_type": "slurm", "cores": 4, "job_cpu": 24, "memory": "64GiB"}, "p")
    assert prof.threads_per_task() == 6
    prof = parse_profile({"cluster_type": "slurm", "cores": 4, "memory": "64GiB", "threads_per_task": 3}, "p")
    assert prof.threads_per_task() == 3
    lsf = parse_profile({"cluster_type": "lsf", "cores": 2, "ncpus": 8, "memory": "64GiB"}, "p")
    assert lsf.threads_per_task() == 4


def test_missing_interface_refused():
    prof = parse_profile({"cluster_type": "slurm", "cores": 1, "memory": "4GiB", "interface": "nosuch0"}, "p")
    with pytest.raises(ProfileError, match="network interface 'nosuch0' does not exist"):
        prof.preflight(2**20)
    sized = prof.check_memory(2**20)  # `dogflow plan` may run elsewhere: memory only
    assert (sized.need, sized.task_slots_and_memory()[1]) == (2**20, 4 * GiB)


@pytest.mark.parametrize(
    "name, header, directives",
    [
        ("slurm", "#SBATCH", ["#SBATCH -p compute", "#SBATCH -A mylab", "#SBATCH --cpus-per-task=24", "#SBATCH -t 04:00:00"]),
        ("pbs", "#PBS", ["#PBS -q workq", "#PBS -A mylab", "#PBS -l select=1:ncpus=24:mem=180GB", "#PBS -l walltime=04:00:00"]),
        ("lsf", "#BSUB", ["#BSUB -q normal", "#BSUB -n 24", "#BSUB -W 04:00"]),
        ("sge", "#$", ["#$ -q all.q", "#$ -l h_vmem=180G,m_mem_free=180G", "#$ -l h_rt=04:00:00"]),
    ],
)
def test_job_scripts_render_valid_headers(name, header, directives):
    script = clusters.load_profile(name).job_script()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    head = [l for l in lines if l.startswith("#") and not l.startswith("#!")]
    assert head and all(l.startswith(header + " ") for l in head), head
    for d in directives:
        assert d in lines, (d, script)
    assert "distributed.cli.dask_worker tls://" in script
    assert "--lifetime" in script


def test_profile_by_path(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"cluster_type": "local", "n_workers": 1, "threads_per_worker": 2}))
    prof = clusters.load_profile(str(f))
    assert prof.n_workers == 1 and prof.kwargs["threads_per_worker"] == 2 and prof.source == str(f)
    with pytest.raises(ProfileError, match="not found"):
        clusters.load_profile(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_type: [unclosed")
    with pytest.raises(ProfileError, match="invalid YAML"):
        clusters.load_profile(str(bad))


# --------------------------------------------------------------------------- one kind, one class


def test_each_kind_is_a_class_chosen_by_cluster_type():
    kinds = {"local": clusters.LocalProfile, "slurm": clusters.SLURMProfile, "pbs": clusters.PBSProfile,
             "lsf": clusters.LSFProfile, "sge": clusters.SGEProfile, "slurm-runner": clusters.SLURMRunnerProfile}
    assert set(clusters.shipped_profiles()) == set(kinds)
    for name, cls in kinds.items():
        prof = clusters.load_profile(name)
        assert type(prof) is cls and prof.cluster_type == cls.kind
        assert prof.plan_lines() and all(isinstance(line, str) for line in prof.plan_lines())
    assert type(parse_profile({"cluster_type": "address", "address": "tcp://h:8786"}, "p")) is clusters.AddressProfile
    foreign = parse_profile({"cluster_type": "dask_kubernetes.KubeCluster", "anything": 1}, "p")
    assert type(foreign) is clusters.ForeignProfile
    assert foreign.runner_arguments() == {"cluster_class": "dask_kubernetes.KubeCluster", "cluster_kwargs": {"anything": 1}}


def test_a_new_scheduler_is_one_subclass():
    """HTCondor, which dogflow does not ship: one class stating its kind and jobqueue class is enough."""

    class HTCondorProfile(clusters.JobqueueProfile):
        kind = "htcondor"
        jobqueue_class = "HTCondorCluster"
        required = ("cores", "memory", "disk")

    try:
        with pytest.raises(ProfileError, match="needs 'disk'"):
            parse_profile({"cluster_type": "htcondor", "cores": 1, "memory": "2GiB"}, "condor.yaml")
        with pytest.raises(ProfileError, match="unknown key.s. partition .*valid keys: .*disk"):
            parse_profile({"cluster_type": "htcondor", "cores": 1, "memory": "2GiB", "disk": "1GiB", "partition": 1}, "c")
        prof = parse_profile({"cluster_type": "htcondor", "cores": 2, "memory": "8GiB", "disk": "1GiB",
                              "max_workers": 4}, "condor.yaml")
        assert type(prof) is HTCondorProfile
        assert prof.runner_arguments()["cluster_class"] == "flows.clusters.keeper.HTCondorCluster"
        assert prof.task_slots_and_memory() == (1, 4 * GiB)  # one slot per worker process (processes: cores)
        assert prof.kwargs["security"] is True and prof.runner_arguments()["adapt_kwargs"] == {"minimum": 0, "maximum": 4}
        script = prof.job_script()
        assert script.startswith("#!/usr/bin/env condor_submit") and "dask_worker tls://" in script
    finally:
        clusters.ClusterProfile._kinds.pop("htcondor", None)


def test_job_script_only_for_batch_kinds():
    for name in ("local", "slurm-runner"):
        with pytest.raises(ProfileError, match="has no job script"):
            clusters.load_profile(name).job_script()


def test_session_is_a_no_op_outside_runner_mode():
    with clusters.load_profile("local").session() as s:
        assert s is None


def test_clusters_does_not_import_the_engine():
    import subprocess
    import sys

    code = "import sys, flows.clusters as c; c.load_profile('local').plan_lines(); print('tasks.dog' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_profile_name_lists_the_shipped_profiles():
    import typing

    assert typing.get_args(clusters.ProfileName) == tuple(clusters.shipped_profiles())
    with pytest.raises(ProfileError, match=r"unknown cluster profile 'nope'; known: local, lsf, pbs, sge, slurm"):
        clusters.load_profile("nope")


# --------------------------------------------------------------------------- the embedded default sizes itself

TOTAL = 24 * GiB


@pytest.mark.parametrize(
    "need, workers, threads",
    [
        (int(0.3 * GiB), 2, 1),  # a small position: both cores, one position each
        (SEED_NEED, 1, 2),  # a full seed position: only one fits, it gets both cores
    ],
)
def test_local_plan_on_this_machine_shape(need, workers, threads):
    usable = TOTAL - int(0.1 * TOTAL)
    plan = clusters.plan_local(2, usable, need)
    assert (plan.n_workers, plan.threads_per_worker, plan.threads_per_task) == (workers, 1, threads)
    assert plan.memory_limit == usable // workers
    assert need <= 0.95 * plan.memory_limit  # below Dask's terminate threshold


def test_local_plan_more_cores_and_explicit_values_win():
    plan = clusters.plan_local(16, 64 * GiB, 10 * GiB)
    assert (plan.n_workers, plan.threads_per_task) == (6, 2)  # 64 // ceil(10/0.95) = 6 fit; 16 // 6 = 2
    assert clusters.plan_local(16, 64 * GiB, 10 * GiB, n_workers=2).threads_per_task == 8
    assert clusters.plan_local(16, 64 * GiB, 10 * GiB, threads_per_task=1).threads_per_task == 1
    fixed = clusters.plan_local(16, 64 * GiB, 10 * GiB, memory_limit=20 * GiB)
    assert (fixed.n_workers, fixed.memory_limit) == (3, 20 * GiB)
    two = clusters.plan_local(16, 64 * GiB, 10 * GiB, threads_per_worker=2)
    assert (two.n_workers, two.threads_per_worker, two.memory_per_task) == (3, 2, 64 * GiB // 3 // 2)


def test_local_plan_never_more_workers_than_positions():
    """One pending position gets every core; explicit n_workers still wins."""
    one = clusters.plan_local(16, 64 * GiB, 1 * GiB, tasks=1)
    assert (one.n_workers, one.threads_per_task) == (1, 16)
    three = clusters.plan_local(16, 64 * GiB, 1 * GiB, tasks=3)
    assert (three.n_workers, three.threads_per_task) == (3, 5)
    assert clusters.plan_local(16, 64 * GiB, 1 * GiB, tasks=1, n_workers=4).n_workers == 4
    prof = clusters.load_profile("local")
    one_task = prof.preflight(2**20).sized(2**20, tasks=1)
    assert one_task.runner_arguments()["cluster_kwargs"]["n_workers"] == 1
    assert one_task.threads_per_task() == len(__import__("os").sched_getaffinity(0))
    # the profile it came from is unchanged: no state that changes between calls
    assert prof.local_plan is None and prof.tasks is None


def test_local_plan_refuses_what_cannot_fit():
    with pytest.raises(ProfileError, match=r"one position needs about 14.5 GiB.* only 12.0 GiB usable") as e:
        clusters.plan_local(2, 12 * GiB, SEED_NEED)
    assert "\n" not in str(e.value)
    with pytest.raises(ProfileError, match=r"2 worker\(s\) with memory_limit 10.0 GiB .*lower n_workers"):
        clusters.plan_local(2, 20 * GiB, SEED_NEED, n_workers=2)


def test_local_profile_runner_arguments_follow_the_plan(tmp_path):
    prof = clusters.load_profile("local").preflight(64 * 2**20)
    have = prof.task_slots_and_memory()[1]
    plan = prof.plan()
    args = prof.runner_arguments()
    kw = args["cluster_kwargs"]
    assert args["cluster_class"] == "distributed.LocalCluster"
    assert (kw["n_workers"], kw["threads_per_worker"], kw["memory_limit"]) == (plan.n_workers, 1, plan.memory_limit)
    assert have == plan.memory_limit and prof.threads_per_task() == plan.threads_per_task >= 1
    assert 1 <= plan.n_workers <= len(__import__("os").sched_getaffinity(0))
    settings = prof.dask_settings()
    assert settings["distributed.worker.memory.pause"] is False and settings["distributed.worker.memory.spill"] is False
    f = tmp_path / "fixed.yaml"
    f.write_text("cluster_type: local\nn_workers: 1\nmemory_limit: 2GiB\nthreads_per_task: 1\n"
                 "dask_config: {distributed.worker.memory.pause: 0.9}\n")
    fixed = clusters.load_profile(str(f))
    fixed = fixed.preflight(2**20)
    kw = fixed.runner_arguments()["cluster_kwargs"]
    assert (kw["n_workers"], kw["memory_limit"], fixed.threads_per_task()) == (1, 2 * GiB, 1)
    assert fixed.dask_settings()["distributed.worker.memory.pause"] == 0.9
    with pytest.raises(ProfileError, match="needs about"):
        fixed.preflight(4 * GiB)


def test_local_profile_refuses_a_position_larger_than_the_machine():
    with pytest.raises(ProfileError, match=r"local.yaml: one position needs about .*usable") as e:
        clusters.load_profile("local").preflight(10**15)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- TLS files for runner mode


def test_tls_files_are_owner_only_and_make_a_tls_only_scheduler(tmp_path):
    import asyncio
    import os
    import stat

    from distributed import Client, Scheduler
    from flows.clusters import tls

    folder = tls.create(tmp_path / "tls")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for f in (tls.CERT, tls.KEY):
        assert stat.S_IMODE(os.stat(folder / f).st_mode) == 0o600
    sec = tls.security(folder)
    assert sec.require_encryption

    async def check():
        async with Scheduler(security=sec, protocol="tls", dashboard_address=":0", host="127.0.0.1") as s:
            assert s.address.startswith("tls://")
            async with Client(s.address, security=sec, asynchronous=True, timeout=30) as c:
                assert (await c.scheduler.identity())["address"] == s.address
            with pytest.raises((OSError, TimeoutError)):
                await Client(s.address.replace("tls://", "tcp://"), asynchronous=True, timeout=3)

    asyncio.run(check())


def test_runner_profile_needs_its_certificate(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    f = tmp_path / "runner.yaml"
    f.write_text(f"cluster_type: slurm-runner\nscheduler_file: {tmp_path}/sched-{{job_id}}.json\n"
                 f"tls_directory: {tmp_path}/tls-{{job_id}}\n")
    prof = clusters.load_profile(str(f))
    assert prof.tls_directory() == f"{tmp_path}/tls-4242"
    with pytest.raises(ProfileError, match=r"no TLS certificate in .*tls-4242; create it before srun"):
        prof.runner_arguments()
    from flows.clusters import tls

    assert tls.main(["--cluster", str(f)]) == 0
    args = prof.runner_arguments()
    assert args["client_kwargs"]["security"].require_encryption
    assert args["address"].startswith("<scheduler address from")
    with pytest.warns(UserWarning, match="TLS is off"):
        off = parse_profile({"cluster_type": "slurm-runner", "security": False}, "p")
    assert "client_kwargs" not in off.runner_arguments() and off.tls_directory() is None


# --------------------------------------------------------------------------- profiles ship with the package


@pytest.mark.timeout(600)
def test_a_wheel_installed_outside_the_checkout_runs_the_embedded_default(tmp_path):
    """Build a wheel from a copy of the sources, install it into a throwaway venv (dependencies from
    the project venv, through a .pth file), then plan and run with the `local` profile from /tmp."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    from conftest import ROOT, assert_output_exact
    from flows.sample import make_sample

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("flows", "tasks", "infra"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))

    def run(*cmd, **kw):
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
        assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res

    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src)
    [wheel] = (tmp_path / "dist").glob("dogflow-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "dogflow-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps", "--no-index", wheel)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFECT_API_URL")}
    code = ("import flows.clusters as c; p = c.load_profile('local'); "
            "print(c.__file__); print(p.source); print(','.join(c.shipped_profiles()))")
    out = run(py, "-c", code, cwd=work, env=env).stdout.splitlines()
    assert out[0].startswith(site) and out[1].startswith(site) and out[1].endswith("infra/clusters/local.yaml"), out
    assert out[2] == ",".join(clusters.shipped_profiles())

    inp, res = work / "in.zarr", work / "out.zarr"
    make_sample(inp, positions=2, channels=1, shape=(8, 32, 32), blobs=4, seed=2)
    plan = run(venv / "bin" / "dogflow", "plan", inp, cwd=work, env=env).stdout
    assert f"profile: {site}" in plan and "workers: " in plan, plan
    run(venv / "bin" / "dogflow", "run", inp, res, "--sigma-small", "1", "--sigma-large", "2", "--no-progress",
        "--retry-delay", "0", cwd=work, env=env)
    assert_output_exact(res, inp, 1.0, 2.0)


@pytest.mark.parametrize("kind", ["slurm", "pbs", "lsf", "sge"])
def test_worker_jobs_get_dogflows_dask_settings(kind, tmp_path):
    """A worker job's nanny reads the node's Dask config, not the flow's: the job script exports dogflow's
    (tasks.defaults.DASK_CONFIG, the profile's dask_config winning) the way Dask hands config to its children."""
    import re

    import dask.config

    from tasks.defaults import DASK_CONFIG

    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"cluster_type": kind, "cores": 4, "memory": "16GB", "walltime": "01:00:00",
                                    "job_script_prologue": ["module load site-python"],
                                    "dask_config": {"distributed.admin.tick.interval": "1s"}}))
    p = clusters.load_profile(str(prof))
    for text in (p.job_script(), "\n".join(p.runner_arguments()["cluster_kwargs"]["job_script_prologue"])):
        exported = re.search(r"^export DASK_INTERNAL_INHERIT_CONFIG=(\S+)$", text, re.M)
        assert exported, text
        settings = dask.config.deserialize(exported.group(1))
        assert settings["distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"] is None
        assert settings["distributed.admin.tick.interval"] == "1s"  # the profile wins
        assert settings["distributed.scheduler.allowed-failures"] == DASK_CONFIG["distributed.scheduler.allowed-failures"]
        assert "distributed.worker.preload" not in settings  # a job that cannot import it fails its task, visibly
        assert text.index("DASK_INTERNAL_INHERIT_CONFIG") < text.index("module load site-python")
        # nor from the submitting environment (a nanny that ran in the submitting process exported it there)
        assert re.search(r"^unset MALLOC_TRIM_THRESHOLD_$", text, re.M), text
        assert text.index("unset MALLOC_TRIM_THRESHOLD_") < text.index("module load site-python")
        # what the worker process ends up with: Dask's own reading of that variable
        cfg = dask.config.collect_env({"DASK_INTERNAL_INHERIT_CONFIG": exported.group(1)})
        assert cfg["distributed"]["nanny"]["pre-spawn-environ"] == {"MALLOC_TRIM_THRESHOLD_": None}
        assert cfg["distributed"]["worker"]["profile"]["enabled"] is False


def test_summary_names_lost_worker_jobs():
    from dataclasses import asdict

    from flows import reports
    from flows.clusters.keeper import LostJob

    job = asdict(LostJob("SLURMCluster-1", "4711", ("tls://127.0.0.1:40001",), 1.0))
    md = reports.summary_markdown("in.zarr", "out.zarr", 0, [], [job])
    assert "- lost worker job (replaced): SLURMCluster-1 (job 4711, workers tls://127.0.0.1:40001)" in md
    assert "lost worker" not in reports.summary_markdown("in.zarr", "out.zarr", 0, [])


def test_every_jobqueue_class_has_a_keeping_version():
    import dask_jobqueue

    from flows.clusters import keeper
    from flows.clusters.base import import_class

    for name in ("SLURMCluster", "PBSCluster", "LSFCluster", "SGECluster", "HTCondorCluster"):
        cls = import_class(f"flows.clusters.keeper.{name}")
        assert issubclass(cls, keeper.KeepsJobs) and issubclass(cls, getattr(dask_jobqueue, name))
        assert cls is import_class(f"flows.clusters.keeper.{name}")  # made once
    with pytest.raises(ProfileError):
        import_class("flows.clusters.keeper.LocalCluster")
