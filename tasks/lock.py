"""The run lock: one live run writes to an output at a time, and a crashed run never blocks the next for long."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from tasks.storage import Storage, StoreError, age_seconds, open_storage

LOCK_KEY = "dogflow/run.lock"


class RunLockedError(StoreError):
    """A live run holds the output's lock; the message names it."""


def describe_owner(owner: dict[str, Any] | None) -> str:
    """A lock's holder in words: flow run name and id, host, pid, since when (UTC)."""
    from datetime import datetime, timezone

    if not owner:
        return "another run (its lock record is unreadable)"
    since = owner.get("started")
    when = datetime.fromtimestamp(float(since), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if since else "?"
    return (f"flow run '{owner.get('run_name') or '?'}' ({owner.get('run_id') or 'no run id'}) on host "
            f"{owner.get('host')}, pid {owner.get('pid')}, since {when}")


def _alive_here(pid: int) -> bool:
    """Whether process ``pid`` of this host runs: a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


class RunLock:
    """An exclusive, crash-safe lock on one output store.

    The lock is the object ``OUTPUT/dogflow/run.lock``, created only if absent
    (:meth:`tasks.storage.Storage.create_exclusive`: ``O_EXCL`` on a filesystem, ``If-None-Match: *`` on S3).
    It records host, pid, start time, run id and run name. A lock whose owner is gone (same host and the pid
    no longer runs, or its heartbeat is older than ``stale_after`` seconds) is stale and is taken over by a
    replacement conditional on the stale lock's version (:meth:`tasks.storage.Storage.replace_if`), so of two
    takers only one wins. While held, a thread renews it (the heartbeat, conditional on the version it last
    wrote: :meth:`tasks.storage.Storage.refresh`) every ``stale_after / 4`` seconds, at most every 30 s.
    """

    def __init__(self, out: str | os.PathLike | Storage, run_id: str = "", run_name: str = "",
                 stale_after: float = 600.0):
        self.storage = open_storage(out)
        self.run_id = run_id
        self.run_name = run_name
        self.stale_after = stale_after
        self.held = False
        self.lost = False  # another run took the lock over (this one's heartbeat stopped for too long)
        self._record = ""
        self._version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def location(self) -> str:
        return f"{self.storage.url}/{LOCK_KEY}"

    def owner(self) -> dict[str, Any] | None:
        """The holder's record, or None (no lock, or one not yet written)."""
        data = self.storage.read_bytes(LOCK_KEY)
        try:
            return json.loads(data) if data is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def _is_stale(self, owner: dict[str, Any] | None, st=None) -> bool:
        st = st or self.storage.stat(LOCK_KEY)
        if st is None:
            return True
        if owner is None:
            return age_seconds(st) > 5.0  # half-written lock file of a crashed owner
        if owner.get("host") == socket.gethostname() and not _alive_here(int(owner.get("pid", -1))):
            return True
        return age_seconds(st) > self.stale_after

    def holder(self) -> str:
        """Who holds the lock, for messages (:func:`describe_owner`)."""
        return describe_owner(self.owner())

    def check(self) -> bool:
        """Raise :class:`RunLockedError` if a live owner holds the lock; True if a stale lock is there."""
        if not self.storage.exists(LOCK_KEY):
            return False
        if self._is_stale(self.owner()):
            return True
        raise RunLockedError(f"another dogflow run is writing to this output: {self.holder()}; lock: {self.location}")

    def acquire(self) -> "RunLock":
        # the nonce makes every taker's record, and so its ETag on an object store, its own
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                             "run_name": self.run_name, "started": time.time(), "nonce": uuid.uuid4().hex})
        for _ in range(3):
            if not self.storage.create_exclusive(LOCK_KEY, record):
                st = self.storage.stat(LOCK_KEY)
                if st is None:
                    continue  # released meanwhile: try to create it again
                if not self._is_stale(self.owner(), st):
                    self.check()  # raises, naming the holder
                    continue
                if not self.storage.replace_if(LOCK_KEY, record, st.version):
                    continue  # another taker won, or the owner came back: look again
            st = self.storage.stat(LOCK_KEY)
            self._record, self._version = record, st.version if st else ""
            self.held = True
            interval = max(1.0, min(30.0, self.stale_after / 4))
            self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True, name="dogflow-lock")
            self._thread.start()
            return self
        raise RunLockedError(f"could not take the run lock {self.location}")

    def heartbeat(self) -> None:
        if self.held and not self.lost:
            version = self.storage.refresh(LOCK_KEY, self._record, self._version)
            if version is None:
                self.lost = True
            else:
                self._version = version

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.storage.delete(LOCK_KEY)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()  # taken already (the flow's collision check) or now

    def __exit__(self, *exc: object) -> None:
        self.release()
