"""``dogflow``: run, plan, inspect and demo the DoG flow from a shell.

Every command validates its input first; bad input prints one line
(``dogflow: error: ...``) on stderr and exits with status 2, before any output is
created or any job is submitted. A run whose positions failed exits with status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact 3-D Difference-of-Gaussians over 5-D microscopy Zarr datasets (Prefect + Dask).")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"dogflow: error: {msg}", err=True)
    raise typer.Exit(code)


def _sigmas(sigma: Optional[str], fwhm: Optional[str], default: float, name: str):
    from flows.params import fwhm_to_sigma, parse_sigma

    if sigma is not None and fwhm is not None:
        raise ValueError(f"give --sigma-{name} or --fwhm-{name}, not both")
    if fwhm is not None:
        return list(fwhm_to_sigma(fwhm, f"fwhm_{name}"))
    return list(parse_sigma(sigma if sigma is not None else default, f"sigma_{name}"))


def _progress(output: str, positions: list[int], params, stop: threading.Event) -> None:
    """Poll the completion markers and drive a rich progress bar with ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tasks import store

    src = store.open_input(params.input_path)
    expected = {p: store.expected_marker_key(params, store.input_fingerprint(src, p, params.channel)) for p in positions}
    done0 = None
    with Progress(TextColumn("[bold]dog-filter"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=False, refresh_per_second=2) as bar:
        tid = bar.add_task("positions", total=len(positions))
        while True:
            done = sum(store.position_state(store.read_marker(output, p), expected[p]) == "complete" for p in positions)
            if done0 is None:
                done0 = done
            bar.update(tid, completed=done)
            if stop.wait(1.0):
                done = sum(store.position_state(store.read_marker(output, p), expected[p]) == "complete" for p in positions)
                bar.update(tid, completed=done)
                return


def run_flow(input_path: str, output_path: str, show_progress: bool = True, **kw) -> dict:
    """Validate everything, then run the ``dog-filter`` flow in this process (raises typer.Exit on errors)."""
    from flows import clusters
    from flows.params import ParameterError, validate

    try:
        spec = validate(input_path, output_path, kw["channel"], kw["sigma_small"], kw["sigma_large"], kw["positions"],
                        kw["truncate"], kw["mode"], kw["output_dtype"], kw["overwrite"])
        profile = clusters.load_profile(kw["cluster"])
        clusters.preflight(profile, spec.input_shape[2:], spec.input_dtype, kw["output_dtype"])
    except (ParameterError, clusters.ProfileError) as exc:
        _fail(str(exc))
    from tasks.store import RunLock, RunLockedError

    try:  # refuse at once, before Prefect starts, when another live run holds the output
        RunLock(spec.output_path).check()
    except RunLockedError as exc:
        _fail(str(exc))

    # inside `srun -n N` (runner mode) only rank 1 gets past slurm_runner's __enter__ and runs the flow
    runner = profile.session()
    with runner, prefect_api():
        return _run_with_progress(spec, show_progress, kw)


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API; without one, start a temporary local one for this run.

    The URL is exported in ``PREFECT_API_URL`` so that Dask worker processes, which
    report task states themselves, talk to the same API instead of each starting
    their own temporary server.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # ship the last log lines before the temporary API goes away
        server.stop()


def _run_with_progress(spec, show_progress: bool, kw: dict) -> dict:
    from flows.dog_filter import dog_filter

    stop = threading.Event()
    watcher = None
    if show_progress and sys.stderr.isatty():
        watcher = threading.Thread(target=_progress, args=(spec.output_path, list(spec.positions), spec.params, stop),
                                   daemon=True)
        watcher.start()
    try:
        state = dog_filter(input_path=spec.input_path, output_path=spec.output_path, return_state=True, **kw)
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
    if state.is_completed():
        return state.result()
    err = state.result(raise_on_failure=False)
    _fail(str(err).splitlines()[0] if err else f"flow ended {state.name}", code=1)


@app.command()
def run(
    input_path: str = typer.Argument(..., metavar="INPUT", help="5-D Zarr array (or OME-Zarr group) to filter"),
    output_path: str = typer.Argument(..., metavar="OUTPUT", help="OME-Zarr group to create or update"),
    channel: int = typer.Option(0, "--channel", "-c", help="channel to filter"),
    sigma_small: Optional[str] = typer.Option(None, help="small σ in voxels: 2.0 or z,y,x like 1,3,3 [default 50/2.35]"),
    sigma_large: Optional[str] = typer.Option(None, help="large σ in voxels [default 200/2.35]"),
    fwhm_small: Optional[str] = typer.Option(None, help="small Gaussian as FWHM (σ = FWHM/2.3548)"),
    fwhm_large: Optional[str] = typer.Option(None, help="large Gaussian as FWHM"),
    positions: Optional[str] = typer.Option(None, help="positions, e.g. 0-9,15 [default: all]"),
    cluster: str = typer.Option("local", help="cluster profile name (infra/clusters) or YAML path"),
    output_dtype: str = typer.Option("float32", help="float32 or uint16 (rounded, clipped to 0..65535)"),
    truncate: float = typer.Option(4.0, help="kernel radius in σ (scipy: int(truncate·σ+0.5))"),
    mode: str = typer.Option("nearest", help="edge mode: nearest, reflect, mirror, constant, wrap"),
    overwrite: bool = typer.Option(False, help="replace an output written with other parameters"),
    force: bool = typer.Option(False, help="recompute positions even if complete and unchanged"),
    retries: int = typer.Option(2, help="Prefect retries per position"),
    retry_delay: float = typer.Option(10.0, help="seconds between retries"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Filter INPUT into OUTPUT (one task per position)."""
    from flows.params import SEED_SIGMA_LARGE, SEED_SIGMA_SMALL, ParameterError

    try:
        s_small = _sigmas(sigma_small, fwhm_small, SEED_SIGMA_SMALL, "small")
        s_large = _sigmas(sigma_large, fwhm_large, SEED_SIGMA_LARGE, "large")
    except (ParameterError, ValueError) as exc:
        _fail(str(exc))
    summary = run_flow(
        input_path, output_path, show_progress=progress, channel=channel, sigma_small=s_small, sigma_large=s_large,
        positions=positions, truncate=truncate, mode=mode, output_dtype=output_dtype, overwrite=overwrite,
        force=force, cluster=cluster, retries=retries, retry_delay_seconds=retry_delay,
    )
    typer.echo(
        f"dogflow: {summary['processed']} position(s) filtered, {summary['skipped']} already complete; "
        f"output: {summary['output_path']} (array '0')"
    )


@app.command()
def demo(
    workdir: str = typer.Option("demo-data", help="folder for the sample input and the output"),
    positions: int = typer.Option(4, help="positions in the sample dataset"),
    cluster: str = typer.Option("local", help="cluster profile"),
) -> None:
    """Write a small synthetic 5-D dataset, filter it, and say where the result is."""
    from flows.sample import make_sample

    wd = Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    inp, out = wd / "sample.zarr", wd / "sample-dog.zarr"
    arr = make_sample(inp, positions=positions)
    typer.echo(f"dogflow demo: sample dataset {inp} shape {tuple(arr.shape)} uint16")
    summary = run_flow(
        str(inp), str(out), channel=0, sigma_small=[1.0, 2.0, 2.0], sigma_large=[3.0, 6.0, 6.0], positions=None,
        truncate=4.0, mode="nearest", output_dtype="float32", overwrite=True, force=True, cluster=cluster,
        retries=2, retry_delay_seconds=1.0,
    )
    typer.echo(f"dogflow demo: {summary['processed']} positions filtered.")
    typer.echo(f"dogflow demo: output is {out} (OME-Zarr; array '0', shape (P, Z, Y, X) float32)")
    typer.echo(f"dogflow demo: inspect it with `.venv/bin/dogflow status {out}`")


@app.command()
def plan(
    input_path: str = typer.Argument(..., metavar="INPUT"),
    cluster: str = typer.Option("local", help="cluster profile name or YAML path"),
    channel: int = typer.Option(0),
    positions: Optional[str] = typer.Option(None),
    output_dtype: str = typer.Option("float32"),
) -> None:
    """Print what a run would do on CLUSTER: job script, memory per task, positions and jobs. Submits nothing."""
    from flows import clusters
    from flows.params import ParameterError, parse_positions
    from tasks.store import StoreError, open_input

    try:
        arr = open_input(input_path)
        if not 0 <= channel < arr.shape[1]:
            raise ParameterError(f"channel {channel} out of range: the input has {arr.shape[1]} channels")
        pos = parse_positions(positions, arr.shape[0])
        prof = clusters.load_profile(cluster)
        prof.check_memory(clusters.memory_needed_per_task(tuple(arr.shape[2:]), str(arr.dtype), output_dtype))
        lines = prof.plan_lines()
    except (StoreError, ParameterError, clusters.ProfileError) as exc:
        _fail(str(exc))
    typer.echo(f"input: {input_path} shape {tuple(arr.shape)} {arr.dtype}")
    typer.echo(f"positions: {len(pos)}")
    for line in lines:
        typer.echo(line)


@app.command()
def status(output_path: str = typer.Argument(..., metavar="OUTPUT")) -> None:
    """List which positions of OUTPUT are complete, missing or stale, and the parameters behind them."""
    from tasks import store

    prov = store.read_provenance(output_path) if store.output_exists(output_path) else None
    if prov is None:
        _fail(f"not a dogflow output: {output_path}")
    params = store.FilterParams.from_dict(prov["params"])
    P = prov["shape"][0]
    typer.echo(f"output: {output_path}  shape {tuple(prov['shape'])}  dogflow {prov.get('version')}")
    for k, v in params.as_dict().items():
        typer.echo(f"  {k}: {v}")
    try:
        src = store.open_input(params.input_path)
    except store.StoreError as exc:
        src = None
        typer.echo(f"  (input unavailable: {exc}; staleness not checked)")
    checked = store.scan_positions(output_path, src, params, range(min(P, src.shape[0]))) if src is not None else {}
    counts = {"complete": 0, "missing": 0, "stale": 0}
    for p in range(P):
        if p in checked:
            st, marker, expected = checked[p]
            why = f" ({store.stale_reason(marker, expected)})" if st == "stale" else ""
        else:  # input unavailable: only the marker can be read
            marker = store.read_marker(output_path, p)
            st, why = ("complete" if marker else "missing"), ""
        counts[st] += 1
        if marker:
            sig = f"σ {marker['params']['sigma_small']} / {marker['params']['sigma_large']}"
            typer.echo(f"{p:6d}  {st + why:<24s}  {sig}  {marker.get('seconds', 0):.1f}s on {marker.get('host')}"
                       + (f" job {marker['slurm_job_id']}" if marker.get("slurm_job_id") else ""))
        else:
            typer.echo(f"{p:6d}  {st}")
    typer.echo(f"{counts['complete']} complete, {counts['missing']} missing, {counts['stale']} stale (of {P})")


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
