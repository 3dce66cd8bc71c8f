"""dogflow's output store: its layout, NGFF metadata and provenance, as an object for one opened output.

Output layout version 3 (``OUTPUT``, NGFF 0.5, zarr v3)::

    OUTPUT/zarr.json                      root group: ``ome`` = one ``multiscales`` entry per position
                                          ("position 0", ...), ``dogflow`` = provenance (layout_version 3)
    OUTPUT/P/                             group of position P (0, 1, ...)
    OUTPUT/P/0                            level 0: (C, Z, Y, X) result at full resolution; C = the input's channels
    OUTPUT/P/1, P/2, ...                  levels 1..: 2x2 means in y, x of the level above, until y,x <= 1024
    OUTPUT/dogflow/positions/PPPPPP/cCCCC.json   completion marker of (position, channel) (:mod:`tasks.markers`)
    OUTPUT/dogflow/run.lock               exclusive run lock (:mod:`tasks.lock`)
    OUTPUT/dogflow/logs/<run>-<SLURM_JOB_ID|local>.log   one log file per run
    OUTPUT/dogflow/previews/PPPPPP/cCCCC.png             input MIP next to the result's MIP

Arrays have ``dimension_names`` ["c", "z", "y", "x"], inner chunks (1, <=64, <=256, <=256) and zarr v3's
sharding codec: shards of (1, Zs, Ys, Xs) whole inner chunks, at most :data:`tasks.sharding.SHARD_BYTES`
(:func:`tasks.sharding.shard_shape`; a full seed position: 7 + 2 shard files per channel). One shard holds
one channel of one level of one position, so it has exactly one writer, the task of that (position,
channel), which writes it whole (:func:`tasks.sharding.write_whole_shards`), never shared between positions
(each position has its own arrays) nor between channels. Output channel c is the filter of input channel c;
channels that were not computed stay unwritten (fill value 0, no disk use) and have no marker. Level l has scale (1, vz, vy * 2^l, vx * 2^l) and translation
(0, 0, vy * (2^l - 1) / 2, vx * (2^l - 1) / 2), so pixel centres of a 2x2 mean stay where they were;
an odd last row or column is averaged with itself (mean of what exists). Axes z, y, x carry the
input's unit (e.g. micrometer). One position as numpy: ``zarr.open_array("OUTPUT/3/0")[:]``.

Older layouts: layout 2 (the same tree, unsharded: one object per inner chunk, 560 per full seed (position,
channel)) keeps resuming as layout 2: its arrays stay unsharded, positions it gains are created unsharded, and
``--overwrite`` recomputes it into layout 3. Layout 1 (one (P, Z, Y, X) array ``0``) is refused with a
one-line message: ``--overwrite`` recomputes it into layout 3, or a new output path starts afresh. A layout
newer than this dogflow's is refused (upgrade dogflow).

Every byte outside the arrays goes through the output's :class:`tasks.storage.Storage`.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from tasks import pyramid, sharding
from tasks.filters import FilterError, FilterParams, channel_label, kind_named
from tasks.inputs import Dataset, open_dataset
from tasks.lock import RunLock
from tasks.markers import Markers, OutputStatus, dogflow_version
from tasks.storage import Storage, StoreError, open_storage

LAYOUT_VERSION = 3  # sharded arrays
UNSHARDED_LAYOUT = 2  # the same tree with unsharded arrays: still resumed as it is
RESUMABLE_LAYOUTS = (UNSHARDED_LAYOUT, LAYOUT_VERSION)
NGFF_VERSION = "0.5"
META_GROUP = "dogflow"
LOG_PREFIX = "dogflow/logs"
PREVIEW_PREFIX = "dogflow/previews"
DIMENSION_NAMES = ("c", "z", "y", "x")
# Chosen by measurement on a (413, 512, 512) float32 DoG (see benchmarks/README.md): blosc lz4 with byte
# shuffle writes 2-4x faster than zarr's default zstd and compresses better (ratio 1.89 vs 1.46). Re-measured at
# full size on the sharded layout: blosc zstd-1/3 store 1.5-4.6 % less for 1.1-1.6x the CPU, bitshuffle no less;
# kept.
CODEC = {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"}


class PrepareAction(str, enum.Enum):
    """What preparing an output will do to it."""

    CREATE = "create"
    OPEN = "open"
    OVERWRITE = "overwrite"

    def __str__(self) -> str:
        return self.value


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
    max_plane: int = pyramid.PYRAMID_MAX_PLANE

    @classmethod
    def for_dataset(cls, params: FilterParams, ds: Dataset, voxel_size=None, unit=None, **kw: Any) -> "OutputSpec":
        """The spec of an output of ``ds``; ``voxel_size``/``unit`` default to the input's metadata."""
        vs = voxel_size if voxel_size is not None else ds.voxel_size
        return cls(params, ds.n_positions, ds.n_channels, ds.shape, tuple(vs) if vs else None,
                   unit if voxel_size is not None else ds.unit, input=ds.describe(), **kw)

    @property
    def levels(self) -> list[tuple[int, int, int]]:
        return pyramid.level_shapes(self.shape, self.max_plane)


def level_path(position: int, level: int = 0) -> str:
    """Path of a level array inside the output: ``"3/0"``."""
    return f"{int(position)}/{int(level)}"


def _voxel_list(v: Any) -> list[float] | None:
    return [float(s) for s in v] if v else None


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
        "metadata": {"method": kind_named(spec.params.kind).method, "downsampling": pyramid.DOWNSAMPLING},
    }


def _omero(kind: str, n_channels: int, computed: Iterable[int]) -> dict[str, Any]:
    """Channel labels for viewers (bioio's channel names, napari's layer names); uncomputed ones inactive."""
    done = set(computed)
    return {"channels": [{"label": channel_label(kind, c), "active": c in done, "color": "FFFFFF"}
                         for c in range(n_channels)]}


def shard_shapes(spec: OutputSpec) -> list[list[int]]:
    """The shard shape (1, Zs, Ys, Xs) of every level of a layout-3 output (:func:`tasks.sharding.shard_shape`)."""
    itemsize = np.dtype(spec.params.output_dtype).itemsize
    return [list(sharding.shard_shape((spec.n_channels, *zyx), pyramid.chunk_shape(zyx), itemsize))
            for zyx in spec.levels]


def _check_layout(path: str, prov: dict[str, Any], overwrite: bool) -> None:
    """Raise (one line) unless the output's layout can be resumed, or replaced because ``overwrite``."""
    v = prov.get("layout_version", 1)
    if v in RESUMABLE_LAYOUTS:
        return
    if isinstance(v, int) and v > LAYOUT_VERSION:
        raise StoreError(f"output {path} has layout {v}, newer than this dogflow's ({LAYOUT_VERSION}); "
                         f"upgrade dogflow, or choose a new output path")
    if not overwrite:
        raise StoreError(
            f"output {path} has dogflow's old layout {v} (one (position, z, y, x) array); --overwrite recomputes "
            f"it in layout {LAYOUT_VERSION}, or choose a new output path")


def _create_position(root: zarr.Group, position: int, spec: OutputSpec, shards: list[list[int]] | None) -> None:
    """The level arrays of one position; ``shards`` (one shape per level) makes them sharded (layout 3), None
    unsharded (layout 2)."""
    g = root.require_group(str(position))
    for level, zyx in enumerate(spec.levels):
        g.create_array(
            str(level),
            shape=(spec.n_channels, *zyx),
            chunks=pyramid.chunk_shape(zyx),
            shards=tuple(shards[level]) if shards else None,
            dtype=np.dtype(spec.params.output_dtype),
            fill_value=0,
            compressors=_codec(),
            dimension_names=list(DIMENSION_NAMES),
            overwrite=True,
        )


class Output:
    """One output store, opened (nothing is read or written until asked): its layout, provenance, arrays,
    markers, previews, run logs and lock."""

    def __init__(self, location: str | os.PathLike | Storage):
        self.storage = open_storage(location)
        self.markers = Markers(self.storage)

    @property
    def path(self) -> str:
        return self.storage.url

    def __str__(self) -> str:
        return self.path

    # ---- reading what is there
    def exists(self) -> bool:
        return self.storage.exists("zarr.json") or self.storage.exists(".zgroup")

    def provenance(self) -> dict[str, Any] | None:
        """The ``dogflow`` block of the root group's attributes; None when the group has none; a one-line
        :class:`StoreError` when the group's metadata cannot be read (a corrupt output)."""
        raw = self.storage.read_bytes("zarr.json")
        if raw is not None:
            try:
                meta = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StoreError(f"corrupt output: its zarr.json is not valid JSON: {self.path}") from None
            if not isinstance(meta, dict):
                raise StoreError(f"corrupt output: its zarr.json is not a Zarr group: {self.path}")
            return dict((meta.get("attributes") or {}).get("dogflow") or {}) or None
        try:
            g = zarr.open_group(self.storage.zarr_store(read_only=True), mode="r")
        except Exception:
            return None
        return dict(g.attrs.get("dogflow", {})) or None

    def params(self) -> FilterParams:
        """The parameters the output was made with (from its provenance)."""
        prov = self._provenance_of_layout()
        try:
            return FilterParams.from_dict(prov["params"])
        except (KeyError, FilterError):
            raise StoreError(f"output exists with unreadable dogflow provenance: {self.path}") from None

    def _provenance_of_layout(self) -> dict[str, Any]:
        if not self.storage.exists():
            raise StoreError(f"output not found: {self.path}")
        prov = self.provenance() if self.exists() else None
        if prov is None:
            raise StoreError(f"not a dogflow output: {self.path}")
        _check_layout(self.path, prov, overwrite=False)
        return prov

    def level(self, position: int, level: int = 0, mode: str = "r") -> zarr.Array:
        """One level array of one position, (C, Z, Y, X)."""
        try:
            return zarr.open_array(self.storage.zarr_store(level_path(position, level), read_only=mode == "r"),
                                   mode=mode)  # type: ignore[arg-type]
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise StoreError(f"output has no level {level} of position {position}: {self.path} "
                             f"({type(exc).__name__})") from None

    def n_levels(self, position: int) -> int:
        """How many levels position ``position`` has."""
        n = 0
        while self.storage.exists(f"{level_path(position, n)}/zarr.json"):
            n += 1
        return n

    def read(self, position: int, channel: int, level: int = 0) -> np.ndarray:
        """The filtered (z, y, x) volume of one position and channel (at ``level``), as a numpy array."""
        return self.level(position, level)[channel]

    # ---- deciding and preparing
    def check(self, spec: OutputSpec, overwrite: bool) -> PrepareAction:
        """Decide what :meth:`prepare` will do, without writing anything.

        Raises :class:`StoreError` (one line) when the output cannot be used: not dogflow's, corrupt, old
        layout, another filter, shape, voxel size or parameters (the last four unless ``overwrite``).
        """
        self.storage.check_writable()
        if not self.storage.exists():
            return PrepareAction.CREATE
        if not self.exists():
            if any(name != META_GROUP for name in self.storage.list("")):
                raise StoreError(f"output path exists, is not empty and is not a Zarr group: {self.path}")
            return PrepareAction.CREATE
        prov = self.provenance()
        if prov is None:
            raise StoreError(f"output exists but was not written by dogflow: {self.path}")
        _check_layout(self.path, prov, overwrite)
        if prov.get("layout_version", 1) not in RESUMABLE_LAYOUTS:
            return PrepareAction.OVERWRITE
        try:
            old = FilterParams.from_dict(prov["params"])
            old_czyx = tuple(prov["shape"][1:])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"output exists with unreadable dogflow provenance: {self.path}") from None
        if overwrite:
            return PrepareAction.OVERWRITE
        lose = (f"--overwrite discards its {len(self.markers.marked())} computed (position, channel) pair(s) and "
                f"computes the selected ones anew")
        if old.kind != spec.params.kind:
            raise StoreError(f"output {self.path} holds a {kind_named(old.kind).label} filter, not a "
                             f"{kind_named(spec.params.kind).label}; choose another output path ({lose})")
        new_czyx = (spec.n_channels, *spec.shape)
        if old_czyx != new_czyx:
            raise StoreError(f"output exists with another shape (c,z,y,x)={old_czyx}, input has {new_czyx}; {lose}")
        old_vs, new_vs = _voxel_list(prov.get("voxel_size")), _voxel_list(spec.voxel_size)
        if (old_vs is None) != (new_vs is None) or (old_vs and not np.allclose(old_vs, new_vs, rtol=1e-6, atol=0)) or (
            old_vs and prov.get("unit") != spec.unit
        ):
            raise StoreError(f"output exists with another voxel size ({old_vs} {prov.get('unit') or ''} -> "
                             f"{new_vs} {spec.unit or ''}); {lose}")
        if old != spec.params:
            diff = "; ".join(spec.params.differences(old))
            raise StoreError(f"output exists with other parameters ({diff}); {lose}")
        return PrepareAction.OPEN

    def _remove_old_content(self) -> None:
        """Before an overwrite: every marker first (nothing may stay marked), then the image nodes and previews."""
        self.markers.clear_all()
        for name in self.storage.list(""):
            if name.isdigit():
                self.storage.delete_tree(name)
        self.storage.delete_tree(PREVIEW_PREFIX)

    def prepare(self, spec: OutputSpec, overwrite: bool = False, channels: Iterable[int] = ()) -> dict[str, Any]:
        """Create or open the output, after :meth:`check`; returns its provenance block.

        - create: the root group, every position's level arrays (nothing written into them) and metadata.
        - open: same parameters; positions the input gained are added (existing ones untouched).
        - overwrite: markers are removed *first*, so that nothing is ever marked complete for data computed
          with other parameters; then the position groups are recreated.

        ``channels`` (the run's selection) are added to the provenance's ``channels`` list. Only the flow
        process writes the root attributes, under the run lock.
        """
        action = self.check(spec, overwrite)
        if action is PrepareAction.OVERWRITE:
            self._remove_old_content()
        if action in (PrepareAction.CREATE, PrepareAction.OVERWRITE):
            return self._create(spec, channels)
        root = zarr.open_group(self.storage.zarr_store(), mode="a")
        attrs = root.attrs.asdict()
        prov, ome = dict(attrs["dogflow"]), dict(attrs["ome"])
        if spec.n_positions > prov["shape"][0]:
            old_spec = OutputSpec(spec.params, prov["shape"][0], spec.n_channels, spec.shape, spec.voxel_size,
                                  spec.unit, max_plane=prov.get("pyramid", {}).get("max_plane", spec.max_plane))
            for pos in range(old_spec.n_positions, spec.n_positions):  # layout 2 stays unsharded (no "shards")
                _create_position(root, pos, old_spec, prov.get("shards"))
            ome["multiscales"] = list(ome["multiscales"]) + [
                _multiscale(q, old_spec) for q in range(old_spec.n_positions, spec.n_positions)]
            prov["shape"] = [spec.n_positions, *prov["shape"][1:]]
        prov["version"] = dogflow_version()
        prov["channels"] = sorted(set(prov.get("channels", [])) | {int(c) for c in channels})
        prov["params"] = {**prov["params"], **spec.physical}
        ome["omero"] = _omero(spec.params.kind, spec.n_channels, prov["channels"])
        if prov != attrs["dogflow"] or ome != attrs["ome"]:
            root.attrs.put({**attrs, "ome": ome, "dogflow": prov})
        return prov

    def _create(self, spec: OutputSpec, channels: Iterable[int]) -> dict[str, Any]:
        root = zarr.open_group(self.storage.zarr_store(), mode="a", zarr_format=3)
        shards = shard_shapes(spec)
        for pos in range(spec.n_positions):
            _create_position(root, pos, spec, shards)
        meta = root.require_group(META_GROUP)
        meta.attrs["description"] = "dogflow bookkeeping: completion markers, run lock, logs and previews"
        prov = {
            "layout_version": LAYOUT_VERSION,
            "version": dogflow_version(),
            "filter": spec.params.kind,
            "params": {**spec.params.as_dict(), **spec.physical},
            "shape": [spec.n_positions, spec.n_channels, *spec.shape],
            "voxel_size": _voxel_list(spec.voxel_size),
            "unit": spec.unit if spec.voxel_size else None,
            "levels": [list(s) for s in spec.levels],
            "pyramid": {"method": pyramid.DOWNSAMPLING, "max_plane": spec.max_plane},
            "codec": dict(CODEC),
            "chunks": [list(pyramid.chunk_shape(s)) for s in spec.levels],
            "shards": shards,
            "input": spec.input,
            "channels": sorted({int(c) for c in channels}),
            "uint16_policy": pyramid.UINT16_POLICY,
            "float16_policy": pyramid.FLOAT16_POLICY,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        ome = {
            "version": NGFF_VERSION,
            "multiscales": [_multiscale(q, spec) for q in range(spec.n_positions)],
            "omero": _omero(spec.params.kind, spec.n_channels, prov["channels"]),
        }
        root.attrs.put({"ome": ome, "dogflow": prov})
        return prov

    # ---- writing one (position, channel)
    def write_levels(self, position: int, channel: int, result: np.ndarray, output_dtype: str,
                     threads: int | None = None) -> int:
        """Write the float ``result`` (z, y, x) of one (position, channel) as every level; returns the level count.

        Each level is computed from the previous one in memory (no re-read), cast to the output dtype, written,
        and dropped before the next; the extra memory is a quarter of ``result`` plus one cast copy (uint16,
        float16), bounded by :func:`tasks.pyramid.write_peak_bytes`. Sharded levels (layout 3) are written as
        whole shards by :func:`tasks.sharding.write_whole_shards` on up to ``threads`` threads: nothing is read
        back, and each shard replaces the old one whole. Unsharded levels (layout 2) are written by zarr's
        asynchronous pipeline (``async.concurrency``).
        """
        levels = self.n_levels(position)
        if levels == 0:
            raise StoreError(f"output has no arrays for position {position}: {self.path}")
        current = result
        for level in range(levels):
            if level:
                current = pyramid.downsample_mean(current)
            # every chunk holds computed data: skip zarr's per-chunk "all fill value?" scan (measured ~25 % faster)
            arr = self.level(position, level, mode="r+").with_config({"write_empty_chunks": True})
            sharding.write_whole_shards(arr, (channel,), pyramid.to_output_dtype(current, output_dtype), threads)
        return levels

    @staticmethod
    def preview_key(position: int, channel: int) -> str:
        return f"{PREVIEW_PREFIX}/{int(position):06d}/c{int(channel):04d}.png"

    def write_preview(self, position: int, channel: int, png: bytes) -> None:
        self.storage.write_atomic(self.preview_key(position, channel), png)

    def read_preview(self, position: int, channel: int) -> bytes | None:
        return self.storage.read_bytes(self.preview_key(position, channel))

    def log_path(self, run_name: str, job_id: str | None = None, folder: str | os.PathLike | None = None) -> Path:
        """``OUTPUT/dogflow/logs/<run-name>-<SLURM_JOB_ID|local>.log`` (or that name in ``folder``); the folder is
        created. A run log grows as the run goes, so it is a local file: for an output on an object store it is
        written in a local temporary folder and copied next to the output by :meth:`keep_log`."""
        d = Path(folder) if folder else self.storage.local_path(LOG_PREFIX)
        if d is None:
            import tempfile

            d = Path(tempfile.gettempdir()) / "dogflow-logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{run_name}-{job_id or 'local'}.log"

    def log_key(self, log: Path) -> str:
        return f"{LOG_PREFIX}/{log.name}"

    def keep_log(self, log: Path) -> str:
        """Where the run log ends up: the file itself on a filesystem; on an object store, a copy in the output."""
        if self.storage.local_path(LOG_PREFIX) is not None or not log.exists():
            return str(log)
        self.storage.write_atomic(self.log_key(log), log.read_bytes())
        return f"{self.path}/{self.log_key(log)}"

    def lock(self, run_id: str = "", run_name: str = "") -> RunLock:
        return RunLock(self.storage, run_id=run_id, run_name=run_name)

    # ---- status
    def status(self) -> OutputStatus:
        """Scan the output: every position x (requested or marked) channel, against its input if readable."""
        prov = self._provenance_of_layout()
        params = self.params()
        channels = sorted(set(prov.get("channels", [])) | {c for _, c in self.markers.marked()})
        try:
            ds: Dataset | None = open_dataset(params.input_path)
            problem = None
        except StoreError as exc:
            ds, problem = None, str(exc)
        rows = self.markers.scan(ds, params, range(prov["shape"][0]), channels)
        return OutputStatus(self.path, prov, params, rows, problem)
