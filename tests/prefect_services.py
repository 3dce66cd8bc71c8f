"""Real Prefect services for the deployment and UI tests: a `prefect server start`
subprocess, `deployments/deploy.sh` against it, and a process worker started through
`infra/prefect/worker.sh`. No mocks: every piece is the one a site runs.

Processes run in their own session (process group); teardown stops the whole group.
Their output goes to log files under the given directory, for debugging.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import tempfile
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
POOL = "hpc"

# Variables of the environment of the pytest process that must not leak into the
# services (e.g. PREFECT_API_URL of the session's test harness).
_SCRUB = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
          "PREFECT_PROFILES_PATH", "PREFECT_HOME", "PREFECT_UI_API_URL", "DOGFLOW_SITE_ENV", "DOGFLOW_WORKER_ENV")


_TEMPLATE_DB: Optional[Path] = None


def _save_template_db(db: Path) -> None:
    """Keep a consistent copy of the first healthy server's (migrated) database for the next servers."""
    global _TEMPLATE_DB
    if _TEMPLATE_DB is not None or not db.exists():
        return
    dest = Path(tempfile.mkdtemp(prefix="dogflow-prefect-db-")) / "prefect.db"
    atexit.register(shutil.rmtree, dest.parent, True)
    try:
        with contextlib.closing(sqlite3.connect(db)) as src, contextlib.closing(sqlite3.connect(dest)) as dst:
            src.backup(dst)
        _TEMPLATE_DB = dest
    except sqlite3.Error:
        shutil.rmtree(dest.parent, ignore_errors=True)


POSTGRES_SH = ROOT / "infra" / "postgres" / "postgres.sh"


class Postgres:
    """The PostgreSQL of ``infra/postgres/postgres.sh`` (started by .ci/run): one fresh database per server."""

    @staticmethod
    def _sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(POSTGRES_SH), *args], capture_output=True, text=True, timeout=120)

    @classmethod
    def available(cls) -> Optional[str]:
        """None when it accepts connections, else why not."""
        if cls._sh("status").returncode != 0:
            return "PostgreSQL is not running; start it with `bash infra/postgres/postgres.sh start`"
        return None

    @classmethod
    def create(cls, prefix: str = "dogflow_test") -> tuple[str, str]:
        """(name, Prefect database URL) of a new empty database; drop it with :meth:`drop`."""
        why = cls.available()
        require(why is None, why or "")
        name = f"{prefix}_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        res = cls._sh("createdb", name)
        assert res.returncode == 0, f"createdb {name}: {res.stderr}"
        return name, cls._sh("url", name).stdout.strip()

    @classmethod
    def drop(cls, name: str) -> None:
        cls._sh("dropdb", name)


def require(condition: Any, reason: str) -> None:
    """Skip (visible reason) when a service is unavailable; fail instead under DOGFLOW_REQUIRE_SERVICES=1 (CI)."""
    if condition:
        return
    if os.environ.get("DOGFLOW_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable (DOGFLOW_REQUIRE_SERVICES=1): {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict[str, str]:
    """A clean environment for Prefect subprocesses: own PREFECT_HOME, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("DOGFLOW_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(ROOT / ".venv"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("PYTHONPATH", None)
    return env


def _stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # anything left in the group (children of a stopped leader included)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _await_ready(service, ready, timeout: float, interval: float, what: str) -> None:
    """Poll ``ready()`` until true while ``service.proc`` lives; otherwise stop it and skip/fail with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and service.proc.poll() is None:
        if ready():
            return
        time.sleep(interval)
    rc = service.proc.poll()
    service.stop()
    require(False, f"{what} within {timeout:.0f} s (exit status {rc}); log tail:\n{_tail(service.log)}")


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class PrefectServer:
    """`prefect server start` on a free port of 127.0.0.1, with its own PREFECT_HOME; its database is SQLite in
    that home (``database="sqlite"``, Prefect's default) or a fresh PostgreSQL database (``"postgres"``, the
    production setup: ``PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``)."""

    def __init__(self, workdir: Path, auth_string: Optional[str] = None, ui: bool = False,
                 startup_timeout: float = 90.0, extra_env: Optional[dict] = None, database: str = "sqlite"):
        assert database in ("sqlite", "postgres"), database
        self.database = database
        self.db_name: Optional[str] = None
        self.db_url: Optional[str] = None
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.auth_string = auth_string
        self.ui = ui
        self.log = self.workdir / "server.log"
        self.home = self.workdir / "server-home"
        self.client_home = self.workdir / "client-home"
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.extra_env = dict(extra_env or {})

    def start(self) -> "PrefectServer":
        env = base_env(self.home)
        env.update(
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            # scheduled runs of the nightly deployment appear within seconds
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
            PREFECT_UI_ENABLED="true" if self.ui else "false",
        )
        if self.auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string
        env.update(self.extra_env)
        if self.database == "postgres":
            self.db_name, self.db_url = Postgres.create()
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.db_url
        elif _TEMPLATE_DB:  # an already migrated database: saves the migrations (~6 s)
            self.home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_TEMPLATE_DB, self.home / "prefect.db")
        exe = VENV_BIN / "prefect"
        require(exe.exists(), f"{exe} missing (run `make venv`)")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _await_ready(self, self._healthy, self.startup_timeout, 0.5, "prefect server did not become healthy")
        if self.database == "sqlite":
            _save_template_db(self.home / "prefect.db")
        return self

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200
        return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None
        if self.db_name is not None:
            Postgres.drop(self.db_name)
            self.db_name = None

    # --- clients -----------------------------------------------------------------

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a CLI client of this server (its own PREFECT_HOME, the venv on PATH)."""
        env = base_env(self.client_home)
        env["PREFECT_API_URL"] = self.api_url
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 300, check: bool = True, env: Optional[dict] = None,
            log: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run the real `prefect` CLI from the repository root against this server."""
        cmd = [str(VENV_BIN / "prefect"), *map(str, args)]
        res = subprocess.run(cmd, cwd=ROOT, env=env or self.client_env(), capture_output=True, text=True,
                             timeout=timeout)
        if log is not None:
            with open(log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n[rc={res.returncode}]\n{res.stdout}\n{res.stderr}\n")
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
        return res

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A sync Prefect client of this server (settings scoped to the block)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        updates: dict[Any, Any] = {PREFECT_API_URL: self.api_url}
        if self.auth_string:
            updates[PREFECT_API_AUTH_STRING] = self.auth_string
        with temporary_settings(updates=updates):
            with get_client(sync_client=True) as c:
                yield c


def deploy(server: PrefectServer, site: dict[str, Any], log: Optional[Path] = None,
           env: Optional[dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    """`bash deployments/deploy.sh SITE_ENV` (= make deploy): prefect.yaml with the site values, the process
    pool, `prefect --no-prompt deploy --all --prefect-file ...`. ``env``: DOGFLOW_* exported in the shell."""
    site_env = server.workdir / "site.env"
    site_env.write_text("".join(f"{k}={_env_value(v)}\n" for k, v in site.items()))
    res = subprocess.run(["bash", str(ROOT / "deployments" / "deploy.sh"), str(site_env)], cwd=ROOT,
                         env=server.client_env(**(env or {})), capture_output=True, text=True, timeout=300)
    if log is not None:
        log.write_text(f"[rc={res.returncode}]\n{res.stdout}\n{res.stderr}\n")
    if check and res.returncode != 0:
        raise AssertionError(f"deploy.sh -> {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def _env_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return "'" + text.replace("'", "'\\''") + "'"


class Worker:
    """`infra/prefect/worker.sh` (-> `prefect worker start --pool hpc`), configured by a worker.env file."""

    def __init__(self, server: PrefectServer, pool: str = POOL):
        self.server = server
        self.pool = pool
        self.log = server.workdir / "worker.log"
        self.env_file = server.workdir / "worker.env"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 90.0) -> "Worker":
        lines = [f"PREFECT_API_URL={self.server.api_url}", f"DOGFLOW_HOME={ROOT}", f"DOGFLOW_WORK_POOL={self.pool}",
                 "DOGFLOW_WORKER_NAME=dogflow-test-worker"]
        if self.server.auth_string:
            lines.append(f"PREFECT_API_AUTH_STRING={_env_value(self.server.auth_string)}")
        self.env_file.write_text("\n".join(lines) + "\n")
        env = base_env(self.server.workdir / "worker-home")
        env.update(
            DOGFLOW_WORKER_ENV=str(self.env_file),
            PREFECT_WORKER_QUERY_SECONDS="1",  # pick runs up quickly
            PREFECT_WORKER_PREFETCH_SECONDS="1",
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", str(ROOT / "infra" / "prefect" / "worker.sh")], cwd=self.server.workdir, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _await_ready(self, self._registered, timeout, 1.0, "prefect worker did not register")
        return self

    def _registered(self) -> bool:
        """Ready once the server lists the worker in the pool."""
        with self.server.client() as c:
            return any(w.name == "dogflow-test-worker" for w in c.read_workers_for_work_pool(self.pool))

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)
            self.proc = None


class PlainWorker(Worker):
    """`prefect worker start --pool hpc`, exactly as a Prefect user types it (venv on PATH, API in the
    environment, started from a folder outside the checkout; no dogflow wrapper, no DOGFLOW_* variables)."""

    def start(self, timeout: float = 90.0) -> "PlainWorker":
        env = self.server.client_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
        env["PREFECT_HOME"] = str(self.server.workdir / "plain-worker-home")
        cwd = self.server.workdir / "elsewhere"
        cwd.mkdir(exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "worker", "start", "--pool", self.pool], cwd=cwd, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _await_ready(self, self._registered, timeout, 1.0, "prefect worker did not register")
        return self

    def _registered(self) -> bool:
        with self.server.client() as c:
            return bool(c.read_workers_for_work_pool(self.pool))


# --- flow runs -------------------------------------------------------------------

_UUID = re.compile(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def run_deployment(server: PrefectServer, name: str, params: Optional[dict] = None, watch: bool = True,
                   timeout: float = 300, log: Optional[Path] = None) -> tuple[str, subprocess.CompletedProcess]:
    """`prefect deployment run NAME [--params JSON] [--watch]`; returns (flow run id, process)."""
    args = ["deployment", "run", name]
    if params is not None:
        args += ["--params", json.dumps(params)]
    if watch:
        args += ["--watch", "--watch-timeout", str(int(timeout))]
    res = server.cli(*args, timeout=timeout + 60, check=False, log=log)
    m = _UUID.search(res.stdout)
    assert m, f"no flow run id in the output of prefect {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return m.group(1), res


def wait_flow_run(server: PrefectServer, flow_run_id: str, timeout: float = 300) -> Any:
    """Poll until the flow run is in a final state; returns the flow run."""
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while True:
            fr = c.read_flow_run(flow_run_id)
            if fr.state is not None and fr.state.is_final():
                return fr
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} not final after {timeout:.0f} s: {fr.state}")
            time.sleep(1.0)


def flow_run_state(server: PrefectServer, flow_run_id: str) -> Any:
    with server.client() as c:
        return c.read_flow_run(flow_run_id).state


def summary_markdown(server: PrefectServer, flow_run_id: str) -> str:
    """The "dog-filter-summary" markdown artifact of a flow run."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with server.client() as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["dog-filter-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert arts, f"flow run {flow_run_id} has no dog-filter-summary artifact"
    return str(arts[0].data)


def processed_count(markdown: str) -> int:
    m = re.search(r"processed: \*\*(\d+)\*\*", markdown)
    assert m, markdown
    return int(m.group(1))


def completed_positions(markdown: str) -> list[int]:
    """Positions listed as completed in the summary table."""
    return sorted(int(m.group(1)) for m in re.finditer(r"^\| (\d+) \| [\d, ]* \| completed \|", markdown, flags=re.M))


def flow_run_logs(server: PrefectServer, flow_run_id: str) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with server.client() as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(f"{lg.level} {lg.message}" for lg in logs)
