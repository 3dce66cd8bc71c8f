"""Sharded output arrays (layout 3): the shard-shape rule, the writer of whole shards, and the output's footprint.

zarr v3's sharding codec (``sharding_indexed``) stores a block of inner chunks in one object, a *shard*. The
inner chunks stay what viewers read, (1, <=64, <=256, <=256); a shard covers whole inner chunks of one channel,
so each shard belongs to exactly one (position, channel) and is written by that task alone.

Shard object format (zarr v3 specification, index at the end, as zarr writes it)::

    chunk bytes ... | index: (offset, nbytes) per inner chunk, C order, little-endian uint64 | CRC32C of the index, <u4

An absent inner chunk has ``(2**64 - 1, 2**64 - 1)``. Each inner chunk is encoded by the array's inner codecs:
little-endian bytes, then blosc with the array's parameters (typesize = the dtype's itemsize).

Why dogflow writes shards itself (:func:`write_whole_shards`) instead of ``arr[channel] = level``: zarr 3.1's
sharding codec treats every write as a partial one. It first reads the whole existing shard (a torn shard left
by a crash then fails its index checksum and the rerun's write raises), and it assembles each shard in a fresh
buffer: a full seed position wrote in 2.2-2.6x the wall time of the unsharded array, with 9 s more system time
(page faults of those buffers; ``benchmarks/README.md``). The writer here encodes inner chunks on a few threads
and streams them through the storage seam (:meth:`tasks.storage.LocalStorage.writer`: a temporary file that
replaces the shard in one ``os.replace``): no read of the old shard, no shard-sized buffer, and a shard is either
the old one or the new whole one, never torn. On an object store zarr writes the shard (one PUT: S3 replaces
objects whole, so a shard is never torn there either).
"""

from __future__ import annotations

import collections
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from tasks.storage import Storage

# Chosen by measurement (benchmarks/output_write.py --shards, README "Output layout"): shards of at most 1 GiB
# (in the output dtype). A full seed position: level 0 in 7 shards (1, 64, 2048, 2048), level 1 in 2 shards
# (1, 256, 1024, 1024): 9 files per (position, channel) instead of 560.
SHARD_BYTES = 1 << 30
MAX_WRITE_THREADS = 4  # one thread writes the file; more than ~3 encoding threads do not keep up with it
_ABSENT = np.uint64(2**64 - 1)


def shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int,
                max_bytes: int | None = None) -> tuple[int, ...]:
    """The shard shape of an array of ``shape`` with inner ``chunks``: whole inner chunks, at most ``max_bytes``.

    Axis 0 (the channel) keeps its chunk (one channel per shard: one writer per shard). The other axes grow
    from the last to the first (x, then y, then z), each by whole inner chunks up to the array's extent, while
    the shard's ``prod(shard) * itemsize`` stays <= ``max_bytes``. An axis that fits only partly is split into
    the fewest shards that fit, of equal size (e.g. 7 z-chunks with room for 4: shards of 4 and 3 chunks).
    A single inner chunk larger than ``max_bytes`` is its own shard. ``max_bytes`` defaults to :data:`SHARD_BYTES`.
    """
    max_bytes = max_bytes or SHARD_BYTES
    shard = list(chunks)
    for ax in range(len(shape) - 1, 0, -1):
        n = -(-shape[ax] // chunks[ax])  # inner chunks along this axis
        room = max_bytes // (math.prod(shard) * itemsize)  # how many times the shard may grow here
        k = max(1, min(n, room))
        k = -(-n // -(-n // k))  # fewest shards that fit, split evenly
        shard[ax] = chunks[ax] * k
        if k < n:
            break  # this axis is split: growing an outer one would make shards non-contiguous blocks
    return tuple(shard)


def grid(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """How many ``block``s cover ``shape`` per axis (the last one may be partial)."""
    return tuple(-(-s // b) for s, b in zip(shape, block))


def buffer_bytes(chunk_nbytes: int, threads: int) -> int:
    """Upper bound of what :func:`write_whole_shards` holds besides its input: per thread a contiguous copy
    and the encoded bytes of one inner chunk, and up to ``2 * threads`` encoded chunks waiting to be written."""
    t = _threads(threads)
    return (2 * t + 2 * t) * (chunk_nbytes + 64)


def _threads(threads: int | None) -> int:
    return max(1, min(MAX_WRITE_THREADS, int(threads or os.cpu_count() or 1)))


# =========================================================================== writing whole shards


@dataclass(frozen=True)
class _ShardedArray:
    """What the writer needs of a sharded zarr array whose storage streams objects (:meth:`Storage.writer`)."""

    storage: Storage
    key: str  # the array's key in the storage
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    codec: Blosc
    fill_value: Any
    encode_key: Callable[[tuple[int, ...]], str]

    @classmethod
    def of(cls, arr: zarr.Array, storage: Storage | None, key: str) -> "_ShardedArray | None":
        codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or storage is None \
                or not storage.streams_objects:
            return None
        sc = codecs[0]
        inner, index = tuple(sc.codecs), tuple(sc.index_codecs)
        if (sc.index_location != ShardingCodecIndexLocation.end or len(inner) != 2
                or not isinstance(inner[0], BytesCodec) or not isinstance(inner[1], BloscCodec)
                or len(index) != 2 or not isinstance(index[0], BytesCodec) or not isinstance(index[1], Crc32cCodec)
                or (inner[0].endian is not None and inner[0].endian.value != "little")
                or (index[0].endian is not None and index[0].endian.value != "little")):
            return None
        b = inner[1]
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        itemsize = arr.dtype.itemsize
        codec = Blosc(cname=b.cname.value, clevel=b.clevel, shuffle=shuffle[b.shuffle.value] if b.shuffle else
                      (Blosc.SHUFFLE if itemsize > 1 else Blosc.BITSHUFFLE), blocksize=b.blocksize, typesize=itemsize)
        return cls(storage, key, tuple(arr.shards), tuple(sc.chunk_shape), codec, arr.fill_value,
                   arr.metadata.encode_chunk_key)


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``map(fn, items)`` on ``pool``, in order, with at most ``window`` calls submitted and not yet consumed."""
    pending: collections.deque = collections.deque()
    for it in items:
        pending.append(pool.submit(fn, it))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_whole_shards(arr: zarr.Array, lead: tuple[int, ...], data: np.ndarray, threads: int | None = None,
                       storage: Storage | None = None, key: str = "") -> int:
    """``arr[lead] = data`` for a sharded array, as whole shards; returns the number of shard objects written.
    ``storage`` and ``key``: where the array is (the output's :class:`tasks.storage.Storage`, the array's key).

    ``lead`` indexes the leading axes whose shard extent is 1 (here the channel), ``data`` is everything below
    them, in ``arr.dtype``. Every shard that ``data`` touches is rebuilt from ``data`` alone (nothing is read):
    its inner chunks inside the array are encoded (a partial edge chunk padded with the fill value, as zarr
    does), inner chunks wholly outside the array are absent. Each shard goes to a temporary file beside it and
    replaces it in one ``os.replace``; temporary files a crashed writer left for these shards are removed.
    Arrays this writer does not know (not sharded, a storage that does not stream objects, other codecs) are
    written by zarr.
    """
    info = _ShardedArray.of(arr, storage, key)
    nl = len(lead)
    if info is None or any(s != 1 for s in info.shard[:nl]) or data.shape != tuple(arr.shape[nl:]):
        arr[lead] = data
        return 0
    data = np.asarray(data, dtype=arr.dtype)
    shard, chunk = info.shard[nl:], info.chunk[nl:]
    per_shard = grid(shard, chunk)

    def chunks_of(s: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Inner chunks (shard-local coordinates, C order) of shard ``s`` that hold array elements."""
        lo = [a * b for a, b in zip(s, shard)]
        have = [min(n, -(-(e - o) // c)) for n, e, o, c in zip(per_shard, data.shape, lo, chunk)]
        return list(np.ndindex(*have))

    def encode(job: tuple[tuple[int, ...], tuple[int, ...]]) -> bytes:
        s, c = job
        sl = tuple(slice(a * sb + b * cb, a * sb + (b + 1) * cb) for a, b, sb, cb in zip(s, c, shard, chunk))
        part = data[sl]
        if part.shape != chunk:
            full = np.full(chunk, info.fill_value, dtype=data.dtype)
            full[tuple(slice(0, n) for n in part.shape)] = part
            part = full
        return info.codec.encode(np.ascontiguousarray(part).astype(part.dtype.newbyteorder("<"), copy=False))

    shards = list(np.ndindex(*grid(data.shape, shard)))
    jobs = [(s, c) for s in shards for c in chunks_of(s)]
    nthreads = _threads(threads)
    with ThreadPoolExecutor(nthreads, thread_name_prefix="dogflow-shard") as pool:
        encoded = _ordered(pool, encode, jobs, 2 * nthreads)
        for s in shards:
            index = np.full((*per_shard, 2), _ABSENT, dtype="<u8")
            offset = 0
            with info.storage.writer(f"{info.key}/{info.encode_key((*lead, *s))}") as fh:
                for c in chunks_of(s):
                    b = next(encoded)
                    fh.write(b)
                    index[c] = (offset, len(b))
                    offset += len(b)
                ib = index.tobytes()
                fh.write(ib)
                fh.write(np.array([google_crc32c.value(ib)], dtype="<u4").tobytes())
    return len(shards)


# =========================================================================== the output's footprint


@dataclass(frozen=True)
class Footprint:
    """Size and file count of an output: per position (its selected channels) and for a run of positions."""

    positions: int
    channels: int
    levels: list[tuple[int, int, int]]
    itemsize: int
    data_files_per_channel: int  # shard files (layout 3) of one (position, channel), every level
    files_per_position: int  # data files of its channels, level and group metadata, markers and previews
    bytes_per_position: int  # uncompressed, every level, the selected channels
    run_files: int
    run_bytes: int

    def lines(self, ratio: float | None = None) -> list[str]:
        """What ``dogflow plan`` prints: sizes uncompressed (what the codec stores is smaller by its ratio, which
        depends on the data); ``ratio`` (uncompressed / stored) adds an estimate of the stored size."""
        def size(n: float) -> str:
            return next(f"{n / f:.1f} {u}" for f, u in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                        if n >= f or f == 1)

        def sizes(n: int) -> str:
            return f"{size(n)} uncompressed" + (f" (about {size(n / ratio)} stored at ratio {ratio:.2f})" if ratio else "")
        return [
            f"output: levels {self.levels}, {self.channels} channel(s) per position, {self.itemsize}-byte values",
            f"output per position: {sizes(self.bytes_per_position)}, {self.files_per_position} files "
            f"({self.data_files_per_channel} shard files per channel)",
            f"output for the run ({self.positions} positions): {sizes(self.run_bytes)}, {self.run_files} files",
        ]


def footprint(levels: list[tuple[int, int, int]], chunks: Callable[[tuple[int, int, int]], tuple[int, ...]],
              output_dtype: str, positions: int, channels: int, max_bytes: int | None = None) -> Footprint:
    """The :class:`Footprint` of a layout-3 output: ``levels`` (z, y, x) shapes, ``chunks(zyx)`` the inner chunk
    (1, cz, cy, cx) of a level. Files: per (position, channel) its shards, a completion marker and a preview;
    per position its group's and each level's ``zarr.json``; per run the root ``zarr.json`` and the
    ``dogflow`` group's (the run's log file not counted). Bytes are uncompressed values of every level."""
    itemsize = np.dtype(output_dtype).itemsize
    data = 0
    nbytes = 0
    for zyx in levels:
        shape = (1, *zyx)
        data += math.prod(grid(shape, shard_shape(shape, chunks(zyx), itemsize, max_bytes)))
        nbytes += math.prod(zyx) * itemsize
    per_position = channels * (data + 2) + 1 + len(levels)
    return Footprint(positions, channels, list(levels), itemsize, data, per_position, channels * nbytes,
                     positions * per_position + 2, positions * channels * nbytes)
