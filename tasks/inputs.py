"""Input layouts, read through one uniform :class:`Dataset` (positions x channels of (z, y, x) volumes).

Layouts (``Dataset.layout``):

``array``
    A plain 5-D ``(position, channel, z, y, x)`` Zarr array, zarr v2 or v3 (the seed's
    ``da.from_zarr(path)`` layout). No voxel size.
``ome-zarr``
    An OME-Zarr group, NGFF 0.4 (zarr v2, ``multiscales`` at the top of the attributes) or 0.5 (zarr v3,
    under ``ome``). Each ``multiscales`` entry is an image whose full-resolution array (its first
    dataset) has axes ``(t,) (c,) z, y, x`` with t = 1; each image is one position. A 5-D array
    without axes metadata (or with a first axis that is neither t nor c) is read as
    ``(position, channel, z, y, x)``, as before.
``bioformats2raw``
    A root with ``bioformats2raw.layout: 3`` (NGFF 0.4 attributes, or 0.5 under ``ome``); each series
    group (``0``, ``1``, ..., or the list in ``OME/``'s ``series`` attribute) is an NGFF image: one position.
``dogflow``
    dogflow's own output (layouts 2 and 3): an OME-Zarr group with one ``multiscales`` entry per position.

Voxel size and unit come from the NGFF metadata (scale of the full-resolution dataset, times the
multiscale's own scale; unit of the z, y, x axes); every position must agree on shape, dtype, channel
count and voxel size (checked by ``open_dataset(path)``; a task opens with ``check=False`` and reads only
the metadata of the image it filters). Every failure is a one-line :class:`StoreError`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from tasks import buffers
from tasks.storage import Storage, StoreError, open_storage
from tasks.units import UM_PER as _UM_PER

__all__ = ["Dataset", "StoreError", "open_dataset"]

SPACE = ("z", "y", "x")


# --------------------------------------------------------------------------- one image


@dataclass
class _Image:
    """One NGFF image (or the plain array): a full-resolution array and what its leading axes are."""

    name: str  # for messages: the group path of the image, or "" for the root
    array: zarr.Array
    leading: tuple[str, ...]  # names of the axes before z,y,x: subset of ("position"|"t"|other, "c")
    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None

    @property
    def n_positions(self) -> int:
        return self.array.shape[self.leading.index("position")] if "position" in self.leading else 1

    @property
    def n_channels(self) -> int:
        return self.array.shape[self.leading.index("c")] if "c" in self.leading else 1

    def index(self, position: int, channel: int) -> tuple[int, ...]:
        return tuple(position if a == "position" else channel if a == "c" else 0 for a in self.leading)


def _grid(arr: zarr.Array) -> tuple[int, ...]:
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def _is_real_numeric(dtype: np.dtype) -> bool:
    return (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) and not np.issubdtype(
        dtype, np.bool_
    )


# --------------------------------------------------------------------------- the dataset


@dataclass
class Dataset:
    """A read-only input: ``n_positions`` x ``n_channels`` volumes of ``shape`` (z, y, x)."""

    path: str
    layout: str
    loaders: list[Callable[[], _Image]] = field(repr=False)  # one per image; opened on first use
    storage: Storage = field(repr=False, default=None)  # type: ignore[assignment]
    _opened: dict[int, _Image] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.storage is None:
            self.storage = open_storage(self.path)

    @property
    def opened_images(self) -> list[int]:
        """Which images' metadata have been read so far (a task reads only its position's)."""
        return sorted(self._opened)

    def image(self, i: int) -> _Image:
        """Image ``i``, its metadata read on first use (a task opens only the image of its position)."""
        if i not in self._opened:
            self._opened[i] = self.loaders[i]()
        return self._opened[i]

    # ---- geometry (from the first image; :func:`open_dataset` checks that the others agree)
    @property
    def n_positions(self) -> int:
        # several images: one position each; one image: its position axis (a plain 5-D array), or 1
        return len(self.loaders) if len(self.loaders) > 1 else self.image(0).n_positions

    @property
    def n_channels(self) -> int:
        return self.image(0).n_channels

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image(0).array.shape[-3:])  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.image(0).array.dtype

    @property
    def voxel_size(self) -> tuple[float, float, float] | None:
        """(z, y, x) in :attr:`unit`; None when unknown (plain array)."""
        return self.image(0).voxel_size

    @property
    def unit(self) -> str | None:
        """NGFF unit name of z, y, x ("micrometer"), or None."""
        return self.image(0).unit

    @property
    def voxel_size_um(self) -> tuple[float, float, float] | None:
        if self.voxel_size is None or self.unit not in _UM_PER:
            return None
        f = _UM_PER[self.unit]
        return (self.voxel_size[0] * f, self.voxel_size[1] * f, self.voxel_size[2] * f)

    def describe(self) -> dict[str, Any]:
        """What provenance records about the input."""
        return {
            "path": self.path,
            "layout": self.layout,
            "positions": self.n_positions,
            "channels": self.n_channels,
            "shape_zyx": list(self.shape),
            "dtype": str(self.dtype),
            "voxel_size": list(self.voxel_size) if self.voxel_size else None,
            "unit": self.unit,
        }

    # ---- where a (position, channel) lives
    def _locate(self, position: int, channel: int) -> tuple[_Image, tuple[int, ...]]:
        if not 0 <= position < self.n_positions:
            raise StoreError(f"position {position} out of range: the input has {self.n_positions} positions")
        if not 0 <= channel < self.n_channels:
            raise StoreError(f"channel {channel} out of range: the input has {self.n_channels} channels")
        if len(self.loaders) == 1:
            im = self.image(0)
            return im, im.index(position, channel)
        im = self.image(position)
        return im, im.index(0, channel)

    def read(self, position: int, channel: int) -> np.ndarray:
        """The (z, y, x) volume of one position and channel, as stored (dtype of the input)."""
        im, idx = self._locate(position, channel)
        out = buffers.empty(im.array.shape[len(idx):], im.array.dtype)   # pre-populated: 2x faster for a full position
        im.array.get_basic_selection(idx, out=NDBuffer.from_numpy_array(out))
        return out

    def _objects(self, position: int, channel: int) -> Iterator[tuple[str, tuple[slice, ...]]]:
        """(key, region) of every stored object (chunk, or shard) covering one position and channel; keys are
        relative to the input's root."""
        im, idx = self._locate(position, channel)
        arr = im.array
        grid = _grid(arr)
        lead = tuple(i // g for i, g in zip(idx, grid))
        counts = [range(-(-arr.shape[d] // grid[d])) for d in range(arr.ndim - 3, arr.ndim)]
        for zyx in itertools.product(*counts):
            key = arr.metadata.encode_chunk_key((*lead, *zyx))
            region = tuple(slice(i * g, (i + 1) * g) for i, g in zip(zyx, grid[-3:]))
            yield (f"{arr.path}/{key}" if arr.path else key), (*idx, *region)

    def stored_objects(self, position: int, channel: int) -> list[str]:
        """Keys of every stored object covering ``(position, channel)``, relative to the input's root."""
        return [key for key, _ in self._objects(position, channel)]

    def missing_objects(self, position: int, channel: int) -> list[str]:
        """Keys of the stored objects of ``(position, channel)`` that are not in the store."""
        return [key for key, st in self.storage.stat_many(self.stored_objects(position, channel)).items() if st is None]

    def find_unreadable_chunk(self, position: int, channel: int) -> tuple[str, str] | None:
        """Decode each chunk of ``(position, channel)`` alone; (name, error) of the first that fails, or None."""
        im, _ = self._locate(position, channel)
        for name, region in self._objects(position, channel):
            try:
                im.array[region]
            except Exception as exc:
                return name, f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None

    def fingerprint(self, position: int, channel: int) -> str:
        """Fingerprint of ``(position, channel)`` without reading its data.

        SHA-256 of the (name, size, version) of every stored object (chunk, or shard when sharded) that
        covers it, plus the (z, y, x) shape, dtype and storage grid (not the number of positions, which
        may grow). The version is the store's (:meth:`tasks.storage.Storage.stat`: mtime on a filesystem). A
        missing object contributes (name, -1, -1). Any rewrite of a chunk changes its version, so a changed
        input changes the fingerprint; the cost is one ``stat`` per object.
        """
        im, _ = self._locate(position, channel)
        h = hashlib.sha256()
        h.update(json.dumps([list(self.shape), str(self.dtype), list(_grid(im.array)[-3:])]).encode())
        for name, st in self.storage.stat_many(self.stored_objects(position, channel)).items():
            h.update((f"{name}\0{st.size}\0{st.version}\n" if st else f"{name}\0-1\0-1\n").encode())
        return h.hexdigest()[:32]


# --------------------------------------------------------------------------- opening


def open_dataset(path: str | os.PathLike, check: bool = True) -> Dataset:
    """Open any supported input layout read-only (see the module docstring).

    With ``check`` every image's metadata is read and compared (what validation does); without it only the
    first image is opened now and the others when used (what a task does: it needs one position).
    """
    storage = open_storage(path)
    if not storage.exists():
        raise StoreError(f"input not found: {path}")
    try:
        node = zarr.open(storage.zarr_store(read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise StoreError(f"input is not a Zarr array or group: {path} ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        if node.ndim != 5:
            raise StoreError(f"input must be 5-D (position, channel, z, y, x); {path} has shape {tuple(node.shape)}")
        ds = Dataset(storage.url, "array", [lambda: _Image("", node, ("position", "c"))], storage)
    else:
        ds = _open_group(node, storage)
    _check_consistent(ds, every_image=check)
    return ds


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """NGFF metadata: under ``ome`` (0.5) or at the top of the attributes (0.4)."""
    return dict(attrs["ome"]) if isinstance(attrs.get("ome"), dict) else attrs


def _open_group(root: zarr.Group, storage: Storage) -> Dataset:
    path = storage.url
    attrs = dict(root.attrs)
    meta = _ome(attrs)
    if meta.get("bioformats2raw.layout") is not None:
        if meta["bioformats2raw.layout"] != 3:
            raise StoreError(f"unsupported bioformats2raw.layout {meta['bioformats2raw.layout']!r} (3 is): {path}")
        series = _series(root, path)
        return Dataset(path, "bioformats2raw", [functools.partial(_image_in, root, s, path) for s in series], storage)
    if meta.get("multiscales"):
        layout = "dogflow" if (attrs.get("dogflow") or {}).get("layout_version") in (2, 3) else "ome-zarr"
        return Dataset(path, layout, [functools.partial(_image, root, "", ms, path, i)
                                      for i, ms in enumerate(meta["multiscales"])], storage)
    if "0" in root and isinstance(root["0"], zarr.Array):  # a group holding the plain array as "0"
        return Dataset(path, "ome-zarr", [functools.partial(_image, root, "", {"datasets": [{"path": "0"}]}, path, 0)],
                       storage)
    raise StoreError(
        f"input group is neither an OME-Zarr image (no 'multiscales') nor a bioformats2raw root: {path}"
    )


def _series(root: zarr.Group, path: str) -> list[str]:
    """Series paths of a bioformats2raw root: ``OME/``'s ``series`` list, else 0, 1, ... while they exist."""
    if "OME" in root and isinstance(root["OME"], zarr.Group):
        listed = _ome(dict(root["OME"].attrs)).get("series")
        if listed:
            return [str(s) for s in listed]
    series = list(itertools.takewhile(lambda s: s in root, (str(i) for i in itertools.count())))
    if not series:
        raise StoreError(f"bioformats2raw root has no series groups (0, 1, ...): {path}")
    return series


def _member(group: zarr.Group, key: str, kind: type, missing: str, wrong: str) -> Any:
    """``group[key]`` if it is a ``kind`` (zarr.Group or zarr.Array), else a one-line error."""
    try:
        node = group[key]
    except KeyError:
        raise StoreError(missing) from None
    if not isinstance(node, kind):
        raise StoreError(wrong)
    return node


def _image_in(root: zarr.Group, name: str, path: str) -> _Image:
    g = _member(root, name, zarr.Group, f"series {name!r} listed in OME/ is missing from {path}",
                f"series {name!r} of {path} is not a group")
    multiscales = _ome(dict(g.attrs)).get("multiscales")
    if not multiscales:
        raise StoreError(f"series {name!r} of {path} is not an OME-Zarr image (no 'multiscales')")
    return _image(g, name, multiscales[0], path, 0)


def _image(group: zarr.Group, name: str, ms: dict[str, Any], path: str, index: int) -> _Image:
    where = f"{path}/{name}" if name else path
    try:
        ds0 = ms["datasets"][0]
        arr_path = str(ds0["path"])
    except (KeyError, IndexError, TypeError):
        raise StoreError(f"multiscales entry {index} of {where} has no datasets") from None
    arr = _member(group, arr_path, zarr.Array, f"input group has no full-resolution array '{arr_path}': {where}",
                  f"input '{where}/{arr_path}' is not an array")
    label = f"{name}/{arr_path}" if name else arr_path
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes") or []]
    if not axes:
        if arr.ndim != 5:
            raise StoreError(f"input must be 5-D (position, channel, z, y, x); {where}/{arr_path} has shape {tuple(arr.shape)}")
        axes = ["position", "c", *SPACE]
    if len(axes) != arr.ndim:
        raise StoreError(f"{where}: {len(axes)} axes in the metadata but array '{arr_path}' is {arr.ndim}-D")
    if tuple(axes[-3:]) != SPACE:
        raise StoreError(f"{where}: the last three axes must be z, y, x; found {axes}")
    leading = list(axes[:-3])
    for i, a in enumerate(leading):
        if a == "c":
            continue
        if a == "t":
            if arr.shape[i] != 1:
                raise StoreError(f"{label} has {arr.shape[i]} time points; dogflow reads images with t = 1")
        elif i == 0:
            leading[i] = "position"  # legacy: a first axis that is not t or c counts positions
        else:
            raise StoreError(f"{where}: unsupported axis {a!r} (axes must be (t,) (c,) z, y, x)")
    voxel, unit = _voxel_size(ms, ds0, axes, where)
    if not name and "/" in arr_path:  # one of several images in one group (dogflow's output): "3" for "3/0"
        name = arr_path.rsplit("/", 1)[0]
    return _Image(name, arr, tuple(leading), voxel, unit)


def _voxel_size(ms: dict[str, Any], ds0: dict[str, Any], axes: list[str], where: str):
    scale = np.ones(len(axes))
    found = False
    for transforms in (ms.get("coordinateTransformations") or [], ds0.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                if len(t["scale"]) != len(axes):
                    raise StoreError(f"{where}: a scale has {len(t['scale'])} values for {len(axes)} axes")
                scale = scale * np.asarray(t["scale"], dtype=float)
                found = True
    if not found:
        return None, None
    axis_meta = [a for a in ms.get("axes") or [] if isinstance(a, dict)]
    units = [a.get("unit") for a in axis_meta[-3:]] if len(axis_meta) == len(axes) else [None] * 3
    zyx = tuple(float(s) for s in scale[-3:])
    if len(set(units)) == 1:
        return zyx, units[0]
    if all(u in _UM_PER for u in units):  # mixed known units: micrometers on every axis
        return tuple(v * _UM_PER[u] for v, u in zip(zyx, units)), "micrometer"
    raise StoreError(f"{where}: the z, y, x axes have different or unknown units {units}")


def _check_consistent(ds: Dataset, every_image: bool) -> None:
    first = ds.image(0)
    if not _is_real_numeric(first.array.dtype):
        raise StoreError(f"input must be a real numeric array; {ds.path} has dtype {first.array.dtype}")
    for i in range(1, len(ds.loaders)) if every_image else ():
        im = ds.image(i)
        what = None
        if im.n_positions != 1 or first.n_positions != 1:
            what = "a position axis, but several images are one position each"
        elif tuple(im.array.shape[-3:]) != ds.shape:
            what = f"shape (z,y,x) {tuple(im.array.shape[-3:])}, not {ds.shape}"
        elif im.n_channels != ds.n_channels:
            what = f"{im.n_channels} channels, not {ds.n_channels}"
        elif im.array.dtype != ds.dtype:
            what = f"dtype {im.array.dtype}, not {ds.dtype}"
        elif im.unit != ds.unit or (im.voxel_size is None) != (ds.voxel_size is None) or (
            im.voxel_size is not None and not np.allclose(im.voxel_size, ds.voxel_size, rtol=1e-6, atol=0)
        ):
            what = f"voxel size {im.voxel_size} {im.unit or ''}, not {ds.voxel_size} {ds.unit or ''}".replace("  ", " ")
        if what:
            raise StoreError(
                f"input series {im.name or '?'} has {what} (series {first.name or '0'}); "
                f"dogflow needs every position alike: {ds.path}"
            )
