"""``cluster_type: slurm-runner``: dask-jobqueue's ``SLURMRunner`` inside an allocation you hold.

``srun -n N dogflow run ... --cluster slurm-runner``: rank 0 runs the scheduler, rank 1 the
flow (only rank 1 gets past ``session().__enter__``), ranks 2..N-1 are workers.

TLS (default ``security: true``): scheduler, workers and the flow's client use ``tls://``
with the certificate in ``tls_directory`` (default ``~/.dogflow/runner/tls-{job_id}``, on a
path every rank can read). The ranks are separate processes, so the certificate is written
once before ``srun``: ``python -m flows.clusters.tls --cluster PROFILE`` (done by
``infra/slurm/dogflow-runner.sbatch``, which removes it when the job ends). A plain-TCP
client is refused. ``security: false`` turns TLS off, with a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flows.clusters import tls
from flows.clusters.base import ClusterProfile, ProfileError

RUNNER_KEYS = {"scheduler_file", "scheduler_options", "worker_options", "worker_class", "security", "tls_directory"}


def _runner_class():
    """SLURMRunner whose own connection to the scheduler (to stop it at the end) uses the client's TLS."""
    from dask_jobqueue.slurm import SLURMRunner
    from distributed.core import rpc

    class TLSSLURMRunner(SLURMRunner):
        def __init__(self, *args, client_security=None, **kwargs):
            self._client_security = client_security  # before __init__: it runs the rank's role
            super().__init__(*args, **kwargs)

        async def before_client_start(self) -> None:
            if self._client_security is not None and self.scheduler_address:
                self.scheduler_comm = rpc(self.scheduler_address,
                                          connection_args=self._client_security.get_connection_args("client"))

    return TLSSLURMRunner


class SLURMRunnerProfile(ClusterProfile):
    kind = "slurm-runner"

    @classmethod
    def cluster_keys(cls) -> set[str]:
        return set(RUNNER_KEYS)

    def setup(self) -> None:
        if self.n_workers is not None or self.max_workers is not None:
            raise ProfileError(f"{self.name}: slurm-runner workers are the allocation's ranks "
                               "(srun -n N: N-2 workers); drop n_workers/max_workers")
        d = self.kwargs
        d.setdefault("scheduler_file", "~/.dogflow/runner/scheduler-{job_id}.json")
        d["scheduler_file"] = os.path.expandvars(os.path.expanduser(str(d["scheduler_file"])))
        tls.security_setting(d, self.name, "scheduler, workers and the flow")
        d.setdefault("tls_directory", "~/.dogflow/runner/tls-{job_id}")
        d["tls_directory"] = os.path.expandvars(os.path.expanduser(str(d["tls_directory"])))

    # -- this allocation --------------------------------------------------------------

    @staticmethod
    def job_id() -> str:
        return os.environ.get("SLURM_JOB_ID", "nojob")

    def scheduler_file(self) -> str:
        """The scheduler file of this allocation (``{job_id}`` filled from ``SLURM_JOB_ID``)."""
        return self.kwargs["scheduler_file"].format(job_id=self.job_id())

    def tls_directory(self) -> str | None:
        """The certificate folder of this allocation, or None with TLS off."""
        return self.kwargs["tls_directory"].format(job_id=self.job_id()) if self.kwargs["security"] else None

    def security(self):
        folder = self.tls_directory()
        if folder is None:
            return None
        if not tls.exists(folder):
            raise ProfileError(f"{self.name}: no TLS certificate in {folder}; create it before srun with "
                               f"`python -m flows.clusters.tls --cluster {self.source}` "
                               "(infra/slurm/dogflow-runner.sbatch does)")
        return tls.security(folder)

    def scheduler_address(self) -> str:
        """The address the allocation's rank-0 scheduler wrote into the shared scheduler file."""
        path = self.scheduler_file()
        try:
            with open(path) as fh:
                return json.load(fh)["address"]
        except (OSError, ValueError, KeyError):
            return f"<scheduler address from {path}, written when the allocation starts>"

    def runner_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"address": self.scheduler_address()}
        sec = self.security()
        if sec is not None:
            args["client_kwargs"] = {"security": sec}
        return args

    def session(self):
        """The allocation's ``SLURMRunner``: rank 0 scheduler, rank 1 this flow, the others workers.

        Only rank 1 executes the body of ``with profile.session():``; the other ranks serve
        until it leaves, then exit.
        """
        sec = self.security()
        Path(self.scheduler_file()).parent.mkdir(parents=True, exist_ok=True)
        kw = {k: dict(self.kwargs[k]) for k in ("scheduler_options", "worker_options") if self.kwargs.get(k)}
        if self.kwargs.get("worker_class"):
            kw["worker_class"] = self.kwargs["worker_class"]
        if sec is not None:
            for role in ("scheduler_options", "worker_options"):
                kw.setdefault(role, {}).update(security=sec, protocol="tls")
        return _runner_class()(scheduler_file=self.kwargs["scheduler_file"], client_security=sec, **kw)

    def tls(self) -> str:
        if not self.kwargs["security"]:
            return "off"
        return f"on (certificate in {self.kwargs['tls_directory']}, written before srun)"

    def worker_lines(self) -> list[str]:
        return [f"workers: the allocation's ranks 2..N-1 (srun -n N); scheduler file {self.kwargs['scheduler_file']}"]
