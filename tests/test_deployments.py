"""prefect.yaml end to end, with the commands a Prefect user types, against a real `prefect server start`:

1. plain: `prefect work-pool create hpc --type process`, `prefect --no-prompt deploy --all` from the
   repository root on a server with nothing set, `prefect worker start --pool hpc`, and
   `prefect deployment run dog-filter/on-demand --params ... --watch` (the embedded `local` profile);
2. site: `deployments/deploy.sh SITE_ENV` (= make deploy) overrides the defaults (lean profile, channel,
   σ, the nightly dataset and time zone), and real nightly runs follow.

One server + worker serve the whole module; the auth test starts a second server.
Service logs, site/worker env files and CLI transcripts are under the module's tmp dir
(printed on failure).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import zarr

from conftest import ROOT, assert_output_exact
from flows.sample import make_sample, sample_volume
from tasks.markers import Markers
from tasks.lock import LOCK_KEY
from tasks.output import Output
from prefect_services import (
    POOL,
    PlainWorker,
    PrefectServer,
    Worker,
    completed_positions,
    deploy,
    flow_run_logs,
    flow_run_state,
    processed_count,
    run_deployment,
    summary_markdown,
    wait_flow_run,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

SHAPE = (8, 32, 32)
CHUNKS = (4, 16, 16)
SS, SL = 1.0, 2.5
CHANNEL = 1
# A lean LocalCluster (one in-process worker, 2 threads) for the site deployments: those runs
# test the deployments, not Dask; the plain deployment runs the embedded `local` profile.
LEAN_PROFILE = """\
cluster_type: local
n_workers: 1
threads_per_worker: 2
processes: false
memory_limit: 4GiB
dashboard_address: ":0"
"""


def _sample(path: Path, positions: int, seed: int) -> Path:
    make_sample(path, positions=positions, channels=2, shape=SHAPE, chunks=CHUNKS, blobs=6, seed=seed)
    return path


def _assert_output_exact(inp: Path, out: Path, ss=SS, sl=SL, channel=CHANNEL) -> None:
    assert Output(out).provenance()["shape"][0] == zarr.open_array(str(inp), mode="r").shape[0]
    assert_output_exact(out, inp, ss, sl, channel=channel, marked=False)


def _marker_mtimes(out: Path) -> dict[int, int]:
    return {p: (Path(out) / Markers.key(p, c)).stat().st_mtime_ns for p, c in Output(out).markers.marked()}


class Site:
    """The module's services and datasets."""

    def __init__(self, workdir: Path, server: PrefectServer, worker: Worker):
        self.workdir = workdir
        self.server = server
        self.worker = worker
        self.cli_log = workdir / "cli.log"
        self.nightly_in = workdir / "nightly-in.zarr"
        self.nightly_out = workdir / "nightly-out.ome.zarr"
        self.lean_profile = workdir / "lean-cluster.yaml"

    def run(self, name, params=None, watch=True, timeout=300):
        return run_deployment(self.server, name, params, watch=watch, timeout=timeout, log=self.cli_log)

    def debug(self, flow_run_id: str | None = None) -> str:
        parts = [f"service logs under {self.workdir}"]
        if flow_run_id:
            parts.append(f"flow run logs:\n{flow_run_logs(self.server, flow_run_id)}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A fresh server on PostgreSQL (the production setup) with nothing set; the user's commands: pool,
    `deploy --all` from the checkout, worker."""
    workdir = tmp_path_factory.mktemp("deployments")
    server = PrefectServer(workdir, database="postgres").start()
    worker = None
    try:
        s = Site(workdir, server, None)  # type: ignore[arg-type]
        server.cli("work-pool", "create", POOL, "--type", "process", log=s.cli_log)
        res = server.cli("--no-prompt", "deploy", "--all", log=s.cli_log)  # cwd: the repository root
        assert "dog-filter/nightly" in res.stdout and "dog-filter/on-demand" in res.stdout, res.stdout
        worker = PlainWorker(server).start()
        s.worker = worker
        yield s
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


@pytest.fixture(scope="module")
def site(plain):
    """The same server after `make deploy` with this site's values (an exported variable beats the file)."""
    _sample(plain.nightly_in, positions=3, seed=11)
    plain.lean_profile.write_text(LEAN_PROFILE)
    res = deploy(plain.server, {
        "DOGFLOW_INPUT_PATH": str(plain.nightly_in),
        "DOGFLOW_OUTPUT_PATH": str(plain.nightly_out),
        "DOGFLOW_CLUSTER": "local",  # overridden by the environment below
        "DOGFLOW_CHANNEL": CHANNEL,
        "DOGFLOW_SIGMA_SMALL": SS,
        "DOGFLOW_SIGMA_LARGE": SL,
        "DOGFLOW_TIMEZONE": "America/New_York",
    }, env={"DOGFLOW_CLUSTER": str(plain.lean_profile)}, log=plain.workdir / "deploy.log")
    assert "nightly schedule active" in res.stdout, res.stdout
    return plain


def _schema(dep) -> dict:
    return dep.parameter_openapi_schema["properties"]


def test_plain_deploy_all_has_working_defaults(plain):
    from flows.clusters import shipped_profiles
    from tasks.defaults import SEED_SIGMA_LARGE, SEED_SIGMA_SMALL

    with plain.server.client() as c:
        pool = c.read_work_pool(POOL)
        nightly = c.read_deployment_by_name("dog-filter/nightly")
        on_demand = c.read_deployment_by_name("dog-filter/on-demand")
        variables = c.read_variables()
    assert pool.type == "process" and variables == []  # nothing set on the server
    for d in (nightly, on_demand):
        assert d.work_pool_name == POOL
        assert d.entrypoint == "flows/dog_filter.py:dog_filter"
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        props = _schema(d)
        # not given (""): as the output was made, else the seed's sigma (flows/params.py)
        assert props["sigma_small"]["default"] == "" and props["sigma_large"]["default"] == ""
        assert f"{SEED_SIGMA_SMALL:.4g}" in props["sigma_small"]["description"]
        assert f"{SEED_SIGMA_LARGE:.4g}" in props["sigma_large"]["description"]
        assert props["channels"]["default"] == "" and props["cluster"]["default"] == "local"
        # the UI form offers the shipped profile names, and a separate text field for a YAML path
        assert props["cluster"]["enum"] == shipped_profiles() and props["cluster_file"]["type"] == "string"
    assert on_demand.parameters == {} and on_demand.schedules == []
    assert nightly.parameters == {"input_path": "", "output_path": ""}
    [sched] = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("0 2 * * *", "Europe/Berlin", False)
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1


def test_plain_on_demand_run_is_exact(plain):
    """`prefect deployment run dog-filter/on-demand --params '{...}' --watch` on the embedded local profile."""
    inp = _sample(plain.workdir / "plain-in.zarr", positions=2, seed=7)
    out = plain.workdir / "plain-out.ome.zarr"
    params = {"input_path": str(inp), "output_path": str(out), "sigma_small": 1.0, "sigma_large": 2.0}
    fr_id, res = plain.run("dog-filter/on-demand", params)
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout + res.stderr + plain.debug(fr_id)
    _assert_output_exact(inp, out, 1.0, 2.0, channel=0)
    assert "infra/clusters/local.yaml" in flow_run_logs(plain.server, fr_id)  # the embedded default ran it


def test_plain_nightly_without_a_dataset_says_so(plain):
    fr_id, res = plain.run("dog-filter/nightly")
    assert res.returncode == 0, res.stdout + res.stderr + plain.debug(fr_id)
    state = flow_run_state(plain.server, fr_id)
    assert state.is_completed() and "no dataset configured" in (state.message or ""), state
    assert state.name == "Completed", state  # Prefect's standard name: the UI's default filters show it


def test_site_values_override_the_defaults(site):
    with site.server.client() as c:
        nightly = c.read_deployment_by_name("dog-filter/nightly")
        on_demand = c.read_deployment_by_name("dog-filter/on-demand")
    assert nightly.parameters == {"input_path": str(site.nightly_in), "output_path": str(site.nightly_out),
                                  "cluster_file": str(site.lean_profile), "channels": str(CHANNEL),
                                  "sigma_small": str(SS), "sigma_large": str(SL)}
    assert on_demand.parameters == {"cluster_file": str(site.lean_profile), "channels": str(CHANNEL),
                                    "sigma_small": str(SS), "sigma_large": str(SL)}
    [sched] = nightly.schedules
    assert (sched.schedule.timezone, sched.active) == ("America/New_York", True)
    for d in (nightly, on_demand):
        assert d.work_pool_name == POOL
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"DOGFLOW_INPUT_PATH": "/data/in.zarr"}, "give both DOGFLOW_INPUT_PATH and DOGFLOW_OUTPUT_PATH"),
        ({"DOGFLOW_TIMEZONE": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"DOGFLOW_CLUSTER": "nosuch"}, "unknown cluster profile 'nosuch'"),
        ({"DOGFLOW_SIGMA_SMALL": "[1, 2]x"}, "sigma_small"),
        ({"DOGFLOW_CHANNEL": "one"}, "channel"),
    ],
)
def test_bad_site_values_are_refused_before_deploying(site, values, message):
    with site.server.client() as c:
        before = c.read_deployment_by_name("dog-filter/on-demand").updated
    res = deploy(site.server, values, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deploy.sh: error: ") and message in lines[0], res.stderr
    with site.server.client() as c:
        assert c.read_deployment_by_name("dog-filter/on-demand").updated == before


def test_nightly_schedule_and_scheduled_runs(site):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with site.server.client() as c:
        nightly = c.read_deployment_by_name("dog-filter/nightly")
        [sched] = nightly.schedules
        assert sched.active
        assert sched.schedule.cron == "0 2 * * *"
        assert sched.schedule.timezone == "America/New_York"
        runs = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                ),
            )
            if runs:
                break
            time.sleep(1)
    assert runs, "the server scheduled no runs of dog-filter/nightly"
    from zoneinfo import ZoneInfo

    for fr in runs:
        local = fr.expected_start_time.astimezone(ZoneInfo("America/New_York"))
        assert (local.hour, local.minute) == (2, 0), local


@pytest.fixture(scope="module")
def nightly_first(site):
    """Two nightly runs triggered at once (deployment defaults = the site's variables): they must not overlap."""
    a, res_a = site.run("dog-filter/nightly", watch=False)
    b, res_b = site.run("dog-filter/nightly", watch=False)
    fa, fb = wait_flow_run(site.server, a), wait_flow_run(site.server, b)
    return {a: fa, b: fb}


def test_nightly_runs_never_overlap(site, nightly_first):
    states = sorted(fr.state.type.value for fr in nightly_first.values())
    assert states == ["CANCELLED", "COMPLETED"], (states, site.debug())
    [done] = [i for i, fr in nightly_first.items() if fr.state.is_completed()]
    assert processed_count(summary_markdown(site.server, done)) == 3
    _assert_output_exact(site.nightly_in, site.nightly_out)


def test_nightly_rerun_on_unchanged_input_processes_nothing(site, nightly_first):
    before = _marker_mtimes(site.nightly_out)
    fr_id, res = site.run("dog-filter/nightly", {"input_path": str(site.nightly_in)})
    assert res.returncode == 0, res.stdout + res.stderr + site.debug(fr_id)
    md = summary_markdown(site.server, fr_id)
    assert "processed: **0**" in md, md
    assert _marker_mtimes(site.nightly_out) == before


def test_nightly_recomputes_only_the_changed_position(site, nightly_first):
    src = zarr.open_array(str(site.nightly_in), mode="r+")
    src[1, CHANNEL] = sample_volume(SHAPE, 6, np.random.default_rng(99))
    before = _marker_mtimes(site.nightly_out)
    fr_id, res = site.run("dog-filter/nightly", {"input_path": str(site.nightly_in)})
    assert res.returncode == 0, res.stdout + res.stderr + site.debug(fr_id)
    md = summary_markdown(site.server, fr_id)
    assert processed_count(md) == 1 and completed_positions(md) == [1], md
    after = _marker_mtimes(site.nightly_out)
    assert [p for p in after if after[p] != before.get(p)] == [1]
    _assert_output_exact(site.nightly_in, site.nightly_out)


def test_nightly_adds_an_appended_position(site, nightly_first):
    src = zarr.open_array(str(site.nightly_in), mode="r+")
    n = src.shape[0]
    src.resize((n + 1, *src.shape[1:]))
    rng = np.random.default_rng(123)
    for c in range(src.shape[1]):
        src[n, c] = sample_volume(SHAPE, 6, rng)
    fr_id, res = site.run("dog-filter/nightly", {"input_path": str(site.nightly_in)})
    assert res.returncode == 0, res.stdout + res.stderr + site.debug(fr_id)
    md = summary_markdown(site.server, fr_id)
    assert processed_count(md) == 1 and completed_positions(md) == [n], md
    assert sorted(_marker_mtimes(site.nightly_out)) == list(range(n + 1))
    _assert_output_exact(site.nightly_in, site.nightly_out)


class HeldScheduler:
    """A real Dask scheduler (``dask scheduler``) that gets a worker only when the test says so: a run on it
    holds its output's lock, its positions waiting, for as long as the test needs."""

    def __init__(self, workdir: Path, server: PrefectServer):
        self.workdir, self.server = workdir, server
        self.file = workdir / "held-scheduler.json"
        self.procs: list = []
        self.logs: list = []

    def __enter__(self) -> "HeldScheduler":
        import json
        import subprocess

        from prefect_services import VENV_BIN

        env = self.server.client_env()
        self.procs.append(subprocess.Popen(
            [str(VENV_BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.file)], cwd=self.workdir, env=env, stdout=subprocess.DEVNULL,
            stderr=self._log("held-scheduler.log"), start_new_session=True))
        deadline = time.monotonic() + 60
        while not self.file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.address = json.loads(self.file.read_text())["address"]
        self.profile = self.workdir / "held.yaml"
        self.profile.write_text(f"cluster_type: address\naddress: {self.address}\n")
        return self

    def _log(self, name: str):
        self.logs.append(open(self.workdir / name, "wb"))
        return self.logs[-1]

    def add_worker(self) -> None:
        import subprocess

        from prefect_services import VENV_BIN

        self.procs.append(subprocess.Popen(
            [str(VENV_BIN / "dask"), "worker", self.address, "--nthreads", "2", "--no-dashboard"],
            cwd=ROOT, env=self.server.client_env(), stdout=subprocess.DEVNULL,
            stderr=self._log("held-worker.log"), start_new_session=True))

    def __exit__(self, *exc) -> None:
        from prefect_services import _stop_group

        for p in reversed(self.procs):
            _stop_group(p)
        for f in self.logs:
            f.close()


def test_nightly_meeting_a_live_run_completes_naming_it(site, nightly_first):
    """An on-demand run on the nightly output holds its lock (its positions wait for a worker). A nightly run
    then ends Completed, naming the holder; another on-demand run on that output fails at once, in one line;
    the holder, given a worker, completes exactly, undisturbed."""
    n = zarr.open_array(str(site.nightly_in), mode="r").shape[0]
    with HeldScheduler(site.workdir, site.server) as held:
        holder_id, _ = site.run("dog-filter/on-demand", {
            "input_path": str(site.nightly_in), "output_path": str(site.nightly_out), "force": True,
            "cluster_file": str(held.profile)}, watch=False)
        lock = (Path(site.nightly_out) / LOCK_KEY)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and holder_id not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.5)
        assert holder_id in (lock.read_text() if lock.exists() else ""), site.debug(holder_id)
        with site.server.client() as c:
            holder_name = c.read_flow_run(holder_id).name

        fr_id, res = site.run("dog-filter/nightly")
        assert res.returncode == 0, res.stdout + res.stderr + site.debug(fr_id)
        state = flow_run_state(site.server, fr_id)
        assert state.type.value == "COMPLETED" and state.name == "Completed", state
        assert f"flow run '{holder_name}' ({holder_id}) on host " in state.message and " since " in state.message, state

        od_id, res = site.run("dog-filter/on-demand", {"input_path": str(site.nightly_in),
                                                       "output_path": str(site.nightly_out)})
        assert res.returncode != 0, res.stdout
        od = flow_run_state(site.server, od_id)
        assert od.is_failed() and "another dogflow run is writing to this output" in od.message, od
        assert holder_id in od.message and "\n" not in od.message.strip(), od.message

        assert flow_run_state(site.server, holder_id).is_running()  # undisturbed, still waiting for a worker
        held.add_worker()
        fr = wait_flow_run(site.server, holder_id, timeout=240)
    assert fr.state.is_completed(), (fr.state, site.debug(holder_id))
    md = summary_markdown(site.server, holder_id)
    assert processed_count(md) == n and completed_positions(md) == list(range(n)), md
    _assert_output_exact(site.nightly_in, site.nightly_out)
    assert not (Path(site.nightly_out) / LOCK_KEY).exists()


def test_nightly_other_sigma_is_refused_unless_overwrite(site, nightly_first):
    before = _marker_mtimes(site.nightly_out)
    fr_id, res = site.run("dog-filter/nightly", {"sigma_small": 1.5})
    assert res.returncode != 0, res.stdout
    state = flow_run_state(site.server, fr_id)
    assert state.is_failed(), state
    logs = flow_run_logs(site.server, fr_id)
    assert "other parameters" in (state.message or "") + logs, (state.message, logs)
    assert _marker_mtimes(site.nightly_out) == before, "a refused run must not touch the output"

    fr_id, res = site.run("dog-filter/nightly", {"sigma_small": 1.5, "overwrite": True})
    assert res.returncode == 0, res.stdout + res.stderr + site.debug(fr_id)
    n = zarr.open_array(str(site.nightly_in), mode="r").shape[0]
    md = summary_markdown(site.server, fr_id)
    assert processed_count(md) == n and completed_positions(md) == list(range(n)), md
    _assert_output_exact(site.nightly_in, site.nightly_out, ss=1.5)


LOAD_POSITIONS = 840  # a lab's dataset: 840 positions (small ones here: the load is on Prefect and its database)


@pytest.mark.timeout(1200)
def test_load_840_positions_on_postgres(site):
    """One on-demand deployment run of 840 small positions on the PostgreSQL-backed server: every position is
    filtered exactly, the server holds a Completed task run for each, and the summary lists them all."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    assert site.server.database == "postgres"
    inp, out = site.workdir / "load-in.zarr", site.workdir / "load-out.ome.zarr"
    make_sample(inp, positions=LOAD_POSITIONS, channels=1, shape=(4, 16, 16), chunks=(4, 16, 16), blobs=2, seed=5)
    t0 = time.monotonic()
    fr_id, res = site.run("dog-filter/on-demand", {"input_path": str(inp), "output_path": str(out), "channels": 0},
                          timeout=1000)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0 and "Completed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:] + site.debug(fr_id)
    print(f"{LOAD_POSITIONS} positions on PostgreSQL: {elapsed:.0f} s")
    md = summary_markdown(site.server, fr_id)
    assert processed_count(md) == LOAD_POSITIONS and completed_positions(md) == list(range(LOAD_POSITIONS)), md[-2000:]
    assert Output(out).markers.marked() == [(p, 0) for p in range(LOAD_POSITIONS)]
    assert_output_exact(out, inp, SS, SL, channel=0, marked=False)
    with site.server.client() as c:
        [child] = c.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr_id])))
    body = {"flow_runs": {"id": {"any_": [str(child.id)]}}, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    r = httpx.post(f"{site.server.api_url}/task_runs/count", json=body, timeout=60)
    assert r.status_code == 200 and r.json() == LOAD_POSITIONS, (r.status_code, r.text)
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with site.server.client() as c:
        arts = {a.key for a in c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[child.id, fr_id])))}
    assert {"dog-filter-summary", "dog-filter-progress", "dog-filter-preview"} <= arts, arts


def test_auth_string_server(site, tmp_path):
    """A server with PREFECT_SERVER_API_AUTH_STRING: deploy, worker and CLI work with
    PREFECT_API_AUTH_STRING; a request without credentials is refused."""
    site.worker.stop()  # the first server's worker is done; keep the CPU for this one
    auth = "dogflow:s3cret-test"
    server = PrefectServer(tmp_path / "auth", auth_string=auth).start()
    worker = None
    try:
        inp = _sample(tmp_path / "auth-in.zarr", positions=1, seed=3)
        out = tmp_path / "auth-out.ome.zarr"
        profile = tmp_path / "lean-cluster.yaml"
        profile.write_text(LEAN_PROFILE)
        deploy(server, {"DOGFLOW_INPUT_PATH": str(inp), "DOGFLOW_OUTPUT_PATH": str(out), "DOGFLOW_CLUSTER": str(profile),
                        "DOGFLOW_SIGMA_SMALL": SS, "DOGFLOW_SIGMA_LARGE": SL},
               log=tmp_path / "auth" / "deploy.log")
        # no credentials -> refused; with them -> fine
        body = {"limit": 5}
        r = httpx.post(f"{server.api_url}/deployments/filter", json=body, timeout=10)
        assert r.status_code in (401, 403), (r.status_code, r.text)
        r = httpx.post(f"{server.api_url}/flows/filter", json=body, timeout=10, auth=("dogflow", "wrong"))
        assert r.status_code in (401, 403), (r.status_code, r.text)
        r = httpx.post(f"{server.api_url}/deployments/filter", json=body, timeout=10, auth=tuple(auth.split(":", 1)))
        assert r.status_code == 200 and {d["name"] for d in r.json()} == {"nightly", "on-demand"}, r.text
        # the CLI without the auth string is refused too
        env = server.client_env()
        env.pop("PREFECT_API_AUTH_STRING")
        res = server.cli("deployment", "ls", env=env, check=False)
        assert res.returncode != 0, res.stdout

        worker = Worker(server).start()
        fr_id, res = run_deployment(server, "dog-filter/on-demand",
                                    {"input_path": str(inp), "output_path": str(out), "channels": CHANNEL},
                                    log=tmp_path / "auth" / "cli.log")
        assert res.returncode == 0 and "Completed" in res.stdout, (
            res.stdout + res.stderr + f"\nlogs under {tmp_path / 'auth'}")
        _assert_output_exact(inp, out)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
