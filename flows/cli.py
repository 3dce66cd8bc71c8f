"""``dogflow``: run, plan, inspect and demo the DoG flow from a shell.

Every command validates its input first; bad input prints one line
(``dogflow: error: ...``) on stderr and exits with status 2, before any output is
created or any job is submitted. A run whose positions failed exits with status 1.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Any, Iterator

import typer

from flows import params
from tasks import units

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


def _request(values: dict[str, Any], **fixed: Any):
    """The RunRequest of a command line's values (refused in one line), or of ``fixed`` parameters."""
    from flows.request import ParameterError, RunRequest

    try:
        return RunRequest(**{**params.from_cli(values), **fixed})
    except (ValueError, ParameterError) as exc:
        _fail(str(exc))


def _execute(request, show_progress: bool, verbose: bool, temporary_api: Any = "start") -> dict:
    """:func:`flows.run.execute`, its refusals and failures as one line and an exit status."""
    from flows import run as run_, runlog
    from flows.request import ParameterError

    try:
        return run_.execute(request, notice=lambda line: typer.echo(f"dogflow: {line}"),
                            progress=(lambda: _progress_bar(True)) if show_progress else None,
                            before_prefect=lambda: runlog.quiet_terminal(verbose), temporary_api=temporary_api)
    except ParameterError as exc:
        _fail(str(exc))
    except run_.RunFailed as exc:
        _fail(str(exc), code=1)


def _run(verbose: bool = False, progress: bool = True, **values: Any) -> None:
    summary = _execute(_request(values), show_progress=progress, verbose=verbose)
    typer.echo(
        f"dogflow: {summary['processed']} position(s) filtered, {summary['skipped']} already complete "
        f"({summary.get('pairs', 0)} (position, channel) pair(s) computed); "
        f"output: {summary['output_path']} (position P: array 'P/0', (C, Z, Y, X))"
    )
    if summary.get("lost_workers"):
        from flows.reports import lost_line  # imports Prefect: only when there is something to say

        for job in summary["lost_workers"]:
            typer.echo(f"dogflow: worker job {lost_line(job)} was lost during the run and replaced")


_run.__signature__ = params.cli_signature("run", [  # type: ignore[attr-defined]
    inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(True, help="show a progress bar (on a terminal)")),
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--verbose", "-v", help="show Prefect and Dask INFO logs too")),
])
_run.__doc__ = "Filter INPUT into OUTPUT (one task per position); a rerun continues OUTPUT as it was made."
app.command("run")(_run)


@app.command()
def demo(
    workdir: str = typer.Option("demo-data", help="folder for the sample input and the output"),
    positions: int = typer.Option(4, help="positions in the sample dataset"),
    cluster: str = typer.Option(params.BY_NAME["cluster"].default, help="cluster profile name or YAML path"),
) -> None:
    """Write a small synthetic 5-D dataset, filter it, and say where the result is."""
    from flows import api

    temporary_api = api.start_temporary_api()  # boots while the sample is written
    from flows.sample import make_sample

    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    inp, out = wd / "sample.zarr", wd / "sample-dog.zarr"
    arr = make_sample(inp, positions=positions)
    typer.echo(f"dogflow demo: sample dataset {inp} shape {tuple(arr.shape)} uint16")
    request = _request({}, input_path=str(inp), output_path=str(out), sigma_small="1,2,2", sigma_large="3,6,6",
                       overwrite=True, force=True, retry_delay_seconds=1.0, **params.split_cluster(cluster))
    summary = _execute(request, show_progress=True, verbose=False, temporary_api=temporary_api)
    typer.echo(f"dogflow demo: {summary['processed']} positions filtered.")
    typer.echo(f"dogflow demo: output is {out} (OME-Zarr; position P is array 'P/0', shape (C, Z, Y, X) "
               f"{request.output_dtype or params.BY_NAME['output_dtype'].seed})")
    typer.echo(f"dogflow demo: inspect it with `.venv/bin/dogflow status {out}`")


def _plan(**values: Any) -> None:
    from flows.request import ParameterError

    request = _request({k: v for k, v in values.items()}, output_path=values.get("output_path") or "")
    try:
        spec = request.validate(plan_only=True)
        pending = None
        if spec.output_path:
            from flows import run as run_

            pending = run_.pending_work(spec)[0]
    except ParameterError as exc:
        _fail(str(exc))
    n_pos, n_chan, *zyx = spec.input_shape
    typer.echo(f"input: {spec.input_path} positions {n_pos}, channels {n_chan}, (z, y, x) {tuple(zyx)} "
               f"{spec.input_dtype}")
    if spec.notice:
        typer.echo(spec.notice)
    p = spec.params
    f = p.filter
    sigmas = ", ".join(f"{n} {units.format_lengths(getattr(f, n))}" for n in f.sigmas)
    typer.echo(f"filter: {p.kind}, {sigmas} voxels, truncate {f.truncate:g}, mode {f.mode}, "
               f"output {p.output_dtype}; channels {','.join(map(str, spec.channels))}")
    line = f"positions: {len(spec.positions)}"
    if pending is not None:
        line += f" ({len(pending)} to filter, {len(spec.positions) - len(pending)} complete and unchanged)"
    typer.echo(line)
    for line in spec.profile.plan_lines():
        typer.echo(line)
    from tasks import pyramid, sharding

    footprint = sharding.footprint(pyramid.level_shapes(tuple(zyx)), pyramid.chunk_shape, spec.params.output_dtype,
                                   len(spec.positions), len(spec.channels))
    for line in footprint.lines():
        typer.echo(line)


_plan.__signature__ = params.cli_signature("plan")  # type: ignore[attr-defined]
_plan.__doc__ = ("Print what `dogflow run` would do on CLUSTER: the parameters, positions, memory per task, "
                 "workers and job script. OUTPUT (optional): what of it is still to do. Submits nothing.")
app.command("plan")(_plan)


@app.command()
def status(output_path: str = typer.Argument(..., metavar="OUTPUT")) -> None:
    """List which (position, channel) of OUTPUT are complete, missing or stale, and the parameters behind them."""
    from tasks.output import Output
    from tasks.storage import StoreError

    try:
        st = Output(output_path).status()
    except StoreError as exc:
        _fail(str(exc))
    prov = st.provenance
    typer.echo(f"output: {output_path}  (P, C, Z, Y, X) {tuple(prov['shape'])}  levels {len(prov['levels'])}  "
               f"dogflow {prov.get('version')}, layout {prov['layout_version']}")
    typer.echo(f"  filter: {st.params.kind} ({st.params.filter.describe()} voxels)")
    for k, v in st.params.as_dict().items():
        if k != "filter":
            typer.echo(f"  {k}: {_sigma_words(v) if k.startswith('sigma') else v}")
    for k in ("sigma_small_um", "sigma_large_um", "sigma_um"):
        if k in prov["params"]:
            typer.echo(f"  {k}: {_sigma_words(prov['params'][k], 'um')}")
    vs = prov.get("voxel_size")
    typer.echo(f"  voxel_size: {units.format_lengths(vs) if vs else None} {prov.get('unit') or ''}".rstrip())
    if st.input_problem:
        typer.echo(f"  (input unavailable: {st.input_problem}; staleness not checked)")
    typer.echo("position  channel  state")
    for r in st.rows:
        state = f"{r.state} ({r.reason})" if r.reason else str(r.state)
        m = r.marker
        line = f"{r.position:8d}  {r.channel:7d}  {state:<24s}"
        if m:
            line += (f"  {st.params.filter.describe()}  {m.get('seconds', 0):.1f}s on "
                     f"{m.get('host')}" + (f" job {m['slurm_job_id']}" if m.get("slurm_job_id") else ""))
        typer.echo(line.rstrip())
    c = st.counts()
    typer.echo(f"{c['complete']} complete, {c['missing']} missing, {c['stale']} stale (of {len(st.rows)})")


def _sigma_words(values, unit: str = "") -> str:
    """σ as dogflow prints it everywhere: 4 significant digits, one value when the three are equal."""
    return units.format_lengths(values, unit) if isinstance(values, (list, tuple)) else str(values)


def main() -> None:
    from flows import run

    run.quiet_prefect()
    app()


if __name__ == "__main__":
    main()
