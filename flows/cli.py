"""``dogflow``: run, plan, inspect and demo the DoG flow from a shell.

Every command validates its input first; bad input prints one line
(``dogflow: error: ...``) on stderr and exits with status 2, before any output is
created or any job is submitted. A run whose positions failed exits with status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from tasks import defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact 3-D Difference-of-Gaussians over 5-D microscopy Zarr datasets (Prefect + Dask).")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"dogflow: error: {msg}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _progress_bar(show: bool) -> Iterator[None]:
    """A rich progress bar with ETA on a terminal, driven by the run's own progress (no polling)."""
    if not (show and sys.stderr.isatty()):
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from flows import reports

    with Progress(TextColumn("[bold]dog-filter"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=False, refresh_per_second=2) as bar:
        tid = bar.add_task("positions", total=None)
        with reports.listening(lambda done, total: bar.update(tid, completed=done, total=total)):
            yield


def run_flow(request, show_progress: bool = True, temporary_api=None) -> dict:
    """Validate ``request``, then run the ``dog-filter`` flow on it in this process (raises typer.Exit on errors).

    ``temporary_api``: a temporary Prefect server the command started early (:mod:`flows.api`); it is
    stopped when the run ends, or at once when the request is refused.
    """
    from flows.api import prefect_api
    from flows.request import ParameterError, handing_over
    from tasks.store import RunLock, RunLockedError

    try:
        spec = request.validate()
        RunLock(spec.output_path).check()  # refuse at once, before Prefect starts, when a live run holds the output
    except (ParameterError, RunLockedError) as exc:
        if temporary_api is not None:
            temporary_api.stop()
        _fail(str(exc))
    from flows.dog_filter import dog_filter, pending_work, run_summary

    pending = pending_work(spec)[0] if temporary_api is not None else None
    if pending is not None and not (request.force or request.overwrite) and not pending:
        # Every selected position is complete and unchanged, and no Prefect server keeps a record of this
        # run: say so without starting Prefect (a run against a configured API still runs the flow).
        temporary_api.stop()
        return run_summary(spec, len(spec.positions), [])
    # inside `srun -n N` (runner mode) only rank 1 gets past the session's __enter__ and runs the flow
    with spec.profile.session(), prefect_api(temporary_api) as temporary:
        # with a temporary API, the local cluster's workers start while the server boots (its URL is exported);
        # the cluster closes before the server stops
        if temporary and pending:
            spec.profile.for_tasks(len(pending))
        with spec.profile.started() if temporary else contextlib.nullcontext(), handing_over(spec), \
                _progress_bar(show_progress):
            if temporary:
                temporary.wait()
            state = dog_filter(**request.parameters(), return_state=True)
    if state.is_completed():
        return state.result()
    err = state.result(raise_on_failure=False)
    _fail(str(err).splitlines()[0] if err else f"flow ended {state.name}", code=1)


@app.command()
def run(
    input_path: str = typer.Argument(..., metavar="INPUT",
                                     help="5-D Zarr array, OME-Zarr image, bioformats2raw root or dogflow output"),
    output_path: str = typer.Argument(..., metavar="OUTPUT", help="OME-Zarr group to create or update"),
    channel: int = typer.Option(0, "--channel", "-c", help="channel to filter (when --channels is not given)"),
    channels: Optional[str] = typer.Option(None, help="channels to filter: 0,2 or all [default: --channel]"),
    voxel_size: Optional[str] = typer.Option(None, help="voxel size z,y,x in µm (or with a unit) for inputs without it"),
    sigma_small: Optional[str] = typer.Option(
        None, help="small σ: voxels (2.0, or z,y,x like 1,3,3) or a length (0.5um, 1,2,2um) [default 50/2.35 voxels]"),
    sigma_large: Optional[str] = typer.Option(None, help="large σ, likewise [default 200/2.35 voxels]"),
    fwhm_small: Optional[str] = typer.Option(None, help="small Gaussian as FWHM (σ = FWHM/2.3548), voxels or a length"),
    fwhm_large: Optional[str] = typer.Option(None, help="large Gaussian as FWHM"),
    positions: Optional[str] = typer.Option(None, help="positions, e.g. 0-9,15 [default: all]"),
    cluster: str = typer.Option(defaults.CLUSTER, help="cluster profile name (shipped profiles) or YAML path"),
    output_dtype: str = typer.Option(defaults.OUTPUT_DTYPE, help="float32, float16 (clipped to +-65504) or uint16 "
                                                                 "(rounded, clipped to 0..65535)"),
    truncate: float = typer.Option(defaults.TRUNCATE, help="kernel radius in σ (scipy: int(truncate·σ+0.5))"),
    mode: str = typer.Option(defaults.MODE, help=f"edge mode: {', '.join(defaults.MODES)}"),
    overwrite: bool = typer.Option(False, help="replace an output written with other parameters"),
    force: bool = typer.Option(False, help="recompute positions even if complete and unchanged"),
    retries: int = typer.Option(defaults.RETRIES, help="Prefect retries per position"),
    retry_delay: float = typer.Option(defaults.RETRY_DELAY_SECONDS, help="seconds between retries"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Prefect and Dask INFO logs too"),
) -> None:
    """Filter INPUT into OUTPUT (one task per position)."""
    from flows import api, runlog

    temporary_api = api.start_temporary_api()  # boots while this process imports and validates
    runlog.quiet_terminal(verbose)
    from flows.request import ParameterError, RunRequest, sigma_or_fwhm

    try:
        s_small = sigma_or_fwhm(sigma_small, fwhm_small, "small")
        s_large = sigma_or_fwhm(sigma_large, fwhm_large, "large")
    except ParameterError as exc:
        if temporary_api is not None:
            temporary_api.stop()
        _fail(str(exc))
    request = RunRequest(
        input_path, output_path, channel=channel, channels=channels, voxel_size=voxel_size,
        sigma_small=defaults.SEED_SIGMA_SMALL if s_small is None else s_small,
        sigma_large=defaults.SEED_SIGMA_LARGE if s_large is None else s_large,
        positions=positions, truncate=truncate, mode=mode, output_dtype=output_dtype, overwrite=overwrite,
        force=force, cluster=cluster, retries=retries, retry_delay_seconds=retry_delay,
    )
    summary = run_flow(request, show_progress=progress, temporary_api=temporary_api)
    typer.echo(
        f"dogflow: {summary['processed']} position(s) filtered, {summary['skipped']} already complete; "
        f"output: {summary['output_path']} (position P: array 'P/0', (C, Z, Y, X))"
    )


@app.command()
def demo(
    workdir: str = typer.Option("demo-data", help="folder for the sample input and the output"),
    positions: int = typer.Option(4, help="positions in the sample dataset"),
    cluster: str = typer.Option("local", help="cluster profile"),
) -> None:
    """Write a small synthetic 5-D dataset, filter it, and say where the result is."""
    from flows import api, runlog

    temporary_api = api.start_temporary_api()  # boots while the sample is written
    runlog.quiet_terminal(False)
    from flows.request import RunRequest
    from flows.sample import make_sample

    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    inp, out = wd / "sample.zarr", wd / "sample-dog.zarr"
    arr = make_sample(inp, positions=positions)
    typer.echo(f"dogflow demo: sample dataset {inp} shape {tuple(arr.shape)} uint16")
    summary = run_flow(RunRequest(str(inp), str(out), sigma_small=[1.0, 2.0, 2.0], sigma_large=[3.0, 6.0, 6.0],
                                  overwrite=True, force=True, cluster=cluster, retry_delay_seconds=1.0),
                       temporary_api=temporary_api)
    typer.echo(f"dogflow demo: {summary['processed']} positions filtered.")
    typer.echo(f"dogflow demo: output is {out} (OME-Zarr; position P is array 'P/0', shape (C, Z, Y, X) float32)")
    typer.echo(f"dogflow demo: inspect it with `.venv/bin/dogflow status {out}`")


@app.command()
def plan(
    input_path: str = typer.Argument(..., metavar="INPUT"),
    cluster: str = typer.Option("local", help="cluster profile name or YAML path"),
    channel: int = typer.Option(0),
    positions: Optional[str] = typer.Option(None),
    output_dtype: str = typer.Option("float32", help="float32, float16 or uint16"),
) -> None:
    """Print what a run would do on CLUSTER: job script, memory per task, positions and jobs, the output's size and
    file count. Submits nothing."""
    from flows import clusters
    from flows.request import ParameterError, parse_channels, parse_positions
    from tasks import filters, sharding, store
    from tasks.inputs import StoreError, open_dataset

    try:
        if output_dtype not in defaults.OUTPUT_DTYPES:
            raise StoreError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(defaults.OUTPUT_DTYPES)}")
        ds = open_dataset(input_path)
        parse_channels(None, ds.n_channels, channel)
        pos = parse_positions(positions, ds.n_positions)
        prof = clusters.load_profile(cluster)
        prof.check_memory(filters.memory_per_task(filters.FILTERS[defaults.FILTER], ds.shape, ds.dtype, output_dtype))
        lines = prof.plan_lines()
    except (StoreError, ParameterError, clusters.ProfileError) as exc:
        _fail(str(exc))
    typer.echo(f"input: {input_path} ({ds.layout}) positions {ds.n_positions}, channels {ds.n_channels}, "
               f"(z, y, x) {ds.shape} {ds.dtype}")
    typer.echo(f"positions: {len(pos)}")
    for line in lines:
        typer.echo(line)
    for line in sharding.footprint(store.level_shapes(ds.shape), store.chunk_shape, output_dtype, len(pos), 1).lines():
        typer.echo(line)


@app.command()
def status(output_path: str = typer.Argument(..., metavar="OUTPUT")) -> None:
    """List which (position, channel) of OUTPUT are complete, missing or stale, and the parameters behind them."""
    from tasks import store

    try:
        st = store.status(output_path)
    except store.StoreError as exc:
        _fail(str(exc))
    prov = st.provenance
    typer.echo(f"output: {output_path}  (P, C, Z, Y, X) {tuple(prov['shape'])}  levels {len(prov['levels'])}  "
               f"dogflow {prov.get('version')}, layout {prov['layout_version']}")
    for k, v in st.params.as_dict().items():
        typer.echo(f"  {k}: {v}")
    for k in ("sigma_small_um", "sigma_large_um"):
        if k in prov["params"]:
            typer.echo(f"  {k}: {prov['params'][k]}")
    typer.echo(f"  voxel_size: {prov.get('voxel_size')} {prov.get('unit') or ''}".rstrip())
    if st.input_problem:
        typer.echo(f"  (input unavailable: {st.input_problem}; staleness not checked)")
    typer.echo("position  channel  state")
    for r in st.rows:
        state = f"{r.state} ({r.reason})" if r.reason else r.state
        m = r.marker
        line = f"{r.position:8d}  {r.channel:7d}  {state:<24s}"
        if m:
            line += (f"  σ {m['params']['sigma_small']} / {m['params']['sigma_large']}  {m.get('seconds', 0):.1f}s on "
                     f"{m.get('host')}" + (f" job {m['slurm_job_id']}" if m.get("slurm_job_id") else ""))
        typer.echo(line.rstrip())
    c = st.counts()
    typer.echo(f"{c['complete']} complete, {c['missing']} missing, {c['stale']} stale (of {len(st.rows)})")


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
