"""Test datasets on disk: random volumes and the NGFF layouts dogflow reads (OME-Zarr images, bioformats2raw)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from flows.sample import sample_volume


def random_volume(shape, dtype="uint16", seed=0, low=None, high=None) -> np.ndarray:
    """A random volume (tests, benchmarks): integers over the dtype's full range (or [low, high)),
    floats ~ N(0, 100²). Integers are drawn in their own dtype (no int64 temporary of the volume)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        info = np.iinfo(dt)
        lo, hi = (info.min if low is None else low), (info.max + 1 if high is None else high)
        return rng.integers(lo, hi, size=shape, dtype=dt)
    return (rng.standard_normal(shape) * 100).astype(dt)


# --------------------------------------------------------------------------- the other input layouts


def _ngff_image(
    group: zarr.Group,
    volumes: np.ndarray,
    voxel_size: tuple[float, float, float] | None,
    unit: str | None,
    ngff: str,
    chunks: tuple[int, int, int] | None,
    levels: int = 2,
) -> dict:
    """Write a (c, z, y, x) stack as an NGFF image with axes t,c,z,y,x (t = 1) into ``group``; returns its multiscale.

    Level 0 is the data; each further level takes every second pixel in y and x (as bioformats2raw's
    pyramids do, a reader must use level 0 for the full resolution).
    """
    c, z, y, x = volumes.shape
    zarr_format = 2 if ngff == "0.4" else 3
    vz, vy, vx = voxel_size or (1.0, 1.0, 1.0)
    datasets = []
    for level in range(levels):
        f = 2**level
        data = volumes[None, :, :, ::f, ::f]
        kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {
            "dimension_names": ["t", "c", "z", "y", "x"]}
        arr = group.create_array(str(level), shape=data.shape, dtype=data.dtype, fill_value=0,
                                 chunks=(1, 1, *(chunks or (min(z, 16), min(data.shape[3], 64), min(data.shape[4], 64)))),
                                 overwrite=True, **kw)
        arr[...] = data
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, vz, vy * f, vx * f]}]})
    unit_kw = {"unit": unit} if unit else {}
    ms = {
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]
        + [{"name": a, "type": "space", **unit_kw} for a in "zyx"],
        "datasets": datasets,
        "name": group.basename or "image",
    }
    if ngff == "0.4":
        ms["version"] = "0.4"
        group.attrs["multiscales"] = [ms]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    return ms


def make_ome_image(
    path: str | Path,
    channels: int = 2,
    shape: tuple[int, int, int] = (12, 40, 36),
    voxel_size: tuple[float, float, float] | None = (2.0, 0.406, 0.406),
    unit: str | None = "micrometer",
    ngff: str = "0.5",
    chunks: tuple[int, int, int] | None = None,
    blobs: int = 12,
    seed: int = 0,
) -> np.ndarray:
    """One OME-Zarr image (one position), axes t,c,z,y,x with t = 1; NGFF 0.4 (zarr v2) or 0.5 (zarr v3).

    Returns the (channel, z, y, x) data written at full resolution.
    """
    rng = np.random.default_rng(seed)
    data = np.stack([sample_volume(shape, blobs, rng) for _ in range(channels)])
    g = zarr.open_group(str(path), mode="w", zarr_format=2 if ngff == "0.4" else 3)
    _ngff_image(g, data, voxel_size, unit, ngff, chunks)
    return data


def make_bioformats2raw(
    path: str | Path,
    positions: int = 3,
    channels: int = 2,
    shape: tuple[int, int, int] = (12, 40, 36),
    voxel_size: tuple[float, float, float] | None = (2.0, 0.406, 0.406),
    unit: str | None = "micrometer",
    ngff: str = "0.4",
    series_list: bool = True,
    chunks: tuple[int, int, int] | None = None,
    blobs: int = 12,
    seed: int = 0,
) -> np.ndarray:
    """A bioformats2raw-layout root (``bioformats2raw.layout: 3``): series groups 0, 1, ... each an NGFF image.

    NGFF 0.4 on zarr v2 (what bioformats2raw writes by default) or 0.5 on zarr v3. With ``series_list``
    the ``OME/`` group lists the series. Returns the (position, channel, z, y, x) data at full resolution.
    """
    rng = np.random.default_rng(seed)
    zarr_format = 2 if ngff == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    if ngff == "0.4":
        root.attrs["bioformats2raw.layout"] = 3
    else:
        root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    data = np.stack([np.stack([sample_volume(shape, blobs, rng) for _ in range(channels)]) for _ in range(positions)])
    for p in range(positions):
        _ngff_image(root.create_group(str(p)), data[p], voxel_size, unit, ngff, chunks)
    if series_list:
        ome = root.create_group("OME")
        series = [str(p) for p in range(positions)]
        if ngff == "0.4":
            ome.attrs["series"] = series
        else:
            ome.attrs["ome"] = {"version": "0.5", "series": series}
        (Path(path) / "OME" / "METADATA.ome.xml").write_text(
            '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"/>'
        )
    return data
