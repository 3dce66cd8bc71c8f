"""Cluster profiles -> DaskTaskRunner: validation, defaults, memory plan, job scripts (no cluster needed)."""

from __future__ import annotations

import warnings

import pytest
import yaml

from flows import clusters
from flows.clusters import ProfileError, parse_profile


def test_shipped_profiles_load():
    for name in ("local", "slurm", "pbs", "lsf", "sge"):
        prof = clusters.load_profile(name)
        args = clusters.runner_arguments(prof)
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
    args = clusters.runner_arguments(prof)
    assert args["cluster_kwargs"]["n_workers"] == 1  # never a jobqueue cluster without workers
    assert args["cluster_kwargs"]["security"] is True and args["cluster_kwargs"]["shared_temp_directory"]
    adaptive = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "min_workers": 0, "max_workers": 3}, "p")
    args = clusters.runner_arguments(adaptive)
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
    with pytest.warns(UserWarning, match="n_workers is fixed"):
        parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "4GB", "walltime": "01:00:00"}, "p")
    assert clusters.parse_walltime("04:00", "lsf") == 4 * 3600
    assert clusters.parse_walltime("1-00:30:00") == 86400 + 1800


def test_memory_plan_refuses_small_workers():
    # seed position: 413 x 2048 x 2048 uint16 -> ~17 GiB at the engine's peak
    prof = parse_profile({"cluster_type": "slurm", "cores": 8, "memory": "64GiB"}, "small.yaml")
    with pytest.raises(ProfileError, match=r"needs about .* GiB per task, but a worker has 8.0 GiB per task"):
        clusters.check_memory(prof, (413, 2048, 2048), "uint16", "float32")
    ok = parse_profile({"cluster_type": "slurm", "cores": 2, "memory": "64GiB"}, "ok.yaml")
    need, have = clusters.check_memory(ok, (413, 2048, 2048), "uint16", "float32")
    assert 6.9e9 < need < have


def test_threads_per_task():
    prof = parse_profile({"cluster_type": "slurm", "cores": 4, "job_cpu": 24, "memory": "64GiB"}, "p")
    assert clusters.threads_per_task(prof) == 6
    prof = parse_profile({"cluster_type": "slurm", "cores": 4, "memory": "64GiB", "threads_per_task": 3}, "p")
    assert clusters.threads_per_task(prof) == 3


def test_missing_interface_refused():
    prof = parse_profile({"cluster_type": "slurm", "cores": 1, "memory": "4GiB", "interface": "nosuch0"}, "p")
    with pytest.raises(ProfileError, match="network interface 'nosuch0' does not exist"):
        clusters.preflight(prof, (4, 4, 4), "uint16", "float32")


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
    script = clusters.job_script(clusters.load_profile(name))
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
    assert prof.n_workers == 1 and prof.kwargs["threads_per_worker"] == 2
    with pytest.raises(ProfileError, match="not found"):
        clusters.load_profile(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_type: [unclosed")
    with pytest.raises(ProfileError, match="invalid YAML"):
        clusters.load_profile(str(bad))
