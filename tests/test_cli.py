"""`dogflow` CLI: bad input gets one line on stderr, exit status 2, and no output is created or changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import assert_output_exact, run_cli
from flows.cli import app

runner = CliRunner()


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _bad(args, expect, out: Path | None = None):
    before = _tree_digest(out) if out is not None and out.exists() else None
    res = runner.invoke(app, ["run", *map(str, args)])
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("dogflow: error:"), err
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    if out is not None:
        if before is None:
            assert not out.exists(), "a refused run must not create the output"
        else:
            assert _tree_digest(out) == before, "a refused run must not change the output"
    return err


@pytest.fixture
def inp(sample):
    return sample


def test_missing_input(tmp_path):
    _bad([tmp_path / "nope.zarr", tmp_path / "o.zarr"], "input not found", tmp_path / "o.zarr")


def test_input_not_5d(tmp_path):
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 5, 6), chunks=(2, 5, 6), dtype="uint16")
    _bad([tmp_path / "a.zarr", tmp_path / "o.zarr"], "must be 5-D", tmp_path / "o.zarr")


def test_input_not_numeric(tmp_path):
    zarr.create_array(str(tmp_path / "b.zarr"), shape=(1, 1, 2, 3, 4), chunks=(1, 1, 2, 3, 4), dtype="bool")
    _bad([tmp_path / "b.zarr", tmp_path / "o.zarr"], "real numeric", tmp_path / "o.zarr")


def test_input_not_zarr(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    _bad([tmp_path / "junk", tmp_path / "o.zarr"], "not a Zarr", tmp_path / "o.zarr")


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--channel", "2"], "channel 2 out of range"),
        (["--channels", "0,5"], "channel 5 out of range"),
        (["--channels", "zero"], "channel must be an integer"),
        (["--sigma-small", "0.5um", "--sigma-large", "2um"], "has a unit but the input has no voxel size"),
        (["--sigma-small", "0.5parsec", "--sigma-large", "2"], "unknown length unit 'parsec'"),
        (["--fwhm-small", "1um", "--fwhm-large", "3 um"], "has a unit but the input has no voxel size"),
        (["--voxel-size", "1,2", "--sigma-small", "1", "--sigma-large", "3"], "voxel_size needs 1 or 3 values"),
        (["--voxel-size", "2,0.5,0.5", "--sigma-small", "1um", "--sigma-large", "1um"], "smaller than sigma_large"),
        (["--positions", "0-3"], "position 3 out of range"),
        (["--positions", "2-1"], "reversed"),
        (["--sigma-small", "0", "--sigma-large", "2"], "sigma_small must be > 0"),
        (["--sigma-small", "1,-1,1", "--sigma-large", "2"], "sigma_small must be > 0"),
        (["--sigma-small", "3", "--sigma-large", "2"], "smaller than sigma_large"),
        (["--sigma-small", "1,3,1", "--sigma-large", "2,2,2"], "not on y"),
        (["--sigma-small", "1,2", "--sigma-large", "3"], "needs 1 or 3 values"),
        (["--sigma-small", "a", "--sigma-large", "3"], "must be a number"),
        (["--sigma-small", "1", "--fwhm-small", "2", "--sigma-large", "3"], "not both"),
        (["--sigma-small", "1", "--sigma-large", "3", "--truncate", "0"], "truncate must be > 0"),
        (["--sigma-small", "1", "--sigma-large", "3", "--mode", "bogus"], "unknown mode"),
        (["--sigma-small", "1", "--sigma-large", "3", "--output-dtype", "int8"], "unknown output dtype"),
        (["--sigma-small", "1", "--sigma-large", "3", "--cluster", "nosuch"], "unknown cluster profile"),
    ],
)
def test_bad_parameters(inp, tmp_path, extra, expect):
    _bad([inp, tmp_path / "o.zarr", *extra], expect, tmp_path / "o.zarr")


def _existing_output(inp, tmp_path, shape_zyx=None):
    """A real dogflow output made by prepare_output (what a finished run leaves)."""
    from tasks import store
    from tasks.inputs import open_dataset

    params = store.FilterParams(str(Path(inp).resolve()), (1.0,) * 3, (3.0,) * 3, 4.0, "nearest", "float32")
    ds = open_dataset(inp)
    out = tmp_path / "exists.zarr"
    store.prepare_output(out, store.OutputSpec(params, ds.n_positions, ds.n_channels, shape_zyx or ds.shape),
                         channels=[0])
    store.write_levels(out, 0, 0, np.ones(shape_zyx or ds.shape, dtype=np.float32), "float32")
    store.write_marker(out, 0, 0, {"position": 0})
    return out


def test_output_with_other_parameters(inp, tmp_path):
    out = _existing_output(inp, tmp_path)
    _bad([inp, out, "--sigma-small", "1", "--sigma-large", "4"], "other parameters", out)
    _bad([inp, out, "--channel", "1", "--sigma-small", "1", "--sigma-large", "3", "--mode", "reflect"],
         "other parameters", out)
    _bad([inp, out, "--voxel-size", "2,1,1", "--sigma-small", "1", "--sigma-large", "3"], "another voxel size", out)


def test_output_with_other_shape(inp, tmp_path):
    out = _existing_output(inp, tmp_path, shape_zyx=(3, 4, 5))
    _bad([inp, out, "--sigma-small", "1", "--sigma-large", "3"], "another shape", out)


def test_output_not_writable(inp, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    _bad([inp, f / "o.zarr", "--sigma-small", "1", "--sigma-large", "3"], "not writable")
    _bad([inp, "/proc/dogflow-out.zarr", "--sigma-small", "1", "--sigma-large", "3"], "not writable")
    _bad([inp, inp / "inside.zarr", "--sigma-small", "1", "--sigma-large", "3"], "must not be the input")


def test_bad_input_real_process_exit_code(tmp_path):
    res = run_cli("run", tmp_path / "missing.zarr", tmp_path / "o.zarr")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"dogflow: error: input not found: {tmp_path / 'missing.zarr'}"]
    assert not (tmp_path / "o.zarr").exists()


def test_sample_through_dogflow_run_is_exact(tmp_path):
    """The demo's sample dataset through the real console script (its own temporary Prefect API)."""
    from flows.sample import make_sample

    inp = tmp_path / "sample.zarr"
    make_sample(inp, positions=3, channels=2, shape=(10, 32, 30), chunks=(4, 16, 16), blobs=10, seed=7)
    out = tmp_path / "dog.zarr"
    res = run_cli("run", inp, out, "--channel", "1", "--fwhm-small", "2.5,4,4", "--fwhm-large", "6,12,10",
                  "--retry-delay", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 position(s) filtered" in res.stdout
    f = 2 * np.sqrt(2 * np.log(2))
    assert_output_exact(out, inp, [2.5 / f, 4 / f, 4 / f], [6 / f, 12 / f, 10 / f], channel=1)
    st = run_cli("status", out)
    assert st.returncode == 0
    assert "3 complete, 0 missing, 0 stale (of 3)" in st.stdout
    # the same run again: nothing to do, said at once (no temporary Prefect server), nothing rewritten
    from tasks import store

    before = {pc: store.read_marker(out, *pc)["finished"] for pc in store.marked(out)}
    again = run_cli("run", inp, out, "--channel", "1", "--fwhm-small", "2.5,4,4", "--fwhm-large", "6,12,10")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 position(s) filtered, 3 already complete" in again.stdout and again.stderr == ""
    assert {pc: store.read_marker(out, *pc)["finished"] for pc in store.marked(out)} == before


def test_plan_prints_job_script_and_memory_without_submitting(sample):
    res = runner.invoke(app, ["plan", str(sample), "--cluster", "slurm", "--positions", "0-1"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "positions: 2" in out and "memory per task:" in out and "22.50 GiB available" in out
    assert "workers: 128 (adaptive 0-128), jobs: up to 16, task slots per job: 8" in out
    assert "#SBATCH -p compute" in out and "distributed.cli.dask_worker" in out
    # (12, 40, 36) float32, one level in one shard per channel: 1 shard + marker + preview, group and level zarr.json
    assert "output per position: 69.1 kB uncompressed, 5 files (1 shard files per channel)" in out
    assert "output for the run (2 positions): 138.2 kB uncompressed, 12 files" in out
    res = runner.invoke(app, ["plan", str(sample), "--positions", "0-1", "--output-dtype", "float16"])
    assert res.exit_code == 0 and "output per position: 34.6 kB uncompressed" in res.stdout
    res = runner.invoke(app, ["plan", str(sample), "--cluster", "nosuch"])
    assert res.exit_code == 2 and "unknown cluster profile" in res.stderr
    res = runner.invoke(app, ["plan", str(sample), "--output-dtype", "int8"])
    assert res.exit_code == 2 and "unknown output dtype 'int8'" in res.stderr


def test_run_shows_progress_bar_with_eta_on_a_terminal(sample, tmp_path):
    """On a terminal (a real pseudo-terminal here), `dogflow run` draws a rich progress bar with ETA."""
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dogflow"), "run", str(sample), str(tmp_path / "o.zarr"),
                             "--sigma-small", "1", "--sigma-large", "2"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(240) == 0
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "dog-filter" in screen and "ETA" in screen and "3/3" in screen, screen[-3000:]
