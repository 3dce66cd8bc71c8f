"""The one module that owns dogflow's output layout, its completion markers and its bookkeeping paths.

Output layout version 3 (``OUTPUT``, NGFF 0.5, zarr v3)::

    OUTPUT/zarr.json                      root group: ``ome`` = one ``multiscales`` entry per position
                                          ("position 0", ...), ``dogflow`` = provenance (layout_version 3)
    OUTPUT/P/                             group of position P (0, 1, ...)
    OUTPUT/P/0                            level 0: (C, Z, Y, X) DoG at full resolution; C = the input's channels
    OUTPUT/P/1, P/2, ...                  levels 1..: 2x2 means in y, x of the level above, until y,x <= 1024
    OUTPUT/dogflow/positions/PPPPPP/cCCCC.json   completion marker of (position, channel)
    OUTPUT/dogflow/run.lock               exclusive run lock (see :class:`RunLock`)
    OUTPUT/dogflow/logs/<run>-<SLURM_JOB_ID|local>.log   one log file per run
    OUTPUT/dogflow/previews/PPPPPP/cCCCC.png             input MIP next to DoG MIP

Arrays have ``dimension_names`` ["c", "z", "y", "x"], inner chunks (1, <=64, <=256, <=256) and zarr v3's
sharding codec: shards of (1, Zs, Ys, Xs) whole inner chunks, at most :data:`tasks.sharding.SHARD_BYTES`
(:func:`tasks.sharding.shard_shape`; a full seed position: 7 + 2 shard files per channel). One shard holds
one channel of one level of one position, so it has exactly one writer, the task of that (position,
channel), which writes it whole (:func:`tasks.sharding.write_whole_shards`). Output channel c is the DoG of
input channel c; channels that were not computed stay unwritten (fill value 0, no disk use) and have no
marker. Level l has scale (1, vz, vy * 2^l, vx * 2^l) and translation (0, 0, vy * (2^l - 1) / 2,
vx * (2^l - 1) / 2), so pixel centres of a 2x2 mean stay where they were; an odd last row or column is
averaged with itself (mean of what exists). Axes z, y, x carry the input's unit (e.g. micrometer). One
position as numpy: ``zarr.open_array("OUTPUT/3/0")[:]``.

Completion markers
    A (position, channel) is *complete* when its marker exists, parses, and records the same input
    fingerprint, parameter digest and dogflow version that the current run expects. Each marker is a
    file that only its task writes, replaced atomically (temporary name, ``fsync``, ``os.replace``), and
    only after every shard of every level of that channel has been written (each shard itself replaced in
    one ``os.replace``). Group attributes (last writer wins) and chunk or shard existence are never used as
    markers.

Older layouts
    Layout 2 (the same tree, unsharded: one file per inner chunk, 560 per full seed (position, channel))
    keeps resuming as layout 2: its arrays stay unsharded, positions it gains are created unsharded, and
    ``--overwrite`` recomputes it into layout 3. Layout 1 (one (P, Z, Y, X) array ``0``) is refused with a
    one-line message: ``--overwrite`` recomputes it into layout 3, or a new output path starts afresh. A
    layout newer than this dogflow's is refused (upgrade dogflow).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from tasks import buffers, defaults, filters, sharding
from tasks.inputs import Dataset, StoreError, open_dataset

__all__ = ["StoreError", "RunLockedError", "FilterParams", "OutputSpec", "MarkerRow", "OutputStatus", "RunLock"]

LAYOUT_VERSION = 3  # sharded arrays
UNSHARDED_LAYOUT = 2  # layout 2: the same tree with unsharded arrays; still resumed as it is
RESUMABLE_LAYOUTS = (UNSHARDED_LAYOUT, LAYOUT_VERSION)
NGFF_VERSION = "0.5"
OUTPUT_DTYPES = defaults.OUTPUT_DTYPES
META_GROUP = "dogflow"
MARKER_DIR = "positions"
LOCK_NAME = "run.lock"
LOG_DIR = "logs"
PREVIEW_DIR = "previews"
PYRAMID_MAX_PLANE = 1024  # levels halve y and x until both are <= this
CHUNK_ZYX = (64, 256, 256)  # largest inner chunk (z, y, x): what viewers read
DIMENSION_NAMES = ("c", "z", "y", "x")
# Chosen by measurement on a (413, 512, 512) float32 DoG (see README "Output layout"): blosc lz4 with byte
# shuffle writes 2-4x faster than zarr's default zstd and compresses better (ratio 1.89 vs 1.46).
CODEC = {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
UINT16_POLICY = "round half to even, then clip to [0, 65535]"
FLOAT16_POLICY = ("clip to [-65504, 65504], then round to the nearest float16 (11-bit significand: relative "
                  "error <= 2**-11 for |v| >= 2**-14, absolute <= 2**-25 below)")
DOWNSAMPLING = "2x2 mean in y,x of the level above, computed in float32; odd last row/column: mean of what exists"


def dogflow_version() -> str:
    try:
        return _pkg_version("dogflow")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "0+unknown"


class RunLockedError(StoreError):
    pass


# =========================================================================== parameters and output spec


@dataclass(frozen=True)
class FilterParams:
    """Everything that determines the content of an output channel (except the input data).

    The channel selection is not a parameter: output channel c is always the DoG of input channel c, so
    the digest does not depend on which channels a run computes.
    """

    input_path: str
    sigma_small: tuple[float, float, float]  # voxels (z, y, x)
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
        """Read the fields of :meth:`as_dict`; other keys (e.g. σ in µm) are ignored."""
        return cls(
            input_path=str(d["input_path"]),
            sigma_small=tuple(float(s) for s in d["sigma_small"]),  # type: ignore[arg-type]
            sigma_large=tuple(float(s) for s in d["sigma_large"]),  # type: ignore[arg-type]
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


@dataclass(frozen=True)
class OutputSpec:
    """What an output must look like: parameters, geometry (from the input) and physical metadata."""

    params: FilterParams
    n_positions: int
    n_channels: int
    shape: tuple[int, int, int]  # (z, y, x) at full resolution
    voxel_size: tuple[float, float, float] | None = None  # in ``unit``; None: scale 1, no unit
    unit: str | None = None  # NGFF unit name, e.g. "micrometer"
    physical: dict[str, Any] = field(default_factory=dict)  # e.g. {"sigma_small_um": [...]}, provenance only
    input: dict[str, Any] = field(default_factory=dict)  # Dataset.describe(), provenance only
    max_plane: int = PYRAMID_MAX_PLANE

    @classmethod
    def for_dataset(cls, params: FilterParams, ds: Dataset, voxel_size=None, unit=None, **kw: Any) -> "OutputSpec":
        """The spec of an output of ``ds``; ``voxel_size``/``unit`` default to the input's metadata."""
        vs = voxel_size if voxel_size is not None else ds.voxel_size
        return cls(params, ds.n_positions, ds.n_channels, ds.shape, tuple(vs) if vs else None,
                   unit if voxel_size is not None else ds.unit, input=ds.describe(), **kw)

    @property
    def levels(self) -> list[tuple[int, int, int]]:
        return level_shapes(self.shape, self.max_plane)


# =========================================================================== pyramid


def level_shapes(zyx: tuple[int, int, int], max_plane: int = PYRAMID_MAX_PLANE) -> list[tuple[int, int, int]]:
    """(z, y, x) of every level: full resolution, then y and x halved (rounded up) until both are <= max_plane."""
    z, y, x = (int(s) for s in zyx)
    out = [(z, y, x)]
    while max(y, x) > max_plane and (y > 1 or x > 1):
        y, x = -(-y // 2), -(-x // 2)
        out.append((z, y, x))
    return out


def downsample_mean(a: np.ndarray, slab: int = 1) -> np.ndarray:
    """2x2 mean in y, x of a (z, y, x) array, as float32 of shape (z, ceil(y/2), ceil(x/2)).

    An odd last row or column is averaged over the pixels that exist (as if edge-replicated). Works in
    slabs of ``slab`` z-planes (row pairs first, then column pairs) through one reused row buffer: the
    extra memory is the result (a quarter of the input) plus that buffer; the input is never copied. One
    plane at a time keeps the buffer in cache (a full seed position: 2.3-3.4x faster than 8-plane slabs
    with a fresh buffer each).
    """
    z, y, x = a.shape
    y2, x2, yo, xo = y // 2, x // 2, -(-y // 2), -(-x // 2)
    out = buffers.empty((z, yo, xo), np.float32)
    rows_buf = np.empty((min(slab, z), yo, x), dtype=np.float32)
    for z0 in range(0, z, slab):
        blk = a[z0 : z0 + slab]
        rows = rows_buf[: blk.shape[0]]
        np.add(blk[:, 0 : 2 * y2 : 2], blk[:, 1 : 2 * y2 : 2], out=rows[:, :y2], dtype=np.float32)
        if y % 2:
            np.multiply(blk[:, y - 1], 2, out=rows[:, y2], dtype=np.float32)
        dst = out[z0 : z0 + slab]
        np.add(rows[:, :, 0 : 2 * x2 : 2], rows[:, :, 1 : 2 * x2 : 2], out=dst[:, :, :x2])
        dst[:, :, :x2] *= 0.25
        if x % 2:
            np.multiply(rows[:, :, x - 1], 0.5, out=dst[:, :, x2])
    return out


CAST_BLOCK = 1 << 22  # elements cast to uint16/float16 at a time (one float32 block of 16 MiB)
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def to_output_dtype(result: np.ndarray, output_dtype: str) -> np.ndarray:
    """Cast a float DoG to the output dtype.

    float32: as is. uint16: round half to even (``np.rint``), then clip to ``[0, 65535]``; negative DoG
    values become 0, never wrap around. float16: clip to ``[-65504, 65504]`` (never infinity), then round to
    the nearest float16, ties to even (numpy's cast): an 11-bit significand, so the relative error is at most
    2**-11 for ``|v| >= 2**-14`` and the absolute error at most 2**-25 below that. The output equals
    ``np.clip(result, -65504, 65504).astype(np.float16)``.
    """
    if output_dtype == "float32":
        return result.astype(np.float32, copy=False)
    if output_dtype in ("uint16", "float16"):  # in blocks: the extra memory is the cast result plus one block
        src = np.ascontiguousarray(result).reshape(-1)
        out = buffers.empty(src.shape, np.dtype(output_dtype))
        lo, hi = (0, 65535) if output_dtype == "uint16" else (-FLOAT16_MAX, FLOAT16_MAX)
        for i in range(0, src.size, CAST_BLOCK):
            blk = np.rint(src[i : i + CAST_BLOCK]) if output_dtype == "uint16" else src[i : i + CAST_BLOCK].copy()
            np.clip(blk, lo, hi, out=blk)
            out[i : i + CAST_BLOCK] = blk
        return out.reshape(np.shape(result))
    raise StoreError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")


# =========================================================================== layout paths


def level_path(position: int, level: int = 0) -> str:
    """Path of a level array inside the output: ``"3/0"``."""
    return f"{int(position)}/{int(level)}"


def marker_path(out: str | os.PathLike, position: int, channel: int) -> Path:
    return Path(out) / META_GROUP / MARKER_DIR / f"{position:06d}" / f"c{channel:04d}.json"


def preview_path(out: str | os.PathLike, position: int, channel: int) -> Path:
    return Path(out) / META_GROUP / PREVIEW_DIR / f"{position:06d}" / f"c{channel:04d}.png"


def run_log_path(out: str | os.PathLike, run_name: str, job_id: str | None = None,
                 folder: str | os.PathLike | None = None) -> Path:
    """``OUTPUT/dogflow/logs/<run-name>-<SLURM_JOB_ID|local>.log`` (or that name in ``folder``); the folder is created."""
    d = Path(folder) if folder else Path(out) / META_GROUP / LOG_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{run_name}-{job_id or 'local'}.log"


def lock_path(out: str | os.PathLike) -> Path:
    return Path(out) / META_GROUP / LOCK_NAME


def open_level(out: str | os.PathLike, position: int, level: int = 0, mode: str = "r") -> zarr.Array:
    """One level array of one position, (C, Z, Y, X)."""
    try:
        return zarr.open_array(str(Path(out) / level_path(position, level)), mode=mode)  # type: ignore[arg-type]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise StoreError(f"output has no level {level} of position {position}: {out} ({type(exc).__name__})") from None


def n_levels(out: str | os.PathLike, position: int) -> int:
    """How many levels position ``position`` has on disk."""
    n = 0
    while (Path(out) / level_path(position, n) / "zarr.json").exists():
        n += 1
    return n


def read_result(out: str | os.PathLike, position: int, channel: int, level: int = 0) -> np.ndarray:
    """The filtered (z, y, x) volume of one position and channel (at ``level``), as a numpy array."""
    return open_level(out, position, level)[channel]


# =========================================================================== creating and checking the output


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


def _voxel_list(v: Any) -> list[float] | None:
    return [float(s) for s in v] if v else None


def check_output(path: str | os.PathLike, spec: OutputSpec, overwrite: bool) -> str:
    """Decide what :func:`prepare_output` will do, without writing anything.

    Returns ``"create"``, ``"open"`` or ``"overwrite"``; raises :class:`StoreError` (one line) when the
    output cannot be used: not dogflow's, old layout, another shape, voxel size or parameters (the
    last three unless ``overwrite``).
    """
    p = Path(path)
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
    _check_layout(path, prov, overwrite)
    if prov.get("layout_version", 1) not in RESUMABLE_LAYOUTS:
        return "overwrite"
    try:
        old = FilterParams.from_dict(prov["params"])
        old_czyx = tuple(prov["shape"][1:])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"output exists with unreadable dogflow provenance: {path}") from None
    if overwrite:
        return "overwrite"
    new_czyx = (spec.n_channels, *spec.shape)
    if old_czyx != new_czyx:
        raise StoreError(
            f"output exists with another shape (c,z,y,x)={old_czyx}, input has {new_czyx}; use --overwrite to replace it"
        )
    old_vs, new_vs = _voxel_list(prov.get("voxel_size")), _voxel_list(spec.voxel_size)
    if (old_vs is None) != (new_vs is None) or (old_vs and not np.allclose(old_vs, new_vs, rtol=1e-6, atol=0)) or (
        old_vs and prov.get("unit") != spec.unit
    ):
        raise StoreError(
            f"output exists with another voxel size ({old_vs} {prov.get('unit') or ''} -> {new_vs} {spec.unit or ''}); "
            f"use --overwrite to recompute everything"
        )
    if old != spec.params:
        diff = "; ".join(spec.params.differences(old))
        raise StoreError(f"output exists with other parameters ({diff}); use --overwrite to recompute everything")
    return "open"


def _check_layout(path: str | os.PathLike, prov: dict[str, Any], overwrite: bool) -> None:
    """Raise (one line) unless the output's layout can be resumed, or replaced because ``overwrite``."""
    v = prov.get("layout_version", 1)
    if v in RESUMABLE_LAYOUTS:
        return
    if isinstance(v, int) and v > LAYOUT_VERSION:
        raise StoreError(f"output {path} has layout {v}, newer than this dogflow's ({LAYOUT_VERSION}); "
                         f"upgrade dogflow, or choose a new output path")
    if not overwrite:
        raise StoreError(
            f"output {path} has dogflow's old layout {v} (one (position, z, y, x) array); use --overwrite to "
            f"recompute it in layout {LAYOUT_VERSION}, or choose a new output path"
        )


def _codec() -> BloscCodec:
    return BloscCodec(cname=CODEC["cname"], clevel=CODEC["clevel"], shuffle=CODEC["shuffle"])


def _multiscale(position: int, spec: OutputSpec) -> dict[str, Any]:
    """The NGFF 0.5 ``multiscales`` entry of one position."""
    vz, vy, vx = spec.voxel_size or (1.0, 1.0, 1.0)
    unit = {"unit": spec.unit} if spec.voxel_size and spec.unit else {}
    datasets = []
    for level in range(len(spec.levels)):
        f = 2**level
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, vz, vy * f, vx * f]}]
        if level:
            transforms.append({"type": "translation", "translation": [0.0, 0.0, vy * (f - 1) / 2, vx * (f - 1) / 2]})
        datasets.append({"path": level_path(position, level), "coordinateTransformations": transforms})
    return {
        "name": f"position {position}",
        "axes": [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", **unit} for a in "zyx"],
        "datasets": datasets,
        "type": "mean",
        "metadata": {"method": filters.FILTERS[defaults.FILTER].method, "downsampling": DOWNSAMPLING},
    }


def _omero(n_channels: int, computed: Iterable[int]) -> dict[str, Any]:
    """Channel labels for viewers (bioio's channel names, napari's layer names); uncomputed ones inactive."""
    done = set(computed)
    return {"channels": [{"label": f"DoG of channel {c}", "active": c in done, "color": "FFFFFF"}
                         for c in range(n_channels)]}


def chunk_shape(zyx: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Inner chunk (1, z, y, x) of a level of (z, y, x): one channel, at most :data:`CHUNK_ZYX`."""
    return (1, *(min(int(n), c) for n, c in zip(zyx, CHUNK_ZYX)))


def shard_shapes(spec: OutputSpec) -> list[list[int]]:
    """The shard shape (1, Zs, Ys, Xs) of every level of a layout-3 output (:func:`tasks.sharding.shard_shape`)."""
    itemsize = np.dtype(spec.params.output_dtype).itemsize
    return [list(sharding.shard_shape((spec.n_channels, *zyx), chunk_shape(zyx), itemsize)) for zyx in spec.levels]


def _create_position(root: zarr.Group, position: int, spec: OutputSpec,
                     shards: list[list[int]] | None = None) -> None:
    """The level arrays of one position; ``shards`` (one shape per level) makes them sharded (layout 3),
    None unsharded (layout 2)."""
    g = root.require_group(str(position))
    for level, zyx in enumerate(spec.levels):
        g.create_array(
            str(level),
            shape=(spec.n_channels, *zyx),
            chunks=chunk_shape(zyx),
            shards=tuple(shards[level]) if shards else None,
            dtype=np.dtype(spec.params.output_dtype),
            fill_value=0,
            compressors=_codec(),
            dimension_names=list(DIMENSION_NAMES),
            overwrite=True,
        )


def _remove_old_content(p: Path) -> None:
    """Before an overwrite: every marker first (nothing may stay marked), then the image nodes and previews."""
    clear_all_markers(p)
    for e in p.iterdir():
        if e.is_dir() and e.name.isdigit():
            shutil.rmtree(e)
    shutil.rmtree(p / META_GROUP / PREVIEW_DIR, ignore_errors=True)


def prepare_output(
    path: str | os.PathLike, spec: OutputSpec, overwrite: bool = False, channels: Iterable[int] = ()
) -> dict[str, Any]:
    """Create or open the output, after :func:`check_output`; returns its provenance block.

    - create: the root group, every position's level arrays (nothing written into them) and metadata.
    - open: same parameters; positions the input gained are added (existing ones untouched).
    - overwrite: markers are removed *first*, so that nothing is ever marked complete for data computed
      with other parameters; then the position groups are recreated.

    ``channels`` (the run's selection) are added to the provenance's ``channels`` list. Only the flow
    process writes the root attributes, under the run lock.
    """
    action = check_output(path, spec, overwrite)
    p = Path(path)
    if action == "overwrite":
        _remove_old_content(p)
    if action in ("create", "overwrite"):
        root = zarr.open_group(str(p), mode="a", zarr_format=3)
        shards = shard_shapes(spec)
        for pos in range(spec.n_positions):
            _create_position(root, pos, spec, shards)
        meta = root.require_group(META_GROUP)
        meta.attrs["description"] = "dogflow bookkeeping: completion markers, run lock, logs and previews"
        (p / META_GROUP / MARKER_DIR).mkdir(parents=True, exist_ok=True)
        (p / META_GROUP / LOG_DIR).mkdir(parents=True, exist_ok=True)
        prov = {
            "layout_version": LAYOUT_VERSION,
            "version": dogflow_version(),
            "params": {**spec.params.as_dict(), **spec.physical},
            "shape": [spec.n_positions, spec.n_channels, *spec.shape],
            "voxel_size": _voxel_list(spec.voxel_size),
            "unit": spec.unit if spec.voxel_size else None,
            "levels": [list(s) for s in spec.levels],
            "pyramid": {"method": DOWNSAMPLING, "max_plane": spec.max_plane},
            "codec": dict(CODEC),
            "chunks": [list(chunk_shape(s)) for s in spec.levels],
            "shards": shards,
            "input": spec.input,
            "channels": sorted({int(c) for c in channels}),
            "uint16_policy": UINT16_POLICY,
            "float16_policy": FLOAT16_POLICY,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        ome = {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(q, spec) for q in range(spec.n_positions)],
            "omero": _omero(spec.n_channels, prov["channels"]),
        }
        root.attrs.put({"ome": ome, "dogflow": prov})
        return prov
    root = zarr.open_group(str(p), mode="a")
    attrs = root.attrs.asdict()
    prov, ome = dict(attrs["dogflow"]), dict(attrs["ome"])
    grown = spec.n_positions > prov["shape"][0]
    if grown:
        old_spec = OutputSpec(spec.params, prov["shape"][0], spec.n_channels, spec.shape, spec.voxel_size, spec.unit,
                              max_plane=prov.get("pyramid", {}).get("max_plane", spec.max_plane))
        for pos in range(old_spec.n_positions, spec.n_positions):  # layout 2 stays unsharded (no "shards")
            _create_position(root, pos, old_spec, prov.get("shards"))
        ome["multiscales"] = list(ome["multiscales"]) + [
            _multiscale(q, old_spec) for q in range(old_spec.n_positions, spec.n_positions)
        ]
        prov["shape"] = [spec.n_positions, *prov["shape"][1:]]
    prov["version"] = dogflow_version()
    prov["channels"] = sorted(set(prov.get("channels", [])) | {int(c) for c in channels})
    prov["params"] = {**prov["params"], **spec.physical}
    ome["omero"] = _omero(spec.n_channels, prov["channels"])
    if prov != attrs["dogflow"] or ome != attrs["ome"]:
        root.attrs.put({**attrs, "ome": ome, "dogflow": prov})
    return prov


# =========================================================================== writing one (position, channel)


def write_peak_bytes(zyx: tuple[int, int, int], output_dtype: str) -> int:
    """Upper bound of what :func:`write_levels` holds at its peak, the float32 result ``W`` included: the pyramid
    levels below it (each built from the one above: less than ``W / 3`` together), for uint16 and float16 output
    the cast copy of level 0 (``W / 2``, cast in blocks of :data:`CAST_BLOCK`), and the shard writer's chunk
    buffers (:func:`tasks.sharding.buffer_bytes`, at most :data:`tasks.sharding.MAX_WRITE_THREADS` threads).
    zarr's own chunk buffers (layout 2's unsharded arrays) are not included."""
    n = int(np.prod(zyx))
    peak = n * 4 + n * 4 // 3
    itemsize = np.dtype(output_dtype).itemsize
    if itemsize != 4:
        peak += n * itemsize + CAST_BLOCK * 4
    peak += sharding.buffer_bytes(int(np.prod(chunk_shape(zyx))) * itemsize, sharding.MAX_WRITE_THREADS)
    return peak


def write_levels(out: str | os.PathLike, position: int, channel: int, result: np.ndarray, output_dtype: str,
                 threads: int | None = None) -> int:
    """Write the float DoG ``result`` (z, y, x) of one (position, channel) as every level; returns the level count.

    Each level is computed from the previous one in memory (no re-read), cast to the output dtype, written,
    and dropped before the next; the extra memory is a quarter of ``result`` plus one cast copy (uint16,
    float16). Sharded levels (layout 3) are written as whole shards by
    :func:`tasks.sharding.write_whole_shards` on up to ``threads`` threads (default: the CPUs, at most
    :data:`tasks.sharding.MAX_WRITE_THREADS`): nothing is read back, and each shard replaces the old one in
    one rename. Unsharded levels (layout 2) are written by zarr's asynchronous pipeline
    (``async.concurrency``).
    """
    levels = n_levels(out, position)
    if levels == 0:
        raise StoreError(f"output has no arrays for position {position}: {out}")
    current = result
    for level in range(levels):
        if level:
            current = downsample_mean(current)
        # every chunk holds computed data: skip zarr's per-chunk "all fill value?" scan (measured ~25 % faster)
        arr = open_level(out, position, level, mode="r+").with_config({"write_empty_chunks": True})
        sharding.write_whole_shards(arr, (channel,), to_output_dtype(current, output_dtype), threads)
    return levels


# =========================================================================== markers


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def input_fingerprint(ds: Dataset, position: int, channel: int) -> str:
    """See :meth:`tasks.inputs.Dataset.fingerprint`: (key, size, mtime) of every stored object, no data read."""
    return ds.fingerprint(position, channel)


def expected_marker_key(params: FilterParams, fingerprint: str) -> dict[str, str]:
    return {"input_fingerprint": fingerprint, "params_digest": params.digest(), "version": dogflow_version()}


def marker_record(params: FilterParams, fingerprint: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The JSON a completion marker holds: what it is complete for, the task's summary, the parameters."""
    return {**expected_marker_key(params, fingerprint), **summary, "params": params.as_dict(), "finished": time.time()}


def write_marker(out: str | os.PathLike, position: int, channel: int, record: dict[str, Any]) -> None:
    """Mark (position, channel) complete. Call only after every level of it is written."""
    _atomic_write(marker_path(out, position, channel), json.dumps(record, sort_keys=True))


def write_preview(out: str | os.PathLike, position: int, channel: int, png: bytes) -> None:
    _atomic_write(preview_path(out, position, channel), png)


def clear_marker(out: str | os.PathLike, position: int, channel: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker_path(out, position, channel))


def clear_all_markers(out: str | os.PathLike) -> None:
    """Remove every marker (layout 1's per-position files too)."""
    d = Path(out) / META_GROUP / MARKER_DIR
    if d.is_dir():
        for f in d.iterdir():
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()


def read_marker(out: str | os.PathLike, position: int, channel: int) -> dict[str, Any] | None:
    try:
        return json.loads(marker_path(out, position, channel).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def marked(out: str | os.PathLike) -> list[tuple[int, int]]:
    """Every (position, channel) that has a marker file, sorted."""
    d = Path(out) / META_GROUP / MARKER_DIR
    found = []
    for f in d.glob("[0-9]*/c[0-9]*.json") if d.is_dir() else []:
        found.append((int(f.parent.name), int(f.stem[1:])))
    return sorted(found)


def marker_state(marker: dict[str, Any] | None, expected: dict[str, str]) -> str:
    """``complete``, ``missing`` or ``stale`` (marked, but input/params/version differ)."""
    if marker is None:
        return "missing"
    if all(marker.get(k) == v for k, v in expected.items()):
        return "complete"
    return "stale"


def stale_reason(marker: dict[str, Any], expected: dict[str, str]) -> str:
    names = {"input_fingerprint": "input changed", "params_digest": "parameters changed", "version": "dogflow version changed"}
    return ", ".join(names[k] for k, v in expected.items() if marker.get(k) != v)


@dataclass(frozen=True)
class MarkerRow:
    """The state of one (position, channel) of an output."""

    position: int
    channel: int
    state: str  # complete | missing | stale
    marker: dict[str, Any] | None
    reason: str = ""  # why stale; "" otherwise


def scan(
    out: str | os.PathLike, ds: Dataset | None, params: FilterParams, positions: Iterable[int], channels: Iterable[int]
) -> list[MarkerRow]:
    """State of every (position, channel), comparing markers with the current input.

    Without an input (``ds`` None) only the markers are read: marked counts as complete.
    """
    rows = []
    chans = list(channels)
    for p in positions:
        for c in chans:
            marker = read_marker(out, p, c)
            if ds is None or p >= ds.n_positions:
                rows.append(MarkerRow(p, c, "complete" if marker else "missing", marker))
                continue
            expected = expected_marker_key(params, input_fingerprint(ds, p, c))
            state = marker_state(marker, expected)
            rows.append(MarkerRow(p, c, state, marker, stale_reason(marker, expected) if state == "stale" else ""))
    return rows


@dataclass(frozen=True)
class OutputStatus:
    """What ``dogflow status`` shows: the output's provenance and one row per (position, channel)."""

    path: str
    provenance: dict[str, Any]
    params: FilterParams
    rows: list[MarkerRow]
    input_problem: str | None  # why staleness could not be checked, or None

    def counts(self) -> dict[str, int]:
        c = {"complete": 0, "missing": 0, "stale": 0}
        for r in self.rows:
            c[r.state] += 1
        return c


def status(out: str | os.PathLike) -> OutputStatus:
    """Scan an existing output: every position x (requested or marked) channel, against its input if readable."""
    prov = read_provenance(out) if output_exists(out) else None
    if prov is None:
        raise StoreError(f"not a dogflow output: {out}")
    if prov.get("layout_version", 1) not in RESUMABLE_LAYOUTS:
        _check_layout(out, prov, overwrite=False)
    params = FilterParams.from_dict(prov["params"])
    channels = sorted(set(prov.get("channels", [])) | {c for _, c in marked(out)})
    try:
        ds: Dataset | None = open_dataset(params.input_path)
        problem = None
    except StoreError as exc:
        ds, problem = None, str(exc)
    rows = scan(out, ds, params, range(prov["shape"][0]), channels)
    return OutputStatus(str(out), prov, params, rows, problem)


# =========================================================================== run lock


class RunLock:
    """An exclusive, crash-safe lock on one output store.

    The lock is the file ``OUTPUT/dogflow/run.lock`` created with ``O_EXCL``. It
    records host, pid, start time and run id. A lock whose owner is gone (same
    host and the pid no longer exists, or its heartbeat is older than
    ``stale_after`` seconds) is stale and is taken over. While held, the owner
    refreshes the file's mtime (heartbeat) via :meth:`heartbeat`.
    """

    def __init__(self, out: str | os.PathLike, run_id: str = "", stale_after: float = 600.0):
        self.path = lock_path(out)
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
