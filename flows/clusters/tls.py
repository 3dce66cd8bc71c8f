"""TLS certificates on a shared path, for clusters whose processes cannot share in-memory ones.

Runner mode starts scheduler, workers and the flow as separate ranks of one allocation, so
``distributed.security.Security.temporary()`` (in-memory) is not enough: one process writes
a self-signed certificate and key (the same kind ``Security.temporary`` makes) into a folder
every rank can read, owner-only (folder 0700, files 0600), before ``srun`` starts the ranks.

    python -m flows.clusters.tls --cluster slurm-runner     # prints the folder it wrote
    python -m flows.clusters.tls DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CERT, KEY = "dask.crt", "dask.key"


def security_setting(settings: dict, name: str, who: str, allow_objects: bool = False) -> bool | object:
    """A profile's ``security``: TLS unless it says ``false`` (then a warning naming ``who`` talks in plain TCP).
    ``allow_objects``: dask-jobqueue also takes a ``Security`` object or mapping as is."""
    import warnings

    from flows.clusters.base import ProfileError

    value = settings.setdefault("security", True)
    if value is False:
        warnings.warn(f"{name}: TLS is off (security: false); {who} talk in plain TCP", stacklevel=5)
    elif value is not True and not allow_objects:
        raise ProfileError(f"{name}: security must be true or false")
    return value


def create(directory: str | os.PathLike) -> Path:
    """Write a fresh self-signed certificate + key into ``directory`` (created 0700; files 0600)."""
    from distributed.security import Security

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    tmp = Security.temporary()
    for fname, text in ((CERT, tmp.tls_ca_file), (KEY, tmp.tls_client_key)):
        part = folder / f".{fname}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(part, folder / fname)
    return folder


def exists(directory: str | os.PathLike) -> bool:
    return all((Path(directory) / f).is_file() for f in (CERT, KEY))


def security(directory: str | os.PathLike):
    """``Security`` for every role (scheduler, worker, client) from the files in ``directory``; TLS required."""
    from distributed.security import Security

    cert, key = str(Path(directory) / CERT), str(Path(directory) / KEY)
    return Security(require_encryption=True, tls_ca_file=cert,
                    tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.clusters.tls", description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", nargs="?", help="folder to write (default: the profile's tls_directory)")
    ap.add_argument("--cluster", help="cluster profile name or YAML path whose tls_directory to fill")
    a = ap.parse_args(argv)
    if a.directory:
        folder = a.directory
    elif a.cluster:
        from flows.clusters import ProfileError, load_profile

        try:
            prof = load_profile(a.cluster)
            folder = prof.tls_directory() if hasattr(prof, "tls_directory") else None
        except ProfileError as exc:
            print(f"dogflow: error: {exc}", file=sys.stderr)
            return 2
        if not folder:  # this profile uses no certificate folder (TLS off, or not runner mode)
            return 0
    else:
        ap.error("give DIR or --cluster")
    print(create(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
