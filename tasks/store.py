"""The one module that owns dogflow's on-disk layout.

Input
    A 5-D ``(position, channel, z, y, x)`` Zarr array (zarr v2 or v3, the seed's
    ``da.from_zarr(path)`` layout), or an OME-Zarr image group whose full-resolution
    array ``0`` is that array.

Output (``OUTPUT``), an OME-Zarr image group (NGFF 0.5, zarr v3)::

    OUTPUT/zarr.json                  group: ``ome`` multiscales metadata + ``dogflow`` provenance
    OUTPUT/0/                         (P, Z, Y, X) result, chunks (1, cz, cy, cx)
    OUTPUT/dogflow/zarr.json          group that holds dogflow's bookkeeping
    OUTPUT/dogflow/positions/NNNNNN.json   completion marker of position NNNNNN
    OUTPUT/dogflow/run.lock           exclusive run lock (see :class:`RunLock`)
    OUTPUT/dogflow/logs/              per-run log files
    OUTPUT/dogflow/previews/NNNNNN.png  input MIP next to DoG MIP, per position

Completion markers
    A position is *complete* when its marker exists, parses, and records the same
    input fingerprint, parameter digest and dogflow version that the current run
    expects. Each marker is a file that only its position's task writes, replaced
    atomically (write to a temporary name, ``fsync``, ``os.replace``), and only
    after every chunk of that position has been written. Group attributes (last
    writer wins) and chunk existence (empty chunks are never written) are never
    used as markers.

Chunks are 1 along the position axis, so concurrent tasks never share a chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from tasks import defaults, filters

IMAGE_PATH = "0"
META_GROUP = "dogflow"
MARKER_DIR = "positions"
LOCK_NAME = "run.lock"
LOG_DIR = "logs"
PREVIEW_DIR = "previews"
LAYOUT_VERSION = 1
OUTPUT_DTYPES = defaults.OUTPUT_DTYPES
NGFF_VERSION = "0.5"


def dogflow_version() -> str:
    try:
        return _pkg_version("dogflow")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "0+unknown"


class StoreError(ValueError):
    """A problem with an input or output store, phrased for the user (one line)."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class FilterParams:
    """Everything that determines the content of an output position (except the input data)."""

    input_path: str
    channel: int
    sigma_small: tuple[float, float, float]
    sigma_large: tuple[float, float, float]
    truncate: float
    mode: str
    output_dtype: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sigma_small"] = list(self.sigma_small)
        d["sigma_large"] = list(self.sigma_large)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FilterParams":
        return cls(
            input_path=str(d["input_path"]),
            channel=int(d["channel"]),
            sigma_small=tuple(float(s) for s in d["sigma_small"]),
            sigma_large=tuple(float(s) for s in d["sigma_large"]),
            truncate=float(d["truncate"]),
            mode=str(d["mode"]),
            output_dtype=str(d["output_dtype"]),
        )

    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def differences(self, other: "FilterParams") -> list[str]:
        a, b = self.as_dict(), other.as_dict()
        return [f"{k}: {b[k]!r} -> {a[k]!r}" for k in a if a[k] != b[k]]


# --------------------------------------------------------------------------- input


def open_input(path: str | os.PathLike) -> zarr.Array:
    """Open the input array read-only: a 5-D zarr v2/v3 array, or an OME-Zarr group's ``0``."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"input not found: {path}")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise StoreError(f"input is not a Zarr array or group: {path} ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Group):
        if IMAGE_PATH not in node:
            raise StoreError(f"input group has no full-resolution array '{IMAGE_PATH}': {path}")
        node = node[IMAGE_PATH]
        if not isinstance(node, zarr.Array):
            raise StoreError(f"input '{path}/{IMAGE_PATH}' is not an array")
    if node.ndim != 5:
        raise StoreError(
            f"input must be 5-D (position, channel, z, y, x); {path} has shape {tuple(node.shape)}"
        )
    if not (np.issubdtype(node.dtype, np.integer) or np.issubdtype(node.dtype, np.floating)) or np.issubdtype(
        node.dtype, np.bool_
    ):
        raise StoreError(f"input must be a real numeric array; {path} has dtype {node.dtype}")
    return node


def _storage_grid(arr: zarr.Array) -> tuple[int, ...]:
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def _array_root(arr: zarr.Array) -> Path:
    root = str(arr.store_path.store.root) if hasattr(arr.store_path.store, "root") else None
    if root is None:
        raise StoreError("input fingerprints need a local-filesystem store")
    return Path(root) / arr.path if arr.path else Path(root)


def position_objects(arr: zarr.Array, position: int, channel: int) -> list[tuple[str, Path]]:
    """(key, path) of every stored object (chunk, or shard when sharded) covering ``arr[position, channel]``."""
    root = _array_root(arr)
    grid = _storage_grid(arr)
    counts = [-(-arr.shape[d] // grid[d]) for d in range(2, 5)]
    cp, cc = position // grid[0], channel // grid[1]
    out = []
    for iz in range(counts[0]):
        for iy in range(counts[1]):
            for ix in range(counts[2]):
                key = arr.metadata.encode_chunk_key((cp, cc, iz, iy, ix))
                out.append((key, root / key))
    return out


def input_fingerprint(arr: zarr.Array, position: int, channel: int) -> str:
    """Fingerprint of ``arr[position, channel]`` without reading its data.

    The SHA-256 of the ``(key, size, mtime_ns)`` of every stored object (chunk, or
    shard when sharded) that covers the position and channel, plus the array's
    (z, y, x) shape, dtype and storage grid (not the number of positions, which may
    grow). A missing object contributes ``(key, -1, -1)``. Any rewrite of a chunk
    changes its mtime, so a changed input position changes its fingerprint; the
    cost is one ``stat`` per object.
    """
    h = hashlib.sha256()
    h.update(json.dumps([list(arr.shape[2:]), str(arr.dtype), list(_storage_grid(arr))]).encode())
    for key, path in position_objects(arr, position, channel):
        try:
            st = os.stat(path)
            h.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{key}\0-1\0-1\n".encode())
    return h.hexdigest()[:32]


def missing_objects(arr: zarr.Array, position: int, channel: int) -> list[str]:
    """Keys of the stored objects of ``arr[position, channel]`` that are not on disk."""
    return [key for key, path in position_objects(arr, position, channel) if not path.exists()]


def find_unreadable_chunk(arr: zarr.Array, position: int, channel: int) -> tuple[str, str] | None:
    """Decode each chunk of ``arr[position, channel]`` alone; return (key, error) of the first that fails."""
    grid = _storage_grid(arr)
    for key, _ in position_objects(arr, position, channel):
        idx = [int(i) for i in key.replace("/", ".").split(".")[-3:]]
        sl = tuple(slice(i * g, (i + 1) * g) for i, g in zip(idx, grid[2:]))
        try:
            arr[(position, channel, *sl)]
        except Exception as exc:
            return key, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


# --------------------------------------------------------------------------- output


def default_output_chunks(zyx: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(1, min(Z,64), min(Y,256), min(X,256)): 16 MiB float32 chunks, one position each."""
    z, y, x = zyx
    return (1, min(z, 64), min(y, 256), min(x, 256))


def _ngff_attrs() -> dict[str, Any]:
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": "dog",
                    "axes": [
                        {"name": "position", "type": "position"},
                        {"name": "z", "type": "space"},
                        {"name": "y", "type": "space"},
                        {"name": "x", "type": "space"},
                    ],
                    "datasets": [
                        {
                            "path": IMAGE_PATH,
                            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}],
                        }
                    ],
                    "metadata": {"method": filters.FILTERS[defaults.FILTER].method},
                }
            ],
        }
    }


def output_exists(path: str | os.PathLike) -> bool:
    return (Path(path) / "zarr.json").exists() or (Path(path) / ".zgroup").exists()


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``dogflow`` block of an existing output's group attributes, or None."""
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    return dict(g.attrs.get("dogflow", {})) or None


def _check_writable(directory: Path, path: str | os.PathLike) -> None:
    """Really try to create (and remove) a file: permission bits alone lie for root and read-only mounts."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dogflow-probe-", dir=directory)
    except OSError as exc:
        raise StoreError(f"output path is not writable: {path} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_output(path: str | os.PathLike, params: FilterParams, input_shape: tuple[int, ...], overwrite: bool) -> str:
    """Decide what :func:`prepare_output` will do, without writing anything.

    Returns ``"create"``, ``"open"`` or ``"overwrite"``; raises :class:`StoreError`
    (one line) when the output cannot be used.
    """
    p = Path(path)
    P, _, Z, Y, X = input_shape
    if p.exists() and not p.is_dir():
        raise StoreError(f"output path exists and is not a directory: {path}")
    if not p.exists():
        probe = p.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StoreError(f"output path is not writable: {probe} is not a directory")
        _check_writable(probe, path)
        return "create"
    _check_writable(p, path)
    if not output_exists(p):
        if any(e.name != META_GROUP for e in p.iterdir()):
            raise StoreError(f"output path exists, is not empty and is not a Zarr group: {path}")
        return "create"
    prov = read_provenance(p)
    if prov is None:
        raise StoreError(f"output exists but was not written by dogflow: {path}")
    try:
        old = FilterParams.from_dict(prov["params"])
        old_zyx = tuple(prov["shape"][1:])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"output exists with unreadable dogflow provenance: {path}") from None
    if overwrite:
        return "overwrite"
    if old_zyx != (Z, Y, X):
        raise StoreError(
            f"output exists with another shape (z,y,x)={old_zyx}, input has {(Z, Y, X)}; use --overwrite to replace it"
        )
    if old != params:
        diff = "; ".join(params.differences(old))
        raise StoreError(f"output exists with other parameters ({diff}); use --overwrite to recompute everything")
    return "open"


def prepare_output(
    path: str | os.PathLike,
    params: FilterParams,
    input_shape: tuple[int, ...],
    overwrite: bool = False,
) -> zarr.Array:
    """Create or open the output image array, after :func:`check_output`.

    - create: a new NGFF 0.5 group with array ``0`` of shape (P, Z, Y, X).
    - open: the same parameters; if the input gained positions the array grows
      along the position axis (existing positions are untouched).
    - overwrite: parameters or shape changed and the user asked for it. The old
      markers are removed *first*, so that no position is ever marked complete
      for data computed with other parameters; then the array is recreated.
    """
    action = check_output(path, params, input_shape, overwrite)
    P, _, Z, Y, X = input_shape
    p = Path(path)
    dtype = np.dtype(params.output_dtype)
    if action == "overwrite":
        clear_all_markers(p)
    if action in ("create", "overwrite"):
        g = zarr.open_group(str(p), mode="a", zarr_format=3)
        g.create_array(
            IMAGE_PATH,
            shape=(P, Z, Y, X),
            chunks=default_output_chunks((Z, Y, X)),
            dtype=dtype,
            fill_value=0,
            dimension_names=["position", "z", "y", "x"],
            overwrite=True,
        )
        meta = g.require_group(META_GROUP)
        meta.attrs["description"] = "dogflow bookkeeping: completion markers, run lock and logs"
        (p / META_GROUP / MARKER_DIR).mkdir(parents=True, exist_ok=True)
        (p / META_GROUP / LOG_DIR).mkdir(parents=True, exist_ok=True)
        attrs = _ngff_attrs()
        attrs["dogflow"] = {
            "layout_version": LAYOUT_VERSION,
            "version": dogflow_version(),
            "params": params.as_dict(),
            "shape": [P, Z, Y, X],
            "uint16_policy": "round half to even, then clip to [0, 65535]",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        g.attrs.update(attrs)
        return g[IMAGE_PATH]
    g = zarr.open_group(str(p), mode="a")
    arr = g[IMAGE_PATH]
    if arr.shape[0] < P:
        arr.resize((P, Z, Y, X))
        prov = dict(g.attrs["dogflow"])
        prov["shape"] = [P, Z, Y, X]
        g.attrs["dogflow"] = prov
    if g.attrs["dogflow"].get("version") != dogflow_version():
        prov = dict(g.attrs["dogflow"])
        prov["version"] = dogflow_version()
        g.attrs["dogflow"] = prov
    return arr


def open_output_array(path: str | os.PathLike, mode: str = "r+") -> zarr.Array:
    return zarr.open_array(str(Path(path) / IMAGE_PATH), mode=mode)


def read_result(path: str | os.PathLike, position: int) -> np.ndarray:
    """The filtered (z, y, x) volume of one position, as a numpy array."""
    return open_output_array(path, mode="r")[position]


def to_output_dtype(result: np.ndarray, output_dtype: str) -> np.ndarray:
    """Cast a float DoG to the output dtype.

    float32: as is. uint16: round half to even (``np.rint``), then clip to
    ``[0, 65535]``; negative DoG values become 0, never wrap around.
    """
    if output_dtype == "float32":
        return result.astype(np.float32, copy=False)
    if output_dtype == "uint16":
        out = np.rint(result)
        np.clip(out, 0, 65535, out=out)
        return out.astype(np.uint16)
    raise StoreError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")


# --------------------------------------------------------------------------- markers


def _marker_path(out: str | os.PathLike, position: int) -> Path:
    return Path(out) / META_GROUP / MARKER_DIR / f"{position:06d}.json"


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_marker(out: str | os.PathLike, position: int, record: dict[str, Any]) -> None:
    """Mark ``position`` complete. Call only after all its chunks are written."""
    _atomic_write(_marker_path(out, position), json.dumps(record, sort_keys=True))


def preview_path(out: str | os.PathLike, position: int) -> Path:
    return Path(out) / META_GROUP / PREVIEW_DIR / f"{position:06d}.png"


def write_preview(out: str | os.PathLike, position: int, png: bytes) -> None:
    _atomic_write(preview_path(out, position), png)


def clear_marker(out: str | os.PathLike, position: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_marker_path(out, position))


def clear_all_markers(out: str | os.PathLike) -> None:
    d = Path(out) / META_GROUP / MARKER_DIR
    if d.is_dir():
        for f in d.iterdir():
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def read_marker(out: str | os.PathLike, position: int) -> dict[str, Any] | None:
    try:
        return json.loads(_marker_path(out, position).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def marker_record(params: FilterParams, fingerprint: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What a position's completion marker records: the key a later run compares (input fingerprint,
    parameter digest, dogflow version), the task's summary, the parameters and the finishing time."""
    return {**expected_marker_key(params, fingerprint), **summary, "params": params.as_dict(), "finished": time.time()}


def expected_marker_key(params: FilterParams, fingerprint: str) -> dict[str, str]:
    return {"input_fingerprint": fingerprint, "params_digest": params.digest(), "version": dogflow_version()}


def position_state(marker: dict[str, Any] | None, expected: dict[str, str]) -> str:
    """``complete``, ``missing`` or ``stale`` (marked, but input/params/version differ)."""
    if marker is None:
        return "missing"
    if all(marker.get(k) == v for k, v in expected.items()):
        return "complete"
    return "stale"


def stale_reason(marker: dict[str, Any], expected: dict[str, str]) -> str:
    names = {"input_fingerprint": "input changed", "params_digest": "parameters changed", "version": "dogflow version changed"}
    return ", ".join(names[k] for k, v in expected.items() if marker.get(k) != v)


# --------------------------------------------------------------------------- lock


class RunLockedError(StoreError):
    pass


class RunLock:
    """An exclusive, crash-safe lock on one output store.

    The lock is the file ``OUTPUT/dogflow/run.lock`` created with ``O_EXCL``. It
    records host, pid, start time and run id. A lock whose owner is gone (same
    host and the pid no longer exists, or its heartbeat is older than
    ``stale_after`` seconds) is stale and is taken over. While held, the owner
    refreshes the file's mtime (heartbeat) via :meth:`heartbeat`.
    """

    def __init__(self, out: str | os.PathLike, run_id: str = "", stale_after: float = 600.0):
        self.path = Path(out) / META_GROUP / LOCK_NAME
        self.run_id = run_id
        self.stale_after = stale_after
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            return age > 5.0  # half-written lock file of a crashed owner
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        try:
            return time.time() - self.path.stat().st_mtime > self.stale_after
        except FileNotFoundError:
            return True

    def check(self) -> bool:
        """Raise :class:`RunLockedError` if a live owner holds the lock; True if a stale lock is there."""
        if not self.path.exists():
            return False
        owner = self._owner()
        if self._is_stale(owner):
            return True
        who = f"pid {owner.get('pid')} on {owner.get('host')}, run {owner.get('run_id') or '?'}" if owner else "?"
        raise RunLockedError(f"another dogflow run is writing to this output ({who}); lock: {self.path}")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id, "started": time.time()}
        )
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.check():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
            with os.fdopen(fd, "w") as fh:
                fh.write(record)
            self.held = True
            interval = max(1.0, min(30.0, self.stale_after / 4))
            self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True, name="dogflow-lock")
            self._thread.start()
            return self
        raise RunLockedError(f"could not take the run lock {self.path}")

    def heartbeat(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_log_path(out: str | os.PathLike, run_name: str, job_id: str | None = None,
                 folder: str | os.PathLike | None = None) -> Path:
    """``OUTPUT/dogflow/logs/<run-name>-<SLURM_JOB_ID|local>.log`` (or that name in ``folder``); the folder is created."""
    d = Path(folder) if folder else Path(out) / META_GROUP / LOG_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{run_name}-{job_id or 'local'}.log"


def scan_positions(out: str | os.PathLike, arr: zarr.Array, params: FilterParams, positions: Iterable[int]) -> dict[int, tuple[str, dict | None, dict]]:
    """For each position: (state, marker, expected key), comparing markers to the current input."""
    result = {}
    for p in positions:
        expected = expected_marker_key(params, input_fingerprint(arr, p, params.channel))
        marker = read_marker(out, p)
        result[p] = (position_state(marker, expected), marker, expected)
    return result
