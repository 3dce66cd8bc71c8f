"""The Prefect API a ``dogflow`` command talks to: the configured one (``PREFECT_API_URL``), or a
temporary local server for this run.

The temporary server is Prefect's own ephemeral server app (``prefect.server.api.server:create_app`` under
uvicorn in a subprocess, as Prefect's ``SubprocessASGIServer`` runs it, on the same database in
``PREFECT_HOME``). :func:`start_temporary_api` launches it *at once*, before the command imports Prefect
and validates its input, so the server boots while the command works; :func:`prefect_api` waits for it
only when the flow is about to start. The automation services (triggers, actions), the event logger and
persister and the live event and log streams, which a run never uses, are off in it.

The URL is exported in ``PREFECT_API_URL`` as soon as the server is launched (and the old value put back
when it stops), so that Dask worker processes, which report task states themselves, talk to the same API
instead of each starting their own temporary server, even when they are spawned while it still boots.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
    # the event feed of a server that lives for one run: task states still reach it (task run recorder)
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    # nobody subscribes to this server's live event and log streams (the UI is off, progress comes from Dask)
    "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "false",
}


class TemporaryAPI:
    """A temporary Prefect server on a free port of 127.0.0.1 (its log in a temporary file)."""

    def __init__(self) -> None:
        self.log = Path(tempfile.mkstemp(prefix="dogflow-prefect-server-", suffix=".log")[1])
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self._old_url = os.environ.get("PREFECT_API_URL")
        self._launch()
        atexit.register(self.stop)

    def _launch(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        # exported at once: processes started from here on (Dask workers) report to this server
        os.environ["PREFECT_API_URL"] = self.url
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **_SERVER_ENV}, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait(self, timeout: float = 120.0) -> str:
        """Block until the server answers ``/health``; its URL. A failed start raises RuntimeError with its log."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() == 3:  # uvicorn: the port was taken meanwhile
                    self._launch()
                elif self.proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self.url
                time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not start (exit {self.proc.returncode}): {tail}")

    def stop(self) -> None:
        if self._old_url is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = self._old_url
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.log.unlink()


def start_temporary_api() -> Optional[TemporaryAPI]:
    """Launch a temporary server now unless a Prefect API is configured (env or the active Prefect profile),
    or this process is one rank of a parallel SLURM step (runner mode: only the rank that runs the flow
    starts one, in :func:`prefect_api`)."""
    if os.environ.get("PREFECT_API_URL") or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return None
    if _may_be_configured():
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return None
    return TemporaryAPI()


def _may_be_configured() -> bool:
    """Could a Prefect API be configured other than in ``$PREFECT_API_URL``? Answered from the files Prefect's
    settings read, without importing Prefect (1-4 s on this VM, most of a rerun with nothing to do); True when in
    doubt, and then Prefect's own settings decide."""
    if any(k in os.environ for k in ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH")):
        return True
    cwd = Path.cwd()
    if (cwd / ".env").exists() or (cwd / "prefect.toml").exists():
        return True
    for path, marker in ((cwd / "pyproject.toml", "tool.prefect"),
                         (Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / "profiles.toml", "API_URL")):
        try:
            if marker in path.read_text(errors="replace"):
                return True
        except FileNotFoundError:
            continue
        except OSError:
            return True
    return False


@contextlib.contextmanager
def prefect_api(temporary: Optional[TemporaryAPI] = None) -> Iterator[Optional[TemporaryAPI]]:
    """Within the block, Prefect (and every process started from here) uses this run's API: the configured
    one (yields None), else ``temporary`` (launched earlier by :func:`start_temporary_api`), else a temporary
    server launched now. A temporary one is yielded still booting: call its :meth:`TemporaryAPI.wait` before
    the first API call (the caller may start other work first); it is stopped when the block ends."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if temporary is None:
        if PREFECT_API_URL.value():
            yield None
            return
        temporary = TemporaryAPI()
    try:
        with temporary_settings({PREFECT_API_URL: temporary.url}):
            yield temporary
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # ship the last log lines before the temporary API goes away
    finally:
        temporary.stop()
