"""The storage seam: every byte dogflow writes, stats or lists outside Zarr arrays goes through a :class:`Storage`.

A :class:`Storage` is one dataset root (an input or an output store) and offers what dogflow's bookkeeping
needs from it, by key (a ``/``-separated path relative to the root):

- atomic small writes (:meth:`Storage.write_atomic`: markers, previews, metadata): a reader sees the old
  object or the new one, never a part;
- a create-only write (:meth:`Storage.create_exclusive`: the run lock) and its heartbeat
  (:meth:`Storage.touch`, :meth:`Storage.stat`);
- listings (:meth:`Storage.list`) and removal (:meth:`Storage.delete`, :meth:`Storage.delete_tree`);
- object versions for input fingerprints (:meth:`Storage.stat`: size and a version that changes on every
  rewrite).

Zarr arrays themselves are read and written by zarr through :meth:`Storage.zarr_store`. Two
implementations: :class:`LocalStorage`, the local (or network-mounted) filesystem (``fsync`` + ``os.replace``,
``O_EXCL``, ``os.stat``; the version is ``st_mtime_ns``), and :class:`tasks.s3.S3Storage` for ``s3://`` URLs
(conditional puts: ``If-None-Match: *`` creates, ``If-Match`` with the ETag replaces; the version is the ETag).
Nothing outside these two modules calls ``os.replace``, ``os.fsync``, ``os.stat`` or ``open`` on a dataset path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class StoreError(ValueError):
    """A problem with an input or output store, phrased for the user (one line)."""


@dataclass(frozen=True)
class ObjectStat:
    """What a store says about one object without reading it: its size and a version that changes on each write."""

    size: int
    version: str  # local: st_mtime_ns; an object store: the ETag
    modified: float  # seconds since the epoch


class Storage:
    """One dataset root and the operations dogflow's bookkeeping needs from it (see the module docstring)."""

    url: str

    def zarr_store(self, key: str = "", read_only: bool = False) -> Any:
        """What zarr opens for ``key`` (the root when empty): a path, or a zarr store object."""
        raise NotImplementedError

    def exists(self, key: str = "") -> bool:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def write_atomic(self, key: str, data: bytes | str) -> None:
        """Replace the object as a whole: a reader sees the old bytes or the new ones."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes | str) -> bool:
        """Create the object only if it does not exist; False (nothing written) if it does."""
        raise NotImplementedError

    def stat(self, key: str) -> ObjectStat | None:
        raise NotImplementedError

    def stat_many(self, keys: list[str]) -> dict[str, ObjectStat | None]:
        """:meth:`stat` of each key (an object store answers from one listing)."""
        return {k: self.stat(k) for k in keys}

    def replace_if(self, key: str, data: bytes | str, version: str) -> bool:
        """Replace the object only if it is still at ``version`` (:attr:`ObjectStat.version`); False (nothing
        written) if it changed or is gone. Of two callers with the same ``version``, at most one succeeds."""
        raise NotImplementedError

    def refresh(self, key: str, data: bytes | str, version: str) -> str | None:
        """Renew an object this process owns (a lock's heartbeat) if it is still at ``version``; its new
        version, or None if someone else changed or removed it."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove one object; nothing if it does not exist."""
        raise NotImplementedError

    def delete_tree(self, prefix: str) -> None:
        """Remove every object under ``prefix``."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (objects and sub-prefixes), sorted."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Raise :class:`StoreError` unless objects can be created under the root (it need not exist yet)."""
        raise NotImplementedError

    def local_path(self, key: str = "") -> Path | None:
        """A filesystem path for ``key`` where the store has one (run logs are written there as they grow)."""
        return None

    streams_objects: bool = False  # offers :meth:`writer`

    def writer(self, key: str) -> Any:
        """A context manager giving a binary file to write one object in pieces; the object appears whole when
        the block ends without error, and not at all otherwise (a stream version of :meth:`write_atomic`)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.url


class LocalStorage(Storage):
    """A folder on a local or network-mounted filesystem."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def zarr_store(self, key: str = "", read_only: bool = False) -> str:
        return str(self._path(key))

    streams_objects = True

    @contextlib.contextmanager
    def writer(self, key: str) -> Any:
        # one writer per object (a shard has one task): temporaries other runs' crashed writers left are removed
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                yield fh
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def local_path(self, key: str = "") -> Path:
        return self._path(key)

    def exists(self, key: str = "") -> bool:
        return self._path(key).exists()

    def is_dir(self, key: str = "") -> bool:
        return self._path(key).is_dir()

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_atomic(self, key: str, data: bytes | str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def create_exclusive(self, key: str, data: bytes | str) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        return True

    def replace_if(self, key: str, data: bytes | str, version: str) -> bool:
        # rename is atomic: of two takers only one moves the stale file aside; the version check then tells
        # whether what it moved was still the stale one (else it is put back)
        path = self._path(key)
        aside = path.with_name(f".{path.name}.takeover.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if str(os.stat(aside).st_mtime_ns) != version:
            with contextlib.suppress(OSError):
                os.link(aside, path)  # put it back unless someone created a new one meanwhile
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self.create_exclusive(key, data)

    def refresh(self, key: str, data: bytes | str, version: str) -> str | None:
        st = self.stat(key)
        if st is None or st.version != version:
            return None
        os.utime(self._path(key))
        st = self.stat(key)
        return st.version if st else None

    def stat(self, key: str) -> ObjectStat | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectStat(st.st_size, str(st.st_mtime_ns), st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self._path(key))

    def delete_tree(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            self.delete(prefix)

    def list(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        try:
            return sorted(e.name for e in path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def check_writable(self) -> None:
        """Really create (and remove) a file in the nearest existing folder: permission bits lie for root and
        read-only mounts."""
        p = self.root
        if p.exists() and not p.is_dir():
            raise StoreError(f"output path exists and is not a directory: {self.url}")
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StoreError(f"output path is not writable: {probe} is not a directory")
        try:
            fd, name = tempfile.mkstemp(prefix=".dogflow-probe-", dir=probe)
        except OSError as exc:
            raise StoreError(f"output path is not writable: {self.url} ({exc.strerror})") from None
        os.close(fd)
        os.unlink(name)


def open_storage(location: str | os.PathLike | Storage) -> Storage:
    """The :class:`Storage` of a dataset location (a path; a :class:`Storage` is returned as is)."""
    if isinstance(location, Storage):
        return location
    text = str(location)
    if text.startswith("s3://"):
        from tasks.s3 import S3Storage

        return S3Storage(text)
    if "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise StoreError(f"unsupported storage scheme {scheme!r} in {text}: use a local path or s3://BUCKET/KEY")
    return LocalStorage(text[len("file://"):] if text.startswith("file://") else text)


def is_url(location: str | os.PathLike) -> bool:
    """Whether a dataset location names an object store (``s3://...``), not a path."""
    return "://" in str(location) and not str(location).startswith("file://")


def age_seconds(stat: ObjectStat) -> float:
    """Seconds since the object was last written."""
    return time.time() - stat.modified
