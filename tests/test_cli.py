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
        (["--channels", ""], "--channels is empty"),
        (["--channels", " "], "--channels is empty"),
        (["--channel", "1", "--channels", "0,1"], "give --channels or --channel, not both"),
        (["--sigma-small", "1um", "--sigma-large", "8", "--voxel-size", "1,1,1"], "in the same units"),
        (["--sigma-small", "1", "--sigma-large", "8um"], "in the same units"),
    ],
)
def test_bad_parameters(inp, tmp_path, extra, expect):
    _bad([inp, tmp_path / "o.zarr", *extra], expect, tmp_path / "o.zarr")


def _existing_output(inp, tmp_path, shape_zyx=None):
    """A real dogflow output made by prepare_output (what a finished run leaves)."""
    from tasks.filters import DoG, FilterParams
    from tasks.output import Output, OutputSpec
    from tasks.inputs import open_dataset

    params = FilterParams(str(Path(inp).resolve()), DoG((1.0,) * 3, (3.0,) * 3, 4.0, "nearest"), "float32")
    ds = open_dataset(inp)
    out = tmp_path / "exists.zarr"
    Output(out).prepare(OutputSpec(params, ds.n_positions, ds.n_channels, shape_zyx or ds.shape), channels=[0])
    Output(out).write_levels(0, 0, np.ones(shape_zyx or ds.shape, dtype=np.float32), "float32")
    Output(out).markers.write(0, 0, {"position": 0})
    return out


def test_output_with_other_parameters(inp, tmp_path):
    out = _existing_output(inp, tmp_path)
    _bad([inp, out, "--sigma-small", "1", "--sigma-large", "4"], "other parameters", out)
    _bad([inp, out, "--channel", "1", "--sigma-small", "1", "--sigma-large", "3", "--mode", "reflect"],
         "other parameters", out)
    _bad([inp, out, "--voxel-size", "2,1,1", "--sigma-small", "1", "--sigma-large", "3"], "another voxel size", out)


def test_conflict_line_shows_what_the_output_was_made_with_and_what_overwrite_destroys(inp, tmp_path):
    out = _existing_output(inp, tmp_path)  # sigma 1 / 3 voxels, one computed (position, channel): (0, 0)
    err = _bad([inp, out, "--sigma-large", "4", "--truncate", "3"], "other parameters", out)
    assert ("(--sigma-small 1 --sigma-large 3 --truncate 4 --mode nearest --output-dtype float32), "
            "given --sigma-large 4 --truncate 3") in err, err
    # what --overwrite would destroy and recompute (3 positions x channel 0, remembered from the output)
    assert "--overwrite discards its 1 computed (position, channel) pair(s) and computes 3 position(s) x 1 channel(s)" \
        in err, err
    err = _bad([inp, out, "--mode", "wrap", "--channels", "0,1", "--positions", "1"], "other parameters", out)
    assert "given --mode wrap" in err and "computes 1 position(s) x 2 channel(s) anew" in err, err


def test_plan_continues_an_output_as_it_was_made(inp, tmp_path):
    """Parameters not given come from the output's provenance (the same validation `run` does), said in one line;
    a sigma typed back as printed (4 significant digits) continues it too."""
    out = _existing_output(inp, tmp_path)
    res = runner.invoke(app, ["plan", str(inp), str(out)])
    assert res.exit_code == 0, res.output
    assert (f"continuing {out} as it was made: --sigma-small 1 --sigma-large 3 --truncate 4 --mode nearest "
            f"--output-dtype float32 --channels 0") in res.stdout
    assert "filter: dog, sigma_small 1, sigma_large 3 voxels, truncate 4, mode nearest, output float32; channels 0" \
        in res.stdout
    assert "positions: 3 (3 to filter, 0 complete and unchanged)" in res.stdout  # its one marker is not a real one
    seed = tmp_path / "seed.zarr"
    from tasks.filters import DoG, FilterParams
    from tasks.output import Output, OutputSpec
    from tasks.inputs import open_dataset

    ds = open_dataset(inp)
    params = FilterParams(str(Path(inp).resolve()), DoG((50 / 2.35,) * 3, (200 / 2.35,) * 3, 4.0, "nearest"), "float32")
    Output(seed).prepare(OutputSpec(params, ds.n_positions, ds.n_channels, ds.shape), channels=[1])
    res = runner.invoke(app, ["plan", str(inp), str(seed), "--sigma-small", "21.28", "--mode", "nearest"])
    assert res.exit_code == 0, res.output
    assert "--sigma-large 85.11 --truncate 4 --output-dtype float32 --channels 1" in res.stdout
    assert "filter: dog, sigma_small 21.28, sigma_large 85.11 voxels" in res.stdout


def test_plan_takes_the_schemas_defaults_and_the_run_options(inp):
    res = runner.invoke(app, ["plan", str(inp), "--channels", "0,1", "--sigma-small", "1", "--sigma-large", "2",
                              "--voxel-size", "2,1,1", "--output-dtype", "uint16", "--truncate", "3"])
    assert res.exit_code == 0, res.output
    assert "filter: dog, sigma_small 1, sigma_large 2 voxels, truncate 3, mode nearest, output uint16; channels 0,1" \
        in res.stdout
    assert "profile: " in res.stdout and "local.yaml (local)" in res.stdout  # the schema's default cluster
    res = runner.invoke(app, ["plan", str(inp), "--sigma-small", "1um", "--sigma-large", "2"])
    assert res.exit_code == 2 and "in the same units" in res.stderr


def test_bad_input_is_refused_before_prefect_dask_or_zarr_are_imported(tmp_path):
    """The fast start: `dogflow run missing.zarr out.zarr` never imports Prefect, Dask, zarr or numpy
    (measured: 0.19-0.28 s wall on this VM; benchmarks/README.md)."""
    import subprocess
    import sys

    code = ("import sys\nfrom flows.cli import main\n"
            f"sys.argv = ['dogflow', 'run', {str(tmp_path / 'missing.zarr')!r}, {str(tmp_path / 'o.zarr')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'distributed', 'dask', 'zarr', 'numpy', "
            "'scipy'}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split("\n")[:2] == ["exit 2", "[]"], (res.stdout, res.stderr)
    assert res.stderr.strip() == f"dogflow: error: input not found: {tmp_path / 'missing.zarr'}"


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
    from tasks.output import Output

    before = {pc: Output(out).markers.read(*pc)["finished"] for pc in Output(out).markers.marked()}
    # only the two paths: the output's parameters and channel, said in one line
    again = run_cli("run", inp, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 position(s) filtered, 3 already complete" in again.stdout and again.stderr == ""
    assert (f"dogflow: continuing {out} as it was made: --sigma-small 1.062,1.699,1.699 --sigma-large 2.548,5.096,4.247"
            f" --truncate 4 --mode nearest --output-dtype float32 --channels 1") in again.stdout.splitlines()
    # ... and imports neither Prefect nor Dask's distributed (what made reruns slow: 1-4 s each on this VM)
    traced = run_cli("run", inp, out, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert traced.returncode == 0, traced.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in traced.stderr.splitlines()
                if line.startswith("import time:")}
    assert "zarr" in imported and not imported & {"prefect", "distributed"}, sorted(imported)
    assert {pc: Output(out).markers.read(*pc)["finished"] for pc in Output(out).markers.marked()} == before


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


def _on_a_terminal(argv, env, timeout=240) -> tuple[int, str]:
    """Run ``argv`` with a real pseudo-terminal as stdin, stdout and stderr: (exit status, what the terminal got)."""
    import pty
    import subprocess

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
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
    code = proc.wait(timeout)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def _new_user_env(tmp_path) -> dict:
    """A first-time user on a terminal: a fresh PREFECT_HOME, no CI variables (Prefect stays quiet in CI), no
    DO_NOT_TRACK, no configured API."""
    from prefect._internal.analytics.ci_detection import CI_ENV_VARS

    env = {k: v for k, v in os.environ.items()
           if k not in CI_ENV_VARS and k not in ("PREFECT_API_URL", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    env.update(COLUMNS="120", TERM="xterm", PREFECT_HOME=str(tmp_path / "prefect-home"))
    return env


NOTICE = "Prefect collects anonymous usage data"


def test_run_shows_progress_bar_with_eta_and_no_telemetry_notice_on_a_terminal(sample, tmp_path):
    """On a terminal (a real pseudo-terminal here), a first-time user's `dogflow run` draws a rich progress bar with
    ETA, and neither the flow process nor its Dask workers print Prefect's telemetry notice."""
    import sys

    code, screen = _on_a_terminal([str(Path(sys.executable).parent / "dogflow"), "run", str(sample),
                                   str(tmp_path / "o.zarr"), "--sigma-small", "1", "--sigma-large", "2"],
                                  _new_user_env(tmp_path))
    assert code == 0, screen[-3000:]
    assert "dog-filter" in screen and "ETA" in screen and "3/3" in screen, screen[-3000:]
    assert NOTICE not in screen and "telemetry" not in screen.lower(), screen[-3000:]


def test_prefect_prints_its_notice_to_a_new_user_unless_dogflow_quiets_it(tmp_path):
    """The check above can fail: importing Prefect on a new user's terminal prints the notice, and
    flows.run.quiet_prefect (what `dogflow` does first) prevents it."""
    import sys

    env = _new_user_env(tmp_path)
    code, screen = _on_a_terminal([sys.executable, "-c", "import prefect"], env, timeout=120)
    assert code == 0 and NOTICE in screen, screen
    env["PREFECT_HOME"] = str(tmp_path / "second-home")
    code, screen = _on_a_terminal([sys.executable, "-c", "import flows.run; flows.run.quiet_prefect(); import prefect"],
                                  env, timeout=120)
    assert code == 0 and NOTICE not in screen, screen


def test_allow_missing_chunks_on_the_command_line(sample, tmp_path):
    """`--allow-missing-chunks` reads a missing input chunk as the fill value (0) instead of failing its position."""
    from conftest import assert_exact
    from tasks.output import Output

    arr = zarr.open_array(str(sample), mode="r")
    volume = arr[0, 1].astype(np.float64)
    chunk = sample / arr.metadata.encode_chunk_key((0, 1, 1, 0, 0))
    chunk.unlink()
    volume[5:10, 0:16, 0:16] = 0  # what the run reads there
    out = tmp_path / "o.zarr"
    res = run_cli("run", sample, out, "--channel", "1", "--positions", "0", "--sigma-small", "1", "--sigma-large", "2",
                  "--allow-missing-chunks", "--retry-delay", "0", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 position(s) filtered" in res.stdout
    assert Output(out).markers.read(0, 1) is not None
    assert_exact(Output(out).read(0, 1), volume, 1.0, 2.0)
