"""What a task writes besides the result itself: the pyramid levels below it and the cast to the output dtype.

Pure functions over numpy arrays; :mod:`tasks.output` writes what they return.
"""

from __future__ import annotations

import numpy as np

from tasks import buffers, defaults
from tasks.storage import StoreError

PYRAMID_MAX_PLANE = 1024  # levels halve y and x until both are <= this
OUTPUT_DTYPES = defaults.OUTPUT_DTYPES
UINT16_POLICY = "round half to even, then clip to [0, 65535]"
DOWNSAMPLING = "2x2 mean in y,x of the level above, computed in float32; odd last row/column: mean of what exists"
CAST_BLOCK = 1 << 22  # elements cast to uint16 at a time (one float32 block of 16 MiB)


def check_output_dtype(output_dtype: str) -> str:
    """``output_dtype`` if dogflow writes it, else a one-line :class:`StoreError`."""
    if output_dtype not in OUTPUT_DTYPES:
        raise StoreError(f"unknown output dtype {output_dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    return output_dtype


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


def to_output_dtype(result: np.ndarray, output_dtype: str) -> np.ndarray:
    """Cast a float result to the output dtype.

    float32: as is. uint16: round half to even (``np.rint``), then clip to ``[0, 65535]``; negative values
    become 0, never wrap around.
    """
    if check_output_dtype(output_dtype) == "float32":
        return result.astype(np.float32, copy=False)
    # uint16, in blocks: the extra memory is the uint16 result plus one block
    src = np.ascontiguousarray(result).reshape(-1)
    out = buffers.empty(src.shape, np.uint16)
    for i in range(0, src.size, CAST_BLOCK):
        blk = np.rint(src[i : i + CAST_BLOCK])
        np.clip(blk, 0, 65535, out=blk)
        out[i : i + CAST_BLOCK] = blk
    return out.reshape(np.shape(result))


def write_peak_bytes(zyx: tuple[int, int, int], output_dtype: str) -> int:
    """Upper bound of what writing one (position, channel) holds at its peak, the float32 result ``W`` included:
    the pyramid levels below it (each built from the one above: less than ``W / 3`` together) and, for uint16
    output, the cast copy of level 0 (``W / 2``, cast in blocks of :data:`CAST_BLOCK`). zarr's chunk buffers are
    not included."""
    n = int(np.prod(zyx))
    peak = n * 4 + n * 4 // 3
    if np.dtype(output_dtype) == np.uint16:
        peak += n * 2 + CAST_BLOCK * 4
    return peak
