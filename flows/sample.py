"""A small synthetic 5-D dataset: fluorescent blobs on a background, with Poisson noise (uint16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage


def make_sample(
    path: str | Path,
    positions: int = 4,
    channels: int = 2,
    shape: tuple[int, int, int] = (24, 96, 96),
    chunks: tuple[int, int, int] | None = None,
    blobs: int = 40,
    seed: int = 0,
    zarr_format: int = 3,
    overwrite: bool = True,
) -> zarr.Array:
    """Write a (positions, channels, z, y, x) uint16 Zarr array at ``path`` and return it.

    Each (position, channel) volume is a background of ~100 counts plus ``blobs``
    Gaussian spots (σ 1.5–4 voxels, peak 200–2000 counts above background), with
    Poisson noise. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    z, y, x = shape
    arr = zarr.create_array(
        str(path),
        shape=(positions, channels, z, y, x),
        chunks=(1, 1, *(chunks or (min(z, 16), min(y, 64), min(x, 64)))),
        dtype="uint16",
        fill_value=0,
        zarr_format=zarr_format,
        overwrite=overwrite,
    )
    for p in range(positions):
        for c in range(channels):
            arr[p, c] = sample_volume(shape, blobs, rng)
    return arr


def sample_volume(shape: tuple[int, int, int], blobs: int, rng: np.random.Generator) -> np.ndarray:
    vol = np.zeros(shape, dtype=np.float64)
    idx = tuple(rng.integers(0, s, size=blobs) for s in shape)
    np.add.at(vol, idx, rng.uniform(200, 2000, size=blobs))
    sigma = float(rng.uniform(1.5, 4.0))
    vol = ndimage.gaussian_filter(vol, sigma) * (2 * np.pi * sigma**2) ** 1.5
    vol += 100.0
    return np.clip(rng.poisson(vol), 0, 65535).astype(np.uint16)
