"""What a task writes besides the result itself: the pyramid levels below it and the cast to the output dtype.

Pure functions over numpy arrays; :mod:`tasks.output` writes what they return.
"""

from __future__ import annotations

import numpy as np

from tasks import buffers, filters

PYRAMID_MAX_PLANE = 1024  # levels halve y and x until both are <= this
UINT16_POLICY = "round half to even, then clip to [0, 65535]"
FLOAT16_POLICY = ("clip to [-65504, 65504], then round to the nearest float16 (11-bit significand: relative "
                  "error <= 2**-11 for |v| >= 2**-14, absolute <= 2**-25 below)")
DOWNSAMPLING = "2x2 mean in y,x of the level above, computed in float32; odd last row/column: mean of what exists"
CAST_BLOCK = 1 << 22  # elements cast to uint16/float16 at a time (one float32 block of 16 MiB)
FLOAT16_MAX = 65504.0  # np.finfo(np.float16).max


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
    become 0, never wrap around. float16: clip to ``[-65504, 65504]`` (never infinity), then round to the
    nearest float16, ties to even (numpy's cast): an 11-bit significand, so the relative error is at most
    2**-11 for ``|v| >= 2**-14`` and the absolute error at most 2**-25 below that. The output equals
    ``np.clip(result, -65504, 65504).astype(np.float16)``.
    """
    if filters.check_output_dtype(output_dtype) == "float32":
        return result.astype(np.float32, copy=False)
    # uint16 and float16, in blocks: the extra memory is the cast result plus one block
    src = np.ascontiguousarray(result).reshape(-1)
    out = buffers.empty(src.shape, np.dtype(output_dtype))
    lo, hi = (0, 65535) if output_dtype == "uint16" else (-FLOAT16_MAX, FLOAT16_MAX)
    for i in range(0, src.size, CAST_BLOCK):
        blk = np.rint(src[i : i + CAST_BLOCK]) if output_dtype == "uint16" else src[i : i + CAST_BLOCK].copy()
        np.clip(blk, lo, hi, out=blk)
        out[i : i + CAST_BLOCK] = blk
    return out.reshape(np.shape(result))


CHUNK_ZYX = (64, 256, 256)  # largest inner chunk (z, y, x) of an output level: what viewers read


def chunk_shape(zyx: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Inner chunk (1, z, y, x) of a level of (z, y, x): one channel, at most :data:`CHUNK_ZYX`."""
    return (1, *(min(int(n), c) for n, c in zip(zyx, CHUNK_ZYX)))


def write_peak_bytes(zyx: tuple[int, int, int], output_dtype: str) -> int:
    """Upper bound of what writing one (position, channel) holds at its peak, the float32 result ``W`` included:
    the pyramid levels below it (each built from the one above: less than ``W / 3`` together), for uint16 and
    float16 output the cast copy of level 0 (``W / 2``, cast in blocks of :data:`CAST_BLOCK`), and the shard
    writer's chunk buffers (:func:`tasks.sharding.buffer_bytes`, at most :data:`tasks.sharding.MAX_WRITE_THREADS`
    threads). zarr's own chunk buffers (layout 2's unsharded arrays) are not included."""
    from tasks import sharding

    n = int(np.prod(zyx))
    peak = n * 4 + n * 4 // 3
    itemsize = np.dtype(output_dtype).itemsize
    if itemsize != 4:
        peak += n * itemsize + CAST_BLOCK * 4
    peak += sharding.buffer_bytes(int(np.prod(chunk_shape(zyx))) * itemsize, sharding.MAX_WRITE_THREADS)
    return peak
